//! Drives [`Hub`] the way a host's hub driver does (Linux `hub_configure`,
//! `hub_activate`, `hub_port_reset`, `hub_event`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::feature::*;
use super::*;
use crate::mem::GuestRam;
use crate::usb::descriptor::{self as desc, parse_config, DeviceDescriptor};
use crate::usb::sleeper::Sleeper;
use crate::usb::{CompletionQueue, Segment, TransferResult};

const CTRL_BUF: u64 = 0x1000;
const INT_BUF: u64 = 0x2000;

/// A downstream device that records what the hub does to it.
#[derive(Debug, Clone)]
struct Fake {
    speed: Speed,
    resets: Arc<AtomicUsize>,
    wakeups: Arc<AtomicUsize>,
    present: Arc<AtomicBool>,
    /// Suspend and remote wakeup, as the controllers' tests see them.
    sleep: Sleeper,
}

impl Fake {
    fn new(speed: Speed) -> Fake {
        Fake {
            speed,
            resets: Arc::default(),
            wakeups: Arc::default(),
            present: Arc::new(AtomicBool::new(true)),
            sleep: Sleeper::new(speed),
        }
    }

    fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
}

impl UsbDevice for Fake {
    fn name(&self) -> String {
        "fake".into()
    }
    fn speed(&self) -> Speed {
        self.speed
    }
    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
    fn submit(&mut self, xfer: Transfer) {
        xfer.complete(TransferStatus::Success, 0);
    }
    fn cancel(&mut self, _id: TransferId) {}
    fn connected(&self) -> bool {
        self.present.load(Ordering::SeqCst)
    }
    fn set_wakeup(&mut self, _wakeup: Wakeup) {
        self.wakeups.fetch_add(1, Ordering::SeqCst);
    }
    fn suspend(&mut self, suspended: bool) {
        self.sleep.suspend(suspended)
    }
    fn remote_wakeup(&mut self) -> bool {
        self.sleep.remote_wakeup()
    }
}

struct Host {
    hub: Hub,
    ram: GuestRam,
    q: CompletionQueue,
    next: u64,
}

fn host(ports: u8) -> Host {
    Host {
        hub: Hub::new(ports),
        ram: GuestRam::anonymous(1 << 20),
        q: CompletionQueue::new(),
        next: 1,
    }
}

/// A configured hub with every port powered, as Linux leaves it after
/// `hub_activate(HUB_INIT)`.
fn powered(ports: u8) -> Host {
    let mut h = host(ports);
    h.configure();
    for p in 1..=ports {
        h.ok_out(0x23, request::SET_FEATURE, PORT_POWER, u16::from(p));
    }
    h
}

impl Host {
    fn submit(&mut self, ep: u8, dir: Direction, kind: TransferKind, len: usize) -> TransferId {
        let id = TransferId(self.next);
        self.next += 1;
        let addr = if ep == 0 { CTRL_BUF } else { INT_BUF };
        let (t, _h) = Transfer::new(
            id,
            ep,
            dir,
            kind,
            vec![Segment::Guest { addr, len }],
            self.ram.clone(),
            vec![],
            self.q.clone(),
        );
        self.hub.submit(t);
        id
    }

    fn one(&mut self, id: TransferId) -> TransferResult {
        let r = self.q.drain();
        assert_eq!(r.len(), 1, "exactly one completion expected: {r:?}");
        assert_eq!(r[0].id, id);
        r[0].clone()
    }

    fn control(&mut self, rt: u8, req: u8, value: u16, index: u16, len: u16) -> TransferResult {
        let setup = SetupPacket {
            request_type: rt,
            request: req,
            value,
            index,
            length: len,
        };
        let dir = setup.direction();
        let id = self.submit(0, dir, TransferKind::Control(setup), usize::from(len));
        self.one(id)
    }

    fn control_in(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        len: u16,
    ) -> (TransferStatus, Vec<u8>) {
        self.ram
            .write(CTRL_BUF, &vec![0xee; usize::from(len)])
            .unwrap();
        let r = self.control(rt, req, value, index, len);
        let mut b = vec![0u8; r.actual];
        self.ram.read(CTRL_BUF, &mut b).unwrap();
        (r.status, b)
    }

    fn out(&mut self, rt: u8, req: u8, value: u16, index: u16) -> TransferStatus {
        self.control(rt, req, value, index, 0).status
    }

