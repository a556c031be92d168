//! What the ioreq server needs from Xen, as a trait: the real privcmd /
//! evtchn implementation is [`super::sys`]; the protocol tests use an
//! in-process simulation (`fake`).
//!
//! Shared pages (the ioreq page, guest memory) are handed out as vm-memory
//! [`MmapRegion`]s: the protocol code reads and writes them through
//! vm-memory's volatile and atomic accessors and never holds a raw pointer.

use std::io;
use std::os::fd::RawFd;

use vm_memory::MmapRegion;

/// Kinds of range an ioreq server can claim (`XEN_DMOP_IO_RANGE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoRange {
    /// I/O ports `start..=end`.
    Port,
    /// Guest-physical MMIO `start..=end`.
    Memory,
    /// One PCI function; `start == end ==` [`Sbdf::range_value`].
    Pci,
}

/// A PCI address (segment 0 only on x86 HVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sbdf {
    /// PCI segment.
    pub seg: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..=31).
    pub dev: u8,
    /// Function (0..=7).
    pub func: u8,
}

impl Sbdf {
    /// The value `XEN_DMOP_map_io_range_to_ioreq_server` takes for a PCI
    /// range (`XEN_DMOP_PCI_SBDF`).
    pub fn range_value(self) -> u64 {
        (u64::from(self.seg) << 16)
            | (u64::from(self.bus) << 8)
            | (u64::from(self.dev & 0x1f) << 3)
            | u64::from(self.func & 7)
    }
}

/// Guest pages mapped into our address space.
#[derive(Debug)]
pub struct ForeignMapping {
    /// The mapping: page `i` of the request is at offset `i * 4096`.
    pub region: MmapRegion,
    /// Per page: 0 if mapped, otherwise the negative errno Xen returned
    /// (`-ENOENT`: paged out, retry later). Pages with an error must not
    /// be touched.
    pub errors: Vec<i32>,
}

/// privcmd: device-model operations and foreign mappings for one domain.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// The domain served.
    fn domid(&self) -> u16;
    /// `XEN_DMOP_nr_vcpus`. Fails with `ESRCH` once the domain is gone.
    fn nr_vcpus(&self) -> io::Result<u32>;
    /// `XEN_DMOP_create_ioreq_server` without a buffered ring; the server id.
    fn create_ioreq_server(&self) -> io::Result<u16>;
    /// Maps the synchronous ioreq page of server `id` (resource
    /// `XENMEM_resource_ioreq_server`, frame 1).
    fn map_ioreq_page(&self, id: u16) -> io::Result<MmapRegion>;
    /// `XEN_DMOP_set_ioreq_server_state`.
    fn set_ioreq_server_state(&self, id: u16, enabled: bool) -> io::Result<()>;
    /// `XEN_DMOP_map_io_range_to_ioreq_server` (`end` inclusive).
    fn map_io_range(&self, id: u16, kind: IoRange, start: u64, end: u64) -> io::Result<()>;
    /// `XEN_DMOP_unmap_io_range_from_ioreq_server` (`end` inclusive).
    fn unmap_io_range(&self, id: u16, kind: IoRange, start: u64, end: u64) -> io::Result<()>;
    /// `XEN_DMOP_get_ioreq_server_info` (without gfns) on server `id`:
    /// fails once Xen has destroyed the server, which it does as soon as
    /// the domain starts dying — even while our own mappings still keep
    /// its memory, and so the domain, from being freed.
    fn ioreq_server_alive(&self, id: u16) -> io::Result<()>;
    /// `XEN_DMOP_destroy_ioreq_server`.
    fn destroy_ioreq_server(&self, id: u16) -> io::Result<()>;
    /// `XEN_DMOP_set_pci_intx_level` (segment 0).
    fn set_pci_intx_level(&self, bus: u8, dev: u8, intx: u8, level: bool) -> io::Result<()>;
    /// `XEN_DMOP_inject_msi` with the guest-programmed address and data.
    fn inject_msi(&self, addr: u64, data: u32) -> io::Result<()>;
    /// `XEN_DMOP_modified_memory` for `nr` pages from `first_pfn`.
    fn modified_memory(&self, first_pfn: u64, nr: u32) -> io::Result<()>;
    /// Maps `count` guest frames from `first_gfn`, read-write
    /// (`IOCTL_PRIVCMD_MMAPBATCH_V2`). Per-page failures are reported in
    /// [`ForeignMapping::errors`]; `Err` only if nothing could be mapped.
    fn map_guest(&self, first_gfn: u64, count: usize) -> io::Result<ForeignMapping>;
    /// `IOCTL_PRIVCMD_RESTRICT` to [`Hypervisor::domid`]: afterwards only
    /// this domain can be operated on.
    fn restrict(&self) -> io::Result<()>;
}

/// `/dev/xen/evtchn`: the per-vCPU notification channels.
pub trait EventChannels: Send + std::fmt::Debug {
    /// Binds to `remote_port` of the served domain; the local port.
    fn bind_interdomain(&mut self, remote_port: u32) -> io::Result<u32>;
    /// Unbinds a local port.
    fn unbind(&mut self, local_port: u32) -> io::Result<()>;
    /// Notifies the remote end of `local_port`.
    fn notify(&self, local_port: u32) -> io::Result<()>;
    /// The local ports that fired since the last call (non-blocking; empty
    /// if none). Each stays masked until [`EventChannels::unmask`].
    fn pending(&mut self) -> io::Result<Vec<u32>>;
    /// Unmasks `local_port`.
    fn unmask(&mut self, local_port: u32) -> io::Result<()>;
    /// A descriptor that polls readable while ports are pending.
    fn as_raw_fd(&self) -> RawFd;
    /// `IOCTL_EVTCHN_RESTRICT_DOMID` to the served domain.
    fn restrict(&mut self) -> io::Result<()>;
}
