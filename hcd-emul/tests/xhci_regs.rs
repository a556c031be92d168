//! Register-level behaviour: interrupt delivery modes, port state machine,
//! slot commands (BSR, deconfigure, evaluate, reset device), 64-bit
//! registers written whole or in halves.

mod common;

use common::fake::FakeDevice;
use common::{Driver, DATA_BASE};
use hcd_emul::usb::Speed;
use hcd_emul::xhci::context::ep_type;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::trb::{cc, ctl, ty, Trb};

fn driver_with_fake(speed: Speed) -> (Driver, usize) {
    let (dev, _st) = FakeDevice::new(speed);
    let mut d = Driver::new();
    let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    (d, port)
}

fn msix_cap(d: &mut Driver) -> u16 {
    let mut p = {
        let mut b = [0u8; 1];
        d.pci.config_read(0x34, &mut b);
        b[0] as u16
    };
    loop {
        let mut b = [0u8; 2];
        d.pci.config_read(p, &mut b);
        if b[0] == 0x11 {
            return p;
        }
        p = b[1] as u16;
        assert_ne!(p, 0);
    }
}

#[test]
fn interrupts_follow_intx_when_msi_and_msix_are_off() {
    let (mut d, port) = driver_with_fake(Speed::High);
    let cap = msix_cap(&mut d);
    d.pci.config_write(cap + 2, &0u16.to_le_bytes());
    d.start();
    d.irq.lock().unwrap().msgs.clear();
    let noop = Trb {
        parameter: 0,
        status: 0,
        control: ty::NOOP_COMMAND << 10,
    };
    let ram = d.ram.clone();
    d.cmd.push_all(&ram, &[noop]);
    d.w32(DOORBELL_OFFSET, 0);
    assert!(d.irq.lock().unwrap().intx, "INTx asserted");
    let mut st = [0u8; 2];
    d.pci.config_read(6, &mut st);
    assert!(st[0] & 0x08 != 0, "PCI status interrupt bit");
    // The handler clears IMAN.IP (W1C) and consumes the event.
    let ir0 = d.ir(0);
    d.w32(ir0, IMAN_IE | IMAN_IP);
    d.poll_events();
    assert!(!d.irq.lock().unwrap().intx, "INTx deasserted");
    assert!(d.irq.lock().unwrap().msgs.is_empty());
    let _ = port;
}

#[test]
fn interrupts_use_msi_when_enabled() {
    let (mut d, _port) = driver_with_fake(Speed::High);
    let cap = msix_cap(&mut d);
    d.pci.config_write(cap + 2, &0u16.to_le_bytes());
    // MSI capability: find id 5.
    let mut p = 0x34u16;
    let mut b = [0u8; 2];
    d.pci.config_read(p, &mut b);
    p = b[0] as u16;
    loop {
        d.pci.config_read(p, &mut b);
        if b[0] == 5 {
            break;
        }
        p = b[1] as u16;
    }
    d.pci.config_write(p + 4, &0xfee0_0000u32.to_le_bytes());
    d.pci.config_write(p + 8, &0u32.to_le_bytes());
    d.pci.config_write(p + 12, &0x4321u16.to_le_bytes());
    d.pci.config_write(p + 2, &1u16.to_le_bytes());
    d.start();
    let (code, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: ty::NOOP_COMMAND << 10,
    });
    assert_eq!(code, cc::SUCCESS);
    let msgs = d.irq.lock().unwrap().msgs.clone();
    assert!(!msgs.is_empty(), "command completion signalled by MSI");
    assert!(!msgs[0].msix);
    assert_eq!((msgs[0].address, msgs[0].data), (0xfee0_0000, 0x4321));
    // IP was cleared automatically (xHCI §4.17.5).
    assert_eq!(d.r32(d.ir(0)) & IMAN_IP, 0);
}