    #[track_caller]
    fn ok_out(&mut self, rt: u8, req: u8, value: u16, index: u16) {
        assert_eq!(
            self.out(rt, req, value, index),
            TransferStatus::Success,
            "{rt:02x}/{req} {value} {index:#x}"
        );
    }

    fn configure(&mut self) {
        self.ok_out(0, 5, 2, 0);
        self.ok_out(0, 9, 1, 0);
    }

    /// GET_PORT_STATUS: (wPortStatus, wPortChange).
    #[track_caller]
    fn port_status(&mut self, port: u16) -> (u16, u16) {
        let (st, b) = self.control_in(0xa3, request::GET_STATUS, 0, port, 4);
        assert_eq!((st, b.len()), (TransferStatus::Success, 4));
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        )
    }

    fn clear_change(&mut self, port: u16, feature: u16) {
        self.ok_out(0x23, request::CLEAR_FEATURE, feature, port);
    }

    /// Submits a status change transfer of `len` bytes; returns its id.
    fn poll_status(&mut self, len: usize) -> TransferId {
        self.ram.write(INT_BUF, &[0, 0]).unwrap();
        self.submit(1, Direction::In, TransferKind::Interrupt, len)
    }

    /// The completion of status change transfer `id` and its bitmap.
    #[track_caller]
    fn status_bitmap(&mut self, id: TransferId) -> (TransferStatus, Vec<u8>) {
        let r = self.one(id);
        let mut b = vec![0u8; r.actual];
        self.ram.read(INT_BUF, &mut b).unwrap();
        (r.status, b)
    }
}

#[test]
fn enumerates_as_intel_rate_matching_hub() {
    let mut h = host(DEFAULT_PORTS);
    let (st, d) = h.control_in(0x80, 6, 0x0100, 0, 18);
    assert_eq!(st, TransferStatus::Success);
    let d = DeviceDescriptor::parse(&d).unwrap();
    assert_eq!(
        (d.vendor_id, d.product_id, d.bcd_usb),
        (0x8087, 0x0024, 0x0200)
    );
    assert_eq!(
        (d.device_class, d.device_subclass, d.device_protocol),
        (9, 0, 1)
    );
    assert_eq!((d.max_packet_size0, d.num_configurations), (64, 1));
    assert_eq!(
        (d.manufacturer_index, d.product_index, d.serial_index),
        (0, 0, 0)
    );

    let (st, c) = h.control_in(0x80, 6, 0x0200, 0, 255);
    assert_eq!((st, c.len()), (TransferStatus::ShortPacket, 0x19));
    let c = parse_config(&c).unwrap();
    assert_eq!(
        (c.attributes, c.max_power, c.configuration_value),
        (0xe0, 0, 1)
    );
    let i = &c.interfaces[0];
    assert_eq!(
        (c.interfaces.len(), i.class, i.subclass, i.protocol),
        (1, 9, 0, 0)
    );
    let e = &i.endpoints[0];
    assert_eq!(
        (
            i.endpoints.len(),
            e.address,
            e.attributes,
            e.max_packet_size,
            e.interval
        ),
        (1, 0x81, 3, 1, 12)
    );

    let (st, q) = h.control_in(0x80, 6, 0x0600, 0, 10);
    assert_eq!(st, TransferStatus::Success);
    assert_eq!(q, vec![10, 6, 0, 2, 9, 0, 0, 64, 1, 0]);
    let (st, o) = h.control_in(0x80, 6, 0x0700, 0, 255);
    assert_eq!(st, TransferStatus::ShortPacket);
    assert_eq!(o[1], desc::OTHER_SPEED);
    assert_eq!(
        parse_config(&o).unwrap().interfaces[0].endpoints[0].interval,
        255
    );
    // No strings at all; GET_STATUS(device) says self-powered.
    assert_eq!(
        h.control_in(0x80, 6, 0x0301, 0, 255).0,
        TransferStatus::Stall
    );
    assert_eq!(h.control_in(0x80, 0, 0, 0, 2).1, vec![1, 0]);

    h.configure();
    let (st, hd) = h.control_in(0xa0, request::GET_DESCRIPTOR, 0x2900, 0, 71);
    assert_eq!(st, TransferStatus::ShortPacket);
    assert_eq!(hd, vec![9, 0x29, 4, 0x09, 0x00, 50, 0, 0x00, 0xff]);
    // Linux first asks for the fixed part only.
    let (st, hd) = h.control_in(0xa0, request::GET_DESCRIPTOR, 0x2900, 0, 7);
    assert_eq!((st, hd.len()), (TransferStatus::Success, 7));
    let (st, hs) = h.control_in(0xa0, request::GET_STATUS, 0, 0, 4);
    assert_eq!((st, hs), (TransferStatus::Success, vec![0, 0, 0, 0]));
}

