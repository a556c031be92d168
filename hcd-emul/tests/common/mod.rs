//! A guest driver for our xHCI, shaped after Linux's xhci_hcd: it lays out
//! the DCBAA, command ring, event ring segment table and transfer rings in
//! guest memory and drives the controller only through PCI config space and
//! BAR 0 — the same interface a real guest has.
#![allow(dead_code)]

pub mod fake;
mod irq;

pub use irq::{IrqLog, Recorder};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcd_emul::pci::PciFunction;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::trb::{cc, ctl, ty, Trb};
use hcd_emul::xhci::Xhci;
use hcd_emul::GuestRam;

/// Guest RAM size used by the tests.
pub const RAM_SIZE: usize = 64 << 20;
/// Where the driver's bump allocator starts (below is free for tests).
const ALLOC_BASE: u64 = 0x10_0000;
/// Where data buffers go (upper half of RAM).
pub const DATA_BASE: u64 = 32 << 20;

/// A producer ring of `size` TRBs whose last TRB links back with Toggle
/// Cycle.
#[derive(Debug, Clone)]
pub struct ProducerRing {
    pub base: u64,
    pub size: u64,
    pub enq: u64,
    pub cycle: bool,
}

impl ProducerRing {
    pub fn addr(&self) -> u64 {
        self.base + self.enq * 16
    }

    /// Writes `trbs` as one unit; the first TRB's cycle bit is written last
    /// so the controller never sees a partial TD. Returns their addresses.
    pub fn push_all(&mut self, ram: &GuestRam, trbs: &[Trb]) -> Vec<u64> {
        let mut addrs = Vec::new();
        let mut first: Option<(u64, Trb)> = None;
        for (i, t) in trbs.iter().enumerate() {
            if self.enq == self.size - 1 {
                // Link TRB; chain it if the TD continues.
                let chain = if i > 0 {
                    trbs[i - 1].control & ctl::CHAIN
                } else {
                    0
                };
                let link = Trb {
                    parameter: self.base,
                    status: 0,
                    control: (ty::LINK << 10) | ctl::TOGGLE_CYCLE | chain | u32::from(self.cycle),
                };
                ram.write(self.addr(), &link.to_bytes()).unwrap();
                self.enq = 0;
                self.cycle = !self.cycle;
            }
            let mut t = *t;
            t.control = (t.control & !1) | u32::from(self.cycle);
            let a = self.addr();
            if i == 0 {
                let mut pending = t;
                pending.control ^= 1;
                ram.write(a, &pending.to_bytes()).unwrap();
                first = Some((a, t));
            } else {
                ram.write(a, &t.to_bytes()).unwrap();
            }
            addrs.push(a);
            self.enq += 1;
        }
        if let Some((a, t)) = first {
            ram.write(a, &t.to_bytes()).unwrap();
        }
        addrs
    }
}

#[derive(Debug, Default)]
pub struct SlotInfo {
    pub out_ctx: u64,
    pub in_ctx: u64,
    pub port: usize,
    pub rings: HashMap<usize, ProducerRing>,
}

/// Result of a TD as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub code: u32,
    /// Bytes transferred (requested - residue of the event).
    pub residue: u32,
    pub trb: u64,
}

pub struct Driver {
    pub pci: PciFunction<Xhci>,
    pub ram: GuestRam,
    pub irq: Arc<Mutex<IrqLog>>,
    next: u64,
    pub cmd: ProducerRing,
    pub dcbaa: u64,
    // Event ring: two segments.
    pub erst: u64,
    segs: Vec<(u64, u64)>,
    ev_seg: usize,
    ev_idx: u64,
    ev_cycle: bool,
    /// Events not yet claimed by a waiter.
    pub pending: Vec<Trb>,
    pub slots: HashMap<usize, SlotInfo>,
    pub timeout: Duration,
}

pub fn setup(x: u64) -> Trb {
    Trb {
        parameter: x,
        status: 8,
        control: (ty::SETUP << 10) | ctl::IDT,
    }
}

impl Driver {
    /// A controller on fresh guest RAM, brought up the way Linux does.
    pub fn new() -> Driver {
        let ram = GuestRam::anonymous(RAM_SIZE);
        Self::with_xhci(Xhci::new(ram.clone()), ram)
    }

