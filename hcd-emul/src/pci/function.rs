//! [`PciFunction`]: a [`PciController`] behind a type-0 configuration space
//! and interrupt routing (PCI Local Bus 3.0 §6.2 header, §6.8.1 MSI, §6.8.2
//! MSI-X table and PBA; PCI Express Base 4.0 §7.7; PCI PM 1.2 §3.2).
//!
//! Interrupt routing:
//! - INTx (pin A): the pin is the OR of the per-vector levels the controller
//!   reports through [`IrqSink::set_level`], gated by COMMAND.Interrupt
//!   Disable and forced off while MSI or MSI-X is enabled.
//!   STATUS.Interrupt Status shows the OR of the levels while neither MSI
//!   nor MSI-X is enabled, whatever Interrupt Disable says (§6.2.3).
//! - MSI-X: [`IrqSink::pulse`] sends the table entry's message, or sets its
//!   pending bit while the entry or the whole function is masked; unmasking
//!   delivers and clears pending bits (§6.8.2.9). Vectors past the table
//!   are ignored. If both MSI and MSI-X are enabled (software must not do
//!   that) MSI-X wins.
//! - MSI: vector `v` becomes message `v mod 2^MME`, its number replacing the
//!   low bits of the message data (as QEMU's `msi_notify`). No per-vector
//!   masking.
//! - Bus Master Enable off: a function cannot write messages. MSI-X
//!   messages stay pending in the PBA and MSI messages are remembered in an
//!   internal pending mask; both are delivered when Bus Master Enable is set
//!   again (MSI pending is dropped if MSI is disabled meanwhile). `pulse`
//!   still returns `true`: the message is owed, and the controller may clear
//!   its own pending bit.
//!
//! The MSI-X table and PBA live in one of the controller's BARs but the
//! controller never sees accesses to them: an access that touches either
//! range is served here byte by byte (bytes outside both ranges read 0 and
//! ignore writes). Table entries reset to masked with zero address and data
//! (§6.8.2.9).

use super::config::{
    msi_log2, ConfigSpace, BAR_SLOTS, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO,
    COMMAND_MEMORY,
};
use super::{
    BarInfo, BarKind, InterruptTransport, IrqSink, MsiMessage, MsixLayout, PciController,
    PciIdentity,
};

/// Largest number of vectors tracked for INTx levels (MSI-X maximum).
const MAX_VECTORS: usize = 2048;
/// Bytes per MSI-X table entry.
const MSIX_ENTRY_SIZE: u64 = 16;
/// MSI-X Vector Control.Mask Bit (§6.8.2.9).
const MSIX_ENTRY_MASKED: u32 = 1 << 0;
/// Smallest memory BAR we expose (one page, so BARs can be mapped).
const MIN_MEMORY_BAR: u64 = 4096;
/// Smallest I/O BAR (PCI Local Bus 3.0 §6.2.5.1 allows 4; we use 16).
const MIN_IO_BAR: u64 = 16;
/// Largest I/O BAR (PCI Local Bus 3.0 §6.2.5.1).
const MAX_IO_BAR: u64 = 256;

/// One MSI-X table entry (§6.8.2.6-6.8.2.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl MsixEntry {
    const RESET: Self = Self {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        control: MSIX_ENTRY_MASKED,
    };

    fn masked(&self) -> bool {
        self.control & MSIX_ENTRY_MASKED != 0
    }

    fn address(&self) -> u64 {
        u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32)
    }

    /// Dword `field` (0-3) and its writable mask.
    fn field(&mut self, field: u64) -> Option<(&mut u32, u32)> {
        match field {
            0 => Some((&mut self.addr_lo, !0x3)),
            1 => Some((&mut self.addr_hi, !0)),
            2 => Some((&mut self.data, !0)),
            3 => Some((&mut self.control, MSIX_ENTRY_MASKED)),
            _ => None,
        }
    }
}

/// MSI-X table and pending-bit array.
#[derive(Debug, Clone)]
struct MsixState {
    layout: MsixLayout,
    table: Vec<MsixEntry>,
    pba: Vec<u64>,
}

impl MsixState {
    fn new(layout: MsixLayout) -> Self {
        let n = usize::from(layout.vectors);
        Self {
            layout,
            table: vec![MsixEntry::RESET; n],
            pba: vec![0; n.div_ceil(64)],
        }
    }

    fn reset(&mut self) {
        self.table.fill(MsixEntry::RESET);
        self.pba.fill(0);
    }

    fn table_range(&self) -> (u64, u64) {
        let start = u64::from(self.layout.table_offset);
        (
            start,
            start + MSIX_ENTRY_SIZE * u64::from(self.layout.vectors),
        )
    }

    fn pba_range(&self) -> (u64, u64) {
        let start = u64::from(self.layout.pba_offset);
        (start, start + 8 * self.pba.len() as u64)
    }

    /// Whether `[offset, offset + len)` in `bar` touches the table or PBA.
    fn claims(&self, bar: u8, offset: u64, len: usize) -> bool {
        if bar != self.layout.bar || len == 0 {
            return false;
        }
        let end = offset.saturating_add(len as u64);
        let overlaps = |(s, e): (u64, u64)| offset < e && s < end;
        overlaps(self.table_range()) || overlaps(self.pba_range())
    }

    fn pending(&self, vector: usize) -> bool {
        self.pba
            .get(vector / 64)
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }

    fn set_pending(&mut self, vector: usize, on: bool) {
        if let Some(w) = self.pba.get_mut(vector / 64) {
            if on {
                *w |= 1 << (vector % 64);
            } else {
                *w &= !(1 << (vector % 64));
            }
        }
    }

    fn read_byte(&mut self, offset: u64) -> u8 {
        let (ts, te) = self.table_range();
        let (ps, pe) = self.pba_range();
        if (ts..te).contains(&offset) {
            let rel = offset - ts;
            let Ok(idx) = usize::try_from(rel / MSIX_ENTRY_SIZE) else {
                return 0;
            };
            let Some(entry) = self.table.get_mut(idx) else {
                return 0;
            };
            let Some((value, _)) = entry.field((rel % MSIX_ENTRY_SIZE) / 4) else {
                return 0;
            };
            byte_of(u64::from(*value), rel % 4)
        } else if (ps..pe).contains(&offset) {
            let rel = offset - ps;
            usize::try_from(rel / 8)
                .ok()
                .and_then(|i| self.pba.get(i))
                .map_or(0, |w| byte_of(*w, rel % 8))
        } else {
            0
        }
    }

