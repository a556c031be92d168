//! Register-level behaviour the guests rely on: identity and USBLEGSUP,
//! no MSI, the I/O BAR at any width, HCRESET inside the write, HCHalted
//! following RS, port connect/reset/enable and change bits, partial writes
//! that must not clear other write-1-to-clear bits, missing ports, INTx.

use std::sync::{Arc, Mutex};

use super::regs::*;
use super::*;
use crate::pci::{InterruptTransport, MsiMessage, PciFunction};
use crate::UsbStorage;

#[derive(Debug, Clone, Default)]
struct Irq(Arc<Mutex<bool>>);

impl InterruptTransport for Irq {
    fn set_intx(&mut self, level: bool) {
        *self.0.lock().unwrap() = level;
    }
    fn send_msi(&mut self, _: MsiMessage) {
        panic!("UHCI has no MSI");
    }
}

fn func() -> (PciFunction<Uhci>, Irq) {
    let ram = GuestRam::anonymous(1 << 20);
    let irq = Irq::default();
    let mut f = PciFunction::new(Uhci::new(ram), Box::new(irq.clone()));
    f.config_write(0x20, &0xc001u32.to_le_bytes());
    f.config_write(0x04, &5u16.to_le_bytes());
    (f, irq)
}

fn r16(f: &mut PciFunction<Uhci>, off: u64) -> u16 {
    let mut b = [0u8; 2];
    f.bar_read(4, off, &mut b);
    u16::from_le_bytes(b)
}

fn w16(f: &mut PciFunction<Uhci>, off: u64, v: u16) {
    f.bar_write(4, off, &v.to_le_bytes());
}

fn stick(speed: Speed) -> Box<UsbStorage> {
    let mut file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut file, &vec![0u8; 1 << 20]).unwrap();
    Box::new(UsbStorage::from_file(file, false, speed).unwrap())
}

/// A low-speed device that never answers (a keyboard-shaped stand-in).
#[derive(Debug)]
struct LowSpeed;

impl UsbDevice for LowSpeed {
    fn name(&self) -> String {
        "low-speed".into()
    }
    fn speed(&self) -> Speed {
        Speed::Low
    }
    fn reset(&mut self) {}
    fn submit(&mut self, xfer: crate::usb::Transfer) {
        xfer.complete(crate::usb::TransferStatus::Stall, 0);
    }
    fn cancel(&mut self, _: TransferId) {}
}

#[test]
fn identity_legsup_and_no_msi() {
    let (mut f, _) = func();
    let mut id = [0u8; 4];
    f.config_read(0, &mut id);
    assert_eq!(id, [0x86, 0x80, 0x20, 0x70], "PIIX3 USB");
    let mut class = [0u8; 4];
    f.config_read(8, &mut class);
    assert_eq!(&class[1..], &[0x00, 0x03, 0x0c], "prog-if 0 (UHCI), USB");
    let mut bar = [0u8; 4];
    f.config_write(0x20, &0xffff_ffffu32.to_le_bytes());
    f.config_read(0x20, &mut bar);
    assert_eq!(u32::from_le_bytes(bar), 0xffff_ffe1, "32-byte I/O BAR");
    // USBLEGSUP: PIRQDEN set at reset; Linux's RWC write and 0x2000.
    let mut leg = [0u8; 2];
    f.config_read(0xc0, &mut leg);
    assert_eq!(u16::from_le_bytes(leg), 0x2000);
    f.config_write(0xc0, &0x8f00u16.to_le_bytes());
    f.config_read(0xc0, &mut leg);
    assert_eq!(
        u16::from_le_bytes(leg),
        0x0000,
        "no status bits, PIRQDEN writable"
    );
    f.config_write(0xc0, &0x2000u16.to_le_bytes());
    f.config_read(0xc0, &mut leg);
    assert_eq!(u16::from_le_bytes(leg), 0x2000);
    // The capability list holds no MSI (INTx only).
    let mut p = [0u8; 1];
    f.config_read(0x34, &mut p);
    let mut cap = p[0];
    let mut n = 0;
    while cap != 0 && n < 8 {
        let mut c = [0u8; 2];
        f.config_read(u16::from(cap), &mut c);
        assert_ne!(c[0], 0x05, "MSI capability present");
        assert_ne!(c[0], 0x11, "MSI-X capability present");
        cap = c[1];
        n += 1;
    }
}

