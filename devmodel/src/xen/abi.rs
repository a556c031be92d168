//! Xen public ABI: the structures, ioctl numbers and constants the
//! ioreq server uses, transcribed from Xen 4.17's public headers
//! (`xen/hvm/dm_op.h`, `hvm/ioreq.h`, `hvm/hvm_op.h`, `memory.h`) and the
//! Linux driver interfaces (`xen/sys/privcmd.h`, `xen/sys/evtchn.h`).
//!
//! Layouts are those of x86_64 Linux (LP64); `tests/xen_abi.rs` compiles
//! a C program against Debian's `libxen-dev` headers and compares every
//! size, offset, constant and ioctl number listed here.

use std::ffi::c_void;
use std::fmt;
use std::os::raw::{c_int, c_ulong};

/// `domid_t`.
pub type DomId = u16;
/// `ioservid_t`: an ioreq server id.
pub type IoServId = u16;
/// `xen_pfn_t`: `unsigned long`, 64 bits on x86_64.
pub type XenPfn = u64;

/// `DOMID_INVALID`: what an unrestricted privcmd fd reports as its domain.
pub const DOMID_INVALID: DomId = 0x7ff4;
/// `XEN_PAGE_SIZE`: Xen's page size (also of every foreign mapping).
pub const XEN_PAGE_SIZE: usize = 4096;
/// `XEN_PAGE_SHIFT`.
pub const XEN_PAGE_SHIFT: u32 = 12;

// ---------------------------------------------------------------------------
// dm_op (xen/hvm/dm_op.h)

/// `XEN_DMOP_create_ioreq_server`.
pub const XEN_DMOP_CREATE_IOREQ_SERVER: u32 = 1;
/// `XEN_DMOP_get_ioreq_server_info` (not used: the page is mapped as a
/// resource).
pub const XEN_DMOP_GET_IOREQ_SERVER_INFO: u32 = 2;
/// `XEN_DMOP_map_io_range_to_ioreq_server`.
pub const XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER: u32 = 3;
/// `XEN_DMOP_unmap_io_range_from_ioreq_server`.
pub const XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER: u32 = 4;
/// `XEN_DMOP_set_ioreq_server_state`.
pub const XEN_DMOP_SET_IOREQ_SERVER_STATE: u32 = 5;
/// `XEN_DMOP_destroy_ioreq_server`.
pub const XEN_DMOP_DESTROY_IOREQ_SERVER: u32 = 6;
/// `XEN_DMOP_set_pci_intx_level`.
pub const XEN_DMOP_SET_PCI_INTX_LEVEL: u32 = 8;
/// `XEN_DMOP_set_isa_irq_level`.
pub const XEN_DMOP_SET_ISA_IRQ_LEVEL: u32 = 9;
/// `XEN_DMOP_modified_memory` (extents in buffer 1).
pub const XEN_DMOP_MODIFIED_MEMORY: u32 = 11;
/// `XEN_DMOP_inject_msi`.
pub const XEN_DMOP_INJECT_MSI: u32 = 14;
/// `XEN_DMOP_nr_vcpus`.
pub const XEN_DMOP_NR_VCPUS: u32 = 20;

/// `XEN_DMOP_IO_RANGE_PORT`: an I/O port range.
pub const XEN_DMOP_IO_RANGE_PORT: u32 = 0;
/// `XEN_DMOP_IO_RANGE_MEMORY`: a guest-physical MMIO range.
pub const XEN_DMOP_IO_RANGE_MEMORY: u32 = 1;
/// `XEN_DMOP_IO_RANGE_PCI`: a PCI segment/bus/device/function range.
pub const XEN_DMOP_IO_RANGE_PCI: u32 = 2;

/// `XEN_DMOP_PCI_SBDF(s, b, d, f)`: the range value of one PCI function.
pub const fn xen_dmop_pci_sbdf(seg: u16, bus: u8, dev: u8, func: u8) -> u64 {
    ((seg as u64) << 16) | ((bus as u64) << 8) | (((dev & 0x1f) as u64) << 3) | (func & 7) as u64
}