    /// Writes one table byte (PBA and gaps are read-only).
    fn write_byte(&mut self, offset: u64, val: u8) {
        let (ts, te) = self.table_range();
        if !(ts..te).contains(&offset) {
            return;
        }
        let rel = offset - ts;
        let Ok(idx) = usize::try_from(rel / MSIX_ENTRY_SIZE) else {
            return;
        };
        let Some(entry) = self.table.get_mut(idx) else {
            return;
        };
        let Some((value, wmask)) = entry.field((rel % MSIX_ENTRY_SIZE) / 4) else {
            return;
        };
        let shift = 8 * (rel % 4);
        let byte_mask = (0xff_u32 << shift) & wmask;
        *value = (*value & !byte_mask) | ((u32::from(val) << shift) & byte_mask);
    }
}

/// Byte `n` (little-endian) of `v`.
fn byte_of(v: u64, n: u64) -> u8 {
    v.to_le_bytes()
        .get(usize::try_from(n).unwrap_or(usize::MAX))
        .copied()
        .unwrap_or(0)
}

/// Interrupt state and configuration space: the [`IrqSink`] handed to the
/// controller, a field apart from it so both can be borrowed at once.
#[derive(Debug)]
struct FunctionState {
    /// Message interrupts managed by the client (see
    /// [`PciFunction::set_external_msi`]).
    external: ExternalMsi,
    config: ConfigSpace,
    /// Per-vector INTx condition, `MAX_VECTORS` bits.
    levels: Vec<u64>,
    /// Current INTx pin level as last told to the transport.
    intx_pin: bool,
    msix: Option<MsixState>,
    /// MSI messages owed while Bus Master Enable is off (bit per message).
    msi_pending: u32,
    /// Messages with vector 0 are remapped pirqs (see
    /// [`PciFunction::set_pirq_msi`]): MSI-X masks do not hold them.
    pirq_msi: bool,
    transport: Box<dyn InterruptTransport>,
}

impl FunctionState {
    fn bus_master(&self) -> bool {
        self.config.command() & COMMAND_BUS_MASTER != 0
    }

    /// Whether MSI-X `entry` may be sent now as far as masking goes: its
    /// vector and the function are unmasked — or it is a Xen pirq, whose
    /// masking goes through the event channel instead (QEMU's
    /// `msix_vector_masked` with `xen_is_pirq_msi`).
    fn msix_deliverable(&self, entry: &MsixEntry) -> bool {
        let pirq = self.pirq_msi && entry.data & 0xff == 0;
        pirq || (!entry.masked() && !self.config.msix_function_masked())
    }

    fn any_level(&self) -> bool {
        self.levels.iter().any(|w| *w != 0)
    }

    fn msix_active(&self) -> bool {
        self.msix.is_some() && self.config.msix_enabled()
    }

    fn msi_active(&self) -> bool {
        !self.msix_active() && self.config.msi_enabled()
    }

    /// Recomputes STATUS.Interrupt Status and the INTx pin; tells the
    /// transport only when the pin changes.
    fn update_intx(&mut self) {
        let condition = self.any_level()
            && self.external == ExternalMsi::None
            && !self.config.msi_enabled()
            && !self.config.msix_enabled();
        self.config.set_interrupt_status(condition);
        let pin = condition && self.config.command() & COMMAND_INTX_DISABLE == 0;
        if pin != self.intx_pin {
            self.intx_pin = pin;
            self.transport.set_intx(pin);
        }
    }

    fn send_msi(&mut self, index: u16) {
        let count = self.config.msi_enabled_vectors();
        let low = count - 1;
        let data = (self.config.msi_data() & !low) | (index & low);
        self.transport.send_msi(MsiMessage {
            msix: false,
            vector: index,
            address: self.config.msi_address(),
            data: u32::from(data),
        });
    }

    /// Delivers every MSI-X pending bit whose entry is deliverable now, and
    /// every owed MSI message.
    fn flush_pending(&mut self) {
        if !self.bus_master() {
            return;
        }
        if self.msix_active() {
            let deliverable: Vec<bool> = self
                .msix
                .as_ref()
                .map(|m| m.table.iter().map(|e| self.msix_deliverable(e)).collect())
                .unwrap_or_default();
            if let Some(msix) = self.msix.as_mut() {
                for (i, entry) in msix.table.iter().enumerate() {
                    if !deliverable[i] || !msix.pending(i) {
                        continue;
                    }
                    let Ok(vector) = u16::try_from(i) else {
                        break;
                    };
                    if let Some(w) = msix.pba.get_mut(i / 64) {
                        *w &= !(1 << (i % 64));
                    }
                    self.transport.send_msi(MsiMessage {
                        msix: true,
                        vector,
                        address: entry.address(),
                        data: entry.data,
                    });
                }
            }
        }
        if self.msi_active() {
            let mut pending = std::mem::take(&mut self.msi_pending);
            while pending != 0 {
                let bit = pending.trailing_zeros();
                pending &= !(1 << bit);
                if let Ok(index) = u16::try_from(bit) {
                    self.send_msi(index);
                }
            }
        } else {
            self.msi_pending = 0;
        }
    }

    /// Power-on interrupt state; lowers the pin if it was up.
    fn reset(&mut self, config: ConfigSpace) {
        self.config = config;
        self.levels.fill(0);
        self.msi_pending = 0;
        if let Some(msix) = self.msix.as_mut() {
            msix.reset();
        }
        self.update_intx();
    }

    fn msix_read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(msix) = self.msix.as_mut() else {
            data.fill(0);
            return;
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .map_or(0, |o| msix.read_byte(o));
        }
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        for (i, &v) in data.iter().enumerate() {
            if let Some(o) = offset.checked_add(i as u64) {
                msix.write_byte(o, v);
            }
        }
        // An entry may have been unmasked.
        self.flush_pending();
    }
}

impl IrqSink for FunctionState {
    fn pulse(&mut self, vector: u16) -> bool {
        match self.external {
            ExternalMsi::None => {}
            ExternalMsi::Msi(count) | ExternalMsi::MsiX(count) => {
                let msix = matches!(self.external, ExternalMsi::MsiX(_));
                let vector = if msix { vector } else { vector % count.max(1) };
                if vector < count {
                    self.transport.send_msi(MsiMessage {
                        msix,
                        vector,
                        address: 0,
                        data: 0,
                    });
                }
                return true;
            }
        }
        if self.msix_active() {
            let idx = usize::from(vector);
            let Some(entry) = self.msix.as_ref().and_then(|m| m.table.get(idx).copied()) else {
                tracing::trace!(target: "pci::msix", vector, "vector past the MSI-X table; ignored");
                return true;
            };
            let deliver_now = self.bus_master() && self.msix_deliverable(&entry);
            let Some(msix) = self.msix.as_mut() else {
                return true;
            };
            if deliver_now {
                self.transport.send_msi(MsiMessage {
                    msix: true,
                    vector,
                    address: entry.address(),
                    data: entry.data,
                });
            } else {
                msix.set_pending(idx, true);
            }
            return true;
        }
        if self.msi_active() {
            let index = vector % self.config.msi_enabled_vectors();
            if self.bus_master() {
                self.send_msi(index);
            } else {
                self.msi_pending |= 1 << index;
            }
            return true;
        }
        false
    }

