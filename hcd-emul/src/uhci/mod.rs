//! UHCI host controller (Universal Host Controller Interface 1.1), with
//! the identity of Intel's PIIX3 USB function.
//!
//! [`regs`] is the register and data-structure layout (chapters 2 and 3);
//! `schedule` walks the frame list, TDs and QHs (chapter 3.4) and turns
//! runs of TDs into transfers. A plain state machine like the other
//! controllers: inputs are register accesses and
//! [`PciController::process`], outputs guest memory and an [`IrqSink`].
//!
//! UHCI has no doorbell: the guest edits its schedule in memory and
//! expects the controller to notice. Time is lazy: FRNUM is derived from a
//! monotonic clock; the schedule is walked on register writes, on device
//! completions and by an adaptive poll while the controller runs (fast
//! right after activity, backing off to [`limits::POLL_MAX`] when nothing
//! changes), never while it is halted or suspended. A walk visits every QH
//! reachable from the whole frame list once and runs each queue as far as
//! its TDs go, so bulk moves at memory speed instead of QEMU's 1280 bytes
//! per frame. Before FRNUM may show the guest a new frame, a walk has
//! checked that every transfer in flight still belongs to a linked QH: a
//! guest that unlinks a QH and waits for the frame to advance (Linux,
//! SeaBIOS) can then free its TDs. See docs/design.md for the worst-case
//! latencies.

pub mod regs;
mod schedule;

use std::collections::HashMap;
use std::time::Instant;

use crate::mem::GuestRam;
use crate::pci::{BarInfo, BarKind, IrqSink, MsixLayout, PciController, PciIdentity};
use crate::poll::{AdaptivePoll, FaultGrace};
use crate::usb::{CompletionQueue, Speed, TransferHandle, TransferId, TransferResult, UsbDevice};
use regs::*;

/// Caps on every loop the guest controls.
pub mod limits {
    use std::time::Duration;
    /// QHs and TDs visited in one walk of the schedule.
    pub const NODES_PER_WALK: usize = 1024;
    /// TDs at the head of one frame-list entry before its first QH.
    pub const TDS_PER_FRAME: usize = 16;
    /// Frames whose frame-bound TDs (isochronous) are caught up in one
    /// wake-up; older ones are skipped, as missed frames.
    pub const FRAMES_PER_WALK: u64 = 64;
    /// TDs merged into one transfer: 120 KiB (Linux's largest URB for a
    /// stick) in 64-byte packets is 1920.
    pub const TDS_PER_TRANSFER: usize = 2048;
    /// Bytes in one transfer.
    pub const BYTES_PER_TRANSFER: usize = 1 << 20;
    /// TDs completed locally for one QH in one visit (the status stage
    /// of a control transfer the device already finished).
    pub const OWED_PER_VISIT: usize = 64;
    /// Work per guest access and per wake-up, in guest-memory operations
    /// (as the other controllers').
    pub const WORK_PER_ACCESS: u64 = 8192;
    /// Poll interval right after activity (a guest streaming appends its
    /// next request right after handling the last completion).
    pub const POLL_MIN: Duration = Duration::from_micros(125);
    /// Idle walks at [`POLL_MIN`] after activity before backing off (2 ms).
    pub const FAST_WALKS: u32 = 16;
    /// Longest poll interval: a request the guest adds to an idle
    /// schedule waits at most this long (Linux gives up on a queue after
    /// 200 ms without progress).
    pub const POLL_MAX: Duration = Duration::from_millis(32);
    /// How long schedule memory may stay unreachable before it is a Host
    /// System Error (a vfio-user client remapping guest RAM; as EHCI's).
    pub const FAULT_GRACE: Duration = Duration::from_millis(20);
}

/// Why a device could not be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// Both ports are taken.
    #[error("no free port for this device (UHCI has 2)")]
    NoFreePort,
    /// High-speed and SuperSpeed devices need EHCI or xHCI.
    #[error("a {0:?}-speed device cannot be attached to UHCI (full and low speed only: use speed = \"full\" or an EHCI/xHCI controller)")]
    TooFast(Speed),
    /// The port does not exist or is taken.
    #[error("port {0} does not exist or is taken")]
    BadPort(usize),
}