/// `HVM_IOREQSRV_BUFIOREQ_OFF` (xen/hvm/hvm_op.h): no buffered ioreq ring.
pub const HVM_IOREQSRV_BUFIOREQ_OFF: u8 = 0;

/// `struct xen_dm_op_create_ioreq_server`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpCreateIoreqServer {
    /// IN: one of `HVM_IOREQSRV_BUFIOREQ_*`.
    pub handle_bufioreq: u8,
    /// Padding.
    pub pad: [u8; 3],
    /// OUT: the server id.
    pub id: IoServId,
}

/// `struct xen_dm_op_ioreq_server_range` (map and unmap).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpIoreqServerRange {
    /// Server id.
    pub id: IoServId,
    /// Padding.
    pub pad: u16,
    /// `XEN_DMOP_IO_RANGE_*`.
    pub type_: u32,
    /// First address (inclusive).
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

/// `struct xen_dm_op_set_ioreq_server_state`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpSetIoreqServerState {
    /// Server id.
    pub id: IoServId,
    /// 1 to enable, 0 to disable.
    pub enabled: u8,
    /// Padding.
    pub pad: u8,
}

/// `struct xen_dm_op_destroy_ioreq_server`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpDestroyIoreqServer {
    /// Server id.
    pub id: IoServId,
    /// Padding.
    pub pad: u16,
}

/// `struct xen_dm_op_set_pci_intx_level`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpSetPciIntxLevel {
    /// PCI segment (0).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..=31).
    pub device: u8,
    /// INTx pin, 0 = INTA .. 3 = INTD.
    pub intx: u8,
    /// 0 deasserted, 1 asserted.
    pub level: u8,
}

/// `struct xen_dm_op_set_isa_irq_level`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpSetIsaIrqLevel {
    /// ISA IRQ (0..=15).
    pub isa_irq: u8,
    /// 0 deasserted, 1 asserted.
    pub level: u8,
}

/// `struct xen_dm_op_modified_memory`; the extents follow in buffer 1.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpModifiedMemory {
    /// IN: number of extents; OUT on error: index + 1 of the failing one.
    pub nr_extents: u32,
    /// Must be 0 (continuation state).
    pub opaque: u32,
}

/// `struct xen_dm_op_modified_memory_extent`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpModifiedMemoryExtent {
    /// Number of contiguous pages.
    pub nr: u32,
    /// Padding.
    pub pad: u32,
    /// First page frame.
    pub first_pfn: u64,
}

/// `struct xen_dm_op_inject_msi`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpInjectMsi {
    /// MSI data.
    pub data: u32,
    /// Padding (0).
    pub pad: u32,
    /// MSI address (0xfeexxxxx).
    pub addr: u64,
}

/// `XEN_DMOP_no_gfns`: `get_ioreq_server_info` without the legacy gfns.
pub const XEN_DMOP_NO_GFNS: u16 = 1;

/// `struct xen_dm_op_get_ioreq_server_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpGetIoreqServerInfo {
    /// IN: server id.
    pub id: IoServId,
    /// IN: `XEN_DMOP_no_gfns`.
    pub flags: u16,
    /// OUT: buffered ioreq event channel.
    pub bufioreq_port: u32,
    /// OUT: legacy ioreq page gfn.
    pub ioreq_gfn: u64,
    /// OUT: legacy buffered ioreq page gfn.
    pub bufioreq_gfn: u64,
}

/// `struct xen_dm_op_nr_vcpus`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpNrVcpus {
    /// OUT: number of vCPUs of the domain.
    pub vcpus: u32,
}

