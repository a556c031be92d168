//! The keyboard driven as a host driver would: descriptors (device,
//! configuration with the HID descriptor, report descriptor), the class
//! requests, boot reports for key events in order (none merged, none
//! lost up to the cap), LEDs through SET_REPORT, parking and cancel.

use super::*;
use crate::mem::GuestRam;
use crate::usb::descriptor::parse_config;
use crate::usb::{CompletionQueue, Segment, TransferResult};

const BUF: u64 = 0x1000;

struct Host {
    dev: Keyboard,
    kb: KeyboardHandle,
    ram: GuestRam,
    q: CompletionQueue,
    next: u64,
    /// Completions of other transfers seen while waiting for a control one.
    other: Vec<TransferResult>,
}

fn host(speed: Speed) -> Host {
    host_of(Kind::Keyboard, speed)
}

fn host_of(kind: Kind, speed: Speed) -> Host {
    let (dev, kb) = HidDevice::with_kind(kind, speed).unwrap();
    Host {
        dev,
        kb,
        ram: GuestRam::anonymous(1 << 20),
        q: CompletionQueue::new(),
        next: 1,
        other: Vec::new(),
    }
}

impl Host {
    fn submit(
        &mut self,
        ep: u8,
        dir: Direction,
        kind: TransferKind,
        len: usize,
        at: u64,
    ) -> TransferId {
        let id = TransferId(self.next);
        self.next += 1;
        let segs = if len > 0 {
            vec![Segment::Guest { addr: at, len }]
        } else {
            vec![]
        };
        let (t, _h) = Transfer::new(
            id,
            ep,
            dir,
            kind,
            segs,
            self.ram.clone(),
            vec![],
            self.q.clone(),
        );
        self.dev.submit(t);
        id
    }

    fn control(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        out: &[u8],
        len: u16,
    ) -> (TransferStatus, Vec<u8>) {
        let sp = SetupPacket {
            request_type: rt,
            request: req,
            value,
            index,
            length: len.max(out.len() as u16),
        };
        let dir = sp.direction();
        self.ram.write(BUF, out).unwrap();
        let n = if dir == Direction::In {
            usize::from(len)
        } else {
            out.len()
        };
        let id = self.submit(0, dir, TransferKind::Control(sp), n, BUF);
        let (mine, other): (Vec<_>, Vec<_>) = self.q.drain().into_iter().partition(|r| r.id == id);
        self.other.extend(other);
        assert_eq!(mine.len(), 1);
        let mut b = vec![
            0u8;
            if dir == Direction::In {
                mine[0].actual
            } else {
                0
            }
        ];
        self.ram.read(BUF, &mut b).unwrap();
        (mine[0].status, b)
    }

    fn configure(&mut self) {
        assert_eq!(self.control(0, 5, 2, 0, &[], 0).0, TransferStatus::Success);
        assert_eq!(self.control(0, 9, 1, 0, &[], 0).0, TransferStatus::Success);
    }

    /// An interrupt IN transfer of 8 bytes at `at`.
    fn report_in(&mut self, at: u64) -> TransferId {
        self.submit(1, Direction::In, TransferKind::Interrupt, 8, at)
    }

    fn done(&mut self) -> Vec<TransferResult> {
        let mut v = std::mem::take(&mut self.other);
        v.extend(self.q.drain());
        v
    }

    fn read(&self, at: u64) -> [u8; 8] {
        let mut b = [0u8; 8];
        self.ram.read(at, &mut b).unwrap();
        b
    }
}