#[test]
fn eight_or_more_ports_widen_the_bitmap_and_the_hub_descriptor() {
    let mut h = host(8);
    assert_eq!(
        h.hub.hub_descriptor(),
        vec![11, 0x29, 8, 0x09, 0, 50, 0, 0, 0, 0xff, 0xff]
    );
    let ep = &h.hub.descriptors().config.interfaces[0].endpoints[0];
    assert_eq!(ep.max_packet_size, 2);
    assert_eq!(Hub::new(0).port_count(), 1);
    assert_eq!(Hub::new(200).port_count(), MAX_PORTS);
    assert_eq!(Hub::default().port_count(), 4);

    h.configure();
    h.ok_out(0x23, request::SET_FEATURE, PORT_POWER, 8);
    h.hub.attach(8, Box::new(Fake::new(Speed::Full))).unwrap();
    let id = h.poll_status(2);
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0, 1]));
}

#[test]
fn unpowered_ports_show_no_connection_until_port_power() {
    let mut h = host(4);
    h.configure();
    h.hub.attach(1, Box::new(Fake::new(Speed::Low))).unwrap();
    h.hub.attach(2, Box::new(Fake::new(Speed::Full))).unwrap();
    h.hub.attach(3, Box::new(Fake::new(Speed::High))).unwrap();
    for p in 1..=4 {
        assert_eq!(h.port_status(p), (0, 0), "port {p} is off");
    }
    for p in 1..=4 {
        h.ok_out(0x23, request::SET_FEATURE, PORT_POWER, p);
    }
    let conn = port_status::POWER | port_status::CONNECTION;
    let c = port_change::C_CONNECTION;
    assert_eq!(h.port_status(1), (conn | port_status::LOW_SPEED, c));
    assert_eq!(h.port_status(2), (conn, c));
    assert_eq!(h.port_status(3), (conn | port_status::HIGH_SPEED, c));
    assert_eq!(h.port_status(4), (port_status::POWER, 0));
    assert!(!h.hub.port_enabled(2));
    assert!(h.hub.port_device(2).is_none(), "not enabled yet");

    h.clear_change(2, C_PORT_CONNECTION);
    assert_eq!(h.port_status(2), (conn, 0));
    // Power off: the device is reset (lost VBUS) and the port is blank.
    h.ok_out(0x23, request::CLEAR_FEATURE, PORT_POWER, 2);
    assert_eq!(h.port_status(2), (0, 0));
}

#[test]
fn port_reset_enables_the_port_resets_the_device_and_sets_c_reset() {
    let mut h = powered(4);
    let f = Fake::new(Speed::Full);
    h.hub.attach(2, Box::new(f.clone())).unwrap();
    h.clear_change(2, C_PORT_CONNECTION);

    h.ok_out(0x23, request::SET_FEATURE, PORT_RESET, 2);
    assert_eq!(f.resets(), 1);
    let on = port_status::POWER | port_status::CONNECTION | port_status::ENABLE;
    assert_eq!(h.port_status(2), (on, port_change::C_RESET));
    assert!(h.hub.port_enabled(2));
    assert_eq!(h.hub.port_device(2).map(|d| d.speed()), Some(Speed::Full));
    h.clear_change(2, C_PORT_RESET);
    assert_eq!(h.port_status(2), (on, 0));

    // Reset of an empty powered port completes without enabling it; of an
    // unpowered port, it is ignored.
    h.ok_out(0x23, request::SET_FEATURE, PORT_RESET, 3);
    assert_eq!(h.port_status(3), (port_status::POWER, port_change::C_RESET));
    h.ok_out(0x23, request::CLEAR_FEATURE, PORT_POWER, 4);
    h.ok_out(0x23, request::SET_FEATURE, PORT_RESET, 4);
    assert_eq!(h.port_status(4), (0, 0));

    // Disabling hides the device from the host but not from bookkeeping.
    h.ok_out(0x23, request::CLEAR_FEATURE, PORT_ENABLE, 2);
    assert_eq!(h.port_status(2), (on & !port_status::ENABLE, 0));
    assert!(h.hub.port_device(2).is_none());
    assert!(h.hub.attached_device(2).is_some());

    // Power-off resets the device again.
    h.ok_out(0x23, request::CLEAR_FEATURE, PORT_POWER, 2);
    assert_eq!(f.resets(), 2);
}

