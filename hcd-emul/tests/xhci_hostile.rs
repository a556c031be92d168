//! Hostile guest input, one test per xHCI row of the bad-input catalogue
//! (shared/reference/usb-anchors.md). Each case must end the way hardware
//! would — an error completion, a halted endpoint, or Host System Error
//! with the controller halted — and never panic or hang.

mod common;

use common::fake::FakeDevice;
use common::{Driver, DATA_BASE};
use hcd_emul::usb::Speed;
use hcd_emul::xhci::context::ep_type;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::trb::{cc, ctl, ty, Trb};

const BULK_IN: usize = 3;
const BULK_OUT: usize = 4;

fn bring_up() -> (Driver, usize) {
    let (dev, _st) = FakeDevice::new(Speed::High);
    let mut d = Driver::new();
    d.timeout = std::time::Duration::from_secs(2);
    let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    d.start();
    let slot = d.address(port);
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

fn ep_state(d: &Driver, slot: usize, dci: usize) -> u32 {
    d.read_ctx(d.slots[&slot].out_ctx, dci as u64)[0] & 7
}

fn cmd_ep(d: &mut Driver, t: u32, slot: usize, dci: usize, param: u64) -> u32 {
    d.command(Trb {
        parameter: param,
        status: 0,
        control: (t << 10) | ((slot as u32) << 24) | ((dci as u32) << 16),
    })
    .0
}

/// Reset Endpoint + Set TR Dequeue to the next free TRB, as Linux does.
fn recover(d: &mut Driver, slot: usize, dci: usize) {
    assert_eq!(cmd_ep(d, ty::RESET_ENDPOINT, slot, dci, 0), cc::SUCCESS);
    let r = d.slots[&slot].rings[&dci].clone();
    assert_eq!(
        cmd_ep(
            d,
            ty::SET_TR_DEQUEUE,
            slot,
            dci,
            r.addr() | u64::from(r.cycle)
        ),
        cc::SUCCESS
    );
}

fn hse(d: &mut Driver) -> bool {
    let op = d.op();
    let sts = d.r32(op + OP_USBSTS);
    sts & (USBSTS_HSE | USBSTS_HCH) == (USBSTS_HSE | USBSTS_HCH)
}

#[test]
fn self_linked_transfer_ring_without_toggle_halts_with_trb_error() {
    let (mut d, slot) = bring_up();
    let r = d.slots[&slot].rings[&BULK_IN].clone();
    let link = Trb {
        parameter: r.addr(),
        status: 0,
        control: (ty::LINK << 10) | 1,
    };
    d.ram.write(r.addr(), &link.to_bytes()).unwrap();
    d.ring_doorbell(slot, BULK_IN);
    let c = d.next_transfer(slot, BULK_IN).expect("error event");
    assert_eq!(c.code, cc::TRB_ERROR);
    assert_eq!(ep_state(&d, slot, BULK_IN), 2);
    assert!(!hse(&mut d));
}

#[test]
fn self_linked_transfer_ring_with_toggle_is_just_empty() {
    let (mut d, slot) = bring_up();
    let r = d.slots[&slot].rings[&BULK_IN].clone();
    let link = Trb {
        parameter: r.addr(),
        status: 0,
        control: (ty::LINK << 10) | ctl::TOGGLE_CYCLE | 1,
    };
    d.ram.write(r.addr(), &link.to_bytes()).unwrap();
    d.ring_doorbell(slot, BULK_IN);
    d.poll_events();
    assert!(d.pending.iter().all(|t| t.trb_type() != ty::TRANSFER_EVENT));
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn self_linked_command_ring_is_host_system_error() {
    let (mut d, _slot) = bring_up();
    let a = d.cmd.addr();
    let link = Trb {
        parameter: a,
        status: 0,
        control: (ty::LINK << 10) | u32::from(d.cmd.cycle),
    };
    d.ram.write(a, &link.to_bytes()).unwrap();
    d.w32(DOORBELL_OFFSET, 0);
    assert!(hse(&mut d));
    // A halted controller ignores doorbells; HCRST recovers it.
    d.w32(DOORBELL_OFFSET, 0);
    d.start();
    assert!(!hse(&mut d));
}

#[test]
fn endless_chain_is_capped_with_trb_error() {
    let (mut d, slot) = bring_up();
    let r = d.slots[&slot].rings[&BULK_OUT].clone();
    // Every TRB chains, and the ring links back without toggle: the TD
    // never ends.
    for i in 0..r.size - 1 {
        let t = Trb {
            parameter: DATA_BASE,
            status: 64,
            control: (ty::NORMAL << 10) | ctl::CHAIN | 1,
        };
        d.ram.write(r.base + 16 * i, &t.to_bytes()).unwrap();
    }
    let link = Trb {
        parameter: r.base,
        status: 0,
        control: (ty::LINK << 10) | ctl::CHAIN | 1,
    };
    d.ram
        .write(r.base + 16 * (r.size - 1), &link.to_bytes())
        .unwrap();
    d.ring_doorbell(slot, BULK_OUT);
    let c = d.next_transfer(slot, BULK_OUT).expect("error event");
    assert_eq!(c.code, cc::TRB_ERROR);
    assert_eq!(ep_state(&d, slot, BULK_OUT), 2);
}

#[test]
fn control_stages_out_of_order_are_trb_errors_and_recoverable() {
    let (mut d, slot) = bring_up();
    let data = Trb {
        parameter: DATA_BASE,
        status: 8,
        control: (ty::DATA << 10) | ctl::DIR_IN,
    };
    let status = Trb {
        parameter: 0,
        status: 0,
        control: (ty::STATUS << 10) | ctl::IOC,
    };
    let mut setup = common::setup(u64::from_le_bytes([0x80, 6, 0, 1, 0, 0, 8, 0]));
    setup.control |= 3 << 16;
    let no_idt = Trb {
        parameter: setup.parameter,
        status: 8,
        control: (ty::SETUP << 10) | (3 << 16),
    };
    let cases: Vec<Vec<Trb>> = vec![
        vec![data, status],         // data without setup
        vec![status],               // status alone
        vec![setup, setup, status], // setup twice
        vec![setup, status, data],  // data after status (status has TRT mismatch: data expected)
        vec![no_idt, data, status], // setup without IDT
        vec![Trb {
            parameter: DATA_BASE,
            status: 8,
            control: (ty::NORMAL << 10) | ctl::IOC,
        }],
    ];
    for (i, trbs) in cases.iter().enumerate() {
        d.queue(slot, 1, trbs);
        let c = d
            .next_transfer(slot, 1)
            .unwrap_or_else(|| panic!("case {i}: no event"));
        assert_eq!(c.code, cc::TRB_ERROR, "case {i}");
        assert_eq!(ep_state(&d, slot, 1), 2, "case {i}: halted");
        d.pending.clear();
        recover(&mut d, slot, 1);
        // The default control pipe works again.
        assert_eq!(
            d.get_descriptor(slot, 1, 0, 18).len(),
            18,
            "case {i}: recovered"
        );
    }
}

#[test]
fn missing_status_stage_waits_without_hanging() {
    let (mut d, slot) = bring_up();
    let mut setup = common::setup(u64::from_le_bytes([0x80, 6, 0, 1, 0, 0, 8, 0]));
    setup.control |= 3 << 16;
    let data = Trb {
        parameter: DATA_BASE,
        status: 8,
        control: (ty::DATA << 10) | ctl::DIR_IN,
    };
    d.queue(slot, 1, &[setup, data]);
    d.poll_events();
    assert!(d.pending.iter().all(|t| t.trb_type() != ty::TRANSFER_EVENT));
    assert_eq!(
        d.pci.controller().transfers_in_flight(),
        0,
        "an incomplete TD is not started"
    );
}

#[test]
fn setup_wlength_larger_or_smaller_than_data_stage() {
    let (mut d, slot) = bring_up();
    // wLength 255, data stage of 8 bytes: only 8 bytes land.
    d.ram.write(DATA_BASE, &[0xaa; 64]).unwrap();
    let (code, n) = d.control(slot, [0x80, 6, 0, 1, 0, 0, 255, 0], Some((DATA_BASE, 8)));
    assert_eq!((code, n), (cc::SUCCESS, 8));
    let mut b = [0u8; 16];
    d.ram.read(DATA_BASE, &mut b).unwrap();
    assert_eq!(&b[8..], &[0xaa; 8], "nothing written past the data stage");
    // wLength 4, data stage 64 bytes: device honours wLength, short packet.
    let (code, n) = d.control(
        slot,
        [0x80, 6, 0, 1, 0, 0, 4, 0],
        Some((DATA_BASE + 0x100, 64)),
    );
    assert_eq!((code, n), (cc::SUCCESS, 4));
}

#[test]
fn buffers_in_unmapped_memory_or_our_own_bar_fail_the_transfer() {
    let (mut d, slot) = bring_up();
    // Beyond RAM, and where a guest would map BAR 0.
    for addr in [0x4000_0000u64, 0xfebf_0000, u64::MAX - 100] {
        let (code, _) = d.bulk(slot, BULK_OUT, &[(addr, 512)]);
        assert_eq!(code, cc::USB_TRANSACTION_ERROR, "{addr:#x}");
        assert_eq!(ep_state(&d, slot, BULK_OUT), 2);
        recover(&mut d, slot, BULK_OUT);
    }
    // Straddling the end of RAM.
    let (code, _) = d.bulk(slot, BULK_IN, &[((common::RAM_SIZE as u64) - 256, 512)]);
    assert_eq!(code, cc::USB_TRANSACTION_ERROR);
    recover(&mut d, slot, BULK_IN);
    let (code, _) = d.bulk(slot, BULK_OUT, &[(DATA_BASE, 512)]);
    assert_eq!(code, cc::SUCCESS);
}

#[test]
fn transfer_ring_at_unmapped_address_is_host_system_error() {
    let (mut d, slot) = bring_up();
    assert_eq!(
        cmd_ep(&mut d, ty::STOP_ENDPOINT, slot, BULK_IN, 0),
        cc::SUCCESS
    );
    assert_eq!(
        cmd_ep(&mut d, ty::SET_TR_DEQUEUE, slot, BULK_IN, 0x8000_0000 | 1),
        cc::SUCCESS
    );
    d.ring_doorbell(slot, BULK_IN);
    assert!(hse(&mut d));
}

#[test]
fn command_ring_and_dcbaa_at_unmapped_addresses() {
    let mut d = Driver::new();
    let (dev, _st) = FakeDevice::new(Speed::High);
    d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    d.start();
    // DCBAA unmapped: Address Device fails with a parameter error.
    let op = d.op();
    d.w64(op + OP_DCBAAP, 0x7000_0000);
    d.reset_port(1);
    let (code, slot) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: ty::ENABLE_SLOT << 10,
    });
    assert_eq!(code, cc::SUCCESS);
    let inp = d.alloc(33 * 32, 64);
    d.write_ctx(inp, 0, [0, 3, 0, 0, 0, 0, 0, 0]);
    d.write_ctx(inp, 1, [(1 << 27) | (3 << 20), 1 << 16, 0, 0, 0, 0, 0, 0]);
    d.write_ctx(inp, 2, [0, (4 << 3) | (64 << 16), 0x10_0001, 0, 0, 0, 0, 0]);
    let (code, _) = d.command(Trb {
        parameter: inp,
        status: 0,
        control: (ty::ADDRESS_DEVICE << 10) | ((slot as u32) << 24),
    });
    assert_eq!(code, cc::PARAMETER_ERROR);
    // Input context unmapped: parameter error too.
    let (code, _) = d.command(Trb {
        parameter: 0x7000_0000,
        status: 0,
        control: (ty::ADDRESS_DEVICE << 10) | ((slot as u32) << 24),
    });
    assert_eq!(code, cc::PARAMETER_ERROR);
    // Command ring unmapped: Host System Error.
    d.w32(op + OP_USBCMD, 0);
    d.w64(op + OP_CRCR, 0x7000_0000 | 1);
    d.w32(op + OP_USBCMD, USBCMD_RS | USBCMD_INTE);
    d.w32(DOORBELL_OFFSET, 0);
    assert!(hse(&mut d));
}

