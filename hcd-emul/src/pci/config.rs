//! Type-0 configuration space as data (PCI Local Bus 3.0 §6.1-6.2, §6.7
//! capability list; PCI Bus Power Management Interface 1.2 §3.2; MSI and
//! MSI-X capabilities per PCI Local Bus 3.0 §6.8 / PCI Express Base 4.0
//! §7.7).
//!
//! The 256 bytes are kept with a per-byte writable mask and a per-byte
//! write-1-to-clear mask; a write stores `(old & !wmask) | (val & wmask)` and
//! then clears `val & w1c`. The few registers with behaviour beyond masks
//! (PMCSR PowerState ignoring D1/D2, the Interrupt Status bit) are handled by
//! name. There is no extended (PCI Express) space: offsets 0x100..0x1000 read
//! 0 and ignore writes.
//!
//! Layout: vendor registers of the controller at 0x40..0x7f, then the
//! capability list Power Management (0x80) -> MSI (0x90) -> MSI-X (0xb0,
//! only with an MSI-X table).

use super::{BarInfo, BarKind, MsixLayout, PciIdentity};

/// Size of the configuration space modelled (no extended space).
pub(super) const CONFIG_SIZE: usize = 256;
/// Size of the space a transport may address (PCI Express extended space).
const CONFIG_SPACE_LIMIT: usize = 4096;

// PCI Local Bus 3.0 §6.1, figure 6-1: type-0 header offsets.
const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
/// COMMAND register offset.
pub(super) const COMMAND: usize = 0x04;
/// STATUS register offset.
pub(super) const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;

/// Number of BAR slots in a type-0 header.
pub(super) const BAR_SLOTS: usize = 6;

// COMMAND bits, PCI Local Bus 3.0 §6.2.2.
/// COMMAND.I/O Space.
pub(super) const COMMAND_IO: u16 = 1 << 0;
/// COMMAND.Memory Space.
pub(super) const COMMAND_MEMORY: u16 = 1 << 1;
/// COMMAND.Bus Master.
pub(super) const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
/// COMMAND.Interrupt Disable.
pub(super) const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WMASK: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

// STATUS bits, PCI Local Bus 3.0 §6.2.3.
/// STATUS.Interrupt Status.
pub(super) const STATUS_INTERRUPT: u16 = 1 << 3;
/// STATUS.Capabilities List.
pub(super) const STATUS_CAP_LIST: u16 = 1 << 4;
/// Master Data Parity Error (8), Signaled Target Abort (11), Received Target
/// Abort (12), Received Master Abort (13), Signaled System Error (14),
/// Detected Parity Error (15): write-1-to-clear.
const STATUS_W1C: u16 = (1 << 8) | 0xf800;

// BAR low bits, PCI Local Bus 3.0 §6.2.5.1.
const BAR_IO_SPACE: u32 = 1 << 0;
const BAR_MEM_TYPE_64: u32 = 0b10 << 1;

// Capability IDs (PCI Code and ID Assignment 1.11 §2).
/// Power Management capability ID.
pub(super) const CAP_ID_PM: u8 = 0x01;
/// MSI capability ID.
pub(super) const CAP_ID_MSI: u8 = 0x05;
/// MSI-X capability ID.
pub(super) const CAP_ID_MSIX: u8 = 0x11;

/// Offset of the Power Management capability.
pub(super) const PM_CAP: usize = 0x80;
/// Offset of the MSI capability.
pub(super) const MSI_CAP: usize = 0x90;
/// Offset of the MSI-X capability.
pub(super) const MSIX_CAP: usize = 0xb0;
/// First byte past the capability area (vendor bytes there are refused).
const CAPS_END: usize = 0xc0;
/// First byte vendor registers may use.
const VENDOR_START: usize = 0x40;

// Power Management, PCI PM 1.2 §3.2.3-3.2.4.
const PM_PMC: usize = PM_CAP + 2;
const PM_PMCSR: usize = PM_CAP + 4;
/// PMC: version 3 (PCI PM 1.2), no PME, no D1/D2.
const PMC_VERSION_1_2: u16 = 0b011;
const PMCSR_POWER_STATE: u16 = 0b11;
const PMCSR_NO_SOFT_RESET: u16 = 1 << 3;
const PMCSR_PME_STATUS: u16 = 1 << 15;

