//! A guest driver for our UHCI, shaped after Linux's uhci_hcd: a 1024-entry
//! frame list pointing at skeleton interrupt QHs (int8 on every eighth
//! frame, int1 on all), then the low-speed control, full-speed control and
//! bulk skeletons and the terminating QH whose element is an inactive TD
//! (IOC set on it asks for "an interrupt next frame"); full-speed bandwidth
//! reclamation loops the terminating QH back to the full-speed control
//! skeleton. One QH per endpoint, linked after its skeleton; URBs are added
//! by memory only, one TD per packet, breadth-first links, a dummy TD at
//! each queue's tail that becomes the URB's first TD and is activated last;
//! IN TDs have SPD and a short packet is fixed up by moving the element
//! past the URB (control: to its status TD); a QH is unlinked by editing
//! its predecessor and waiting for FRNUM to move. Only PCI config space and
//! the I/O BAR are used.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcd_emul::pci::PciFunction;
use hcd_emul::uhci::regs::*;
use hcd_emul::uhci::Uhci;
use hcd_emul::GuestRam;

#[path = "../common/irq.rs"]
mod irq;
pub use irq::{IrqLog, Recorder};

pub const RAM_SIZE: usize = 64 << 20;
const ALLOC_BASE: u64 = 0x10_0000;
pub const DATA_BASE: u64 = 32 << 20;

/// One endpoint's QH and its dummy TD.
#[derive(Debug, Clone)]
pub struct Queue {
    pub qh: u32,
    pub dummy: u32,
    pub addr: u8,
    pub ep: u8,
    pub mps: u32,
    pub low_speed: bool,
    /// Data toggle of the next packet (bulk/interrupt).
    pub toggle: bool,
}

/// A TD as the driver wants it.
#[derive(Debug, Clone, Copy)]
pub struct TdSpec {
    pub pid: u8,
    pub buf: u32,
    pub len: u32,
    pub toggle: bool,
    pub spd: bool,
    pub ioc: bool,
}

/// What a submitted URB's TDs ended as (their status words).
#[derive(Debug, Clone)]
pub struct UrbResult {
    pub tds: Vec<u32>,
    pub status: Vec<u32>,
}

impl UrbResult {
    /// Bytes moved by the TDs of `pid`.
    pub fn actual(&self, specs: &[TdSpec], pid: u8) -> u32 {
        specs
            .iter()
            .zip(&self.status)
            .filter(|(s, st)| s.pid == pid && *st & TD_ACTIVE == 0)
            .map(|(_, st)| (st + 1) & 0x7ff)
            .sum()
    }
    pub fn stalled(&self) -> bool {
        self.status.iter().any(|s| s & TD_STALLED != 0)
    }
    /// A STALL handshake as Linux's uhci_map_status reads it: Stalled
    /// without babble or CRC/time-out.
    pub fn stall_handshake(&self) -> bool {
        self.status
            .iter()
            .any(|s| s & TD_STALLED != 0 && s & (TD_BABBLE | TD_CRCTIMEO) == 0)
    }
}

pub struct Driver {
    pub pci: PciFunction<Uhci>,
    pub ram: GuestRam,
    pub irq: Arc<Mutex<IrqLog>>,
    next: u64,
    pub frame_list: u32,
    pub skel_int8: u32,
    pub skel_int1: u32,
    pub skel_ls_ctrl: u32,
    pub skel_fs_ctrl: u32,
    pub skel_bulk: u32,
    pub skel_term: u32,
    pub term_td: u32,
    pub timeout: Duration,
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

pub fn setup(rt: u8, req: u8, value: u16, index: u16, len: u16) -> [u8; 8] {
    let v = value.to_le_bytes();
    let i = index.to_le_bytes();
    let l = len.to_le_bytes();
    [rt, req, v[0], v[1], i[0], i[1], l[0], l[1]]
}

/// The MaxLen field for `len` bytes.
pub fn explen(len: u32) -> u32 {
    (len.wrapping_sub(1) & 0x7ff) << TOK_MAXLEN_SHIFT
}

impl Driver {
    pub fn new() -> Driver {
        let ram = GuestRam::anonymous(RAM_SIZE);
        Self::with_uhci(Uhci::new(ram.clone()), ram)
    }

    pub fn with_uhci(u: Uhci, ram: GuestRam) -> Driver {
        let irq = Arc::new(Mutex::new(IrqLog::default()));
        let pci = PciFunction::new(u, Box::new(Recorder(irq.clone())));
        let mut d = Driver {
            pci,
            ram,
            irq,
            next: ALLOC_BASE,
            frame_list: 0,
            skel_int8: 0,
            skel_int1: 0,
            skel_ls_ctrl: 0,
            skel_fs_ctrl: 0,
            skel_bulk: 0,
            skel_term: 0,
            term_td: 0,
            timeout: Duration::from_secs(10),
        };
        // I/O + Bus Master, BAR 4 at port 0xc000.
        d.pci.config_write(0x20, &0xc001u32.to_le_bytes());
        d.pci.config_write(0x04, &5u16.to_le_bytes());
        d
    }

