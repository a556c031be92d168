//! [`HostDevice`]: a physical USB device behind our controller.
//!
//! * **Threads.** The controller calls [`UsbDevice`] methods on its own
//!   thread; one worker thread per device waits (`poll`) on the usbfs node
//!   and reaps completed URBs, or, while no device is there, rescans sysfs
//!   for one the [`MatchRule`] accepts. Both sides share [`Inner`] under
//!   one mutex; URB results are applied under it.
//! * **Transfers.** Each endpoint keeps its transfers in submission order.
//!   A transfer becomes one URB, or, for bulk transfers longer than
//!   [`MAX_URB_LEN`], several (`BULK_CONTINUATION`); at most
//!   [`BYTES_IN_FLIGHT`] bytes are in URBs at once (usbfs has a global
//!   16 MiB budget). URBs go to the kernel strictly in transfer order, and
//!   transfers complete from the head of the queue only, so the guest sees
//!   them in order whatever the host does. A split IN transfer submits its
//!   next piece only after the previous one came back full: a short packet
//!   ends the transfer and no later piece can swallow the next transfer's
//!   data.
//! * **Zero copy.** When a transfer's buffer is one contiguous piece of
//!   guest RAM ([`Transfer::host_buffer`]), the URB points into it: usbfs
//!   copies OUT data from it during `SUBMITURB` and IN data into it during
//!   `REAPURB`, once, with no bounce buffer of ours. Otherwise data goes
//!   through a per-URB buffer and [`Transfer::read_data`] /
//!   [`Transfer::write_data`], which respect cancellation by themselves.
//!   For zero-copy IN URBs, [`UsbDevice::cancel`] discards the URB and
//!   reaps it before returning, so guest memory of a cancelled transfer is
//!   not written after the controller finished cancelling it.
//! * **Requests that must not go straight to the device** (USB 2.0 §9.4):
//!   SET_ADDRESS is virtual (the host kernel owns the real address);
//!   SET_CONFIGURATION releases our interfaces, sets the configuration
//!   through the kernel and claims the new interfaces; SET_INTERFACE and
//!   CLEAR_FEATURE(ENDPOINT_HALT) go through the kernel so its view of
//!   alternate settings and toggles stays right.
//! * **Reset.** A guest port reset resets the host device only once it has
//!   been used since the last reset (the first reset of an enumeration is
//!   free), as QEMU resets only devices that have an address.
//! * **Removal.** ENODEV (or POLLHUP) completes every transfer with
//!   [`TransferStatus::DeviceGone`], closes the node, and turns
//!   [`UsbDevice::connected`] false; the worker then rescans and re-opens a
//!   device the rule matches, and the controller shows a new connection.
//!   A device that has just appeared is opened once the host kernel has
//!   set its configuration and added its interfaces (at most [`SETTLE`]
//!   later), so that its interfaces are claimed before a host driver binds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hcd_emul::usb::{
    request, Direction, IsoPacket, SetupPacket, Speed, Transfer, TransferId, TransferKind,
    TransferStatus, UsbDevice, Wakeup,
};
use hcd_emul::HostRange;
use hcd_emul::{guest_info, guest_warn};
use tracing::{debug, info};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::descriptors::HostDescriptors;
use crate::rule::{self, HostDeviceInfo, MatchRule};
use crate::usbfs::{self, urb_flag, urb_type, UrbBlock, Usbfs, MAX_ISO_PACKETS};

/// Largest URB; longer bulk transfers are split.
pub const MAX_URB_LEN: usize = 1 << 20;
/// Most bytes in URBs at once per device (one URB may exceed it when
/// nothing else is in flight).
pub const BYTES_IN_FLIGHT: usize = 8 << 20;
/// How often sysfs is rescanned while no device matches.
const RESCAN: Duration = Duration::from_millis(200);
/// How long a device that has just appeared may stay unconfigured (or
/// configured without its interfaces in sysfs) before it is opened anyway:
/// the host kernel chooses a configuration and adds the interfaces a few
/// milliseconds after the device node appears, and a device opened in that
/// window had nothing to claim, so the host's own drivers took it.
const SETTLE: Duration = Duration::from_secs(2);
/// How long cancel/reset wait for discarded URBs to come back.
const DISCARD_WAIT: Duration = Duration::from_secs(1);
/// URBs reaped per wake-up before others get the lock.
const REAP_BATCH: usize = 1024;

/// Why a host device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The rule is malformed.
    #[error("invalid match rule")]
    Rule(#[from] rule::RuleError),
    /// The worker thread could not be started.
    #[error("cannot start the device thread")]
    Thread(#[source] io::Error),
}

/// Where to look for devices, and how to present them.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Root port kind: `Some(Speed::Super)` for a USB 3 port, `Some(_)`
    /// else for a USB 2 port; `None`: the speed of the device found at
    /// start (USB 2 if none is there yet).
    pub speed: Option<Speed>,
    /// `/sys/bus/usb/devices`.
    pub sysfs: PathBuf,
    /// `/dev`.
    pub devfs: PathBuf,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            speed: None,
            sysfs: PathBuf::from("/sys/bus/usb/devices"),
            devfs: PathBuf::from("/dev"),
        }
    }
}

/// Work counters of one passthrough device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassthroughStats {
    /// URBs submitted.
    pub urbs: u64,
    /// Of those, URBs whose buffer was guest RAM itself.
    pub zero_copy_urbs: u64,
    /// Bytes moved (URB actual lengths).
    pub bytes: u64,
    /// Times a matching device was opened.
    pub attaches: u64,
    /// Times an open device went away (at most `attaches`).
    pub disconnects: u64,
    /// Host device resets.
    pub resets: u64,
}

/// Maps a URB's status (0 or a negative errno) to a transfer status.
pub fn map_status(status: i32, dir_in: bool, actual: usize, len: usize) -> TransferStatus {
    match -status {
        0 if dir_in && actual < len => TransferStatus::ShortPacket,
        0 => TransferStatus::Success,
        libc::EREMOTEIO => TransferStatus::ShortPacket,
        libc::EPIPE => TransferStatus::Stall,
        libc::EOVERFLOW => TransferStatus::Babble,
        libc::ENODEV | libc::ESHUTDOWN => TransferStatus::DeviceGone,
        libc::ENOENT | libc::ECONNRESET => TransferStatus::Cancelled,
        _ => TransferStatus::TransactionError,
    }
}

fn speed_of(v: u32) -> Option<Speed> {
    match v {
        1 => Some(Speed::Low),
        2 => Some(Speed::Full),
        3 | 4 => Some(Speed::High),
        5 | 6 => Some(Speed::Super),
        _ => None,
    }
}

fn speed_code(s: Speed) -> u8 {
    match s {
        Speed::Low => 0,
        Speed::Full => 1,
        Speed::High => 2,
        Speed::Super => 3,
    }
}

fn speed_from_code(c: u8) -> Speed {
    match c {
        0 => Speed::Low,
        1 => Speed::Full,
        3 => Speed::Super,
        _ => Speed::High,
    }
}

/// How a control request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRoute {
    /// SET_ADDRESS: answered here (the host owns the address).
    SetAddress,
    /// SET_CONFIGURATION(value).
    SetConfiguration(u8),
    /// SET_INTERFACE(interface, alternate).
    SetInterface(u8, u8),
    /// CLEAR_FEATURE(ENDPOINT_HALT) on endpoint address.
    ClearHalt(u8),
    /// GET_DESCRIPTOR answered from our rewritten descriptors (type, index).
    LocalDescriptor(u8, u8),
    /// Everything else: a control URB.
    Forward,
}