#[test]
fn suspend_hides_the_device_and_resume_sets_c_suspend() {
    let mut h = powered(4);
    h.hub.attach(1, Box::new(Fake::new(Speed::Low))).unwrap();
    h.ok_out(0x23, request::SET_FEATURE, PORT_RESET, 1);
    h.clear_change(1, C_PORT_CONNECTION);
    h.clear_change(1, C_PORT_RESET);

    h.ok_out(0x23, request::SET_FEATURE, PORT_SUSPEND, 1);
    let (st, ch) = h.port_status(1);
    assert_ne!(st & port_status::SUSPEND, 0);
    assert_eq!(ch, 0);
    assert!(h.hub.port_enabled(1));
    assert!(
        h.hub.port_device(1).is_none(),
        "no traffic through a suspended port"
    );

    h.ok_out(0x23, request::CLEAR_FEATURE, PORT_SUSPEND, 1);
    let (st, ch) = h.port_status(1);
    assert_eq!((st & port_status::SUSPEND, ch), (0, port_change::C_SUSPEND));
    assert!(h.hub.port_device(1).is_some());
    let id = h.poll_status(1);
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0b10]));

    // Suspending a disabled port does nothing.
    h.ok_out(0x23, request::SET_FEATURE, PORT_SUSPEND, 2);
    assert_eq!(h.port_status(2), (port_status::POWER, 0));
}

/// Remote wakeup through the hub (USB 2.0 §11.9): the device hears of
/// its port's suspend and resume; its resume signal on a suspended port
/// resumes the port (C_PORT_SUSPEND on the status change endpoint); a
/// suspended hub passes it upstream only with its own remote wakeup
/// enabled, once.
#[test]
fn downstream_remote_wakeup_resumes_the_port_and_wakes_a_suspended_hub() {
    let mut h = powered(4);
    let dev = Fake::new(Speed::Full);
    h.hub.attach(2, Box::new(dev.clone())).unwrap();
    h.ok_out(0x23, request::SET_FEATURE, PORT_RESET, 2);
    h.clear_change(2, C_PORT_CONNECTION);
    h.clear_change(2, C_PORT_RESET);

    // Not suspended: a request is not a resume.
    dev.sleep.signal_wakeup();
    h.hub.poll_connections();
    assert_eq!(h.port_status(2).1, 0);
    dev.sleep.state.lock().unwrap().wake = false;

    h.ok_out(0x23, request::SET_FEATURE, PORT_SUSPEND, 2);
    h.ok_out(0x23, request::SET_FEATURE, PORT_SUSPEND, 2);
    assert_eq!(dev.sleep.suspends(), vec![true], "told once");
    let id = h.poll_status(1);
    assert!(h.q.is_empty());
    dev.sleep.signal_wakeup();
    h.hub.poll_connections();
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0b100]));
    let (st, ch) = h.port_status(2);
    assert_eq!((st & port_status::SUSPEND, ch), (0, port_change::C_SUSPEND));
    assert_eq!(dev.sleep.suspends(), vec![true, false]);
    assert!(!h.hub.remote_wakeup(), "the hub itself is not suspended");
    h.clear_change(2, C_PORT_SUSPEND);

    // The hub suspended too, remote wakeup not enabled: the port resumes
    // but the hub stays quiet.
    h.ok_out(0x23, request::SET_FEATURE, PORT_SUSPEND, 2);
    h.hub.suspend(true);
    dev.sleep.signal_wakeup();
    h.hub.poll_connections();
    assert!(!h.hub.remote_wakeup());
    h.hub.suspend(false);
    h.clear_change(2, C_PORT_SUSPEND);

    // Enabled: the hub signals once.
    h.ok_out(
        0,
        request::SET_FEATURE,
        crate::usb::request::FEATURE_DEVICE_REMOTE_WAKEUP,
        0,
    );
    let (st, b) = h.control_in(0x80, request::GET_STATUS, 0, 0, 2);
    assert_eq!((st, b[0] & 2), (TransferStatus::Success, 2));
    h.ok_out(0x23, request::SET_FEATURE, PORT_SUSPEND, 2);
    h.hub.suspend(true);
    assert!(!h.hub.remote_wakeup(), "nothing yet");
    dev.sleep.signal_wakeup();
    h.hub.poll_connections();
    assert!(h.hub.remote_wakeup());
    assert!(!h.hub.remote_wakeup(), "taken");
    h.hub.suspend(false);
    assert_eq!(h.port_status(2).1, port_change::C_SUSPEND);
    // A device plugged in or out of a suspended hub wakes it as well (a
    // hot-plug behind an autosuspended hub).
    h.hub.suspend(true);
    h.hub.attach(3, Box::new(Fake::new(Speed::Full))).unwrap();
    assert!(h.hub.remote_wakeup());
    h.hub.suspend(false);
    h.hub.suspend(true);
    assert!(h.hub.detach(3).is_some());
    assert!(h.hub.remote_wakeup());
    h.hub.reset();
    assert!(!h.hub.remote_wakeup(), "reset: no longer suspended");
}