// MSI, PCI Local Bus 3.0 §6.8.1 (64-bit address, no per-vector masking).
const MSI_CONTROL: usize = MSI_CAP + 2;
const MSI_ADDRESS_LO: usize = MSI_CAP + 4;
const MSI_ADDRESS_HI: usize = MSI_CAP + 8;
const MSI_DATA: usize = MSI_CAP + 12;
const MSI_CONTROL_ENABLE: u16 = 1 << 0;
const MSI_CONTROL_MMC_SHIFT: u16 = 1;
const MSI_CONTROL_MME_SHIFT: u16 = 4;
const MSI_CONTROL_MME: u16 = 0b111 << MSI_CONTROL_MME_SHIFT;
const MSI_CONTROL_64BIT: u16 = 1 << 7;
/// Largest MSI block: 32 messages (MMC = 5).
const MSI_MAX_LOG2: u8 = 5;

// MSI-X, PCI Local Bus 3.0 §6.8.2.
const MSIX_CONTROL: usize = MSIX_CAP + 2;
const MSIX_TABLE: usize = MSIX_CAP + 4;
const MSIX_PBA: usize = MSIX_CAP + 8;
const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_CONTROL_ENABLE: u16 = 1 << 15;

/// The configuration space of one function.
#[derive(Debug, Clone)]
pub(super) struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    w1c: [u8; CONFIG_SIZE],
    /// BAR of each slot (the upper slot of a 64-bit BAR is `None`).
    bars: [Option<BarInfo>; BAR_SLOTS],
    has_msix: bool,
}

