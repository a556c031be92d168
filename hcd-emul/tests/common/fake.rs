//! Scripted fake USB devices for controller tests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hcd_emul::usb::{
    Direction, Speed, Transfer, TransferId, TransferKind, TransferStatus, UsbDevice, Wakeup,
};

/// Device descriptor of the fake (vendor 0x1234, product 0x5678).
pub fn device_descriptor(speed: Speed) -> Vec<u8> {
    let (bcd, mps0) = if speed == Speed::Super {
        (0x0320u16, 9u8)
    } else {
        (0x0200, 64)
    };
    let b = bcd.to_le_bytes();
    vec![
        18, 1, b[0], b[1], 0xff, 0, 0, mps0, 0x34, 0x12, 0x78, 0x56, 0, 1, 0, 0, 0, 1,
    ]
}

/// Configuration: one vendor interface with bulk IN 0x81 and bulk OUT 0x02.
pub fn config_descriptor() -> Vec<u8> {
    let mut v = vec![9, 2, 32, 0, 1, 1, 0, 0x80, 50];
    v.extend_from_slice(&[9, 4, 0, 0, 2, 0xff, 0, 0, 0]);
    v.extend_from_slice(&[7, 5, 0x81, 2, 0, 2, 0]);
    v.extend_from_slice(&[7, 5, 0x02, 2, 0, 2, 0]);
    v
}

/// What the fake saw and holds; shared with the test.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Bytes written to bulk OUT, in order.
    pub out_data: Vec<u8>,
    /// Control requests seen (bRequest).
    pub requests: Vec<u8>,
    /// Bulk IN transfers answered so far (sequence for patterns).
    pub in_seq: u32,
    /// Make the next bulk IN stall.
    pub stall_next_in: bool,
    /// Bulk IN answers this many bytes at most (short packets).
    pub in_limit: Option<usize>,
    /// Transfers submitted and not completed.
    pub outstanding: usize,
    pub resets: u32,
    pub cancels: Vec<TransferId>,
    /// Ids of bulk IN transfers in submission order.
    pub in_ids: Vec<u64>,
    /// The controller's wake-up handle, once plugged in.
    pub wakeup: Option<Wakeup>,
    /// Non-control transfers as (endpoint, direction IN, stream id, id),
    /// in submission order.
    pub submitted: Vec<(u8, bool, u16, u64)>,
    /// `alloc_streams` calls (endpoint address, streams).
    pub stream_allocs: Vec<(u8, u16)>,
    /// `free_streams` calls (endpoint address).
    pub stream_frees: Vec<u8>,
    /// Make `alloc_streams` fail.
    pub refuse_streams: bool,
    /// `suspend` calls, in order.
    pub suspends: Vec<bool>,
    /// The device signals remote wakeup (taken by `remote_wakeup`).
    pub wake_request: bool,
}

/// The pattern bulk IN transfer number `seq` carries.
pub fn pattern(seq: u32, i: usize) -> u8 {
    (seq as usize * 131 + i * 7 + (i >> 8)) as u8
}

/// Synchronous, or asynchronous through a worker thread that completes
/// transfers after a delay and in scrambled order.
#[derive(Debug)]
pub struct FakeDevice {
    pub speed: Speed,
    pub state: Arc<Mutex<FakeState>>,
    worker: Option<mpsc::Sender<Transfer>>,
    /// Transfers held back (parked) by the sync device: never completed
    /// until cancel or reset — to test Stop Endpoint.
    parked: VecDeque<Transfer>,
    pub park_in: bool,
    /// Park control transfers too (a device that never answers).
    pub park_control: bool,
    /// Park transfers of this stream (any direction) instead.
    pub park_stream: Option<u16>,
    /// What [`UsbDevice::connected`] answers (a host device unplugged and
    /// re-plugged behind a passthrough backend).
    pub present: Arc<AtomicBool>,
}

impl FakeDevice {
    pub fn new(speed: Speed) -> (Self, Arc<Mutex<FakeState>>) {
        let state = Arc::new(Mutex::new(FakeState::default()));
        (
            FakeDevice {
                speed,
                state: state.clone(),
                worker: None,
                parked: VecDeque::new(),
                park_in: false,
                park_control: false,
                park_stream: None,
                present: Arc::new(AtomicBool::new(true)),
            },
            state,
        )
    }

    /// Completions from another thread after `delay`, in scrambled order
    /// within each batch of up to `batch` transfers.
    pub fn asynchronous(
        speed: Speed,
        delay: Duration,
        batch: usize,
    ) -> (Self, Arc<Mutex<FakeState>>) {
        let (mut d, st) = Self::new(speed);
        let (tx, rx) = mpsc::channel::<Transfer>();
        let st2 = st.clone();
        std::thread::spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut b = vec![first];
                std::thread::sleep(delay);
                while b.len() < batch {
                    match rx.try_recv() {
                        Ok(t) => b.push(t),
                        Err(_) => break,
                    }
                }
                // Complete newest first: the controller must reorder.
                while let Some(t) = b.pop() {
                    let (status, n) = handle_data(&st2, &t);
                    st2.lock().unwrap().outstanding -= 1;
                    t.complete(status, n);
                }
            }
        });
        d.worker = Some(tx);
        (d, st)
    }
}