#[test]
fn descriptors_at_each_speed() {
    for (speed, mps0, interval, bcd) in [
        (Speed::Low, 8, 10, 0x0110),
        (Speed::Full, 64, 10, 0x0110),
        (Speed::High, 64, 7, 0x0200),
    ] {
        let mut h = host(speed);
        let (st, dev) = h.control(0x80, 6, 0x0100, 0, &[], 18);
        assert_eq!(st, TransferStatus::Success);
        assert_eq!(dev[7], mps0, "{speed:?}");
        assert_eq!(u16::from_le_bytes([dev[2], dev[3]]), bcd);
        let (_, cfg) = h.control(0x80, 6, 0x0200, 0, &[], 255);
        let c = parse_config(&cfg).unwrap();
        let i = &c.interfaces[0];
        assert_eq!(
            (i.class, i.subclass, i.protocol),
            (3, 1, 1),
            "boot keyboard"
        );
        assert_eq!(
            i.extra[..2],
            [9, 0x21],
            "HID descriptor after the interface"
        );
        assert_eq!(
            u16::from_le_bytes([i.extra[7], i.extra[8]]) as usize,
            REPORT_DESCRIPTOR.len()
        );
        let e = &i.endpoints[0];
        assert_eq!(
            (e.address, e.attributes & 3, e.max_packet_size, e.interval),
            (0x81, 3, 8, interval)
        );
        assert_ne!(c.attributes & 0x20, 0, "remote wakeup");
        let (st, _) = h.control(0x80, 6, 0x0600, 0, &[], 10);
        assert_eq!(
            st == TransferStatus::Success,
            speed == Speed::High,
            "device qualifier only at high speed"
        );
    }
    assert!(Keyboard::new(Speed::Super).is_err());
}

#[test]
fn class_requests() {
    let mut h = host(Speed::Full);
    h.configure();
    let (st, rd) = h.control(0x81, 6, 0x2200, 0, &[], 255);
    assert_eq!(st, TransferStatus::ShortPacket);
    assert_eq!(rd, REPORT_DESCRIPTOR);
    let (_, hid) = h.control(0x81, 6, 0x2100, 0, &[], 9);
    assert_eq!(hid[1], 0x21);
    assert_eq!(
        h.control(0x21, SET_IDLE, 0x7d00, 0, &[], 0).0,
        TransferStatus::Success
    );
    assert_eq!(h.control(0xa1, GET_IDLE, 0, 0, &[], 1).1, [0x7d]);
    assert_eq!(
        h.control(0xa1, GET_PROTOCOL, 0, 0, &[], 1).1,
        [1],
        "report protocol after configuration"
    );
    assert_eq!(
        h.control(0x21, SET_PROTOCOL, 0, 0, &[], 0).0,
        TransferStatus::Success
    );
    assert_eq!(
        h.control(0xa1, GET_PROTOCOL, 0, 0, &[], 1).1,
        [0],
        "boot protocol"
    );
    assert_eq!(
        h.control(0x21, SET_PROTOCOL, 2, 0, &[], 0).0,
        TransferStatus::Stall
    );
    // LEDs: an output report of one byte.
    assert_eq!(
        h.control(0x21, SET_REPORT, 0x0200, 0, &[0x03], 1).0,
        TransferStatus::Success
    );
    assert_eq!(h.kb.leds(), 0x03, "num and caps lock");
    assert_eq!(
        h.control(0x21, SET_REPORT, 0x0100, 0, &[0x03], 1).0,
        TransferStatus::Stall,
        "input report"
    );
    // GET_REPORT: the current state.
    h.kb.key(0x04, true);
    let (_, r) = h.control(0xa1, GET_REPORT, 0x0100, 0, &[], 8);
    assert_eq!(r, [0, 0, 4, 0, 0, 0, 0, 0]);
    // Requests to another interface, or unknown ones, stall.
    assert_eq!(
        h.control(0xa1, GET_IDLE, 0, 1, &[], 1).0,
        TransferStatus::Stall
    );
    assert_eq!(h.control(0xa1, 0x77, 0, 0, &[], 1).0, TransferStatus::Stall);
}

