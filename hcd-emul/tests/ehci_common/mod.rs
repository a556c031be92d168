//! A guest driver for our EHCI, shaped after Linux's ehci_hcd: an async
//! ring headed by a halted H-bit QH, one QH per endpoint with a dummy qTD
//! at its tail, URBs appended by memory only (the dummy becomes the first
//! qTD, its token activated last), multi-qTD IN URBs whose non-last qTDs
//! divert to a halted "magic" qTD on a short packet, two IAA cycles per
//! unlink, a 1024-frame periodic list with interrupt QHs. It drives the
//! controller only through PCI config space and BAR 0.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcd_emul::ehci::regs::*;
use hcd_emul::ehci::Ehci;
use hcd_emul::pci::PciFunction;
use hcd_emul::GuestRam;

#[path = "../common/irq.rs"]
mod irq;
pub use irq::{IrqLog, Recorder};

pub const RAM_SIZE: usize = 64 << 20;
const ALLOC_BASE: u64 = 0x10_0000;
pub const DATA_BASE: u64 = 32 << 20;
pub const OP: u64 = CAP_LENGTH;

/// Endpoint speed in a QH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eps {
    Full = 0,
    Low = 1,
    High = 2,
}

/// One endpoint's QH and its dummy qTD.
#[derive(Debug, Clone)]
pub struct Queue {
    pub qh: u32,
    pub dummy: u32,
    pub periodic: bool,
}

/// A qTD as the driver wants it.
#[derive(Debug, Clone, Copy)]
pub struct QtdSpec {
    pub pid: u32,
    pub buf: u64,
    pub len: u32,
    pub ioc: bool,
    pub toggle: bool,
}

/// What a submitted URB's qTDs ended as.
#[derive(Debug, Clone)]
pub struct UrbResult {
    pub tokens: Vec<u32>,
}

impl UrbResult {
    /// Bytes moved by the data qTDs (pid filter).
    pub fn actual(&self, specs: &[QtdSpec], pid: u32) -> u32 {
        specs
            .iter()
            .zip(&self.tokens)
            .filter(|(s, _)| s.pid == pid)
            .map(|(s, t)| {
                if t & TOK_ACTIVE != 0 {
                    0
                } else {
                    s.len - ((t >> TOK_BYTES_SHIFT) & TOK_BYTES_MASK)
                }
            })
            .sum()
    }
    pub fn halted(&self) -> bool {
        self.tokens.iter().any(|t| t & TOK_HALTED != 0)
    }
    /// A STALL as Linux's qtd_copy_status reads it: Halted with the
    /// error counter non-zero and no babble (-EPIPE); other halts are
    /// errors (-EPROTO, -EOVERFLOW).
    pub fn stalled(&self) -> bool {
        self.tokens
            .iter()
            .any(|t| t & TOK_HALTED != 0 && t & TOK_CERR != 0 && t & TOK_BABBLE == 0)
    }
}