impl ConfigSpace {
    /// Builds the power-on configuration space. `bars` and `msix` must have
    /// been validated (see `function::normalize_bars`); `vendor` bytes that
    /// fall outside 0x40..0x100 or on the capability list are ignored.
    pub(super) fn new(
        identity: &PciIdentity,
        bars: &[BarInfo],
        msix: Option<&MsixLayout>,
        msi_vectors: u16,
        vendor: &[(u8, u8, u8)],
    ) -> Self {
        let mut cs = Self {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            w1c: [0; CONFIG_SIZE],
            bars: [None; BAR_SLOTS],
            has_msix: msix.is_some(),
        };

        // Header.
        cs.init_u16(VENDOR_ID, identity.vendor_id, 0, 0);
        cs.init_u16(DEVICE_ID, identity.device_id, 0, 0);
        cs.init_u16(COMMAND, 0, COMMAND_WMASK, 0);
        cs.init_u16(STATUS, STATUS_CAP_LIST, 0, STATUS_W1C);
        cs.init_u8(REVISION_ID, identity.revision, 0, 0);
        let class = identity.class_code.to_le_bytes();
        for (i, b) in class.iter().take(3).enumerate() {
            cs.init_u8(CLASS_CODE + i, *b, 0, 0);
        }
        cs.init_u8(CACHE_LINE_SIZE, 0, 0xff, 0);
        cs.init_u8(LATENCY_TIMER, 0, 0xff, 0);
        cs.init_u8(HEADER_TYPE, 0, 0, 0);
        cs.init_u16(SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id, 0, 0);
        cs.init_u16(SUBSYSTEM_ID, identity.subsystem_id, 0, 0);
        cs.init_u8(CAPABILITIES_POINTER, cap_offset(PM_CAP), 0, 0);
        cs.init_u8(INTERRUPT_LINE, 0, 0xff, 0);
        cs.init_u8(INTERRUPT_PIN, 1, 0, 0);

        // BARs, PCI Local Bus 3.0 §6.2.5.1: the address bits below the size
        // read back 0, which is how software sizes the BAR.
        for bar in bars {
            let slot = usize::from(bar.index);
            let off = BAR0 + 4 * slot;
            let addr_mask = !(bar.size.wrapping_sub(1));
            // Truncation intended: the low and high dwords of the mask.
            let lo_mask = (addr_mask & 0xffff_ffff) as u32;
            let hi_mask = (addr_mask >> 32) as u32;
            match bar.kind {
                BarKind::Memory32 => cs.init_u32(off, 0, lo_mask & !0xf, 0),
                BarKind::Memory64 => {
                    cs.init_u32(off, BAR_MEM_TYPE_64, lo_mask & !0xf, 0);
                    cs.init_u32(off + 4, 0, hi_mask, 0);
                }
                BarKind::Io => cs.init_u32(off, BAR_IO_SPACE, lo_mask & !0x3, 0),
            }
            if let Some(s) = cs.bars.get_mut(slot) {
                *s = Some(*bar);
            }
        }

        // Power Management: PM -> MSI.
        cs.init_u8(PM_CAP, CAP_ID_PM, 0, 0);
        let pm_next = if msi_vectors > 0 {
            cap_offset(MSI_CAP)
        } else if msix.is_some() {
            cap_offset(MSIX_CAP)
        } else {
            0
        };
        cs.init_u8(PM_CAP + 1, pm_next, 0, 0);
        cs.init_u16(PM_PMC, PMC_VERSION_1_2, 0, 0);
        cs.init_u16(
            PM_PMCSR,
            PMCSR_NO_SOFT_RESET,
            PMCSR_POWER_STATE,
            PMCSR_PME_STATUS,
        );

        // MSI: MSI -> MSI-X or end; none at all for a controller without
        // MSI (UHCI): the bytes stay 0 and read-only.
        if msi_vectors > 0 {
            cs.init_msi(msi_vectors, msix.is_some());
        }

        // MSI-X: last.
        if let Some(m) = msix {
            cs.init_u8(MSIX_CAP, CAP_ID_MSIX, 0, 0);
            cs.init_u8(MSIX_CAP + 1, 0, 0, 0);
            let table_size = m.vectors.saturating_sub(1) & 0x7ff;
            cs.init_u16(
                MSIX_CONTROL,
                table_size,
                MSIX_CONTROL_FUNCTION_MASK | MSIX_CONTROL_ENABLE,
                0,
            );
            let bir = u32::from(m.bar & 0x7);
            cs.init_u32(MSIX_TABLE, (m.table_offset & !0x7) | bir, 0, 0);
            cs.init_u32(MSIX_PBA, (m.pba_offset & !0x7) | bir, 0, 0);
        }

        // Controller registers, away from the header and the capabilities.
        for &(off, value, wmask) in vendor {
            let off = usize::from(off);
            if (VENDOR_START..PM_CAP).contains(&off) || off >= CAPS_END {
                cs.init_u8(off, value, wmask, 0);
            } else {
                // Set-up only, never guest-triggered: not rate-limited.
                tracing::event!(
                    target: "pci::config",
                    tracing::Level::WARN,
                    "vendor config byte at {off:#x} collides with the header or capabilities; ignored"
                );
            }
        }
        cs
    }

    /// The MSI capability (64-bit, `vectors` rounded down to a power of
    /// two), followed by MSI-X if `then_msix`.
    fn init_msi(&mut self, msi_vectors: u16, then_msix: bool) {
        let mmc = msi_log2(msi_vectors);
        self.init_u8(MSI_CAP, CAP_ID_MSI, 0, 0);
        let next = if then_msix { cap_offset(MSIX_CAP) } else { 0 };
        self.init_u8(MSI_CAP + 1, next, 0, 0);
        self.init_u16(
            MSI_CONTROL,
            MSI_CONTROL_64BIT | (u16::from(mmc) << MSI_CONTROL_MMC_SHIFT),
            MSI_CONTROL_ENABLE | MSI_CONTROL_MME,
            0,
        );
        self.init_u32(MSI_ADDRESS_LO, 0, !0x3, 0);
        self.init_u32(MSI_ADDRESS_HI, 0, !0, 0);
        self.init_u16(MSI_DATA, 0, !0, 0);
    }

