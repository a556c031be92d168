//! Hostile schedules for our UHCI (the UHCI rows of the bad-input
//! catalogue): circular TD and QH lists of every shape (depth loops,
//! breadth loops, QHs pointing at themselves: the OHCI CVE-2020-25625
//! class), TD buffers in unmapped memory, maximum lengths 0x7fe/0x7ff and
//! larger than the device's packets, the frame list moved and FRNUM
//! written while running, reserved PIDs, unmapped schedule memory. Nothing
//! may hang, panic or leak; work per access stays bounded; the controller
//! answers as hardware would (stalled TD, process error, Host System Error).

mod uhci_common;

use std::io::Write;
use std::time::Duration;

use hcd_emul::uhci::limits;
use hcd_emul::uhci::regs::*;
use hcd_emul::usb::Speed;
use hcd_emul::UsbStorage;
use uhci_common::*;

const BUF: u32 = DATA_BASE as u32;

fn stick() -> Box<UsbStorage> {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    Box::new(UsbStorage::from_file(f, false, Speed::Full).unwrap())
}

/// A running controller with a full-speed stick addressed as 1 on port 1,
/// configured, and its ep0 queue.
fn bed() -> (Driver, Queue) {
    let mut d = Driver::new();
    d.pci.controller_mut().attach(stick()).unwrap();
    d.start();
    d.reset_port(1);
    let skel = d.skel_fs_ctrl;
    let mut ep0 = d.make_queue(skel, 0, 0, 64, false);
    assert!(!d.control(&mut ep0, setup(0, 5, 1, 0, 0), None).1);
    d.unlink(&ep0);
    let mut ep0 = d.make_queue(skel, 1, 0, 64, false);
    assert!(!d.control(&mut ep0, setup(0, 9, 1, 0, 0), None).1);
    (d, ep0)
}

/// Guest-memory operations of one access or wake-up.
fn cost(d: &mut Driver, f: impl FnOnce(&mut Driver)) -> u64 {
    let before = d.ram.ops();
    f(d);
    d.ram.ops() - before
}

/// The budget plus one transfer's worth of TDs, with room for the frame
/// list read and write-backs.
const BOUND: u64 = limits::WORK_PER_ACCESS + 3 * limits::TDS_PER_TRANSFER as u64 + 64;

fn td(d: &mut Driver, link: u32, ctrl: u32, token: u32, buf: u32) -> u32 {
    let a = d.alloc(16, 16);
    d.wr(a, link);
    d.wr(a + 8, token);
    d.wr(a + 12, buf);
    d.wr(a + 4, ctrl);
    a
}

fn out_token(addr: u8, ep: u8, len: u32) -> u32 {
    explen(len) | (u32::from(ep) << 15) | (u32::from(addr) << 8) | u32::from(PID_OUT)
}

/// Walks a while; the controller must stay responsive and bounded.
fn spin(d: &mut Driver, ms: u64) -> u64 {
    let mut worst = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(ms) {
        worst = worst.max(cost(d, |d| d.pci.process()));
        std::thread::sleep(Duration::from_micros(200));
    }
    worst
}

#[test]
fn circular_td_lists_are_bounded() {
    let (mut d, _ep0) = bed();
    let bulk = d.skel_bulk;
    let q = d.make_queue(bulk, 1, 2, 64, false);
    // Active OUT TDs of whole packets without IOC whose links loop: the
    // merge must stop at the loop; the queue runs on forever but each
    // access and wake-up is bounded.
    let act = (3 << 27) | TD_ACTIVE;
    let a = td(&mut d, 0, act, out_token(1, 2, 64), BUF);
    let b = td(&mut d, a, act, out_token(1, 2, 64), BUF + 64);
    d.wr(a, b);
    d.wr(q.qh + 4, a);
    // A depth-first self loop at a frame head (outside any QH).
    let c = td(&mut d, 0, act | TD_IOS, out_token(1, 2, 0), BUF);
    d.wr(c, c | LINK_VF);
    let fl = d.frame_list;
    let old = d.rd(fl);
    d.wr(c, old);
    let selfloop = td(&mut d, 0, 0, out_token(1, 2, 0), BUF);
    d.wr(selfloop, selfloop | LINK_VF);
    d.wr(fl + 4, selfloop);
    let worst = spin(&mut d, 200);
    assert!(worst <= BOUND, "work per wake-up {worst} > {BOUND}");
    assert!(!d.pci.controller().halted(), "loops are no error");
    let st = d.pci.controller().stats();
    assert!(st.transfers > 2, "the looping queue kept moving: {st:?}");
}