#[derive(Debug)]
struct Port {
    portsc: u16,
    device: Option<Box<dyn UsbDevice>>,
    /// The device's address (0 after reset), from its SET_ADDRESS.
    address: u8,
}

/// Work counters (diagnostics, benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UhciStats {
    /// Transfers handed to devices.
    pub transfers: u64,
    /// TDs in those transfers.
    pub tds: u64,
    /// Bytes requested.
    pub bytes: u64,
    /// Walks of the schedule.
    pub walks: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

/// The UHCI controller.
#[derive(Debug)]
pub struct Uhci {
    ram: GuestRam,
    queue: CompletionQueue,
    /// Guest-requested resets (HCRESET), for watchers on other threads.
    resets: crate::controller::ResetCount,
    usbcmd: u16,
    usbsts: u16,
    usbintr: u16,
    /// Frames counted before `run_start` (FRNUM while halted).
    frame_base: u64,
    run_start: Instant,
    flbase: u32,
    sofmod: u8,
    ports: Vec<Port>,
    bus_master: bool,
    /// USBINT's two causes (QEMU's `status2`): an IOC and a short packet
    /// with SPD. Each interrupts only if its enable is set.
    int_ioc: bool,
    int_short: bool,
    /// Transfers in flight, by id; at most one per QH (or per TD outside
    /// a QH).
    inflight: HashMap<TransferId, schedule::InFlight>,
    by_element: HashMap<u32, TransferId>,
    next_id: u64,
    /// TDs of control transfers the device finished although the guest's
    /// queue stopped early (a short data stage with SPD): per QH, the TDs
    /// completed when the queue reaches them.
    owed: HashMap<u32, Vec<u32>>,
    budget: crate::mem::WorkBudget,
    poll: AdaptivePoll,
    /// The last frame whose frame-bound TDs were processed.
    last_frame: Option<u64>,
    /// The frame of the last walk that checked the transfers in flight.
    checked_frame: Option<u64>,
    /// The frame in which an inactive TD with IOC last interrupted.
    ioc_frame: Option<u64>,
    unfinished: bool,
    level: bool,
    faults: FaultGrace,
    unretired: Vec<(schedule::InFlight, TransferResult)>,
    /// The frame list as last read, and its distinct entries (QH or TD
    /// links): walks reuse them while the list is unchanged.
    fl_cache: (Vec<u8>, Vec<u32>),
    /// The buffer a walk reads the frame list into (kept: no allocation
    /// per walk).
    fl_scratch: Vec<u8>,
    stats: UhciStats,
}

impl Uhci {
    /// A controller in power-on state with DMA through `ram`.
    pub fn new(ram: GuestRam) -> Self {
        let mut u = Uhci {
            ram,
            queue: CompletionQueue::new(),
            resets: Default::default(),
            usbcmd: 0,
            usbsts: STS_HCH,
            usbintr: 0,
            frame_base: 0,
            run_start: Instant::now(),
            flbase: 0,
            sofmod: 0x40,
            ports: (0..N_PORTS)
                .map(|_| Port {
                    portsc: PORT_ALWAYS1,
                    device: None,
                    address: 0,
                })
                .collect(),
            bus_master: true,
            int_ioc: false,
            int_short: false,
            inflight: HashMap::new(),
            by_element: HashMap::new(),
            next_id: 1,
            owed: HashMap::new(),
            budget: crate::mem::WorkBudget::default(),
            poll: AdaptivePoll::new(limits::POLL_MIN, limits::POLL_MAX, limits::FAST_WALKS),
            last_frame: None,
            checked_frame: None,
            ioc_frame: None,
            unfinished: false,
            level: false,
            faults: FaultGrace::new(limits::FAULT_GRACE),
            unretired: Vec::new(),
            fl_cache: (Vec::new(), Vec::new()),
            fl_scratch: vec![0; 4096],
            stats: UhciStats::default(),
        };
        u.hc_reset();
        u
    }

    /// How often the guest reset the controller (a handle for watchers).
    pub fn reset_count(&self) -> crate::controller::ResetCount {
        self.resets.clone()
    }