/// Decides how `sp` is served; `compat` is whether descriptors are
/// rewritten (a SuperSpeed device shown as high speed).
pub fn route_control(sp: &SetupPacket, compat: bool) -> ControlRoute {
    match (sp.request_type, sp.request) {
        (0x00, request::SET_ADDRESS) => ControlRoute::SetAddress,
        (0x00, request::SET_CONFIGURATION) => ControlRoute::SetConfiguration(sp.value as u8),
        (0x01, request::SET_INTERFACE) => {
            ControlRoute::SetInterface(sp.index as u8, sp.value as u8)
        }
        (0x02, request::CLEAR_FEATURE) if sp.value == request::FEATURE_ENDPOINT_HALT => {
            ControlRoute::ClearHalt(sp.index as u8)
        }
        (0x80, request::GET_DESCRIPTOR) if compat && matches!(sp.value >> 8, 1 | 2) => {
            ControlRoute::LocalDescriptor((sp.value >> 8) as u8, sp.value as u8)
        }
        _ => ControlRoute::Forward,
    }
}

/// A URB block owned by us, handed to the kernel by address.
struct OwnedBlock(NonNull<UrbBlock>);

// SAFETY: the block is plain data reached only through `Inner` (under its
// mutex) and by the kernel inside our ioctls; no thread-local state.
unsafe impl Send for OwnedBlock {}

impl OwnedBlock {
    fn new(b: UrbBlock) -> Self {
        OwnedBlock(NonNull::from(Box::leak(Box::new(b))))
    }
    fn ptr(&self) -> *mut UrbBlock {
        self.0.as_ptr()
    }
    fn read(&self) -> UrbBlock {
        // SAFETY: the pointer came from `Box::leak` and is freed only in
        // Drop; the kernel writes it only inside our reap ioctl, which has
        // returned.
        unsafe { std::ptr::read(self.0.as_ptr()) }
    }
}

impl Drop for OwnedBlock {
    fn drop(&mut self) {
        // SAFETY: leaked from a Box in `new`; dropped once. `Inner` drops
        // URBs only after the kernel returned them or the node is closed
        // (the kernel touches URB memory only inside our ioctls).
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

enum UrbBuf {
    /// Our buffer (bounce, control, or nothing for zero-length).
    Owned(Vec<u8>),
    /// Guest RAM itself.
    Guest(HostRange),
}

/// One URB in the kernel.
struct Urb {
    block: OwnedBlock,
    _buf: UrbBuf,
    id: TransferId,
    /// Queue of the transfer (see [`pipe`]).
    ep: u32,
    off: usize,
    len: usize,
    zero_copy_in: bool,
    /// Owned copy of the buffer pointer for IN bounce data.
    bounce: Option<(usize, usize)>,
    control: bool,
}

/// A transfer the device holds, in endpoint order.
struct Pending {
    id: TransferId,
    xfer: Option<Transfer>,
    urb_type: u8,
    ep: u8,
    /// USB 3 bulk stream (0: none).
    stream: u16,
    dir_in: bool,
    len: usize,
    zero_copy: Option<HostRange>,
    next_off: usize,
    started: bool,
    urbs_out: usize,
    actual: usize,
    result: Option<TransferStatus>,
    /// Data a locally answered control IN request returns.
    reply: Option<Vec<u8>>,
    iso: Vec<IsoPacket>,
}

/// The open host device.
struct Open {
    fd: Arc<Usbfs>,
    info: HostDeviceInfo,
    descs: HostDescriptors,
    /// Rewritten descriptors when a SuperSpeed device sits on a USB 2 port.
    compat: Option<HostDescriptors>,
    config: u8,
    claimed: Vec<u8>,
}

struct Inner {
    // Field order matters: `open` (the node) is dropped before `urbs`.
    open: Option<Open>,
    urbs: HashMap<u64, Urb>,
    /// Transfers per pipe (endpoint and stream, see [`pipe`]), in order.
    eps: BTreeMap<u32, VecDeque<Pending>>,
    /// Bulk endpoints with streams allocated on the host: how many.
    streams: BTreeMap<u8, u32>,
    next_token: u64,
    in_flight: usize,
    /// Used since the last reset: "has an address" for reset purposes.
    used: bool,
    stats: PassthroughStats,
    /// The host kernel refused to pin guest RAM for a URB (EFAULT: Xen's
    /// foreign mappings cannot be pinned): bounce buffers from then on.
    zero_copy_off: bool,
    /// The last device refused (wrong speed for the port): not retried
    /// until something else shows up.
    refused: Option<(u32, u32)>,
    /// A device found before the host kernel finished configuring it, and
    /// when it was first seen so (see [`SETTLE`]).
    settling: Option<((u32, u32), Instant)>,
}

struct Shared {
    inner: Mutex<Inner>,
    connected: AtomicBool,
    speed: AtomicU8,
    port_usb3: bool,
    stop: AtomicBool,
    kick: EventFd,
    wakeup: Mutex<Option<Wakeup>>,
    rule: MatchRule,
    opts: HostOptions,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A host USB device passed through usbfs. See the module documentation.
pub struct HostDevice {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDevice")
            .field("rule", &self.shared.rule)
            .field("connected", &self.shared.connected.load(Ordering::Relaxed))
            .finish()
    }
}

/// A handle to watch a [`HostDevice`] after it was given to a controller.
#[derive(Clone)]
pub struct HostMonitor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HostMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMonitor")
            .field("rule", &self.shared.rule)
            .finish()
    }
}

impl HostMonitor {
    /// Whether a matching device is open.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }
    /// The open device.
    pub fn device(&self) -> Option<HostDeviceInfo> {
        lock(&self.shared.inner)
            .open
            .as_ref()
            .map(|o| o.info.clone())
    }
    /// Counters.
    pub fn stats(&self) -> PassthroughStats {
        lock(&self.shared.inner).stats
    }
    /// Transfers held (in URBs or waiting for room).
    pub fn transfers_held(&self) -> usize {
        lock(&self.shared.inner)
            .eps
            .values()
            .map(VecDeque::len)
            .sum()
    }
    /// URBs in the kernel.
    pub fn urbs_in_flight(&self) -> usize {
        lock(&self.shared.inner).urbs.len()
    }
}

impl HostDevice {
    /// Sets up passthrough of the device `rule` matches, now if it is
    /// there, else as soon as it is plugged in.
    pub fn new(rule: MatchRule, opts: HostOptions) -> Result<HostDevice, HostError> {
        rule.validate()?;
        let present = rule::find(&opts.sysfs, &rule);
        let speed = opts
            .speed
            .or_else(|| present.as_ref().and_then(|d| d.speed))
            .unwrap_or(Speed::High);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                open: None,
                urbs: HashMap::new(),
                eps: BTreeMap::new(),
                streams: BTreeMap::new(),
                next_token: 1,
                in_flight: 0,
                used: false,
                stats: PassthroughStats::default(),
                refused: None,
                settling: None,
                zero_copy_off: false,
            }),
            connected: AtomicBool::new(false),
            speed: AtomicU8::new(speed_code(speed)),
            port_usb3: speed.is_superspeed(),
            stop: AtomicBool::new(false),
            kick: EventFd::new(EFD_NONBLOCK).map_err(HostError::Thread)?,
            wakeup: Mutex::new(None),
            rule,
            opts,
        });
        shared.try_attach();
        let s2 = shared.clone();
        let worker = std::thread::Builder::new()
            .name("usb-passthrough".into())
            .spawn(move || s2.run())
            .map_err(HostError::Thread)?;
        Ok(HostDevice {
            shared,
            worker: Some(worker),
        })
    }

    /// A handle for watching the device (tests, statistics).
    pub fn monitor(&self) -> HostMonitor {
        HostMonitor {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.kick.write(1);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let mut g = lock(&self.shared.inner);
        g.cancel_all();
        if let Some(open) = g.open.take() {
            release_interfaces(&open, true);
            info!(target: "passthrough", "{}: released, host drivers reattached", open.info.port);
        }
        g.urbs.clear();
        self.shared.connected.store(false, Ordering::SeqCst);
    }
}

/// Detaches host drivers from and claims every interface of `config`.
fn claim_interfaces(fd: &Usbfs, descs: &HostDescriptors, config: u8, port: &str) -> Vec<u8> {
    let mut claimed = Vec::new();
    for ifno in descs.interfaces(config) {
        let drv = fd.driver(ifno);
        match fd.disconnect_claim(ifno) {
            Ok(()) => {
                if let Some(d) = drv.filter(|d| d != "usbfs") {
                    debug!(target: "passthrough", "{port}: interface {ifno} taken from {d}");
                }
                claimed.push(ifno);
            }
            Err(e) => {
                guest_warn!(target: "passthrough", "{port}: cannot claim interface {ifno}: {e}")
            }
        }
    }
    claimed
}