#[test]
fn hcreset_halted_and_registers_at_every_width() {
    let (mut f, _) = func();
    assert_eq!(r16(&mut f, REG_USBSTS), STS_HCH, "halted at power-on");
    assert_eq!(r16(&mut f, REG_SOFMOD) & 0xff, 0x40);
    w16(&mut f, REG_USBCMD, CMD_RS | CMD_CF);
    assert_eq!(r16(&mut f, REG_USBSTS) & STS_HCH, 0, "running at once");
    w16(&mut f, REG_USBCMD, CMD_CF);
    assert_ne!(r16(&mut f, REG_USBSTS) & STS_HCH, 0, "halted at once");
    // FLBASEADD as a dword, as two words; its low 12 bits read 0.
    f.bar_write(4, REG_FLBASEADD, &0x0012_3fffu32.to_le_bytes());
    let mut d = [0u8; 4];
    f.bar_read(4, REG_FLBASEADD, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x0012_3000);
    w16(&mut f, 0x0a, 0x0045);
    f.bar_read(4, REG_FLBASEADD, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x0045_3000);
    // A dword at 0 is USBCMD and USBSTS.
    f.bar_read(4, 0, &mut d);
    assert_eq!(
        u32::from_le_bytes(d),
        u32::from(CMD_CF) | (u32::from(STS_HCH) << 16)
    );
    // Byte access to SOFMOD.
    f.bar_write(4, REG_SOFMOD, &[0x3f]);
    let mut b = [0u8; 1];
    f.bar_read(4, REG_SOFMOD, &mut b);
    assert_eq!(b[0], 0x3f);
    w16(&mut f, REG_USBCMD, CMD_HCRESET);
    assert_eq!(
        r16(&mut f, REG_USBCMD),
        0,
        "HCRESET self-clears inside the write"
    );
    f.bar_read(4, REG_FLBASEADD, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0, "registers back to defaults");
    assert_eq!(r16(&mut f, REG_SOFMOD) & 0xff, 0x40);
}

#[test]
fn ports_connect_reset_enable_and_missing_ports() {
    let (mut f, _) = func();
    assert_eq!(
        r16(&mut f, REG_PORTSC),
        PORT_ALWAYS1,
        "empty port: bit 7 only"
    );
    assert_eq!(r16(&mut f, REG_PORTSC + 4), PORT_MISSING, "no third port");
    assert_eq!(r16(&mut f, REG_PORTSC + 6), PORT_MISSING);
    f.controller_mut().attach_at(2, Box::new(LowSpeed)).unwrap();
    let sc = r16(&mut f, REG_PORTSC + 2);
    assert_eq!(
        sc & (PORT_CCS | PORT_CSC | PORT_LSDA),
        PORT_CCS | PORT_CSC | PORT_LSDA,
        "{sc:#x}"
    );
    assert_eq!(sc & PORT_LS, PORT_LS_LS_J, "a low-speed J state");
    // Writing 0 to CSC keeps it; writing 1 clears it.
    w16(&mut f, REG_PORTSC + 2, sc & !PORT_RWC);
    assert_ne!(r16(&mut f, REG_PORTSC + 2) & PORT_CSC, 0);
    w16(&mut f, REG_PORTSC + 2, (sc & !PORT_RWC) | PORT_CSC);
    assert_eq!(r16(&mut f, REG_PORTSC + 2) & PORT_CSC, 0);
    // Reset: disabled while PR; enabled by software afterwards.
    w16(&mut f, REG_PORTSC + 2, PORT_PR);
    assert_eq!(r16(&mut f, REG_PORTSC + 2) & (PORT_PR | PORT_PE), PORT_PR);
    w16(&mut f, REG_PORTSC + 2, 0);
    w16(&mut f, REG_PORTSC + 2, PORT_PE);
    let sc = r16(&mut f, REG_PORTSC + 2);
    assert_eq!(
        sc & (PORT_PE | PORT_PR | PORT_CCS),
        PORT_PE | PORT_CCS,
        "{sc:#x}"
    );
    // A byte write to the high half keeps the low half (PE stays on).
    f.bar_write(4, REG_PORTSC + 3, &[0x10]);
    assert_eq!(
        r16(&mut f, REG_PORTSC + 2) & (PORT_PE | PORT_SUSP),
        PORT_PE | PORT_SUSP
    );
    // Unplug: CCS off, CSC and PEC on.
    assert!(f.controller_mut().detach(2).is_some());
    let sc = r16(&mut f, REG_PORTSC + 2);
    assert_eq!(
        sc & (PORT_CCS | PORT_PE | PORT_CSC | PORT_PEC),
        PORT_CSC | PORT_PEC,
        "{sc:#x}"
    );
    // Enabling an empty port does nothing.
    w16(&mut f, REG_PORTSC + 2, PORT_PE);
    assert_eq!(r16(&mut f, REG_PORTSC + 2) & PORT_PE, 0);
}

