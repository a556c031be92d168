//! vfio-user server (vfio-user protocol 0.1, as spoken by QEMU's
//! `vfio-user-pci`), serving one PCI function.
//!
//! Why our own server instead of the `vfio_user` crate's: the crate's
//! `Server::run` panics on a malformed VERSION payload, sizes buffers from
//! the client's counts without bounds, ignores `message_size` for framing
//! (trailing bytes desynchronise the stream), and owns the thread so that
//! device completions cannot be processed between messages. Here one
//! thread waits (epoll) on the listening socket, the client socket and an
//! eventfd that devices signal on completion, and on the controller's next
//! timer deadline — no busy polling, and the controller needs no lock.
//!
//! Framing is strict: every message is read whole according to its
//! `message_size` (bounded by [`MAX_MESSAGE`]); a malformed message gets an
//! error reply, a broken stream closes the connection and resets the
//! device, and a second client is refused with a logged error.

pub mod dma;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod irq;
mod proto;
mod sigbus;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcd_emul::pci::{ExternalMsi, PciController, PciFunction};
use hcd_emul::GuestRam;
use hcd_emul::{guest_error, guest_info, guest_warn};
use tracing::debug;

use crate::evloop::{EventLoop, Wake};

use dma::DmaMap;
pub use irq::IrqFds;
use irq::VfioIrqTransport;
use proto::*;

/// Largest message accepted (header included): a region access of
/// [`MAX_DATA`] plus headers.
pub const MAX_MESSAGE: usize = MAX_DATA + 64;
/// Largest region read/write data (advertised as max_data_xfer_size).
pub const MAX_DATA: usize = 64 * 1024;
/// How long a client may take to send the rest of a started message.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_CLIENT: u64 = 2;

/// Errors that end the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Socket setup failed.
    #[error("{path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// epoll/eventfd failure.
    #[error("event loop: {0}")]
    Poll(std::io::Error),
}

/// Why a connection is dropped.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("client closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A vfio-user server for one PCI function.
pub struct Server<C: PciController> {
    listener: UnixListener,
    path: PathBuf,
    pci: PciFunction<C>,
    ram: GuestRam,
    dma: DmaMap,
    irqs: Arc<Mutex<IrqFds>>,
    /// Socket, client, device completions and the controller's deadline
    /// (interrupt moderation is in tens of microseconds: a timerfd, not
    /// epoll's millisecond timeout).
    lp: EventLoop,
    client: Option<UnixStream>,
    /// Messages handled (for statistics).
    pub messages: u64,
    /// Region accesses handled.
    pub region_accesses: u64,
}

impl<C: PciController> std::fmt::Debug for Server<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