    fn set_level(&mut self, vector: u16, level: bool) {
        let v = usize::from(vector);
        if v >= MAX_VECTORS {
            return;
        }
        if let Some(w) = self.levels.get_mut(v / 64) {
            if level {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
        self.update_intx();
    }
}

/// Who delivers message-signalled interrupts.
///
/// With vfio-user the client (QEMU's vfio-pci code) emulates the MSI and
/// MSI-X capabilities and table itself and hands the server one eventfd per
/// enabled vector through `SET_IRQS`; the function then only names the
/// vector and the transport signals its eventfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalMsi {
    /// The function's own MSI/MSI-X state decides (Xen, tests).
    #[default]
    None,
    /// The client enabled this many MSI vectors.
    Msi(u16),
    /// The client enabled this many MSI-X vectors.
    MsiX(u16),
}

/// A controller exposed as a PCI function: configuration space, BAR
/// dispatch, MSI-X table and interrupt routing (see the module docs).
#[derive(Debug)]
pub struct PciFunction<C: PciController> {
    controller: C,
    state: FunctionState,
    identity: PciIdentity,
    bars: Vec<BarInfo>,
    /// Power-on configuration space, restored on reset.
    power_on: ConfigSpace,
    /// Inside [`PciFunction::one_access`].
    in_access: bool,
}

impl<C: PciController> PciFunction<C> {
    /// Wraps `controller`; interrupts go to `transport`. BARs and MSI-X
    /// layout the controller reports that do not fit the PCI rules are
    /// dropped (with a warning) or rounded up to a power of two.
    pub fn new(controller: C, transport: Box<dyn InterruptTransport>) -> Self {
        let identity = controller.identity();
        let bars = normalize_bars(&controller.bars());
        let msix = controller.msix().and_then(|m| normalize_msix(m, &bars));
        let vendor = controller.vendor_config();
        let config = ConfigSpace::new(
            &identity,
            &bars,
            msix.as_ref(),
            controller.msi_vectors(),
            &vendor,
        );
        tracing::debug!(
            target: "pci",
            msi_vectors = controller.msi_vectors().min(1u16 << msi_log2(controller.msi_vectors())),
            msix = msix.map_or(0, |m| m.vectors),
            "PCI function {:04x}:{:04x}",
            identity.vendor_id,
            identity.device_id
        );
        Self {
            controller,
            state: FunctionState {
                config: config.clone(),
                levels: vec![0; MAX_VECTORS / 64],
                intx_pin: false,
                msix: msix.map(MsixState::new),
                msi_pending: 0,
                pirq_msi: false,
                external: ExternalMsi::None,
                transport,
            },
            identity,
            bars,
            power_on: config,
            in_access: false,
        }
    }

    /// The controller.
    pub fn controller(&self) -> &C {
        &self.controller
    }

    /// The controller, mutably.
    pub fn controller_mut(&mut self) -> &mut C {
        &mut self.controller
    }

    /// The identity the configuration space shows.
    pub fn identity(&self) -> PciIdentity {
        self.identity
    }

    /// The BARs the function decodes (the controller's, validated).
    pub fn bars(&self) -> Vec<BarInfo> {
        self.bars.clone()
    }

    /// The address the guest programmed into the BAR starting at `index`,
    /// or `None` if no BAR starts there.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        self.state.config.bar_address(usize::from(index))
    }

    /// COMMAND.Memory Space: whether memory BARs decode.
    pub fn memory_enabled(&self) -> bool {
        self.state.config.command() & COMMAND_MEMORY != 0
    }

    /// COMMAND.I/O Space: whether I/O BARs decode.
    pub fn io_enabled(&self) -> bool {
        self.state.config.command() & COMMAND_IO != 0
    }

    /// COMMAND.Bus Master: whether the function may DMA and send messages.
    pub fn bus_master_enabled(&self) -> bool {
        self.state.bus_master()
    }

    /// PMCSR.PowerState: 0 for D0, 3 for D3hot.
    pub fn power_state(&self) -> u8 {
        self.state.config.power_state()
    }

    /// The INTx pin level last given to the transport.
    pub fn intx_level(&self) -> bool {
        self.state.intx_pin
    }

    /// Whether MSI is enabled (and MSI-X is not).
    pub fn msi_enabled(&self) -> bool {
        self.state.msi_active()
    }

    /// Whether MSI-X is enabled.
    pub fn msix_enabled(&self) -> bool {
        self.state.msix_active()
    }