    /// The queue devices post completions to; transports install a waker.
    pub fn completion_queue(&self) -> &CompletionQueue {
        &self.queue
    }

    /// Guest memory handle.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Transfers handed to devices and not yet reported.
    pub fn transfers_in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Work counters.
    pub fn stats(&self) -> UhciStats {
        self.stats
    }

    /// Whether the controller is halted.
    pub fn halted(&self) -> bool {
        self.usbsts & STS_HCH != 0
    }

    /// USBSTS as the guest would read it.
    pub fn usbsts(&self) -> u16 {
        self.usbsts
    }

    fn running(&self) -> bool {
        self.usbcmd & CMD_RS != 0 && self.usbsts & STS_HCH == 0
    }

    fn dma_allowed(&self) -> bool {
        self.running() && self.bus_master && self.usbcmd & CMD_EGSM == 0
    }

    fn budget_left(&self) -> bool {
        self.budget.left(&self.ram, limits::WORK_PER_ACCESS)
    }

    fn alloc_id(&mut self) -> TransferId {
        let id = TransferId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Plugs `dev` into the first free port. Returns the port (1-based).
    pub fn attach(&mut self, dev: Box<dyn UsbDevice>) -> Result<usize, AttachError> {
        if matches!(dev.speed(), Speed::High | Speed::Super) {
            return Err(AttachError::TooFast(dev.speed()));
        }
        let p = (1..=N_PORTS)
            .find(|&p| self.ports[p - 1].device.is_none())
            .ok_or(AttachError::NoFreePort)?;
        self.attach_at(p, dev)?;
        Ok(p)
    }

    /// Plugs `dev` into port `p` (1-based).
    pub fn attach_at(&mut self, p: usize, mut dev: Box<dyn UsbDevice>) -> Result<(), AttachError> {
        if matches!(dev.speed(), Speed::High | Speed::Super) {
            return Err(AttachError::TooFast(dev.speed()));
        }
        if !(1..=N_PORTS).contains(&p) || self.ports[p - 1].device.is_some() {
            return Err(AttachError::BadPort(p));
        }
        dev.set_wakeup(self.queue.wakeup());
        self.ports[p - 1].device = Some(dev);
        self.ports[p - 1].address = 0;
        self.port_connect_change(p);
        Ok(())
    }

    /// The devices plugged in: port (1-based) and device.
    pub fn devices(&self) -> Vec<(usize, &dyn UsbDevice)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.device.as_deref().map(|d| (i + 1, d)))
            .collect()
    }

    /// Unplugs the device on port `p`, failing its transfers.
    pub fn detach(&mut self, p: usize) -> Option<Box<dyn UsbDevice>> {
        if !(1..=N_PORTS).contains(&p) {
            return None;
        }
        self.cancel_port(p);
        let dev = self.ports[p - 1].device.take()?;
        self.port_connect_change(p);
        Some(dev)
    }

    fn port_connected(&self, p: usize) -> bool {
        self.ports[p - 1]
            .device
            .as_ref()
            .is_some_and(|d| d.connected())
    }

    /// Re-evaluates CCS after a plug or unplug (§2.1.7).
    fn port_connect_change(&mut self, p: usize) {
        let now = self.port_connected(p);
        let low = self.ports[p - 1]
            .device
            .as_ref()
            .is_some_and(|d| d.speed() == Speed::Low);
        let port = &mut self.ports[p - 1];
        if now == (port.portsc & PORT_CCS != 0) {
            return;
        }
        if now {
            port.portsc |= PORT_CCS | PORT_CSC;
            port.portsc &= !(PORT_LS | PORT_LSDA);
            port.portsc |= if low {
                PORT_LSDA | PORT_LS_LS_J
            } else {
                PORT_LS_FS_J
            };
        } else {
            if port.portsc & PORT_PE != 0 {
                port.portsc |= PORT_PEC;
            }
            port.portsc &= !(PORT_CCS | PORT_PE | PORT_LS | PORT_LSDA | PORT_SUSP);
            port.portsc |= PORT_CSC;
            port.address = 0;
        }
        if self.usbcmd & CMD_EGSM != 0 {
            // A connection change in global suspend is a resume event.
            self.usbsts |= STS_RD;
        }
    }

    fn poll_connections(&mut self) {
        for p in 1..=N_PORTS {
            let before = self.ports[p - 1].portsc & PORT_CCS != 0;
            self.port_connect_change(p);
            if before && self.ports[p - 1].portsc & PORT_CCS == 0 {
                self.cancel_port(p);
            }
        }
    }

    /// HCRESET (§2.1.1): registers to their defaults, transfers
    /// cancelled, ports reset; connected devices show a new connection.
    fn hc_reset(&mut self) {
        self.resets.bump();
        self.cancel_all();
        self.owed.clear();
        self.usbcmd = 0;
        self.usbsts = STS_HCH;
        self.usbintr = 0;
        self.frame_base = 0;
        self.flbase = 0;
        self.sofmod = 0x40;
        self.int_ioc = false;
        self.int_short = false;
        self.poll.stop();
        self.last_frame = None;
        self.checked_frame = None;
        self.ioc_frame = None;
        self.unfinished = false;
        self.faults.reset();
        for p in 1..=N_PORTS {
            let port = &mut self.ports[p - 1];
            port.portsc = PORT_ALWAYS1;
            port.address = 0;
            if let Some(d) = port.device.as_mut() {
                d.reset();
            }
            self.port_connect_change(p);
        }
        self.queue.drain();
    }

    /// Schedule memory could not be read or written: a Host System Error
    /// if it stays so for [`limits::FAULT_GRACE`].
    fn schedule_fault(&mut self, why: &str) {
        if self.faults.fault() {
            guest_warn!(target: "uhci", "host system error: {why}");
            self.usbsts |= STS_HSE;
            self.stop();
        }
    }

    /// The controller stops (RS cleared by software, an error or HSE).
    fn stop(&mut self) {
        if self.usbsts & STS_HCH == 0 {
            self.frame_base = self.frame();
        }
        self.usbcmd &= !CMD_RS;
        self.usbsts |= STS_HCH;
        self.poll.stop();
        self.cancel_all();
    }

    /// Frames since power-on as the controller counts them (FRNUM is its
    /// low 11 bits; the frame list index its low 10).
    fn frame(&self) -> u64 {
        if self.usbsts & STS_HCH != 0 || self.usbcmd & CMD_EGSM != 0 {
            return self.frame_base;
        }
        self.frame_base + self.run_start.elapsed().as_millis() as u64
    }

    /// FRNUM as the guest reads it. The guest may free the TDs of a QH it
    /// unlinked once the frame number moved on, so a walk first drops
    /// transfers whose QH is no longer linked.
    fn read_frnum(&mut self) -> u16 {
        let f = self.frame();
        if self.checked_frame.is_some_and(|c| c < f)
            && !self.inflight.is_empty()
            && self.dma_allowed()
        {
            self.walk();
        }
        (f & 0x7ff) as u16
    }

    /// A guest's read: FRNUM may first check the transfers in flight.
    fn read16(&mut self, off: u64) -> u16 {
        if off == REG_FRNUM {
            return self.read_frnum();
        }
        self.peek16(off)
    }

    /// Bits of the 16-bit register at `off` that a write of 0 leaves
    /// alone (write-1-to-clear).
    fn rwc_bits(off: u64) -> u16 {
        match off {
            REG_USBSTS => STS_RWC,
            o if (REG_PORTSC..REG_PORTSC + 2 * N_PORTS as u64).contains(&o) => PORT_RWC,
            _ => 0,
        }
    }

    fn write16(&mut self, off: u64, val: u16) {
        match off {
            REG_USBCMD => self.write_usbcmd(val),
            REG_USBSTS => {
                self.usbsts &= !(val & STS_RWC & !STS_HCH);
                if val & STS_USBINT != 0 {
                    self.int_ioc = false;
                    self.int_short = false;
                }
            }
            REG_USBINTR => self.usbintr = val & 0xf,
            REG_FRNUM => {
                if self.usbsts & STS_HCH != 0 {
                    self.frame_base = u64::from(val & 0x7ff);
                    self.last_frame = None;
                } else {
                    guest_warn!(target: "uhci", "FRNUM write {val:#x} while running ignored");
                }
            }
            REG_FLBASEADD => self.set_flbase((self.flbase & 0xffff_0000) | u32::from(val)),
            0x0a => self.set_flbase((self.flbase & 0xffff) | (u32::from(val) << 16)),
            REG_SOFMOD => self.sofmod = (val & 0x7f) as u8,
            o if (REG_PORTSC..REG_PORTSC + 2 * N_PORTS as u64).contains(&o) => {
                self.write_portsc(((o - REG_PORTSC) / 2) as usize + 1, val)
            }
            _ => guest_warn!(target: "uhci", "write {val:#x} to register {off:#x} ignored"),
        }
    }

    fn set_flbase(&mut self, v: u32) {
        let v = v & !0xfff;
        if v != self.flbase {
            self.flbase = v;
            // A new frame list: its frame-bound TDs count from now.
            self.last_frame = None;
        }
    }

    fn write_usbcmd(&mut self, val: u16) {
        if val & CMD_HCRESET != 0 {
            // Completes inside the write (Linux checks it 5 µs later).
            self.hc_reset();
            return;
        }
        let old = self.usbcmd;
        if val & CMD_GRESET != 0 && old & CMD_GRESET == 0 {
            // Global reset: the bus is reset; the devices with it.
            self.cancel_all();
            for p in 1..=N_PORTS {
                let port = &mut self.ports[p - 1];
                port.portsc &= !(PORT_PE | PORT_SUSP | PORT_RD);
                port.address = 0;
                if let Some(d) = port.device.as_mut() {
                    d.reset();
                }
            }
        }
        self.usbcmd = val & CMD_WRITABLE;
        if old & CMD_RS == 0 && val & CMD_RS != 0 {
            if self.usbsts & (STS_HSE | STS_HCPE) != 0 {
                // Halted by an error: stays halted until the error is
                // acknowledged (or the controller reset).
                self.usbcmd &= !CMD_RS;
                return;
            }
            self.usbsts &= !STS_HCH;
            self.run_start = Instant::now();
            self.last_frame = None;
            self.checked_frame = None;
        } else if old & CMD_RS != 0 && val & CMD_RS == 0 {
            self.stop();
        }
        if old & CMD_EGSM == 0 && val & CMD_EGSM != 0 && self.usbsts & STS_HCH == 0 {
            // Global suspend while running: the frame counter stops.
            self.frame_base += self.run_start.elapsed().as_millis() as u64;
        } else if old & CMD_EGSM != 0 && val & CMD_EGSM == 0 {
            self.run_start = Instant::now();
            self.usbsts &= !STS_RD;
        }
        self.kick();
    }

    fn write_portsc(&mut self, p: usize, val: u16) {
        let old = self.ports[p - 1].portsc;
        let mut v = old & !(val & PORT_RWC);
        if val & PORT_PR != 0 && old & PORT_PR == 0 {
            // Reset begins: the port is disabled, the device reset (and
            // its transfers gone).
            self.cancel_port(p);
            v = (v | PORT_PR) & !(PORT_PE | PORT_SUSP);
            let port = &mut self.ports[p - 1];
            port.address = 0;
            if let Some(d) = port.device.as_mut() {
                d.reset();
            }
        } else if val & PORT_PR == 0 {
            v &= !PORT_PR;
        }
        // Software enables a port (Linux after reset) or disables it.
        if val & PORT_PE != 0 && v & PORT_CCS != 0 && v & PORT_PR == 0 {
            v |= PORT_PE;
        } else if val & PORT_PE == 0 {
            if old & PORT_PE != 0 {
                self.cancel_port(p);
            }
            v &= !PORT_PE;
        }
        v = (v & !(PORT_SUSP | PORT_RD)) | (val & (PORT_SUSP | PORT_RD));
        if v & PORT_CCS == 0 {
            v &= !PORT_SUSP;
        }
        self.ports[p - 1].portsc = v | PORT_ALWAYS1;
        if (old ^ v) & PORT_SUSP != 0 {
            if let Some(d) = self.ports[p - 1].device.as_mut() {
                d.suspend(v & PORT_SUSP != 0);
            }
        }
    }

    /// Device-initiated resume (UHCI 1.1 §2.1.7, §2.1.2): a device on a
    /// suspended port that signals remote wakeup sets the port's Resume
    /// Detect (software sees it when it looks at the port, ends the resume
    /// 20 ms later by clearing Suspend and Resume Detect); in global
    /// suspend also USBSTS.RD (the Resume interrupt) and USBCMD.FGR.
    fn poll_remote_wakeup(&mut self) {
        for p in 1..=N_PORTS {
            let port = &mut self.ports[p - 1];
            if port.portsc & (PORT_SUSP | PORT_RD | PORT_PE) != PORT_SUSP | PORT_PE {
                continue;
            }
            if port.device.as_mut().is_some_and(|d| d.remote_wakeup()) {
                port.portsc |= PORT_RD;
                if self.usbcmd & CMD_EGSM != 0 {
                    self.usbsts |= STS_RD;
                    self.usbcmd |= CMD_FGR;
                }
            }
        }
    }

    fn flush_interrupts(&mut self, irq: &mut dyn IrqSink) {
        if self.int_ioc || self.int_short {
            self.usbsts |= STS_USBINT;
        }
        let e = self.usbintr;
        let level = (self.int_ioc && e & INTR_IOC != 0)
            || (self.int_short && e & INTR_SP != 0)
            || (self.usbsts & STS_ERROR != 0 && e & INTR_TIMEOUT_CRC != 0)
            || (self.usbsts & STS_RD != 0 && e & INTR_RESUME != 0)
            || self.usbsts & (STS_HSE | STS_HCPE) != 0;
        if level && !self.level {
            self.stats.interrupts += 1;
            irq.pulse(0);
        }
        self.level = level;
        irq.set_level(0, level);
    }

    fn run_work(&mut self) {
        if !self.dma_allowed() {
            return;
        }
        let now = Instant::now();
        if self.faults.begin(now) {
            self.poll.now(now);
        }
        for (inf, r) in std::mem::take(&mut self.unretired) {
            self.apply_result(inf, r);
        }
        let mut busy = false;
        for r in self.queue.drain() {
            busy = true;
            self.retire(r);
        }
        self.unfinished = false;
        if self.dma_allowed() && self.poll.is_due(Instant::now()) {
            busy |= self.walk();
            self.poll.walked(busy);
        }
        if !self.budget_left() {
            self.unfinished = true;
        }
        self.faults.end(self.unretired.is_empty());
    }

    /// A completion or register write: walk the schedule now.
    fn kick(&mut self) {
        if self.dma_allowed() {
            self.poll.kick(Instant::now());
        }
    }

    fn bar_write16(&mut self, off: u64, val: u16, mask: u16) {
        let val = if mask == 0xffff {
            val
        } else {
            // A partial write: the other byte keeps its value, except
            // write-1-to-clear bits, which a write of 0 leaves alone.
            let cur = self.peek16(off) & !Self::rwc_bits(off);
            (cur & !mask) | (val & mask)
        };
        self.write16(off, val);
    }

    /// A register's value without side effects (FRNUM unchecked).
    fn peek16(&self, off: u64) -> u16 {
        match off {
            REG_USBCMD => self.usbcmd,
            REG_USBSTS => self.usbsts,
            REG_USBINTR => self.usbintr,
            REG_FRNUM => (self.frame() & 0x7ff) as u16,
            REG_FLBASEADD => self.flbase as u16,
            0x0a => (self.flbase >> 16) as u16,
            REG_SOFMOD => u16::from(self.sofmod),
            o if (REG_PORTSC..REG_PORTSC + 2 * N_PORTS as u64).contains(&o) => {
                self.ports[((o - REG_PORTSC) / 2) as usize].portsc
            }
            o if o >= REG_PORTSC => PORT_MISSING,
            _ => 0,
        }
    }
}

