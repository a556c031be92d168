//! USB capture: every transfer of a device, submitted and completed, in
//! the Linux usbmon pcap format (`LINKTYPE_USB_LINUX_MMAPPED`, 220), so
//! Wireshark and tshark decode it as they decode a capture of `usbmonN` on
//! a real host: SETUP packets, data (capped per packet), status, isochronous
//! descriptors.
//!
//! [`Captured`] wraps any [`UsbDevice`]: on submit it writes an `S` record
//! and attaches itself to the transfer as a [`TransferTap`], which writes
//! the `C` record when the device completes it (or when the controller
//! cancels it: `-ECONNRESET`, as usbmon shows an unlinked URB). Records are
//! built on the submitting/completing thread (header plus at most
//! `snaplen` data bytes) and handed to a writer thread through a bounded
//! queue: when the queue is full the record is dropped and counted, never
//! waited for, so the capture cannot stall the data path. The writer starts
//! a new file when the current one would pass `max_bytes`, keeping `keep`
//! older ones as `FILE.1` (newest) .. `FILE.keep`.
//!
//! Capture can be switched on and off while the device runs
//! ([`CaptureSwitch`]; the control socket's `capture-start`/`capture-stop`).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::usb::{
    request, Direction, HubPorts, IsoPacket, Speed, Transfer, TransferId, TransferKind,
    TransferStatus, TransferTap, UsbDevice, Wakeup,
};

/// pcap link type of Linux usbmon with the 64-byte header.
pub const LINKTYPE_USB_LINUX_MMAPPED: u32 = 220;
/// The usbmon header (`struct usbmon_packet`, Linux
/// Documentation/usb/usbmon.rst).
pub const USBMON_HEADER: usize = 64;
/// One isochronous descriptor after the header.
const ISO_DESC: usize = 16;
/// Records waiting for the writer; more are dropped (and counted).
const QUEUE: usize = 8192;
/// Transfers remembered for a later cancel; a device that never completes
/// cannot grow this without bound.
const MAX_INFLIGHT: usize = 65536;
/// Data bytes per packet unless configured.
pub const DEFAULT_SNAPLEN: usize = 1024;
/// Largest data capture per packet accepted.
pub const MAX_SNAPLEN: usize = 1 << 20;