/// Data the transfer carries is decided at submission order (sequence
/// numbers are assigned in `submit`), so scrambled completion still puts
/// each TD's bytes in its own buffer.
fn handle_data(st: &Arc<Mutex<FakeState>>, t: &Transfer) -> (TransferStatus, usize) {
    let mut s = st.lock().unwrap();
    match t.direction() {
        Direction::Out => {
            let mut buf = vec![0u8; t.len()];
            let n = t.read_data(0, &mut buf).unwrap_or(0);
            s.out_data.extend_from_slice(&buf[..n]);
            (TransferStatus::Success, n)
        }
        Direction::In => {
            if s.stall_next_in {
                s.stall_next_in = false;
                return (TransferStatus::Stall, 0);
            }
            let seq = t.id().0 as u32;
            let n = s.in_limit.map_or(t.len(), |l| l.min(t.len()));
            let data: Vec<u8> = (0..n).map(|i| pattern(seq, i)).collect();
            s.in_seq += 1;
            let w = t.write_data(0, &data).unwrap_or(0);
            let status = if w < t.len() {
                TransferStatus::ShortPacket
            } else {
                TransferStatus::Success
            };
            (status, w)
        }
    }
}

impl UsbDevice for FakeDevice {
    fn name(&self) -> String {
        "fake".into()
    }
    fn suspend(&mut self, suspended: bool) {
        self.state.lock().unwrap().suspends.push(suspended);
    }
    fn remote_wakeup(&mut self) -> bool {
        std::mem::take(&mut self.state.lock().unwrap().wake_request)
    }
    fn speed(&self) -> Speed {
        self.speed
    }
    fn reset(&mut self) {
        self.state.lock().unwrap().resets += 1;
        while let Some(t) = self.parked.pop_front() {
            self.state.lock().unwrap().outstanding -= 1;
            t.complete(TransferStatus::Cancelled, 0);
        }
    }
    fn submit(&mut self, xfer: Transfer) {
        self.state.lock().unwrap().outstanding += 1;
        if let TransferKind::Control(sp) = xfer.kind() {
            self.state.lock().unwrap().requests.push(sp.request);
            if self.park_control {
                self.parked.push_back(xfer);
                return;
            }
            self.state.lock().unwrap().outstanding -= 1;
            let reply: Option<Vec<u8>> = match (sp.request_type, sp.request, sp.value >> 8) {
                (0x80, 6, 1) => Some(device_descriptor(self.speed)),
                (0x80, 6, 2) => Some(config_descriptor()),
                (0x00, 9, _) | (0x00, 5, _) | (0x02, 1, _) => Some(vec![]),
                (0x40, 0x42, _) => {
                    // Vendor: stall the next bulk IN.
                    self.state.lock().unwrap().stall_next_in = true;
                    Some(vec![])
                }
                _ => None,
            };
            match reply {
                Some(mut r) => {
                    r.truncate(sp.length as usize);
                    let n = xfer.write_data(0, &r).unwrap_or(0);
                    let st = if n < xfer.len() {
                        TransferStatus::ShortPacket
                    } else {
                        TransferStatus::Success
                    };
                    xfer.complete(st, n);
                }
                None => xfer.complete(TransferStatus::Stall, 0),
            }
            return;
        }
        if xfer.direction() == Direction::In {
            self.state.lock().unwrap().in_ids.push(xfer.id().0);
        }
        self.state.lock().unwrap().submitted.push((
            xfer.endpoint(),
            xfer.direction() == Direction::In,
            xfer.stream_id(),
            xfer.id().0,
        ));
        let park_stream = self.park_stream.is_some_and(|s| s == xfer.stream_id());
        if park_stream || (self.park_in && xfer.direction() == Direction::In) {
            self.parked.push_back(xfer);
            return;
        }
        if let Some(w) = &self.worker {
            let _ = w.send(xfer);
            return;
        }
        let (status, n) = handle_data(&self.state, &xfer);
        self.state.lock().unwrap().outstanding -= 1;
        xfer.complete(status, n);
    }
    fn connected(&self) -> bool {
        self.present.load(Ordering::SeqCst)
    }
    fn set_wakeup(&mut self, wakeup: Wakeup) {
        self.state.lock().unwrap().wakeup = Some(wakeup);
    }
    fn alloc_streams(&mut self, endpoint: u8, streams: u16) -> bool {
        let mut s = self.state.lock().unwrap();
        s.stream_allocs.push((endpoint, streams));
        !s.refuse_streams
    }
    fn free_streams(&mut self, endpoint: u8) {
        self.state.lock().unwrap().stream_frees.push(endpoint);
    }
    fn cancel(&mut self, id: TransferId) {
        self.state.lock().unwrap().cancels.push(id);
        if let Some(i) = self.parked.iter().position(|t| t.id() == id) {
            if let Some(t) = self.parked.remove(i) {
                self.state.lock().unwrap().outstanding -= 1;
                drop(t);
            }
        }
    }
}