    /// A configuration read of `data.len()` bytes at `offset`. Bytes past
    /// 0x100 read 0 (no extended space).
    pub(super) fn read(&self, offset: u16, data: &mut [u8]) {
        let start = usize::from(offset);
        for (i, d) in data.iter_mut().enumerate() {
            *d = start
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The controller's register bytes 0x40..0x80 (see
    /// `PciController::vendor_config_written`).
    pub(super) fn vendor_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[VENDOR_START..PM_CAP]
    }

    /// A configuration write of `data.len()` bytes at `offset`; bytes past
    /// 0x100 are ignored. Applies the masks, then the register rules.
    pub(super) fn write(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        if start >= CONFIG_SPACE_LIMIT {
            return;
        }
        let old_pmcsr = self.u16_at(PM_PMCSR);
        for (i, &val) in data.iter().enumerate() {
            let Some(o) = start.checked_add(i) else {
                break;
            };
            let (Some(b), Some(&wm), Some(&w1c)) =
                (self.bytes.get_mut(o), self.wmask.get(o), self.w1c.get(o))
            else {
                break;
            };
            let new = (*b & !wm) | (val & wm);
            *b = new & !(val & w1c);
        }
        // PCI PM 1.2 §3.2.4: D1/D2 are not supported (PMC says so); a write
        // of an unsupported state is ignored and the state stays as it was.
        let pmcsr = self.u16_at(PM_PMCSR);
        if matches!(pmcsr & PMCSR_POWER_STATE, 1 | 2) {
            let fixed = (pmcsr & !PMCSR_POWER_STATE) | (old_pmcsr & PMCSR_POWER_STATE);
            self.set_u16(PM_PMCSR, fixed);
        }
    }

    /// The COMMAND register.
    pub(super) fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Sets or clears STATUS.Interrupt Status (a read-only bit the function
    /// computes).
    pub(super) fn set_interrupt_status(&mut self, on: bool) {
        let status = self.u16_at(STATUS);
        let status = if on {
            status | STATUS_INTERRUPT
        } else {
            status & !STATUS_INTERRUPT
        };
        self.set_u16(STATUS, status);
    }

    /// PMCSR.PowerState (0 = D0, 3 = D3hot).
    pub(super) fn power_state(&self) -> u8 {
        // Two bits: the truncation is exact.
        (self.u16_at(PM_PMCSR) & PMCSR_POWER_STATE) as u8
    }

    /// MSI Message Control.Enable.
    pub(super) fn msi_enabled(&self) -> bool {
        self.u16_at(MSI_CONTROL) & MSI_CONTROL_ENABLE != 0
    }

    /// Number of MSI messages enabled: `2^min(MME, MMC)`.
    pub(super) fn msi_enabled_vectors(&self) -> u16 {
        let ctrl = self.u16_at(MSI_CONTROL);
        let mmc = (ctrl >> MSI_CONTROL_MMC_SHIFT) & 0b111;
        let mme = (ctrl & MSI_CONTROL_MME) >> MSI_CONTROL_MME_SHIFT;
        1 << mme.min(mmc).min(u16::from(MSI_MAX_LOG2))
    }

    /// The MSI message address (64-bit capable).
    pub(super) fn msi_address(&self) -> u64 {
        u64::from(self.u32_at(MSI_ADDRESS_LO)) | (u64::from(self.u32_at(MSI_ADDRESS_HI)) << 32)
    }

    /// The MSI message data (16 bits).
    pub(super) fn msi_data(&self) -> u16 {
        self.u16_at(MSI_DATA)
    }

    /// MSI-X Message Control.Enable.
    pub(super) fn msix_enabled(&self) -> bool {
        self.has_msix && self.u16_at(MSIX_CONTROL) & MSIX_CONTROL_ENABLE != 0
    }

    /// MSI-X Message Control.Function Mask.
    pub(super) fn msix_function_masked(&self) -> bool {
        self.has_msix && self.u16_at(MSIX_CONTROL) & MSIX_CONTROL_FUNCTION_MASK != 0
    }

    /// The address programmed into the BAR at `index`, or `None` if no BAR
    /// starts at that slot.
    pub(super) fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let off = BAR0 + 4 * index;
        let lo = u64::from(self.u32_at(off));
        Some(match bar.kind {
            BarKind::Memory32 => lo & !0xf,
            BarKind::Memory64 => (lo & !0xf) | (u64::from(self.u32_at(off + 4)) << 32),
            BarKind::Io => lo & !0x3,
        })
    }

    fn init_u8(&mut self, off: usize, value: u8, wmask: u8, w1c: u8) {
        if let (Some(b), Some(w), Some(c)) = (
            self.bytes.get_mut(off),
            self.wmask.get_mut(off),
            self.w1c.get_mut(off),
        ) {
            *b = value;
            *w = wmask;
            *c = w1c;
        }
    }

    fn init_u16(&mut self, off: usize, value: u16, wmask: u16, w1c: u16) {
        let (v, w, c) = (value.to_le_bytes(), wmask.to_le_bytes(), w1c.to_le_bytes());
        for i in 0..2 {
            self.init_u8(off + i, v[i], w[i], c[i]);
        }
    }

    fn init_u32(&mut self, off: usize, value: u32, wmask: u32, w1c: u32) {
        let (v, w, c) = (value.to_le_bytes(), wmask.to_le_bytes(), w1c.to_le_bytes());
        for i in 0..4 {
            self.init_u8(off + i, v[i], w[i], c[i]);
        }
    }

    fn u16_at(&self, off: usize) -> u16 {
        let mut b = [0; 2];
        for (i, d) in b.iter_mut().enumerate() {
            *d = self.bytes.get(off + i).copied().unwrap_or(0);
        }
        u16::from_le_bytes(b)
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0; 4];
        for (i, d) in b.iter_mut().enumerate() {
            *d = self.bytes.get(off + i).copied().unwrap_or(0);
        }
        u32::from_le_bytes(b)
    }