#[test]
fn status_change_transfer_parks_until_a_change_and_reports_the_bitmap() {
    let mut h = powered(4);
    let id = h.poll_status(1);
    assert!(h.q.is_empty(), "no change yet: parked");

    h.hub.attach(3, Box::new(Fake::new(Speed::Full))).unwrap();
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0b1000]));

    // Still set: reported again at once, as a real hub does.
    let id = h.poll_status(1);
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0b1000]));

    h.clear_change(3, C_PORT_CONNECTION);
    let id = h.poll_status(1);
    assert!(h.q.is_empty());

    // Two ports change at once.
    h.hub.attach(1, Box::new(Fake::new(Speed::Full))).unwrap();
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0b0010]));
    assert!(h.hub.detach(3).is_some());
    let id = h.poll_status(1);
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0b1010]));
    assert_eq!(
        h.port_status(3),
        (port_status::POWER, port_change::C_CONNECTION)
    );

    // A longer buffer ends short; none of zero length fits.
    let id = h.poll_status(2);
    assert_eq!(
        h.status_bitmap(id),
        (TransferStatus::ShortPacket, vec![0b1010])
    );
    let id = h.poll_status(0);
    assert_eq!(h.one(id).status, TransferStatus::Babble);
}

#[test]
fn change_made_before_the_transfer_is_reported_at_once() {
    let mut h = powered(4);
    h.hub.attach(4, Box::new(Fake::new(Speed::High))).unwrap();
    let id = h.poll_status(1);
    assert_eq!(
        h.status_bitmap(id),
        (TransferStatus::Success, vec![0b10000])
    );
}

#[test]
fn status_endpoint_stalls_when_unconfigured_or_halted() {
    let mut h = host(4);
    let id = h.poll_status(1);
    assert_eq!(h.one(id).status, TransferStatus::Stall, "unconfigured");
    h.configure();
    let parked = h.poll_status(1);
    assert!(h.q.is_empty());
    // SET_FEATURE(ENDPOINT_HALT): the parked transfer stalls, so do new ones.
    let c = h.control_raw(0x02, 3, 0, 0x81);
    assert_eq!(
        h.completions(),
        vec![
            (c, TransferStatus::Success),
            (parked, TransferStatus::Stall)
        ]
    );
    let id = h.poll_status(1);
    assert_eq!(h.one(id).status, TransferStatus::Stall);
    h.ok_out(0x02, 1, 0, 0x81);
    let id = h.poll_status(1);
    assert!(h.q.is_empty());
    // SET_CONFIGURATION(0): parked transfers stall, ports power off.
    h.ok_out(0x23, request::SET_FEATURE, PORT_POWER, 1);
    let f = Fake::new(Speed::Full);
    h.hub.attach(1, Box::new(f.clone())).unwrap();
    assert_eq!(h.one(id).status, TransferStatus::Success);
    let id = h.poll_status(1);
    assert_eq!(h.one(id).status, TransferStatus::Success);
    h.clear_change(1, C_PORT_CONNECTION);
    let id = h.poll_status(1);
    let c = h.control_raw(0, 9, 0, 0);
    assert_eq!(
        h.completions(),
        vec![(c, TransferStatus::Success), (id, TransferStatus::Stall)]
    );
    assert_eq!(h.port_status(1), (0, 0));
    assert_eq!(f.resets(), 1, "lost power");
}

impl Host {
    /// Submits a no-data control request without collecting its completion.
    fn control_raw(&mut self, rt: u8, req: u8, value: u16, index: u16) -> TransferId {
        let setup = SetupPacket {
            request_type: rt,
            request: req,
            value,
            index,
            length: 0,
        };
        self.submit(0, Direction::Out, TransferKind::Control(setup), 0)
    }

    /// Everything completed so far, in order.
    fn completions(&mut self) -> Vec<(TransferId, TransferStatus)> {
        self.q.drain().iter().map(|r| (r.id, r.status)).collect()
    }
}