    /// A configuration-space read at `offset` (0..4096, any length;
    /// unaligned allowed). Bytes past 0x100 read 0.
    pub fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.state.config.read(offset, data);
    }

    /// A configuration-space write at `offset` (0..4096, any length;
    /// unaligned allowed). Bytes past 0x100 are ignored.
    pub fn config_write(&mut self, offset: u16, data: &[u8]) {
        let old_bus_master = self.state.bus_master();
        self.state.config.write(offset, data);
        let end = usize::from(offset).saturating_add(data.len());
        if usize::from(offset) < 0x80 && end > 0x40 {
            self.controller
                .vendor_config_written(self.state.config.vendor_bytes_mut());
        }
        let bus_master = self.state.bus_master();
        if bus_master != old_bus_master {
            self.controller.set_bus_master(bus_master);
        }
        // Masks, enables or Bus Master may have changed: re-evaluate.
        self.state.update_intx();
        self.state.flush_pending();
    }

    /// Runs `f` as one guest access: the controller's work budget starts
    /// afresh once for all the register accesses `f` makes, not once per
    /// register (a vfio-user REGION_WRITE of many registers, a Xen rep
    /// ioreq), so batching accesses cannot multiply the work one guest
    /// access may cause.
    pub fn one_access<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let outer = self.in_access;
        self.begin_access();
        let r = f(self);
        self.in_access = outer;
        r
    }

    /// Starts one guest access made of several register accesses, until
    /// [`PciFunction::end_access`] (what [`PciFunction::one_access`] does,
    /// for callers that cannot lend themselves to a closure).
    pub fn begin_access(&mut self) {
        self.controller.new_access();
        self.in_access = true;
    }

    /// Ends the access [`PciFunction::begin_access`] started.
    pub fn end_access(&mut self) {
        self.in_access = false;
    }

    fn new_access(&mut self) {
        if !self.in_access {
            self.controller.new_access();
        }
    }

    /// A read of `data.len()` bytes at `offset` in BAR `bar`.
    pub fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.new_access();
        if self
            .state
            .msix
            .as_ref()
            .is_some_and(|m| m.claims(bar, offset, data.len()))
        {
            self.state.msix_read(offset, data);
            return;
        }
        self.controller.bar_read(bar, offset, data, &mut self.state);
    }

    /// A write of `data.len()` bytes at `offset` in BAR `bar`.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.new_access();
        if self
            .state
            .msix
            .as_ref()
            .is_some_and(|m| m.claims(bar, offset, data.len()))
        {
            self.state.msix_write(offset, data);
            return;
        }
        self.controller
            .bar_write(bar, offset, data, &mut self.state);
    }

    /// Xen's pirq model (`XENFEAT_hvm_pirqs`, on by default in Xen 4.17's
    /// libxl): Linux writes MSI/MSI-X messages with vector 0 and the pirq
    /// number in the address, and masks and unmasks them through the event
    /// channel, leaving the MSI-X Mask bits set. With this on (the Xen
    /// transport), a message whose vector is 0 is sent whatever the Mask
    /// and Function Mask bits say, as QEMU does (`xen_is_pirq_msi`); Xen
    /// turns it into the pirq's event. A vector-0 message is never a valid
    /// APIC interrupt, so nothing else changes.
    pub fn set_pirq_msi(&mut self, on: bool) {
        self.state.pirq_msi = on;
        self.state.flush_pending();
    }

    /// Hands message-interrupt delivery to the client (vfio-user), or takes
    /// it back with [`ExternalMsi::None`].
    pub fn set_external_msi(&mut self, mode: ExternalMsi) {
        self.state.external = mode;
        self.state.update_intx();
    }

    /// Lets the controller do work that is not a register access.
    pub fn process(&mut self) {
        self.controller.process(&mut self.state);
    }

    /// When [`PciFunction::process`] next has timed work, if ever.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        self.controller.next_deadline()
    }

    /// Function-level reset: configuration space and interrupt state to
    /// power-on values (the INTx pin is lowered if it was up), then the
    /// controller's reset. The controller is told Bus Master went off first
    /// if it was on.
    pub fn reset(&mut self) {
        let was_bus_master = self.state.bus_master();
        self.state.reset(self.power_on.clone());
        if was_bus_master {
            self.controller.set_bus_master(false);
        }
        self.controller.reset(&mut self.state);
    }
}

/// Keeps BARs with a free, valid slot; rounds sizes up to a power of two
/// (memory at least 4 KiB, I/O 16-256 bytes).
fn normalize_bars(bars: &[BarInfo]) -> Vec<BarInfo> {
    let mut used = [false; BAR_SLOTS];
    let mut out = Vec::new();
    for bar in bars {
        let slot = usize::from(bar.index);
        let slots = if bar.kind == BarKind::Memory64 { 2 } else { 1 };
        let free = (slot..slot + slots).all(|s| used.get(s).is_some_and(|u| !u));
        let size = match bar.kind {
            BarKind::Io => bar
                .size
                .max(MIN_IO_BAR)
                .checked_next_power_of_two()
                .filter(|s| *s <= MAX_IO_BAR),
            BarKind::Memory32 => bar
                .size
                .max(MIN_MEMORY_BAR)
                .checked_next_power_of_two()
                .filter(|s| *s <= 1 << 31),
            BarKind::Memory64 => bar.size.max(MIN_MEMORY_BAR).checked_next_power_of_two(),
        };
        let (true, Some(size)) = (free, size) else {
            // Set-up only, never guest-triggered: not rate-limited.
            tracing::event!(target: "pci", tracing::Level::WARN, ?bar, "invalid or overlapping BAR; not exposed");
            continue;
        };
        for s in slot..slot + slots {
            if let Some(u) = used.get_mut(s) {
                *u = true;
            }
        }
        out.push(BarInfo { size, ..*bar });
    }
    out.sort_by_key(|b| b.index);
    out
}