    fn set_u16(&mut self, off: usize, value: u16) {
        for (i, v) in value.to_le_bytes().into_iter().enumerate() {
            if let Some(b) = self.bytes.get_mut(off + i) {
                *b = v;
            }
        }
    }
}

/// `log2` of the MSI block size: the largest power of two not above
/// `vectors`, at most 32 messages.
pub(super) fn msi_log2(vectors: u16) -> u8 {
    let v = vectors.clamp(1, 1 << MSI_MAX_LOG2);
    // `v` is in 1..=32, so ilog2 is in 0..=5.
    u8::try_from(v.ilog2()).unwrap_or(0)
}

/// A capability offset as the one-byte pointer the list stores.
fn cap_offset(off: usize) -> u8 {
    u8::try_from(off).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let id = PciIdentity {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class_code: 0x0c0330,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        };
        ConfigSpace::new(&id, &[], None, 1, &[])
    }

    fn status(cs: &ConfigSpace) -> u16 {
        let mut b = [0; 2];
        cs.read(STATUS as u16, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut cs = space();
        // Hardware-set error bits (the function never sets them itself).
        cs.set_u16(STATUS, STATUS_CAP_LIST | STATUS_W1C);
        cs.write(STATUS as u16, &(1u16 << 8 | 1 << 15).to_le_bytes());
        assert_eq!(status(&cs), STATUS_CAP_LIST | 0x7800);
        cs.write(STATUS as u16, &0u16.to_le_bytes());
        assert_eq!(status(&cs), STATUS_CAP_LIST | 0x7800);
        cs.write(STATUS as u16, &0xffffu16.to_le_bytes());
        assert_eq!(status(&cs), STATUS_CAP_LIST);
    }

    #[test]
    fn interrupt_status_is_read_only() {
        let mut cs = space();
        cs.write(STATUS as u16, &STATUS_INTERRUPT.to_le_bytes());
        assert_eq!(status(&cs), STATUS_CAP_LIST);
        cs.set_interrupt_status(true);
        cs.write(STATUS as u16, &0xffffu16.to_le_bytes());
        assert_eq!(status(&cs), STATUS_CAP_LIST | STATUS_INTERRUPT);
    }

    #[test]
    fn msi_is_last_capability_without_msix() {
        let cs = space();
        let mut b = [0; 2];
        cs.read(MSI_CAP as u16, &mut b);
        assert_eq!(b, [CAP_ID_MSI, 0]);
        let mut x = [0xff; 4];
        cs.read(MSIX_CAP as u16, &mut x);
        assert_eq!(x, [0; 4]);
    }

    #[test]
    fn msi_log2_rounds_down_and_caps() {
        assert_eq!(msi_log2(0), 0);
        assert_eq!(msi_log2(1), 0);
        assert_eq!(msi_log2(3), 1);
        assert_eq!(msi_log2(8), 3);
        assert_eq!(msi_log2(1000), 5);
    }
}
