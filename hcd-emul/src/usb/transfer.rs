//! Transfers and their lifecycle.
//!
//! A [`Transfer`] owns a scatter/gather view of guest memory (the TD's data
//! buffers) plus a shared state cell. The lifecycle is
//! `Pending -> Completed` or `Pending -> Cancelled`; the first transition
//! wins and the other side becomes a no-op, so cancelling twice, or a device
//! completing a transfer the controller has already cancelled, is harmless.
//! Every access the device makes to the guest buffer takes the state lock
//! and checks the transfer is still pending: once the controller has
//! cancelled a transfer, no byte of guest memory is touched for it again,
//! whatever thread the device completes from.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Direction, SetupPacket};
use crate::mem::{DmaError, FileCursor, GuestRam, HostRange};

/// Identifies a transfer within one controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u64);

/// What kind of transfer this is (USB 2.0 §5.4-5.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    /// Control transfer with its SETUP packet; the buffer is the data stage.
    Control(SetupPacket),
    /// Bulk.
    Bulk,
    /// Interrupt.
    Interrupt,
    /// Isochronous; see [`Transfer::iso_packets`].
    Isochronous,
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferStatus {
    /// All requested bytes moved.
    Success,
    /// Fewer bytes than requested moved (IN only); not an error.
    ShortPacket,
    /// The endpoint answered STALL (halted, or request not supported).
    Stall,
    /// The device sent more than the buffer holds.
    Babble,
    /// CRC, timeout, bit-stuffing, or a buffer that could not be accessed.
    TransactionError,
    /// Cancelled by the controller before completion.
    Cancelled,
    /// The device disappeared (unplug, backend failure).
    DeviceGone,
}

/// One packet of an isochronous transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsoPacket {
    /// Offset of the packet in the transfer buffer.
    pub offset: usize,
    /// Requested length.
    pub length: usize,
    /// Bytes actually moved.
    pub actual: usize,
    /// Per-packet status.
    pub status: TransferStatus,
}

/// A completed transfer, as the controller receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferResult {
    /// The transfer.
    pub id: TransferId,
    /// How it ended.
    pub status: TransferStatus,
    /// Bytes moved (data stage only for control transfers).
    pub actual: usize,
    /// Per-packet results of an isochronous transfer.
    pub iso_packets: Vec<IsoPacket>,
}

type Waker = Box<dyn Fn() + Send + Sync>;

/// Where devices post completions for one controller. Cloneable; the waker
/// (if any) runs after each post so an event loop can wake up.
#[derive(Clone)]
pub struct CompletionQueue {
    inner: Arc<QueueInner>,
}

struct QueueInner {
    q: Mutex<VecDeque<TransferResult>>,
    waker: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("pending", &lock(&self.inner.q).len())
            .finish()
    }
}

impl Default for CompletionQueue {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CompletionQueue {
    /// An empty queue without waker.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(QueueInner {
                q: Mutex::new(VecDeque::new()),
                waker: Mutex::new(None),
            }),
        }
    }

    /// Installs the function called after every posted completion.
    pub fn set_waker(&self, w: impl Fn() + Send + Sync + 'static) {
        *lock(&self.inner.waker) = Some(Box::new(w));
    }

    fn post(&self, r: TransferResult) {
        lock(&self.inner.q).push_back(r);
        if let Some(w) = lock(&self.inner.waker).as_ref() {
            w();
        }
    }

    /// A handle that only wakes the controller's event loop: devices whose
    /// state changes without a transfer (a passthrough device unplugged
    /// while idle) use it so the controller looks at
    /// [`super::UsbDevice::connected`] again.
    pub fn wakeup(&self) -> Wakeup {
        Wakeup {
            inner: self.inner.clone(),
        }
    }

    /// Takes every completion posted so far, oldest first.
    pub fn drain(&self) -> Vec<TransferResult> {
        lock(&self.inner.q).drain(..).collect()
    }

    /// Whether completions are waiting.
    pub fn is_empty(&self) -> bool {
        lock(&self.inner.q).is_empty()
    }
}

/// Wakes a controller's event loop (see [`CompletionQueue::wakeup`]).
#[derive(Clone)]
pub struct Wakeup {
    inner: Arc<QueueInner>,
}

impl std::fmt::Debug for Wakeup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wakeup")
    }
}