#[test]
fn reports_park_then_come_in_order() {
    let mut h = host(Speed::Full);
    // Not configured: the endpoint does not exist yet.
    h.report_in(0x2000);
    assert_eq!(h.done()[0].status, TransferStatus::Stall);
    h.configure();
    let a = h.report_in(0x2000);
    assert!(h.done().is_empty(), "parked until there is input");
    // Shift + a, release a, release shift: three reports, in order.
    assert!(h.kb.key(0xe1, true));
    let r = h.done();
    assert_eq!((r.len(), r[0].id, r[0].actual), (1, a, 8));
    assert_eq!(h.read(0x2000), [2, 0, 0, 0, 0, 0, 0, 0]);
    h.kb.key(0x04, true);
    h.kb.key(0x04, false);
    h.kb.key(0xe1, false);
    // Repeats and unknown usages change nothing and queue nothing.
    h.kb.key(0x04, false);
    h.kb.key(0x01, true);
    let mut got = Vec::new();
    for i in 0..4u64 {
        h.report_in(0x3000 + 8 * i);
        for r in h.done() {
            assert_eq!(r.status, TransferStatus::Success);
            got.push(h.read(0x3000 + 8 * (r.id.0 - a.0 - 1)));
        }
    }
    assert_eq!(
        got,
        vec![[2, 0, 4, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0], [0; 8]],
        "every event, in order, none merged"
    );
    // Seven keys: the phantom state.
    for k in 4..11 {
        h.kb.key(k, true);
    }
    // The fourth transfer above was left parked: the first key's report.
    assert_eq!(h.done().len(), 1);
    let mut last = [0u8; 8];
    for _ in 0..6 {
        h.report_in(0x4000);
        assert_eq!(h.done().len(), 1);
        last = h.read(0x4000);
    }
    assert_eq!(last, [0, 0, 1, 1, 1, 1, 1, 1], "ErrorRollOver");
}

#[test]
fn a_guest_that_never_reads_cannot_grow_the_queue() {
    let mut h = host(Speed::Full);
    h.configure();
    for i in 0..MAX_QUEUED as u32 * 2 {
        h.kb.key(0x04 + (i % 2) as u8, true);
        h.kb.key(0x04 + (i % 2) as u8, false);
    }
    assert!(h.kb.dropped() > 0);
    assert_eq!(h.dev.lock().queue.len(), MAX_QUEUED);
    // What was queued still reads consistently: the last report before
    // the drops released every key.
    let mut last = [1u8; 8];
    for _ in 0..MAX_QUEUED {
        h.report_in(0x2000);
        h.done();
        last = h.read(0x2000);
    }
    assert_eq!(last, [0; 8]);
}

#[test]
fn cancel_reset_and_deconfigure_give_back_parked_transfers() {
    let mut h = host(Speed::High);
    h.configure();
    let a = h.report_in(0x2000);
    h.dev.cancel(a);
    let r = h.done();
    assert_eq!((r[0].id, r[0].status), (a, TransferStatus::Cancelled));
    h.report_in(0x2000);
    h.dev.reset();
    assert_eq!(h.done()[0].status, TransferStatus::Cancelled);
    h.configure();
    h.report_in(0x2000);
    assert_eq!(h.control(0, 9, 0, 0, &[], 0).0, TransferStatus::Success);
    assert_eq!(h.done()[0].status, TransferStatus::Stall, "deconfigured");
    // Bulk or OUT on the wrong endpoint: stall.
    h.configure();
    h.submit(2, Direction::Out, TransferKind::Interrupt, 8, 0x2000);
    assert_eq!(h.done()[0].status, TransferStatus::Stall);
    assert!(h.dev.is_interrupt_endpoint(0x81));
}

/// Reads the reports of `n` interrupt transfers of `len` bytes.
fn reports(h: &mut Host, n: usize, len: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let id = h.submit(1, Direction::In, TransferKind::Interrupt, 8, 0x5000);
        let r = h.done();
        if r.is_empty() {
            // Parked: nothing to report; take it back.
            h.dev.cancel(id);
            h.done();
            break;
        }
        let mut b = vec![0u8; r[0].actual.min(len)];
        h.ram.read(0x5000, &mut b).unwrap();
        out.push(b);
    }
    out
}