/// Whether the host kernel has set configuration `config` on the device
/// at sysfs `port` and added every interface of it.
fn kernel_configured(sysfs: &Path, port: &str, descs: &HostDescriptors, config: u8) -> bool {
    config != 0
        && descs
            .interfaces(config)
            .iter()
            .all(|i| sysfs.join(format!("{port}:{config}.{i}")).exists())
}

/// Releases our interfaces; with `reattach`, asks the kernel to bind its
/// drivers to every interface again.
fn release_interfaces(open: &Open, reattach: bool) {
    for &ifno in &open.claimed {
        let _ = open.fd.release(ifno);
    }
    if reattach {
        for ifno in open.descs.interfaces(open.config) {
            let _ = open.fd.connect_driver(ifno);
        }
    }
}

impl Shared {
    fn wake_controller(&self) {
        if let Some(w) = lock(&self.wakeup).as_ref() {
            w.wake();
        }
    }

    /// Worker thread: reap while open, rescan while not.
    fn run(self: Arc<Self>) {
        // Bounded by `stop`; every iteration blocks in poll.
        while !self.stop.load(Ordering::SeqCst) {
            let fd = lock(&self.inner).open.as_ref().map(|o| o.fd.clone());
            match fd {
                Some(fd) => {
                    let ev = usbfs::poll(
                        &[(fd.raw_fd(), libc::POLLOUT), (self.kick_fd(), libc::POLLIN)],
                        1000,
                    );
                    let _ = self.kick.read();
                    if ev.is_err() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let mut g = lock(&self.inner);
                    if g.open.as_ref().is_some_and(|o| Arc::ptr_eq(&o.fd, &fd)) {
                        let gone = g.reap_all();
                        if gone {
                            g.gone();
                            drop(g);
                            self.connected.store(false, Ordering::SeqCst);
                            self.wake_controller();
                        }
                    }
                }
                None => {
                    let _ =
                        usbfs::poll(&[(self.kick_fd(), libc::POLLIN)], RESCAN.as_millis() as i32);
                    let _ = self.kick.read();
                    if !self.stop.load(Ordering::SeqCst) {
                        self.try_attach();
                    }
                }
            }
        }
    }

    fn kick_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.kick.as_raw_fd()
    }

    /// Opens the device the rule matches, if one is there and fits the
    /// root port.
    fn try_attach(&self) {
        if lock(&self.inner).open.is_some() {
            return;
        }
        let Some(info) = rule::find(&self.opts.sysfs, &self.rule) else {
            lock(&self.inner).refused = None;
            return;
        };
        if lock(&self.inner).refused == Some((info.bus, info.addr)) {
            return;
        }
        let refuse = |why: String| {
            guest_warn!(target: "passthrough", "{} ({}): {why}", info.port, self.rule);
            lock(&self.inner).refused = Some((info.bus, info.addr));
        };
        let fd = match Usbfs::open(&self.opts.devfs, info.bus, info.addr) {
            Ok(f) => f,
            Err(e) => return refuse(format!("cannot open the usbfs node: {e}")),
        };
        let descs = match fd
            .read_descriptors()
            .map_err(|e| e.to_string())
            .and_then(|b| HostDescriptors::parse(&b).map_err(|e| e.to_string()))
        {
            Ok(d) => d,
            Err(e) => return refuse(format!("cannot read descriptors: {e}")),
        };
        let host_speed = fd
            .speed()
            .ok()
            .and_then(speed_of)
            .or(info.speed)
            .unwrap_or(Speed::High);
        let (shown, compat) = match (self.port_usb3, host_speed) {
            (true, Speed::Super) | (false, Speed::Low | Speed::Full | Speed::High) => {
                (host_speed, None)
            }
            (false, Speed::Super) if descs.high_speed_compatible() => {
                (Speed::High, Some(descs.as_high_speed()))
            }
            (false, _) => {
                return refuse(
                    "a SuperSpeed device with isochronous endpoints or streams cannot be shown on a USB 2 port".into(),
                )
            }
            (true, s) => {
                return refuse(format!(
                    "a {s:?}-speed device cannot be shown on a USB 3 port"
                ))
            }
        };
        let config =
            std::fs::read_to_string(self.opts.sysfs.join(&info.port).join("bConfigurationValue"))
                .ok()
                .and_then(|s| s.trim().parse::<u8>().ok())
                .unwrap_or(0);
        // Opened before the kernel set a configuration and added its
        // interfaces, there is nothing to claim, and the host's drivers
        // bind a moment later: wait for the kernel, for a while.
        if !kernel_configured(&self.opts.sysfs, &info.port, &descs, config) {
            if lock(&self.inner).settling((info.bus, info.addr)) {
                return;
            }
            debug!(
                target: "passthrough",
                "{}: still unconfigured after {SETTLE:?}, opened as it is",
                info.port
            );
        }
        let claimed = claim_interfaces(&fd, &descs, config, &info.port);
        info!(
            target: "passthrough",
            "{} ({}): {:04x}:{:04x} at bus {} addr {}, {:?} speed{}, {} interface(s) claimed",
            info.port,
            self.rule,
            descs.vendor(),
            descs.product(),
            info.bus,
            info.addr,
            host_speed,
            if compat.is_some() { " shown as high speed" } else { "" },
            claimed.len()
        );
        {
            let mut g = lock(&self.inner);
            g.refused = None;
            g.settling = None;
            g.used = false;
            g.stats.attaches += 1;
            g.open = Some(Open {
                fd: Arc::new(fd),
                info,
                descs,
                compat,
                config,
                claimed,
            });
        }
        self.speed.store(speed_code(shown), Ordering::SeqCst);
        self.connected.store(true, Ordering::SeqCst);
        let _ = self.kick.write(1);
        self.wake_controller();
    }
}

impl Inner {
    /// Whether the device at `key`, not configured yet, is still within
    /// [`SETTLE`] of when it was first seen so.
    fn settling(&mut self, key: (u32, u32)) -> bool {
        if self.settling.map(|(k, _)| k) != Some(key) {
            self.settling = Some((key, Instant::now()));
        }
        self.settling.is_some_and(|(_, t)| t.elapsed() < SETTLE)
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        t
    }

