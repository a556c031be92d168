//! Fuzzes the whole EHCI through its PCI function: fuzzed guest memory
//! (frame list, QHs, qTDs, iTDs, siTDs) and fuzzed register, port and
//! config accesses, with a high-speed stick on a root port and a
//! full-speed stick behind the built-in hub.
//!
//! Input: the first half (at most 16 KiB) seeds guest RAM at 0; the rest
//! is a sequence of 8-byte operations. A prelude brings the controller up
//! the way a driver would (frame list at 0x1000, async list at 0x2000,
//! run, CONFIGFLAG, both schedules on).
#![no_main]

use hcd_emul::ehci::regs::*;
use hcd_emul::ehci::Ehci;
use hcd_emul::pci::{InterruptTransport, MsiMessage, PciFunction};
use hcd_emul::usb::Speed;
use hcd_emul::{GuestRam, UsbStorage};
use hcd_emul_fuzz::{image, run_small_stack};
use libfuzzer_sys::fuzz_target;

const RAM: usize = 256 << 10;
const SEED: usize = 16 << 10;

#[derive(Debug)]
struct NoIrq;
impl InterruptTransport for NoIrq {
    fn set_intx(&mut self, _level: bool) {}
    fn send_msi(&mut self, _msg: MsiMessage) {}
}

fn stick(speed: Speed) -> Option<Box<UsbStorage>> {
    // The process's shared stick image (hcd_emul_fuzz::image).
    UsbStorage::from_file(image(), false, speed).ok().map(Box::new)
}

fn w32(pci: &mut PciFunction<Ehci>, off: u64, v: u32) {
    pci.bar_write(0, off, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    run_small_stack(data, run);
});

fn run(data: &[u8]) {
    let ram = GuestRam::anonymous(RAM);
    let seed = (data.len() / 2).min(SEED);
    let _ = ram.write(0, &data[..seed]);
    let mut e = Ehci::new(ram.clone());
    if let Some(s) = stick(Speed::High) {
        let _ = e.attach(s);
    }
    if let Some(s) = stick(Speed::Full) {
        let _ = e.attach(s);
    }
    let mut pci = PciFunction::new(e, Box::new(NoIrq));
    pci.config_write(0x04, &6u16.to_le_bytes());
    let op = CAP_LENGTH;
    w32(&mut pci, op + OP_PERIODICLISTBASE, 0x1000);
    w32(&mut pci, op + OP_ASYNCLISTADDR, 0x2000);
    w32(&mut pci, op + OP_USBCMD, CMD_RS | CMD_DEFAULT);
    w32(&mut pci, op + OP_CONFIGFLAG, 1);
    w32(&mut pci, op + OP_USBINTR, 0x3f);
    w32(&mut pci, op + OP_USBCMD, CMD_RS | CMD_ASE | CMD_PSE | CMD_DEFAULT);

    for op8 in data[seed..].chunks_exact(8).take(4096) {
        let v = u32::from_le_bytes([op8[4], op8[5], op8[6], op8[7]]);
        let a = u64::from(u16::from_le_bytes([op8[1], op8[2]]));
        match op8[0] % 11 {
            0 => w32(&mut pci, (a * 4) % BAR0_SIZE, v),
            1 => {
                let mut b = [0u8; 4];
                pci.bar_read(0, (a * 4) % BAR0_SIZE, &mut b);
            }
            2 => {
                let _ = ram.write((a * 4) % SEED as u64, &v.to_le_bytes());
            }
            3 => pci.process(),
            4 => {
                let port = a % N_PORTS as u64;
                w32(&mut pci, op + OP_PORTSC + 4 * port, v);
            }
            5 => pci.config_write((a % 256) as u16, &v.to_le_bytes()),
            6 => {
                let x = pci.controller_mut();
                let (root, hub) = if a & 1 == 0 { (2, 0) } else { (1, 1) };
                if x.detach(root, hub).is_none() {
                    let speed = if hub == 0 { Speed::High } else { Speed::Full };
                    if let Some(s) = stick(speed) {
                        let _ = x.attach_at(root, hub, s);
                    }
                }
            }
            7 => {
                // Port reset cycle on a root port.
                let p = op + OP_PORTSC + 4 * (a % N_PORTS as u64);
                w32(&mut pci, p, PORT_PR);
                w32(&mut pci, p, 0);
            }
            8 => {
                let mut b = [0u8; 8];
                let len = (op8[3] as usize % 4) + 1;
                pci.bar_read(0, a % (BAR0_SIZE + 64), &mut b[..len]);
                pci.bar_write(0, a % (BAR0_SIZE + 64), &b[..len]);
            }
            9 => {
                // A qTD-shaped record at a 32-byte boundary: links into the
                // seed area, an active token.
                let addr = (a * 32) % SEED as u64;
                let mut t = [0u8; 32];
                t[0..4].copy_from_slice(&((v & 0x3fe0) | u32::from(op8[3] & 1)).to_le_bytes());
                t[4..8].copy_from_slice(&(((v >> 14) & 0x3fe0) | 1).to_le_bytes());
                let tok = 0x80 | (u32::from(op8[3] & 3) << 8) | ((v & 0x7fff) << 16);
                t[8..12].copy_from_slice(&tok.to_le_bytes());
                t[12..16].copy_from_slice(&(v & 0x3fff).to_le_bytes());
                let _ = ram.write(addr, &t);
            }
            _ => {
                // A QH-shaped record: link (type QH) into the seed area,
                // endpoint characteristics from the input.
                let addr = (a * 32) % SEED as u64;
                let mut q = [0u8; 48];
                q[0..4].copy_from_slice(&((v & 0x3fe0) | 2).to_le_bytes());
                q[4..8].copy_from_slice(&(v.rotate_left(7) | (64 << 16)).to_le_bytes());
                q[8..12].copy_from_slice(&u32::from(op8[3]).to_le_bytes());
                q[16..20].copy_from_slice(&((v >> 3) & 0x3fe0).to_le_bytes());
                let _ = ram.write(addr, &q);
            }
        }
    }
    pci.reset();
    assert_eq!(pci.controller().transfers_in_flight(), 0);
}