#[test]
fn slot_endpoint_and_interrupter_ids_out_of_range() {
    let (mut d, slot) = bring_up();
    for bad_slot in [0usize, MAX_SLOTS + 1, 200, 255] {
        let (code, _) = d.command(Trb {
            parameter: 0,
            status: 0,
            control: (ty::ADDRESS_DEVICE << 10) | ((bad_slot as u32) << 24),
        });
        assert_eq!(code, cc::SLOT_NOT_ENABLED, "slot {bad_slot}");
        assert_eq!(
            cmd_ep(&mut d, ty::STOP_ENDPOINT, bad_slot, 3, 0),
            cc::SLOT_NOT_ENABLED
        );
    }
    assert_eq!(cmd_ep(&mut d, ty::STOP_ENDPOINT, slot, 0, 0), cc::TRB_ERROR);
    assert_eq!(
        cmd_ep(&mut d, ty::RESET_ENDPOINT, slot, 31, 0),
        cc::ENDPOINT_NOT_ENABLED
    );
    assert_eq!(
        cmd_ep(&mut d, ty::SET_TR_DEQUEUE, slot, 17, 0x1000),
        cc::ENDPOINT_NOT_ENABLED
    );
    // Doorbells: slot beyond MaxSlots, targets 0 and 32..255, stream ids,
    // a disabled endpoint.
    for (idx, val) in [
        (MAX_SLOTS as u64 + 1, 3u32),
        (255, 3),
        (slot as u64, 0),
        (slot as u64, 32),
        (slot as u64, 255),
        (slot as u64, 3 | (7 << 16)),
        (slot as u64, 9),
    ] {
        d.w32(DOORBELL_OFFSET + 4 * idx, val);
    }
    // A TRB targeting interrupter 1000 still completes (on interrupter 0).
    let mut trbs = Driver::normal_trbs(&[(DATA_BASE, 64)], false);
    trbs[0].status |= 1000 << 22;
    let a = d.queue(slot, BULK_OUT, &trbs);
    assert_eq!(d.wait_transfer(slot, BULK_OUT, a[0]).code, cc::SUCCESS);
    // Unknown command types complete with TRB Error.
    for t in [0u32, 1, 18, 22, 24, 31, 40, 63] {
        let (code, _) = d.command(Trb {
            parameter: 0,
            status: 0,
            control: t << 10,
        });
        assert_eq!(code, cc::TRB_ERROR, "command type {t}");
    }
    // Runtime registers of interrupters that do not exist.
    for off in (0..0x400u64).step_by(4) {
        d.w32(
            RUNTIME_OFFSET + 0x20 + 0x20 * MAX_INTRS as u64 + off,
            0xffff_ffff,
        );
    }
    assert_eq!(d.get_descriptor(slot, 1, 0, 18).len(), 18);
}