    /// Reaps every completed URB. Returns `true` if the device is gone.
    fn reap_all(&mut self) -> bool {
        for _ in 0..REAP_BATCH {
            let Some(open) = self.open.as_ref() else {
                return false;
            };
            match open.fd.reap() {
                Ok(Some(p)) => {
                    // SAFETY: `p` is a block we submitted and still own
                    // (it is in `urbs` until removed below); the kernel
                    // has finished writing it.
                    let token = unsafe { (*p).urb.usercontext } as u64;
                    match self.urbs.remove(&token) {
                        Some(u) if u.block.ptr() == p => self.urb_done(&u),
                        Some(u) => {
                            guest_warn!(target: "passthrough", "reaped URB does not match its token");
                            self.urbs.insert(token, u);
                        }
                        None => guest_warn!(target: "passthrough", "reaped an unknown URB"),
                    }
                }
                Ok(None) => return false,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ESHUTDOWN)) => {
                    return true
                }
                Err(e) => {
                    guest_warn!(target: "passthrough", "reap: {e}");
                    return false;
                }
            }
        }
        false
    }

    /// Applies one reaped URB to its transfer.
    fn urb_done(&mut self, u: &Urb) {
        let b = u.block.read();
        let actual = (b.urb.actual_length.max(0) as usize).min(u.len);
        self.in_flight = self.in_flight.saturating_sub(u.len);
        self.stats.bytes += actual as u64;
        let ep = u.ep;
        let Some(q) = self.eps.get_mut(&ep) else {
            return;
        };
        let Some(p) = q.iter_mut().find(|p| p.id == u.id) else {
            // Cancelled meanwhile: nothing to report.
            return;
        };
        p.urbs_out = p.urbs_out.saturating_sub(1);
        if p.result.is_none() {
            let status = if p.urb_type == urb_type::ISO {
                let n = p.iso.len().min(MAX_ISO_PACKETS);
                let mut total = 0;
                let mut pos = 0usize;
                for (i, pk) in p.iso.iter_mut().enumerate().take(n) {
                    let d = b.iso[i];
                    let got = (d.actual_length as usize).min(pk.length);
                    pk.actual = got;
                    pk.status = map_status(d.status as i32, p.dir_in, got, pk.length);
                    if let (Some((ptr, blen)), Some(x)) = (u.bounce, p.xfer.as_ref()) {
                        if p.dir_in && pos + got <= blen {
                            // SAFETY: `ptr..ptr+blen` is the live Vec
                            // owned by `u._buf`.
                            let s = unsafe { std::slice::from_raw_parts(ptr as *const u8, blen) };
                            let _ = x.write_data(pk.offset, &s[pos..pos + got]);
                        }
                    }
                    pos += pk.length;
                    total += got;
                }
                p.actual = total;
                match map_status(b.urb.status, false, 0, 0) {
                    s @ (TransferStatus::DeviceGone | TransferStatus::Cancelled) => s,
                    _ => TransferStatus::Success,
                }
            } else {
                if p.dir_in && actual > 0 {
                    if let (Some((ptr, blen)), Some(x)) = (u.bounce, p.xfer.as_ref()) {
                        let skip = if u.control { 8 } else { 0 };
                        let end = (skip + actual).min(blen);
                        // SAFETY: `ptr..ptr+blen` is the live Vec owned by
                        // `u._buf`.
                        let s = unsafe { std::slice::from_raw_parts(ptr as *const u8, blen) };
                        let _ = x.write_data(u.off, &s[skip.min(end)..end]);
                    }
                }
                p.actual += actual;
                map_status(b.urb.status, p.dir_in, actual, u.len)
            };
            let done = p.next_off >= p.len && p.urbs_out == 0;
            match status {
                TransferStatus::Success if p.urb_type != urb_type::ISO && !done => {}
                TransferStatus::Success if p.urb_type == urb_type::ISO => {
                    p.result = Some(TransferStatus::Success)
                }
                TransferStatus::Success => p.result = Some(TransferStatus::Success),
                TransferStatus::ShortPacket if p.urb_type == urb_type::CONTROL => {
                    p.result = Some(TransferStatus::ShortPacket)
                }
                s => p.result = Some(s),
            }
            if p.result.is_some() && p.urbs_out > 0 {
                // Later pieces of an OUT transfer that failed early.
                let fd = self.open.as_ref().map(|o| o.fd.clone());
                for x in self.urbs.values().filter(|x| x.id == u.id) {
                    if let Some(fd) = &fd {
                        let _ = fd.discard(x.block.ptr() as usize);
                    }
                }
            }
        }
        if u.zero_copy_in {
            debug!(target: "passthrough::urb", "zero-copy IN URB done: {actual} bytes");
        }
        self.retire(ep);
        self.pump(ep);
    }

    /// Completes finished transfers from the head of `ep`'s queue.
    fn retire(&mut self, ep: u32) {
        let Some(q) = self.eps.get_mut(&ep) else {
            return;
        };
        while q
            .front()
            .is_some_and(|p| p.result.is_some() && p.urbs_out == 0)
        {
            let Some(mut p) = q.pop_front() else {
                break;
            };
            let Some(mut x) = p.xfer.take() else {
                continue;
            };
            let status = p.result.unwrap_or(TransferStatus::TransactionError);
            if let Some(r) = p.reply.take() {
                let n = x.write_data(0, &r).unwrap_or(0);
                p.actual = n;
            }
            if p.urb_type == urb_type::ISO {
                for (dst, src) in x.iso_packets_mut().iter_mut().zip(p.iso.iter()) {
                    *dst = *src;
                }
            }
            let status = if status == TransferStatus::Success && p.dir_in && p.actual < x.len() {
                TransferStatus::ShortPacket
            } else {
                status
            };
            x.complete(status, p.actual);
        }
    }

    /// Submits URBs for `ep`'s transfers, in order, while there is room.
    fn pump(&mut self, ep: u32) {
        let Some(fd) = self.open.as_ref().map(|o| o.fd.clone()) else {
            return;
        };
        let mut gone = false;
        let n = self.eps.get(&ep).map_or(0, VecDeque::len);
        'transfers: for i in 0..n {
            loop {
                let Some(p) = self.eps.get(&ep).and_then(|q| q.get(i)) else {
                    break 'transfers;
                };
                if p.result.is_some() {
                    continue 'transfers;
                }
                if p.started && p.next_off >= p.len {
                    continue 'transfers;
                }
                if p.dir_in && p.urbs_out > 0 {
                    // Split IN transfer: the next piece waits for this one.
                    break 'transfers;
                }
                let chunk = (p.len - p.next_off).min(MAX_URB_LEN);
                if self.in_flight > 0 && self.in_flight + chunk > BYTES_IN_FLIGHT {
                    break 'transfers;
                }
                match self.submit_piece(&fd, ep, i, chunk) {
                    Ok(()) => {}
                    Err(e) => {
                        let code = e.raw_os_error().unwrap_or(0);
                        if matches!(code, libc::ENODEV | libc::ESHUTDOWN) {
                            gone = true;
                            break 'transfers;
                        }
                        if matches!(code, libc::ENOMEM | libc::EAGAIN) && self.in_flight > 0 {
                            // usbfs memory budget: retry on a completion.
                            break 'transfers;
                        }
                        guest_warn!(target: "passthrough", "endpoint {ep:#04x}: URB refused: {e}");
                        if let Some(p) = self.eps.get_mut(&ep).and_then(|q| q.get_mut(i)) {
                            p.result = Some(if code == libc::EPIPE {
                                TransferStatus::Stall
                            } else {
                                TransferStatus::TransactionError
                            });
                        }
                        continue 'transfers;
                    }
                }
            }
        }
        if gone {
            // Left for the worker, which sees POLLHUP and cleans up.
            return;
        }
        self.retire(ep);
    }

    /// Builds and submits the next URB of transfer `i` on `ep`.
    fn submit_piece(&mut self, fd: &Usbfs, ep: u32, i: usize, chunk: usize) -> io::Result<()> {
        let token = self.token();
        let Some(p) = self.eps.get_mut(&ep).and_then(|q| q.get_mut(i)) else {
            return Ok(());
        };
        let off = p.next_off;
        let mut b = UrbBlock::default();
        b.urb.urb_type = p.urb_type;
        b.urb.endpoint = p.ep;
        b.urb.usercontext = token as usize;
        let x = p.xfer.as_ref();
        let mut zero_copy_in = false;
        let mut bounce = None;
        let mut control = false;
        let buf = match p.urb_type {
            urb_type::CONTROL => {
                control = true;
                let Some(TransferKind::Control(mut sp)) = x.map(Transfer::kind) else {
                    return Ok(());
                };
                if !p.dir_in {
                    // `p.len <= wLength` (`control_data_fits`): a shorter
                    // OUT data stage sends what the host gave.
                    sp.length = sp.length.min(u16::try_from(p.len).unwrap_or(u16::MAX));
                }
                let mut v = vec![0u8; 8 + sp.length as usize];
                v[..8].copy_from_slice(&sp.to_bytes());
                if !p.dir_in {
                    if let Some(x) = x {
                        x.read_data(0, &mut v[8..])
                            .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
                    }
                }
                bounce = Some((v.as_ptr() as usize, v.len()));
                UrbBuf::Owned(v)
            }
            _ => match &p.zero_copy {
                Some(r) => {
                    zero_copy_in = p.dir_in;
                    UrbBuf::Guest(r.clone())
                }
                None => {
                    let mut v = vec![0u8; chunk];
                    if !p.dir_in && chunk > 0 {
                        if let Some(x) = x {
                            x.read_data(off, &mut v)
                                .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
                        }
                    }
                    bounce = Some((v.as_ptr() as usize, v.len()));
                    UrbBuf::Owned(v)
                }
            },
        };
        let (addr, len) = match &buf {
            UrbBuf::Owned(v) => (v.as_ptr() as usize, v.len()),
            // In range: `off + chunk <= p.len == r.len()`.
            UrbBuf::Guest(r) => (r.as_ptr() as usize + off, chunk),
        };
        b.urb.buffer = addr;
        b.urb.buffer_length = len as i32;
        if p.urb_type == urb_type::ISO {
            b.urb.flags = urb_flag::ISO_ASAP;
            b.urb.number_of_packets = p.iso.len() as i32;
            for (d, pk) in b.iso.iter_mut().zip(p.iso.iter()) {
                d.length = pk.length as u32;
            }
        }
        if p.urb_type == urb_type::BULK {
            // `number_of_packets` shares its place with `stream_id`.
            b.urb.number_of_packets = i32::from(p.stream);
            if off > 0 {
                b.urb.flags |= urb_flag::BULK_CONTINUATION;
            }
            if p.dir_in && off + chunk < p.len {
                b.urb.flags |= urb_flag::SHORT_NOT_OK;
            }
        }
        let block = OwnedBlock::new(b);
        let zero_copy = matches!(buf, UrbBuf::Guest(_));
        // SAFETY: the block and the buffer (our Vec, or guest RAM held
        // mapped by the HostRange) move into `urbs` and live until the URB
        // is reaped or the node is closed (`Inner` field order); on error
        // the kernel did not take the URB and both are simply dropped.
        if let Err(e) = unsafe { fd.submit(block.ptr()) } {
            if zero_copy && e.raw_os_error() == Some(libc::EFAULT) {
                // Guest RAM the host kernel cannot pin: this piece and
                // everything after it go through our own buffers.
                self.zero_copy_off = true;
                if let Some(p) = self.eps.get_mut(&ep).and_then(|q| q.get_mut(i)) {
                    p.zero_copy = None;
                }
                return self.submit_piece(fd, ep, i, chunk);
            }
            return Err(e);
        }
        p.next_off = off + chunk;
        p.started = true;
        p.urbs_out += 1;
        let urb_len = if control { len - 8 } else { len };
        self.urbs.insert(
            token,
            Urb {
                block,
                _buf: buf,
                id: p.id,
                ep,
                off,
                len: urb_len,
                zero_copy_in,
                bounce,
                control,
            },
        );
        self.in_flight += urb_len;
        self.stats.urbs += 1;
        if zero_copy {
            self.stats.zero_copy_urbs += 1;
        }
        Ok(())
    }

    /// Discards the URBs of `id` (every URB if `None`) and waits, bounded,
    /// until those with guest-RAM IN buffers (or all, with `all`) are back.
    fn discard_and_wait(&mut self, id: Option<TransferId>, all: bool) {
        let Some(fd) = self.open.as_ref().map(|o| o.fd.clone()) else {
            return;
        };
        for u in self.urbs.values() {
            if id.is_none_or(|i| u.id == i) {
                let _ = fd.discard(u.block.ptr() as usize);
            }
        }
        let deadline = Instant::now() + DISCARD_WAIT;
        let waiting = |s: &Self| {
            s.urbs
                .values()
                .any(|u| id.is_none_or(|i| u.id == i) && (all || u.zero_copy_in))
        };
        while waiting(self) {
            if self.reap_all() {
                return;
            }
            if !waiting(self) {
                break;
            }
            if Instant::now() > deadline {
                // Reaping such a URB later would copy its IN data into
                // guest memory the guest was told is free again. Drop the
                // node instead: nothing reaps from now on, closing it makes
                // the kernel kill and free every URB, and the device shows
                // up again as a fresh connection (the worker re-opens it).
                guest_warn!(
                    target: "passthrough",
                    "discarded URBs did not come back in {DISCARD_WAIT:?}: closing the device node"
                );
                self.gone();
                return;
            }
            let _ = usbfs::poll(&[(fd.raw_fd(), libc::POLLOUT)], 5);
        }
    }

    /// Drops every transfer (after discarding their URBs): they complete as
    /// cancelled unless the controller already cancelled them.
    fn cancel_all(&mut self) {
        self.discard_and_wait(None, true);
        let eps = std::mem::take(&mut self.eps);
        for (_, q) in eps {
            for mut p in q {
                if let Some(x) = p.xfer.take() {
                    x.complete(TransferStatus::Cancelled, 0);
                }
            }
        }
    }

    /// The device went away: every transfer fails, the node is closed.
    fn gone(&mut self) {
        // Counted once per open node: a device is open exactly when it was
        // opened more often than it went away (the control socket's events
        // rely on that).
        if let Some(open) = self.open.take() {
            guest_info!(target: "passthrough", "{}: device gone", open.info.port);
            self.stats.disconnects += 1;
        }
        // The node is closed (or no longer reaped): URB memory is ours.
        self.urbs.clear();
        self.in_flight = 0;
        self.streams.clear();
        let eps = std::mem::take(&mut self.eps);
        for (_, q) in eps {
            for mut p in q {
                if let Some(x) = p.xfer.take() {
                    x.complete(TransferStatus::DeviceGone, 0);
                }
            }
        }
    }

    /// A control request answered without the device.
    fn local(&mut self, x: Transfer, status: TransferStatus, reply: Option<Vec<u8>>) {
        let id = x.id();
        let q = self.eps.entry(0).or_default();
        q.push_back(Pending {
            id,
            len: x.len(),
            xfer: Some(x),
            urb_type: urb_type::CONTROL,
            ep: 0,
            stream: 0,
            dir_in: true,
            zero_copy: None,
            next_off: 0,
            started: true,
            urbs_out: 0,
            actual: 0,
            result: Some(status),
            reply,
            iso: Vec::new(),
        });
        self.retire(0);
    }

    fn control(&mut self, x: Transfer, sp: SetupPacket) {
        let Some(open) = self.open.as_mut() else {
            return x.complete(TransferStatus::DeviceGone, 0);
        };
        let ok = |r: io::Result<()>, what: &str| match r {
            Ok(()) => TransferStatus::Success,
            Err(e) => {
                debug!(target: "passthrough", "{what}: {e}");
                if e.raw_os_error() == Some(libc::ENODEV) {
                    TransferStatus::DeviceGone
                } else {
                    TransferStatus::Stall
                }
            }
        };
        match route_control(&sp, open.compat.is_some()) {
            ControlRoute::SetAddress => self.local(x, TransferStatus::Success, None),
            ControlRoute::SetConfiguration(v) => {
                // Releasing the interfaces frees their streams.
                release_interfaces(open, false);
                open.claimed.clear();
                self.streams.clear();
                let r = open.fd.set_configuration(i32::from(v));
                let st = ok(r, "SET_CONFIGURATION");
                if st == TransferStatus::Success {
                    open.config = v;
                }
                open.claimed =
                    claim_interfaces(&open.fd, &open.descs, open.config, &open.info.port);
                self.local(x, st, None)
            }
            ControlRoute::SetInterface(i, a) => {
                let st = ok(
                    open.fd.set_interface(u32::from(i), u32::from(a)),
                    "SET_INTERFACE",
                );
                self.local(x, st, None)
            }
            ControlRoute::ClearHalt(ep) => {
                let st = ok(open.fd.clear_halt(ep), "CLEAR_FEATURE(ENDPOINT_HALT)");
                self.local(x, st, None)
            }
            ControlRoute::LocalDescriptor(t, i) => {
                let reply = open
                    .compat
                    .as_ref()
                    .and_then(|c| c.answer(t, i))
                    .map(|d| d[..d.len().min(sp.length as usize)].to_vec());
                match reply {
                    Some(r) => self.local(x, TransferStatus::Success, Some(r)),
                    None => self.local(x, TransferStatus::Stall, None),
                }
            }
            ControlRoute::Forward => self.enqueue(x, urb_type::CONTROL, 0),
        }
    }

    fn enqueue(&mut self, x: Transfer, ty: u8, ep: u8) {
        let dir_in = match x.kind() {
            TransferKind::Control(sp) => sp.direction() == Direction::In,
            _ => x.direction() == Direction::In,
        };
        let len = x.len();
        let single = ty != urb_type::BULK;
        let iso: Vec<IsoPacket> = if ty == urb_type::ISO {
            let pk = x.iso_packets();
            if pk.is_empty() {
                vec![IsoPacket {
                    offset: 0,
                    length: len,
                    actual: 0,
                    status: TransferStatus::Success,
                }]
            } else {
                pk.to_vec()
            }
        } else {
            Vec::new()
        };
        let packed = iso
            .iter()
            .scan(0usize, |pos, p| {
                let ok = p.offset == *pos;
                *pos += p.length;
                Some(ok)
            })
            .all(|b| b);
        let too_big = (single && len > MAX_URB_LEN) || iso.len() > MAX_ISO_PACKETS;
        let zero_copy =
            if ty == urb_type::CONTROL || (ty == urb_type::ISO && !packed) || self.zero_copy_off {
                None
            } else {
                x.host_buffer()
            };
        let id = x.id();
        let stream = if ty == urb_type::BULK {
            x.stream_id()
        } else {
            0
        };
        let key = pipe(ep, stream);
        let q = self.eps.entry(key).or_default();
        q.push_back(Pending {
            id,
            xfer: Some(x),
            urb_type: ty,
            ep,
            stream,
            dir_in,
            len,
            zero_copy,
            next_off: 0,
            started: false,
            urbs_out: 0,
            actual: 0,
            result: if too_big {
                Some(TransferStatus::TransactionError)
            } else {
                None
            },
            reply: None,
            iso,
        });
        self.pump(key);
    }
}

