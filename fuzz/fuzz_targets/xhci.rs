//! Fuzzes the whole xHCI through its PCI function: fuzzed guest memory
//! (rings, contexts, TRBs) and fuzzed register, doorbell, port and config
//! accesses, with an emulated USB stick and a second stick attached.
//!
//! Input: the first half (at most 16 KiB) seeds guest RAM at 0; the rest
//! is a sequence of 8-byte operations. A prelude brings the controller up the
//! way a driver would (DCBAA, command ring, event ring, run), so the fuzzer
//! spends its time on ring contents rather than on finding the start-up
//! sequence.
#![no_main]

use hcd_emul::pci::{InterruptTransport, MsiMessage, PciFunction};
use hcd_emul::usb::Speed;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::Xhci;
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
    // SuperSpeed sticks also offer UAS: inputs can reach its engine
    // through SET_INTERFACE and the stream doorbells. The image is the
    // process's shared one (hcd_emul_fuzz::image).
    UsbStorage::from_file(image(), false, speed)
        .ok()
        .map(|s| Box::new(s.with_uas(true)))
}

fn w32(pci: &mut PciFunction<Xhci>, off: u64, v: u32) {
    pci.bar_write(0, off, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    // On a 256 KiB stack: runaway recursion crashes the input (lib.rs).
    run_small_stack(data, run);
});

fn run(data: &[u8]) {
    let ram = GuestRam::anonymous(RAM);
    let seed = (data.len() / 2).min(SEED);
    let _ = ram.write(0, &data[..seed]);
    let mut xhci = Xhci::new(ram.clone());
    if let Some(s) = stick(Speed::High) {
        let _ = xhci.attach(s);
    }
    if let Some(s) = stick(Speed::Super) {
        let _ = xhci.attach(s);
    }
    let mut pci = PciFunction::new(xhci, Box::new(NoIrq));
    pci.config_write(0x04, &6u16.to_le_bytes());
    // Prelude: DCBAA at 0x1000, command ring 0x2000, ERST 0x3000 -> 0x4000.
    let op = CAP_LENGTH;
    w32(&mut pci, op + OP_CONFIG, MAX_SLOTS as u32);
    w32(&mut pci, op + OP_DCBAAP, 0x1000);
    w32(&mut pci, op + OP_CRCR, 0x2001);
    let _ = ram.write(0x3000, &0x4000u64.to_le_bytes());
    let _ = ram.write(0x3008, &64u32.to_le_bytes());
    let ir0 = RUNTIME_OFFSET + RT_IR0;
    w32(&mut pci, ir0 + 8, 1);
    w32(&mut pci, ir0 + 0x18, 0x4000);
    w32(&mut pci, ir0 + 0x10, 0x3000);
    w32(&mut pci, ir0, IMAN_IE);
    w32(&mut pci, op + OP_USBCMD, USBCMD_RS | USBCMD_INTE);

    for op8 in data[seed..].chunks_exact(8).take(4096) {
        let v = u32::from_le_bytes([op8[4], op8[5], op8[6], op8[7]]);
        let a = u64::from(u16::from_le_bytes([op8[1], op8[2]]));
        match op8[0] % 12 {
            0 => w32(&mut pci, (a * 4) % BAR0_SIZE, v),
            1 => {
                let mut b = [0u8; 4];
                pci.bar_read(0, (a * 4) % BAR0_SIZE, &mut b);
            }
            2 => w32(&mut pci, DOORBELL_OFFSET + 4 * (a % 40), v & 0xff),
            3 => w32(&mut pci, DOORBELL_OFFSET, 0),
            4 => {
                // Patch guest RAM: 4 bytes anywhere in the seeded area.
                let _ = ram.write((a * 4) % SEED as u64, &v.to_le_bytes());
            }
            5 => pci.process(),
            6 => {
                let port = (a % MAX_PORTS as u64) * 0x10;
                w32(&mut pci, op + OP_PORTS + port, v);
            }
            7 => pci.config_write((a % 256) as u16, &v.to_le_bytes()),
            8 => {
                let port = (a % MAX_PORTS as u64) as usize + 1;
                let x = pci.controller_mut();
                if x.detach(port).is_none() {
                    let speed = if port > USB2_PORTS {
                        Speed::Super
                    } else {
                        Speed::High
                    };
                    if let Some(s) = stick(speed) {
                        let _ = x.attach_at(port, s);
                    }
                }
            }
            9 => {
                // Event ring consumer: move ERDP and clear EHB.
                w32(&mut pci, ir0 + 0x18, 0x4000 + ((v % 64) << 4) | 8);
            }
            10 => {
                let mut b = [0u8; 8];
                pci.bar_read(0, a % (BAR0_SIZE + 64), &mut b[..(op8[3] as usize % 8) + 1]);
                pci.bar_write(0, a % (BAR0_SIZE + 64), &b[..(op8[3] as usize % 8) + 1]);
            }
            _ => {
                // A 16-byte TRB at a 16-byte-aligned place in the seed area,
                // with a chosen type and cycle bit 1.
                let addr = (a * 16) % SEED as u64;
                let mut t = [0u8; 16];
                t[0..4].copy_from_slice(&(v & 0xffff_fff0).to_le_bytes());
                t[8..12].copy_from_slice(&(v & 0x1_ffff).to_le_bytes());
                let ctl = (u32::from(op8[3] & 0x3f) << 10) | 1 | (v & 0xff00_0270);
                t[12..16].copy_from_slice(&ctl.to_le_bytes());
                let _ = ram.write(addr, &t);
            }
        }
    }
    // Teardown in any state must not panic or leak.
    pci.reset();
    assert_eq!(pci.controller().transfers_in_flight(), 0);
}