#[test]
fn usb2_port_polling_reset_enable_suspend_resume() {
    let (mut d, port) = driver_with_fake(Speed::High);
    d.start();
    let sc = d.portsc(port);
    assert_eq!(
        sc & (PORTSC_CCS | PORTSC_PED | PORTSC_CSC | PORTSC_PP),
        PORTSC_CCS | PORTSC_CSC | PORTSC_PP
    );
    assert_eq!((sc >> PORTSC_PLS_SHIFT) & 0xf, pls::POLLING);
    assert_eq!((sc >> PORTSC_SPEED_SHIFT) & 0xf, speed_id::HIGH);
    d.timeout = std::time::Duration::from_millis(100);
    let ev = d.wait_event(|t| t.trb_type() == ty::PORT_STATUS_CHANGE);
    d.timeout = std::time::Duration::from_secs(10);
    assert!(
        ev.is_none(),
        "no event for the state found at HCRST+run (the driver scans ports)"
    );
    d.reset_port(port);
    let ev = d
        .wait_event(|t| t.trb_type() == ty::PORT_STATUS_CHANGE)
        .expect("PRC event");
    assert_eq!(ev.parameter >> 24, port as u64);
    // Suspend (U3) then resume to U0: PLC set.
    d.write_portsc(port, PORTSC_PP | PORTSC_LWS | (pls::U3 << PORTSC_PLS_SHIFT));
    assert_eq!((d.portsc(port) >> PORTSC_PLS_SHIFT) & 0xf, pls::U3);
    d.write_portsc(
        port,
        PORTSC_PP | PORTSC_LWS | (pls::RESUME << PORTSC_PLS_SHIFT),
    );
    d.write_portsc(port, PORTSC_PP | PORTSC_LWS | (pls::U0 << PORTSC_PLS_SHIFT));
    let sc = d.portsc(port);
    assert_eq!((sc >> PORTSC_PLS_SHIFT) & 0xf, pls::U0);
    assert!(sc & PORTSC_PLC != 0);
    // PED is RW1C: writing 1 disables a USB 2 port, writing 0 does nothing.
    d.write_portsc(port, PORTSC_PP);
    assert!(d.portsc(port) & PORTSC_PED != 0);
    d.write_portsc(port, PORTSC_PP | PORTSC_PED);
    assert_eq!(d.portsc(port) & PORTSC_PED, 0);
    // Change bits clear with 1.
    d.write_portsc(port, PORTSC_PP | PORTSC_CHANGE_MASK);
    assert_eq!(d.portsc(port) & PORTSC_CHANGE_MASK, 0);
}

/// Device-initiated resume (§4.15.2.3): the device hears of the suspend
/// and resume; its remote wakeup in U3 takes a USB 2 port to Resume with
/// PLC and a Port Status Change Event, software's U0 write ends it (PLC
/// again); a USB 3 port goes straight to U0. Not in U0: no effect.
#[test]
fn remote_wakeup_resumes_a_suspended_port() {
    for speed in [Speed::High, Speed::Super] {
        let (dev, st) = FakeDevice::new(speed);
        let mut d = Driver::new();
        let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
        d.start();
        if speed == Speed::High {
            d.reset_port(port);
        }
        d.write_portsc(port, PORTSC_PP | PORTSC_CHANGE_MASK);
        d.poll_events();
        d.pending.clear();
        // A request in U0 is not a resume (the device is not suspended).
        st.lock().unwrap().wake_request = true;
        d.poll_events();
        assert_eq!((d.portsc(port) >> PORTSC_PLS_SHIFT) & 0xf, pls::U0);
        assert!(st.lock().unwrap().suspends.is_empty());

        d.write_portsc(port, PORTSC_PP | PORTSC_LWS | (pls::U3 << PORTSC_PLS_SHIFT));
        assert_eq!(st.lock().unwrap().suspends, vec![true]);
        st.lock().unwrap().wake_request = true;
        let ev = d
            .wait_event(|t| t.trb_type() == ty::PORT_STATUS_CHANGE)
            .expect("port status change on remote wakeup");
        assert_eq!(ev.parameter >> 24, port as u64);
        let sc = d.portsc(port);
        assert!(sc & PORTSC_PLC != 0);
        if speed == Speed::High {
            assert_eq!((sc >> PORTSC_PLS_SHIFT) & 0xf, pls::RESUME);
            assert_eq!(st.lock().unwrap().suspends, vec![true]);
            d.write_portsc(port, PORTSC_PP | PORTSC_PLC);
            d.write_portsc(port, PORTSC_PP | PORTSC_LWS | (pls::U0 << PORTSC_PLS_SHIFT));
            d.wait_event(|t| t.trb_type() == ty::PORT_STATUS_CHANGE)
                .expect("PLC on reaching U0");
        }
        let sc = d.portsc(port);
        assert_eq!((sc >> PORTSC_PLS_SHIFT) & 0xf, pls::U0);
        assert!(sc & PORTSC_PLC != 0);
        assert_eq!(st.lock().unwrap().suspends, vec![true, false]);
    }
}

