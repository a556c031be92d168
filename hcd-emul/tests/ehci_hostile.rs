//! Hostile schedules for our EHCI (the EHCI rows of the bad-input
//! catalogue): circular qTD, QH, iTD and siTD lists (CVE-2015-8558,
//! CVE-2016-4037), buffer pointers into our own MMIO (CVE-2021-3750),
//! unmapped schedule memory (CVE-2020-25723), QH Mult = 0, a qTD longer
//! than its five pages, a frame list moved while running. Nothing may
//! hang, panic or leak; work per access stays bounded; the controller
//! answers as hardware would (halted qTD, Host System Error).

mod ehci_common;

use std::io::Write;

use ehci_common::*;
use hcd_emul::ehci::limits;
use hcd_emul::ehci::regs::*;
use hcd_emul::usb::Speed;
use hcd_emul::UsbStorage;

fn stick(speed: Speed) -> Box<UsbStorage> {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    Box::new(UsbStorage::from_file(f, false, speed).unwrap())
}

/// A running controller with a high-speed stick addressed as 1 on root
/// port 2 and its ep0 QH linked.
fn bed() -> (Driver, Queue) {
    let mut d = Driver::new();
    d.pci.controller_mut().attach(stick(Speed::High)).unwrap();
    d.start();
    d.reset_port(2);
    d.enable_async();
    let mut ep0 = d.make_qh(0, 0, Eps::High, 64, true, None, 0);
    d.link_async(&ep0);
    assert!(!d.control(&mut ep0, setup(0, 5, 1, 0, 0), None).1);
    d.unlink_async(&ep0);
    let ep0 = d.make_qh(1, 0, Eps::High, 64, true, None, 0);
    d.link_async(&ep0);
    (d, ep0)
}

/// Guest-memory operations one access may cost: the budget, plus one
/// transfer's worth of qTDs.
fn access_cost(d: &mut Driver, f: impl FnOnce(&mut Driver)) -> u64 {
    let before = d.ram.ops();
    f(d);
    d.ram.ops() - before
}

const SLACK: u64 = 4 * limits::QTDS_PER_TRANSFER as u64 + 64;

