//! xHCI host controller (eXtensible Host Controller Interface 1.2).
//!
//! One file per spec block: [`regs`] (chapter 5 register layout), [`trb`]
//! (§6.4), [`ring`] (§4.9 ring walking), [`interrupter`] (§4.17 and event
//! rings), [`context`] (§6.2), `port` (§4.19 root hub), `command` (§4.6) and
//! `transfer` (§4.10-4.11). The controller is a plain state machine: register
//! accesses and [`crate::pci::PciController::process`] are its only inputs,
//! guest memory ([`GuestRam`]) and an [`IrqSink`] its only outputs.
//!
//! Guest misbehaviour ends the way a real xHC would end it — an error
//! completion code, a halted endpoint, or Host System Error with the
//! controller halted — and every guest-controlled loop is capped (see
//! [`limits`]).

pub mod context;
pub mod interrupter;
pub mod regs;
pub mod ring;
pub mod trb;

mod command;
mod port;
mod transfer;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::mem::GuestRam;
use crate::pci::{BarInfo, BarKind, IrqSink, MsixLayout, PciController, PciIdentity};
use crate::usb::{CompletionQueue, TransferHandle, TransferId, TransferResult, UsbDevice};
use context::EpState;
use interrupter::{EventError, Interrupter};
use regs::*;
use ring::RingPos;
use trb::Trb;

/// Caps on every loop the guest controls.
pub mod limits {
    /// Commands executed per guest access or wake-up (QEMU: 256 per
    /// doorbell); the rest run on the next wake-up.
    pub const COMMANDS_PER_ACCESS: usize = 256;
    /// TRBs in one TD (Linux uses far fewer: a 1 MiB transfer needs ~20).
    pub const TRBS_PER_TD: usize = 1024;
    /// TDs in flight per endpoint.
    pub const TDS_IN_FLIGHT: usize = 64;
    /// Work per guest access (one register write, or one batch of them:
    /// a vfio-user message, a Xen rep ioreq) and per wake-up of the event
    /// loop, in units of one guest-memory operation (a TRB or context
    /// read, an event write, a data segment) or one TD cancelled. A
    /// command or TD already started is finished, so one access does at
    /// most this plus one TD's worth (see docs/design.md); what is left
    /// is continued from the event loop, between other guest accesses.
    pub const WORK_PER_ACCESS: u64 = 4096;
    /// MaxPSASize advertised in HCCPARAMS1: Primary Stream Arrays of up to
    /// 2^(7+1) = 256 entries (stream IDs 1-255), as QEMU.
    pub const MAX_PSA_SIZE: u32 = 7;
}

/// Why a device could not be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// No free root port of the device's kind.
    #[error("no free root port for this device")]
    NoFreePort,
    /// The port number does not exist or does not fit the device's speed.
    #[error("root port {0} does not exist or does not fit the device")]
    BadPort(usize),
}

#[derive(Debug)]
struct Port {
    usb3: bool,
    portsc: u32,
    pmsc: u32,
    device: Option<Box<dyn UsbDevice>>,
}

/// A TD handed to a device and not yet reported to the guest.
#[derive(Debug)]
struct InFlight {
    id: TransferId,
    handle: Option<TransferHandle>,
    /// TRBs of the TD with their addresses, in ring order.
    trbs: Vec<(u64, Trb)>,
    /// Ring position of the first TRB (for rewinding on stop/halt).
    start: RingPos,
    /// Stream the TD came from (0: the endpoint has no streams).
    stream: u16,
    result: Option<TransferResult>,
}

/// One primary stream of an endpoint with streams (xHCI 1.2 §4.12).
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// Its transfer ring; `None` if its Stream Context is not a Primary
    /// Transfer Ring (SCT != 1): doorbells for it are ignored.
    ring: Option<RingPos>,
    /// Fetching stopped at the endpoint's in-flight cap (see
    /// [`Endpoint::starved`]).
    starved: bool,
}

/// A ring to fetch TDs from: slot, DCI, stream (0 without streams).
type RingKey = (usize, usize, u16);