#[test]
fn usb3_warm_reset_sets_wrc_and_prc() {
    let (mut d, port) = driver_with_fake(Speed::Super);
    d.start();
    d.write_portsc(port, PORTSC_PP | PORTSC_CHANGE_MASK);
    d.write_portsc(port, PORTSC_PP | PORTSC_WPR);
    let sc = d.portsc(port);
    assert_eq!(
        sc & (PORTSC_WRC | PORTSC_PRC | PORTSC_PED),
        PORTSC_WRC | PORTSC_PRC | PORTSC_PED
    );
    assert_eq!(sc & PORTSC_WPR, 0);
    // Empty port: nothing connected, RxDetect, and a reset does nothing.
    let empty = USB2_PORTS + 2;
    let sc = d.portsc(empty);
    assert_eq!(sc & PORTSC_CCS, 0);
    d.write_portsc(empty, PORTSC_PP | PORTSC_PR);
    assert_eq!(d.portsc(empty) & (PORTSC_PED | PORTSC_PRC), 0);
}

#[test]
fn address_device_with_bsr_then_without() {
    let (mut d, port) = driver_with_fake(Speed::High);
    d.start();
    d.reset_port(port);
    let (code, slot) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: ty::ENABLE_SLOT << 10,
    });
    assert_eq!(code, cc::SUCCESS);
    let out = d.alloc(1024, 64);
    let inp = d.alloc(33 * 32, 64);
    d.ram
        .write(d.dcbaa + 8 * slot as u64, &out.to_le_bytes())
        .unwrap();
    let ring = d.alloc(16 * 16, 64);
    d.write_ctx(inp, 0, [0, 3, 0, 0, 0, 0, 0, 0]);
    d.write_ctx(
        inp,
        1,
        [(1 << 27) | (3 << 20), (port as u32) << 16, 0, 0, 0, 0, 0, 0],
    );
    d.write_ctx(
        inp,
        2,
        [
            0,
            (3 << 1) | (4 << 3) | (64 << 16),
            ring as u32 | 1,
            0,
            8,
            0,
            0,
            0,
        ],
    );
    let addr = |bsr: bool| Trb {
        parameter: inp,
        status: 0,
        control: (ty::ADDRESS_DEVICE << 10)
            | ((slot as u32) << 24)
            | if bsr { ctl::BSR } else { 0 },
    };
    assert_eq!(d.command(addr(true)).0, cc::SUCCESS);
    assert_eq!(d.read_ctx(out, 0)[3], 1 << 27, "Default state, address 0");
    assert_eq!(
        d.command(addr(true)).0,
        cc::CONTEXT_STATE_ERROR,
        "BSR=1 from Default"
    );
    assert_eq!(d.command(addr(false)).0, cc::SUCCESS);
    assert_eq!(d.read_ctx(out, 0)[3], (2 << 27) | slot as u32, "Addressed");
    assert_eq!(
        d.command(addr(false)).0,
        cc::CONTEXT_STATE_ERROR,
        "already addressed"
    );
}

