//! The ioreq server: one PCI function served to one HVM domain.
//!
//! Xen forwards every guest access that falls in a range we claimed (our
//! PCI function's configuration space, and the BARs once the guest enables
//! decoding) to the vCPU's slot in the shared ioreq page and signals the
//! vCPU's event channel. For each slot in `IOREQ_READY` we move it to
//! `IOREQ_INPROCESS`, carry out the access on the [`PciFunction`], write
//! the result, and publish `IORESP_READY` after a release fence, then
//! notify the vCPU. The state byte is only ever moved forwards: a backwards
//! transition would crash the domain.
//!
//! One thread serves all vCPUs (their requests are independent and each
//! is short), device completions and the controller's deadlines, waiting
//! on one event loop. Once a second it checks the domain is still there
//! and returns when it is gone.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hcd_emul::guest_warn;
use hcd_emul::pci::{BarKind, InterruptTransport, MsiMessage, PciController, PciFunction};
use hcd_emul::GuestRam;
use tracing::{debug, info};
use vm_memory::{Bytes, GuestMemoryMmap, MmapRegion, VolatileMemory};

use super::abi;
use super::hv::{EventChannels, Hypervisor, IoRange, Sbdf};
use super::mapcache::MapCache;
use crate::evloop::{EventLoop, Wake};

/// Most items of one rep request carried out (Xen itself splits reps at
/// page boundaries, so a real guest never comes near).
pub const MAX_REPS: u32 = 4096;
/// Map-cache budget: foreign mappings held at once.
pub const MAP_BUDGET: u64 = 1 << 30;
const TOKEN_EVTCHN: u64 = 1;

/// Why the server could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    /// A hypervisor call failed during set-up.
    #[error("{what}: {source}")]
    Setup {
        /// The step.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The event loop failed.
    #[error("event loop: {0}")]
    Poll(io::Error),
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> XenError {
    move |source| XenError::Setup { what, source }
}

/// Why [`XenServer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `stop()` asked for it.
    Stopped,
    /// The domain is gone (destroyed, or its ioreq server with it).
    DomainGone,
}

/// One decoded ioreq slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ioreq {
    /// Port, guest-physical address, or `sbdf << 32 | register`.
    pub addr: u64,
    /// Value, or guest-physical address of the data if `data_is_ptr`.
    pub data: u64,
    /// Repetitions.
    pub count: u32,
    /// Bytes per item.
    pub size: u32,
    /// `true` for a read (`IOREQ_READ`).
    pub read: bool,
    /// `data` is a guest-physical pointer.
    pub data_is_ptr: bool,
    /// Direction flag: items go downwards in memory.
    pub df: bool,
    /// `IOREQ_TYPE_*`.
    pub ty: u8,
}

impl Ioreq {
    /// All-ones of the request's size: what unclaimed hardware reads as.
    fn ones(&self) -> u64 {
        mask(u64::MAX, self.size)
    }

    /// Address of item `i` starting at `base`, honouring the direction flag.
    fn item(&self, base: u64, i: u32) -> u64 {
        let off = u64::from(i).wrapping_mul(u64::from(self.size));
        if self.df {
            base.wrapping_sub(off)
        } else {
            base.wrapping_add(off)
        }
    }
}

fn mask(v: u64, size: u32) -> u64 {
    if size >= 8 {
        v
    } else {
        v & ((1u64 << (size * 8)) - 1)
    }
}

/// Counters, logged when the server stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct XenStats {
    /// Requests answered.
    pub ioreqs: u64,
    /// MMIO (COPY) items.
    pub mmio: u64,
    /// Port I/O items.
    pub pio: u64,
    /// Configuration-space accesses.
    pub config: u64,
    /// INVALIDATE requests.
    pub invalidates: u64,
    /// Requests refused as malformed or outside our ranges.
    pub refused: u64,
}

/// Interrupts on Xen: INTx through `set_pci_intx_level`, MSI and MSI-X as
/// the guest's own address/data through `inject_msi`.
#[derive(Debug)]
struct XenIrq {
    hv: Arc<dyn Hypervisor>,
    sbdf: Sbdf,
    level: bool,
}