#[test]
fn fast_devices_are_refused() {
    let (mut f, _) = func();
    let e = f.controller_mut().attach(stick(Speed::High)).unwrap_err();
    assert_eq!(e, AttachError::TooFast(Speed::High));
    assert!(e.to_string().contains("full and low speed only"));
    assert!(f.controller_mut().attach(stick(Speed::Full)).is_ok());
    assert!(f.controller_mut().attach(stick(Speed::Full)).is_ok());
    assert_eq!(
        f.controller_mut().attach(stick(Speed::Full)).unwrap_err(),
        AttachError::NoFreePort
    );
}

#[test]
fn hcreset_shows_connected_devices_again() {
    let (mut f, _) = func();
    f.controller_mut().attach(stick(Speed::Full)).unwrap();
    w16(&mut f, REG_PORTSC, PORT_CSC | PORT_PE);
    assert_eq!(r16(&mut f, REG_PORTSC) & (PORT_CSC | PORT_PE), PORT_PE);
    w16(&mut f, REG_USBCMD, CMD_HCRESET);
    let sc = r16(&mut f, REG_PORTSC);
    assert_eq!(
        sc & (PORT_CCS | PORT_CSC | PORT_PE),
        PORT_CCS | PORT_CSC,
        "{sc:#x}"
    );
}

#[test]
fn interrupt_enables_gate_intx() {
    let (mut f, irq) = func();
    f.controller_mut().int_ioc = true;
    f.process();
    assert!(!*irq.0.lock().unwrap(), "USBINT without IOC enable");
    assert_ne!(
        r16(&mut f, REG_USBSTS) & STS_USBINT,
        0,
        "but the status bit is set"
    );
    w16(&mut f, REG_USBINTR, INTR_IOC);
    assert!(*irq.0.lock().unwrap(), "IOC enabled: INTx");
    w16(&mut f, REG_USBSTS, STS_USBINT);
    assert!(!*irq.0.lock().unwrap(), "cleared");
    // A Host Process Error interrupts whatever the enables.
    w16(&mut f, REG_USBINTR, 0);
    f.controller_mut().usbsts |= STS_HCPE;
    f.process();
    assert!(*irq.0.lock().unwrap());
}

/// Selective suspend and device-initiated resume: the device hears of
/// Suspend and of its end; its remote wakeup on a suspended port sets the
/// port's Resume Detect, and in global suspend also USBSTS.RD (the Resume
/// interrupt, if enabled) and USBCMD.FGR; software's clear of Suspend
/// and RD ends it. An unsuspended port ignores the request.
#[test]
fn remote_wakeup_sets_resume_detect() {
    use crate::usb::sleeper::Sleeper;
    let (mut f, irq) = func();
    let dev = Sleeper::new(Speed::Full);
    f.controller_mut()
        .attach_at(1, Box::new(dev.clone()))
        .unwrap();
    w16(&mut f, REG_USBCMD, CMD_RS);
    w16(&mut f, REG_PORTSC, PORT_CSC | PORT_PR);
    w16(&mut f, REG_PORTSC, 0);
    w16(&mut f, REG_PORTSC, PORT_PE);
    dev.signal_wakeup();
    f.process();
    assert_eq!(r16(&mut f, REG_PORTSC) & PORT_RD, 0);
    dev.state.lock().unwrap().wake = false;

    // Selective suspend, controller running: only the port shows it.
    w16(&mut f, REG_PORTSC, PORT_PE | PORT_SUSP);
    assert_eq!(dev.suspends(), vec![true]);
    dev.signal_wakeup();
    f.process();
    assert_eq!(
        r16(&mut f, REG_PORTSC) & (PORT_RD | PORT_SUSP | PORT_PE),
        PORT_RD | PORT_SUSP | PORT_PE
    );
    assert_eq!(r16(&mut f, REG_USBSTS) & STS_RD, 0);
    w16(&mut f, REG_PORTSC, PORT_PE);
    assert_eq!(r16(&mut f, REG_PORTSC) & (PORT_RD | PORT_SUSP), 0);
    assert_eq!(dev.suspends(), vec![true, false]);

    // Global suspend (Linux's suspend_rh): stopped, EGSM, resume interrupt.
    w16(&mut f, REG_PORTSC, PORT_PE | PORT_SUSP);
    w16(&mut f, REG_USBINTR, INTR_RESUME);
    w16(&mut f, REG_USBCMD, 0);
    w16(&mut f, REG_USBCMD, CMD_EGSM);
    assert!(!*irq.0.lock().unwrap());
    dev.signal_wakeup();
    f.process();
    assert_ne!(r16(&mut f, REG_USBSTS) & STS_RD, 0);
    assert_ne!(r16(&mut f, REG_USBCMD) & CMD_FGR, 0);
    assert_ne!(r16(&mut f, REG_PORTSC) & PORT_RD, 0);
    assert!(*irq.0.lock().unwrap(), "resume interrupt");
}