#[test]
fn zero_max_packet_size_is_rejected() {
    let (mut d, slot) = bring_up();
    let code = d.configure(slot, &[(5, ep_type::BULK_IN, 0, 0)]);
    assert_eq!(code, cc::PARAMETER_ERROR);
    // Wrong direction for the DCI, and an invalid type.
    assert_eq!(
        d.configure(slot, &[(6, ep_type::BULK_IN, 512, 0)]),
        cc::PARAMETER_ERROR
    );
    assert_eq!(d.configure(slot, &[(7, 0, 512, 0)]), cc::PARAMETER_ERROR);
    // Evaluate Context with EP0 max packet 0.
    let inp = d.slots[&slot].in_ctx;
    d.write_ctx(inp, 0, [0, 2, 0, 0, 0, 0, 0, 0]);
    d.write_ctx(inp, 2, [0, 4 << 3, 0, 0, 0, 0, 0, 0]);
    let (code, _) = d.command(Trb {
        parameter: inp,
        status: 0,
        control: (ty::EVALUATE_CONTEXT << 10) | ((slot as u32) << 24),
    });
    assert_eq!(code, cc::PARAMETER_ERROR);
    // The existing endpoints are untouched.
    assert_eq!(d.bulk(slot, BULK_OUT, &[(DATA_BASE, 64)]).0, cc::SUCCESS);
}