/// The union of `struct xen_dm_op`, reduced to the members we use plus
/// `raw`, which gives it the size (24) and alignment (8) of Xen's union.
///
/// Build it with `From<payload>` (or from `raw`), which zeroes the bytes
/// the payload does not cover: a union literal of a smaller member leaves
/// them uninitialised. Every member is plain data valid for any bit
/// pattern, so reading any member of a union built that way is sound.
#[repr(C)]
#[derive(Clone, Copy)]
pub union XenDmOpU {
    /// `create_ioreq_server`.
    pub create_ioreq_server: XenDmOpCreateIoreqServer,
    /// `map_io_range_to_ioreq_server` / `unmap_io_range_from_ioreq_server`.
    pub io_range: XenDmOpIoreqServerRange,
    /// `set_ioreq_server_state`.
    pub set_ioreq_server_state: XenDmOpSetIoreqServerState,
    /// `destroy_ioreq_server`.
    pub destroy_ioreq_server: XenDmOpDestroyIoreqServer,
    /// `set_pci_intx_level`.
    pub set_pci_intx_level: XenDmOpSetPciIntxLevel,
    /// `set_isa_irq_level`.
    pub set_isa_irq_level: XenDmOpSetIsaIrqLevel,
    /// `modified_memory`.
    pub modified_memory: XenDmOpModifiedMemory,
    /// `inject_msi`.
    pub inject_msi: XenDmOpInjectMsi,
    /// `nr_vcpus`.
    pub nr_vcpus: XenDmOpNrVcpus,
    /// `get_ioreq_server_info`.
    pub get_ioreq_server_info: XenDmOpGetIoreqServerInfo,
    /// The whole union as raw words (size of Xen's largest member).
    pub raw: [u64; 3],
}

impl Default for XenDmOpU {
    fn default() -> Self {
        XenDmOpU { raw: [0; 3] }
    }
}

impl fmt::Debug for XenDmOpU {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Which member is live is known only from the op number.
        f.debug_struct("XenDmOpU").finish_non_exhaustive()
    }
}

macro_rules! payload_into_union {
    ($($ty:ty => $field:ident),* $(,)?) => {$(
        impl From<$ty> for XenDmOpU {
            /// The union holding `v`, its other bytes zero.
            fn from(v: $ty) -> Self {
                let mut u = XenDmOpU::default();
                u.$field = v;
                u
            }
        }
    )*};
}

payload_into_union! {
    XenDmOpCreateIoreqServer => create_ioreq_server,
    XenDmOpIoreqServerRange => io_range,
    XenDmOpSetIoreqServerState => set_ioreq_server_state,
    XenDmOpDestroyIoreqServer => destroy_ioreq_server,
    XenDmOpSetPciIntxLevel => set_pci_intx_level,
    XenDmOpSetIsaIrqLevel => set_isa_irq_level,
    XenDmOpModifiedMemory => modified_memory,
    XenDmOpInjectMsi => inject_msi,
    XenDmOpNrVcpus => nr_vcpus,
    XenDmOpGetIoreqServerInfo => get_ioreq_server_info,
}

/// `struct xen_dm_op`: buffer 0 of every `HYPERVISOR_dm_op`. Xen copies
/// the 8-byte header plus the op's own payload in, and the payload back
/// out on success.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct XenDmOp {
    /// `XEN_DMOP_*`.
    pub op: u32,
    /// Must be 0.
    pub pad: u32,
    /// The op's payload.
    pub u: XenDmOpU,
}

impl XenDmOp {
    /// Op `op` with payload `u` (e.g. `payload.into()`).
    pub fn new(op: u32, u: XenDmOpU) -> Self {
        XenDmOp { op, pad: 0, u }
    }
}

// ---------------------------------------------------------------------------
// memory.h: XENMEM_acquire_resource, as used by IOCTL_PRIVCMD_MMAP_RESOURCE