/// Where and how much to capture.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// The pcap file (created or truncated).
    pub path: PathBuf,
    /// Data bytes kept per packet (the rest is counted in the length).
    pub snaplen: usize,
    /// A file is rotated before it grows past this many bytes (0: never).
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` .. `FILE.keep`).
    pub keep: u32,
    /// The bus number written into every record.
    pub bus: u16,
}

impl CaptureOptions {
    /// Defaults for `path`: 1 KiB of data per packet, 64 MiB files, 4 kept,
    /// bus 1.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CaptureOptions {
            path: path.into(),
            snaplen: DEFAULT_SNAPLEN,
            max_bytes: 64 << 20,
            keep: 4,
            bus: 1,
        }
    }
}

enum Msg {
    Record(Vec<u8>),
    Flush(SyncSender<()>),
}

/// Counters of one capture.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Records queued for the file.
    pub records: u64,
    /// Records dropped because the writer fell behind.
    pub dropped: u64,
}

/// One running capture: the queue to its writer thread and what the
/// records need to know.
#[derive(Debug)]
pub struct Capture {
    tx: SyncSender<Msg>,
    snaplen: usize,
    bus: u16,
    path: PathBuf,
    devnum: AtomicU8,
    records: AtomicU64,
    dropped: AtomicU64,
    inflight: Mutex<HashMap<TransferId, Meta>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Record(b) => write!(f, "Record({} bytes)", b.len()),
            Msg::Flush(_) => write!(f, "Flush"),
        }
    }
}

/// What a `C` record for a cancelled transfer needs.
#[derive(Debug, Clone, Copy)]
struct Meta {
    xfer_type: u8,
    epnum: u8,
}

/// Linux errno values usbmon shows.
mod errno {
    pub const EPIPE: i32 = 32;
    pub const EPROTO: i32 = 71;
    pub const EOVERFLOW: i32 = 75;
    pub const ECONNRESET: i32 = 104;
    pub const ESHUTDOWN: i32 = 108;
    pub const EINPROGRESS: i32 = 115;
}

/// URB_DIR_IN in `xfer_flags`.
const URB_DIR_IN: u32 = 0x0200;

fn status_of(s: TransferStatus) -> i32 {
    match s {
        TransferStatus::Success | TransferStatus::ShortPacket => 0,
        TransferStatus::Stall => -errno::EPIPE,
        TransferStatus::Babble => -errno::EOVERFLOW,
        TransferStatus::TransactionError => -errno::EPROTO,
        TransferStatus::Cancelled => -errno::ECONNRESET,
        TransferStatus::DeviceGone => -errno::ESHUTDOWN,
    }
}

fn meta_of(x: &Transfer) -> Meta {
    let xfer_type = match x.kind() {
        TransferKind::Isochronous => 0,
        TransferKind::Interrupt => 1,
        TransferKind::Control(_) => 2,
        TransferKind::Bulk => 3,
    };
    let dir = if x.direction() == Direction::In {
        0x80
    } else {
        0
    };
    Meta {
        xfer_type,
        epnum: (x.endpoint() & 0x0f) | dir,
    }
}

/// One usbmon record (pcap record header included).
#[derive(Clone, Copy)]
struct Rec<'a> {
    id: u64,
    event: u8,
    meta: Meta,
    status: i32,
    /// The URB's length: requested (`S`) or actual (`C`).
    length: u32,
    setup: Option<[u8; 8]>,
    /// Requested (`S`) or with their results (`C`).
    iso: &'a [IsoPacket],
    data: &'a [u8],
    /// flag_data when no data is captured.
    no_data: u8,
}

impl Capture {
    /// Starts the writer thread on a new file at `opts.path`.
    pub fn start(opts: &CaptureOptions) -> io::Result<Arc<Capture>> {
        let file = new_file(&opts.path, opts.snaplen)?;
        let (tx, rx) = sync_channel(QUEUE);
        let o = opts.clone();
        std::thread::Builder::new()
            .name("usb-capture".into())
            .spawn(move || writer(rx, file, &o))?;
        Ok(Arc::new(Capture {
            tx,
            snaplen: opts.snaplen.min(MAX_SNAPLEN),
            bus: opts.bus,
            path: opts.path.clone(),
            devnum: AtomicU8::new(0),
            records: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            inflight: Mutex::new(HashMap::new()),
        }))
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters so far.
    pub fn stats(&self) -> CaptureStats {
        CaptureStats {
            records: self.records.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Waits until everything queued so far is in the file (not for the
    /// data path: control commands and tests).
    pub fn flush(&self) {
        // Bounded both ways: a writer stuck on its file (queue full, no
        // answer) cannot hang shutdown.
        let limit = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (ack, done) = sync_channel(1);
        let mut msg = Msg::Flush(ack);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < limit => {
                    msg = m;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = done.recv_timeout(limit.saturating_duration_since(std::time::Instant::now()));
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<TransferId, Meta>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, r: Rec<'_>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (sec, usec) = (now.as_secs(), now.subsec_micros());
        let descs = if r.meta.xfer_type == 0 {
            r.iso.len()
        } else {
            0
        };
        let done = r.event == b'C';
        let cap = r.data.len();
        let incl = USBMON_HEADER + descs * ISO_DESC + cap;
        let orig = USBMON_HEADER + descs * ISO_DESC + r.length as usize;
        let mut b = Vec::with_capacity(16 + incl);
        // pcap record header.
        b.extend_from_slice(&(sec as u32).to_le_bytes());
        b.extend_from_slice(&usec.to_le_bytes());
        b.extend_from_slice(&(incl as u32).to_le_bytes());
        b.extend_from_slice(&(orig as u32).to_le_bytes());
        // struct usbmon_packet.
        b.extend_from_slice(&r.id.to_le_bytes());
        b.push(r.event);
        b.push(r.meta.xfer_type);
        b.push(r.meta.epnum);
        b.push(self.devnum.load(Ordering::Relaxed));
        b.extend_from_slice(&self.bus.to_le_bytes());
        b.push(if r.setup.is_some() { 0 } else { b'-' });
        b.push(if cap > 0 { 0 } else { r.no_data });
        b.extend_from_slice(&(sec as i64).to_le_bytes());
        b.extend_from_slice(&(usec as i32).to_le_bytes());
        b.extend_from_slice(&r.status.to_le_bytes());
        b.extend_from_slice(&r.length.to_le_bytes());
        b.extend_from_slice(&(cap as u32).to_le_bytes());
        if descs > 0 {
            let errors = r
                .iso
                .iter()
                .filter(|p| done && p.status != TransferStatus::Success)
                .count();
            b.extend_from_slice(&(errors as i32).to_le_bytes());
            b.extend_from_slice(&(descs as i32).to_le_bytes());
        } else {
            b.extend_from_slice(&r.setup.unwrap_or_default());
        }
        b.extend_from_slice(&0i32.to_le_bytes()); // interval
        b.extend_from_slice(&0i32.to_le_bytes()); // start_frame
        let flags = if r.meta.epnum & 0x80 != 0 {
            URB_DIR_IN
        } else {
            0
        };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&(descs as u32).to_le_bytes());
        for p in r.iso.iter().take(descs) {
            let (st, len) = if done {
                (status_of(p.status), p.actual)
            } else {
                (-errno::EINPROGRESS, p.length)
            };
            b.extend_from_slice(&st.to_le_bytes());
            b.extend_from_slice(&(p.offset as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b.extend_from_slice(r.data);
        match self.tx.try_send(Msg::Record(b)) {
            Ok(()) => {
                self.records.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The first `len` (at most `snaplen`) bytes of `x`'s buffer if it
    /// moves data in direction `dir` (OUT data at submit, IN data at
    /// completion), else nothing.
    fn data_of(&self, x: &Transfer, dir: Direction, len: usize) -> Vec<u8> {
        if x.direction() != dir {
            return Vec::new();
        }
        let mut data = vec![0; len.min(self.snaplen)];
        let n = x.read_data(0, &mut data).unwrap_or(0);
        data.truncate(n);
        data
    }

    /// The `S` record of `x`, which is about to be submitted.
    fn submitted(&self, x: &Transfer) {
        let meta = meta_of(x);
        {
            let mut m = self.inflight();
            if m.len() >= MAX_INFLIGHT {
                m.clear();
            }
            m.insert(x.id(), meta);
        }
        let setup = match x.kind() {
            TransferKind::Control(sp) => Some(sp.to_bytes()),
            _ => None,
        };
        let data = self.data_of(x, Direction::Out, x.len());
        self.emit(Rec {
            id: x.id().0,
            event: b'S',
            meta,
            status: -errno::EINPROGRESS,
            length: x.len() as u32,
            setup,
            iso: x.iso_packets(),
            data: &data,
            no_data: b'<',
        });
        // The device answers to its new address from the next transfer on
        // (this one still went to the old one, as usbmon shows it).
        if let TransferKind::Control(sp) = x.kind() {
            if sp.request_type == 0 && sp.request == request::SET_ADDRESS {
                self.devnum
                    .store((sp.value & 0x7f) as u8, Ordering::Relaxed);
            }
        }
    }

    /// The `C` record of a transfer the controller cancelled, if it was
    /// submitted here and not completed yet.
    fn cancelled(&self, id: TransferId) {
        let Some(meta) = self.inflight().remove(&id) else {
            return;
        };
        self.emit(Rec {
            id: id.0,
            event: b'C',
            meta,
            status: -errno::ECONNRESET,
            length: 0,
            setup: None,
            iso: &[],
            data: &[],
            no_data: b'=',
        });
    }
}

impl TransferTap for Capture {
    fn completing(&self, x: &Transfer, status: TransferStatus, actual: usize) {
        let meta = self
            .inflight()
            .remove(&x.id())
            .unwrap_or_else(|| meta_of(x));
        let data = self.data_of(x, Direction::In, actual);
        self.emit(Rec {
            id: x.id().0,
            event: b'C',
            meta,
            status: status_of(status),
            length: actual as u32,
            setup: None,
            iso: x.iso_packets(),
            data: &data,
            no_data: b'>',
        });
    }
}

/// Creates (truncates) a pcap file and writes its global header.
fn new_file(path: &Path, snaplen: usize) -> io::Result<BufWriter<File>> {
    let mut f = BufWriter::with_capacity(256 << 10, File::create(path)?);
    let snap = (USBMON_HEADER + snaplen.min(MAX_SNAPLEN)) as u32;
    f.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
    f.write_all(&2u16.to_le_bytes())?;
    f.write_all(&4u16.to_le_bytes())?;
    f.write_all(&0i32.to_le_bytes())?;
    f.write_all(&0u32.to_le_bytes())?;
    f.write_all(&snap.max(USBMON_HEADER as u32 + 1024).to_le_bytes())?;
    f.write_all(&LINKTYPE_USB_LINUX_MMAPPED.to_le_bytes())?;
    Ok(f)
}

/// `path` with `.n` appended.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The writer thread: records into the file, rotating by size. A write
/// error ends the writing (logged once); records are then drained and
/// dropped so that senders never block.
fn writer(rx: Receiver<Msg>, file: BufWriter<File>, o: &CaptureOptions) {
    const GLOBAL: u64 = 24;
    let mut f = Some(file);
    let mut size = GLOBAL;
    for msg in rx {
        match msg {
            Msg::Flush(ack) => {
                if let Some(w) = f.as_mut() {
                    let _ = w.flush();
                }
                let _ = ack.send(());
            }
            Msg::Record(b) => {
                let Some(w) = f.as_mut() else { continue };
                if o.max_bytes > 0 && size > GLOBAL && size + b.len() as u64 > o.max_bytes {
                    let r = w.flush().and_then(|_| {
                        if o.keep > 0 {
                            for i in (1..o.keep).rev() {
                                let from = numbered(&o.path, i);
                                if from.exists() {
                                    fs::rename(&from, numbered(&o.path, i + 1))?;
                                }
                            }
                            fs::rename(&o.path, numbered(&o.path, 1))?;
                        }
                        new_file(&o.path, o.snaplen)
                    });
                    match r {
                        Ok(n) => {
                            *w = n;
                            size = GLOBAL;
                        }
                        Err(e) => {
                            tracing::event!(
                                tracing::Level::WARN,
                                "capture {}: rotation failed, capture stopped: {e}",
                                o.path.display()
                            );
                            f = None;
                            continue;
                        }
                    }
                }
                if let Err(e) = w.write_all(&b) {
                    tracing::event!(
                        tracing::Level::WARN,
                        "capture {}: write failed, capture stopped: {e}",
                        o.path.display()
                    );
                    f = None;
                    continue;
                }
                size += b.len() as u64;
            }
        }
    }
    if let Some(mut w) = f {
        let _ = w.flush();
    }
}

/// Turns capture of one device on and off at run time; cloneable.
#[derive(Debug, Clone, Default)]
pub struct CaptureSwitch {
    current: Arc<Mutex<Option<Arc<Capture>>>>,
    /// Whether `current` holds a capture: the per-transfer check without
    /// the lock while capture is off (the usual case).
    on: Arc<AtomicBool>,
}

impl CaptureSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Capture>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts capturing into a new file (replacing a running capture).
    pub fn start(&self, opts: &CaptureOptions) -> io::Result<()> {
        let c = Capture::start(opts)?;
        let old = {
            let mut cur = self.lock();
            self.on.store(true, Ordering::Release);
            cur.replace(c)
        };
        if let Some(old) = old {
            old.flush();
        }
        Ok(())
    }

    /// Stops capturing: what was queued reaches the file. Returns the
    /// stopped capture's file and counters, if one ran.
    pub fn stop(&self) -> Option<(PathBuf, CaptureStats)> {
        let c = {
            let mut cur = self.lock();
            self.on.store(false, Ordering::Release);
            cur.take()?
        };
        c.flush();
        Some((c.path.clone(), c.stats()))
    }

    /// The running capture's file and counters.
    pub fn status(&self) -> Option<(PathBuf, CaptureStats)> {
        self.lock().as_ref().map(|c| (c.path.clone(), c.stats()))
    }

    /// Waits until the running capture's records are in its file.
    pub fn flush(&self) {
        if let Some(c) = self.get() {
            c.flush();
        }
    }

    fn get(&self) -> Option<Arc<Capture>> {
        if !self.on.load(Ordering::Acquire) {
            return None;
        }
        self.lock().clone()
    }
}

/// A device whose transfers are captured while its [`CaptureSwitch`] is
/// on; everything else passes through unchanged.
#[derive(Debug)]
pub struct Captured {
    inner: Box<dyn UsbDevice>,
    switch: CaptureSwitch,
}

impl Captured {
    /// Wraps `inner`; capture follows `switch`.
    pub fn new(inner: Box<dyn UsbDevice>, switch: CaptureSwitch) -> Self {
        Captured { inner, switch }
    }
}

impl Drop for Captured {
    /// The device goes (shutdown, unplug): what it queued reaches the file
    /// first. The writer thread itself is detached; without this the last
    /// records of a run died with the process.
    fn drop(&mut self) {
        self.switch.flush();
    }
}

impl UsbDevice for Captured {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn speed(&self) -> Speed {
        self.inner.speed()
    }
    fn reset(&mut self) {
        if let Some(c) = self.switch.get() {
            c.devnum.store(0, Ordering::Relaxed);
        }
        self.inner.reset();
    }
    fn submit(&mut self, mut xfer: Transfer) {
        if let Some(c) = self.switch.get() {
            c.submitted(&xfer);
            xfer.set_tap(c);
        }
        self.inner.submit(xfer);
    }
    fn cancel(&mut self, id: TransferId) {
        if let Some(c) = self.switch.get() {
            c.cancelled(id);
        }
        self.inner.cancel(id);
    }
    fn connected(&self) -> bool {
        self.inner.connected()
    }
    fn alloc_streams(&mut self, endpoint: u8, streams: u16) -> bool {
        self.inner.alloc_streams(endpoint, streams)
    }
    fn free_streams(&mut self, endpoint: u8) {
        self.inner.free_streams(endpoint)
    }
    fn set_wakeup(&mut self, wakeup: Wakeup) {
        self.inner.set_wakeup(wakeup)
    }
    fn suspend(&mut self, suspended: bool) {
        self.inner.suspend(suspended)
    }
    fn remote_wakeup(&mut self) -> bool {
        self.inner.remote_wakeup()
    }
    fn is_interrupt_endpoint(&self, address: u8) -> bool {
        self.inner.is_interrupt_endpoint(address)
    }
    fn as_hub(&mut self) -> Option<&mut dyn HubPorts> {
        self.inner.as_hub()
    }
}

#[cfg(test)]
mod tests;