/// Validates an MSI-X layout against the BARs: 1-2048 vectors, table and
/// PBA 8-byte aligned and inside a memory BAR.
fn normalize_msix(m: MsixLayout, bars: &[BarInfo]) -> Option<MsixLayout> {
    let bar = bars
        .iter()
        .find(|b| b.index == m.bar && b.kind != BarKind::Io);
    let vectors = u64::from(m.vectors);
    let table_end = u64::from(m.table_offset) + MSIX_ENTRY_SIZE * vectors;
    let pba_end = u64::from(m.pba_offset) + 8 * vectors.div_ceil(64);
    let ok = (1..=MAX_VECTORS as u64).contains(&vectors)
        && m.table_offset & 0x7 == 0
        && m.pba_offset & 0x7 == 0
        && bar.is_some_and(|b| table_end <= b.size && pba_end <= b.size);
    if !ok {
        // Set-up only, never guest-triggered: not rate-limited.
        tracing::event!(target: "pci", tracing::Level::WARN, ?m, "invalid MSI-X layout; MSI-X not exposed");
        return None;
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::super::config::{CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PM, MSIX_CAP, MSI_CAP, PM_CAP};
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Intx(bool),
        Msi(MsiMessage),
    }

    #[derive(Debug, Clone, Default)]
    struct FakeTransport(Arc<Mutex<Vec<Event>>>);

    impl InterruptTransport for FakeTransport {
        fn set_intx(&mut self, level: bool) {
            self.0.lock().unwrap().push(Event::Intx(level));
        }
        fn send_msi(&mut self, msg: MsiMessage) {
            self.0.lock().unwrap().push(Event::Msi(msg));
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Action {
        Pulse(u16),
        Level(u16, bool),
    }

    #[derive(Debug, Default)]
    struct FakeController {
        accesses: Vec<AccessRecord>,
        actions: Vec<Action>,
        pulse_results: Vec<bool>,
        bus_master: Vec<bool>,
        resets: usize,
    }

    type AccessRecord = (bool, u8, u64, Vec<u8>);

    const IDENTITY: PciIdentity = PciIdentity {
        vendor_id: 0x1b36,
        device_id: 0x000d,
        class_code: 0x0c_03_30,
        revision: 0x01,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
    };

    impl PciController for FakeController {
        fn identity(&self) -> PciIdentity {
            IDENTITY
        }
        fn bars(&self) -> Vec<BarInfo> {
            vec![
                BarInfo {
                    index: 0,
                    size: 0x1_0000,
                    kind: BarKind::Memory64,
                },
                BarInfo {
                    index: 2,
                    size: 32,
                    kind: BarKind::Io,
                },
                BarInfo {
                    index: 3,
                    size: 0x1000,
                    kind: BarKind::Memory32,
                },
            ]
        }
        fn msix(&self) -> Option<MsixLayout> {
            Some(MsixLayout {
                vectors: 8,
                bar: 0,
                table_offset: 0x3000,
                pba_offset: 0x3800,
            })
        }
        fn msi_vectors(&self) -> u16 {
            4
        }
        fn vendor_config(&self) -> Vec<(u8, u8, u8)> {
            vec![(0x60, 0x30, 0x00), (0x61, 0x20, 0x3f)]
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8], _irq: &mut dyn IrqSink) {
            data.fill(0xa5);
            self.accesses.push((false, bar, offset, data.to_vec()));
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8], _irq: &mut dyn IrqSink) {
            self.accesses.push((true, bar, offset, data.to_vec()));
        }
        fn reset(&mut self, irq: &mut dyn IrqSink) {
            self.resets += 1;
            irq.set_level(0, false);
        }
        fn process(&mut self, irq: &mut dyn IrqSink) {
            for a in std::mem::take(&mut self.actions) {
                match a {
                    Action::Pulse(v) => {
                        let r = irq.pulse(v);
                        self.pulse_results.push(r);
                    }
                    Action::Level(v, l) => irq.set_level(v, l),
                }
            }
        }
        fn set_bus_master(&mut self, enabled: bool) {
            self.bus_master.push(enabled);
        }
    }

    fn setup() -> (PciFunction<FakeController>, Arc<Mutex<Vec<Event>>>) {
        let t = FakeTransport::default();
        let events = Arc::clone(&t.0);
        (
            PciFunction::new(FakeController::default(), Box::new(t)),
            events,
        )
    }

    fn take(events: &Arc<Mutex<Vec<Event>>>) -> Vec<Event> {
        std::mem::take(&mut *events.lock().unwrap())
    }

    fn r8(f: &mut PciFunction<FakeController>, off: u16) -> u8 {
        let mut b = [0; 1];
        f.config_read(off, &mut b);
        b[0]
    }

    fn r16(f: &mut PciFunction<FakeController>, off: u16) -> u16 {
        let mut b = [0; 2];
        f.config_read(off, &mut b);
        u16::from_le_bytes(b)
    }

    fn r32(f: &mut PciFunction<FakeController>, off: u16) -> u32 {
        let mut b = [0; 4];
        f.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w16(f: &mut PciFunction<FakeController>, off: u16, v: u16) {
        f.config_write(off, &v.to_le_bytes());
    }

    fn w32(f: &mut PciFunction<FakeController>, off: u16, v: u32) {
        f.config_write(off, &v.to_le_bytes());
    }

    fn dump(f: &mut PciFunction<FakeController>) -> Vec<u8> {
        let mut b = vec![0; 256];
        f.config_read(0, &mut b);
        b
    }

    fn bar_w32(f: &mut PciFunction<FakeController>, off: u64, v: u32) {
        f.bar_write(0, off, &v.to_le_bytes());
    }

    fn bar_r32(f: &mut PciFunction<FakeController>, off: u64) -> u32 {
        let mut b = [0; 4];
        f.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn pulse(f: &mut PciFunction<FakeController>, v: u16) -> bool {
        f.controller_mut().actions.push(Action::Pulse(v));
        f.process();
        f.controller_mut().pulse_results.pop().unwrap()
    }

    fn level(f: &mut PciFunction<FakeController>, v: u16, l: bool) {
        f.controller_mut().actions.push(Action::Level(v, l));
        f.process();
    }

    /// Programs MSI-X entry `i`: address, data, unmasked.
    fn program_entry(f: &mut PciFunction<FakeController>, i: u64, masked: bool) {
        let base = 0x3000 + 16 * i;
        bar_w32(f, base, 0xfee0_0000 + (i as u32) * 4);
        bar_w32(f, base + 4, 0x1);
        bar_w32(f, base + 8, 0x40 + i as u32);
        bar_w32(f, base + 12, u32::from(masked));
    }

    fn enable_msix(f: &mut PciFunction<FakeController>, fmask: bool) {
        let ctrl = r16(f, MSIX_CAP as u16 + 2);
        let ctrl = (ctrl & 0x3fff) | 0x8000 | if fmask { 0x4000 } else { 0 };
        w16(f, MSIX_CAP as u16 + 2, ctrl);
    }

    const BUS_MASTER: u16 = 1 << 2;

    #[test]
    fn header_shows_identity_and_layout() {
        let (mut f, _) = setup();
        assert_eq!(r16(&mut f, 0x00), 0x1b36);
        assert_eq!(r16(&mut f, 0x02), 0x000d);
        assert_eq!(r8(&mut f, 0x08), 0x01);
        assert_eq!(r8(&mut f, 0x09), 0x30);
        assert_eq!(r8(&mut f, 0x0a), 0x03);
        assert_eq!(r8(&mut f, 0x0b), 0x0c);
        assert_eq!(r8(&mut f, 0x0e), 0x00);
        assert_eq!(r16(&mut f, 0x2c), 0x1af4);
        assert_eq!(r16(&mut f, 0x2e), 0x1100);
        assert_eq!(r16(&mut f, 0x06) & 0x10, 0x10);
        assert_eq!(r8(&mut f, 0x3d), 1);
        assert_eq!(r32(&mut f, 0x30), 0);
        assert_eq!(r8(&mut f, 0x60), 0x30);
        assert_eq!(r8(&mut f, 0x61), 0x20);
    }

    #[test]
    fn capability_list_is_pm_msi_msix() {
        let (mut f, _) = setup();
        let mut ptr = r8(&mut f, 0x34);
        let mut ids = Vec::new();
        while ptr != 0 && ids.len() < 16 {
            ids.push((ptr, r8(&mut f, u16::from(ptr))));
            ptr = r8(&mut f, u16::from(ptr) + 1);
        }
        assert_eq!(
            ids,
            vec![
                (PM_CAP as u8, CAP_ID_PM),
                (MSI_CAP as u8, CAP_ID_MSI),
                (MSIX_CAP as u8, CAP_ID_MSIX)
            ]
        );
        // PM version 3, NoSoftReset.
        assert_eq!(r16(&mut f, PM_CAP as u16 + 2) & 0x7, 3);
        assert_eq!(r16(&mut f, PM_CAP as u16 + 4), 0x0008);
        // MSI: 64-bit, MMC = log2(4) = 2.
        assert_eq!(r16(&mut f, MSI_CAP as u16 + 2), 0x0080 | (2 << 1));
        // MSI-X: table size 7, BIR 0 at 0x3000, PBA at 0x3800.
        assert_eq!(r16(&mut f, MSIX_CAP as u16 + 2), 7);
        assert_eq!(r32(&mut f, MSIX_CAP as u16 + 4), 0x3000);
        assert_eq!(r32(&mut f, MSIX_CAP as u16 + 8), 0x3800);
    }

    #[test]
    fn bar_sizing_64bit_memory() {
        let (mut f, _) = setup();
        assert_eq!(r32(&mut f, 0x10), 0b100);
        w32(&mut f, 0x10, 0xffff_ffff);
        w32(&mut f, 0x14, 0xffff_ffff);
        assert_eq!(r32(&mut f, 0x10), 0xffff_0004);
        assert_eq!(r32(&mut f, 0x14), 0xffff_ffff);
        w32(&mut f, 0x10, 0xfebc_1234);
        w32(&mut f, 0x14, 0x0000_0001);
        assert_eq!(f.bar_address(0), Some(0x1_febc_0000));
        assert_eq!(f.bar_address(1), None);
    }

    #[test]
    fn bar_sizing_32bit_memory() {
        let (mut f, _) = setup();
        w32(&mut f, 0x1c, 0xffff_ffff);
        assert_eq!(r32(&mut f, 0x1c), 0xffff_f000);
        w32(&mut f, 0x1c, 0xfeb0_0000);
        assert_eq!(f.bar_address(3), Some(0xfeb0_0000));
    }

    #[test]
    fn bar_sizing_io() {
        let (mut f, _) = setup();
        assert_eq!(r32(&mut f, 0x18), 1);
        w32(&mut f, 0x18, 0xffff_ffff);
        assert_eq!(r32(&mut f, 0x18), 0xffff_ffe1);
        w32(&mut f, 0x18, 0xc040);
        assert_eq!(f.bar_address(2), Some(0xc040));
    }

    #[test]
    fn unused_bar_slots_read_zero() {
        let (mut f, _) = setup();
        for off in [0x20, 0x24] {
            w32(&mut f, off, 0xffff_ffff);
            assert_eq!(r32(&mut f, off), 0);
        }
        assert_eq!(f.bar_address(4), None);
        assert_eq!(f.bar_address(9), None);
    }

    #[test]
    fn writing_all_ones_changes_no_read_only_bits() {
        let (mut f, _) = setup();
        let before = dump(&mut f);
        for off in (0..256u16).step_by(4) {
            w32(&mut f, off, 0xffff_ffff);
        }
        let after = dump(&mut f);
        // Identity, class, header type, BIST.
        assert_eq!(before[0..4], after[0..4]);
        assert_eq!(before[8..12], after[8..12]);
        assert_eq!(before[0x0e..0x10], after[0x0e..0x10]);
        assert_eq!(before[0x28..0x30], after[0x28..0x30]);
        assert_eq!(before[0x30..0x36], after[0x30..0x36]);
        assert_eq!(after[0x3d], 1);
        // STATUS: capability list bit kept, W1C bits stay 0.
        assert_eq!(u16::from_le_bytes([after[6], after[7]]) & 0xfff0, 0x0010);
        // COMMAND: only the writable bits.
        assert_eq!(u16::from_le_bytes([after[4], after[5]]), 0x0547);
        // RW bytes.
        assert_eq!(after[0x0c], 0xff);
        assert_eq!(after[0x0d], 0xff);
        assert_eq!(after[0x3c], 0xff);
        // Vendor bytes: SBRN read-only, FLADJ 6 bits.
        assert_eq!(after[0x60], 0x30);
        assert_eq!(after[0x61], 0x3f);
        // Capability ids and next pointers.
        for cap in [PM_CAP, MSI_CAP, MSIX_CAP] {
            assert_eq!(before[cap..cap + 2], after[cap..cap + 2]);
        }
        // PM: PowerState D3, NoSoftReset kept, PME status clear.
        assert_eq!(after[PM_CAP + 4], 0x0b);
        assert_eq!(after[PM_CAP + 5], 0x00);
        // MSI control: MMC and 64-bit kept; MME and enable set.
        assert_eq!(after[MSI_CAP + 2], 0x80 | (2 << 1) | (7 << 4) | 1);
        // MSI address low bits are RO 0.
        assert_eq!(after[MSI_CAP + 4], 0xfc);
        // MSI-X: table size kept, table and PBA offsets read-only.
        assert_eq!(
            u16::from_le_bytes([after[MSIX_CAP + 2], after[MSIX_CAP + 3]]),
            0xc007
        );
        assert_eq!(
            before[MSIX_CAP + 4..MSIX_CAP + 12],
            after[MSIX_CAP + 4..MSIX_CAP + 12]
        );
        // Everything else outside the RW registers is unchanged.
        assert!(after[0x40..0x60].iter().all(|b| *b == 0));
        assert!(after[0x62..0x80].iter().all(|b| *b == 0));
        assert!(after[0xc0..0x100].iter().all(|b| *b == 0));
    }

    #[test]
    fn command_writable_mask() {
        let (mut f, _) = setup();
        w16(&mut f, 0x04, 0xffff);
        assert_eq!(r16(&mut f, 0x04), 0x0547);
        assert!(f.memory_enabled() && f.io_enabled() && f.bus_master_enabled());
        w16(&mut f, 0x04, 0);
        assert_eq!(r16(&mut f, 0x04), 0);
        assert_eq!(f.controller().bus_master, vec![true, false]);
    }

    #[test]
    fn status_writes_of_ones_leave_status_unchanged() {
        let (mut f, _) = setup();
        w16(&mut f, 0x06, 0xffff);
        assert_eq!(r16(&mut f, 0x06), 0x0010);
    }

    #[test]
    fn pm_power_state_accepts_d0_and_d3_only() {
        let (mut f, _) = setup();
        let pmcsr = PM_CAP as u16 + 4;
        w16(&mut f, pmcsr, 3);
        assert_eq!(f.power_state(), 3);
        w16(&mut f, pmcsr, 1);
        assert_eq!(f.power_state(), 3);
        w16(&mut f, pmcsr, 0);
        assert_eq!(f.power_state(), 0);
        w16(&mut f, pmcsr, 2);
        assert_eq!(f.power_state(), 0);
        assert_eq!(r16(&mut f, pmcsr), 0x0008);
    }

    #[test]
    fn intx_level_asserts_pin_and_status() {
        let (mut f, ev) = setup();
        level(&mut f, 1, true);
        assert_eq!(take(&ev), vec![Event::Intx(true)]);
        assert!(f.intx_level());
        assert_ne!(r16(&mut f, 0x06) & 0x08, 0);
        // A second vector does not toggle the pin again.
        level(&mut f, 0, true);
        level(&mut f, 1, false);
        assert!(take(&ev).is_empty());
        level(&mut f, 0, false);
        assert_eq!(take(&ev), vec![Event::Intx(false)]);
        assert_eq!(r16(&mut f, 0x06) & 0x08, 0);
    }

    #[test]
    fn intx_disable_drops_pin_but_keeps_status() {
        let (mut f, ev) = setup();
        level(&mut f, 0, true);
        take(&ev);
        w16(&mut f, 0x04, 1 << 10);
        assert_eq!(take(&ev), vec![Event::Intx(false)]);
        assert_ne!(r16(&mut f, 0x06) & 0x08, 0);
        w16(&mut f, 0x04, 0);
        assert_eq!(take(&ev), vec![Event::Intx(true)]);
    }

    #[test]
    fn msi_enable_drops_pin_and_pulse_in_intx_mode_returns_false() {
        let (mut f, ev) = setup();
        assert!(!pulse(&mut f, 0));
        level(&mut f, 0, true);
        take(&ev);
        w16(&mut f, MSI_CAP as u16 + 2, 1);
        assert_eq!(take(&ev), vec![Event::Intx(false)]);
        assert_eq!(r16(&mut f, 0x06) & 0x08, 0);
        assert!(f.msi_enabled());
    }

    #[test]
    fn msi_message_address_and_data() {
        let (mut f, ev) = setup();
        w16(&mut f, 0x04, BUS_MASTER);
        w32(&mut f, MSI_CAP as u16 + 4, 0xfee0_100f);
        w32(&mut f, MSI_CAP as u16 + 8, 0x2);
        w16(&mut f, MSI_CAP as u16 + 12, 0x4120);
        // Enable with MME = 2 (4 messages).
        w16(&mut f, MSI_CAP as u16 + 2, 1 | (2 << 4));
        assert!(pulse(&mut f, 0));
        assert!(pulse(&mut f, 3));
        assert!(pulse(&mut f, 5));
        let msg = |vector: u16, data: u32| {
            Event::Msi(MsiMessage {
                msix: false,
                vector,
                address: 0x2_fee0_100c,
                data,
            })
        };
        assert_eq!(
            take(&ev),
            vec![msg(0, 0x4120), msg(3, 0x4123), msg(1, 0x4121)]
        );
    }

    #[test]
    fn msi_single_message_uses_data_as_is() {
        let (mut f, ev) = setup();
        w16(&mut f, 0x04, BUS_MASTER);
        w32(&mut f, MSI_CAP as u16 + 4, 0xfee0_0000);
        w16(&mut f, MSI_CAP as u16 + 12, 0x0031);
        w16(&mut f, MSI_CAP as u16 + 2, 1);
        assert!(pulse(&mut f, 2));
        assert_eq!(
            take(&ev),
            vec![Event::Msi(MsiMessage {
                msix: false,
                vector: 0,
                address: 0xfee0_0000,
                data: 0x31
            })]
        );
    }

    #[test]
    fn msi_without_bus_master_is_held_until_enabled() {
        let (mut f, ev) = setup();
        w32(&mut f, MSI_CAP as u16 + 4, 0xfee0_0000);
        w16(&mut f, MSI_CAP as u16 + 2, 1);
        assert!(pulse(&mut f, 0));
        assert!(take(&ev).is_empty());
        w16(&mut f, 0x04, BUS_MASTER);
        assert_eq!(take(&ev).len(), 1);
    }

    #[test]
    fn msix_delivers_table_message() {
        let (mut f, ev) = setup();
        w16(&mut f, 0x04, BUS_MASTER);
        program_entry(&mut f, 2, false);
        enable_msix(&mut f, false);
        assert!(f.msix_enabled());
        assert!(pulse(&mut f, 2));
        assert_eq!(
            take(&ev),
            vec![Event::Msi(MsiMessage {
                msix: true,
                vector: 2,
                address: 0x1_fee0_0008,
                data: 0x42
            })]
        );
        // Past the table: ignored, reported as handled.
        assert!(pulse(&mut f, 8));
        assert!(take(&ev).is_empty());
    }

    #[test]
    fn msix_entry_mask_sets_pba_and_unmask_delivers() {
        let (mut f, ev) = setup();
        w16(&mut f, 0x04, BUS_MASTER);
        program_entry(&mut f, 3, true);
        enable_msix(&mut f, false);
        assert!(pulse(&mut f, 3));
        assert!(take(&ev).is_empty());
        assert_eq!(bar_r32(&mut f, 0x3800), 1 << 3);
        // PBA is read-only.
        bar_w32(&mut f, 0x3800, 0);
        assert_eq!(bar_r32(&mut f, 0x3800), 1 << 3);
        // Unmask.
        bar_w32(&mut f, 0x3000 + 16 * 3 + 12, 0);
        assert_eq!(
            take(&ev),
            vec![Event::Msi(MsiMessage {
                msix: true,
                vector: 3,
                address: 0x1_fee0_000c,
                data: 0x43
            })]
        );
        assert_eq!(bar_r32(&mut f, 0x3800), 0);
    }

    #[test]
    fn msix_function_mask_holds_then_delivers() {
        let (mut f, ev) = setup();
        w16(&mut f, 0x04, BUS_MASTER);
        program_entry(&mut f, 0, false);
        program_entry(&mut f, 1, false);
        enable_msix(&mut f, true);
        assert!(pulse(&mut f, 1));
        assert!(pulse(&mut f, 0));
        assert!(take(&ev).is_empty());
        assert_eq!(bar_r32(&mut f, 0x3800), 0b11);
        enable_msix(&mut f, false);
        let ev = take(&ev);
        assert_eq!(ev.len(), 2);
        assert!(matches!(ev[0], Event::Msi(m) if m.vector == 0 && m.msix));
        assert!(matches!(ev[1], Event::Msi(m) if m.vector == 1 && m.msix));
        assert_eq!(bar_r32(&mut f, 0x3800), 0);
    }

    /// Xen's pirq model: Linux writes vector 0 (delivery mode ExtINT) with
    /// the pirq in the address and leaves the entries masked (masking is
    /// done on the event channel). Without the pirq mode that message
    /// waits in the PBA forever (the Xen 4.17 "Command Aborted" defect);
    /// with it, vector-0 messages go out whatever the masks say, and
    /// ordinary vectors still obey them.
    #[test]
    fn msix_pirq_messages_ignore_the_masks_in_pirq_mode() {
        let pirq_entry = |f: &mut PciFunction<FakeController>, i: u64| {
            let base = 0x3000 + 16 * i;
            bar_w32(f, base, 0xfee0_0000 | (0x37 << 12)); // pirq 0x37 as dest id
            bar_w32(f, base + 4, 0);
            bar_w32(f, base + 8, 7 << 8); // ExtINT, vector 0
            bar_w32(f, base + 12, 1); // masked
        };
        for pirq_mode in [false, true] {
            let (mut f, ev) = setup();
            f.set_pirq_msi(pirq_mode);
            w16(&mut f, 0x04, BUS_MASTER);
            pirq_entry(&mut f, 0);
            program_entry(&mut f, 1, true);
            enable_msix(&mut f, true);
            assert!(pulse(&mut f, 0));
            assert!(pulse(&mut f, 1));
            let got = take(&ev);
            if pirq_mode {
                assert_eq!(
                    got,
                    vec![Event::Msi(MsiMessage {
                        msix: true,
                        vector: 0,
                        address: 0xfee3_7000,
                        data: 7 << 8
                    })]
                );
                assert_eq!(bar_r32(&mut f, 0x3800), 0b10, "vector 1 still masked");
            } else {
                assert!(got.is_empty());
                assert_eq!(bar_r32(&mut f, 0x3800), 0b11);
            }
        }
        // A pending vector-0 message goes out when pirq mode is turned on.
        let (mut f, ev) = setup();
        w16(&mut f, 0x04, BUS_MASTER);
        pirq_entry(&mut f, 2);
        enable_msix(&mut f, false);
        assert!(pulse(&mut f, 2));
        assert!(take(&ev).is_empty());
        f.set_pirq_msi(true);
        assert_eq!(take(&ev).len(), 1);
    }

    #[test]
    fn msix_without_bus_master_stays_pending() {
        let (mut f, ev) = setup();
        program_entry(&mut f, 0, false);
        enable_msix(&mut f, false);
        assert!(pulse(&mut f, 0));
        assert!(take(&ev).is_empty());
        assert_eq!(bar_r32(&mut f, 0x3800), 1);
        w16(&mut f, 0x04, BUS_MASTER);
        assert_eq!(take(&ev).len(), 1);
        assert_eq!(bar_r32(&mut f, 0x3800), 0);
    }

    #[test]
    fn msix_table_reads_back_and_resets_masked() {
        let (mut f, _) = setup();
        assert_eq!(bar_r32(&mut f, 0x3000 + 12), 1);
        bar_w32(&mut f, 0x3000, 0xfee0_0003);
        bar_w32(&mut f, 0x3000 + 12, 0xffff_ffff);
        assert_eq!(bar_r32(&mut f, 0x3000), 0xfee0_0000);
        assert_eq!(bar_r32(&mut f, 0x3000 + 12), 1);
        let mut q = [0u8; 8];
        f.bar_read(0, 0x3000, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
    }

    #[test]
    fn msix_ranges_are_not_forwarded_others_are() {
        let (mut f, _) = setup();
        bar_w32(&mut f, 0x3000, 1);
        bar_r32(&mut f, 0x3000 + 16 * 7 + 12);
        bar_r32(&mut f, 0x3800);
        // Straddling the table start is still ours.
        let mut b = [0; 8];
        f.bar_read(0, 0x2ffc, &mut b);
        assert!(f.controller().accesses.is_empty());
        assert_eq!(b[..4], [0, 0, 0, 0]);
        bar_w32(&mut f, 0x40, 7);
        assert_eq!(bar_r32(&mut f, 0x3080), 0xa5a5_a5a5);
        let mut io = [0; 2];
        f.bar_read(2, 0x10, &mut io);
        assert_eq!(
            f.controller().accesses,
            vec![
                (true, 0, 0x40, vec![7, 0, 0, 0]),
                (false, 0, 0x3080, vec![0xa5; 4]),
                (false, 2, 0x10, vec![0xa5; 2]),
            ]
        );
    }

    #[test]
    fn reset_restores_power_on_config() {
        let (mut f, ev) = setup();
        let power_on = dump(&mut f);
        level(&mut f, 0, true);
        for off in (0..256u16).step_by(4) {
            w32(&mut f, off, 0xffff_ffff);
        }
        program_entry(&mut f, 0, false);
        take(&ev);
        f.reset();
        assert_eq!(dump(&mut f), power_on);
        assert_eq!(f.controller().resets, 1);
        assert_eq!(f.controller().bus_master, vec![true, false]);
        assert_eq!(bar_r32(&mut f, 0x3000), 0);
        assert_eq!(bar_r32(&mut f, 0x3000 + 12), 1);
        assert!(!f.intx_level());
        // Level was asserted but MSI was enabled by the all-ones write, so the
        // pin was already low: nothing to tell.
        assert!(take(&ev).is_empty());
    }

    #[test]
    fn reset_lowers_asserted_pin() {
        let (mut f, ev) = setup();
        level(&mut f, 0, true);
        take(&ev);
        f.reset();
        assert_eq!(take(&ev), vec![Event::Intx(false)]);
        assert_eq!(r16(&mut f, 0x06) & 0x08, 0);
    }

    #[test]
    fn odd_config_accesses_do_not_panic() {
        let (mut f, _) = setup();
        for off in [0u16, 1, 3, 0x3f, 0xfd, 0xff, 0x100, 0x101, 0xfff, 0xffff] {
            for len in 0..=8 {
                let mut b = vec![0x5a; len];
                f.config_read(off, &mut b);
                if off >= 0x100 {
                    assert!(b.iter().all(|x| *x == 0));
                }
                f.config_write(off, &vec![0xff; len]);
            }
        }
        // A dword straddling the end: three bytes past 0x100 read 0.
        let mut b = [0x5a; 4];
        f.config_read(0xfe, &mut b);
        assert_eq!(b[2..], [0, 0]);
        // Unaligned word write into COMMAND's upper byte.
        f.config_write(0x05, &[0xff]);
        assert_eq!(r16(&mut f, 0x04) & 0xff00, 0x0500);
    }

    #[test]
    fn odd_bar_accesses_do_not_panic() {
        let (mut f, _) = setup();
        for off in [
            0u64,
            0x2fff,
            0x3001,
            0x307f,
            0x37ff,
            0x3807,
            0xffff,
            u64::MAX - 2,
        ] {
            for len in 0..=8 {
                let mut b = vec![0; len];
                f.bar_read(0, off, &mut b);
                f.bar_write(0, off, &b);
            }
        }
        level(&mut f, u16::MAX, true);
        assert!(!f.intx_level());
    }

    #[test]
    fn invalid_layouts_are_dropped() {
        let bars = normalize_bars(&[
            BarInfo {
                index: 5,
                size: 0x1000,
                kind: BarKind::Memory64,
            },
            BarInfo {
                index: 0,
                size: 3000,
                kind: BarKind::Memory32,
            },
            BarInfo {
                index: 0,
                size: 16,
                kind: BarKind::Io,
            },
            BarInfo {
                index: 1,
                size: 1024,
                kind: BarKind::Io,
            },
        ]);
        assert_eq!(
            bars,
            vec![BarInfo {
                index: 0,
                size: 4096,
                kind: BarKind::Memory32
            }]
        );
        let m = MsixLayout {
            vectors: 8,
            bar: 0,
            table_offset: 0xff8,
            pba_offset: 0,
        };
        assert_eq!(normalize_msix(m, &bars), None);
    }
}