    pub fn with_xhci(xhci: Xhci, ram: GuestRam) -> Driver {
        let irq = Arc::new(Mutex::new(IrqLog::default()));
        let pci = PciFunction::new(xhci, Box::new(Recorder(irq.clone())));
        let mut d = Driver {
            pci,
            ram,
            irq,
            next: ALLOC_BASE,
            cmd: ProducerRing {
                base: 0,
                size: 0,
                enq: 0,
                cycle: true,
            },
            dcbaa: 0,
            erst: 0,
            segs: Vec::new(),
            ev_seg: 0,
            ev_idx: 0,
            ev_cycle: true,
            pending: Vec::new(),
            slots: HashMap::new(),
            timeout: Duration::from_secs(10),
        };
        d.enable_pci();
        d
    }

    pub fn alloc(&mut self, size: u64, align: u64) -> u64 {
        let a = (self.next + align - 1) & !(align - 1);
        self.next = a + size;
        assert!(self.next < DATA_BASE, "driver allocator exhausted");
        self.ram.write(a, &vec![0u8; size as usize]).unwrap();
        a
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.pci.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.pci.bar_write(0, off, &v.to_le_bytes());
    }

    /// 64-bit register as Linux writes it: low half, then high half.
    pub fn w64(&mut self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    pub fn op(&self) -> u64 {
        CAP_LENGTH
    }

    pub fn ir(&self, i: u64) -> u64 {
        RUNTIME_OFFSET + RT_IR0 + RT_IR_STRIDE * i
    }

    fn cfg32(&mut self, off: u16) -> u32 {
        let mut b = [0u8; 4];
        self.pci.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn enable_pci(&mut self) {
        self.pci.config_write(0x04, &0x0006u16.to_le_bytes());
        // Find MSI-X and enable it with vector i -> data 0x40 + i.
        let mut p = self.cfg32(0x34) as u16 & 0xff;
        while p != 0 {
            let hdr = self.cfg32(p);
            if hdr & 0xff == 0x11 {
                let table = self.cfg32(p + 4) & !7;
                for v in 0..MAX_INTRS as u64 {
                    let e = u64::from(table) + 16 * v;
                    self.w32(e, 0xfee0_0000);
                    self.w32(e + 4, 0);
                    self.w32(e + 8, 0x40 + v as u32);
                    self.w32(e + 12, 0);
                }
                self.pci.config_write(p + 2, &0x8000u16.to_le_bytes());
            }
            p = (hdr >> 8) as u16 & 0xff;
        }
    }

    /// HCRST and the start-up sequence of xhci_hcd.
    pub fn start(&mut self) {
        let op = self.op();
        self.w32(op + OP_USBCMD, USBCMD_HCRST);
        assert_eq!(self.r32(op + OP_USBCMD) & USBCMD_HCRST, 0);
        assert_eq!(self.r32(op + OP_USBSTS) & USBSTS_CNR, 0);
        let hcs1 = self.r32(0x04);
        let max_slots = hcs1 & 0xff;
        self.w32(op + OP_CONFIG, max_slots);
        self.dcbaa = self.alloc(8 * 256, 64);
        let hcs2 = self.r32(0x08);
        let nsp = ((hcs2 >> 27) & 0x1f) | (((hcs2 >> 21) & 0x1f) << 5);
        if nsp > 0 {
            let arr = self.alloc(8 * u64::from(nsp), 64);
            for i in 0..u64::from(nsp) {
                let page = self.alloc(4096, 4096);
                self.ram.write(arr + 8 * i, &page.to_le_bytes()).unwrap();
            }
            self.ram.write(self.dcbaa, &arr.to_le_bytes()).unwrap();
        }
        self.w64(op + OP_DCBAAP, self.dcbaa);
        let cr = self.alloc(16 * 64, 64);
        self.cmd = ProducerRing {
            base: cr,
            size: 64,
            enq: 0,
            cycle: true,
        };
        self.w64(op + OP_CRCR, cr | 1);
        // Event ring: two segments of 32 TRBs (multi-segment ERST).
        self.erst = self.alloc(16 * 2, 64);
        self.segs.clear();
        for i in 0..2u64 {
            let seg = self.alloc(16 * 32, 64);
            self.ram
                .write(self.erst + 16 * i, &seg.to_le_bytes())
                .unwrap();
            self.ram
                .write(self.erst + 16 * i + 8, &32u32.to_le_bytes())
                .unwrap();
            self.segs.push((seg, 32));
        }
        self.ev_seg = 0;
        self.ev_idx = 0;
        self.ev_cycle = true;
        let ir0 = self.ir(0);
        self.w32(ir0 + 0x08, 2);
        self.w64(ir0 + 0x18, self.segs[0].0);
        self.w64(ir0 + 0x10, self.erst);
        self.w32(ir0 + 0x04, 0);
        self.w32(ir0, IMAN_IE);
        self.w32(op + OP_USBCMD, USBCMD_RS | USBCMD_INTE | USBCMD_HSEE);
        assert_eq!(self.r32(op + OP_USBSTS) & USBSTS_HCH, 0);
        self.slots.clear();
        self.pending.clear();
    }

    /// Consumes new events from the event ring and acknowledges them.
    pub fn poll_events(&mut self) -> usize {
        self.pci.process();
        let mut n = 0;
        loop {
            let (base, size) = self.segs[self.ev_seg];
            let a = base + 16 * self.ev_idx;
            let mut b = [0u8; 16];
            self.ram.read(a, &mut b).unwrap();
            let t = Trb::from_bytes(&b);
            if t.cycle() != self.ev_cycle {
                break;
            }
            self.pending.push(t);
            n += 1;
            self.ev_idx += 1;
            if self.ev_idx == size {
                self.ev_idx = 0;
                self.ev_seg += 1;
                if self.ev_seg == self.segs.len() {
                    self.ev_seg = 0;
                    self.ev_cycle = !self.ev_cycle;
                }
            }
        }
        if n > 0 {
            let (base, _) = self.segs[self.ev_seg];
            let erdp = base + 16 * self.ev_idx;
            let ir0 = self.ir(0);
            self.w64(ir0 + 0x18, erdp | ERDP_EHB);
        }
        n
    }

    /// Waits for an event matching `f` and removes it from `pending`.
    pub fn wait_event(&mut self, mut f: impl FnMut(&Trb) -> bool) -> Option<Trb> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(i) = self.pending.iter().position(&mut f) {
                return Some(self.pending.remove(i));
            }
            if Instant::now() > deadline {
                return None;
            }
            if self.poll_events() == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Issues a command and waits for its completion: (code, slot id).
    pub fn command(&mut self, trb: Trb) -> (u32, usize) {
        let ram = self.ram.clone();
        let a = self.cmd.push_all(&ram, &[trb])[0];
        self.w32(DOORBELL_OFFSET, 0);
        let ev = self
            .wait_event(|t| t.trb_type() == ty::COMMAND_COMPLETION && t.parameter == a)
            .expect("command completion event");
        (ev.status >> 24, (ev.control >> 24) as usize)
    }

    pub fn portsc(&mut self, port: usize) -> u32 {
        let a = self.op() + OP_PORTS + 0x10 * (port as u64 - 1);
        self.r32(a)
    }

    pub fn write_portsc(&mut self, port: usize, v: u32) {
        let a = self.op() + OP_PORTS + 0x10 * (port as u64 - 1);
        self.w32(a, v);
    }

    /// Resets a connected port like hub_port_reset and clears the change
    /// bits. Returns the PSI speed.
    pub fn reset_port(&mut self, port: usize) -> u32 {
        let sc = self.portsc(port);
        assert!(sc & PORTSC_CCS != 0, "port {port} not connected");
        let keep = PORTSC_PP;
        self.write_portsc(port, keep | PORTSC_PR);
        let sc = self.portsc(port);
        assert!(
            sc & PORTSC_PED != 0 && sc & PORTSC_PRC != 0,
            "port {port} enabled after reset: {sc:#x}"
        );
        self.write_portsc(port, keep | PORTSC_CHANGE_MASK);
        (self.portsc(port) >> PORTSC_SPEED_SHIFT) & 0xf
    }

    /// Enable Slot + Address Device for the device on `port`.
    pub fn address(&mut self, port: usize) -> usize {
        let speed = self.reset_port(port);
        let (code, slot) = self.command(Trb {
            parameter: 0,
            status: 0,
            control: ty::ENABLE_SLOT << 10,
        });
        assert_eq!(code, cc::SUCCESS, "enable slot");
        let out = self.alloc(32 * 32, 64);
        let inp = self.alloc(33 * 32, 64);
        self.ram
            .write(self.dcbaa + 8 * slot as u64, &out.to_le_bytes())
            .unwrap();
        let ring_base = self.alloc(16 * 32, 64);
        let ring = ProducerRing {
            base: ring_base,
            size: 32,
            enq: 0,
            cycle: true,
        };
        let mps: u32 = match speed {
            speed_id::SUPER => 512,
            speed_id::HIGH => 64,
            _ => 8,
        };
        self.write_ctx(inp, 0, [0, 3, 0, 0, 0, 0, 0, 0]);
        self.write_ctx(
            inp,
            1,
            [
                (1 << 27) | (speed << 20),
                (port as u32) << 16,
                0,
                0,
                0,
                0,
                0,
                0,
            ],
        );
        self.write_ctx(
            inp,
            2,
            [
                0,
                (3 << 1) | (4 << 3) | (mps << 16),
                ring_base as u32 | 1,
                (ring_base >> 32) as u32,
                8,
                0,
                0,
                0,
            ],
        );
        let mut info = SlotInfo {
            out_ctx: out,
            in_ctx: inp,
            port,
            rings: HashMap::new(),
        };
        info.rings.insert(1, ring);
        self.slots.insert(slot, info);
        let (code, s2) = self.command(Trb {
            parameter: inp,
            status: 0,
            control: (ty::ADDRESS_DEVICE << 10) | ((slot as u32) << 24),
        });
        assert_eq!((code, s2), (cc::SUCCESS, slot), "address device");
        slot
    }

    /// Enable Slot; the slot's output context at `out` in the DCBAA.
    pub fn enable_slot(&mut self, out: u64) -> usize {
        let (code, slot) = self.command(Trb {
            parameter: 0,
            status: 0,
            control: ty::ENABLE_SLOT << 10,
        });
        assert_eq!(code, cc::SUCCESS, "enable slot");
        self.ram
            .write(self.dcbaa + 8 * slot as u64, &out.to_le_bytes())
            .unwrap();
        slot
    }

    /// Address Device of `slot` for a high-speed device on `port`, EP0
    /// ring at `ring`, input context at `inp` (33 x 32 bytes); returns the
    /// completion code.
    pub fn address_device(
        &mut self,
        slot: usize,
        port: usize,
        inp: u64,
        ring: u64,
        bsr: bool,
    ) -> u32 {
        self.write_ctx(inp, 0, [0, 3, 0, 0, 0, 0, 0, 0]);
        self.write_ctx(
            inp,
            1,
            [(1 << 27) | (3 << 20), (port as u32) << 16, 0, 0, 0, 0, 0, 0],
        );
        let ep0 = (3 << 1) | (4 << 3) | (64 << 16);
        self.write_ctx(
            inp,
            2,
            [0, ep0, ring as u32 | 1, (ring >> 32) as u32, 8, 0, 0, 0],
        );
        let bsr = if bsr { ctl::BSR } else { 0 };
        self.command(Trb {
            parameter: inp,
            status: 0,
            control: (ty::ADDRESS_DEVICE << 10) | ((slot as u32) << 24) | bsr,
        })
        .0
    }

    /// Writes one TRB (cycle bit set) at `at`.
    pub fn write_trb(&self, at: u64, parameter: u64, status: u32, control: u32) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&parameter.to_le_bytes());
        b[8..12].copy_from_slice(&status.to_le_bytes());
        b[12..].copy_from_slice(&(control | ctl::CYCLE).to_le_bytes());
        self.ram.write(at, &b).unwrap();
    }

