//! EHCI host controller (Enhanced Host Controller Interface 1.0).
//!
//! [`regs`] is the register and data-structure layout (chapters 2 and 3);
//! `schedule` walks the asynchronous and periodic schedules (chapter 4)
//! and turns qTD chains into transfers. Like the xHCI, the controller is a
//! plain state machine whose inputs are register accesses and
//! [`PciController::process`], and whose outputs are guest memory and an
//! [`IrqSink`].
//!
//! Full- and low-speed devices sit behind an emulated USB 2.0 hub with a
//! single transaction translator on root port 1 (the "rate matching hub"
//! of Intel's PCH chipsets), so no companion controller exists: split
//! transactions are routed straight to the device, there is no TT timing.
//! High-speed devices take root ports 2 to [`regs::N_PORTS`].
//!
//! Time is lazy: FRINDEX is derived from a monotonic clock; the
//! asynchronous schedule is walked on register writes, on device
//! completions and by an adaptive poll while it is enabled (the guest adds
//! work by memory writes only); the periodic schedule is walked frame by
//! frame as time passes, but only when woken (adaptive as well), since
//! interrupt transfers park in their devices until there is data. See
//! docs/design.md for the worst-case latencies.

pub mod regs;
mod schedule;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::mem::GuestRam;
use crate::pci::{BarInfo, BarKind, IrqSink, MsixLayout, PciController, PciIdentity};
use crate::poll::{AdaptivePoll, FaultGrace};
use crate::usb::hub::Hub;
use crate::usb::{
    CompletionQueue, HubPorts, Speed, TransferHandle, TransferId, TransferResult, UsbDevice,
};
use regs::*;

/// Caps on every loop the guest controls.
pub mod limits {
    use std::time::Duration;
    /// QHs visited in one walk of the asynchronous list.
    pub const QH_PER_PASS: usize = 256;
    /// Links followed in one frame of the periodic schedule.
    pub const LINKS_PER_FRAME: usize = 64;
    /// Frames of the periodic schedule caught up in one wake-up (QEMU:
    /// 128); older ones are skipped, as missed micro-frames.
    pub const FRAMES_PER_PASS: u32 = 64;
    /// qTDs merged into one transfer (a control transfer's data stage, or
    /// one bulk/interrupt run).
    pub const QTDS_PER_TRANSFER: usize = 64;
    /// Bytes in one transfer (Linux's largest URB for a stick is 120 KiB).
    pub const BYTES_PER_TRANSFER: usize = 1 << 20;
    /// Work per guest access and per wake-up, in guest-memory operations
    /// (as the xHCI's).
    pub const WORK_PER_ACCESS: u64 = 4096;
    /// Shortest and longest interval of the adaptive schedule poll: right
    /// after activity, and after it backed off while idle.
    pub const POLL_MIN: Duration = Duration::from_micros(125);
    /// Longest interval of the asynchronous schedule's poll (see
    /// [`POLL_MIN`]): a request the guest appends to an idle queue waits
    /// at most this long. Linux turns the schedule off 15 ms after it went
    /// idle, so an idle Linux guest costs no polls at all.
    pub const ASYNC_POLL_MAX: Duration = Duration::from_millis(4);
    /// Idle walks of the asynchronous schedule at [`POLL_MIN`] after
    /// activity before the poll starts backing off (2 ms).
    pub const FAST_WALKS: u32 = 16;
    /// Longest interval of the periodic schedule's walk (new interrupt
    /// QHs and qTDs linked by memory are found within this; interrupt
    /// transfers already handed to a device complete when it has data).
    pub const POLL_MAX: Duration = Duration::from_millis(32);
    /// How long schedule memory may stay unreachable before it is a Host
    /// System Error: a vfio-user client (QEMU) remaps guest RAM in
    /// several messages (SeaBIOS making its ROM area read-only unmaps all
    /// of RAM for up to ~1.3 ms), and a real controller never sees that.
    /// Until then the walk is retried every millisecond.
    pub const FAULT_GRACE: Duration = Duration::from_millis(20);
    /// Interval of the periodic walk right after activity (a frame).
    pub const PERIODIC_POLL_MIN: Duration = Duration::from_millis(1);
    /// Period poll while isochronous descriptors are active.
    pub const ISO_POLL: Duration = Duration::from_millis(1);
}