/// Whether a control transfer's data stage fits its SETUP packet: never
/// longer than wLength (so never more than 65,535 bytes). A longer one
/// is refused (stall), never cut to fit: `as u16` once turned a 65,536-byte
/// OUT stage into wLength 0.
pub fn control_data_fits(sp: &SetupPacket, len: usize) -> bool {
    len <= usize::from(sp.length)
}

/// The queue a transfer waits in: its endpoint address, and for bulk
/// streams its stream ID. Transfers on different streams of one endpoint
/// are independent (the device picks which stream it serves next, UAS
/// answers commands in any order), so each stream keeps its own order and
/// none waits behind another.
fn pipe(ep: u8, stream: u16) -> u32 {
    u32::from(ep) | (u32::from(stream) << 8)
}

impl HostDevice {
    /// The node was closed under the controller (URBs that would not come
    /// back): the port shows a disconnect until the worker re-opens it.
    fn node_dropped(&self) {
        if self.shared.connected.swap(false, Ordering::SeqCst) {
            self.shared.wake_controller();
        }
    }
}

impl UsbDevice for HostDevice {
    fn name(&self) -> String {
        format!("host {}", self.shared.rule)
    }

    fn speed(&self) -> Speed {
        speed_from_code(self.shared.speed.load(Ordering::SeqCst))
    }