#[test]
fn circular_qh_lists_of_every_shape_are_bounded() {
    let (mut d, mut ep0) = bed();
    let fl = d.frame_list;
    // A QH whose horizontal link is itself.
    let h = d.alloc(16, 16);
    d.wr(h, h | LINK_Q);
    d.wr(h + 4, LINK_T);
    // A QH whose element is itself (a vertical loop).
    let v = d.alloc(16, 16);
    d.wr(v, d.skel_int8 | LINK_Q);
    d.wr(v + 4, v | LINK_Q);
    // Two QHs pointing at each other both ways.
    let x = d.alloc(16, 16);
    let y = d.alloc(16, 16);
    d.wr(x, y | LINK_Q);
    d.wr(x + 4, y | LINK_Q);
    d.wr(y, x | LINK_Q);
    d.wr(y + 4, x | LINK_Q);
    // A long chain of 3000 distinct QHs ending in the skeleton.
    let mut next = d.skel_int1 | LINK_Q;
    for _ in 0..3000 {
        let q = d.alloc(16, 16);
        d.wr(q, next);
        d.wr(q + 4, LINK_T);
        next = q | LINK_Q;
    }
    for (f, l) in [(1u32, h), (2, v), (3, x), (5, next & LINK_ADDR)] {
        d.wr(fl + 4 * f, l | LINK_Q);
    }
    let worst = spin(&mut d, 100);
    assert!(worst <= BOUND, "work per wake-up {worst} > {BOUND}");
    // The legitimate queue still works within the mess (the skeleton is
    // reached from the other frames).
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev[1], 1);
}

#[test]
fn bad_buffers_lengths_and_pids() {
    let (mut d, mut ep0) = bed();
    // GET_DESCRIPTOR whose data stage is in unmapped memory: the
    // transfer fails, the controller goes on.
    let (_, stalled) = d.control(
        &mut ep0,
        setup(0x80, 6, 0x0100, 0, 18),
        Some((0xf000_0000, 18)),
    );
    let _ = stalled;
    assert!(!d.pci.controller().halted());
    // Maximum length 0x7ff is a zero-length packet.
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev.len(), 18);
    // A bulk OUT TD longer than the device's 64-byte packets (1023):
    // one transaction to the device, no overrun.
    let bulk = d.skel_bulk;
    let mut q = d.make_queue(bulk, 1, 2, 1023, false);
    let (r, _) = d.bulk(&mut q, PID_OUT, BUF, 31);
    assert!(
        !r.stalled(),
        "a 31-byte packet in a 1023-byte TD is fine: {:x?}",
        r.status
    );
    // 0x7fe: illegal length: Host Controller Process Error, halted.
    let t = td(
        &mut d,
        LINK_T,
        (3 << 27) | TD_ACTIVE,
        (0x7fe << TOK_MAXLEN_SHIFT) | (1 << 8) | u32::from(PID_IN),
        BUF,
    );
    let q2 = d.make_queue(bulk, 1, 1, 64, false);
    d.wr(q2.qh + 4, t);
    assert!(
        d.run_until(|d| d.r16(REG_USBSTS) & STS_HCPE != 0),
        "process error"
    );
    assert_ne!(d.r16(REG_USBSTS) & STS_HCH, 0, "halted");
    assert!(d.irq.lock().unwrap().intx, "HCPE interrupts");
    // RS refused until the error is acknowledged.
    d.w16(REG_USBCMD, CMD_RS | CMD_CF);
    assert_ne!(d.r16(REG_USBSTS) & STS_HCH, 0);
    d.wr(q2.qh + 4, LINK_T);
    d.w16(REG_USBSTS, STS_HCPE);
    d.w16(REG_USBCMD, CMD_RS | CMD_CF);
    assert_eq!(d.r16(REG_USBSTS) & STS_HCH, 0, "runs again");
    // A reserved PID: the same.
    let t = td(
        &mut d,
        LINK_T,
        (3 << 27) | TD_ACTIVE,
        explen(8) | (1 << 8) | 0xa5,
        BUF,
    );
    d.wr(q2.qh + 4, t);
    assert!(
        d.run_until(|d| d.r16(REG_USBSTS) & STS_HCPE != 0),
        "reserved PID"
    );
    d.wr(q2.qh + 4, LINK_T);
    d.w16(REG_USBSTS, 0x3f);
    d.w16(REG_USBCMD, CMD_RS | CMD_CF);
    // A TD to an address nobody has: CRC/time-out, error counter out.
    let t = td(
        &mut d,
        LINK_T,
        (3 << 27) | TD_ACTIVE | TD_IOC,
        out_token(9, 1, 8),
        BUF,
    );
    d.wr(q2.qh + 4, t);
    assert!(d.run_until(|d| d.rd(t + 4) & TD_ACTIVE == 0));
    let st = d.rd(t + 4);
    assert_eq!(
        st & (TD_STALLED | TD_CRCTIMEO | TD_CERR),
        TD_STALLED | TD_CRCTIMEO,
        "{st:#x}"
    );
    assert_eq!(d.rd(q2.qh + 4), t, "the element stays on the failed TD");
    assert_ne!(d.r16(REG_USBSTS) & STS_ERROR, 0, "USBERRINT");
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev.len(), 18, "still working");
}