    pub fn alloc(&mut self, size: u64, align: u64) -> u32 {
        let a = (self.next + align - 1) & !(align - 1);
        self.next = a + size;
        assert!(self.next < DATA_BASE, "driver allocator exhausted");
        self.ram.write(a, &vec![0u8; size as usize]).unwrap();
        a as u32
    }

    pub fn rd(&self, a: u32) -> u32 {
        let mut b = [0u8; 4];
        self.ram.read(u64::from(a), &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    pub fn wr(&self, a: u32, v: u32) {
        self.ram.write(u64::from(a), &v.to_le_bytes()).unwrap();
    }

    pub fn r16(&mut self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.pci.bar_read(4, off, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn w16(&mut self, off: u64, v: u16) {
        self.pci.bar_write(4, off, &v.to_le_bytes());
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.pci.bar_read(4, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.pci.bar_write(4, off, &v.to_le_bytes());
    }

    fn qh(&mut self) -> u32 {
        let q = self.alloc(16, 16);
        self.wr(q, LINK_T);
        self.wr(q + 4, LINK_T);
        q
    }

    /// Linux's uhci_start: HCRESET, skeleton, frame list, FRNUM 0, all
    /// interrupts enabled, RS | CF | MAXP.
    pub fn start(&mut self) {
        self.w16(REG_USBCMD, CMD_HCRESET);
        assert_eq!(self.r16(REG_USBCMD) & CMD_HCRESET, 0, "HCRESET self-clears");
        self.frame_list = self.alloc(4096, 4096);
        self.skel_int8 = self.qh();
        self.skel_int1 = self.qh();
        self.skel_ls_ctrl = self.qh();
        self.skel_fs_ctrl = self.qh();
        self.skel_bulk = self.qh();
        self.skel_term = self.qh();
        self.term_td = self.alloc(16, 16);
        // The terminating TD: inactive, addressed to nobody.
        self.wr(self.term_td, LINK_T);
        self.wr(self.term_td + 4, 0);
        self.wr(
            self.term_td + 8,
            explen(0) | (0x7f << 8) | u32::from(PID_IN),
        );
        self.wr(self.skel_term + 4, self.term_td);
        self.wr(self.skel_int8, self.skel_int1 | LINK_Q);
        self.wr(self.skel_int1, self.skel_ls_ctrl | LINK_Q);
        self.wr(self.skel_ls_ctrl, self.skel_fs_ctrl | LINK_Q);
        self.wr(self.skel_fs_ctrl, self.skel_bulk | LINK_Q);
        self.wr(self.skel_bulk, self.skel_term | LINK_Q);
        for f in 0..1024u32 {
            let q = if f % 8 == 0 {
                self.skel_int8
            } else {
                self.skel_int1
            };
            self.wr(self.frame_list + 4 * f, q | LINK_Q);
        }
        self.w32(REG_FLBASEADD, self.frame_list);
        self.w16(REG_FRNUM, 0);
        self.w16(REG_USBINTR, 0xf);
        self.w16(REG_USBCMD, CMD_RS | CMD_CF | CMD_MAXP);
        assert_eq!(self.r16(REG_USBSTS) & STS_HCH, 0, "running");
    }

    /// Full-speed bandwidth reclamation on or off: the terminating QH
    /// loops back to the full-speed control skeleton.
    pub fn fsbr(&mut self, on: bool) {
        let l = if on {
            self.skel_fs_ctrl | LINK_Q
        } else {
            LINK_T
        };
        self.wr(self.skel_term, l);
    }

    pub fn portsc(&mut self, port: usize) -> u16 {
        self.r16(REG_PORTSC + 2 * (port as u64 - 1))
    }

    /// Linux's port reset: PR for a while, PR off, clear CSC/PEC, PE on.
    pub fn reset_port(&mut self, port: usize) -> u16 {
        let off = REG_PORTSC + 2 * (port as u64 - 1);
        let s = self.r16(off) & !PORT_RWC;
        self.w16(off, s | PORT_PR);
        std::thread::sleep(Duration::from_millis(2));
        let s = self.r16(off) & !PORT_RWC;
        self.w16(off, s & !PORT_PR);
        let s = self.r16(off);
        self.w16(off, (s & !PORT_RWC) | PORT_CSC | PORT_PEC);
        let s = self.r16(off) & !PORT_RWC;
        self.w16(off, s | PORT_PE);
        self.r16(off)
    }

    /// Lets time pass for the controller: processes it until `done` or
    /// the timeout.
    pub fn run_until(&mut self, mut done: impl FnMut(&mut Driver) -> bool) -> bool {
        let t0 = Instant::now();
        loop {
            if done(self) {
                return true;
            }
            if t0.elapsed() > self.timeout {
                return false;
            }
            match self.pci.next_deadline() {
                Some(t) if t <= Instant::now() => self.pci.process(),
                Some(t) => {
                    std::thread::sleep(
                        t.saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(2)),
                    );
                    self.pci.process();
                }
                None => {
                    std::thread::sleep(Duration::from_millis(1));
                    self.pci.process();
                }
            }
        }
    }

    /// A new endpoint queue linked after `skel` (its QH element is the
    /// dummy TD, inactive).
    pub fn make_queue(&mut self, skel: u32, addr: u8, ep: u8, mps: u32, low_speed: bool) -> Queue {
        let qh = self.qh();
        let dummy = self.alloc(16, 16);
        self.fill_dummy(dummy);
        self.wr(qh + 4, dummy);
        self.wr(qh, self.rd(skel));
        self.wr(skel, qh | LINK_Q);
        Queue {
            qh,
            dummy,
            addr,
            ep,
            mps,
            low_speed,
            toggle: false,
        }
    }

    fn fill_dummy(&self, td: u32) {
        self.wr(td, LINK_T);
        self.wr(td + 4, 0);
        self.wr(td + 8, explen(0) | u32::from(PID_OUT));
        self.wr(td + 12, 0);
    }

    /// Unlinks `q` from after `skel` (or whatever precedes it) and waits
    /// for FRNUM to move, as Linux's unlink_async + uhci_scan_schedule.
    pub fn unlink(&mut self, q: &Queue) {
        let mut prev = self.skel_int8;
        for _ in 0..64 {
            let l = self.rd(prev);
            if l & LINK_ADDR == q.qh && l & LINK_Q != 0 {
                self.wr(prev, self.rd(q.qh));
                break;
            }
            if l & LINK_T != 0 {
                panic!("QH {:#x} not linked", q.qh);
            }
            prev = l & LINK_ADDR;
        }
        self.wait_frame();
    }

    /// Waits until FRNUM moves on (what Linux and SeaBIOS do before
    /// freeing what they unlinked).
    pub fn wait_frame(&mut self) {
        let f0 = self.r16(REG_FRNUM);
        let ok = self.run_until(|d| d.r16(REG_FRNUM) != f0);
        assert!(ok, "FRNUM stuck at {f0}");
    }

    /// Appends an URB's TDs: the queue's dummy becomes the first TD and
    /// is activated last; a new dummy ends the queue. Returns the TDs.
    pub fn append(&mut self, q: &mut Queue, specs: &[TdSpec]) -> Vec<u32> {
        let mut tds = vec![q.dummy];
        for _ in 1..specs.len() {
            tds.push(self.alloc(16, 16));
        }
        let dummy = self.alloc(16, 16);
        self.fill_dummy(dummy);
        let dest = (u32::from(q.ep) << 15) | (u32::from(q.addr) << 8);
        for (i, s) in specs.iter().enumerate() {
            let next = tds.get(i + 1).copied().unwrap_or(dummy);
            let td = tds[i];
            let mut st = 3 << 27;
            if q.low_speed {
                st |= TD_LS;
            }
            if s.spd {
                st |= TD_SPD;
            }
            if s.ioc {
                st |= TD_IOC;
            }
            if i > 0 {
                st |= TD_ACTIVE;
            }
            let mut tok = explen(s.len) | dest | u32::from(s.pid);
            if s.toggle {
                tok |= TOK_D;
            }
            self.wr(td, next);
            self.wr(td + 8, tok);
            self.wr(td + 12, s.buf);
            self.wr(td + 4, st);
        }
        // Activate the old dummy last.
        let st = self.rd(tds[0] + 4);
        self.wr(tds[0] + 4, st | TD_ACTIVE);
        q.dummy = dummy;
        tds
    }

    fn statuses(&self, tds: &[u32]) -> Vec<u32> {
        tds.iter().map(|&t| self.rd(t + 4)).collect()
    }

    /// Submits an URB and waits until its last TD is done, a TD failed, or
    /// a short packet stopped the queue; fixes up a short packet as Linux
    /// does (the element moves past the URB; control: to its status TD,
    /// which the controller then completes).
    pub fn submit(&mut self, q: &mut Queue, specs: &[TdSpec]) -> UrbResult {
        let tds = self.append(q, specs);
        let last = *tds.last().unwrap();
        let qh = q.qh;
        let ok = self.run_until(|d| {
            let st = d.statuses(&tds);
            let el = d.rd(qh + 4) & LINK_ADDR;
            st.last().is_some_and(|s| s & TD_ACTIVE == 0)
                || st.iter().any(|s| s & TD_STALLED != 0)
                || (el != last && tds.contains(&el) && d.rd(el + 4) & TD_ACTIVE == 0)
        });
        assert!(
            ok,
            "URB on QH {qh:#x} never finished: {:x?}",
            self.statuses(&tds)
        );
        let mut status = self.statuses(&tds);
        let el = self.rd(qh + 4) & LINK_ADDR;
        if status.iter().any(|s| s & TD_STALLED != 0) {
            // Linux gives the URB back and restarts the queue after it.
            self.wr(qh + 4, self.rd(last));
        } else if el != last && tds.contains(&el) && status.last().unwrap() & TD_ACTIVE != 0 {
            // Stopped on a short packet (SPD).
            if specs[0].pid == PID_SETUP {
                self.wr(qh + 4, last);
                let ok = self.run_until(|d| d.rd(last + 4) & TD_ACTIVE == 0);
                assert!(ok, "status stage after a short control IN");
            } else {
                self.wr(qh + 4, self.rd(last));
            }
            status = self.statuses(&tds);
        }
        UrbResult { tds, status }
    }

    /// A control transfer on `q`: SETUP, data TDs of `q.mps` bytes, status
    /// with IOC. Returns the data bytes moved and whether it stalled.
    pub fn control(
        &mut self,
        q: &mut Queue,
        setup: [u8; 8],
        data: Option<(u32, u32)>,
    ) -> (u32, bool) {
        let sbuf = self.alloc(8, 8);
        self.ram.write(u64::from(sbuf), &setup).unwrap();
        let dir_in = setup[0] & 0x80 != 0;
        let mut specs = vec![TdSpec {
            pid: PID_SETUP,
            buf: sbuf,
            len: 8,
            toggle: false,
            spd: false,
            ioc: false,
        }];
        let pid = if dir_in { PID_IN } else { PID_OUT };
        if let Some((buf, len)) = data {
            let mut off = 0;
            let mut t = true;
            while off < len {
                let n = (len - off).min(q.mps);
                specs.push(TdSpec {
                    pid,
                    buf: buf + off,
                    len: n,
                    toggle: t,
                    spd: dir_in,
                    ioc: false,
                });
                t = !t;
                off += n;
            }
        }
        specs.push(TdSpec {
            pid: if dir_in && data.is_some() {
                PID_OUT
            } else {
                PID_IN
            },
            buf: 0,
            len: 0,
            toggle: true,
            spd: false,
            ioc: true,
        });
        let r = self.submit(q, &specs);
        (r.actual(&specs, pid), r.stall_handshake())
    }

    pub fn control_in(&mut self, q: &mut Queue, setup: [u8; 8]) -> Result<Vec<u8>, ()> {
        let len = u32::from(u16::from_le_bytes([setup[6], setup[7]]));
        let buf = self.alloc(u64::from(len.max(1)), 64);
        let (n, stalled) = self.control(q, setup, Some((buf, len)));
        if stalled {
            return Err(());
        }
        let mut v = vec![0u8; n as usize];
        self.ram.read(u64::from(buf), &mut v).unwrap();
        Ok(v)
    }

    /// A bulk/interrupt URB of `len` bytes at `buf`: one TD per packet,
    /// toggles from the queue, SPD on IN, IOC on the last. Keeps the
    /// toggle right after a short packet (Linux's uhci_fixup_toggles).
    pub fn bulk(&mut self, q: &mut Queue, pid: u8, buf: u32, len: u32) -> (UrbResult, Vec<TdSpec>) {
        let mut specs = Vec::new();
        let mut off = 0;
        loop {
            let n = (len - off).min(q.mps);
            specs.push(TdSpec {
                pid,
                buf: buf + off,
                len: n,
                toggle: q.toggle,
                spd: pid == PID_IN,
                ioc: false,
            });
            q.toggle = !q.toggle;
            off += n;
            if off >= len {
                break;
            }
        }
        specs.last_mut().unwrap().ioc = true;
        let r = self.submit(q, &specs);
        // The toggle after the last TD that executed.
        if let Some(i) = r
            .status
            .iter()
            .rposition(|s| s & TD_ACTIVE == 0 && s & TD_STALLED == 0)
        {
            q.toggle = !specs[i].toggle;
        }
        (r, specs)
    }
}