/// `XENMEM_resource_ioreq_server`: resource type of an ioreq server's pages.
pub const XENMEM_RESOURCE_IOREQ_SERVER: u32 = 0;
/// `XENMEM_resource_ioreq_server_frame_bufioreq`: the buffered ring page.
pub const XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ: u32 = 0;
/// `XENMEM_resource_ioreq_server_frame_ioreq(n)`: synchronous ioreq page `n`.
pub const fn xenmem_resource_ioreq_server_frame_ioreq(n: u32) -> u32 {
    1 + n
}

// ---------------------------------------------------------------------------
// The synchronous ioreq page (xen/hvm/ioreq.h)

/// `IOREQ_READ` (`dir` = 1).
pub const IOREQ_READ: u8 = 1;
/// `IOREQ_WRITE` (`dir` = 0).
pub const IOREQ_WRITE: u8 = 0;

/// `STATE_IOREQ_NONE`: slot idle.
pub const STATE_IOREQ_NONE: u8 = 0;
/// `STATE_IOREQ_READY`: Xen posted a request.
pub const STATE_IOREQ_READY: u8 = 1;
/// `STATE_IOREQ_INPROCESS`: the device model took it.
pub const STATE_IOREQ_INPROCESS: u8 = 2;
/// `STATE_IORESP_READY`: the device model answered.
pub const STATE_IORESP_READY: u8 = 3;

/// `IOREQ_TYPE_PIO`: port I/O.
pub const IOREQ_TYPE_PIO: u8 = 0;
/// `IOREQ_TYPE_COPY`: MMIO.
pub const IOREQ_TYPE_COPY: u8 = 1;
/// `IOREQ_TYPE_PCI_CONFIG`: config space, `addr` = SBDF << 32 | register.
pub const IOREQ_TYPE_PCI_CONFIG: u8 = 2;
/// `IOREQ_TYPE_TIMEOFFSET`: RTC offset broadcast (buffered only).
pub const IOREQ_TYPE_TIMEOFFSET: u8 = 7;
/// `IOREQ_TYPE_INVALIDATE`: drop the guest-memory map cache.
pub const IOREQ_TYPE_INVALIDATE: u8 = 8;

/// `sizeof(struct ioreq)`: one slot per vCPU, slot index = vCPU id.
pub const IOREQ_SLOT_SIZE: usize = 32;
/// Slots in one ioreq page.
pub const IOREQ_SLOTS_PER_PAGE: usize = XEN_PAGE_SIZE / IOREQ_SLOT_SIZE;
/// Offset of `u64 addr` in a slot.
pub const IOREQ_OFF_ADDR: usize = 0;
/// Offset of `u64 data` in a slot.
pub const IOREQ_OFF_DATA: usize = 8;
/// Offset of `u32 count` in a slot.
pub const IOREQ_OFF_COUNT: usize = 16;
/// Offset of `u32 size` in a slot.
pub const IOREQ_OFF_SIZE: usize = 20;
/// Offset of `u32 vp_eport` in a slot.
pub const IOREQ_OFF_VP_EPORT: usize = 24;
/// Offset of the bitfield byte (`state:4, data_is_ptr:1, dir:1, df:1`).
pub const IOREQ_OFF_FLAGS: usize = 30;
/// Offset of `u8 type` in a slot.
pub const IOREQ_OFF_TYPE: usize = 31;

/// Mask of `state` in the flags byte.
pub const IOREQ_FLAG_STATE_MASK: u8 = 0x0f;
/// `data_is_ptr` in the flags byte.
pub const IOREQ_FLAG_DATA_IS_PTR: u8 = 0x10;
/// `dir` in the flags byte (set: read).
pub const IOREQ_FLAG_DIR_READ: u8 = 0x20;
/// `df` in the flags byte (set: addresses decrease).
pub const IOREQ_FLAG_DF: u8 = 0x40;

/// The decoded flags byte of an ioreq slot (offset [`IOREQ_OFF_FLAGS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoreqFlags {
    /// `STATE_*` (4 bits).
    pub state: u8,
    /// `data` is the guest-physical address of the data.
    pub data_is_ptr: bool,
    /// `dir == IOREQ_READ`.
    pub read: bool,
    /// Direction flag: item `i` is at `-i * size` instead of `+i * size`.
    pub df: bool,
}

