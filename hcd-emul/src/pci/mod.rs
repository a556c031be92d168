//! The PCI function every controller is exposed as (PCI Local Bus 3.0,
//! PCI Express Base 4.0 chapter 7 for capabilities, PCI PM 1.2).
//!
//! A controller implements [`PciController`]: its identity, its BARs and
//! register accesses. [`PciFunction`] wraps it with a type-0 configuration
//! space (read-only, writable and write-1-to-clear bits), BAR sizing, the
//! capability list (MSI, MSI-X, power management) and interrupt routing: the
//! controller raises *vectors*; the function turns them into INTx levels,
//! MSI or MSI-X messages and hands those to the transport's
//! [`InterruptTransport`].

mod config;
mod function;

pub use function::{ExternalMsi, PciFunction};

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code: base class, sub-class, programming interface (24 bits).
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// Kind of a base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR (takes two BAR slots).
    Memory64,
    /// I/O port BAR.
    Io,
}

/// One BAR of the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index, 0-5.
    pub index: u8,
    /// Size in bytes, a power of two (at least 16 for I/O, 4096 for memory
    /// here).
    pub size: u64,
    /// Kind.
    pub kind: BarKind,
}

/// Where the MSI-X table and PBA live (inside one of the controller's BARs;
/// the function handles those ranges itself and never forwards them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Number of vectors (1-2048).
    pub vectors: u16,
    /// BAR holding table and PBA.
    pub bar: u8,
    /// Offset of the table in the BAR (8-byte aligned, 16 bytes a vector).
    pub table_offset: u32,
    /// Offset of the pending-bit array in the BAR (8-byte aligned).
    pub pba_offset: u32,
}

/// Answers a BAR read of `data.len()` bytes (1-8) at any `offset` from a
/// register file read 32 bits at a time (`read32(aligned offset)`): the one
/// or two dwords the access touches, shifted into place. Both controllers
/// decode their registers as dwords.
pub fn read_by_dwords(offset: u64, data: &mut [u8], mut read32: impl FnMut(u64) -> u32) {
    let aligned = offset & !3;
    let mut v = u64::from(read32(aligned));
    if data.len() == 8 || (offset & 3) + data.len() as u64 > 4 {
        v |= u64::from(read32(aligned + 4)) << 32;
    }
    let bytes = (v >> ((offset & 3) * 8)).to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&bytes[..n]);
}

/// How the controller raises interrupts. Provided by [`PciFunction`] to
/// every controller call.
pub trait IrqSink {
    /// An interrupt event on `vector` (xHCI: interrupter number). If the
    /// function is in MSI or MSI-X mode the event is delivered (or left
    /// pending while masked) as a message and this returns `true`: the
    /// controller then clears its own pending bit, as xHCI 1.2 §4.17.5 asks.
    /// In INTx mode it returns `false` and does nothing; the controller
    /// reports its level through [`IrqSink::set_level`].
    fn pulse(&mut self, vector: u16) -> bool;

    /// The level of `vector`'s interrupt condition, used for INTx (the pin
    /// is the OR of all vectors, gated by COMMAND.INTx-disable). Ignored for
    /// delivery while MSI or MSI-X is enabled, but remembered.
    fn set_level(&mut self, vector: u16, level: bool);
}

/// A message-signalled interrupt ready to be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// `true` for MSI-X, `false` for MSI.
    pub msix: bool,
    /// Vector index (MSI-X table entry, or MSI vector within the block).
    pub vector: u16,
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// What a transport provides to deliver interrupts. vfio-user signals an
/// eventfd per vector (the address/data are the client's business); Xen
/// injects the address/data pair or sets the INTx level of the slot.
pub trait InterruptTransport: Send + std::fmt::Debug {
    /// Sets the INTx (pin A) level.
    fn set_intx(&mut self, level: bool);
    /// Delivers one message.
    fn send_msi(&mut self, msg: MsiMessage);
}

/// A USB host controller as a PCI function sees it. No hypervisor here:
/// register accesses in, interrupts out through an [`IrqSink`].
pub trait PciController: Send + std::fmt::Debug {
    /// Vendor/device/class identity.
    fn identity(&self) -> PciIdentity;
    /// The BARs the controller decodes.
    fn bars(&self) -> Vec<BarInfo>;
    /// MSI-X table placement, if the controller supports MSI-X.
    fn msix(&self) -> Option<MsixLayout>;
    /// Number of MSI vectors the controller can use (1 = single message;
    /// 0 = no MSI capability, INTx only).
    fn msi_vectors(&self) -> u16 {
        1
    }
    /// Controller-specific configuration registers at 0x40..0x100 outside
    /// the capability list: `(offset, reset value, writable mask)` per byte
    /// (xHCI SBRN/FLADJ, UHCI USBLEGSUP, ...).
    fn vendor_config(&self) -> Vec<(u8, u8, u8)> {
        Vec::new()
    }
    /// The guest wrote configuration space bytes in 0x40..0x80, where the
    /// controller's registers from [`PciController::vendor_config`] live;
    /// `vendor` is that range (index 0 = offset 0x40), already updated by
    /// the writable masks, for registers with behaviour beyond a mask
    /// (EHCI's BIOS/OS ownership handoff).
    fn vendor_config_written(&mut self, _vendor: &mut [u8]) {}
    /// A read of `data.len()` bytes (1, 2, 4 or 8) at `offset` in `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8], irq: &mut dyn IrqSink);
    /// A write of `data.len()` bytes (1, 2, 4 or 8) at `offset` in `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8], irq: &mut dyn IrqSink);
    /// Function-level reset (power-on state).
    fn reset(&mut self, irq: &mut dyn IrqSink);
    /// Work that is not a register access: completions posted by devices
    /// from other threads, timers. Transports call this when woken.
    fn process(&mut self, irq: &mut dyn IrqSink);
    /// A new guest access begins: the work the controller may do for it
    /// (its per-access budget) starts afresh. [`PciFunction`] calls it
    /// before each register access, or once for a batch of them (one
    /// vfio-user message, one Xen rep ioreq: see
    /// [`PciFunction::one_access`]).
    ///
    /// [`PciFunction`]: crate::pci::PciFunction
    /// [`PciFunction::one_access`]: crate::pci::PciFunction::one_access
    fn new_access(&mut self) {}
    /// COMMAND.Bus Master Enable changed; while off the controller must not
    /// DMA.
    fn set_bus_master(&mut self, _enabled: bool) {}
    /// When [`PciController::process`] next has work: timed work
    /// (interrupt moderation, frame timers), or now when the work budget
    /// of the last access or wake-up left work undone.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        None
    }
    /// A one-line summary of the work done so far, for logs.
    fn summary(&self) -> String {
        String::new()
    }
}