#[test]
fn writes_to_every_read_only_register_change_nothing() {
    let (mut d, slot) = bring_up();
    let caps: Vec<u32> = (0..CAP_LENGTH).step_by(4).map(|o| d.r32(o)).collect();
    for o in (0..CAP_LENGTH).step_by(4) {
        d.w32(o, 0xffff_ffff);
        d.pci.bar_write(0, o, &[0xff]);
        d.pci.bar_write(0, o, &[0xff; 8]);
    }
    let after: Vec<u32> = (0..CAP_LENGTH).step_by(4).map(|o| d.r32(o)).collect();
    assert_eq!(caps, after);
    let op = d.op();
    d.w32(op + OP_PAGESIZE, 0);
    assert_eq!(d.r32(op + OP_PAGESIZE), 1);
    d.w32(RUNTIME_OFFSET, 0xffff_ffff); // MFINDEX
                                        // PORTSC read-only bits: CCS, speed, on the enabled port.
    let port = d.slots[&slot].port;
    let before = d.portsc(port);
    d.write_portsc(
        port,
        !(PORTSC_PED | PORTSC_PR | PORTSC_LWS | PORTSC_WPR | PORTSC_CHANGE_MASK),
    );
    let now = d.portsc(port);
    assert_eq!(
        before & (PORTSC_CCS | (0xf << PORTSC_SPEED_SHIFT) | PORTSC_PED),
        now & (PORTSC_CCS | (0xf << PORTSC_SPEED_SHIFT) | PORTSC_PED)
    );
    // Odd-sized and unaligned accesses everywhere in the BAR.
    for o in (0..BAR0_SIZE + 16).step_by(7) {
        let mut b = [0u8; 3];
        d.pci.bar_read(0, o, &mut b);
        d.pci.bar_write(0, o, &[0x5a, 0xa5]);
    }
    // Still a working controller?
    if hse(&mut d) {
        d.start();
    }
    assert!(!hse(&mut d));
}