    /// A GET_DESCRIPTOR(DEVICE) control TD at `ring` (three TRBs) into
    /// `buf`.
    pub fn write_get_descriptor_td(&self, ring: u64, buf: u64) {
        let setup = (ty::SETUP << 10) | ctl::IDT | (3 << 16);
        self.write_trb(ring, 0x0040_0000_0100_0680, 8, setup);
        self.write_trb(ring + 16, buf, 64, (ty::DATA << 10) | ctl::DIR_IN);
        self.write_trb(ring + 32, 0, 0, (ty::STATUS << 10) | ctl::IOC);
    }

    pub fn write_ctx(&self, base: u64, index: u64, d: [u32; 8]) {
        let mut b = [0u8; 32];
        for (i, v) in d.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        self.ram.write(base + 32 * index, &b).unwrap();
    }

    pub fn read_ctx(&self, base: u64, index: u64) -> [u32; 8] {
        let mut d = [0u32; 8];
        for (i, v) in d.iter_mut().enumerate() {
            *v = self.ram.read_u32(base + 32 * index + 4 * i as u64).unwrap();
        }
        d
    }

    pub fn ring_doorbell(&mut self, slot: usize, dci: usize) {
        self.w32(DOORBELL_OFFSET + 4 * slot as u64, dci as u32);
    }