impl IoreqFlags {
    /// Decodes a flags byte (the reserved top bit is ignored).
    pub const fn decode(byte: u8) -> Self {
        IoreqFlags {
            state: byte & IOREQ_FLAG_STATE_MASK,
            data_is_ptr: byte & IOREQ_FLAG_DATA_IS_PTR != 0,
            read: byte & IOREQ_FLAG_DIR_READ != 0,
            df: byte & IOREQ_FLAG_DF != 0,
        }
    }

    /// Encodes the flags (reserved bit 0, `state` truncated to 4 bits).
    pub const fn encode(self) -> u8 {
        let mut b = self.state & IOREQ_FLAG_STATE_MASK;
        if self.data_is_ptr {
            b |= IOREQ_FLAG_DATA_IS_PTR;
        }
        if self.read {
            b |= IOREQ_FLAG_DIR_READ;
        }
        if self.df {
            b |= IOREQ_FLAG_DF;
        }
        b
    }
}

/// `byte` with its `state` replaced by `state`, every other bit kept: what
/// the device model stores when it moves a slot to INPROCESS / IORESP_READY.
pub const fn ioreq_flags_with_state(byte: u8, state: u8) -> u8 {
    (byte & !IOREQ_FLAG_STATE_MASK) | (state & IOREQ_FLAG_STATE_MASK)
}

/// `struct ioreq`, for reference and the ABI test; the protocol code
/// accesses the shared page through the `IOREQ_OFF_*` offsets instead.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ioreq {
    /// Port, guest-physical address, or `sbdf << 32 | register`.
    pub addr: u64,
    /// Data, or its guest-physical address if `data_is_ptr`.
    pub data: u64,
    /// Repetitions.
    pub count: u32,
    /// Bytes per item.
    pub size: u32,
    /// Xen's event channel port for this vCPU.
    pub vp_eport: u32,
    /// Padding.
    pub pad0: u16,
    /// `state:4, data_is_ptr:1, dir:1, df:1, pad:1`, see [`IoreqFlags`].
    pub flags: u8,
    /// `IOREQ_TYPE_*`.
    pub type_: u8,
}

// ---------------------------------------------------------------------------
// Linux ioctls: _IOC(_IOC_NONE, type, nr, size), asm-generic layout (x86,
// arm64): size in bits 16..30, type in 8..16, nr in 0..8, direction 0.

const fn ioc_none(ty: u8, nr: u8, size: usize) -> c_ulong {
    ((size as c_ulong) << 16) | ((ty as c_ulong) << 8) | nr as c_ulong
}

/// `privcmd_dm_op_buf_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PrivcmdDmOpBuf {
    /// The buffer.
    pub uptr: *mut c_void,
    /// Its length in bytes (at most a page).
    pub size: usize,
}

/// `privcmd_dm_op_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PrivcmdDmOp {
    /// Target domain.
    pub dom: DomId,
    /// Number of buffers (at most 16).
    pub num: u16,
    /// The buffers; buffer 0 holds a [`XenDmOp`].
    pub ubufs: *const PrivcmdDmOpBuf,
}

/// `privcmd_mmap_resource_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrivcmdMmapResource {
    /// Target domain.
    pub dom: DomId,
    /// `XENMEM_resource_*`.
    pub type_: u32,
    /// Resource id (the ioreq server id).
    pub id: u32,
    /// First frame (1 = synchronous ioreq page 0).
    pub idx: u32,
    /// Number of frames.
    pub num: u64,
    /// Start of a privcmd mapping of `num` pages.
    pub addr: u64,
}