#[test]
fn frame_list_moved_and_frnum_written_while_running() {
    let (mut d, mut ep0) = bed();
    // FRNUM writes while running are ignored.
    let f = d.r16(REG_FRNUM);
    d.w16(REG_FRNUM, f.wrapping_add(500) & 0x7ff);
    let g = d.r16(REG_FRNUM);
    assert!(g.wrapping_sub(f) & 0x7ff < 100, "{f} -> {g}");
    // A new frame list (a copy of the old) while running.
    let fl2 = d.alloc(4096, 4096);
    for i in 0..1024 {
        let e = d.rd(d.frame_list + 4 * i);
        d.wr(fl2 + 4 * i, e);
    }
    d.w32(REG_FLBASEADD, fl2);
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev[1], 1);
    // One that is all terminate bits: nothing runs, nothing breaks.
    let empty = d.alloc(4096, 4096);
    for i in 0..1024 {
        d.wr(empty + 4 * i, LINK_T);
    }
    d.w32(REG_FLBASEADD, empty);
    spin(&mut d, 20);
    assert!(!d.pci.controller().halted());
    d.w32(REG_FLBASEADD, fl2);
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev[1], 1);
}

#[test]
fn unmapped_schedule_memory_is_a_host_system_error() {
    let (mut d, _ep0) = bed();
    d.w32(REG_FLBASEADD, 0xf000_0000);
    d.pci.process();
    assert_eq!(d.r16(REG_USBSTS) & STS_HSE, 0, "not at the first miss");
    let t0 = std::time::Instant::now();
    d.timeout = limits::FAULT_GRACE * 10;
    assert!(d.run_until(|d| d.r16(REG_USBSTS) & STS_HSE != 0));
    assert!(t0.elapsed() >= limits::FAULT_GRACE);
    assert_ne!(d.r16(REG_USBSTS) & STS_HCH, 0, "halted");
    assert_eq!(d.pci.next_deadline(), None, "no timer left running");
    d.w16(REG_USBCMD, CMD_HCRESET);
    assert_eq!(d.r16(REG_USBSTS) & STS_HSE, 0);
}

#[test]
fn nothing_in_flight_leaks_across_reset_and_unplug() {
    let (mut d, mut ep0) = bed();
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev[1], 1);
    d.w16(REG_USBCMD, CMD_HCRESET);
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
    assert!(d.pci.controller_mut().detach(1).is_some());
    assert!(d.pci.controller_mut().detach(1).is_none());
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}