pub struct Driver {
    pub pci: PciFunction<Ehci>,
    pub ram: GuestRam,
    pub irq: Arc<Mutex<IrqLog>>,
    next: u64,
    pub head: u32,
    /// The halted qTD non-last IN qTDs divert to on a short packet.
    pub magic: u32,
    pub frame_list: u32,
    pub timeout: Duration,
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver {
    pub fn new() -> Driver {
        let ram = GuestRam::anonymous(RAM_SIZE);
        Self::with_ehci(Ehci::new(ram.clone()), ram)
    }

    pub fn with_ehci(e: Ehci, ram: GuestRam) -> Driver {
        let irq = Arc::new(Mutex::new(IrqLog::default()));
        let pci = PciFunction::new(e, Box::new(Recorder(irq.clone())));
        let mut d = Driver {
            pci,
            ram,
            irq,
            next: ALLOC_BASE,
            head: 0,
            magic: 0,
            frame_list: 0,
            timeout: Duration::from_secs(10),
        };
        // Memory + Bus Master, BAR 0 at 0xfebf0000.
        d.pci.config_write(0x10, &0xfebf_0000u32.to_le_bytes());
        d.pci.config_write(0x04, &6u16.to_le_bytes());
        d
    }

    pub fn alloc(&mut self, size: u64, align: u64) -> u32 {
        let a = (self.next + align - 1) & !(align - 1);
        self.next = a + size;
        assert!(self.next < DATA_BASE, "driver allocator exhausted");
        self.ram.write(a, &vec![0u8; size as usize]).unwrap();
        a as u32
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.pci.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.pci.bar_write(0, off, &v.to_le_bytes());
    }

    pub fn rd(&self, addr: u32) -> u32 {
        self.ram.read_u32(u64::from(addr)).unwrap()
    }

    pub fn wr(&self, addr: u32, v: u32) {
        self.ram.write_u32(u64::from(addr), v).unwrap();
    }

    pub fn usbsts(&mut self) -> u32 {
        self.r32(OP + OP_USBSTS)
    }

    pub fn portsc(&mut self, p: usize) -> u32 {
        self.r32(OP + OP_PORTSC + 4 * (p as u64 - 1))
    }

    pub fn write_portsc(&mut self, p: usize, v: u32) {
        self.w32(OP + OP_PORTSC + 4 * (p as u64 - 1), v);
    }

    /// ehci_reset + ehci_run: HCRESET, the async head, the frame list,
    /// RS, CONFIGFLAG.
    pub fn start(&mut self) {
        self.w32(OP + OP_USBCMD, CMD_HCRESET);
        assert_eq!(
            self.r32(OP + OP_USBCMD) & CMD_HCRESET,
            0,
            "HCRESET settles in the write"
        );
        assert_ne!(self.r32(OP + OP_USBSTS) & STS_HCHALTED, 0);
        self.magic = self.alloc(32, 32);
        self.wr(self.magic, LINK_T);
        self.wr(self.magic + 4, LINK_T);
        self.wr(self.magic + 8, TOK_HALTED);
        self.head = self.alloc(64, 32);
        self.wr(self.head, self.head | TYPE_QH);
        self.wr(self.head + 4, QH_H);
        self.wr(self.head + 16, LINK_T);
        self.wr(self.head + 20, self.magic);
        self.wr(self.head + 24, TOK_HALTED);
        self.frame_list = self.alloc(4096, 4096);
        for i in 0..1024 {
            self.wr(self.frame_list + 4 * i, LINK_T);
        }
        self.w32(OP + OP_PERIODICLISTBASE, self.frame_list);
        self.w32(OP + OP_ASYNCLISTADDR, self.head);
        self.w32(OP + OP_USBCMD, CMD_RS | CMD_DEFAULT);
        self.w32(OP + OP_CONFIGFLAG, 1);
        let _ = self.r32(OP + OP_USBCMD);
        self.w32(OP + OP_USBINTR, 0x37);
        assert_eq!(self.r32(OP + OP_USBSTS) & STS_HCHALTED, 0);
    }

    /// Enables the asynchronous schedule and waits for ASS.
    pub fn enable_async(&mut self) {
        let c = self.r32(OP + OP_USBCMD);
        self.w32(OP + OP_USBCMD, c | CMD_ASE);
        assert_ne!(self.r32(OP + OP_USBSTS) & STS_ASS, 0);
    }

    pub fn enable_periodic(&mut self) {
        let c = self.r32(OP + OP_USBCMD);
        self.w32(OP + OP_USBCMD, c | CMD_PSE);
        assert_ne!(self.r32(OP + OP_USBSTS) & STS_PSS, 0);
    }

    /// Root port reset as ehci-hub does it: PR=1, then PR=0; returns
    /// PORTSC after.
    pub fn reset_port(&mut self, p: usize) -> u32 {
        let v = self.portsc(p) & !PORT_RWC;
        self.write_portsc(p, (v | PORT_PR) & !PORT_PED);
        let v = self.portsc(p) & !PORT_RWC;
        self.write_portsc(p, v & !PORT_PR);
        let v = self.portsc(p);
        assert_eq!(v & PORT_PR, 0, "reset completes when PR is cleared");
        v
    }

    /// A QH for an endpoint, with its dummy qTD, not linked yet.
    #[allow(clippy::too_many_arguments)]
    pub fn make_qh(
        &mut self,
        addr: u8,
        ep: u8,
        eps: Eps,
        mps: u32,
        control: bool,
        hub: Option<(u8, u8)>,
        smask: u8,
    ) -> Queue {
        let qh = self.alloc(64, 32);
        let dummy = self.alloc(32, 32);
        self.wr(dummy, LINK_T);
        self.wr(dummy + 4, LINK_T);
        self.wr(dummy + 8, 0);
        let mut ch = u32::from(addr) | (u32::from(ep) << 8) | ((eps as u32) << QH_EPS_SHIFT);
        ch |= mps << 16;
        if control {
            ch |= QH_DTC;
            if eps != Eps::High {
                ch |= QH_C;
            }
        }
        ch |= 8 << 28; // RL
        let mut caps = u32::from(smask) | (1 << 30);
        if let Some((h, p)) = hub {
            caps |= (u32::from(h) << 16) | (u32::from(p) << 23) | (0x1c << 8);
        }
        self.wr(qh + 4, ch);
        self.wr(qh + 8, caps);
        self.wr(qh + 12, 0);
        self.wr(qh + 16, dummy); // overlay next = the dummy
        self.wr(qh + 20, LINK_T);
        self.wr(qh + 24, 0);
        Queue {
            qh,
            dummy,
            periodic: smask != 0,
        }
    }

    /// Links a QH into the async ring after the head.
    pub fn link_async(&mut self, q: &Queue) {
        let after = self.rd(self.head);
        self.wr(q.qh, after);
        self.wr(self.head, q.qh | TYPE_QH);
    }

    /// Unlinks a QH from the async ring and runs two IAA cycles, as Linux
    /// does before it reuses the QH's memory.
    pub fn unlink_async(&mut self, q: &Queue) {
        let mut prev = self.head;
        for _ in 0..64 {
            let link = self.rd(prev) & LINK_ADDR;
            if link == q.qh {
                self.wr(prev, self.rd(q.qh));
                break;
            }
            prev = link;
        }
        for _ in 0..2 {
            let c = self.r32(OP + OP_USBCMD);
            self.w32(OP + OP_USBCMD, c | CMD_IAAD);
            assert_ne!(
                self.r32(OP + OP_USBSTS) & STS_IAA,
                0,
                "IAA answered at once"
            );
            self.w32(OP + OP_USBSTS, STS_IAA);
        }
    }

    /// qh_refresh + qh_update on an idle (unlinked) QH: the overlay
    /// points at the queue's next qTD (the dummy the next URB fills),
    /// alternate next terminated, the halt and status cleared, the data
    /// toggle kept (or reset, after a clear-halt).
    pub fn refresh(&mut self, q: &Queue, keep_toggle: bool) {
        self.wr(q.qh + 16, q.dummy);
        self.wr(q.qh + 20, LINK_T);
        let t = self.rd(q.qh + 24);
        let keep = if keep_toggle {
            TOK_DT | TOK_PING
        } else {
            TOK_PING
        };
        self.wr(q.qh + 24, t & keep);
    }

    /// Links a periodic QH into every `period`-th frame.
    pub fn link_periodic(&mut self, q: &Queue, period: u32) {
        for f in (0..1024).step_by(period as usize) {
            let slot = self.frame_list + 4 * f;
            let old = self.rd(slot);
            if self.rd(q.qh) == 0 {
                self.wr(q.qh, old);
            }
            self.wr(slot, q.qh | TYPE_QH);
        }
    }

    /// Appends an URB by memory only: the qTDs are written into the old
    /// dummy and fresh qTDs, a new dummy ends the chain, and the old
    /// dummy's token is activated last. IN qTDs but the last divert to the
    /// magic qTD on a short packet. Returns the qTD addresses.
    pub fn append(&mut self, q: &mut Queue, specs: &[QtdSpec]) -> Vec<u32> {
        let new_dummy = self.alloc(32, 32);
        self.wr(new_dummy, LINK_T);
        self.wr(new_dummy + 4, LINK_T);
        self.wr(new_dummy + 8, 0);
        let mut addrs = vec![q.dummy];
        for _ in 1..specs.len() {
            addrs.push(self.alloc(32, 32));
        }
        let mut first_token = 0;
        for (i, s) in specs.iter().enumerate() {
            let a = addrs[i];
            let next = addrs.get(i + 1).copied().unwrap_or(new_dummy);
            let last_data = specs[i + 1..].iter().all(|n| n.pid != s.pid);
            let alt = if s.pid == PID_IN && !last_data {
                self.magic
            } else {
                LINK_T
            };
            self.wr(a, next);
            self.wr(a + 4, alt);
            let mut buf = [0u32; 5];
            let mut p = s.buf;
            for b in &mut buf {
                *b = p as u32;
                p = (p & !0xfff) + 0x1000;
            }
            for (j, b) in buf.iter().enumerate() {
                self.wr(a + 12 + 4 * j as u32, *b);
            }
            let tok = TOK_ACTIVE
                | (s.pid << 8)
                | (3 << 10)
                | if s.ioc { TOK_IOC } else { 0 }
                | (s.len << TOK_BYTES_SHIFT)
                | if s.toggle { TOK_DT } else { 0 };
            if i == 0 {
                first_token = tok;
                self.wr(a + 8, tok & !TOK_ACTIVE);
            } else {
                self.wr(a + 8, tok);
            }
        }
        self.wr(addrs[0] + 8, first_token);
        q.dummy = new_dummy;
        addrs
    }

    /// Lets the controller run its timers until `done()` or the timeout.
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

    /// Submits an URB and waits for its last qTD, a halt, or a short
    /// packet that stopped the queue (then the overlay is refreshed past
    /// the URB, as Linux's qh_completions + qh_refresh do).
    pub fn submit(&mut self, q: &mut Queue, specs: &[QtdSpec]) -> UrbResult {
        let addrs = self.append(q, specs);
        let qh = q.qh;
        let n = addrs.len();
        let stopped_short = |d: &Driver| {
            addrs[..n - 1].iter().any(|a| {
                let t = d.rd(a + 8);
                t & TOK_ACTIVE == 0
                    && (t >> TOK_BYTES_SHIFT) & TOK_BYTES_MASK != 0
                    && d.rd(a + 4) & LINK_T == 0
            })
        };
        let ok = self.run_until(|d| {
            d.rd(addrs[n - 1] + 8) & TOK_ACTIVE == 0
                || addrs.iter().any(|a| d.rd(a + 8) & TOK_HALTED != 0)
                || stopped_short(d)
        });
        let tokens: Vec<u32> = addrs.iter().map(|a| self.rd(a + 8)).collect();
        assert!(ok, "URB never completed: {tokens:x?}");
        if stopped_short(self) && self.rd(addrs[n - 1] + 8) & TOK_ACTIVE != 0 {
            self.wr(qh + 16, q.dummy);
            self.wr(qh + 20, LINK_T);
            let t = self.rd(qh + 24);
            self.wr(qh + 24, t & TOK_DT);
            // The qTDs left behind are given back inactive.
            for a in &addrs {
                let t = self.rd(a + 8);
                self.wr(a + 8, t & !TOK_ACTIVE);
            }
        }
        UrbResult { tokens }
    }

    /// A control transfer on `q`: SETUP, data (split in `chunk`-byte
    /// qTDs), status. Returns the data stage's bytes and whether it
    /// stalled.
    pub fn control(
        &mut self,
        q: &mut Queue,
        setup: [u8; 8],
        data: Option<(u64, u32)>,
    ) -> (u32, bool) {
        let sbuf = self.alloc(8, 8);
        self.ram.write(u64::from(sbuf), &setup).unwrap();
        let dir_in = setup[0] & 0x80 != 0;
        let mut specs = vec![QtdSpec {
            pid: PID_SETUP,
            buf: u64::from(sbuf),
            len: 8,
            ioc: false,
            toggle: false,
        }];
        if let Some((buf, len)) = data {
            specs.push(QtdSpec {
                pid: if dir_in { PID_IN } else { PID_OUT },
                buf,
                len,
                ioc: false,
                toggle: true,
            });
        }
        specs.push(QtdSpec {
            pid: if dir_in && data.is_some() {
                PID_OUT
            } else {
                PID_IN
            },
            buf: 0,
            len: 0,
            ioc: true,
            toggle: true,
        });
        let r = self.submit(q, &specs);
        let pid = if dir_in { PID_IN } else { PID_OUT };
        (r.actual(&specs, pid), r.halted())
    }

    pub fn control_in(&mut self, q: &mut Queue, setup: [u8; 8]) -> Result<Vec<u8>, ()> {
        let len = u32::from(u16::from_le_bytes([setup[6], setup[7]]));
        let buf = self.alloc(u64::from(len.max(1)), 64);
        let (n, stalled) = self.control(q, setup, Some((u64::from(buf), len)));
        if stalled {
            return Err(());
        }
        let mut v = vec![0u8; n as usize];
        self.ram.read(u64::from(buf), &mut v).unwrap();
        Ok(v)
    }

    /// Bulk/interrupt URB: `len` bytes at `buf` in qTDs of at most
    /// `chunk` bytes (page-aligned splits, as Linux's qtd_fill).
    pub fn bulk(&mut self, q: &mut Queue, pid: u32, buf: u64, len: u32, chunk: u32) -> UrbResult {
        let mut specs = Vec::new();
        let mut off = 0u32;
        loop {
            let n = (len - off).min(chunk);
            specs.push(QtdSpec {
                pid,
                buf: buf + u64::from(off),
                len: n,
                ioc: false,
                toggle: false,
            });
            off += n;
            if off >= len {
                break;
            }
        }
        if let Some(l) = specs.last_mut() {
            l.ioc = true;
        }
        self.submit(q, &specs)
    }
}

/// USB setup packet bytes.
pub fn setup(rt: u8, req: u8, value: u16, index: u16, len: u16) -> [u8; 8] {
    let v = value.to_le_bytes();
    let i = index.to_le_bytes();
    let l = len.to_le_bytes();
    [rt, req, v[0], v[1], i[0], i[1], l[0], l[1]]
}