    /// Queues TRBs on an endpoint ring (as one unit) and rings its doorbell.
    pub fn queue(&mut self, slot: usize, dci: usize, trbs: &[Trb]) -> Vec<u64> {
        let ram = self.ram.clone();
        let ring = self
            .slots
            .get_mut(&slot)
            .unwrap()
            .rings
            .get_mut(&dci)
            .unwrap();
        let a = ring.push_all(&ram, trbs);
        self.ring_doorbell(slot, dci);
        a
    }

    /// Waits for the transfer event of a TRB (by address).
    pub fn wait_transfer(&mut self, slot: usize, dci: usize, trb: u64) -> Completion {
        let ev = self
            .wait_event(|t| {
                t.trb_type() == ty::TRANSFER_EVENT
                    && (t.control >> 24) as usize == slot
                    && ((t.control >> 16) & 0x1f) as usize == dci
                    && t.parameter == trb
            })
            .unwrap_or_else(|| {
                panic!(
                    "no transfer event for TRB {trb:#x}; pending {:?}",
                    self.pending
                )
            });
        Completion {
            code: ev.status >> 24,
            residue: ev.status & 0xff_ffff,
            trb: ev.parameter,
        }
    }

    /// Waits for the next transfer event on (slot, dci), whatever TRB.
    pub fn next_transfer(&mut self, slot: usize, dci: usize) -> Option<Completion> {
        let ev = self.wait_event(|t| {
            t.trb_type() == ty::TRANSFER_EVENT
                && (t.control >> 24) as usize == slot
                && ((t.control >> 16) & 0x1f) as usize == dci
        })?;
        Some(Completion {
            code: ev.status >> 24,
            residue: ev.status & 0xff_ffff,
            trb: ev.parameter,
        })
    }