#[test]
fn erst_size_zero_loses_events_and_huge_is_host_system_error() {
    let (mut d, _slot) = bring_up();
    let ir0 = d.ir(0);
    d.w32(ir0 + 0x08, 0);
    let (dev, _st) = FakeDevice::new(Speed::High);
    d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    assert!(!hse(&mut d), "events dropped, controller still runs");
    d.w32(ir0 + 0x08, 0xffff);
    d.w32(DOORBELL_OFFSET, 0);
    let noop = Trb {
        parameter: 0,
        status: 0,
        control: ty::NOOP_COMMAND << 10,
    };
    let ram = d.ram.clone();
    d.cmd.push_all(&ram, &[noop]);
    d.w32(DOORBELL_OFFSET, 0);
    assert!(hse(&mut d));
}

#[test]
fn event_ring_full_drops_events_without_harm() {
    let (mut d, slot) = bring_up();
    d.poll_events();
    d.pending.clear();
    // 64 commands without consuming events: the 64-TRB event ring fills.
    let ram = d.ram.clone();
    for _ in 0..100 {
        let noop = Trb {
            parameter: 0,
            status: 0,
            control: ty::NOOP_COMMAND << 10,
        };
        d.cmd.push_all(&ram, &[noop]);
        d.w32(DOORBELL_OFFSET, 0);
    }
    assert!(!hse(&mut d));
    d.poll_events();
    let full = d
        .pending
        .iter()
        .filter(|t| {
            t.trb_type() == ty::HOST_CONTROLLER_EVENT && t.status >> 24 == cc::EVENT_RING_FULL
        })
        .count();
    assert_eq!(full, 1);
    d.pending.clear();
    // Once drained, events flow again.
    assert_eq!(d.get_descriptor(slot, 1, 0, 18).len(), 18);
}