#[test]
fn mouse_descriptors_motion_coalesced_and_clicks_kept() {
    let mut h = host_of(Kind::Mouse, Speed::Full);
    let (_, cfg) = h.control(0x80, 6, 0x0200, 0, &[], 255);
    let c = parse_config(&cfg).unwrap();
    assert_eq!(
        (c.interfaces[0].subclass, c.interfaces[0].protocol),
        (1, 2),
        "boot mouse"
    );
    h.configure();
    let (_, rd) = h.control(0x81, 6, 0x2200, 0, &[], 255);
    assert_eq!(rd, MOUSE_REPORT_DESCRIPTOR);
    // A burst of motion while the guest is not reading: summed.
    for _ in 0..10 {
        h.kb.rel(Axis::X, 5);
        h.kb.rel(Axis::Y, -3);
    }
    assert_eq!(
        reports(&mut h, 2, 4),
        vec![vec![0, 50, (-30i8) as u8, 0]],
        "one coalesced report"
    );
    // More than a report holds: carried over.
    h.kb.rel(Axis::X, 300);
    assert_eq!(
        reports(&mut h, 4, 4),
        vec![vec![0, 127, 0, 0], vec![0, 127, 0, 0], vec![0, 46, 0, 0]]
    );
    // Motion, click, motion, release: the clicks stay, motion before them
    // is reported first.
    h.kb.rel(Axis::X, 1);
    assert!(h.kb.button(Button::Left, true));
    h.kb.rel(Axis::Y, 2);
    assert!(h.kb.button(Button::Left, false));
    h.kb.button(Button::WheelUp, true);
    h.kb.button(Button::WheelUp, false);
    assert_eq!(
        reports(&mut h, 8, 4),
        vec![
            vec![0, 1, 0, 0],
            vec![1, 0, 0, 0],
            vec![1, 0, 2, 0],
            vec![0, 0, 0, 0],
            vec![0, 0, 0, 1]
        ]
    );
    // Boot protocol: three bytes.
    assert_eq!(
        h.control(0x21, SET_PROTOCOL, 0, 0, &[], 0).0,
        TransferStatus::Success
    );
    h.kb.rel(Axis::X, -1);
    assert_eq!(reports(&mut h, 2, 8), vec![vec![0, 0xff, 0]]);
    // Keys mean nothing to a mouse.
    assert!(h.kb.key(0x04, true));
    assert_eq!(h.kb.pending(), 0);
}

#[test]
fn tablet_reports_the_latest_position() {
    let mut h = host_of(Kind::Tablet, Speed::High);
    let (_, cfg) = h.control(0x80, 6, 0x0200, 0, &[], 255);
    let c = parse_config(&cfg).unwrap();
    assert_eq!(
        (c.interfaces[0].subclass, c.interfaces[0].protocol),
        (0, 0),
        "no boot protocol"
    );
    h.configure();
    assert_eq!(
        h.control(0xa1, GET_PROTOCOL, 0, 0, &[], 1).0,
        TransferStatus::Stall
    );
    let (_, rd) = h.control(0x81, 6, 0x2200, 0, &[], 255);
    assert_eq!(rd, TABLET_REPORT_DESCRIPTOR);
    for i in 0..100 {
        h.kb.abs(Axis::X, i * 100);
        h.kb.abs(Axis::Y, 0x7fff - i);
    }
    let r = reports(&mut h, 2, 6);
    assert_eq!(
        r,
        vec![vec![0, 0xac, 0x26, 0x9c, 0x7f, 0]],
        "the last position only: {r:x?}"
    );
    // Out of range: clamped; a click at the current position.
    h.kb.abs(Axis::X, 99999);
    h.kb.abs(Axis::Y, -5);
    h.kb.button(Button::Right, true);
    assert_eq!(
        reports(&mut h, 3, 6),
        vec![vec![0, 0xff, 0x7f, 0, 0, 0], vec![2, 0xff, 0x7f, 0, 0, 0]]
    );
    h.kb.rel(Axis::X, 10);
    assert_eq!(
        reports(&mut h, 1, 6),
        Vec::<Vec<u8>>::new(),
        "relative motion means nothing to a tablet"
    );
}