/// Why a device could not be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// No free port for this device.
    #[error("no free port for this device")]
    NoFreePort,
    /// SuperSpeed devices need a USB 3 controller.
    #[error("a SuperSpeed device cannot be attached to EHCI (use speed = \"high\" or \"full\")")]
    SuperSpeed,
    /// The port does not exist or is taken.
    #[error("port {0} does not exist, is taken or does not fit the device")]
    BadPort(usize),
}

/// What a root port holds.
#[derive(Debug)]
enum Attached {
    /// A device.
    Device(Box<dyn UsbDevice>),
    /// The rate-matching hub (root port 1).
    Hub(Box<Hub>),
}

impl Attached {
    fn dev(&self) -> &dyn UsbDevice {
        match self {
            Attached::Device(d) => d.as_ref(),
            Attached::Hub(h) => h.as_ref(),
        }
    }
    fn dev_mut(&mut self) -> &mut (dyn UsbDevice + 'static) {
        match self {
            Attached::Device(d) => d.as_mut(),
            Attached::Hub(h) => h.as_mut(),
        }
    }
}

#[derive(Debug)]
struct Port {
    portsc: u32,
    device: Option<Attached>,
    /// The device's address (0 after reset), from its SET_ADDRESS.
    address: u8,
}

/// Where a device is: root port (1-based) and, behind the hub on it, the
/// hub's port (0: the device on the root port itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DevPath {
    root: usize,
    hub_port: u8,
}

/// Work counters (diagnostics, benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EhciStats {
    /// Transfers handed to devices.
    pub transfers: u64,
    /// qTDs in those transfers.
    pub qtds: u64,
    /// Bytes requested.
    pub bytes: u64,
    /// Walks of the asynchronous list.
    pub async_passes: u64,
    /// Frames of the periodic schedule walked.
    pub frames: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

/// The EHCI controller.
#[derive(Debug)]
pub struct Ehci {
    ram: GuestRam,
    queue: CompletionQueue,
    /// Guest-requested resets (HCRESET), for watchers on other threads.
    resets: crate::controller::ResetCount,
    usbcmd: u32,
    usbsts: u32,
    usbintr: u32,
    /// FRINDEX while halted, and its value when the controller started.
    frindex_base: u32,
    run_start: Instant,
    /// Frame list rollovers seen (FLR), counted from `run_start`.
    rollovers: u64,
    ctrldsseg: u32,
    periodic_base: u32,
    async_addr: u32,
    configflag: u32,
    ports: Vec<Port>,
    bus_master: bool,
    /// Transfers in flight, by id; at most one per QH (or iTD/siTD).
    inflight: HashMap<TransferId, schedule::InFlight>,
    /// The transfer in flight for a schedule element (QH, iTD, siTD).
    by_element: HashMap<u32, TransferId>,
    next_id: u64,
    /// Work of the current access or wake-up.
    budget: crate::mem::WorkBudget,
    /// The asynchronous schedule's adaptive poll.
    async_poll: AdaptivePoll,
    /// The periodic walk: when next, and the interval after that.
    periodic_due: Option<Instant>,
    periodic_interval: Duration,
    /// The last frame the periodic walk processed (absolute micro-frame
    /// count / 8).
    last_frame: Option<u64>,
    /// The periodic walk saw active isochronous descriptors.
    iso_active: bool,
    /// The last walk ran out of budget: more work now.
    unfinished: bool,
    /// Interrupt bits already signalled (MSI is an edge).
    signalled: u32,
    /// Schedule memory has been unreachable since then (see
    /// [`limits::FAULT_GRACE`]); a retry is due at `fault_retry`.
    faults: FaultGrace,
    /// Results that could not be written back yet (schedule memory
    /// missing), retried first on every wake-up.
    unretired: Vec<(schedule::InFlight, TransferResult)>,
    stats: EhciStats,
}