#[test]
fn configure_deconfigure_evaluate_and_reset_device() {
    let (mut d, port) = driver_with_fake(Speed::High);
    d.start();
    let slot = d.address(port);
    assert_eq!(
        d.configure(slot, &[(3, ep_type::BULK_IN, 512, 0)]),
        cc::SUCCESS
    );
    let out = d.slots[&slot].out_ctx;
    assert_eq!(d.read_ctx(out, 0)[3] >> 27, 3, "Configured");
    // Evaluate Context: EP0 max packet 64 -> 512.
    let inp = d.slots[&slot].in_ctx;
    d.write_ctx(inp, 0, [0, 2, 0, 0, 0, 0, 0, 0]);
    d.write_ctx(inp, 2, [0, (4 << 3) | (512 << 16), 0, 0, 0, 0, 0, 0]);
    let eval = Trb {
        parameter: inp,
        status: 0,
        control: (ty::EVALUATE_CONTEXT << 10) | ((slot as u32) << 24),
    };
    assert_eq!(d.command(eval).0, cc::SUCCESS);
    assert_eq!(d.read_ctx(out, 1)[1] >> 16, 512);
    // Deconfigure.
    let dc = Trb {
        parameter: 0,
        status: 0,
        control: (ty::CONFIGURE_ENDPOINT << 10) | ctl::DC | ((slot as u32) << 24),
    };
    assert_eq!(d.command(dc).0, cc::SUCCESS);
    assert_eq!(d.read_ctx(out, 0)[3] >> 27, 2, "Addressed again");
    let stop = Trb {
        parameter: 0,
        status: 0,
        control: (ty::STOP_ENDPOINT << 10) | ((slot as u32) << 24) | (3 << 16),
    };
    assert_eq!(d.command(stop).0, cc::ENDPOINT_NOT_ENABLED);
    // Reset Device: back to Default with address 0.
    assert_eq!(
        d.configure(slot, &[(3, ep_type::BULK_IN, 512, 0)]),
        cc::SUCCESS
    );
    let rd = Trb {
        parameter: 0,
        status: 0,
        control: (ty::RESET_DEVICE << 10) | ((slot as u32) << 24),
    };
    assert_eq!(d.command(rd).0, cc::SUCCESS);
    assert_eq!(d.read_ctx(out, 0)[3], 1 << 27);
    assert_eq!(d.command(stop).0, cc::ENDPOINT_NOT_ENABLED);
    // No Op command.
    let (code, s) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: ty::NOOP_COMMAND << 10,
    });
    assert_eq!((code, s), (cc::SUCCESS, 0));
}

#[test]
fn sixty_four_bit_registers_whole_or_in_halves() {
    let (mut d, _port) = driver_with_fake(Speed::High);
    d.start();
    let op = d.op();
    d.w32(op + OP_USBCMD, 0);
    d.pci
        .bar_write(0, op + OP_DCBAAP, &0x1234_5678_9abc_de40u64.to_le_bytes());
    let mut b = [0u8; 8];
    d.pci.bar_read(0, op + OP_DCBAAP, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678_9abc_de40);
    d.w32(op + OP_DCBAAP + 4, 0);
    assert_eq!(d.r32(op + OP_DCBAAP + 4), 0);
    assert_eq!(d.r32(op + OP_DCBAAP), 0x9abc_de40);
    // CRCR reads back 0 except CRR.
    d.pci
        .bar_write(0, op + OP_CRCR, &0xdead_beef_0000_0041u64.to_le_bytes());
    assert_eq!(d.r32(op + OP_CRCR), 0);
    // Byte read of CAPLENGTH and 16-bit read of HCIVERSION.
    let mut one = [0u8; 1];
    d.pci.bar_read(0, 0, &mut one);
    assert_eq!(one[0] as u64, CAP_LENGTH);
    let mut two = [0u8; 2];
    d.pci.bar_read(0, 2, &mut two);
    assert_eq!(u16::from_le_bytes(two) as u32, HCI_VERSION);
}

#[test]
fn event_data_trb_reports_accumulated_length() {
    let (mut d, port) = driver_with_fake(Speed::High);
    d.start();
    let slot = d.address(port);
    assert_eq!(
        d.configure(slot, &[(4, ep_type::BULK_OUT, 512, 0)]),
        cc::SUCCESS
    );
    let trbs = [
        Trb {
            parameter: DATA_BASE,
            status: 1000,
            control: (ty::NORMAL << 10) | ctl::CHAIN,
        },
        Trb {
            parameter: DATA_BASE + 1000,
            status: 24,
            control: (ty::NORMAL << 10) | ctl::CHAIN,
        },
        Trb {
            parameter: 0xabcd_0000,
            status: 0,
            control: (ty::EVENT_DATA << 10) | ctl::IOC,
        },
    ];
    d.queue(slot, 4, &trbs);
    let ev = d
        .wait_event(|t| t.trb_type() == ty::TRANSFER_EVENT)
        .unwrap();
    assert_eq!(ev.parameter, 0xabcd_0000);
    assert!(ev.control & ctl::ED != 0);
    assert_eq!(
        (ev.status >> 24, ev.status & 0xff_ffff),
        (cc::SUCCESS, 1024)
    );
}