#[test]
fn tt_requests_succeed_like_a_single_tt_hub() {
    let mut h = powered(4);
    // CLEAR_TT_BUFFER: wValue dev addr 5, ep 1, bulk, IN; TT port 1.
    let v = 1 | 5 << 4 | 2 << 11 | 1 << 15;
    h.ok_out(0x23, request::CLEAR_TT_BUFFER, v, 1);
    h.ok_out(0x23, request::RESET_TT, 0, 1);
    // GET_TT_STATE needs a stopped TT.
    assert_eq!(
        h.control_in(0xa3, request::GET_TT_STATE, 0, 1, 16).0,
        TransferStatus::Stall
    );
    h.ok_out(0x23, request::STOP_TT, 0, 1);
    assert_eq!(
        h.control_in(0xa3, request::GET_TT_STATE, 0, 1, 16),
        (TransferStatus::ShortPacket, vec![])
    );
    h.ok_out(0x23, request::RESET_TT, 0, 1);
    assert_eq!(
        h.control_in(0xa3, request::GET_TT_STATE, 0, 1, 16).0,
        TransferStatus::Stall
    );
    // TT port outside the hub.
    assert_eq!(
        h.out(0x23, request::CLEAR_TT_BUFFER, v, 0),
        TransferStatus::Stall
    );
    assert_eq!(h.out(0x23, request::RESET_TT, 0, 5), TransferStatus::Stall);
}

#[test]
fn bad_requests_stall() {
    let mut h = powered(4);
    let stalls: &[(u8, u8, u16, u16, u16)] = &[
        // Port numbers out of range.
        (0xa3, request::GET_STATUS, 0, 0, 4),
        (0xa3, request::GET_STATUS, 0, 5, 4),
        (0x23, request::SET_FEATURE, PORT_POWER, 0, 0),
        (0x23, request::SET_FEATURE, PORT_RESET, 5, 0),
        (0x23, request::CLEAR_FEATURE, C_PORT_CONNECTION, 0xff, 0),
        // Features that cannot be set or cleared.
        (0x23, request::SET_FEATURE, PORT_ENABLE, 1, 0),
        (0x23, request::SET_FEATURE, C_PORT_RESET, 1, 0),
        (0x23, request::SET_FEATURE, 99, 1, 0),
        (0x23, request::CLEAR_FEATURE, PORT_RESET, 1, 0),
        (0x23, request::CLEAR_FEATURE, PORT_CONNECTION, 1, 0),
        (0x23, request::CLEAR_FEATURE, PORT_TEST, 1, 0),
        (0x23, request::SET_FEATURE, PORT_TEST, 6 << 8 | 1, 0),
        (0x23, request::SET_FEATURE, PORT_INDICATOR, 4 << 8 | 1, 0),
        // Hub features.
        (0x20, request::SET_FEATURE, C_HUB_LOCAL_POWER, 0, 0),
        (0x20, request::CLEAR_FEATURE, 2, 0, 0),
        // Descriptors.
        (0xa0, request::GET_DESCRIPTOR, 0x2200, 0, 64),
        (0x20, request::SET_DESCRIPTOR, 0x2900, 0, 0),
        (0x80, 6, 0x2900, 0, 64),
        // Unknown class and vendor requests.
        (0xa3, 0x42, 0, 1, 4),
        (0x40, 0x01, 0, 0, 0),
        (0xc0, 0x01, 0, 0, 8),
    ];
    for &(rt, req, value, index, len) in stalls {
        let r = h.control(rt, req, value, index, len);
        assert_eq!(
            r.status,
            TransferStatus::Stall,
            "{rt:02x}/{req} {value:#x} {index:#x}"
        );
    }
    // Bulk, or another endpoint: stall.
    let id = h.submit(2, Direction::Out, TransferKind::Bulk, 4);
    assert_eq!(h.one(id).status, TransferStatus::Stall);
    let id = h.submit(1, Direction::Out, TransferKind::Interrupt, 1);
    assert_eq!(h.one(id).status, TransferStatus::Stall);
    // Valid ones still work after all that.
    h.ok_out(0x23, request::SET_FEATURE, PORT_INDICATOR, 2 << 8 | 1);
    assert_ne!(h.port_status(1).0 & port_status::INDICATOR, 0);
    h.ok_out(0x23, request::CLEAR_FEATURE, PORT_INDICATOR, 1);
    assert_eq!(h.port_status(1).0 & port_status::INDICATOR, 0);
    h.ok_out(0x23, request::SET_FEATURE, PORT_TEST, 4 << 8 | 2);
    assert_ne!(h.port_status(2).0 & port_status::TEST, 0);
    h.ok_out(0x20, request::CLEAR_FEATURE, C_HUB_OVER_CURRENT, 0);
}