impl Ehci {
    /// A controller in power-on state with DMA through `ram`, with the
    /// rate-matching hub on root port 1.
    pub fn new(ram: GuestRam) -> Self {
        let mut ports: Vec<Port> = (0..N_PORTS)
            .map(|_| Port {
                portsc: PORT_PP | PORT_PO,
                device: None,
                address: 0,
            })
            .collect();
        ports[0].device = Some(Attached::Hub(Box::new(Hub::new(4))));
        let mut e = Ehci {
            ram,
            queue: CompletionQueue::new(),
            resets: Default::default(),
            usbcmd: CMD_DEFAULT,
            usbsts: STS_HCHALTED,
            usbintr: 0,
            frindex_base: 0,
            run_start: Instant::now(),
            rollovers: 0,
            ctrldsseg: 0,
            periodic_base: 0,
            async_addr: 0,
            configflag: 0,
            ports,
            bus_master: true,
            inflight: HashMap::new(),
            by_element: HashMap::new(),
            next_id: 1,
            budget: crate::mem::WorkBudget::default(),
            async_poll: AdaptivePoll::new(
                limits::POLL_MIN,
                limits::ASYNC_POLL_MAX,
                limits::FAST_WALKS,
            ),
            periodic_due: None,
            periodic_interval: limits::POLL_MIN,
            last_frame: None,
            iso_active: false,
            unfinished: false,
            signalled: 0,
            faults: FaultGrace::new(limits::FAULT_GRACE),
            unretired: Vec::new(),
            stats: EhciStats::default(),
        };
        let q = e.queue.wakeup();
        if let Some(d) = e.ports[0].device.as_mut() {
            d.dev_mut().set_wakeup(q);
        }
        e.hc_reset();
        e
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
    pub fn stats(&self) -> EhciStats {
        self.stats
    }

    /// Whether the controller is halted.
    pub fn halted(&self) -> bool {
        self.usbsts & STS_HCHALTED != 0
    }

    /// USBSTS as the guest would read it.
    pub fn usbsts(&self) -> u32 {
        self.usbsts
    }

    fn running(&self) -> bool {
        self.usbcmd & CMD_RS != 0 && self.usbsts & STS_HCHALTED == 0
    }

    fn dma_allowed(&self) -> bool {
        self.running() && self.bus_master
    }

    fn budget_left(&self) -> bool {
        self.budget.left(&self.ram, limits::WORK_PER_ACCESS)
    }

    fn refill_budget(&mut self) {
        self.budget.refill(&self.ram);
    }

    fn alloc_id(&mut self) -> TransferId {
        let id = TransferId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Plugs `dev` in: high-speed devices into the first free root port
    /// from 2, full- and low-speed ones behind the hub. Returns the root
    /// port and hub port (0 for a root port).
    pub fn attach(&mut self, dev: Box<dyn UsbDevice>) -> Result<(usize, u8), AttachError> {
        match dev.speed() {
            Speed::Super => Err(AttachError::SuperSpeed),
            Speed::High => {
                let p = (2..=N_PORTS)
                    .find(|&p| self.ports[p - 1].device.is_none())
                    .ok_or(AttachError::NoFreePort)?;
                self.attach_at(p, 0, dev)?;
                Ok((p, 0))
            }
            Speed::Full | Speed::Low => {
                let hub = self.hub_mut().ok_or(AttachError::NoFreePort)?;
                let port = (1..=hub.port_count())
                    .find(|&p| hub.attached_device(p).is_none())
                    .ok_or(AttachError::NoFreePort)?;
                self.attach_at(1, port, dev)?;
                Ok((1, port))
            }
        }
    }

    /// Plugs `dev` into root port `root` (1-based; `hub_port` 0), or into
    /// port `hub_port` of the hub on root port 1.
    pub fn attach_at(
        &mut self,
        root: usize,
        hub_port: u8,
        mut dev: Box<dyn UsbDevice>,
    ) -> Result<(), AttachError> {
        if dev.speed() == Speed::Super {
            return Err(AttachError::SuperSpeed);
        }
        dev.set_wakeup(self.queue.wakeup());
        if hub_port != 0 {
            if root != 1 {
                return Err(AttachError::BadPort(root));
            }
            let hub = self.hub_mut().ok_or(AttachError::BadPort(1))?;
            return hub
                .attach(hub_port, dev)
                .map_err(|_| AttachError::BadPort(usize::from(hub_port)));
        }
        if !(2..=N_PORTS).contains(&root) || dev.speed() != Speed::High {
            return Err(AttachError::BadPort(root));
        }
        if self.ports[root - 1].device.is_some() {
            return Err(AttachError::BadPort(root));
        }
        self.ports[root - 1].device = Some(Attached::Device(dev));
        self.ports[root - 1].address = 0;
        self.port_connect_change(root);
        Ok(())
    }

    /// The devices plugged in: root port, hub port (0: the root port
    /// itself) and device; the built-in hub itself is not listed.
    pub fn devices(&mut self) -> Vec<(usize, u8, String, Speed, bool)> {
        let mut out = Vec::new();
        for (i, p) in self.ports.iter_mut().enumerate() {
            match p.device.as_mut() {
                Some(Attached::Device(d)) => {
                    out.push((i + 1, 0, d.name(), d.speed(), d.connected()))
                }
                Some(Attached::Hub(h)) => {
                    for hp in 1..=h.port_count() {
                        if let Some(d) = h.attached_device(hp) {
                            out.push((i + 1, hp, d.name(), d.speed(), d.connected()));
                        }
                    }
                }
                None => {}
            }
        }
        out
    }

    /// Unplugs the device at `root`/`hub_port` (see [`Ehci::attach_at`]),
    /// failing its transfers.
    pub fn detach(&mut self, root: usize, hub_port: u8) -> Option<Box<dyn UsbDevice>> {
        let path = DevPath { root, hub_port };
        self.cancel_device(path);
        if hub_port != 0 {
            if root != 1 {
                return None;
            }
            return self.hub_mut()?.detach(hub_port);
        }
        if !(2..=N_PORTS).contains(&root) {
            return None;
        }
        let dev = match self.ports[root - 1].device.take() {
            Some(Attached::Device(d)) => d,
            other => {
                self.ports[root - 1].device = other;
                return None;
            }
        };
        self.port_connect_change(root);
        Some(dev)
    }

    fn hub_mut(&mut self) -> Option<&mut Hub> {
        match self.ports[0].device.as_mut() {
            Some(Attached::Hub(h)) => Some(h),
            _ => None,
        }
    }

    /// The root port's device is there and the port owned by us.
    fn port_connected(&self, p: usize) -> bool {
        let port = &self.ports[p - 1];
        port.portsc & PORT_PO == 0 && port.device.as_ref().is_some_and(|d| d.dev().connected())
    }

    /// Re-evaluates CCS after a plug, unplug or ownership change.
    fn port_connect_change(&mut self, p: usize) {
        let now = self.port_connected(p);
        let port = &mut self.ports[p - 1];
        let shown = port.portsc & PORT_CCS != 0;
        if now == shown {
            return;
        }
        if now {
            port.portsc |= PORT_CCS | PORT_CSC;
            port.portsc = (port.portsc & !PORT_LS) | PORT_LS_J;
        } else {
            if port.portsc & PORT_PED != 0 {
                port.portsc |= PORT_PEDC;
            }
            port.portsc &= !(PORT_CCS | PORT_PED | PORT_LS | PORT_SUSP | PORT_PR);
            port.portsc |= PORT_CSC;
            port.address = 0;
        }
        self.usbsts |= STS_PCD;
    }

    /// Device-initiated resume (EHCI 1.0 §4.3.1): a device on a suspended
    /// port that signals remote wakeup sets Force Port Resume and Port
    /// Change Detect; software ends the resume 20 ms later by clearing
    /// FPR. This works with the controller halted (Linux halts it when
    /// the whole bus is suspended and waits for the PCD interrupt).
    fn poll_remote_wakeup(&mut self) {
        for p in 1..=N_PORTS {
            let port = &mut self.ports[p - 1];
            if port.portsc & (PORT_SUSP | PORT_FPR | PORT_PED | PORT_PO) != PORT_SUSP | PORT_PED {
                continue;
            }
            if port
                .device
                .as_mut()
                .is_some_and(|d| d.dev_mut().remote_wakeup())
            {
                port.portsc |= PORT_FPR;
                self.usbsts |= STS_PCD;
            }
        }
    }

    fn poll_connections(&mut self) {
        for p in 1..=N_PORTS {
            let before = self.ports[p - 1].portsc & PORT_CCS != 0;
            self.port_connect_change(p);
            if before && self.ports[p - 1].portsc & PORT_CCS == 0 {
                self.cancel_device(DevPath {
                    root: p,
                    hub_port: 0,
                });
            }
        }
        if let Some(hub) = self.hub_mut() {
            hub.poll_connections();
        }
    }

    /// HCRESET (§2.3.1): registers to their defaults, schedules stopped,
    /// transfers cancelled; devices stay plugged in.
    fn hc_reset(&mut self) {
        self.resets.bump();
        self.cancel_all();
        self.usbcmd = CMD_DEFAULT;
        self.usbsts = STS_HCHALTED;
        self.usbintr = 0;
        self.frindex_base = 0;
        self.rollovers = 0;
        self.ctrldsseg = 0;
        self.periodic_base = 0;
        self.async_addr = 0;
        self.configflag = 0;
        self.async_poll.stop();
        self.periodic_due = None;
        self.last_frame = None;
        self.iso_active = false;
        self.unfinished = false;
        self.faults.reset();
        for p in 1..=N_PORTS {
            let port = &mut self.ports[p - 1];
            port.portsc = PORT_PP | PORT_PO;
            port.address = 0;
            if let Some(d) = port.device.as_mut() {
                d.dev_mut().reset();
            }
            self.port_connect_change(p);
            self.ports[p - 1].portsc &= !PORT_CSC;
        }
        self.usbsts &= !STS_PCD;
        self.queue.drain();
    }

    /// Schedule memory could not be read or written. A Host System Error
    /// if it stays so for [`limits::FAULT_GRACE`]; until then the walk is
    /// retried (the memory may be in the middle of being remapped).
    fn schedule_fault(&mut self, why: &str) {
        if self.faults.fault() {
            self.host_system_error(why);
        }
    }

    /// Host System Error (§4.15.2.4): halt, wait for a reset.
    fn host_system_error(&mut self, why: &str) {
        guest_warn!(target: "ehci", "host system error: {why}");
        self.usbsts |= STS_HSE | STS_HCHALTED;
        self.usbcmd &= !CMD_RS;
        self.stop_clock();
        self.cancel_all();
    }

    /// Micro-frames since the controller last started, plus the FRINDEX it
    /// started from.
    fn uframes(&self) -> u64 {
        let base = u64::from(self.frindex_base);
        if !self.running() {
            return base;
        }
        base + (self.run_start.elapsed().as_micros() / 125) as u64
    }

    fn frindex(&self) -> u32 {
        (self.uframes() & 0x3fff) as u32
    }

    /// Freezes FRINDEX at its current value.
    fn stop_clock(&mut self) {
        if self.usbcmd & CMD_RS != 0 || self.usbsts & STS_HCHALTED == 0 {
            self.frindex_base = self.frindex();
        }
    }

    /// Frame list rollovers (FLR) since the last look: one every 1024
    /// frames (FLS is fixed at 1024 entries).
    fn update_rollover(&mut self) {
        if !self.running() {
            return;
        }
        let r = self.uframes() >> 13;
        if r > self.rollovers {
            self.rollovers = r;
            self.usbsts |= STS_FLR;
        }
    }

    fn read_cap(&self, off: u64) -> u32 {
        match off {
            0x00 => CAP_LENGTH as u32 | (HCI_VERSION << 16),
            // N_PORTS, PPC = 0 (ports always powered), no companions.
            0x04 => N_PORTS as u32,
            // 32-bit addressing, frame list fixed at 1024, no park mode,
            // IST = 1 frame (isochronous scheduling threshold), EECP.
            0x08 => (1 << 7) | (u32::from(EECP) << 8),
            _ => 0,
        }
    }

    fn read_op(&mut self, off: u64) -> u32 {
        match off {
            OP_USBCMD => self.usbcmd,
            OP_USBSTS => {
                self.update_rollover();
                self.usbsts
            }
            OP_USBINTR => self.usbintr,
            OP_FRINDEX => self.frindex(),
            OP_CTRLDSSEGMENT => self.ctrldsseg,
            OP_PERIODICLISTBASE => self.periodic_base,
            OP_ASYNCLISTADDR => self.async_addr,
            OP_CONFIGFLAG => self.configflag,
            o if (OP_PORTSC..OP_PORTSC + 4 * N_PORTS as u64).contains(&o) => {
                self.ports[((o - OP_PORTSC) / 4) as usize].portsc
            }
            _ => 0,
        }
    }

    fn write_op(&mut self, off: u64, val: u32) {
        match off {
            OP_USBCMD => self.write_usbcmd(val),
            OP_USBSTS => self.usbsts &= !(val & STS_INTS),
            OP_USBINTR => self.usbintr = val & STS_INTS,
            OP_FRINDEX => {
                if !self.running() {
                    self.frindex_base = val & 0x3fff;
                }
            }
            OP_CTRLDSSEGMENT => self.ctrldsseg = 0, // 32-bit only
            OP_PERIODICLISTBASE => {
                self.periodic_base = val & !0xfff;
                self.last_frame = None;
            }
            OP_ASYNCLISTADDR => self.async_addr = val & !0x1f,
            OP_CONFIGFLAG => self.write_configflag(val & 1),
            o if (OP_PORTSC..OP_PORTSC + 4 * N_PORTS as u64).contains(&o) => {
                self.write_portsc(((o - OP_PORTSC) / 4) as usize + 1, val)
            }
            _ => {
                guest_warn!(target: "ehci", "write {val:#x} to operational register {off:#x} ignored")
            }
        }
    }

    fn write_usbcmd(&mut self, val: u32) {
        if val & CMD_HCRESET != 0 {
            // Completes inside the write (SeaBIOS and Linux poll for it).
            self.hc_reset();
            return;
        }
        let old = self.usbcmd;
        self.usbcmd = (val & CMD_WRITABLE) | (old & CMD_FLS);
        if old & CMD_RS == 0 && val & CMD_RS != 0 {
            if self.usbsts & STS_HSE != 0 {
                self.usbcmd &= !CMD_RS;
                return;
            }
            self.usbsts &= !STS_HCHALTED;
            self.run_start = Instant::now();
            self.rollovers = u64::from(self.frindex_base) >> 13;
            self.last_frame = None;
        } else if old & CMD_RS != 0 && val & CMD_RS == 0 {
            self.frindex_base = self.frindex();
            self.usbsts |= STS_HCHALTED;
            self.cancel_all();
        }
        // The schedule status bits follow their enables at once (Linux
        // and U-Boot poll ASS/PSS after each change).
        self.usbsts &= !(STS_ASS | STS_PSS | STS_RECLAMATION);
        if self.running() {
            if self.usbcmd & CMD_ASE != 0 {
                self.usbsts |= STS_ASS;
                self.async_poll.kick(Instant::now());
            }
            if self.usbcmd & CMD_PSE != 0 {
                self.usbsts |= STS_PSS;
                self.periodic_interval = limits::POLL_MIN;
                self.periodic_due = Some(Instant::now());
            }
        }
        if self.usbcmd & CMD_ASE == 0 {
            self.async_poll.stop();
        }
        if self.usbcmd & CMD_PSE == 0 {
            self.periodic_due = None;
            self.last_frame = None;
        }
        if val & CMD_IAAD != 0 {
            // Interrupt on Async Advance: we cache no QH between walks, so
            // the advance has happened once transfers of QHs no longer
            // linked are cancelled.
            if self.running() && self.usbcmd & CMD_ASE != 0 {
                self.drop_unlinked_async();
            }
            self.usbsts |= STS_IAA;
        }
    }

    fn write_configflag(&mut self, v: u32) {
        let old = self.configflag;
        self.configflag = v;
        if old == v {
            return;
        }
        for p in 1..=N_PORTS {
            if v == 1 {
                self.ports[p - 1].portsc &= !PORT_PO;
            } else {
                self.ports[p - 1].portsc |= PORT_PO;
                self.cancel_device(DevPath {
                    root: p,
                    hub_port: 0,
                });
            }
            self.port_connect_change(p);
        }
    }

    fn write_portsc(&mut self, p: usize, val: u32) {
        let old = self.ports[p - 1].portsc;
        let mut v = old & !(val & PORT_RWC);
        v = (v & !PORT_STORED) | (val & PORT_STORED);
        if val & PORT_PO != old & PORT_PO && self.configflag == 1 {
            // Handing a port to a companion: there is none, so the
            // device is simply not ours to see any more.
            v = (v & !PORT_PO) | (val & PORT_PO);
        }
        if val & PORT_PED == 0 && old & PORT_PED != 0 {
            // Software may disable a port, never enable it.
            v &= !(PORT_PED | PORT_SUSP);
        }
        if val & PORT_PR != 0 && old & PORT_PR == 0 && old & PORT_CCS != 0 {
            v = (v | PORT_PR) & !(PORT_PED | PORT_SUSP);
        } else if val & PORT_PR == 0 && old & PORT_PR != 0 {
            // Reset ends when software clears PR; it completes at once.
            v &= !PORT_PR;
            self.ports[p - 1].portsc = v;
            self.finish_port_reset(p);
            return;
        }
        if old & PORT_PED != 0 && val & PORT_SUSP != 0 {
            v |= PORT_SUSP;
        }
        if val & PORT_FPR != 0 && old & PORT_SUSP != 0 {
            v |= PORT_FPR;
        } else if val & PORT_FPR == 0 && old & PORT_FPR != 0 {
            v &= !(PORT_FPR | PORT_SUSP);
        }
        self.ports[p - 1].portsc = v;
        if (old ^ v) & PORT_SUSP != 0 {
            if let Some(d) = self.ports[p - 1].device.as_mut() {
                d.dev_mut().suspend(v & PORT_SUSP != 0);
            }
        }
        if v & PORT_PO != old & PORT_PO {
            if v & PORT_PO != 0 {
                self.cancel_device(DevPath {
                    root: p,
                    hub_port: 0,
                });
            }
            self.port_connect_change(p);
        }
    }

    /// End of a port reset: the device is reset (address 0); a high-speed
    /// device's port becomes enabled. (Full- and low-speed devices never
    /// sit on a root port: they are behind the hub.)
    fn finish_port_reset(&mut self, p: usize) {
        self.cancel_device(DevPath {
            root: p,
            hub_port: 0,
        });
        let port = &mut self.ports[p - 1];
        port.address = 0;
        let Some(dev) = port.device.as_mut().map(Attached::dev_mut) else {
            return;
        };
        if port.portsc & PORT_CCS == 0 {
            return;
        }
        dev.reset();
        port.portsc &= !PORT_LS;
        if dev.speed() == Speed::High {
            port.portsc |= PORT_PED;
        }
    }

    fn read32(&mut self, off: u64) -> u32 {
        if off < CAP_LENGTH {
            self.read_cap(off)
        } else {
            self.read_op(off - CAP_LENGTH)
        }
    }

    fn write32(&mut self, off: u64, val: u32) {
        if off < CAP_LENGTH {
            guest_warn!(target: "ehci", "write {val:#x} to capability register {off:#x} ignored");
        } else {
            self.write_op(off - CAP_LENGTH, val);
        }
    }

    fn flush_interrupts(&mut self, irq: &mut dyn IrqSink) {
        self.update_rollover();
        let pending = self.usbsts & self.usbintr & STS_INTS;
        if pending & !self.signalled != 0 {
            self.stats.interrupts += 1;
            irq.pulse(0);
        }
        self.signalled = pending;
        irq.set_level(0, pending != 0);
    }

    fn run_work(&mut self) {
        if !self.dma_allowed() {
            return;
        }
        let now = Instant::now();
        if self.faults.begin(now) {
            // Retry what faulted: the walks and the write-backs.
            if self.usbcmd & CMD_ASE != 0 {
                self.async_poll.now(now);
            }
            if self.usbcmd & CMD_PSE != 0 {
                self.periodic_due = Some(now);
            }
        }
        for (inf, r) in std::mem::take(&mut self.unretired) {
            self.apply_result(inf, r);
        }
        for r in self.queue.drain() {
            self.retire(r);
        }
        self.unfinished = false;
        let now = Instant::now();
        if self.usbcmd & CMD_PSE != 0 && self.periodic_due.is_some_and(|t| t <= now) {
            let busy = self.walk_periodic();
            self.periodic_interval = if busy {
                limits::PERIODIC_POLL_MIN
            } else {
                (self.periodic_interval * 2).min(limits::POLL_MAX)
            };
            if self.iso_active {
                self.periodic_interval = limits::ISO_POLL;
            }
            self.periodic_due = Some(Instant::now() + self.periodic_interval);
        }
        if self.usbcmd & CMD_ASE != 0 && self.async_poll.is_due(now) {
            let busy = self.walk_async();
            self.async_poll.walked(busy);
        }
        if !self.budget_left() {
            self.unfinished = true;
        }
        // Everything that faulted went through this time?
        self.faults.end(self.unretired.is_empty());
    }

    /// A completion or register write: walk the schedules now.
    fn kick(&mut self) {
        let now = Instant::now();
        if self.usbcmd & CMD_ASE != 0 && self.running() {
            self.async_poll.kick(now);
        }
    }
}

impl PciController for Ehci {
    fn identity(&self) -> PciIdentity {
        // Intel 82801DB (ICH4) EHCI, the id of QEMU's `usb-ehci` (what
        // libxl's usbctrl version=2 gives): every guest's EHCI driver binds
        // it by class, with no vendor quirk that would not fit us.
        PciIdentity {
            vendor_id: 0x8086,
            device_id: 0x24cd,
            class_code: 0x0c0320,
            revision: 0x10,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        vec![BarInfo {
            index: 0,
            size: BAR0_SIZE,
            kind: BarKind::Memory32,
        }]
    }

    fn msix(&self) -> Option<MsixLayout> {
        None
    }

    fn vendor_config(&self) -> Vec<(u8, u8, u8)> {
        vec![
            // SBRN = USB 2.0, FLADJ = 0x20 (§2.1.4, §2.1.5).
            (0x60, 0x20, 0x00),
            (0x61, 0x20, 0x3f),
            // USBLEGSUP (§5.1): capability ID 1, no next; the BIOS and OS
            // owned semaphores are writable.
            (EECP, 0x01, 0x00),
            (EECP + 1, 0x00, 0x00),
            (EECP + 2, 0x00, 0x01),
            (EECP + 3, 0x00, 0x01),
            // USBLEGCTLSTS (§5.2): SMI enables writable, no SMI ever
            // raised (status bits read 0).
            (EECP + 4, 0x00, 0x3f),
            (EECP + 5, 0x00, 0xe0),
            (EECP + 6, 0x00, 0x00),
            (EECP + 7, 0x00, 0x00),
        ]
    }

    fn vendor_config_written(&mut self, vendor: &mut [u8]) {
        // BIOS to OS handoff (§5.1): once the OS sets its semaphore, the
        // BIOS (there is none running SMM code) lets go at once.
        let leg = usize::from(EECP) - 0x40;
        if let Some(os) = vendor.get(leg + 3).copied() {
            if os & 1 != 0 {
                vendor[leg + 2] &= !1;
            }
        }
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
        if bar != 0 || offset >= BAR0_SIZE || data.is_empty() || data.len() > 4 {
            if data.len() == 8 && bar == 0 && offset & 7 == 0 && offset < BAR0_SIZE {
                let lo = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let hi = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
                self.write32(offset, lo);
                self.write32(offset + 4, hi);
                self.run_work();
                self.flush_interrupts(irq);
            }
            return;
        }
        let shift = (offset & 3) * 8;
        if shift as usize / 8 + data.len() > 4 {
            guest_warn!(target: "ehci", "unaligned {}-byte write at {offset:#x} ignored", data.len());
            return;
        }
        let aligned = offset & !3;
        let mut val = 0u32;
        for (i, b) in data.iter().enumerate() {
            val |= u32::from(*b) << (shift as usize + 8 * i);
        }
        if data.len() < 4 {
            // A partial write: the other bytes keep their value, except
            // write-1-to-clear bits, which a write of 0 leaves alone.
            let mask = (((1u64 << (8 * data.len())) - 1) << shift) as u32;
            let rwc = match aligned.checked_sub(CAP_LENGTH) {
                Some(OP_USBSTS) => STS_INTS,
                Some(o) if (OP_PORTSC..OP_PORTSC + 4 * N_PORTS as u64).contains(&o) => PORT_RWC,
                _ => 0,
            };
            let cur = self.read32(aligned) & !rwc;
            val = (cur & !mask) | (val & mask);
        }
        self.write32(aligned, val);
        self.kick();
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
    }

    fn next_deadline(&self) -> Option<Instant> {
        if !self.running() {
            return None;
        }
        if self.unfinished && self.bus_master {
            return Some(Instant::now());
        }
        // The next frame-list rollover, if its interrupt is enabled.
        let rollover = (self.usbintr & STS_FLR != 0).then(|| {
            let left = ((self.rollovers + 1) << 13).saturating_sub(self.uframes());
            Instant::now() + Duration::from_micros(left * 125)
        });
        [
            self.async_poll.due(),
            self.periodic_due,
            self.faults.retry_at(),
            rollover,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn summary(&self) -> String {
        let s = self.stats;
        format!(
            "ehci: transfers={} qtds={} bytes={} async-walks={} frames={} irqs={}",
            s.transfers, s.qtds, s.bytes, s.async_passes, s.frames, s.interrupts
        )
    }
}

#[cfg(test)]
mod tests;