#[test]
fn a_parked_transfer_gets_the_next_motion_at_once() {
    let mut h = host_of(Kind::Mouse, Speed::Full);
    h.configure();
    h.report_in(0x2000);
    assert!(h.done().is_empty());
    h.kb.rel(Axis::X, 7);
    let r = h.done();
    assert_eq!((r.len(), r[0].actual), (1, 4));
    assert_eq!(h.read(0x2000)[..4], [0, 7, 0, 0]);
}

/// Selective suspend and remote wakeup (USB 2.0 §7.1.7.7, §9.4.5): the
/// feature is advertised (bmAttributes) and reported by GET_STATUS; a key
/// pressed while suspended asks for a resume only if the host enabled it,
/// once, with a wake-up of the controller; the key is reported after the
/// resume, in order; a bus reset forgets the feature.
#[test]
fn remote_wakeup_only_when_enabled_and_suspended() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut h = host(Speed::Full);
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = wakes.clone();
    h.q.set_waker(move || {
        w.fetch_add(1, Ordering::SeqCst);
    });
    h.dev.set_wakeup(h.q.wakeup());
    h.configure();
    let cfg = h.control(0x80, 6, 0x0200, 0, &[], 64).1;
    assert_eq!(cfg[7] & 0x20, 0x20, "bmAttributes offers remote wakeup");
    assert_eq!(h.control(0x80, 0, 0, 0, &[], 2).1, vec![0, 0]);

    // Suspended without remote wakeup enabled: input waits, no request.
    h.dev.suspend(true);
    let before = wakes.load(Ordering::SeqCst);
    assert!(h.kb.key(0x04, true));
    assert!(!h.dev.remote_wakeup());
    assert_eq!(wakes.load(Ordering::SeqCst), before);
    h.dev.suspend(false);
    h.report_in(0x2000);
    assert_eq!(h.done()[0].status, TransferStatus::Success);
    assert_eq!(h.read(0x2000)[2], 0x04);

    // Enabled: GET_STATUS shows it; a key while suspended asks once.
    assert_eq!(h.control(0, 3, 1, 0, &[], 0).0, TransferStatus::Success);
    assert_eq!(h.control(0x80, 0, 0, 0, &[], 2).1, vec![2, 0]);
    h.dev.suspend(true);
    assert!(!h.dev.remote_wakeup(), "nothing happened yet");
    let before = wakes.load(Ordering::SeqCst);
    assert!(h.kb.key(0x04, false));
    assert!(h.kb.key(0x05, true));
    assert_eq!(
        wakes.load(Ordering::SeqCst),
        before + 1,
        "one wake-up per request"
    );
    assert!(h.dev.remote_wakeup());
    assert!(!h.dev.remote_wakeup(), "taken");
    h.dev.suspend(false);
    assert!(!h.dev.remote_wakeup(), "not suspended");
    // Both reports, in order, after the resume.
    let r = reports(&mut h, 2, 8);
    assert_eq!((r[0][2], r[1][2]), (0, 0x05));

    // Input already waiting when the port is suspended asks at once.
    assert!(h.kb.key(0x05, false));
    h.dev.suspend(true);
    assert!(h.dev.remote_wakeup());
    h.dev.suspend(false);
    reports(&mut h, 1, 8);

    // CLEAR_FEATURE and bus reset turn it off.
    assert_eq!(h.control(0, 1, 1, 0, &[], 0).0, TransferStatus::Success);
    assert_eq!(h.control(0x80, 0, 0, 0, &[], 2).1, vec![0, 0]);
    assert_eq!(h.control(0, 3, 1, 0, &[], 0).0, TransferStatus::Success);
    h.dev.reset();
    h.configure();
    assert_eq!(h.control(0x80, 0, 0, 0, &[], 2).1, vec![0, 0]);
    h.dev.suspend(true);
    assert!(h.kb.key(0x06, true));
    assert!(!h.dev.remote_wakeup());
}