    /// A control transfer. `data` is the data stage buffer (guest address,
    /// length); IN if the setup says so. Returns the completion of the
    /// status stage or of the failing stage, and bytes moved in the data
    /// stage.
    pub fn control(&mut self, slot: usize, req: [u8; 8], data: Option<(u64, u32)>) -> (u32, u32) {
        let setup_val = u64::from_le_bytes(req);
        let din = req[0] & 0x80 != 0;
        let mut trbs = Vec::new();
        let trt = match (data, din) {
            (None, _) => 0,
            (Some(_), false) => 2,
            (Some(_), true) => 3,
        };
        let mut s = setup(setup_val);
        s.control |= trt << 16;
        trbs.push(s);
        if let Some((addr, len)) = data {
            trbs.push(Trb {
                parameter: addr,
                status: len,
                control: (ty::DATA << 10) | ctl::ISP | if din { ctl::DIR_IN } else { 0 },
            });
        }
        let status_in = data.is_none() || !din;
        trbs.push(Trb {
            parameter: 0,
            status: 0,
            control: (ty::STATUS << 10) | ctl::IOC | if status_in { ctl::DIR_IN } else { 0 },
        });
        let addrs = self.queue(slot, 1, &trbs);
        let status_addr = *addrs.last().unwrap();
        let mut moved = data.map(|d| d.1).unwrap_or(0);
        loop {
            let c = self.next_transfer(slot, 1).expect("control transfer event");
            if let Some((_, len)) = data.filter(|_| c.trb == addrs[1]) {
                moved = len - c.residue;
                if c.code == cc::SHORT_PACKET {
                    continue;
                }
                return (c.code, moved);
            }
            if c.trb == status_addr || c.code != cc::SUCCESS {
                return (c.code, moved);
            }
        }
    }

    pub fn control_in(&mut self, slot: usize, req: [u8; 8]) -> Result<Vec<u8>, u32> {
        let len = u16::from_le_bytes([req[6], req[7]]) as u32;
        let buf = self.alloc(u64::from(len.max(1)), 64);
        let (code, n) = self.control(slot, req, Some((buf, len)));
        if code != cc::SUCCESS {
            return Err(code);
        }
        let mut v = vec![0u8; n as usize];
        self.ram.read(buf, &mut v).unwrap();
        Ok(v)
    }

    pub fn control_out(&mut self, slot: usize, req: [u8; 8], data: &[u8]) -> u32 {
        let data = if data.is_empty() {
            None
        } else {
            let buf = self.alloc(data.len() as u64, 64);
            self.ram.write(buf, data).unwrap();
            Some((buf, data.len() as u32))
        };
        self.control(slot, req, data).0
    }