/// `privcmd_mmapbatch_v2_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PrivcmdMmapBatchV2 {
    /// Number of pages.
    pub num: u32,
    /// Target domain.
    pub dom: DomId,
    /// Start of a fresh privcmd mapping of exactly `num` pages.
    pub addr: u64,
    /// `num` guest frame numbers.
    pub arr: *const XenPfn,
    /// `num` ints: 0 or the page's negative errno.
    pub err: *mut c_int,
}

/// `IOCTL_PRIVCMD_MMAPBATCH_V2`.
pub const IOCTL_PRIVCMD_MMAPBATCH_V2: c_ulong =
    ioc_none(b'P', 4, std::mem::size_of::<PrivcmdMmapBatchV2>());
/// `IOCTL_PRIVCMD_DM_OP`.
pub const IOCTL_PRIVCMD_DM_OP: c_ulong = ioc_none(b'P', 5, std::mem::size_of::<PrivcmdDmOp>());
/// `IOCTL_PRIVCMD_RESTRICT` (argument: pointer to a [`DomId`]).
pub const IOCTL_PRIVCMD_RESTRICT: c_ulong = ioc_none(b'P', 6, std::mem::size_of::<DomId>());
/// `IOCTL_PRIVCMD_MMAP_RESOURCE`.
pub const IOCTL_PRIVCMD_MMAP_RESOURCE: c_ulong =
    ioc_none(b'P', 7, std::mem::size_of::<PrivcmdMmapResource>());

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnBindInterdomain {
    /// The other domain.
    pub remote_domain: u32,
    /// Its port.
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_unbind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnUnbind {
    /// Local port.
    pub port: u32,
}

/// `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnNotify {
    /// Local port.
    pub port: u32,
}

/// `struct ioctl_evtchn_restrict_domid`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnRestrictDomid {
    /// The only domain binds are allowed to afterwards.
    pub domid: DomId,
}

