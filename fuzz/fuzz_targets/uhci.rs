//! Fuzzes the whole UHCI through its PCI function: fuzzed guest memory
//! (frame list, QHs, TDs) and fuzzed register, port and config accesses at
//! every width, with a full-speed stick on each port.
//!
//! Input: the first half (at most 16 KiB) seeds guest RAM at 0; the rest
//! is a sequence of 8-byte operations. A prelude brings the controller up
//! the way a driver would (frame list at 0x1000, ports reset and enabled,
//! run).
#![no_main]

use hcd_emul::pci::{InterruptTransport, MsiMessage, PciFunction};
use hcd_emul::uhci::regs::*;
use hcd_emul::uhci::Uhci;
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

fn stick() -> Option<Box<UsbStorage>> {
    // The process's shared stick image (hcd_emul_fuzz::image).
    UsbStorage::from_file(image(), false, Speed::Full)
        .ok()
        .map(Box::new)
}

fn w16(pci: &mut PciFunction<Uhci>, off: u64, v: u16) {
    pci.bar_write(4, off, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    run_small_stack(data, run);
});

fn run(data: &[u8]) {
    let ram = GuestRam::anonymous(RAM);
    let seed = (data.len() / 2).min(SEED);
    let _ = ram.write(0, &data[..seed]);
    let mut u = Uhci::new(ram.clone());
    for _ in 0..2 {
        if let Some(s) = stick() {
            let _ = u.attach(s);
        }
    }
    let mut pci = PciFunction::new(u, Box::new(NoIrq));
    pci.config_write(0x04, &5u16.to_le_bytes());
    pci.bar_write(4, REG_FLBASEADD, &0x1000u32.to_le_bytes());
    for p in 0..2 {
        let off = REG_PORTSC + 2 * p;
        w16(&mut pci, off, PORT_PR);
        w16(&mut pci, off, 0);
        w16(&mut pci, off, PORT_PE | PORT_CSC | PORT_PEC);
    }
    w16(&mut pci, REG_USBINTR, 0xf);
    w16(&mut pci, REG_USBCMD, CMD_RS | CMD_CF | CMD_MAXP);

    for op8 in data[seed..].chunks_exact(8).take(4096) {
        let v = u32::from_le_bytes([op8[4], op8[5], op8[6], op8[7]]);
        let a = u64::from(u16::from_le_bytes([op8[1], op8[2]]));
        match op8[0] % 10 {
            0 => {
                let len = [1usize, 2, 4][usize::from(op8[3]) % 3];
                pci.bar_write(4, a % (BAR4_SIZE + 4), &v.to_le_bytes()[..len]);
            }
            1 => {
                let len = [1usize, 2, 4][usize::from(op8[3]) % 3];
                let mut b = [0u8; 4];
                pci.bar_read(4, a % (BAR4_SIZE + 4), &mut b[..len]);
            }
            2 => {
                let _ = ram.write((a * 4) % SEED as u64, &v.to_le_bytes());
            }
            3 => pci.process(),
            4 => {
                let off = REG_PORTSC + 2 * (a % 2);
                w16(&mut pci, off, v as u16);
            }
            5 => pci.config_write((a % 256) as u16, &v.to_le_bytes()),
            6 => {
                let x = pci.controller_mut();
                let port = (a % 2) as usize + 1;
                if x.detach(port).is_none() {
                    if let Some(s) = stick() {
                        let _ = x.attach_at(port, s);
                    }
                }
            }
            7 => {
                // A TD-shaped record at a 16-byte boundary: link into the
                // seed area, active, a token for the sticks.
                let addr = (a * 16) % SEED as u64;
                let mut t = [0u8; 16];
                t[0..4].copy_from_slice(&((v & 0x3ff0) | u32::from(op8[3] & 7)).to_le_bytes());
                let ctrl = TD_ACTIVE | (u32::from(op8[3] >> 3) << 24) | (3 << 27);
                t[4..8].copy_from_slice(&ctrl.to_le_bytes());
                let pid = [PID_SETUP, PID_IN, PID_OUT, 0xa5][usize::from(op8[1] & 3)];
                let tok = ((v >> 16) & 0x7ff) << TOK_MAXLEN_SHIFT
                    | (u32::from(op8[2] & 3) << 15)
                    | (u32::from(op8[2] >> 6) << 8)
                    | u32::from(pid);
                t[8..12].copy_from_slice(&tok.to_le_bytes());
                t[12..16].copy_from_slice(&((v >> 2) & 0x3fff).to_le_bytes());
                let _ = ram.write(addr, &t);
            }
            8 => {
                // A QH: head and element into the seed area.
                let addr = (a * 16) % SEED as u64;
                let mut q = [0u8; 8];
                q[0..4].copy_from_slice(&((v & 0x3ff0) | u32::from(op8[3] & 3)).to_le_bytes());
                q[4..8].copy_from_slice(
                    &(((v >> 14) & 0x3ff0) | u32::from((op8[3] >> 2) & 3)).to_le_bytes(),
                );
                let _ = ram.write(addr, &q);
            }
            _ => {
                // A frame-list entry pointing into the seed area.
                let f = a % 1024;
                let e = (v & 0x3ff0) | u32::from(op8[3] & 3);
                let _ = ram.write(0x1000 + 4 * f, &e.to_le_bytes());
            }
        }
    }
    pci.reset();
    assert_eq!(pci.controller().transfers_in_flight(), 0);
}