    pub fn get_descriptor(&mut self, slot: usize, dtype: u8, index: u8, len: u16) -> Vec<u8> {
        let l = len.to_le_bytes();
        self.control_in(slot, [0x80, 6, index, dtype, 0, 0, l[0], l[1]])
            .unwrap_or_else(|c| panic!("GET_DESCRIPTOR {dtype} failed with {c}"))
    }

    /// Configure Endpoint for the given (dci, ep type, max packet, burst).
    pub fn configure(&mut self, slot: usize, eps: &[(usize, u32, u32, u32)]) -> u32 {
        let inp = self.slots[&slot].in_ctx;
        let out = self.slots[&slot].out_ctx;
        let mut add = 1u32;
        let max_dci = eps.iter().map(|e| e.0).max().unwrap_or(1) as u32;
        let mut slot_ctx = self.read_ctx(out, 0);
        slot_ctx[0] = (slot_ctx[0] & !(0x1f << 27)) | (max_dci << 27);
        slot_ctx[3] = 0;
        self.write_ctx(inp, 1, slot_ctx);
        for &(dci, t, mps, burst) in eps {
            add |= 1 << dci;
            let base = self.alloc(16 * 1024, 64);
            self.slots.get_mut(&slot).unwrap().rings.insert(
                dci,
                ProducerRing {
                    base,
                    size: 1024,
                    enq: 0,
                    cycle: true,
                },
            );
            self.write_ctx(
                inp,
                dci as u64 + 1,
                [
                    0,
                    (3 << 1) | (t << 3) | (burst << 8) | (mps << 16),
                    base as u32 | 1,
                    (base >> 32) as u32,
                    3072,
                    0,
                    0,
                    0,
                ],
            );
        }
        self.write_ctx(inp, 0, [0, add, 0, 0, 0, 0, 0, 0]);
        self.command(Trb {
            parameter: inp,
            status: 0,
            control: (ty::CONFIGURE_ENDPOINT << 10) | ((slot as u32) << 24),
        })
        .0
    }

    /// Builds Normal TRBs for a buffer list the way Linux does: no TRB
    /// crosses a 64 KiB boundary, CH on all but the last, IOC on the last,
    /// ISP for IN.
    pub fn normal_trbs(bufs: &[(u64, u32)], dir_in: bool) -> Vec<Trb> {
        let mut trbs = Vec::new();
        for &(addr, len) in bufs {
            let mut a = addr;
            let mut left = u64::from(len);
            while left > 0 {
                let room = 0x1_0000 - (a & 0xffff);
                let n = left.min(room);
                trbs.push(Trb {
                    parameter: a,
                    status: n as u32,
                    control: (ty::NORMAL << 10) | ctl::CHAIN | if dir_in { ctl::ISP } else { 0 },
                });
                a = a.wrapping_add(n);
                left -= n;
            }
        }
        if trbs.is_empty() {
            trbs.push(Trb {
                parameter: 0,
                status: 0,
                control: ty::NORMAL << 10,
            });
        }
        let last = trbs.len() - 1;
        trbs[last].control = (trbs[last].control & !ctl::CHAIN) | ctl::IOC;
        trbs
    }

    /// One bulk TD over `bufs`; waits for it. Returns (code, bytes moved).
    pub fn bulk(&mut self, slot: usize, dci: usize, bufs: &[(u64, u32)]) -> (u32, u32) {
        let trbs = Self::normal_trbs(bufs, dci % 2 == 1);
        let total: u32 = bufs.iter().map(|b| b.1).sum();
        let addrs = self.queue(slot, dci, &trbs);
        let last = *addrs.last().unwrap();
        let mut short_moved = None;
        loop {
            let c = self.next_transfer(slot, dci).expect("bulk transfer event");
            let idx = addrs
                .iter()
                .position(|&a| a == c.trb)
                .expect("event for a TRB of this TD");
            if c.code == cc::SHORT_PACKET && short_moved.is_none() {
                let before: u32 = trbs[..idx].iter().map(|t| t.status & 0x1ffff).sum();
                short_moved = Some(before + (trbs[idx].status & 0x1ffff) - c.residue);
            }
            if c.trb == last || (c.code != cc::SUCCESS && c.code != cc::SHORT_PACKET) {
                return match (c.code, short_moved) {
                    (cc::SUCCESS, _) => (cc::SUCCESS, total),
                    (cc::SHORT_PACKET, Some(m)) => (cc::SHORT_PACKET, m),
                    (code, _) => (code, 0),
                };
            }
        }
    }

    pub fn msix_count(&self) -> usize {
        self.irq.lock().unwrap().msgs.len()
    }
}