#[test]
fn random_setup_packets_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut h = powered(4);
    h.hub.attach(2, Box::new(Fake::new(Speed::Full))).unwrap();
    for _ in 0..5000 {
        let rt = [0x20, 0x23, 0xa0, 0xa3, 0x00, 0x80, 0x02, 0x21][rng.gen_range(0..8)];
        let req = rng.gen_range(0..16);
        let value = if rng.gen() {
            rng.gen_range(0..24)
        } else {
            rng.gen()
        };
        let index = if rng.gen() {
            rng.gen_range(0..8)
        } else {
            rng.gen()
        };
        let len = rng.gen_range(0..64);
        let r = h.control(rt, req, value, index, len);
        assert!(r.actual <= usize::from(len));
    }
}

#[test]
fn attach_refuses_superspeed_occupied_and_missing_ports() {
    let mut h = host(4);
    assert_eq!(
        h.hub.attach(1, Box::new(Fake::new(Speed::Super))),
        Err(HubError::SuperSpeed)
    );
    assert_eq!(
        h.hub.attach(0, Box::new(Fake::new(Speed::Full))),
        Err(HubError::NoSuchPort(0))
    );
    assert_eq!(
        h.hub.attach(5, Box::new(Fake::new(Speed::Full))),
        Err(HubError::NoSuchPort(5))
    );
    h.hub.attach(4, Box::new(Fake::new(Speed::Full))).unwrap();
    assert_eq!(
        h.hub.attach(4, Box::new(Fake::new(Speed::Low))),
        Err(HubError::PortOccupied(4))
    );
    assert!(h.hub.detach(3).is_none());
    assert!(h.hub.detach(9).is_none());
    assert!(h.hub.detach(4).is_some());
    assert!(h.hub.detach(4).is_none());
}

#[test]
fn poll_connections_follows_devices_that_vanish_and_return() {
    let mut h = powered(4);
    let f = Fake::new(Speed::Full);
    h.hub.attach(2, Box::new(f.clone())).unwrap();
    h.ok_out(0x23, request::SET_FEATURE, PORT_RESET, 2);
    h.clear_change(2, C_PORT_CONNECTION);
    h.clear_change(2, C_PORT_RESET);
    let id = h.poll_status(1);
    assert!(h.q.is_empty());

    f.present.store(false, Ordering::SeqCst);
    assert!(h.hub.port_device(2).is_none(), "gone before any poll");
    HubPorts::poll_connections(&mut h.hub);
    assert_eq!(h.status_bitmap(id), (TransferStatus::Success, vec![0b100]));
    assert_eq!(
        h.port_status(2),
        (port_status::POWER, port_change::C_CONNECTION)
    );
    assert!(h.hub.port_device(2).is_none());
    h.clear_change(2, C_PORT_CONNECTION);

    f.present.store(true, Ordering::SeqCst);
    h.hub.poll_connections();
    let conn = port_status::POWER | port_status::CONNECTION;
    assert_eq!(h.port_status(2), (conn, port_change::C_CONNECTION));
}