impl PciController for Uhci {
    fn identity(&self) -> PciIdentity {
        // Intel 82371SB (PIIX3) USB, QEMU's `piix3-usb-uhci` (what libxl's
        // usbctrl version=1 gives): every UHCI driver binds it by class;
        // Linux has no quirk for it beyond the generic Intel USBLEGSUP
        // handling it needs anyway.
        PciIdentity {
            vendor_id: 0x8086,
            device_id: 0x7020,
            class_code: 0x0c0300,
            revision: 0x01,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: 4,
            size: BAR4_SIZE,
            kind: BarKind::Io,
        }]
    }

    fn msix(&self) -> Option<MsixLayout> {
        None
    }

    fn msi_vectors(&self) -> u16 {
        // PIIX3 has no MSI: INTx only, as every UHCI driver expects.
        0
    }

    fn vendor_config(&self) -> Vec<(u8, u8, u8)> {
        vec![
            // SBRN: USB 1.0 (PIIX3 §2.2.8, as QEMU).
            (0x60, 0x10, 0x00),
            // USBLEGSUP: the SMI enables and A20 bits are writable,
            // PIRQDEN (bit 13) writable and set at reset; the status
            // bits (write 1 to clear) never get set without SMM.
            (USBLEGSUP, 0x00, 0xbf),
            (USBLEGSUP + 1, 0x20, 0x20),
            // USBRES (Intel): writable, Linux zeroes it.
            (USBLEGSUP + 4, 0x00, 0x01),
        ]
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8], irq: &mut dyn IrqSink) {
        data.fill(0);
        if bar != 4 || offset >= BAR4_SIZE || data.len() > 4 {
            return;
        }
        let end = (offset + data.len() as u64).min(BAR4_SIZE);
        let mut reg = offset & !1;
        while reg < end {
            let v = self.read16(reg);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                let at = reg + i as u64;
                if (offset..end).contains(&at) {
                    data[(at - offset) as usize] = *b;
                }
            }
            reg += 2;
        }
        self.flush_interrupts(irq);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8], irq: &mut dyn IrqSink) {
        if bar != 4 || offset >= BAR4_SIZE || data.is_empty() || data.len() > 4 {
            return;
        }
        let end = (offset + data.len() as u64).min(BAR4_SIZE);
        let mut reg = offset & !1;
        while reg < end {
            let mut val = 0u16;
            let mut mask = 0u16;
            for i in 0..2u64 {
                let at = reg + i;
                if (offset..end).contains(&at) {
                    val |= u16::from(data[(at - offset) as usize]) << (8 * i);
                    mask |= 0xff << (8 * i);
                }
            }
            if reg == REG_SOFMOD {
                if mask & 0xff != 0 {
                    self.write16(reg, val & 0xff);
                }
            } else if !(REG_SOFMOD..REG_PORTSC).contains(&reg) {
                self.bar_write16(reg, val, mask);
            }
            reg += 2;
        }
        self.kick();
        self.run_work();
        self.flush_interrupts(irq);
    }

    fn new_access(&mut self) {
        self.budget.refill(&self.ram);
    }

    fn reset(&mut self, irq: &mut dyn IrqSink) {
        self.hc_reset();
        self.flush_interrupts(irq);
    }

    fn process(&mut self, irq: &mut dyn IrqSink) {
        self.budget.refill(&self.ram);
        if !self.queue.is_empty() {
            self.kick();
        }
        self.poll_connections();
        self.poll_remote_wakeup();
        self.run_work();
        self.flush_interrupts(irq);
    }

    fn set_bus_master(&mut self, enabled: bool) {
        let was = self.bus_master;
        self.bus_master = enabled;
        if was && !enabled {
            self.cancel_all();
        }
        if enabled {
            self.kick();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if !self.dma_allowed() {
            return None;
        }
        if self.unfinished {
            return Some(Instant::now());
        }
        [self.poll.due(), self.faults.retry_at()]
            .into_iter()
            .flatten()
            .min()
    }

    fn summary(&self) -> String {
        let s = self.stats;
        format!(
            "uhci: transfers={} tds={} bytes={} walks={} irqs={}",
            s.transfers, s.tds, s.bytes, s.walks, s.interrupts
        )
    }
}

#[cfg(test)]
mod tests;