/// VirtualBox's design note: guest memory changes between submit and
/// completion. A TD's TRBs are read once, when it is fetched: rewriting
/// them while the device works changes neither where the data lands nor
/// which TRB the event names. Memory unmapped under a transfer in flight
/// fails that transfer's DMA, nothing else; mapped again, the endpoint
/// goes on.
#[test]
fn guest_memory_changed_or_unmapped_between_submit_and_completion() {
    use common::RAM_SIZE;
    use hcd_emul::mem::GuestRam;
    use hcd_emul::xhci::Xhci;
    use std::time::Duration;

    // Guest RAM in two regions, so the data half can be unmapped alone.
    let ram = GuestRam::anonymous_ranges(&[
        (0, DATA_BASE as usize),
        (DATA_BASE, RAM_SIZE - DATA_BASE as usize),
    ]);
    let (dev, st) = FakeDevice::asynchronous(Speed::High, Duration::from_millis(100), 1);
    let mut d = Driver::with_xhci(Xhci::new(ram.clone()), ram.clone());
    let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    d.start();
    let slot = d.address(port);
    let eps = [(BULK_IN, ep_type::BULK_IN, 512, 0)];
    assert_eq!(d.configure(slot, &eps), cc::SUCCESS);

    // (1) The TRB is rewritten (another buffer, another length) while the
    // device works: the data still lands in the buffer fetched.
    let (a, b) = (DATA_BASE, DATA_BASE + 0x1000);
    d.ram.write(b, &[0x5a; 512]).unwrap();
    let trbs = Driver::normal_trbs(&[(a, 512)], true);
    let at = d.queue(slot, BULK_IN, &trbs)[0];
    d.write_trb(at, b, 64, (ty::NORMAL << 10) | ctl::IOC | ctl::ISP);
    let c = d.wait_transfer(slot, BULK_IN, at);
    assert_eq!((c.code, c.residue), (cc::SUCCESS, 0));
    let mut got = vec![0u8; 512];
    d.ram.read(a, &mut got).unwrap();
    let seq = *st.lock().unwrap().in_ids.last().unwrap() as u32;
    let want: Vec<u8> = (0..512).map(|i| common::fake::pattern(seq, i)).collect();
    assert_eq!(got, want, "data in the buffer fetched");
    d.ram.read(b, &mut got).unwrap();
    assert_eq!(
        got,
        vec![0x5a; 512],
        "nothing written where the TRB now points"
    );

    // (2) The data region goes away while the next TD is in flight: its
    // DMA fails (the fake reports the short write), the process lives, and
    // once mapped again the endpoint moves data as before.
    let full = ram.current();
    let high = (RAM_SIZE - DATA_BASE as usize) as u64;
    let (low, _) = full
        .remove_region(vm_memory::GuestAddress(DATA_BASE), high)
        .unwrap();
    let at = d.queue(slot, BULK_IN, &Driver::normal_trbs(&[(a, 512)], true))[0];
    ram.replace(low);
    let c = d.wait_transfer(slot, BULK_IN, at);
    assert_ne!(
        c.code,
        cc::SUCCESS,
        "a transfer into unmapped memory cannot succeed"
    );
    ram.replace(full);
    if ep_state(&d, slot, BULK_IN) == 2 {
        recover(&mut d, slot, BULK_IN);
    }
    let (code, n) = d.bulk(slot, BULK_IN, &[(a, 512)]);
    assert_eq!((code, n), (cc::SUCCESS, 512));
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}