#[test]
fn nested_hubs_poll_through_and_route_through_enabled_ports() {
    let ram = GuestRam::anonymous(0x10000);
    let q = CompletionQueue::new();
    // SetPortFeature sent to `dev` the way the controller would.
    let set_port = |dev: &mut dyn UsbDevice, port: u16, feature: u16| {
        let setup = SetupPacket {
            request_type: 0x23,
            request: request::SET_FEATURE,
            value: feature,
            index: port,
            length: 0,
        };
        let (t, _) = Transfer::new(
            TransferId(1),
            0,
            Direction::Out,
            TransferKind::Control(setup),
            vec![],
            ram.clone(),
            vec![],
            q.clone(),
        );
        dev.submit(t);
        assert_eq!(q.drain()[0].status, TransferStatus::Success);
    };
    let mut top = Hub::new(2);
    top.attach(2, Box::new(Hub::new(2))).unwrap();
    set_port(&mut top, 2, PORT_POWER);
    set_port(&mut top, 2, PORT_RESET);
    let f = Fake::new(Speed::Low);
    let inner = top.port_device(2).unwrap();
    set_port(inner, 1, PORT_POWER);
    let below = inner.as_hub().unwrap();
    assert_eq!(below.port_count(), 2);
    assert!(below.port_device(1).is_none(), "empty");

    // A device plugged in below shows up through both hubs.
    let inner = top.attached_device(2).unwrap();
    set_port(inner, 1, PORT_RESET);
    assert!(
        inner.as_hub().unwrap().port_device(1).is_none(),
        "still empty"
    );
    let mut hub = Hub::new(2);
    hub.attach(1, Box::new(f.clone())).unwrap();
    top.detach(2).unwrap();
    top.attach(2, Box::new(hub)).unwrap();
    set_port(&mut top, 2, PORT_RESET);
    let inner = top.port_device(2).unwrap();
    set_port(inner, 1, PORT_POWER);
    set_port(inner, 1, PORT_RESET);
    let below = inner.as_hub().unwrap();
    assert_eq!(below.port_device(1).map(|d| d.speed()), Some(Speed::Low));

    // The top hub polls the one below.
    f.present.store(false, Ordering::SeqCst);
    top.poll_connections();
    let below = top.port_device(2).and_then(|d| d.as_hub()).unwrap();
    assert!(below.port_device(1).is_none());
    assert!(!below.port_enabled(1));
    let mut plain = Fake::new(Speed::Full);
    assert!(plain.as_hub().is_none());
}

#[test]
fn wakeup_reaches_devices_attached_before_and_after() {
    let mut h = host(4);
    let before = Fake::new(Speed::Full);
    let after = Fake::new(Speed::Full);
    h.hub.attach(1, Box::new(before.clone())).unwrap();
    assert_eq!(before.wakeups.load(Ordering::SeqCst), 0);
    h.hub.set_wakeup(h.q.wakeup());
    h.hub.attach(2, Box::new(after.clone())).unwrap();
    assert_eq!(before.wakeups.load(Ordering::SeqCst), 1);
    assert_eq!(after.wakeups.load(Ordering::SeqCst), 1);
}

#[test]
fn reset_and_cancel_complete_parked_transfers() {
    let mut h = powered(4);
    let f = Fake::new(Speed::Full);
    h.hub.attach(1, Box::new(f.clone())).unwrap();
    h.clear_change(1, C_PORT_CONNECTION);
    let id = h.poll_status(1);
    h.hub.cancel(id);
    assert_eq!(h.one(id).status, TransferStatus::Cancelled);
    h.hub.cancel(id);
    assert!(h.q.is_empty(), "cancelling twice is harmless");

    let id = h.poll_status(1);
    h.hub.reset();
    assert_eq!(h.one(id).status, TransferStatus::Cancelled);
    assert_eq!(f.resets(), 1, "ports lost power");
    assert_eq!(h.hub.port_status(1), Some((0, 0)));
    assert!(!h.hub.port_enabled(1));
    // After the reset the hub is unconfigured again.
    let id = h.poll_status(1);
    assert_eq!(h.one(id).status, TransferStatus::Stall);
}

#[test]
fn full_speed_storage_enumerates_behind_the_hub() {
    use crate::storage::UsbStorage;
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let stick = UsbStorage::open(img.path(), true, Speed::Full).unwrap();
    let mut h = powered(4);
    h.hub.attach(3, Box::new(stick)).unwrap();
    h.ok_out(0x23, request::SET_FEATURE, PORT_RESET, 3);
    let (st, _) = h.port_status(3);
    assert_eq!(
        st & (port_status::LOW_SPEED | port_status::HIGH_SPEED),
        0,
        "full speed"
    );

    // The controller routes a split GET_DESCRIPTOR to the device.
    let dev = h.hub.port_device(3).unwrap();
    let setup = SetupPacket {
        request_type: 0x80,
        request: 6,
        value: 0x0200,
        index: 0,
        length: 255,
    };
    let (t, _) = Transfer::new(
        TransferId(99),
        0,
        Direction::In,
        TransferKind::Control(setup),
        vec![Segment::Guest {
            addr: CTRL_BUF,
            len: 255,
        }],
        h.ram.clone(),
        vec![],
        h.q.clone(),
    );
    dev.submit(t);
    let r = h.one(TransferId(99));
    let mut c = vec![0u8; r.actual];
    h.ram.read(CTRL_BUF, &mut c).unwrap();
    let c = parse_config(&c).unwrap();
    assert!(c.interfaces[0]
        .endpoints
        .iter()
        .all(|e| e.max_packet_size == 64));
}