impl<C: PciController> Server<C> {
    /// Binds `path` and wraps `make(ram, waker)`'s controller. `make` gets the
    /// guest memory handle DMA_MAP will fill and must arrange for device
    /// completions to call the waker.
    pub fn new(
        path: &Path,
        make: impl FnOnce(GuestRam, Box<dyn Fn() + Send + Sync>) -> C,
    ) -> Result<Self, ServerError> {
        let sock_err = |source| ServerError::Socket {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            return Err(sock_err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "socket path already exists",
            )));
        }
        let listener = UnixListener::bind(path).map_err(sock_err)?;
        listener.set_nonblocking(true).map_err(sock_err)?;
        let lp = EventLoop::new().map_err(ServerError::Poll)?;
        lp.add(listener.as_raw_fd(), TOKEN_LISTENER)
            .map_err(ServerError::Poll)?;
        let ram = GuestRam::empty();
        let controller = make(ram.clone(), lp.waker().map_err(ServerError::Poll)?);
        let irqs = Arc::new(Mutex::new(IrqFds::default()));
        let pci = PciFunction::new(controller, Box::new(VfioIrqTransport::new(irqs.clone())));
        Ok(Server {
            listener,
            path: path.to_owned(),
            pci,
            ram,
            dma: DmaMap::default(),
            irqs,
            lp,
            client: None,
            messages: 0,
            region_accesses: 0,
        })
    }

    /// The PCI function served.
    pub fn pci(&self) -> &PciFunction<C> {
        &self.pci
    }

    /// Serves until `stop()` returns true (checked after every wake-up) or
    /// the event loop fails.
    pub fn run(&mut self, stop: impl FnMut(&Self) -> bool) -> Result<(), ServerError> {
        self.run_with(stop, |_| false)
    }

    /// A callback that wakes [`Server::run_with`]'s loop from any thread
    /// (after posting it work).
    pub fn waker(&self) -> std::io::Result<Box<dyn Fn() + Send + Sync>> {
        self.lp.waker()
    }

    /// As [`Server::run`], calling `tick(pci)` after every wake-up (work
    /// posted from other threads: the control socket's commands); when it
    /// returns true, the controller then processes what changed.
    pub fn run_with(
        &mut self,
        mut stop: impl FnMut(&Self) -> bool,
        mut tick: impl FnMut(&mut PciFunction<C>) -> bool,
    ) -> Result<(), ServerError> {
        loop {
            if stop(self) {
                if self.client.is_some() {
                    // Process whatever the client still sent (its hang-up
                    // among it), then let it go: stats logged, device reset.
                    let _ = self.serve_pending();
                    if self.client.is_some() {
                        self.disconnect(&ConnError::Closed);
                    }
                }
                return Ok(());
            }
            let wakes = self
                .lp
                .wait(self.pci.next_deadline(), Duration::from_secs(1))
                .map_err(ServerError::Poll)?;
            self.handle(wakes);
            if tick(&mut self.pci) {
                self.pci.process();
            }
            if self
                .pci
                .next_deadline()
                .is_some_and(|t| t <= Instant::now())
            {
                self.pci.process();
            }
        }
    }

    /// Acts on what woke the loop: client traffic (including its hang-up)
    /// before new connections, so a client that reconnects is not refused
    /// as a second one.
    fn handle(&mut self, mut wakes: Vec<Wake>) {
        wakes.sort_by_key(|w| match *w {
            Wake::Fd(TOKEN_CLIENT) => 0,
            Wake::Completion | Wake::Deadline => 1,
            Wake::Fd(_) => 2,
        });
        for w in wakes {
            match w {
                Wake::Fd(TOKEN_LISTENER) => self.accept(),
                Wake::Completion | Wake::Deadline => self.pci.process(),
                Wake::Fd(_) => {
                    if let Err(e) = self.serve_one() {
                        self.disconnect(&e);
                    }
                }
            }
        }
        // A client that shrank its file under a mapping: the SIGBUS was
        // absorbed (zeros read); from now on that range is a DMA error.
        if self.dma.check_faults() {
            self.dma.publish(&self.ram);
        }
        self.dma.reap();
    }

    /// Serves what is already waiting (messages on the client socket).
    fn serve_pending(&mut self) -> Result<(), ServerError> {
        let wakes = self
            .lp
            .wait(self.pci.next_deadline(), Duration::ZERO)
            .map_err(ServerError::Poll)?;
        self.handle(wakes);
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.client.is_some() {
                        guest_error!(
                            "vfio-user: refusing a second client on {}: one client per device",
                            self.path.display()
                        );
                        drop(s);
                        continue;
                    }
                    guest_info!("vfio-user: client connected on {}", self.path.display());
                    if s.set_nonblocking(false).is_err()
                        || self.lp.add(s.as_raw_fd(), TOKEN_CLIENT).is_err()
                    {
                        guest_error!("vfio-user: cannot watch the client socket");
                        continue;
                    }
                    self.client = Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    guest_warn!("vfio-user: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// The client is gone (or broke the protocol): the guest can no longer
    /// see the device, so reset it, drop its memory and interrupts.
    fn disconnect(&mut self, why: &ConnError) {
        match why {
            ConnError::Closed => guest_info!("vfio-user: client disconnected"),
            e => guest_error!("vfio-user: dropping client: {e}"),
        }
        let signalled = self.irqs.lock().map(|i| i.signalled).unwrap_or(0);
        guest_info!(
            "vfio-user: session stats: messages={} region_accesses={} interrupts={} {}",
            self.messages,
            self.region_accesses,
            signalled,
            self.pci.controller().summary()
        );
        crate::timeline::flush();
        self.messages = 0;
        self.region_accesses = 0;
        if let Some(s) = self.client.take() {
            let _ = self.lp.remove(s.as_raw_fd());
        }
        self.pci.set_external_msi(ExternalMsi::None);
        self.pci.reset();
        self.dma.clear();
        self.dma.publish(&self.ram);
        if let Ok(mut i) = self.irqs.lock() {
            *i = IrqFds::default();
        }
    }

    /// Reads one whole message and answers it.
    fn serve_one(&mut self) -> Result<(), ConnError> {
        let Some(stream) = self.client.take() else {
            return Ok(());
        };
        let r = self.serve_from(&stream);
        self.client = Some(stream);
        r
    }

    fn serve_from(&mut self, stream: &UnixStream) -> Result<(), ConnError> {
        let mut hdr = [0u8; HEADER_SIZE];
        let (got, files, fds_truncated) = recv_with_fds(stream, &mut hdr)?;
        if got == 0 {
            return Err(ConnError::Closed);
        }
        let mut s = stream;
        s.set_read_timeout(Some(BODY_TIMEOUT))?;
        if got < HEADER_SIZE {
            s.read_exact(&mut hdr[got..])?;
        }
        let h = Header::parse(&hdr);
        let size = h.size as usize;
        if !(HEADER_SIZE..=MAX_MESSAGE).contains(&size) {
            return Err(ConnError::Protocol(format!(
                "message size {size} outside {HEADER_SIZE}..={MAX_MESSAGE}"
            )));
        }
        let mut body = vec![0u8; size - HEADER_SIZE];
        s.read_exact(&mut body)?;
        s.set_read_timeout(None)?;
        if h.flags & FLAG_TYPE_MASK != FLAG_COMMAND {
            return Err(ConnError::Protocol("client sent a reply".into()));
        }
        self.messages += 1;
        let reply = if fds_truncated {
            // More descriptors than MAX_FDS: the kernel closed those that
            // did not fit, we close the rest; the message is refused but
            // was read whole, so the stream stays in sync.
            guest_warn!(
                "vfio-user: command {} came with more than {MAX_FDS} file descriptors",
                h.command
            );
            drop(files);
            Err(libc::EINVAL as u32)
        } else {
            self.dispatch(&h, &body, files)
        };
        if h.flags & FLAG_NO_REPLY != 0 {
            if let Err(e) = reply {
                guest_warn!(
                    "vfio-user: command {} (no reply wanted) failed: errno {e}",
                    h.command
                );
            }
            return Ok(());
        }
        let out = match reply {
            Ok(payload) => encode_reply(&h, 0, &payload),
            Err(errno) => {
                debug!("vfio-user: command {} failed: errno {errno}", h.command);
                encode_reply(&h, errno, &[])
            }
        };
        let mut w = stream;
        w.write_all(&out)?;
        Ok(())
    }

    /// Handles one command; `Ok(payload)` or `Err(errno)`.
    fn dispatch(&mut self, h: &Header, body: &[u8], mut fds: Vec<File>) -> Result<Vec<u8>, u32> {
        let mut r = Reader::new(body);
        match h.command {
            CMD_VERSION => {
                let major = r.u16()?;
                let minor = r.u16()?;
                let caps = String::from_utf8_lossy(r.rest());
                guest_info!(
                    "vfio-user: client version {major}.{minor} {}",
                    caps.trim_end_matches('\0')
                );
                let json = format!(
                    "{{\"capabilities\":{{\"max_msg_fds\":{MAX_FDS},\"max_data_xfer_size\":{MAX_DATA}}}}}"
                );
                let mut p = Vec::new();
                p.extend_from_slice(&0u16.to_le_bytes());
                p.extend_from_slice(&0u16.to_le_bytes());
                p.extend_from_slice(json.as_bytes());
                p.push(0);
                Ok(p)
            }
            CMD_DMA_MAP => {
                let _argsz = r.u32()?;
                let _flags = r.u32()?;
                let offset = r.u64()?;
                let addr = r.u64()?;
                let size = r.u64()?;
                if fds.len() > 1 {
                    return Err(libc::EINVAL as u32);
                }
                let f = fds.pop();
                if f.is_none() {
                    // ROM shadows come without descriptors; RAM must not.
                    if size >= 1 << 20 {
                        guest_warn!("vfio-user: DMA_MAP {addr:#x}+{size:#x} without a file descriptor: guest RAM must be shared (memory-backend-memfd,share=on)");
                    } else {
                        debug!("vfio-user: DMA_MAP {addr:#x}+{size:#x} without a file descriptor (not accessible)");
                    }
                }
                match self.dma.map(addr, size, f, offset) {
                    Ok(()) => {
                        debug!("vfio-user: DMA_MAP {addr:#x}+{size:#x}");
                        self.dma.publish(&self.ram);
                        Ok(Vec::new())
                    }
                    Err(e) => {
                        guest_warn!("vfio-user: {e}");
                        Err(libc::EINVAL as u32)
                    }
                }
            }
            CMD_DMA_UNMAP => {
                let argsz = r.u32()?;
                let flags = r.u32()?;
                let addr = r.u64()?;
                let size = r.u64()?;
                match self.dma.unmap(addr, size) {
                    Ok(()) => {
                        debug!("vfio-user: DMA_UNMAP {addr:#x}+{size:#x}");
                        self.dma.publish(&self.ram);
                        let mut p = Vec::new();
                        p.extend_from_slice(&argsz.to_le_bytes());
                        p.extend_from_slice(&flags.to_le_bytes());
                        p.extend_from_slice(&addr.to_le_bytes());
                        p.extend_from_slice(&size.to_le_bytes());
                        Ok(p)
                    }
                    Err(e) => {
                        guest_warn!("vfio-user: {e}");
                        Err(libc::EINVAL as u32)
                    }
                }
            }
            CMD_DEVICE_GET_INFO => {
                let mut p = Vec::new();
                p.extend_from_slice(&16u32.to_le_bytes());
                p.extend_from_slice(&(DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI).to_le_bytes());
                p.extend_from_slice(&NUM_REGIONS.to_le_bytes());
                p.extend_from_slice(&NUM_IRQS.to_le_bytes());
                Ok(p)
            }
            CMD_DEVICE_GET_REGION_INFO => {
                let _argsz = r.u32()?;
                let _flags = r.u32()?;
                let index = r.u32()?;
                let (size, flags) = self.region(index).ok_or(libc::EINVAL as u32)?;
                let mut p = Vec::new();
                p.extend_from_slice(&32u32.to_le_bytes());
                p.extend_from_slice(&flags.to_le_bytes());
                p.extend_from_slice(&index.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&size.to_le_bytes());
                p.extend_from_slice(&0u64.to_le_bytes());
                Ok(p)
            }
            CMD_DEVICE_GET_IRQ_INFO => {
                let _argsz = r.u32()?;
                let _flags = r.u32()?;
                let index = r.u32()?;
                let count = self.irq_count(index).ok_or(libc::EINVAL as u32)?;
                let flags = match index {
                    IRQ_INTX => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                    IRQ_MSI | IRQ_MSIX => IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
                    _ => 0,
                };
                let mut p = Vec::new();
                p.extend_from_slice(&16u32.to_le_bytes());
                p.extend_from_slice(&flags.to_le_bytes());
                p.extend_from_slice(&index.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
                Ok(p)
            }
            CMD_DEVICE_SET_IRQS => {
                let _argsz = r.u32()?;
                let flags = r.u32()?;
                let index = r.u32()?;
                let start = r.u32()?;
                let count = r.u32()?;
                self.set_irqs(flags, index, start, count, fds)?;
                Ok(Vec::new())
            }
            CMD_REGION_READ => {
                let offset = r.u64()?;
                let region = r.u32()?;
                let count = r.u32()? as usize;
                if count > MAX_DATA {
                    return Err(libc::EINVAL as u32);
                }
                let mut data = vec![0u8; count];
                self.region_access(region, offset, &mut data, false)?;
                let mut p = Vec::with_capacity(16 + count);
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&region.to_le_bytes());
                p.extend_from_slice(&(count as u32).to_le_bytes());
                p.extend_from_slice(&data);
                Ok(p)
            }
            CMD_REGION_WRITE => {
                let offset = r.u64()?;
                let region = r.u32()?;
                let count = r.u32()?;
                let mut data = r.rest().to_vec();
                if data.len() != count as usize {
                    return Err(libc::EINVAL as u32);
                }
                self.region_access(region, offset, &mut data, true)?;
                let mut p = Vec::new();
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&region.to_le_bytes());
                p.extend_from_slice(&count.to_le_bytes());
                Ok(p)
            }
            CMD_DEVICE_RESET => {
                guest_info!("vfio-user: device reset");
                self.pci.reset();
                Ok(Vec::new())
            }
            other => {
                guest_warn!("vfio-user: unsupported command {other}");
                Err(libc::ENOTSUP as u32)
            }
        }
    }

    /// Vectors of interrupt index `index` (what `GET_IRQ_INFO` reports).
    fn irq_count(&self, index: u32) -> Option<u32> {
        match index {
            IRQ_INTX => Some(1),
            IRQ_MSI => Some(u32::from(self.pci.controller().msi_vectors())),
            IRQ_MSIX => Some(
                self.pci
                    .controller()
                    .msix()
                    .map_or(0, |m| u32::from(m.vectors)),
            ),
            IRQ_ERR | IRQ_REQ => Some(0),
            _ => None,
        }
    }

    /// Size and flags of a region (VFIO PCI region indices).
    fn region(&self, index: u32) -> Option<(u64, u32)> {
        match index {
            REGION_CONFIG => Some((256, REGION_READ | REGION_WRITE)),
            0..=5 => Some(
                self.pci
                    .bars()
                    .iter()
                    .find(|b| u32::from(b.index) == index)
                    .map_or((0, 0), |b| (b.size, REGION_READ | REGION_WRITE)),
            ),
            6 | 8 => Some((0, 0)),
            _ => None,
        }
    }

    /// Splits an access into naturally aligned pieces of at most 8 bytes
    /// (config space: 4) and forwards them.
    fn region_access(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
        write: bool,
    ) -> Result<(), u32> {
        let (size, _) = self.region(region).ok_or(libc::EINVAL as u32)?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(libc::EINVAL as u32)?;
        if end > size {
            return Err(libc::EINVAL as u32);
        }
        self.region_accesses += 1;
        if region == 0 && crate::timeline::enabled() {
            // When the access arrived (a doorbell's work follows); the
            // value written (reads: 0).
            let mut v = [0u8; 8];
            let k = data.len().min(8);
            if write {
                v[..k].copy_from_slice(&data[..k]);
            }
            let kind = if write { b'W' } else { b'R' };
            crate::timeline::record(kind, offset, u64::from_le_bytes(v));
        }
        let max = if region == REGION_CONFIG { 4 } else { 8 };
        let mut pos = 0usize;
        // One message is one guest access: the controller's work budget is
        // not renewed for each register it carries.
        self.pci.begin_access();
        while pos < data.len() {
            let off = offset + pos as u64;
            let mut n = max.min(data.len() - pos);
            while n > 1 && (!off.is_multiple_of(n as u64) || !n.is_power_of_two()) {
                n = if n.is_power_of_two() {
                    n / 2
                } else {
                    n.next_power_of_two() / 2
                };
            }
            let chunk = &mut data[pos..pos + n];
            match (region == REGION_CONFIG, write) {
                (true, false) => self.pci.config_read(off as u16, chunk),
                (true, true) => self.pci.config_write(off as u16, chunk),
                (false, false) => self.pci.bar_read(region as u8, off, chunk),
                (false, true) => self.pci.bar_write(region as u8, off, chunk),
            }
            pos += n;
        }
        self.pci.end_access();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), u32> {
        let action = flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
        let data = flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
        if action.count_ones() != 1 || data.count_ones() != 1 {
            return Err(libc::EINVAL as u32);
        }
        // As the kernel's vfio_set_irqs_validate_and_prepare: the range
        // must lie within the index's vectors (no overflow, start inside
        // even for count 0), so no request makes us loop for long.
        let vectors = self.irq_count(index).ok_or(libc::EINVAL as u32)?;
        if flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) != 0
            || start >= vectors
            || start.checked_add(count).is_none_or(|end| end > vectors)
        {
            return Err(libc::EINVAL as u32);
        }
        debug!("vfio-user: SET_IRQS request index {index} start {start} count {count} flags {flags:#x} fds {}", fds.len());
        let mut irqs = self.irqs.lock().map_err(|_| libc::EIO as u32)?;
        match (action, data) {
            // QEMU sends runs of "no eventfd" (-1) as a message with
            // DATA_EVENTFD, a count and no descriptors: those vectors go.
            (IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) if fds.is_empty() => {
                irqs.clear_range(index, start, count)
            }
            (IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) => {
                if fds.len() != count as usize {
                    return Err(libc::EINVAL as u32);
                }
                irqs.set(index, start, fds)
                    .map_err(|_| libc::EINVAL as u32)?;
            }
            (IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_NONE) if count == 0 => irqs.clear(index),
            (IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_NONE) => {
                // Bounded by the index's vectors (checked above).
                for v in start..start + count {
                    irqs.signal(index, v);
                }
            }
            (IRQ_SET_ACTION_UNMASK, _) if index == IRQ_INTX => irqs.unmask_intx(),
            (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK, _) => {}
            _ => return Err(libc::EINVAL as u32),
        }
        let mode = irqs.mode();
        drop(irqs);
        debug!("vfio-user: SET_IRQS index {index} start {start} count {count} flags {flags:#x}: {mode:?}");
        self.pci.set_external_msi(mode);
        Ok(())
    }
}