/// Stream Context Type "Primary Transfer Ring" (§6.2.4.1, table 6-13).
const SCT_PRIMARY_TR: u64 = 1;

#[derive(Debug, Default)]
struct Endpoint {
    state: EpState,
    ep_type: u32,
    max_packet: u32,
    ring: RingPos,
    inflight: VecDeque<InFlight>,
    /// Fetching stopped at the in-flight cap with TDs possibly left on the
    /// ring: resumed when completions make room (no doorbell needed).
    starved: bool,
    /// Has results recorded that are not reported yet (listed in
    /// `Xhci::dirty`).
    dirty: bool,
    /// Primary streams, indexed by stream ID (entry 0 reserved, unused);
    /// empty if the endpoint has no streams (MaxPStreams = 0).
    streams: Vec<Stream>,
    /// Guest address of the Primary Stream Context Array.
    stream_array: u64,
}

impl Endpoint {
    fn has_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// The ring of `stream` (0 on an endpoint without streams), if it is
    /// one.
    fn ring_of(&self, stream: u16) -> Option<RingPos> {
        if self.has_streams() {
            self.streams
                .get(usize::from(stream))
                .filter(|_| stream != 0)
                .and_then(|s| s.ring)
        } else {
            (stream == 0).then_some(self.ring)
        }
    }

    fn set_ring(&mut self, stream: u16, pos: RingPos) {
        if self.has_streams() {
            if let Some(st) = self.streams.get_mut(usize::from(stream)) {
                st.ring = Some(pos);
            }
        } else {
            self.ring = pos;
        }
    }

    fn set_starved(&mut self, stream: u16, v: bool) {
        if self.has_streams() {
            if let Some(st) = self.streams.get_mut(usize::from(stream)) {
                st.starved = v;
            }
        } else {
            self.starved = v;
        }
    }
}

#[derive(Debug)]
struct Slot {
    enabled: bool,
    state: u32,
    port: usize,
    ctx_addr: u64,
    intr: usize,
    eps: Vec<Endpoint>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            enabled: false,
            state: 0,
            port: 0,
            ctx_addr: 0,
            intr: 0,
            eps: (0..32).map(|_| Endpoint::default()).collect(),
        }
    }
}

/// Work counters (diagnostics, benchmarks); never reset by the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XhciStats {
    /// TDs handed to devices.
    pub tds: u64,
    /// Transfer TRBs in those TDs.
    pub trbs: u64,
    /// Guest-memory segments in those TDs (after merging contiguous ones).
    pub segments: u64,
    /// Bytes requested by those TDs.
    pub bytes: u64,
    /// Events written.
    pub events: u64,
}

/// The xHCI controller.
#[derive(Debug)]
pub struct Xhci {
    ram: GuestRam,
    queue: CompletionQueue,
    /// Guest-requested resets (HCRESET), for watchers on other threads.
    resets: crate::controller::ResetCount,
    usbcmd: u32,
    usbsts: u32,
    dnctrl: u32,
    crcr: u64,
    cmd_ring: RingPos,
    cmd_running: bool,
    dcbaap: u64,
    config: u32,
    intrs: Vec<Interrupter>,
    ports: Vec<Port>,
    /// Index 0 unused; slot IDs are 1-based.
    slots: Vec<Slot>,
    inflight: HashMap<TransferId, (usize, usize)>,
    next_id: u64,
    bus_master: bool,
    /// Rings that may hold TDs not fetched yet (rung, below the in-flight
    /// cap again, or cut short by the work budget), served round-robin;
    /// `pending_set` keeps each at most once.
    pending: VecDeque<RingKey>,
    pending_set: HashSet<RingKey>,
    /// Endpoints with results recorded but not reported.
    dirty: Vec<(usize, usize)>,
    /// The command ring was rung and may hold commands not run yet.
    cmd_pending: bool,
    /// Work of the current access or wake-up (TDs cancelled, commands
    /// run, guest-memory operations).
    budget: crate::mem::WorkBudget,
    /// Counters for diagnostics and benchmarks.
    stats: XhciStats,
    run_start: Instant,
}

