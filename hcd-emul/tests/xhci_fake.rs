//! xHCI driven by the guest driver against scripted fake devices: ordering
//! of asynchronous completions, cancellation, stop/halt recovery, teardown
//! with transfers in flight.

mod common;

use std::time::Duration;

use common::fake::{pattern, FakeDevice};
use common::{Driver, DATA_BASE};
use hcd_emul::usb::Speed;
use hcd_emul::xhci::context::ep_type;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::trb::{cc, ctl, ty, Trb};

const BULK_IN: usize = 3; // ep 1 IN
const BULK_OUT: usize = 4; // ep 2 OUT

fn bring_up(dev: FakeDevice) -> (Driver, usize) {
    let mut d = Driver::new();
    let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    d.start();
    let slot = d.address(port);
    let desc = d.get_descriptor(slot, 1, 0, 18);
    assert_eq!(&desc[8..12], &[0x34, 0x12, 0x78, 0x56]);
    assert_eq!(
        d.control_out(slot, [0, 9, 1, 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS
    );
    let code = d.configure(
        slot,
        &[
            (BULK_IN, ep_type::BULK_IN, 512, 0),
            (BULK_OUT, ep_type::BULK_OUT, 512, 0),
        ],
    );
    assert_eq!(code, cc::SUCCESS);
    (d, slot)
}

#[test]
fn enumerates_and_interrupts_through_msix() {
    let (dev, _st) = FakeDevice::new(Speed::High);
    let (d, slot) = bring_up(dev);
    assert!(d.msix_count() > 0, "events were signalled through MSI-X");
    let msg = d.irq.lock().unwrap().msgs[0];
    assert!(msg.msix);
    assert_eq!((msg.vector, msg.data), (0, 0x40));
    // Output slot context says Configured with address = slot id.
    let out = d.slots[&slot].out_ctx;
    let sc = d.read_ctx(out, 0);
    assert_eq!(sc[3] >> 27, 3);
    assert_eq!(sc[3] & 0xff, slot as u32);
    let ep = d.read_ctx(out, BULK_IN as u64);
    assert_eq!(ep[0] & 7, 1, "bulk IN running");
}

#[test]
fn async_completions_reported_in_ring_order_with_data_in_its_own_td() {
    let (dev, st) = FakeDevice::asynchronous(Speed::High, Duration::from_millis(5), 8);
    let (mut d, slot) = bring_up(dev);
    // Queue 12 IN TDs of 8 KiB + 3 bytes at unaligned addresses, each
    // crossing pages, without waiting in between.
    let n = 12;
    let len = 8192 + 3;
    let mut last_trbs = Vec::new();
    let mut bufs = Vec::new();
    for k in 0..n {
        let buf = DATA_BASE + 0x1_0000 * k as u64 + 0xffd;
        bufs.push(buf);
        let trbs = Driver::normal_trbs(&[(buf, len)], true);
        let addrs = d.queue(slot, BULK_IN, &trbs);
        last_trbs.push(*addrs.last().unwrap());
    }
    let mut seen = Vec::new();
    while seen.len() < n {
        let c = d.next_transfer(slot, BULK_IN).expect("event");
        assert_eq!(c.code, cc::SUCCESS);
        seen.push(c.trb);
    }
    assert_eq!(seen, last_trbs, "completion events arrive in ring order");
    let ids = st.lock().unwrap().in_ids.clone();
    for k in 0..n {
        let mut got = vec![0u8; len as usize];
        d.ram.read(bufs[k], &mut got).unwrap();
        let want: Vec<u8> = (0..len as usize)
            .map(|i| pattern(ids[k] as u32, i))
            .collect();
        assert!(got == want, "TD {k} holds its own data");
    }
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

/// More TDs than may be in flight, queued behind one doorbell: the
/// controller resumes fetching as completions make room (isochronous
/// streams queue hundreds of TDs at once). With `every_ioc` false only the
/// last TD interrupts (a synchronous device finishes them all inside the
/// doorbell write, more events than the test's event ring holds).
fn many_tds_behind_one_doorbell(dev: FakeDevice, every_ioc: bool) {
    let (mut d, slot) = bring_up(dev);
    let n = 3 * 64 + 5;
    let ram = d.ram.clone();
    let mut last = Vec::new();
    for k in 0..n {
        let mut trbs = Driver::normal_trbs(&[(DATA_BASE + 512 * k as u64, 512)], true);
        if !every_ioc && k + 1 < n {
            trbs[0].control &= !ctl::IOC;
        }
        let ring = d
            .slots
            .get_mut(&slot)
            .unwrap()
            .rings
            .get_mut(&BULK_IN)
            .unwrap();
        last.push(*ring.push_all(&ram, &trbs).last().unwrap());
    }
    if !every_ioc {
        last.drain(..n - 1);
    }
    d.ring_doorbell(slot, BULK_IN);
    let mut seen = Vec::new();
    while seen.len() < last.len() {
        let c = d.next_transfer(slot, BULK_IN).expect("every TD completes");
        assert_eq!(c.code, cc::SUCCESS);
        seen.push(c.trb);
    }
    assert_eq!(seen, last);
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn tds_beyond_the_in_flight_cap_run_without_another_doorbell_async() {
    let (dev, _st) = FakeDevice::asynchronous(Speed::High, Duration::from_millis(1), 16);
    many_tds_behind_one_doorbell(dev, true);
}

#[test]
fn tds_beyond_the_in_flight_cap_run_without_another_doorbell_sync() {
    let (dev, _st) = FakeDevice::new(Speed::High);
    many_tds_behind_one_doorbell(dev, false);
}

#[test]
fn short_packet_reports_bytes_moved() {
    let (dev, st) = FakeDevice::new(Speed::High);
    let (mut d, slot) = bring_up(dev);
    st.lock().unwrap().in_limit = Some(100_000);
    // 3 x 64 KiB TD; device sends 100000 bytes: short in the 2nd TRB.
    let (code, n) = d.bulk(slot, BULK_IN, &[(DATA_BASE, 3 * 65536)]);
    assert_eq!((code, n), (cc::SHORT_PACKET, 100_000));
}

#[test]
fn stall_halts_endpoint_and_reset_endpoint_plus_set_dequeue_recovers() {
    let (dev, _st) = FakeDevice::new(Speed::High);
    let (mut d, slot) = bring_up(dev);
    assert_eq!(
        d.control_out(slot, [0x40, 0x42, 0, 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS
    );
    let (code, _) = d.bulk(slot, BULK_IN, &[(DATA_BASE, 512)]);
    assert_eq!(code, cc::STALL);
    let out = d.slots[&slot].out_ctx;
    assert_eq!(d.read_ctx(out, BULK_IN as u64)[0] & 7, 2, "halted");
    // A doorbell on a halted endpoint does nothing.
    let trbs = Driver::normal_trbs(&[(DATA_BASE, 512)], true);
    let pending = d.queue(slot, BULK_IN, &trbs);
    d.poll_events();
    assert!(d.pending.iter().all(|t| t.trb_type() != ty::TRANSFER_EVENT));
    // Stop Endpoint on a halted endpoint is a context state error.
    let stop = Trb {
        parameter: 0,
        status: 0,
        control: (ty::STOP_ENDPOINT << 10) | ((slot as u32) << 24) | ((BULK_IN as u32) << 16),
    };
    assert_eq!(d.command(stop).0, cc::CONTEXT_STATE_ERROR);
    let reset = Trb {
        parameter: 0,
        status: 0,
        control: (ty::RESET_ENDPOINT << 10) | ((slot as u32) << 24) | ((BULK_IN as u32) << 16),
    };
    assert_eq!(d.command(reset).0, cc::SUCCESS);
    assert_eq!(d.read_ctx(out, BULK_IN as u64)[0] & 7, 3, "stopped");
    // Point the ring at the TD queued while halted, like Linux does after
    // giving back the stalled URB.
    let ring = d.slots[&slot].rings[&BULK_IN].clone();
    let deq = pending[0] | u64::from(ring.cycle);
    let set = Trb {
        parameter: deq,
        status: 0,
        control: (ty::SET_TR_DEQUEUE << 10) | ((slot as u32) << 24) | ((BULK_IN as u32) << 16),
    };
    assert_eq!(d.command(set).0, cc::SUCCESS);
    d.ring_doorbell(slot, BULK_IN);
    let c = d.wait_transfer(slot, BULK_IN, *pending.last().unwrap());
    assert_eq!(c.code, cc::SUCCESS);
}

#[test]
fn stop_endpoint_with_transfer_in_flight_then_set_dequeue_and_continue() {
    let (mut dev, st) = FakeDevice::new(Speed::High);
    dev.park_in = true;
    let (mut d, slot) = bring_up(dev);
    let trbs = Driver::normal_trbs(&[(DATA_BASE, 4096)], true);
    let addrs = d.queue(slot, BULK_IN, &trbs);
    d.poll_events();
    assert_eq!(d.pci.controller().transfers_in_flight(), 1);
    let stop = Trb {
        parameter: 0,
        status: 0,
        control: (ty::STOP_ENDPOINT << 10) | ((slot as u32) << 24) | ((BULK_IN as u32) << 16),
    };
    assert_eq!(d.command(stop).0, cc::SUCCESS);
    let c = d.wait_transfer(slot, BULK_IN, addrs[0]);
    assert_eq!(c.code, cc::STOPPED);
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
    assert_eq!(
        st.lock().unwrap().outstanding,
        0,
        "device dropped the parked transfer"
    );
    let out = d.slots[&slot].out_ctx;
    let ep = d.read_ctx(out, BULK_IN as u64);
    assert_eq!(ep[0] & 7, 3);
    assert_eq!(
        u64::from(ep[2] & !0xf),
        addrs[0],
        "dequeue rewound to the stopped TD"
    );
    // Skip the cancelled TD (Set TR Dequeue to the next free slot) and
    // continue with OUT traffic on the other endpoint and a new IN TD.
    let ring = d.slots[&slot].rings[&BULK_IN].clone();
    let set = Trb {
        parameter: ring.addr() | u64::from(ring.cycle),
        status: 0,
        control: (ty::SET_TR_DEQUEUE << 10) | ((slot as u32) << 24) | ((BULK_IN as u32) << 16),
    };
    assert_eq!(d.command(set).0, cc::SUCCESS);
    let (code, _) = d.bulk(slot, BULK_OUT, &[(DATA_BASE, 1000)]);
    assert_eq!(code, cc::SUCCESS);
    assert_eq!(st.lock().unwrap().out_data.len(), 1000);
}

#[test]
fn hcrst_with_transfers_in_flight_leaks_nothing() {
    let (mut dev, st) = FakeDevice::new(Speed::High);
    dev.park_in = true;
    let (mut d, slot) = bring_up(dev);
    for k in 0..5 {
        let trbs = Driver::normal_trbs(&[(DATA_BASE + 0x1000 * k, 512)], true);
        d.queue(slot, BULK_IN, &trbs);
    }
    assert_eq!(d.pci.controller().transfers_in_flight(), 5);
    d.start(); // HCRST
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
    assert_eq!(st.lock().unwrap().outstanding, 0);
    // And the device enumerates again.
    let port = 1;
    let slot = d.address(port);
    assert_eq!(d.get_descriptor(slot, 1, 0, 18).len(), 18);
}

#[test]
fn disable_slot_with_transfers_in_flight_leaks_nothing() {
    let (dev, st) = FakeDevice::asynchronous(Speed::High, Duration::from_millis(20), 4);
    let (mut d, slot) = bring_up(dev);
    for k in 0..4 {
        let trbs = Driver::normal_trbs(&[(DATA_BASE + 0x1000 * k, 512)], true);
        d.queue(slot, BULK_IN, &trbs);
    }
    let dis = Trb {
        parameter: 0,
        status: 0,
        control: (ty::DISABLE_SLOT << 10) | ((slot as u32) << 24),
    };
    assert_eq!(d.command(dis).0, cc::SUCCESS);
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
    std::thread::sleep(Duration::from_millis(100));
    d.poll_events();
    assert!(
        d.pending.iter().all(|t| t.trb_type() != ty::TRANSFER_EVENT),
        "no events for a disabled slot"
    );
    assert_eq!(st.lock().unwrap().outstanding, 0);
    // The slot is free again.
    let (code, s2) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: ty::ENABLE_SLOT << 10,
    });
    assert_eq!((code, s2), (cc::SUCCESS, slot));
}

#[test]
fn detach_fails_in_flight_transfers_and_reports_disconnect() {
    let (mut dev, _st) = FakeDevice::new(Speed::High);
    dev.park_in = true;
    let (mut d, slot) = bring_up(dev);
    let port = d.slots[&slot].port;
    let trbs = Driver::normal_trbs(&[(DATA_BASE, 512)], true);
    let a = d.queue(slot, BULK_IN, &trbs);
    assert!(d.pci.controller_mut().detach(port).is_some());
    let c = d.wait_transfer(slot, BULK_IN, a[0]);
    assert_eq!(c.code, cc::USB_TRANSACTION_ERROR);
    let ev = d
        .wait_event(|t| t.trb_type() == ty::PORT_STATUS_CHANGE)
        .expect("port change");
    assert_eq!(ev.parameter >> 24, port as u64);
    let sc = d.portsc(port);
    assert_eq!(sc & (PORTSC_CCS | PORTSC_CSC), PORTSC_CSC);
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn device_that_vanishes_fails_transfers_then_reconnects_on_the_same_port() {
    let (mut dev, st) = FakeDevice::new(Speed::High);
    dev.park_in = true;
    let present = dev.present.clone();
    let (mut d, slot) = bring_up(dev);
    let port = d.slots[&slot].port;
    let trbs = Driver::normal_trbs(&[(DATA_BASE, 512)], true);
    let a = d.queue(slot, BULK_IN, &trbs);
    d.pending.clear();
    // Unplugged behind the backend: it tells nobody but wakes the loop.
    present.store(false, std::sync::atomic::Ordering::SeqCst);
    st.lock().unwrap().wakeup.as_ref().unwrap().wake();
    let c = d.wait_transfer(slot, BULK_IN, a[0]);
    assert_eq!(c.code, cc::USB_TRANSACTION_ERROR);
    let ev = d
        .wait_event(|t| t.trb_type() == ty::PORT_STATUS_CHANGE)
        .expect("disconnect event");
    assert_eq!(ev.parameter >> 24, port as u64);
    assert_eq!(d.portsc(port) & (PORTSC_CCS | PORTSC_CSC), PORTSC_CSC);
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
    d.write_portsc(port, PORTSC_PP | PORTSC_CHANGE_MASK);
    // Re-plugged: a new connection on the same port, usable again.
    present.store(true, std::sync::atomic::Ordering::SeqCst);
    d.wait_event(|t| t.trb_type() == ty::PORT_STATUS_CHANGE)
        .expect("connect event");
    assert_eq!(
        d.portsc(port) & (PORTSC_CCS | PORTSC_CSC),
        PORTSC_CCS | PORTSC_CSC
    );
    let (code, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: (ty::DISABLE_SLOT << 10) | ((slot as u32) << 24),
    });
    assert_eq!(code, cc::SUCCESS);
    let slot2 = d.address(port);
    assert_eq!(d.get_descriptor(slot2, 1, 0, 18)[1], 1);
}

#[test]
fn superspeed_device_lands_on_usb3_port_enabled() {
    let (dev, _st) = FakeDevice::new(Speed::Super);
    let mut d = Driver::new();
    let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    assert!(port > USB2_PORTS);
    d.start();
    let sc = d.portsc(port);
    assert_eq!(sc & (PORTSC_CCS | PORTSC_PED), PORTSC_CCS | PORTSC_PED);
    assert_eq!((sc >> PORTSC_SPEED_SHIFT) & 0xf, speed_id::SUPER);
    let slot = d.address(port);
    assert_eq!(d.get_descriptor(slot, 1, 0, 18)[7], 9);
}