impl InterruptTransport for XenIrq {
    fn set_intx(&mut self, level: bool) {
        if level == self.level {
            return;
        }
        self.level = level;
        if let Err(e) = self
            .hv
            .set_pci_intx_level(self.sbdf.bus, self.sbdf.dev, 0, level)
        {
            guest_warn!("xen: set_pci_intx_level({level}): {e}");
        }
    }

    fn send_msi(&mut self, msg: MsiMessage) {
        if let Err(e) = self.hv.inject_msi(msg.address, msg.data) {
            guest_warn!("xen: inject_msi({:#x}, {:#x}): {e}", msg.address, msg.data);
        }
    }
}

/// A BAR range claimed from Xen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claimed {
    bar: u8,
    kind: IoRange,
    start: u64,
    len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Vcpu {
    local_port: u32,
}

/// The ioreq server of one domain, serving one PCI function.
pub struct XenServer<C: PciController> {
    hv: Arc<dyn Hypervisor>,
    ev: Box<dyn EventChannels>,
    id: u16,
    page: Option<MmapRegion>,
    vcpus: Vec<Vcpu>,
    by_port: HashMap<u32, usize>,
    sbdf: Sbdf,
    pci_claimed: bool,
    pci: PciFunction<C>,
    ram: GuestRam,
    cache: Arc<MapCache>,
    claimed: Vec<Claimed>,
    lp: EventLoop,
    /// Counters.
    pub stats: XenStats,
}

impl<C: PciController> std::fmt::Debug for XenServer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenServer")
            .field("domid", &self.hv.domid())
            .field("id", &self.id)
            .field("sbdf", &self.sbdf)
            .finish()
    }
}