impl Xhci {
    /// A controller in power-on state with DMA through `ram`.
    pub fn new(ram: GuestRam) -> Self {
        let ports = (0..MAX_PORTS)
            .map(|i| Port {
                usb3: i >= USB2_PORTS,
                portsc: 0,
                pmsc: 0,
                device: None,
            })
            .collect();
        let mut x = Xhci {
            ram,
            queue: CompletionQueue::new(),
            resets: Default::default(),
            usbcmd: 0,
            usbsts: USBSTS_HCH,
            dnctrl: 0,
            crcr: 0,
            cmd_ring: RingPos::default(),
            cmd_running: false,
            dcbaap: 0,
            config: 0,
            intrs: vec![Interrupter::default(); MAX_INTRS],
            ports,
            slots: (0..=MAX_SLOTS).map(|_| Slot::new()).collect(),
            inflight: HashMap::new(),
            next_id: 1,
            bus_master: true,
            pending: VecDeque::new(),
            pending_set: HashSet::new(),
            dirty: Vec::new(),
            cmd_pending: false,
            budget: crate::mem::WorkBudget::default(),
            stats: XhciStats::default(),
            run_start: Instant::now(),
        };
        x.hc_reset();
        x
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

    /// Transfers handed to devices and not yet reported (for leak checks).
    pub fn transfers_in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Work counters.
    pub fn stats(&self) -> XhciStats {
        self.stats
    }

    /// Whether the controller is halted (USBSTS.HCH).
    pub fn halted(&self) -> bool {
        self.usbsts & USBSTS_HCH != 0
    }

    /// USBSTS as the guest would read it.
    pub fn usbsts(&self) -> u32 {
        self.usbsts
    }

    fn running(&self) -> bool {
        self.usbcmd & USBCMD_RS != 0 && self.usbsts & USBSTS_HCH == 0
    }

    /// Whether the controller may touch guest memory at all: running, with
    /// Bus Master Enable on. Every path that reads or writes guest memory
    /// (rings, contexts, events, data) is behind this.
    fn dma_allowed(&self) -> bool {
        self.running() && self.bus_master
    }

    /// Whether the current access's work budget has room left.
    fn budget_left(&self) -> bool {
        self.budget.left(&self.ram, limits::WORK_PER_ACCESS)
    }

    fn refill_budget(&mut self) {
        self.budget.refill(&self.ram);
    }

    /// Queues a ring for fetching (once).
    fn mark_pending(&mut self, key: RingKey) {
        if self.pending_set.insert(key) {
            self.pending.push_back(key);
        }
    }

    /// The guest halted the controller, turned Bus Master off, or a Host
    /// System Error halted it: no guest memory may be touched from now on.
    /// Every TD handed to a device is cancelled (a device may not write
    /// guest memory for it afterwards; passthrough discards its URBs
    /// before `cancel` returns) and its ring rewound to it; the rings stay
    /// queued, so they run again once the controller runs with Bus Master
    /// on.
    fn quiesce(&mut self) {
        for s in 1..=MAX_SLOTS {
            if !self.slots[s].enabled {
                continue;
            }
            for dci in 1..32 {
                if self.slots[s].eps[dci].inflight.is_empty() {
                    continue;
                }
                let mut streams: Vec<u16> = Vec::new();
                for td in &self.slots[s].eps[dci].inflight {
                    if !streams.contains(&td.stream) {
                        streams.push(td.stream);
                    }
                }
                self.cancel_endpoint(s, dci, false);
                for st in streams {
                    self.mark_pending((s, dci, st));
                }
            }
        }
    }

    /// HCRST: everything but attached devices back to power-on state.
    fn hc_reset(&mut self) {
        self.resets.bump();
        for s in 1..=MAX_SLOTS {
            self.drop_slot_transfers(s);
            self.free_slot_streams(s);
            self.slots[s] = Slot::new();
        }
        self.inflight.clear();
        self.pending.clear();
        self.pending_set.clear();
        self.dirty.clear();
        self.cmd_pending = false;
        self.usbcmd = 0;
        self.usbsts = USBSTS_HCH;
        self.dnctrl = 0;
        self.crcr = 0;
        self.cmd_ring = RingPos::default();
        self.cmd_running = false;
        self.dcbaap = 0;
        self.config = 0;
        for i in &mut self.intrs {
            i.reset();
        }
        for p in 0..MAX_PORTS {
            if let Some(d) = self.ports[p].device.as_mut() {
                d.reset();
            }
            self.ports[p].pmsc = 0;
            self.port_update(p + 1, false);
        }
        // Completions of cancelled transfers may still be queued.
        self.queue.drain();
    }

    /// Host System Error: halt and wait for a reset (§4.10.2.6).
    fn host_system_error(&mut self, why: &str) {
        guest_warn!(target: "xhci", "host system error: {why}");
        self.usbsts |= USBSTS_HSE | USBSTS_HCH;
        self.usbcmd &= !USBCMD_RS;
        self.cmd_running = false;
        self.cmd_pending = false;
        self.quiesce();
    }

    /// Posts an event on interrupter `intr`.
    fn event(&mut self, intr: usize, trb: Trb, block_interrupt: bool) {
        if !self.dma_allowed() {
            // A halted controller (or one without Bus Master) posts
            // nothing; port changes stay visible in PORTSC.
            return;
        }
        let intr = if intr < MAX_INTRS { intr } else { 0 };
        match self.intrs[intr].write_event(&self.ram, trb) {
            Ok(()) => {
                self.stats.events += 1;
                if !block_interrupt {
                    self.intrs[intr].owe_interrupt();
                }
            }
            Err(EventError::Invalid) => {
                self.host_system_error("event ring segment table invalid or unmapped")
            }
            Err(e) => guest_warn!(target: "xhci", "interrupter {intr}: event lost: {e}"),
        }
    }

    fn flush_interrupts(&mut self, irq: &mut dyn IrqSink) {
        let now = Instant::now();
        let inte = self.usbcmd & USBCMD_INTE != 0;
        for i in 0..MAX_INTRS {
            if self.intrs[i].due(now) == Some(true) {
                self.usbsts |= USBSTS_EINT;
                if inte && self.intrs[i].iman & IMAN_IE != 0 && irq.pulse(i as u16) {
                    self.intrs[i].iman &= !IMAN_IP;
                }
            }
            irq.set_level(i as u16, inte && self.intrs[i].level());
        }
    }

    /// Plugs `dev` into the first free root port of its kind; returns the
    /// port number (1-based).
    pub fn attach(&mut self, dev: Box<dyn UsbDevice>) -> Result<usize, AttachError> {
        let usb3 = dev.speed().is_superspeed();
        let p = self
            .ports
            .iter()
            .position(|p| p.usb3 == usb3 && p.device.is_none())
            .ok_or(AttachError::NoFreePort)?;
        self.attach_at(p + 1, dev)?;
        Ok(p + 1)
    }

    /// Plugs `dev` into root port `port` (1-based).
    pub fn attach_at(&mut self, port: usize, dev: Box<dyn UsbDevice>) -> Result<(), AttachError> {
        let usb3 = dev.speed().is_superspeed();
        match self.ports.get(port.wrapping_sub(1)) {
            Some(p) if p.usb3 == usb3 && p.device.is_none() => {}
            _ => return Err(AttachError::BadPort(port)),
        }
        let mut dev = dev;
        dev.set_wakeup(self.queue.wakeup());
        self.ports[port - 1].device = Some(dev);
        self.port_update(port, true);
        Ok(())
    }

    /// Follows devices that disconnect and reconnect by themselves (host
    /// passthrough): a device that went away fails its transfers and shows
    /// a disconnect, one that came back shows a new connection.
    fn poll_connections(&mut self) {
        for idx in 0..self.ports.len() {
            let Some(dev) = self.ports[idx].device.as_ref() else {
                continue;
            };
            let now = dev.connected();
            let shown = self.ports[idx].portsc & PORTSC_CCS != 0;
            if now == shown {
                continue;
            }
            let port = idx + 1;
            if !now {
                for s in 1..=MAX_SLOTS {
                    if self.slots[s].enabled && self.slots[s].port == port {
                        self.fail_slot_transfers(s);
                    }
                }
            }
            self.port_update(port, true);
        }
    }

    /// The devices plugged in: root port (1-based) and device.
    pub fn devices(&self) -> Vec<(usize, &dyn UsbDevice)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.device.as_deref().map(|d| (i + 1, d)))
            .collect()
    }

    /// Unplugs the device on `port`, returning it.
    pub fn detach(&mut self, port: usize) -> Option<Box<dyn UsbDevice>> {
        let idx = port.checked_sub(1)?;
        self.ports.get(idx)?;
        for s in 1..=MAX_SLOTS {
            if self.slots[s].enabled && self.slots[s].port == port {
                self.fail_slot_transfers(s);
            }
        }
        let dev = self.ports[idx].device.take();
        self.port_update(port, true);
        dev
    }

    fn alloc_id(&mut self) -> TransferId {
        let id = TransferId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn read_cap(&self, off: u64) -> u32 {
        match off {
            0x00 => CAP_LENGTH as u32 | (HCI_VERSION << 16),
            0x04 => MAX_SLOTS as u32 | ((MAX_INTRS as u32) << 8) | ((MAX_PORTS as u32) << 24),
            0x08 => (ERST_MAX_LOG2 << 4) | ((SCRATCHPAD_BUFS & 0x1f) << 27) | 1,
            0x0c => 0,
            // AC64, 32-byte contexts, NSS (no Secondary Stream Arrays),
            // MaxPSASize, xECP at dword 8 (0x20).
            0x10 => 1 | (1 << 7) | (limits::MAX_PSA_SIZE << 12) | (8 << 16),
            0x14 => DOORBELL_OFFSET as u32,
            0x18 => RUNTIME_OFFSET as u32,
            0x1c => 0,
            // Supported Protocol capability, USB 2.0 (§7.2).
            0x20 => 0x0200_0402,
            0x24 => 0x2042_5355, // "USB "
            0x28 => 1 | ((USB2_PORTS as u32) << 8),
            0x2c => 0,
            // Supported Protocol capability, USB 3.0, last in the list.
            0x30 => 0x0300_0002,
            0x34 => 0x2042_5355,
            0x38 => (USB2_PORTS as u32 + 1) | ((USB3_PORTS as u32) << 8),
            _ => 0,
        }
    }

    fn read_op(&self, off: u64) -> u32 {
        match off {
            OP_USBCMD => self.usbcmd,
            OP_USBSTS => self.usbsts,
            OP_PAGESIZE => 1,
            OP_DNCTRL => self.dnctrl,
            OP_CRCR if self.cmd_running => CRCR_CRR as u32,
            0x1c => 0,
            OP_DCBAAP => self.dcbaap as u32,
            0x34 => (self.dcbaap >> 32) as u32,
            OP_CONFIG => self.config,
            o if o >= OP_PORTS && o < OP_PORTS + 0x10 * MAX_PORTS as u64 => {
                let p = ((o - OP_PORTS) / 0x10) as usize;
                match (o - OP_PORTS) % 0x10 {
                    0 => self.ports[p].portsc,
                    4 => self.ports[p].pmsc,
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_op(&mut self, off: u64, val: u32) {
        match off {
            OP_USBCMD => self.write_usbcmd(val),
            OP_USBSTS => self.usbsts &= !(val & USBSTS_W1C),
            OP_DNCTRL => self.dnctrl = val & 0xffff,
            OP_CRCR => {
                if self.cmd_running {
                    if u64::from(val) & (CRCR_CS | CRCR_CA) != 0 {
                        self.stop_command_ring();
                    }
                } else {
                    self.crcr = (self.crcr & !0xffff_ffff) | u64::from(val & !0x3e);
                    self.cmd_ring = RingPos::new(self.crcr & !0x3f, self.crcr & CRCR_RCS != 0);
                }
            }
            0x1c => {
                if !self.cmd_running {
                    self.crcr = (self.crcr & 0xffff_ffff) | (u64::from(val) << 32);
                    self.cmd_ring = RingPos::new(self.crcr & !0x3f, self.crcr & CRCR_RCS != 0);
                }
            }
            OP_DCBAAP => self.dcbaap = (self.dcbaap & !0xffff_ffff) | u64::from(val & !0x3f),
            0x34 => self.dcbaap = (self.dcbaap & 0xffff_ffff) | (u64::from(val) << 32),
            OP_CONFIG => self.config = (val & 0xff).min(MAX_SLOTS as u32) | (val & 0x300),
            o if o >= OP_PORTS && o < OP_PORTS + 0x10 * MAX_PORTS as u64 => {
                let p = ((o - OP_PORTS) / 0x10) as usize;
                match (o - OP_PORTS) % 0x10 {
                    0 => self.write_portsc(p + 1, val),
                    4 => self.ports[p].pmsc = val,
                    _ => {}
                }
            }
            _ => {
                guest_warn!(target: "xhci", "write {val:#x} to read-only operational register {off:#x} ignored")
            }
        }
    }

    fn write_usbcmd(&mut self, val: u32) {
        if val & USBCMD_HCRST != 0 {
            self.hc_reset();
            return;
        }
        let old = self.usbcmd;
        // CSS/CRS complete at once; LHCRST is not supported (LHRC = 0).
        self.usbcmd = val & USBCMD_MASK & !(USBCMD_CSS | USBCMD_CRS | USBCMD_LHCRST);
        if old & USBCMD_RS == 0 && val & USBCMD_RS != 0 {
            if self.usbsts & USBSTS_HSE != 0 {
                // Only a reset recovers from Host System Error.
                self.usbcmd &= !USBCMD_RS;
                return;
            }
            self.usbsts &= !USBSTS_HCH;
            self.run_start = Instant::now();
        } else if old & USBCMD_RS != 0 && val & USBCMD_RS == 0 {
            self.usbsts |= USBSTS_HCH;
            self.cmd_running = false;
            self.cmd_pending = false;
            self.quiesce();
        }
    }

    fn read_runtime(&self, off: u64) -> u32 {
        if off == 0 {
            if !self.running() {
                return 0;
            }
            let us = self.run_start.elapsed().as_micros();
            return ((us / 125) & 0x3fff) as u32;
        }
        if off < RT_IR0 {
            return 0;
        }
        let i = ((off - RT_IR0) / RT_IR_STRIDE) as usize;
        let Some(ir) = self.intrs.get(i) else {
            return 0;
        };
        match (off - RT_IR0) % RT_IR_STRIDE {
            0x00 => ir.iman,
            0x04 => ir.imod,
            0x08 => ir.erstsz,
            0x10 => ir.erstba as u32,
            0x14 => (ir.erstba >> 32) as u32,
            0x18 => ir.erdp as u32,
            0x1c => (ir.erdp >> 32) as u32,
            _ => 0,
        }
    }

    fn write_runtime(&mut self, off: u64, val: u32) {
        if off < RT_IR0 {
            guest_warn!(target: "xhci", "write to read-only MFINDEX ignored");
            return;
        }
        let i = ((off - RT_IR0) / RT_IR_STRIDE) as usize;
        let Some(ir) = self.intrs.get_mut(i) else {
            return;
        };
        let v = u64::from(val);
        match (off - RT_IR0) % RT_IR_STRIDE {
            0x00 => {
                ir.iman = (ir.iman & !(val & IMAN_IP)) & !IMAN_IE | (val & IMAN_IE);
            }
            0x04 => ir.imod = val,
            0x08 => {
                ir.erstsz = val & 0xffff;
                ir.invalidate();
            }
            0x10 => {
                ir.erstba = (ir.erstba & !0xffff_ffff) | (v & !0x3f);
                ir.invalidate();
            }
            0x14 => {
                ir.erstba = (ir.erstba & 0xffff_ffff) | (v << 32);
                ir.invalidate();
            }
            0x18 => {
                let new = (ir.erdp & !0xffff_ffff) | (v & !ERDP_EHB);
                ir.set_erdp(new, v & ERDP_EHB != 0);
            }
            0x1c => {
                let new = (ir.erdp & 0xffff_ffff) | (v << 32);
                ir.set_erdp(new & !ERDP_EHB, false);
            }
            _ => {}
        }
    }

    fn write_doorbell(&mut self, index: usize, val: u32) {
        if !self.dma_allowed() {
            return;
        }
        if index == 0 {
            if val & 0xff == 0 {
                self.cmd_running = true;
                self.cmd_pending = true;
            }
            return;
        }
        let target = (val & 0xff) as usize;
        if index > MAX_SLOTS || !(1..=31).contains(&target) {
            guest_warn!(target: "xhci", "doorbell {index} target {target} out of range");
            return;
        }
        if !self.slots[index].enabled {
            guest_warn!(target: "xhci::transfer", "doorbell for disabled slot {index}");
            return;
        }
        let mut stream = (val >> 16) as u16;
        let ep = &mut self.slots[index].eps[target];
        if ep.has_streams() {
            // Stream 0 is reserved; IDs past the array, or whose context is
            // not a transfer ring, select nothing (§4.12.2).
            if ep.ring_of(stream).is_none() {
                guest_warn!(target: "xhci", "doorbell {index} target {target}: stream {stream} invalid, ignored");
                return;
            }
        } else if stream != 0 {
            guest_warn!(target: "xhci", "doorbell {index} target {target}: stream ID {stream} on an endpoint without streams ignored");
            stream = 0;
        }
        // A doorbell (only a doorbell) restarts a stopped endpoint.
        match ep.state {
            EpState::Running => {}
            EpState::Stopped => ep.state = EpState::Running,
            _ => return,
        }
        self.mark_pending((index, target, stream));
    }

    /// Does what guest actions asked for, within the work budget: reports
    /// completions, runs the command ring, fetches TDs from the pending
    /// rings in turn. Work the budget leaves is done by later calls
    /// (`next_deadline` asks the transport for one at once). Nothing here
    /// calls back into itself: fetching, completing and cancelling only
    /// queue work for this loop.
    fn run_work(&mut self) {
        self.apply_completions();
        if self.cmd_pending {
            self.process_commands();
        }
        while self.dma_allowed() && self.budget_left() {
            let Some(key) = self.pending.pop_front() else {
                break;
            };
            self.pending_set.remove(&key);
            self.fetch_tds(key);
            self.apply_completions();
        }
    }

    fn read32(&self, off: u64) -> u32 {
        if off < CAP_LENGTH {
            self.read_cap(off)
        } else if off < RUNTIME_OFFSET {
            self.read_op(off - CAP_LENGTH)
        } else if off < DOORBELL_OFFSET {
            self.read_runtime(off - RUNTIME_OFFSET)
        } else {
            // Doorbells read as 0.
            0
        }
    }

    fn write32(&mut self, off: u64, val: u32) {
        if off < CAP_LENGTH {
            guest_warn!(target: "xhci", "write {val:#x} to capability register {off:#x} ignored");
        } else if off < RUNTIME_OFFSET {
            self.write_op(off - CAP_LENGTH, val);
        } else if off < DOORBELL_OFFSET {
            self.write_runtime(off - RUNTIME_OFFSET, val);
        } else if off < DOORBELL_OFFSET + 4 * (MAX_SLOTS as u64 + 1) {
            self.write_doorbell(((off - DOORBELL_OFFSET) / 4) as usize, val);
        }
    }

    /// Records the results devices posted on their TDs, without reporting
    /// them (no guest memory touched): the endpoints are listed in `dirty`
    /// for [`Xhci::apply_completions`].
    fn collect_results(&mut self) {
        for r in self.queue.drain() {
            let Some(&(s, e)) = self.inflight.get(&r.id) else {
                continue; // cancelled meanwhile
            };
            let ep = &mut self.slots[s].eps[e];
            if let Some(t) = ep.inflight.iter_mut().find(|t| t.id == r.id) {
                t.result = Some(r);
            }
            if !ep.dirty {
                ep.dirty = true;
                self.dirty.push((s, e));
            }
        }
    }

    /// Reports what devices finished, in ring order per endpoint (and
    /// stream); an endpoint whose TD failed halts; endpoints that were at
    /// the in-flight cap are queued for fetching again.
    fn apply_completions(&mut self) {
        if !self.dma_allowed() {
            // Results stay queued until the controller runs again.
            return;
        }
        self.collect_results();
        while let Some((s, e)) = self.dirty.pop() {
            self.slots[s].eps[e].dirty = false;
            self.retire(s, e);
        }
    }
}

impl PciController for Xhci {
    fn identity(&self) -> PciIdentity {
        PciIdentity {
            // Red Hat, Inc. / QEMU-style xHCI ids are recognised by every
            // guest driver; the class code is what drivers bind on.
            vendor_id: 0x1b36,
            device_id: 0x000d,
            class_code: 0x0c0330,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: 0,
            size: BAR0_SIZE,
            kind: BarKind::Memory64,
        }]
    }

    fn msix(&self) -> Option<MsixLayout> {
        Some(MsixLayout {
            vectors: MAX_INTRS as u16,
            bar: 0,
            table_offset: MSIX_TABLE_OFFSET,
            pba_offset: MSIX_PBA_OFFSET,
        })
    }

    fn msi_vectors(&self) -> u16 {
        MAX_INTRS as u16
    }

    fn vendor_config(&self) -> Vec<(u8, u8, u8)> {
        // SBRN = USB 3.0, FLADJ = 0x20 (§5.2.3, §5.2.4).
        vec![(0x60, 0x30, 0x00), (0x61, 0x20, 0x3f)]
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8], irq: &mut dyn IrqSink) {
        data.fill(0);
        if bar != 0 || offset >= BAR0_SIZE {
            return;
        }
        crate::pci::read_by_dwords(offset, data, |o| self.read32(o));
        self.flush_interrupts(irq);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8], irq: &mut dyn IrqSink) {
        if bar != 0 || offset >= BAR0_SIZE {
            return;
        }
        match (data.len(), offset & 3) {
            (4, 0) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.write32(offset, v);
            }
            (8, 0) => {
                let lo = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let hi = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
                self.write32(offset, lo);
                self.write32(offset + 4, hi);
            }
            _ => {
                guest_warn!(target: "xhci", "unsupported {}-byte write at {offset:#x} ignored", data.len())
            }
        }
        self.run_work();
        self.flush_interrupts(irq);
    }

    fn new_access(&mut self) {
        self.refill_budget();
    }

    fn reset(&mut self, irq: &mut dyn IrqSink) {
        self.hc_reset();
        self.flush_interrupts(irq);
    }

    fn process(&mut self, irq: &mut dyn IrqSink) {
        self.refill_budget();
        self.run_work();
        self.poll_connections();
        self.poll_remote_wakeup();
        self.flush_interrupts(irq);
    }

    fn set_bus_master(&mut self, enabled: bool) {
        let was = self.bus_master;
        self.bus_master = enabled;
        if was && !enabled {
            self.quiesce();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let unfinished = self.dma_allowed() && (self.cmd_pending || !self.pending.is_empty());
        if unfinished {
            return Some(Instant::now());
        }
        self.intrs.iter().filter_map(|i| i.deadline()).min()
    }

    fn summary(&self) -> String {
        let s = self.stats;
        format!(
            "xhci: tds={} trbs={} segments={} bytes={} events={}",
            s.tds, s.trbs, s.segments, s.bytes, s.events
        )
    }
}