    fn reset(&mut self) {
        let mut g = lock(&self.shared.inner);
        g.cancel_all();
        if g.open.is_none() {
            drop(g);
            return self.node_dropped();
        }
        let used = std::mem::take(&mut g.used);
        if !used {
            return;
        }
        let mut gone = false;
        // The reset (and releasing the interfaces) frees host streams.
        g.streams.clear();
        if let Some(open) = g.open.as_mut() {
            release_interfaces(open, false);
            open.claimed.clear();
            match open.fd.reset() {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => gone = true,
                Err(e) => guest_warn!(target: "passthrough", "{}: reset: {e}", open.info.port),
            }
            if !gone {
                open.claimed =
                    claim_interfaces(&open.fd, &open.descs, open.config, &open.info.port);
            }
        }
        g.stats.resets += 1;
        if gone {
            g.gone();
            drop(g);
            self.shared.connected.store(false, Ordering::SeqCst);
            self.shared.wake_controller();
        }
    }

    fn is_interrupt_endpoint(&self, address: u8) -> bool {
        let g = lock(&self.shared.inner);
        g.open.as_ref().is_some_and(|o| {
            o.descs
                .endpoints()
                .iter()
                .any(|e| e.address == address && e.ep_type == 3)
        })
    }

    fn submit(&mut self, xfer: Transfer) {
        if let TransferKind::Control(sp) = xfer.kind() {
            if !control_data_fits(&sp, xfer.len()) {
                guest_warn!(
                    target: "passthrough",
                    "control transfer with a {}-byte data stage for wLength {}: stalled",
                    xfer.len(),
                    sp.length
                );
                return xfer.complete(TransferStatus::Stall, 0);
            }
        }
        let mut g = lock(&self.shared.inner);
        if g.open.is_none() {
            drop(g);
            return xfer.complete(TransferStatus::DeviceGone, 0);
        }
        g.used = true;
        let epn = xfer.endpoint() & 0x0f;
        let in_bit = if xfer.direction() == Direction::In {
            0x80
        } else {
            0
        };
        match xfer.kind() {
            TransferKind::Control(sp) if epn == 0 => g.control(xfer, sp),
            TransferKind::Control(_) => xfer.complete(TransferStatus::Stall, 0),
            TransferKind::Bulk => g.enqueue(xfer, urb_type::BULK, epn | in_bit),
            TransferKind::Interrupt => g.enqueue(xfer, urb_type::INTERRUPT, epn | in_bit),
            TransferKind::Isochronous => g.enqueue(xfer, urb_type::ISO, epn | in_bit),
        }
    }

    fn cancel(&mut self, id: TransferId) {
        let mut g = lock(&self.shared.inner);
        let Some(ep) = g
            .eps
            .iter()
            .find(|(_, q)| q.iter().any(|p| p.id == id))
            .map(|(e, _)| *e)
        else {
            return;
        };
        g.discard_and_wait(Some(id), false);
        if g.open.is_none() {
            // The URBs did not come back: the node was dropped, every
            // transfer (this one too) completed.
            drop(g);
            return self.node_dropped();
        }
        if let Some(q) = g.eps.get_mut(&ep) {
            if let Some(i) = q.iter().position(|p| p.id == id) {
                if let Some(mut p) = q.remove(i) {
                    if let Some(x) = p.xfer.take() {
                        x.complete(TransferStatus::Cancelled, 0);
                    }
                }
            }
        }
        g.retire(ep);
        g.pump(ep);
    }

    fn alloc_streams(&mut self, endpoint: u8, streams: u16) -> bool {
        let mut g = lock(&self.shared.inner);
        let Some(fd) = g.open.as_ref().map(|o| o.fd.clone()) else {
            return false;
        };
        if g.streams.remove(&endpoint).is_some() {
            let _ = fd.free_streams(endpoint);
        }
        match fd.alloc_streams(endpoint, u32::from(streams)) {
            Ok(n) => {
                if n < u32::from(streams) {
                    // The guest may use IDs past `n`: those URBs fail.
                    guest_info!(target: "passthrough", "endpoint {endpoint:#04x}: host granted {n} of {streams} streams");
                }
                g.streams.insert(endpoint, n);
                true
            }
            Err(e) => {
                guest_warn!(target: "passthrough", "endpoint {endpoint:#04x}: cannot allocate {streams} streams: {e}");
                false
            }
        }
    }

    fn free_streams(&mut self, endpoint: u8) {
        let mut g = lock(&self.shared.inner);
        if g.streams.remove(&endpoint).is_none() {
            return;
        }
        if let Some(open) = g.open.as_ref() {
            if let Err(e) = open.fd.free_streams(endpoint) {
                debug!(target: "passthrough", "endpoint {endpoint:#04x}: free streams: {e}");
            }
        }
    }

    fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    fn set_wakeup(&mut self, wakeup: Wakeup) {
        *lock(&self.shared.wakeup) = Some(wakeup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(rt: u8, req: u8, value: u16, index: u16) -> SetupPacket {
        SetupPacket {
            request_type: rt,
            request: req,
            value,
            index,
            length: 0,
        }
    }

    #[test]
    fn requests_the_host_kernel_must_see_are_routed_to_it() {
        assert_eq!(
            route_control(&sp(0, 5, 7, 0), false),
            ControlRoute::SetAddress
        );
        assert_eq!(
            route_control(&sp(0, 9, 1, 0), false),
            ControlRoute::SetConfiguration(1)
        );
        assert_eq!(
            route_control(&sp(1, 11, 2, 1), false),
            ControlRoute::SetInterface(1, 2)
        );
        assert_eq!(
            route_control(&sp(2, 1, 0, 0x81), false),
            ControlRoute::ClearHalt(0x81)
        );
        // CLEAR_FEATURE of something else, class requests: forwarded.
        assert_eq!(
            route_control(&sp(2, 1, 1, 0x81), false),
            ControlRoute::Forward
        );
        assert_eq!(
            route_control(&sp(0x21, 9, 0x200, 0), false),
            ControlRoute::Forward
        );
        // Descriptors only from our copy when rewritten.
        assert_eq!(
            route_control(&sp(0x80, 6, 0x100, 0), false),
            ControlRoute::Forward
        );
        assert_eq!(
            route_control(&sp(0x80, 6, 0x200, 0), true),
            ControlRoute::LocalDescriptor(2, 0)
        );
        assert_eq!(
            route_control(&sp(0x80, 6, 0x300, 0), true),
            ControlRoute::Forward
        );
    }

    #[test]
    fn urb_status_maps_to_transfer_status() {
        use TransferStatus::*;
        assert_eq!(map_status(0, true, 10, 10), Success);
        assert_eq!(map_status(0, true, 3, 10), ShortPacket);
        assert_eq!(map_status(0, false, 3, 10), Success);
        assert_eq!(map_status(-libc::EREMOTEIO, true, 3, 10), ShortPacket);
        assert_eq!(map_status(-libc::EPIPE, true, 0, 10), Stall);
        assert_eq!(map_status(-libc::EOVERFLOW, true, 0, 10), Babble);
        assert_eq!(map_status(-libc::ENODEV, true, 0, 10), DeviceGone);
        assert_eq!(map_status(-libc::ESHUTDOWN, true, 0, 10), DeviceGone);
        assert_eq!(map_status(-libc::ENOENT, true, 0, 10), Cancelled);
        assert_eq!(map_status(-libc::EPROTO, true, 0, 10), TransactionError);
        assert_eq!(map_status(-libc::ETIMEDOUT, true, 0, 10), TransactionError);
    }

    /// A device whose rule matches nothing (empty sysfs and devfs).
    fn absent_device() -> (tempfile::TempDir, HostDevice) {
        let t = tempfile::tempdir().unwrap();
        let opts = HostOptions {
            speed: None,
            sysfs: t.path().to_path_buf(),
            devfs: t.path().to_path_buf(),
        };
        let rule = MatchRule::Id {
            vendor: 0x1234,
            product: 0x5678,
            serial: None,
        };
        let d = HostDevice::new(rule, opts).unwrap();
        (t, d)
    }

    /// A 512-byte bulk IN transfer on endpoint 1 into fresh guest RAM.
    fn bulk_in_512(
        id: TransferId,
        q: &hcd_emul::usb::CompletionQueue,
    ) -> (Transfer, hcd_emul::usb::TransferHandle) {
        Transfer::new(
            id,
            1,
            Direction::In,
            TransferKind::Bulk,
            vec![hcd_emul::usb::Segment::Guest {
                addr: 0x1000,
                len: 512,
            }],
            hcd_emul::GuestRam::anonymous(0x10000),
            vec![],
            q.clone(),
        )
    }

    #[test]
    fn absent_device_is_disconnected_and_fails_transfers() {
        use hcd_emul::usb::CompletionQueue;
        let (_t, mut d) = absent_device();
        assert!(!d.connected());
        assert_eq!(d.speed(), Speed::High, "USB 2 port while absent");
        let q = CompletionQueue::new();
        let (x, _h) = bulk_in_512(TransferId(9), &q);
        d.submit(x);
        let r = q.drain();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, TransferStatus::DeviceGone);
        d.reset();
        d.cancel(TransferId(9));
        drop(d);
    }

    #[test]
    fn control_out_longer_than_wlength_or_64k_is_stalled_not_truncated() {
        use hcd_emul::usb::CompletionQueue;
        let (_t, mut d) = absent_device();
        let q = CompletionQueue::new();
        let ram = hcd_emul::GuestRam::anonymous(0x40000);
        let mut submit = |id: u64, dir: Direction, length: u16, len: usize| {
            let setup = SetupPacket {
                request_type: if dir == Direction::In { 0xc0 } else { 0x40 },
                request: 1,
                value: 0,
                index: 0,
                length,
            };
            let (x, _h) = Transfer::new(
                TransferId(id),
                0,
                dir,
                TransferKind::Control(setup),
                vec![hcd_emul::usb::Segment::Guest { addr: 0, len }],
                ram.clone(),
                vec![],
                q.clone(),
            );
            d.submit(x);
            let r = q.drain();
            assert_eq!(r.len(), 1);
            r[0].status
        };
        // 65,536 bytes: `as u16` made that wLength 0.
        assert_eq!(submit(1, Direction::Out, 0, 65536), TransferStatus::Stall);
        assert_eq!(
            submit(2, Direction::Out, 0xffff, 65536),
            TransferStatus::Stall
        );
        assert_eq!(submit(3, Direction::Out, 64, 100), TransferStatus::Stall);
        assert_eq!(submit(4, Direction::In, 64, 100), TransferStatus::Stall);
        // Fitting ones go on to the device (absent here).
        assert_eq!(
            submit(5, Direction::Out, 64, 64),
            TransferStatus::DeviceGone
        );
        assert_eq!(
            submit(6, Direction::In, 0xffff, 0xffff),
            TransferStatus::DeviceGone
        );
        assert!(control_data_fits(&sp(0x40, 1, 0, 0), 0));
    }

    /// An `Inner` whose device node is a plain file: every usbfs ioctl
    /// fails (ENOTTY), so a URB put in `urbs` never comes back.
    fn inner_with_dead_node(dir: &std::path::Path) -> Inner {
        let node = dir.join("bus/usb/001");
        std::fs::create_dir_all(&node).unwrap();
        std::fs::write(node.join("002"), b"").unwrap();
        let fd = Usbfs::open(dir, 1, 2).unwrap();
        let dev = vec![
            18, 1, 0, 2, 0, 0, 0, 64, 0x34, 0x12, 0x78, 0x56, 0, 1, 0, 0, 0, 0,
        ];
        Inner {
            open: Some(Open {
                fd: Arc::new(fd),
                info: HostDeviceInfo {
                    bus: 1,
                    addr: 2,
                    port: "1-1".into(),
                    vendor: 0x1234,
                    product: 0x5678,
                    serial: None,
                    speed: Some(Speed::High),
                },
                descs: HostDescriptors::parse(&dev).unwrap(),
                compat: None,
                config: 1,
                claimed: Vec::new(),
            }),
            urbs: HashMap::new(),
            eps: BTreeMap::new(),
            streams: BTreeMap::new(),
            next_token: 1,
            in_flight: 0,
            used: true,
            stats: PassthroughStats::default(),
            refused: None,
            settling: None,
            zero_copy_off: false,
        }
    }

    /// `discard_and_wait` gave up after a second and left the zero-copy
    /// IN URB in the kernel: a later reap would have copied data into
    /// guest memory the guest had been told was cancelled.
    #[test]
    fn unreaped_zero_copy_urb_cannot_outlive_its_cancel() {
        use hcd_emul::usb::CompletionQueue;
        let dir = tempfile::tempdir().unwrap();
        let mut g = inner_with_dead_node(dir.path());
        let q = CompletionQueue::new();
        let (x, _h) = bulk_in_512(TransferId(7), &q);
        let range = x.host_buffer().expect("one contiguous guest range");
        g.eps.entry(pipe(0x81, 0)).or_default().push_back(Pending {
            id: TransferId(7),
            xfer: Some(x),
            urb_type: urb_type::BULK,
            ep: 0x81,
            stream: 0,
            dir_in: true,
            len: 512,
            zero_copy: Some(range.clone()),
            next_off: 512,
            started: true,
            urbs_out: 1,
            actual: 0,
            result: None,
            reply: None,
            iso: Vec::new(),
        });
        // As if submitted: a zero-copy IN URB the kernel never returns.
        g.urbs.insert(
            1,
            Urb {
                block: OwnedBlock::new(UrbBlock::default()),
                _buf: UrbBuf::Guest(range),
                id: TransferId(7),
                ep: pipe(0x81, 0),
                off: 0,
                len: 512,
                zero_copy_in: true,
                bounce: None,
                control: false,
            },
        );
        let t0 = Instant::now();
        g.discard_and_wait(Some(TransferId(7)), false);
        assert!(t0.elapsed() < DISCARD_WAIT * 3);
        assert!(g.open.is_none(), "the node is dropped: nothing can reap it");
        assert!(g.urbs.is_empty());
        assert!(!g.reap_all(), "no node, no reap");
        let r = q.drain();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].status, TransferStatus::DeviceGone);
    }

    /// Catalogue row "a device that never answers": a port reset (or
    /// HCRST, unplug) cancels everything; URBs the device never completes
    /// cost at most DISCARD_WAIT, then the node is dropped.
    #[test]
    fn device_that_never_answers_cannot_stall_a_reset() {
        use hcd_emul::usb::CompletionQueue;
        let dir = tempfile::tempdir().unwrap();
        let mut g = inner_with_dead_node(dir.path());
        let q = CompletionQueue::new();
        let ram = hcd_emul::GuestRam::anonymous(0x10000);
        for id in 1..=3u64 {
            let (x, _h) = Transfer::new(
                TransferId(id),
                2,
                Direction::Out,
                TransferKind::Bulk,
                vec![hcd_emul::usb::Segment::Guest {
                    addr: 0x1000,
                    len: 512,
                }],
                ram.clone(),
                vec![],
                q.clone(),
            );
            g.eps.entry(pipe(0x02, 0)).or_default().push_back(Pending {
                id: TransferId(id),
                xfer: Some(x),
                urb_type: urb_type::BULK,
                ep: 0x02,
                stream: 0,
                dir_in: false,
                len: 512,
                zero_copy: None,
                next_off: 512,
                started: true,
                urbs_out: 1,
                actual: 0,
                result: None,
                reply: None,
                iso: Vec::new(),
            });
            let buf = vec![0u8; 512];
            g.urbs.insert(
                id,
                Urb {
                    block: OwnedBlock::new(UrbBlock::default()),
                    bounce: Some((buf.as_ptr() as usize, 512)),
                    _buf: UrbBuf::Owned(buf),
                    id: TransferId(id),
                    ep: pipe(0x02, 0),
                    off: 0,
                    len: 512,
                    zero_copy_in: false,
                    control: false,
                },
            );
        }
        let t0 = Instant::now();
        g.cancel_all();
        assert!(t0.elapsed() < DISCARD_WAIT * 3, "{:?}", t0.elapsed());
        assert!(g.open.is_none() && g.urbs.is_empty() && g.eps.is_empty());
        let r = q.drain();
        assert_eq!(r.len(), 3, "every transfer completed: {r:?}");
    }

    #[test]
    fn streams_of_one_endpoint_queue_apart() {
        assert_eq!(pipe(0x81, 0), 0x81);
        assert_ne!(pipe(0x81, 1), pipe(0x81, 2));
        assert_ne!(pipe(0x81, 1), pipe(0x01, 1));
        assert_eq!(pipe(0x82, 0xffff), 0x00ff_ff82);
    }

    #[test]
    fn absent_device_refuses_streams_and_fails_stream_transfers() {
        use hcd_emul::usb::CompletionQueue;
        let (_t, mut d) = absent_device();
        assert!(!d.alloc_streams(0x81, 31));
        d.free_streams(0x81);
        let q = CompletionQueue::new();
        let ram = hcd_emul::GuestRam::anonymous(0x10000);
        let (mut x, _h) = Transfer::new(
            TransferId(3),
            1,
            Direction::In,
            TransferKind::Bulk,
            vec![hcd_emul::usb::Segment::Guest {
                addr: 0x1000,
                len: 512,
            }],
            ram,
            vec![],
            q.clone(),
        );
        x.set_stream_id(5);
        d.submit(x);
        let r = q.drain();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, TransferStatus::DeviceGone);
    }

    #[test]
    fn device_present_in_sysfs_but_not_openable_is_refused_not_fatal() {
        let t = tempfile::tempdir().unwrap();
        crate::rule::tests::fake_device(t.path(), "3-1", 3, 4, (0x1234, 0x5678), None);
        let opts = HostOptions {
            speed: None,
            sysfs: t.path().to_path_buf(),
            devfs: t.path().join("dev"),
        };
        let d = HostDevice::new(MatchRule::Port("3-1".into()), opts).unwrap();
        assert!(!d.connected());
        assert_eq!(d.speed(), Speed::Super, "port kind from the device found");
        assert_eq!(d.monitor().stats().attaches, 0);
    }

    /// A fake device 3-1 (bus 3, address 4) whose usbfs node is a plain
    /// file holding a device and a one-interface configuration descriptor.
    fn fake_unconfigured(t: &std::path::Path) -> HostOptions {
        crate::rule::tests::fake_device(t, "3-1", 3, 4, (0x1234, 0x5678), None);
        let node = t.join("dev/bus/usb/003");
        std::fs::create_dir_all(&node).unwrap();
        let mut d = vec![
            18, 1, 0, 2, 0, 0, 0, 64, 0x34, 0x12, 0x78, 0x56, 0, 1, 0, 0, 0, 1,
        ];
        d.extend_from_slice(&[9, 2, 18, 0, 1, 1, 0, 0x80, 50]);
        d.extend_from_slice(&[9, 4, 0, 0, 0, 8, 6, 0x50, 0]);
        std::fs::write(node.join("004"), d).unwrap();
        HostOptions {
            speed: None,
            sysfs: t.to_path_buf(),
            devfs: t.join("dev"),
        }
    }

    fn wait_connected(d: &HostDevice, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if d.connected() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// CI saw a replugged stick opened before the host kernel configured
    /// it: nothing was claimed and usb-storage bound on the host.
    #[test]
    fn device_is_opened_once_the_kernel_configured_it() {
        let t = tempfile::tempdir().unwrap();
        let opts = fake_unconfigured(t.path());
        let d = HostDevice::new(MatchRule::Port("3-1".into()), opts).unwrap();
        assert!(!d.connected(), "opened while unconfigured");
        std::thread::sleep(Duration::from_millis(500));
        assert!(!d.connected(), "opened while unconfigured");
        // Configured, but the interface is not in sysfs yet: still waiting.
        std::fs::write(t.path().join("3-1/bConfigurationValue"), "1\n").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(!d.connected(), "opened before its interfaces appeared");
        std::fs::create_dir_all(t.path().join("3-1:1.0")).unwrap();
        let after = wait_connected(&d, Duration::from_millis(800));
        assert!(after.is_some(), "not opened once configured");
        assert_eq!(d.monitor().stats().attaches, 1);
    }

    /// A device the kernel never configures is still passed through.
    #[test]
    fn device_left_unconfigured_is_opened_after_settling() {
        let t = tempfile::tempdir().unwrap();
        let opts = fake_unconfigured(t.path());
        let start = Instant::now();
        let d = HostDevice::new(MatchRule::Port("3-1".into()), opts).unwrap();
        let after = wait_connected(&d, SETTLE * 3);
        assert!(after.is_some(), "never opened");
        assert!(start.elapsed() >= SETTLE, "opened before {SETTLE:?}");
        assert_eq!(d.monitor().stats().attaches, 1);
    }

    #[test]
    fn bad_rule_is_an_error() {
        let e = HostDevice::new(MatchRule::Port("x".into()), HostOptions::default());
        assert!(matches!(e, Err(HostError::Rule(_))));
    }
}
