//! Register-level behaviour the guests rely on: capabilities, HCRESET and
//! HCHalted settling inside the write, the BIOS -> OS handoff, FRINDEX from
//! the clock, port power/reset/enable and change bits, partial writes that
//! must not clear other write-1-to-clear bits, interrupts.

use std::sync::{Arc, Mutex};

use super::regs::*;
use super::*;
use crate::pci::{InterruptTransport, MsiMessage, PciFunction};
use crate::UsbStorage;

#[derive(Debug, Clone, Default)]
struct Irq(Arc<Mutex<(bool, Vec<MsiMessage>)>>);

impl InterruptTransport for Irq {
    fn set_intx(&mut self, level: bool) {
        self.0.lock().unwrap().0 = level;
    }
    fn send_msi(&mut self, m: MsiMessage) {
        self.0.lock().unwrap().1.push(m);
    }
}

fn func() -> (PciFunction<Ehci>, Irq) {
    let ram = GuestRam::anonymous(1 << 20);
    let irq = Irq::default();
    let mut f = PciFunction::new(Ehci::new(ram), Box::new(irq.clone()));
    f.config_write(0x04, &6u16.to_le_bytes());
    (f, irq)
}

fn r32(f: &mut PciFunction<Ehci>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    f.bar_read(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(f: &mut PciFunction<Ehci>, off: u64, v: u32) {
    f.bar_write(0, off, &v.to_le_bytes());
}

fn stick() -> Box<UsbStorage> {
    let file = tempfile_1m();
    Box::new(UsbStorage::from_file(file, false, Speed::High).unwrap())
}

fn tempfile_1m() -> std::fs::File {
    let dir = std::env::temp_dir().join(format!(
        "ehci-unit-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("stick.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap()
}

#[test]
fn identity_and_capabilities() {
    let (mut f, _) = func();
    let mut id = [0u8; 4];
    f.config_read(0, &mut id);
    assert_eq!(id, [0x86, 0x80, 0xcd, 0x24]);
    let mut class = [0u8; 4];
    f.config_read(8, &mut class);
    assert_eq!(
        &class[1..],
        &[0x20, 0x03, 0x0c],
        "prog-if 0x20, USB, serial bus"
    );
    let mut sbrn = [0u8; 2];
    f.config_read(0x60, &mut sbrn);
    assert_eq!(sbrn, [0x20, 0x20], "SBRN USB 2.0, FLADJ default");
    assert_eq!(r32(&mut f, 0), 0x0100_0020, "CAPLENGTH and HCIVERSION");
    // One-byte reads (Windows XP reads CAPLENGTH and EECP bytewise).
    let mut b = [0u8; 1];
    f.bar_read(0, 0x09, &mut b);
    assert_eq!(b[0], EECP);
    let hcs = r32(&mut f, 4);
    assert_eq!(hcs & 0xf, N_PORTS as u32);
    assert_eq!(hcs & 0xff00, 0, "no companion controllers");
    assert_eq!(r32(&mut f, 8) & 1, 0, "32-bit addressing only");
}

#[test]
fn bios_to_os_handoff_completes() {
    let (mut f, _) = func();
    let leg = u16::from(EECP);
    let mut v = [0u8; 4];
    f.config_read(leg, &mut v);
    assert_eq!(v, [1, 0, 0, 0], "USBLEGSUP: ID 1, nobody owns it");
    // Firmware claims it, then the OS asks: the BIOS lets go at once.
    f.config_write(leg + 2, &[1]);
    f.config_read(leg, &mut v);
    assert_eq!(v[2], 1);
    f.config_write(leg + 3, &[1]);
    f.config_read(leg, &mut v);
    assert_eq!((v[2], v[3]), (0, 1), "BIOS owned cleared, OS owned set");
    // USBLEGCTLSTS: enables stored, SMI status never set.
    f.config_write(leg + 4, &0xffff_ffffu32.to_le_bytes());
    f.config_read(leg + 4, &mut v);
    assert_eq!(u32::from_le_bytes(v), 0xe03f);
}

#[test]
fn reset_and_halt_settle_inside_the_write() {
    let (mut f, _) = func();
    let op = CAP_LENGTH;
    w32(&mut f, op + OP_USBCMD, CMD_RS);
    assert_eq!(r32(&mut f, op + OP_USBSTS) & STS_HCHALTED, 0);
    w32(&mut f, op + OP_USBCMD, 0);
    assert_ne!(r32(&mut f, op + OP_USBSTS) & STS_HCHALTED, 0);
    w32(&mut f, op + OP_USBINTR, 0x3f);
    w32(&mut f, op + OP_USBCMD, CMD_HCRESET);
    assert_eq!(
        r32(&mut f, op + OP_USBCMD),
        CMD_DEFAULT,
        "HCRESET self-clears"
    );
    assert_eq!(r32(&mut f, op + OP_USBINTR), 0);
    // ASE/PSE status follow their enables at once.
    w32(&mut f, op + OP_USBCMD, CMD_RS | CMD_ASE | CMD_PSE);
    let sts = r32(&mut f, op + OP_USBSTS);
    assert_eq!(sts & (STS_ASS | STS_PSS), STS_ASS | STS_PSS);
    w32(&mut f, op + OP_USBCMD, CMD_RS);
    assert_eq!(r32(&mut f, op + OP_USBSTS) & (STS_ASS | STS_PSS), 0);
}

#[test]
fn frindex_follows_the_clock_only_while_running() {
    let (mut f, _) = func();
    let op = CAP_LENGTH;
    w32(&mut f, op + OP_FRINDEX, 0x100);
    assert_eq!(r32(&mut f, op + OP_FRINDEX), 0x100);
    w32(&mut f, op + OP_USBCMD, CMD_RS);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let a = r32(&mut f, op + OP_FRINDEX);
    assert!(
        a >= 0x100 + 8 * 4,
        "advanced at 8 micro-frames a ms: {a:#x}"
    );
    // Writes while running are ignored.
    w32(&mut f, op + OP_FRINDEX, 0);
    assert!(r32(&mut f, op + OP_FRINDEX) >= a);
    w32(&mut f, op + OP_USBCMD, 0);
    let b = r32(&mut f, op + OP_FRINDEX);
    std::thread::sleep(std::time::Duration::from_millis(3));
    assert_eq!(r32(&mut f, op + OP_FRINDEX), b, "frozen while halted");
}

#[test]
fn ports_connect_reset_enable_and_change_bits() {
    let (mut f, irq) = func();
    let op = CAP_LENGTH;
    let ps = |p: u64| op + OP_PORTSC + 4 * (p - 1);
    f.controller_mut().attach_at(3, 0, stick()).unwrap();
    // Before CONFIGFLAG every port belongs to the (absent) companion.
    assert_ne!(r32(&mut f, ps(3)) & PORT_PO, 0);
    assert_eq!(r32(&mut f, ps(3)) & PORT_CCS, 0);
    w32(&mut f, op + OP_USBINTR, STS_PCD);
    w32(&mut f, op + OP_USBCMD, CMD_RS);
    w32(&mut f, op + OP_CONFIGFLAG, 1);
    let v = r32(&mut f, ps(3));
    assert_eq!(
        v & (PORT_CCS | PORT_CSC | PORT_PP),
        PORT_CCS | PORT_CSC | PORT_PP
    );
    assert_eq!(v & PORT_LS, PORT_LS_J);
    assert_ne!(r32(&mut f, op + OP_USBSTS) & STS_PCD, 0);
    assert!(irq.0.lock().unwrap().0, "INTx up for the port change");
    // The hub on root port 1 is connected too.
    assert_ne!(r32(&mut f, ps(1)) & PORT_CCS, 0);
    // A byte write of PR must not clear CSC (write-1-to-clear bits of
    // the other bytes are left alone).
    f.bar_write(0, ps(3) + 1, &[1]);
    let v = r32(&mut f, ps(3));
    assert_ne!(v & PORT_PR, 0);
    assert_ne!(v & PORT_CSC, 0, "CSC survived a partial write");
    f.bar_write(0, ps(3) + 1, &[0]);
    let v = r32(&mut f, ps(3));
    assert_eq!(
        v & (PORT_PR | PORT_PED),
        PORT_PED,
        "reset done, high speed enabled"
    );
    assert_eq!(v & PORT_PEDC, 0, "enabling by reset sets no change bit");
    // Software cannot enable a port, only disable it.
    w32(&mut f, ps(3), (v & !PORT_RWC) & !PORT_PED);
    assert_eq!(r32(&mut f, ps(3)) & PORT_PED, 0);
    w32(&mut f, ps(3), v & !PORT_RWC | PORT_PED);
    assert_eq!(r32(&mut f, ps(3)) & PORT_PED, 0);
    // Clearing CSC.
    let v = r32(&mut f, ps(3));
    w32(&mut f, ps(3), v & !PORT_RWC | PORT_CSC);
    assert_eq!(r32(&mut f, ps(3)) & PORT_CSC, 0);
    w32(&mut f, op + OP_USBSTS, STS_PCD);
    assert!(!irq.0.lock().unwrap().0, "INTx down once acknowledged");
    // Unplug.
    assert!(f.controller_mut().detach(3, 0).is_some());
    let v = r32(&mut f, ps(3));
    assert_eq!(v & (PORT_CCS | PORT_CSC), PORT_CSC);
    // High speed only on root ports; SuperSpeed nowhere.
    let ram = GuestRam::anonymous(1 << 20);
    let mut e = Ehci::new(ram);
    let full = Box::new(UsbStorage::from_file(tempfile_1m(), false, Speed::Full).unwrap());
    assert_eq!(
        e.attach(full).unwrap(),
        (1, 1),
        "full speed goes behind the hub"
    );
    let sup = Box::new(UsbStorage::from_file(tempfile_1m(), false, Speed::Super).unwrap());
    assert_eq!(e.attach(sup).unwrap_err(), AttachError::SuperSpeed);
}

/// Selective suspend and device-initiated resume (§4.3.1): the device
/// hears of Suspend and of the end of the resume; its remote wakeup on a
/// suspended port sets Force Port Resume and Port Change Detect, with the
/// controller halted as Linux leaves it in bus suspend, and raises the
/// interrupt; software's FPR clear (Suspend still written as 1, as Linux
/// does) ends both. On an enabled, unsuspended port it does nothing.
#[test]
fn remote_wakeup_sets_fpr_and_pcd_even_halted() {
    use crate::usb::sleeper::Sleeper;
    let (mut f, irq) = func();
    let op = CAP_LENGTH;
    let ps = op + OP_PORTSC + 4 * 2;
    let dev = Sleeper::new(Speed::High);
    f.controller_mut()
        .attach_at(3, 0, Box::new(dev.clone()))
        .unwrap();
    w32(&mut f, op + OP_USBCMD, CMD_RS);
    w32(&mut f, op + OP_CONFIGFLAG, 1);
    let v = r32(&mut f, ps);
    w32(&mut f, ps, (v & !PORT_RWC) | PORT_CSC | PORT_PR);
    let v = r32(&mut f, ps);
    w32(&mut f, ps, v & !PORT_RWC & !PORT_PR);
    assert_ne!(r32(&mut f, ps) & PORT_PED, 0);
    w32(&mut f, op + OP_USBSTS, STS_PCD);

    dev.signal_wakeup();
    f.process();
    assert_eq!(r32(&mut f, ps) & PORT_FPR, 0, "not suspended: no resume");
    dev.state.lock().unwrap().wake = false;

    let v = r32(&mut f, ps) & !PORT_RWC;
    w32(&mut f, ps, v | PORT_SUSP);
    assert_eq!(dev.suspends(), vec![true]);
    // Bus suspend: halted, only the port change interrupt enabled.
    w32(&mut f, op + OP_USBCMD, 0);
    w32(&mut f, op + OP_USBINTR, STS_PCD);
    assert!(!irq.0.lock().unwrap().0);
    dev.signal_wakeup();
    f.process();
    let v = r32(&mut f, ps);
    assert_eq!(v & (PORT_FPR | PORT_SUSP), PORT_FPR | PORT_SUSP);
    assert_ne!(r32(&mut f, op + OP_USBSTS) & STS_PCD, 0);
    assert!(irq.0.lock().unwrap().0, "PCD interrupt while halted");
    assert_eq!(dev.suspends(), vec![true], "still resuming");
    // Linux: 20 ms later, PORTSC with FPR clear (SUSP as read).
    w32(&mut f, ps, v & !PORT_RWC & !PORT_FPR);
    assert_eq!(
        r32(&mut f, ps) & (PORT_FPR | PORT_SUSP | PORT_PED),
        PORT_PED
    );
    assert_eq!(dev.suspends(), vec![true, false]);
}