/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`; returns the local port.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: c_ulong =
    ioc_none(b'E', 1, std::mem::size_of::<IoctlEvtchnBindInterdomain>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: c_ulong =
    ioc_none(b'E', 3, std::mem::size_of::<IoctlEvtchnUnbind>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: c_ulong =
    ioc_none(b'E', 4, std::mem::size_of::<IoctlEvtchnNotify>());
/// `IOCTL_EVTCHN_RESTRICT_DOMID`.
pub const IOCTL_EVTCHN_RESTRICT_DOMID: c_ulong =
    ioc_none(b'E', 6, std::mem::size_of::<IoctlEvtchnRestrictDomid>());

// Layouts that do not depend on the pointer width, checked at build time
// (tests/xen_abi.rs checks all of them against the C headers).
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<XenDmOpU>() == 24 && align_of::<XenDmOpU>() == 8);
    assert!(size_of::<XenDmOp>() == 32 && offset_of!(XenDmOp, u) == 8);
    assert!(size_of::<XenDmOpCreateIoreqServer>() == 6);
    assert!(offset_of!(XenDmOpCreateIoreqServer, id) == 4);
    assert!(size_of::<XenDmOpIoreqServerRange>() == 24);
    assert!(size_of::<XenDmOpInjectMsi>() == 16);
    assert!(size_of::<XenDmOpModifiedMemoryExtent>() == 16);
    assert!(size_of::<Ioreq>() == IOREQ_SLOT_SIZE);
    assert!(offset_of!(Ioreq, addr) == IOREQ_OFF_ADDR);
    assert!(offset_of!(Ioreq, data) == IOREQ_OFF_DATA);
    assert!(offset_of!(Ioreq, count) == IOREQ_OFF_COUNT);
    assert!(offset_of!(Ioreq, size) == IOREQ_OFF_SIZE);
    assert!(offset_of!(Ioreq, vp_eport) == IOREQ_OFF_VP_EPORT);
    assert!(offset_of!(Ioreq, flags) == IOREQ_OFF_FLAGS);
    assert!(offset_of!(Ioreq, type_) == IOREQ_OFF_TYPE);
    assert!(size_of::<PrivcmdMmapResource>() == 32);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::hv::Sbdf;

    #[test]
    fn flags_roundtrip_every_byte() {
        for b in 0..=0x7fu8 {
            assert_eq!(IoreqFlags::decode(b).encode(), b, "byte {b:#x}");
        }
        // The reserved top bit is dropped by decode/encode...
        assert_eq!(IoreqFlags::decode(0xff).encode(), 0x7f);
        // ...but kept by the state update.
        assert_eq!(ioreq_flags_with_state(0xf1, STATE_IOREQ_INPROCESS), 0xf2);
    }

    #[test]
    fn flags_bits() {
        let f = IoreqFlags::decode(0x31);
        assert_eq!(
            f,
            IoreqFlags {
                state: STATE_IOREQ_READY,
                data_is_ptr: true,
                read: true,
                df: false,
            }
        );
        let f = IoreqFlags {
            state: STATE_IORESP_READY,
            df: true,
            ..Default::default()
        };
        assert_eq!(f.encode(), 0x43);
        assert_eq!(ioreq_flags_with_state(0x71, STATE_IORESP_READY), 0x73);
        assert_eq!(ioreq_flags_with_state(0x00, 0x1f), 0x0f);
    }

    #[test]
    fn sbdf_range_value() {
        let s = Sbdf {
            seg: 0,
            bus: 0,
            dev: 0x1f,
            func: 0,
        };
        assert_eq!(s.range_value(), 0xf8);
        let s = Sbdf {
            seg: 0x1234,
            bus: 0xab,
            dev: 0x0d,
            func: 5,
        };
        assert_eq!(s.range_value(), 0x1234_ab6d);
        assert_eq!(s.range_value(), xen_dmop_pci_sbdf(0x1234, 0xab, 0x0d, 5));
        // Out-of-range device and function bits are masked like the macro.
        let s = Sbdf {
            seg: 0,
            bus: 1,
            dev: 0x3f,
            func: 0xf,
        };
        assert_eq!(s.range_value(), 0x1ff);
        assert_eq!(s.range_value(), xen_dmop_pci_sbdf(0, 1, 0x3f, 0xf));
    }

    #[test]
    fn ioctl_numbers_x86_64() {
        // Computed by hand from _IOC(_IOC_NONE, ...); tests/xen_abi.rs
        // compares them with the C macros.
        assert_eq!(IOCTL_PRIVCMD_DM_OP, 0x0010_5005);
        assert_eq!(IOCTL_PRIVCMD_MMAP_RESOURCE, 0x0020_5007);
        assert_eq!(IOCTL_PRIVCMD_MMAPBATCH_V2, 0x0020_5004);
        assert_eq!(IOCTL_PRIVCMD_RESTRICT, 0x0002_5006);
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
        assert_eq!(IOCTL_EVTCHN_RESTRICT_DOMID, 0x0002_4506);
    }

    #[test]
    fn dm_op_payload_roundtrip() {
        let mut op = XenDmOp::new(
            XEN_DMOP_CREATE_IOREQ_SERVER,
            XenDmOpCreateIoreqServer {
                handle_bufioreq: HVM_IOREQSRV_BUFIOREQ_OFF,
                pad: [0; 3],
                id: 0xffff,
            }
            .into(),
        );
        // SAFETY: built through `From`, so every byte is initialised.
        assert_eq!(unsafe { op.u.raw }, [0xffff_0000_0000, 0, 0]);
        // What Xen does on return: write the id at payload offset 4.
        // SAFETY: `raw` covers the whole union and is plain data.
        let raw = unsafe { &mut op.u.raw };
        raw[0] = 7u64 << 32;
        // SAFETY: all members are plain data valid for any bit pattern.
        let id = unsafe { op.u.create_ioreq_server.id };
        assert_eq!(id, 7);
        assert!(format!("{op:?}").contains("op: 1"));
    }
}