impl Wakeup {
    /// Runs the controller's waker, if one is installed.
    pub fn wake(&self) {
        if let Some(w) = lock(&self.inner.waker).as_ref() {
            w();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Completed,
    Cancelled,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
}

/// One piece of a transfer buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes of guest memory at `addr`.
    Guest {
        /// Guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// Data carried inside the schedule itself (xHCI Immediate Data, IDT).
    Inline(Vec<u8>),
}

impl Segment {
    /// Appends `len` bytes of guest memory at `addr` to `segs`, extending
    /// the last segment when the buffer continues it (one file I/O call
    /// instead of one per TD or TRB).
    pub fn push_guest(segs: &mut Vec<Segment>, addr: u64, len: usize) {
        match segs.last_mut() {
            Some(Segment::Guest { addr: a, len: l }) if a.checked_add(*l as u64) == Some(addr) => {
                *l += len
            }
            _ => segs.push(Segment::Guest { addr, len }),
        }
    }

    fn len(&self) -> usize {
        match self {
            Segment::Guest { len, .. } => *len,
            Segment::Inline(v) => v.len(),
        }
    }
}

/// A transfer in flight between a controller and a device.
pub struct Transfer {
    id: TransferId,
    endpoint: u8,
    direction: Direction,
    kind: TransferKind,
    /// USB 3 bulk stream ID; 0 = no stream.
    stream_id: u16,
    segments: Vec<Segment>,
    len: usize,
    ram: GuestRam,
    iso: Vec<IsoPacket>,
    shared: Arc<Shared>,
    queue: CompletionQueue,
    /// Sees the completion first (a USB capture), if set.
    tap: Option<Arc<dyn TransferTap>>,
}

/// Something that sees a transfer complete before the controller does: a
/// USB capture ([`crate::capture`]). Runs on the completing thread; it must
/// not block.
pub trait TransferTap: Send + Sync {
    /// `xfer` completes with `status` after `actual` bytes; its buffer is
    /// still readable (the IN data the device wrote). Not called for a
    /// transfer the controller cancelled first.
    fn completing(&self, xfer: &Transfer, status: TransferStatus, actual: usize);
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint)
            .field("direction", &self.direction)
            .field("kind", &self.kind)
            .field("stream_id", &self.stream_id)
            .field("len", &self.len)
            .finish()
    }
}

/// The controller's handle on a transfer it submitted.
#[derive(Debug, Clone)]
pub struct TransferHandle {
    id: TransferId,
    shared: Arc<Shared>,
}

impl TransferHandle {
    /// The transfer's id.
    pub fn id(&self) -> TransferId {
        self.id
    }

    /// Cancels the transfer if it is still pending. Returns `true` if this
    /// call cancelled it: from then on the device cannot touch guest memory
    /// for it and its completion is never posted. Returns `false` if it had
    /// already completed (its result is, or was, in the queue) or been
    /// cancelled.
    pub fn cancel(&self) -> bool {
        let mut s = lock(&self.shared.state);
        if *s == State::Pending {
            *s = State::Cancelled;
            true
        } else {
            false
        }
    }
}