impl<C: PciController> XenServer<C> {
    /// Creates and enables an ioreq server for `hv`'s domain, binds every
    /// vCPU's event channel and claims `sbdf`. `make(ram, waker)` builds the
    /// controller on the domain's memory (mapped on demand) with device
    /// completions calling `waker`. On error everything done so far is
    /// undone.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        ev: Box<dyn EventChannels>,
        sbdf: Sbdf,
        make: impl FnOnce(GuestRam, Box<dyn Fn() + Send + Sync>) -> C,
    ) -> Result<Self, XenError> {
        let nr = hv.nr_vcpus().map_err(setup("XEN_DMOP_nr_vcpus"))?;
        if nr == 0 || nr as usize > abi::IOREQ_SLOTS_PER_PAGE {
            return Err(XenError::Setup {
                what: "XEN_DMOP_nr_vcpus",
                source: io::Error::new(io::ErrorKind::InvalidData, format!("{nr} vCPUs")),
            });
        }
        let cache = Arc::new(MapCache::new(hv.clone(), MAP_BUDGET));
        let ram = GuestRam::with_mapper(cache.clone());
        let lp = EventLoop::new().map_err(XenError::Poll)?;
        let controller = make(ram.clone(), lp.waker().map_err(XenError::Poll)?);
        let mut pci = PciFunction::new(
            controller,
            Box::new(XenIrq {
                hv: hv.clone(),
                sbdf,
                level: false,
            }),
        );
        // Guests with XENFEAT_hvm_pirqs (Xen 4.17's libxl default) route
        // MSI/MSI-X through event channels and leave the table masked.
        pci.set_pirq_msi(true);
        let id = hv
            .create_ioreq_server()
            .map_err(setup("XEN_DMOP_create_ioreq_server"))?;
        // From here on, Drop undoes what was done.
        let mut s = Self {
            hv,
            ev,
            id,
            page: None,
            vcpus: Vec::new(),
            by_port: HashMap::new(),
            sbdf,
            pci_claimed: false,
            pci,
            ram,
            cache,
            claimed: Vec::new(),
            lp,
            stats: XenStats::default(),
        };
        let page =
            s.hv.map_ioreq_page(id)
                .map_err(setup("map ioreq page (IOCTL_PRIVCMD_MMAP_RESOURCE)"))?;
        if page.len() < abi::IOREQ_SLOTS_PER_PAGE * abi::IOREQ_SLOT_SIZE {
            return Err(XenError::Setup {
                what: "map ioreq page",
                source: io::Error::new(io::ErrorKind::InvalidData, "short ioreq page"),
            });
        }
        s.page = Some(page);
        s.hv.set_ioreq_server_state(id, true)
            .map_err(setup("XEN_DMOP_set_ioreq_server_state"))?;
        // vp_eport is valid once the server is enabled.
        for v in 0..nr as usize {
            let remote: u32 = s
                .slot()
                .read_obj(v * abi::IOREQ_SLOT_SIZE + abi::IOREQ_OFF_VP_EPORT)
                .map_err(|e| XenError::Setup {
                    what: "read vp_eport",
                    source: io::Error::other(e.to_string()),
                })?;
            let local =
                s.ev.bind_interdomain(remote)
                    .map_err(setup("IOCTL_EVTCHN_BIND_INTERDOMAIN"))?;
            s.by_port.insert(local, v);
            s.vcpus.push(Vcpu { local_port: local });
        }
        s.hv.map_io_range(id, IoRange::Pci, sbdf.range_value(), sbdf.range_value())
            .map_err(setup(
                "claim PCI function (XEN_DMOP_map_io_range_to_ioreq_server)",
            ))?;
        s.pci_claimed = true;
        s.lp.add(s.ev.as_raw_fd(), TOKEN_EVTCHN)
            .map_err(XenError::Poll)?;
        info!(
            "xen: ioreq server {id} for domain {} ({nr} vCPUs), PCI {:04x}:{:02x}:{:02x}.{}",
            s.hv.domid(),
            sbdf.seg,
            sbdf.bus,
            sbdf.dev,
            sbdf.func
        );
        Ok(s)
    }

    /// What the loop does when a device completes or the controller's
    /// deadline passes (work a budget left, interrupt moderation).
    pub fn process(&mut self) {
        self.pci.process();
    }

    /// The PCI function served.
    pub fn pci(&self) -> &PciFunction<C> {
        &self.pci
    }

    /// The guest memory handle (map cache) the controller uses.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The map cache.
    pub fn map_cache(&self) -> &MapCache {
        &self.cache
    }

    /// The guest-physical ranges currently claimed for BARs.
    pub fn claimed_bars(&self) -> Vec<(u8, u64, u64)> {
        self.claimed
            .iter()
            .map(|c| (c.bar, c.start, c.len))
            .collect()
    }

    /// Restricts the privcmd and evtchn descriptors to the served domain
    /// (the process can then be deprivileged).
    pub fn restrict(&mut self) -> io::Result<()> {
        self.hv.restrict()?;
        self.ev.restrict()
    }

    fn slot(&self) -> vm_memory::VolatileSlice<'_, ()> {
        match &self.page {
            Some(p) => p.as_volatile_slice(),
            None => vm_memory::VolatileSlice::from(&mut [][..]),
        }
    }

    /// Serves until `stop()` returns true or the domain goes away.
    pub fn run(&mut self, stop: impl FnMut() -> bool) -> Result<Exit, XenError> {
        self.run_with(stop, |_| false)
    }

    /// A callback that wakes [`XenServer::run_with`]'s loop (from any
    /// thread), e.g. after posting it work.
    pub fn waker(&self) -> io::Result<Box<dyn Fn() + Send + Sync>> {
        self.lp.waker()
    }

    /// As [`XenServer::run`], calling `tick(pci)` after every wake-up (work
    /// posted from other threads: attach or detach a device); when it
    /// returns true, the controller then processes what changed.
    pub fn run_with(
        &mut self,
        mut stop: impl FnMut() -> bool,
        mut tick: impl FnMut(&mut PciFunction<C>) -> bool,
    ) -> Result<Exit, XenError> {
        let mut last_check = Instant::now();
        let mut logged = 0;
        loop {
            if stop() {
                return Ok(Exit::Stopped);
            }
            let wakes = self
                .lp
                .wait(self.pci.next_deadline(), Duration::from_secs(1))
                .map_err(XenError::Poll)?;
            for w in wakes {
                match w {
                    Wake::Completion | Wake::Deadline => self.process(),
                    Wake::Fd(_) => self.serve_ports(),
                }
            }
            if tick(&mut self.pci) {
                self.process();
            }
            if self
                .pci
                .next_deadline()
                .is_some_and(|t| t <= Instant::now())
            {
                self.process();
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                // At most one line a second, only while the guest is busy.
                if self.stats.ioreqs != logged {
                    logged = self.stats.ioreqs;
                    let s = &self.stats;
                    info!(
                        "xen: stats: {} ioreqs ({} MMIO, {} config, {} PIO)",
                        s.ioreqs, s.mmio, s.config, s.pio
                    );
                }
                if let Err(e) = self.hv.ioreq_server_alive(self.id) {
                    info!("xen: domain {} gone ({e})", self.hv.domid());
                    return Ok(Exit::DomainGone);
                }
            }
        }
    }

    /// Answers the slots of the vCPUs whose ports fired, then any other
    /// slot left READY (a notification is never needed twice).
    pub fn serve_ports(&mut self) {
        let ports = match self.ev.pending() {
            Ok(p) => p,
            Err(e) => {
                guest_warn!("xen: reading event channels: {e}");
                Vec::new()
            }
        };
        for p in ports {
            if let Some(&v) = self.by_port.get(&p) {
                self.serve_slot(v);
            }
            if let Err(e) = self.ev.unmask(p) {
                guest_warn!("xen: unmask port {p}: {e}");
            }
        }
        for v in 0..self.vcpus.len() {
            self.serve_slot(v);
        }
    }

    /// Answers vCPU `v`'s slot if it holds a request.
    fn serve_slot(&mut self, v: usize) {
        let base = v * abi::IOREQ_SLOT_SIZE;
        let s = self.slot();
        let flags_at = base + abi::IOREQ_OFF_FLAGS;
        let Ok(flags) = s.load::<u8>(flags_at, Ordering::Acquire) else {
            return;
        };
        if flags & abi::IOREQ_FLAG_STATE_MASK != abi::STATE_IOREQ_READY {
            return;
        }
        let rd64 = |o: usize| s.read_obj::<u64>(base + o).unwrap_or(0);
        let rd32 = |o: usize| s.read_obj::<u32>(base + o).unwrap_or(0);
        let req = Ioreq {
            addr: rd64(abi::IOREQ_OFF_ADDR),
            data: rd64(abi::IOREQ_OFF_DATA),
            count: rd32(abi::IOREQ_OFF_COUNT),
            size: rd32(abi::IOREQ_OFF_SIZE),
            read: flags & abi::IOREQ_FLAG_DIR_READ != 0,
            data_is_ptr: flags & abi::IOREQ_FLAG_DATA_IS_PTR != 0,
            df: flags & abi::IOREQ_FLAG_DF != 0,
            ty: s
                .load::<u8>(base + abi::IOREQ_OFF_TYPE, Ordering::Relaxed)
                .unwrap_or(0),
        };
        let keep = flags & !abi::IOREQ_FLAG_STATE_MASK;
        let _ = s.store(
            keep | abi::STATE_IOREQ_INPROCESS,
            flags_at,
            Ordering::Release,
        );
        let data = self.handle(&req);
        let s = self.slot();
        let _ = s.write_obj(data, base + abi::IOREQ_OFF_DATA);
        fence(Ordering::Release);
        let _ = s.store(keep | abi::STATE_IORESP_READY, flags_at, Ordering::Release);
        let port = self.vcpus[v].local_port;
        if let Err(e) = self.ev.notify(port) {
            guest_warn!("xen: notify vCPU {v}: {e}");
        }
    }

    /// Carries out one request; the value for the slot's `data`.
    pub fn handle(&mut self, r: &Ioreq) -> u64 {
        self.stats.ioreqs += 1;
        match r.ty {
            abi::IOREQ_TYPE_COPY => self.access(r, IoRange::Memory),
            abi::IOREQ_TYPE_PIO => self.access(r, IoRange::Port),
            abi::IOREQ_TYPE_PCI_CONFIG => self.config(r),
            abi::IOREQ_TYPE_INVALIDATE => {
                self.invalidate();
                r.data
            }
            abi::IOREQ_TYPE_TIMEOFFSET => r.data,
            t => {
                self.stats.refused += 1;
                guest_warn!("xen: unknown ioreq type {t}");
                if r.read {
                    r.ones()
                } else {
                    r.data
                }
            }
        }
    }

    /// Drops every guest mapping not in use; accesses under way keep theirs.
    pub fn invalidate(&mut self) {
        self.stats.invalidates += 1;
        self.ram.replace(GuestMemoryMmap::default());
        self.cache.flushed();
    }

    /// The claimed BAR holding `addr..addr + size` of `kind`.
    fn bar_at(&self, kind: IoRange, addr: u64, size: u32) -> Option<(u8, u64)> {
        self.claimed.iter().find_map(|c| {
            let off = addr.checked_sub(c.start)?;
            (c.kind == kind && off.checked_add(u64::from(size))? <= c.len).then_some((c.bar, off))
        })
    }

    /// MMIO (COPY) or port I/O, with reps and `data_is_ptr`.
    fn access(&mut self, r: &Ioreq, kind: IoRange) -> u64 {
        if !matches!(r.size, 1 | 2 | 4 | 8) || (kind == IoRange::Port && r.size == 8) {
            self.stats.refused += 1;
            guest_warn!("xen: {kind:?} access of size {} at {:#x}", r.size, r.addr);
            return if r.read { r.ones() } else { r.data };
        }
        let mut count = r.count.max(1);
        if !r.data_is_ptr {
            count = 1;
        } else if count > MAX_REPS {
            self.stats.refused += 1;
            guest_warn!("xen: rep count {count} cut to {MAX_REPS}");
            count = MAX_REPS;
        }
        let size = r.size as usize;
        let mut result = r.data;
        // A rep ioreq is one guest access: the controller's work budget is
        // not renewed for each item.
        self.pci.begin_access();
        for i in 0..count {
            let a = r.item(r.addr, i);
            let target = self.bar_at(kind, a, r.size);
            match kind {
                IoRange::Port => self.stats.pio += 1,
                _ => self.stats.mmio += 1,
            }
            let mut buf = [0xffu8; 8];
            if r.read {
                if let Some((bar, off)) = target {
                    self.pci.bar_read(bar, off, &mut buf[..size]);
                }
                if r.data_is_ptr {
                    if let Err(e) = self.ram.write(r.item(r.data, i), &buf[..size]) {
                        guest_warn!("xen: rep read into guest memory: {e}");
                        break;
                    }
                } else {
                    result = mask(u64::from_le_bytes(buf), r.size);
                }
            } else {
                if r.data_is_ptr {
                    if let Err(e) = self.ram.read(r.item(r.data, i), &mut buf[..size]) {
                        guest_warn!("xen: rep write from guest memory: {e}");
                        break;
                    }
                } else {
                    buf = r.data.to_le_bytes();
                }
                if let Some((bar, off)) = target {
                    self.pci.bar_write(bar, off, &buf[..size]);
                }
            }
            if target.is_none() {
                self.stats.refused += 1;
                guest_warn!("xen: {kind:?} access at {a:#x} outside our BARs");
            }
        }
        self.pci.end_access();
        result
    }

    /// A configuration-space access to our function (or, for a request
    /// Xen should not have sent us, what an empty slot answers).
    fn config(&mut self, r: &Ioreq) -> u64 {
        self.stats.config += 1;
        let sbdf = (r.addr >> 32) as u32;
        let reg = (r.addr & 0xffff_ffff) as u32;
        let size = r.size as usize;
        let ok = sbdf == self.sbdf.range_value() as u32
            && matches!(r.size, 1 | 2 | 4)
            && reg.checked_add(r.size).is_some_and(|end| end <= 4096)
            && !r.data_is_ptr
            && r.count <= 1;
        if !ok {
            self.stats.refused += 1;
            guest_warn!(
                "xen: config access sbdf {sbdf:#x} reg {reg:#x} size {} refused",
                r.size
            );
            return if r.read { r.ones() } else { r.data };
        }
        if r.read {
            let mut buf = [0u8; 8];
            self.pci.config_read(reg as u16, &mut buf[..size]);
            u64::from_le_bytes(buf)
        } else {
            self.pci
                .config_write(reg as u16, &r.data.to_le_bytes()[..size]);
            self.sync_bars();
            r.data
        }
    }

    /// Claims from Xen exactly the BAR ranges that decode now: after a
    /// COMMAND write or a BAR move, old ranges are released and new ones
    /// claimed.
    fn sync_bars(&mut self) {
        let mut want = Vec::new();
        for b in self.pci.bars() {
            let (kind, enabled) = match b.kind {
                BarKind::Io => (IoRange::Port, self.pci.io_enabled()),
                BarKind::Memory32 | BarKind::Memory64 => {
                    (IoRange::Memory, self.pci.memory_enabled())
                }
            };
            let Some(start) = self.pci.bar_address(b.index) else {
                continue;
            };
            let end = start.checked_add(b.size.saturating_sub(1));
            let sane = match kind {
                IoRange::Port => end.is_some_and(|e| e <= 0xffff),
                _ => end.is_some_and(|e| e < 1 << 52),
            };
            if enabled && start != 0 && b.size != 0 && sane {
                want.push(Claimed {
                    bar: b.index,
                    kind,
                    start,
                    len: b.size,
                });
            }
        }
        if want == self.claimed {
            return;
        }
        for c in std::mem::take(&mut self.claimed) {
            if !want.contains(&c) {
                debug!("xen: release BAR{} {:#x}+{:#x}", c.bar, c.start, c.len);
                if let Err(e) =
                    self.hv
                        .unmap_io_range(self.id, c.kind, c.start, c.start + c.len - 1)
                {
                    guest_warn!("xen: release BAR{} range: {e}", c.bar);
                }
            } else {
                self.claimed.push(c);
            }
        }
        for c in want {
            if self.claimed.contains(&c) {
                continue;
            }
            match self
                .hv
                .map_io_range(self.id, c.kind, c.start, c.start + c.len - 1)
            {
                Ok(()) => {
                    debug!("xen: claim BAR{} {:#x}+{:#x}", c.bar, c.start, c.len);
                    self.claimed.push(c);
                }
                Err(e) => guest_warn!("xen: claim BAR{} {:#x}+{:#x}: {e}", c.bar, c.start, c.len),
            }
        }
    }

    /// One line of statistics.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let m = &self.cache.stats;
        format!(
            "{} ioreqs ({} MMIO, {} PIO, {} config, {} invalidate, {} refused); map cache: {} map calls, {} flushes; {}",
            s.ioreqs,
            s.mmio,
            s.pio,
            s.config,
            s.invalidates,
            s.refused,
            m.map_calls.load(Ordering::Relaxed),
            m.flushes.load(Ordering::Relaxed),
            self.pci.controller().summary()
        )
    }
}

impl<C: PciController> Drop for XenServer<C> {
    /// Undoes the set-up; the domain may already be gone, so failures are
    /// only logged.
    fn drop(&mut self) {
        for c in std::mem::take(&mut self.claimed) {
            let _ = self
                .hv
                .unmap_io_range(self.id, c.kind, c.start, c.start + c.len - 1);
        }
        if self.pci_claimed {
            let v = self.sbdf.range_value();
            let _ = self.hv.unmap_io_range(self.id, IoRange::Pci, v, v);
        }
        for v in std::mem::take(&mut self.vcpus) {
            let _ = self.ev.unbind(v.local_port);
        }
        let _ = self.hv.set_ioreq_server_state(self.id, false);
        self.page = None;
        if let Err(e) = self.hv.destroy_ioreq_server(self.id) {
            debug!("xen: destroy ioreq server {}: {e}", self.id);
        }
        info!(
            "xen: ioreq server {} torn down: {}",
            self.id,
            self.summary()
        );
    }
}
