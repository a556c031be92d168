//! Xen public ABI: structures, ioctl numbers and constants (to be filled).

/// Bytes per ioreq slot.
pub const IOREQ_SIZE: usize = 32;
/// Slots in the synchronous ioreq page (one per vCPU).
pub const IOREQ_SLOTS: usize = 4096 / IOREQ_SIZE;
/// `ioreq.addr`.
pub const IOREQ_OFF_ADDR: usize = 0;
/// `ioreq.data`.
pub const IOREQ_OFF_DATA: usize = 8;
/// `ioreq.count`.
pub const IOREQ_OFF_COUNT: usize = 16;
/// `ioreq.size`.
pub const IOREQ_OFF_SIZE: usize = 20;
/// `ioreq.vp_eport`.
pub const IOREQ_OFF_VP_EPORT: usize = 24;
/// The bitfield byte: `state:4, data_is_ptr:1, dir:1, df:1`.
pub const IOREQ_OFF_FLAGS: usize = 30;
/// `ioreq.type`.
pub const IOREQ_OFF_TYPE: usize = 31;
/// `state` bits of the flags byte.
pub const IOREQ_STATE_MASK: u8 = 0x0f;
/// `data_is_ptr` bit.
pub const IOREQ_FLAG_DATA_IS_PTR: u8 = 0x10;
/// `dir` bit: set for `IOREQ_READ`.
pub const IOREQ_FLAG_DIR_READ: u8 = 0x20;
/// `df` bit.
pub const IOREQ_FLAG_DF: u8 = 0x40;
/// `STATE_IOREQ_NONE`.
pub const STATE_IOREQ_NONE: u8 = 0;
/// `STATE_IOREQ_READY`.
pub const STATE_IOREQ_READY: u8 = 1;
/// `STATE_IOREQ_INPROCESS`.
pub const STATE_IOREQ_INPROCESS: u8 = 2;
/// `STATE_IORESP_READY`.
pub const STATE_IORESP_READY: u8 = 3;
/// `IOREQ_TYPE_PIO`.
pub const IOREQ_TYPE_PIO: u8 = 0;
/// `IOREQ_TYPE_COPY` (MMIO).
pub const IOREQ_TYPE_COPY: u8 = 1;
/// `IOREQ_TYPE_PCI_CONFIG`.
pub const IOREQ_TYPE_PCI_CONFIG: u8 = 2;
/// `IOREQ_TYPE_TIMEOFFSET`.
pub const IOREQ_TYPE_TIMEOFFSET: u8 = 7;
/// `IOREQ_TYPE_INVALIDATE`.
pub const IOREQ_TYPE_INVALIDATE: u8 = 8;