#[test]
fn circular_qtd_list_is_bounded() {
    let (mut d, ep0) = bed();
    // An OUT chain of whole-packet qTDs that loops back on itself, all
    // active (the merge must stop, the queue must not spin forever).
    let q = d.make_qh(1, 1, Eps::High, 512, false, None, 0);
    let a = d.alloc(32, 32);
    let b = d.alloc(32, 32);
    let buf = DATA_BASE as u32;
    for (x, next) in [(a, b), (b, a)] {
        d.wr(x, next);
        d.wr(x + 4, LINK_T);
        d.wr(
            x + 8,
            TOK_ACTIVE | (PID_OUT << 8) | (512 << TOK_BYTES_SHIFT),
        );
        d.wr(x + 12, buf);
    }
    d.wr(q.qh + 16, a);
    d.link_async(&q);
    let cost = access_cost(&mut d, |d| {
        let c = d.r32(OP + OP_USBCMD);
        d.w32(OP + OP_USBCMD, c);
    });
    assert!(
        cost <= limits::WORK_PER_ACCESS + SLACK,
        "one access cost {cost}"
    );
    // Several wake-ups: each bounded, the process keeps answering.
    for _ in 0..20 {
        let c = access_cost(&mut d, |d| d.pci.process());
        assert!(c <= limits::WORK_PER_ACCESS + SLACK, "a wake-up cost {c}");
    }
    let _ = ep0;
    d.pci.reset();
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn circular_qh_lists_of_every_shape_are_bounded() {
    let (mut d, _ep0) = bed();
    // head -> A -> B -> A (never back to the head), and C -> C.
    let qa = d.make_qh(9, 0, Eps::High, 64, true, None, 0);
    let qb = d.make_qh(9, 1, Eps::High, 64, false, None, 0);
    let qc = d.make_qh(9, 2, Eps::High, 64, false, None, 0);
    d.wr(d.head, qa.qh | TYPE_QH);
    d.wr(qa.qh, qb.qh | TYPE_QH);
    d.wr(qb.qh, qa.qh | TYPE_QH);
    d.wr(qc.qh, qc.qh | TYPE_QH);
    let cost = access_cost(&mut d, |d| d.pci.process());
    assert!(cost <= limits::WORK_PER_ACCESS + SLACK, "{cost}");
    d.w32(OP + OP_ASYNCLISTADDR, qc.qh);
    let cost = access_cost(&mut d, |d| {
        let c = d.r32(OP + OP_USBCMD);
        d.w32(OP + OP_USBCMD, c);
    });
    assert!(cost <= limits::WORK_PER_ACCESS + SLACK, "{cost}");
    assert!(!d.pci.controller().halted());
}

#[test]
fn circular_periodic_lists_itd_sitd_qh_are_bounded() {
    let (mut d, _ep0) = bed();
    // Frame 0..1023: an iTD that links to itself, an siTD that links to
    // an FSTN that links back to the siTD, a QH linking to itself.
    let itd = d.alloc(64, 32);
    d.wr(itd, itd | TYPE_ITD);
    for t in 0..8 {
        d.wr(itd + 4 + 4 * t, (1 << 31) | (8 << 16));
    }
    d.wr(itd + 36, (DATA_BASE as u32) | (1 << 8) | 1);
    d.wr(itd + 40, 512 | (1 << 11));
    d.wr(itd + 44, 1);
    let sitd = d.alloc(32, 32);
    let fstn = d.alloc(32, 32);
    d.wr(sitd, fstn | TYPE_FSTN);
    d.wr(sitd + 4, (1 << 31) | (1 << 24) | (1 << 16) | 2);
    d.wr(sitd + 8, 1);
    d.wr(sitd + 12, TOK_ACTIVE | (8 << 16));
    d.wr(sitd + 16, DATA_BASE as u32);
    d.wr(fstn, sitd | TYPE_SITD);
    let qh = d.make_qh(1, 3, Eps::High, 64, false, None, 1);
    d.wr(qh.qh, qh.qh | TYPE_QH);
    for f in 0..1024u32 {
        let e = match f % 3 {
            0 => itd | TYPE_ITD,
            1 => sitd | TYPE_SITD,
            _ => qh.qh | TYPE_QH,
        };
        d.wr(d.frame_list + 4 * f, e);
    }
    d.enable_periodic();
    std::thread::sleep(std::time::Duration::from_millis(80));
    for _ in 0..10 {
        let c = access_cost(&mut d, |d| d.pci.process());
        assert!(c <= limits::WORK_PER_ACCESS + SLACK, "a wake-up cost {c}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The frame list moves while running: no harm either.
    let fl2 = d.alloc(4096, 4096);
    for f in 0..1024u32 {
        d.wr(fl2 + 4 * f, itd | TYPE_ITD);
    }
    d.w32(OP + OP_PERIODICLISTBASE, fl2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    d.pci.process();
    d.pci.reset();
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn buffer_pointers_into_our_own_mmio_fail_the_transfer_only() {
    let (mut d, mut ep0) = bed();
    // GET_DESCRIPTOR whose data stage points at the controller's BAR.
    let r = d.control(
        &mut ep0,
        setup(0x80, 6, 0x0100, 0, 18),
        Some((0xfebf_0000, 18)),
    );
    assert!(r.1, "the data stage cannot be written: the qTD halts");
    let tok = d.rd(ep0.qh + 24);
    assert_eq!(
        tok & TOK_CERR,
        0,
        "a transaction error, not a STALL: {tok:#x}"
    );
    assert!(
        !d.pci.controller().halted(),
        "no re-entrant register access, no reset"
    );
    // And the registers are untouched.
    assert_ne!(d.r32(OP + OP_USBCMD) & CMD_RS, 0);
}

#[test]
fn unmapped_schedule_memory_is_a_host_system_error() {
    let (mut d, _ep0) = bed();
    d.w32(OP + OP_ASYNCLISTADDR, 0xf000_0000);
    // Retried for limits::FAULT_GRACE (memory being remapped comes back),
    // then a Host System Error.
    d.pci.process();
    assert_eq!(d.usbsts() & STS_HSE, 0, "not at the first miss");
    let t0 = std::time::Instant::now();
    d.timeout = limits::FAULT_GRACE * 10;
    assert!(d.run_until(|d| d.usbsts() & STS_HSE != 0));
    assert!(t0.elapsed() >= limits::FAULT_GRACE);
    let sts = d.usbsts();
    assert_ne!(sts & STS_HSE, 0, "Host System Error: {sts:#x}");
    assert_ne!(sts & STS_HCHALTED, 0, "halted");
    // Only a reset recovers.
    d.w32(OP + OP_USBCMD, CMD_RS);
    assert_ne!(d.usbsts() & STS_HCHALTED, 0);
    d.w32(OP + OP_USBCMD, CMD_HCRESET);
    assert_eq!(d.usbsts() & STS_HSE, 0);
}

/// QEMU remaps guest RAM in several vfio-user messages (SeaBIOS making
/// its ROM area read-only unmaps all of RAM for up to ~1.3 ms): schedule
/// memory that vanishes for a moment and comes back is no Host System
/// Error, and a result due meanwhile is written back once it returns.
#[test]
fn schedule_memory_missing_for_a_moment_is_retried() {
    let (mut d, mut ep0) = bed();
    let full = d.ram.current();
    // Guest RAM minus everything: the async walk misses.
    d.ram.replace(vm_memory::GuestMemoryMmap::default());
    d.pci.process();
    std::thread::sleep(std::time::Duration::from_millis(3));
    d.pci.process();
    assert_eq!(d.usbsts() & STS_HSE, 0);
    d.ram.replace(full);
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev[1], 1, "the controller goes on");
    assert_eq!(d.usbsts() & STS_HSE, 0);
}

#[test]
fn mult_zero_and_oversized_qtds() {
    let (mut d, mut ep0) = bed();
    // Mult = 0 (some Windows versions): still served.
    let caps = d.rd(ep0.qh + 8) & !(3 << 30);
    d.wr(ep0.qh + 8, caps);
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!(dev[1], 1);
    // A qTD of 0x5000 bytes starting at page offset 0xfff: more than its
    // five pages hold (0x4001 bytes). The queue halts; nothing else happens.
    let mut q = d.make_qh(1, 1, Eps::High, 512, false, None, 0);
    d.link_async(&q);
    let _ = d.bulk(&mut q, PID_IN, DATA_BASE + 0xfff, 0x5000, 0x7fff);
    let tok = d.rd(q.qh + 24);
    assert_ne!(tok & TOK_HALTED, 0, "halted: {tok:#x}");
    assert!(!d.pci.controller().halted());
    // C_Page 7: there is no eighth buffer pointer (found by the fuzzer:
    // it indexed past the qTD).
    let mut q2 = d.make_qh(1, 1, Eps::High, 512, false, None, 0);
    d.link_async(&q2);
    let a = d.append(
        &mut q2,
        &[QtdSpec {
            pid: PID_IN,
            buf: DATA_BASE,
            len: 512,
            ioc: true,
            toggle: false,
        }],
    );
    let t = d.rd(a[0] + 8);
    d.wr(a[0] + 8, t | TOK_CPAGE);
    d.timeout = std::time::Duration::from_millis(200);
    assert!(
        d.run_until(|d| d.rd(q2.qh + 24) & TOK_HALTED != 0),
        "halted"
    );
}

/// Linux's usb_kill_urb on an interrupt endpoint: unlink the QH from the
/// frame list, wait for the frame, clear the overlay's Active bit, refresh
/// and relink — no doorbell. The transfer parked in the device must be
/// cancelled; nothing may be written into the given-back qTD, and the
/// next event goes to the new qTD (found by the passthrough VM test with
/// a keyboard).
#[test]
fn taking_back_a_parked_interrupt_transfer_cancels_it() {
    let mut d = Driver::new();
    d.pci.controller_mut().attach(stick(Speed::Full)).unwrap();
    d.start();
    d.reset_port(1);
    d.enable_async();
    d.enable_periodic();
    let mut ep0 = d.make_qh(0, 0, Eps::High, 64, true, None, 0);
    d.link_async(&ep0);
    assert!(!d.control(&mut ep0, setup(0, 5, 1, 0, 0), None).1);
    d.unlink_async(&ep0);
    let mut hub0 = d.make_qh(1, 0, Eps::High, 64, true, None, 0);
    d.link_async(&hub0);
    assert!(!d.control(&mut hub0, setup(0, 9, 1, 0, 0), None).1);
    let mut status = d.make_qh(1, 1, Eps::High, 1, false, None, 0x01);
    d.link_periodic(&status, 8);
    let old = d.append(
        &mut status,
        &[QtdSpec {
            pid: PID_IN,
            buf: DATA_BASE,
            len: 1,
            ioc: true,
            toggle: false,
        }],
    );
    d.timeout = std::time::Duration::from_millis(60);
    assert!(
        !d.run_until(|d| d.rd(old[0] + 8) & TOK_ACTIVE == 0),
        "parked in the hub"
    );
    assert_eq!(d.pci.controller().transfers_in_flight(), 1);
    // Unlink from every frame, wait a frame, take the qTD back.
    for f in 0..1024 {
        d.wr(d.frame_list + 4 * f, LINK_T);
    }
    std::thread::sleep(std::time::Duration::from_millis(2));
    let t = d.rd(status.qh + 24);
    d.wr(status.qh + 24, t & !TOK_ACTIVE);
    let given_back = d.rd(old[0] + 8);
    d.wr(old[0] + 8, given_back & !TOK_ACTIVE);
    d.refresh(&status, true);
    d.link_periodic(&status, 8);
    d.timeout = std::time::Duration::from_millis(100);
    assert!(
        d.run_until(|d| d.pci.controller().transfers_in_flight() == 0),
        "cancelled"
    );
    // A new qTD; the hub's change (port power) completes it, not the old.
    let new = d.append(
        &mut status,
        &[QtdSpec {
            pid: PID_IN,
            buf: DATA_BASE + 0x100,
            len: 1,
            ioc: true,
            toggle: false,
        }],
    );
    d.timeout = std::time::Duration::from_secs(5);
    assert!(
        !d.control(&mut hub0, setup(0x23, 3, 8, 1, 0), None).1,
        "power port 1"
    );
    let ok = d.run_until(|d| d.rd(new[0] + 8) & TOK_ACTIVE == 0);
    assert!(
        ok,
        "the new qTD completes: in flight {}, overlay {:x?}, new {:#x} token {:#x}",
        d.pci.controller().transfers_in_flight(),
        (0..9)
            .map(|i| d.rd(status.qh + 12 + 4 * i))
            .collect::<Vec<_>>(),
        new[0],
        d.rd(new[0] + 8),
    );
    assert_eq!(
        d.rd(old[0] + 8),
        given_back & !TOK_ACTIVE,
        "nothing written into the old one"
    );
}
