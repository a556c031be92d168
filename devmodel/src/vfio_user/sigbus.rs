//! Surviving a client that shrinks the file under its DMA mappings.
//!
//! Guest RAM reached through a vfio-user `DMA_MAP` is a shared mapping of
//! the client's file. If the client truncates that file later, touching a
//! page past the new end raises SIGBUS, which would kill the device model.
//! A process-wide handler (installed once, `SA_SIGINFO`) looks the faulting
//! address up in a lock-free, fixed-size registry of the guest-memory
//! mappings [`DmaMap`](super::dma::DmaMap) created. Inside one, it puts an
//! anonymous zero page over the faulting page (`mmap` `MAP_FIXED`; the
//! instruction then completes, reading zeros or writing into the
//! throw-away page), counts the fault on that mapping and in
//! [`hcd_emul::mem::note_memory_fault`], and returns: `GuestRam` sees the
//! count move during the access and fails it with `DmaError::Vanished`,
//! so the transfer that hit the fault fails. The DMA code then
//! drops the whole mapping from the guest's memory map ("poisoned"), so
//! every later access there fails as a DMA error. Outside every registered
//! range the handler restores the default action and returns: the fault
//! happens again and the process dies as it would have without us.
//!
//! File I/O syscalls and usbfs copies into such pages do not fault: the
//! kernel returns EFAULT, which the callers already turn into DMA errors.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Once;

/// Ranges the registry holds at once (live mappings plus those retired but
/// still in use by an access under way).
pub const SLOTS: usize = 4096;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    faults: AtomicU64,
}

impl Slot {
    const fn new() -> Self {
        Self {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            faults: AtomicU64::new(0),
        }
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// Faults absorbed in any registered range since the process started.
static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid value (empty mask, no
        // flags); we then set the handler and flags. `handler` has the
        // SA_SIGINFO signature and only does async-signal-safe work
        // (atomics, mmap, sigaction).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = handler;
            sa.sa_sigaction = f as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                // Once per process, never guest-triggered: not rate-limited.
                tracing::event!(
                    tracing::Level::ERROR,
                    "vfio-user: cannot install the SIGBUS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo_t to an SA_SIGINFO handler;
    // for SIGBUS `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &REGISTRY {
        if slot.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let start = slot.start.load(Ordering::Relaxed);
        let len = slot.len.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        let at = addr & !(page - 1);
        // SAFETY: `at..at + page` lies inside a mapping we created and
        // still own (a slot is freed before its mapping is unmapped), so
        // replacing that page clobbers nothing else. mmap is a plain
        // system call, safe to make from a signal handler.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            slot.faults.fetch_add(1, Ordering::Relaxed);
            FAULTS.fetch_add(1, Ordering::Release);
            // The access under way fails as a DMA error (GuestRam compares
            // this count around every access).
            hcd_emul::mem::note_memory_fault();
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): the default action,
    // taken when the faulting instruction runs again.
    // SAFETY: as in `install`; SIG_DFL is a valid disposition.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Faults absorbed so far, process-wide (cheap to poll for a change).
pub fn total_faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// A registered host range; unregistered on drop.
#[derive(Debug)]
pub struct Registration(usize);

/// Registers `start..start + len`; `None` if the registry is full.
pub fn register(start: usize, len: usize) -> Option<Registration> {
    install();
    for (i, slot) in REGISTRY.iter().enumerate() {
        if slot
            .state
            .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            slot.start.store(start, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
            slot.faults.store(0, Ordering::Relaxed);
            slot.state.store(LIVE, Ordering::Release);
            return Some(Registration(i));
        }
    }
    None
}

impl Registration {
    /// Faults absorbed in this range.
    pub fn faults(&self) -> u64 {
        REGISTRY[self.0].faults.load(Ordering::Relaxed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let slot = &REGISTRY[self.0];
        slot.state.store(BUSY, Ordering::Release);
        slot.len.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
    }
}