impl Transfer {
    /// Builds a transfer and the controller's handle on it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: TransferId,
        endpoint: u8,
        direction: Direction,
        kind: TransferKind,
        segments: Vec<Segment>,
        ram: GuestRam,
        iso: Vec<IsoPacket>,
        queue: CompletionQueue,
    ) -> (Transfer, TransferHandle) {
        let len = segments.iter().map(Segment::len).sum();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::Pending),
        });
        let h = TransferHandle {
            id,
            shared: shared.clone(),
        };
        (
            Transfer {
                id,
                endpoint,
                direction,
                kind,
                stream_id: 0,
                segments,
                len,
                ram,
                iso,
                shared,
                queue,
                tap: None,
            },
            h,
        )
    }

    /// The transfer's id.
    pub fn id(&self) -> TransferId {
        self.id
    }
    /// Endpoint number, 0-15.
    pub fn endpoint(&self) -> u8 {
        self.endpoint
    }
    /// Data direction.
    pub fn direction(&self) -> Direction {
        self.direction
    }
    /// Transfer type (with the SETUP packet for control transfers).
    pub fn kind(&self) -> TransferKind {
        self.kind
    }
    /// USB 3 bulk stream ID (USB 3.2 §8.12.1.4); 0 if the endpoint has no
    /// streams. Transfers on different streams of one endpoint may complete
    /// in any order; within a stream, in submission order.
    pub fn stream_id(&self) -> u16 {
        self.stream_id
    }
    /// Sets the stream ID (controllers, before submitting).
    pub fn set_stream_id(&mut self, id: u16) {
        self.stream_id = id;
    }
    /// Length of the data buffer in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the data buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Isochronous packets (empty for other kinds).
    pub fn iso_packets(&self) -> &[IsoPacket] {
        &self.iso
    }
    /// Mutable isochronous packets, for the device to fill in results.
    pub fn iso_packets_mut(&mut self) -> &mut [IsoPacket] {
        &mut self.iso
    }

    /// Whether the controller has cancelled the transfer.
    pub fn is_cancelled(&self) -> bool {
        *lock(&self.shared.state) == State::Cancelled
    }

    /// The whole data buffer as one range of host memory, when it is one
    /// contiguous piece of guest RAM inside one mapped region (and the
    /// transfer is still pending). For zero-copy backends that hand the
    /// buffer to the host kernel. The contract: the backend stops every
    /// access through the range before its [`super::UsbDevice::cancel`]
    /// for this transfer returns, so a cancelled transfer's memory is not
    /// touched once the controller has finished cancelling it.
    pub fn host_buffer(&self) -> Option<HostRange> {
        let st = lock(&self.shared.state);
        if *st != State::Pending {
            return None;
        }
        match self.segments.as_slice() {
            [Segment::Guest { addr, len }] => self.ram.host_range(*addr, *len),
            _ => None,
        }
    }

    /// Walks the segments covering `[offset, offset+len)`, calling `f` with
    /// (segment piece, offset in the piece, offset in the caller's data,
    /// length). Holds the state lock so cancellation cannot interleave.
    fn for_range(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(&Segment, usize, usize, usize) -> Result<(), DmaError>,
    ) -> Result<usize, DmaError> {
        let st = lock(&self.shared.state);
        if *st != State::Pending {
            return Ok(0);
        }
        let end = offset.saturating_add(len).min(self.len);
        let mut pos = 0usize;
        let mut done = 0usize;
        for seg in &self.segments {
            let sl = seg.len();
            let (s, e) = (pos, pos + sl);
            pos = e;
            if e <= offset {
                continue;
            }
            if s >= end {
                break;
            }
            let from = offset.max(s);
            let to = end.min(e);
            f(seg, from - s, from - offset, to - from)?;
            done += to - from;
        }
        drop(st);
        Ok(done)
    }

    /// Copies `data` into the transfer buffer at `offset` (IN transfers).
    /// Returns the bytes copied: fewer if the buffer is shorter, zero if the
    /// transfer was cancelled.
    pub fn write_data(&self, offset: usize, data: &[u8]) -> Result<usize, DmaError> {
        let ram = &self.ram;
        self.for_range(offset, data.len(), |seg, so, doff, n| match seg {
            Segment::Guest { addr, .. } => ram.write(*addr + so as u64, &data[doff..doff + n]),
            Segment::Inline(_) => Ok(()),
        })
    }

    /// Copies from the transfer buffer at `offset` into `buf` (OUT
    /// transfers). Returns the bytes copied.
    pub fn read_data(&self, offset: usize, buf: &mut [u8]) -> Result<usize, DmaError> {
        let ram = &self.ram;
        let len = buf.len();
        self.for_range(offset, len, |seg, so, doff, n| match seg {
            Segment::Guest { addr, .. } => ram.read(*addr + so as u64, &mut buf[doff..doff + n]),
            Segment::Inline(v) => {
                buf[doff..doff + n].copy_from_slice(&v[so..so + n]);
                Ok(())
            }
        })
    }

    /// Reads `len` bytes of `file` at `file_off` straight into the transfer
    /// buffer at `offset` (no bounce copy). Returns the bytes moved.
    pub fn fill_from_file(
        &self,
        offset: usize,
        len: usize,
        file: &File,
        file_off: u64,
    ) -> Result<usize, DmaError> {
        let ram = &self.ram;
        let mut cur = FileCursor::new(file, file_off);
        self.for_range(offset, len, |seg, so, doff, n| match seg {
            Segment::Guest { addr, .. } => {
                cur.set_offset(file_off + doff as u64);
                ram.fill_from(*addr + so as u64, n, &mut cur)
            }
            Segment::Inline(_) => Ok(()),
        })
    }

    /// Writes `len` bytes of the transfer buffer at `offset` straight to
    /// `file` at `file_off` (no bounce copy). Returns the bytes moved.
    pub fn drain_to_file(
        &self,
        offset: usize,
        len: usize,
        file: &File,
        file_off: u64,
    ) -> Result<usize, DmaError> {
        use std::os::unix::fs::FileExt;
        let ram = &self.ram;
        let mut cur = FileCursor::new(file, file_off);
        self.for_range(offset, len, |seg, so, doff, n| match seg {
            Segment::Guest { addr, .. } => {
                cur.set_offset(file_off + doff as u64);
                ram.drain_to(*addr + so as u64, n, &mut cur)
            }
            Segment::Inline(v) => file
                .write_all_at(&v[so..so + n], file_off + doff as u64)
                .map_err(|_| DmaError::Io),
        })
    }

    /// Completes the transfer with `status` after `actual` bytes. A no-op if
    /// the controller cancelled it meanwhile.
    pub fn complete(mut self, status: TransferStatus, actual: usize) {
        self.finish(status, actual);
    }

    /// Lets `tap` see this transfer's completion.
    pub fn set_tap(&mut self, tap: Arc<dyn TransferTap>) {
        self.tap = Some(tap);
    }

    fn finish(&mut self, status: TransferStatus, actual: usize) {
        if let Some(tap) = self.tap.take() {
            // Before the state changes: the tap reads the buffer through
            // the pending-state check like the device does.
            if *lock(&self.shared.state) == State::Pending {
                tap.completing(self, status, actual.min(self.len));
            }
        }
        let mut st = lock(&self.shared.state);
        if *st != State::Pending {
            return;
        }
        *st = State::Completed;
        drop(st);
        self.queue.post(TransferResult {
            id: self.id,
            status,
            actual: actual.min(self.len),
            iso_packets: std::mem::take(&mut self.iso),
        });
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        // A device that loses a transfer must not hang the endpoint.
        self.finish(TransferStatus::DeviceGone, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xfer(ram: &GuestRam, q: &CompletionQueue, segs: Vec<Segment>) -> (Transfer, TransferHandle) {
        Transfer::new(
            TransferId(1),
            1,
            Direction::In,
            TransferKind::Bulk,
            segs,
            ram.clone(),
            vec![],
            q.clone(),
        )
    }

    #[test]
    fn scatter_gather_write_spans_segments() {
        let ram = GuestRam::anonymous(0x10000);
        let q = CompletionQueue::new();
        let (t, _h) = xfer(
            &ram,
            &q,
            vec![
                Segment::Guest {
                    addr: 0x1ffe,
                    len: 2,
                },
                Segment::Guest {
                    addr: 0x5000,
                    len: 3,
                },
            ],
        );
        assert_eq!(t.write_data(1, &[7, 8, 9, 10, 11]).unwrap(), 4);
        let mut b = [0u8; 2];
        ram.read(0x1ffe, &mut b).unwrap();
        assert_eq!(b, [0, 7]);
        let mut c = [0u8; 3];
        ram.read(0x5000, &mut c).unwrap();
        assert_eq!(c, [8, 9, 10]);
        t.complete(TransferStatus::Success, 5);
        let r = q.drain();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].actual, 5);
    }

    #[test]
    fn cancelled_transfer_never_touches_memory_or_posts() {
        let ram = GuestRam::anonymous(0x10000);
        let q = CompletionQueue::new();
        let (t, h) = xfer(
            &ram,
            &q,
            vec![Segment::Guest {
                addr: 0x100,
                len: 4,
            }],
        );
        assert!(h.cancel());
        assert!(!h.cancel(), "second cancel is a no-op");
        assert_eq!(t.write_data(0, &[1, 2, 3, 4]).unwrap(), 0);
        assert_eq!(ram.read_u32(0x100).unwrap(), 0);
        t.complete(TransferStatus::Success, 4);
        assert!(q.is_empty());
    }

    #[test]
    fn host_buffer_only_for_one_pending_guest_segment() {
        let ram = GuestRam::anonymous(0x10000);
        let q = CompletionQueue::new();
        let one = vec![Segment::Guest {
            addr: 0x1000,
            len: 0x800,
        }];
        let (t, h) = xfer(&ram, &q, one);
        let r = t.host_buffer().unwrap();
        assert_eq!(r.len(), 0x800);
        h.cancel();
        assert!(t.host_buffer().is_none(), "cancelled");
        let two = vec![
            Segment::Guest {
                addr: 0x1000,
                len: 8,
            },
            Segment::Guest {
                addr: 0x3000,
                len: 8,
            },
        ];
        let (t2, _h2) = xfer(&ram, &q, two);
        assert!(t2.host_buffer().is_none(), "scattered");
        let (t3, _h3) = xfer(&ram, &q, vec![Segment::Inline(vec![1, 2])]);
        assert!(t3.host_buffer().is_none(), "immediate data");
    }

    #[test]
    fn wakeup_runs_the_waker_without_posting() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let q = CompletionQueue::new();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        q.set_waker(move || {
            n2.fetch_add(1, Ordering::SeqCst);
        });
        q.wakeup().wake();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn dropped_transfer_completes_as_device_gone() {
        let ram = GuestRam::anonymous(0x1000);
        let q = CompletionQueue::new();
        let (t, h) = xfer(&ram, &q, vec![]);
        drop(t);
        assert!(!h.cancel());
        assert_eq!(q.drain()[0].status, TransferStatus::DeviceGone);
    }
}