/// Room for [`MAX_FDS`] descriptors in one SCM_RIGHTS control message.
// SAFETY: CMSG_SPACE is arithmetic on its argument.
const CMSG_WORDS: usize = (unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize).div_ceil(8);

/// `recvmsg` into `buf` taking at most [`MAX_FDS`] descriptors, owned as
/// `File`s. The flag says the client sent more (`MSG_CTRUNC`: the kernel
/// closed those that did not fit). Unlike `ScmSocket::recv_with_fds`, the
/// bytes read are never lost on truncation, so the message can still be
/// read whole and answered.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<File>, bool)> {
    use std::os::fd::FromRawFd;
    let mut cmsg = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr; the pointers set below stay
    // valid for the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `cmsg`, both live and
    // exclusively borrowed for the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut files = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR only walk
    // within `msg_control..msg_controllen`.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a header inside `cmsg` (CMSG_FIRSTHDR/NXTHDR).
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: the data of a header inside `cmsg`.
            let data = unsafe { libc::CMSG_DATA(c) };
            let len = (h.cmsg_len as usize).saturating_sub(data as usize - c as usize);
            for i in 0..len / 4 {
                // SAFETY: `i < len / 4` ints lie inside this message's
                // data; SCM_RIGHTS made each a descriptor we now own.
                let fd = unsafe { std::ptr::read_unaligned(data.cast::<i32>().add(i)) };
                // SAFETY: see above: owned by us, closed when dropped.
                files.push(unsafe { File::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n as usize, files, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

impl<C: PciController> Drop for Server<C> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
