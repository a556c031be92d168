//! The real [`Hypervisor`] and [`EventChannels`]: Linux's Xen drivers
//! (`/dev/xen/privcmd`, `/dev/xen/evtchn`) driven by ioctls, in pure Rust.
//!
//! Errors of the hypervisor operations are the raw OS errors (`errno`
//! kept, so callers can match `ESRCH` or `ENOENT`); opening the devices
//! adds the path and a hint to the message.

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_int, c_ulong};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion};

use super::abi::*;
use super::hv::{EventChannels, ForeignMapping, Hypervisor, IoRange};

/// Where Linux puts the privcmd device.
pub const PRIVCMD_PATH: &str = "/dev/xen/privcmd";
/// Where Linux puts the event channel device.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// Opens a Xen device node read-write with `extra_flags` (`O_CLOEXEC` is
/// always set), naming the path and a likely cause on failure.
fn open_device(path: &Path, extra_flags: c_int, module: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | extra_flags)
        .open(path)
        .map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::NotFound => {
                    format!(" (is this dom0 with {module} loaded?)")
                }
                io::ErrorKind::PermissionDenied => " (needs root in dom0)".to_string(),
                _ => String::new(),
            };
            io::Error::new(e.kind(), format!("open {}: {e}{hint}", path.display()))
        })
}

/// `ioctl(fd, req, arg)`; `-1` becomes the OS error.
///
/// # Safety
///
/// `arg` must point to a live, properly initialised object of the type
/// `req` expects, and every pointer inside it must be valid for what the
/// driver does with it for the duration of the call.
unsafe fn ioctl<T>(fd: RawFd, req: c_ulong, arg: *mut T) -> io::Result<c_int> {
    // SAFETY: forwarded to the caller (see above).
    let rc = unsafe { libc::ioctl(fd, req as libc::Ioctl, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn mmap_error(e: MmapRegionError) -> io::Error {
    match e {
        MmapRegionError::Mmap(e) => e,
        e => io::Error::other(e.to_string()),
    }
}

fn io_range_type(kind: IoRange) -> u32 {
    match kind {
        IoRange::Port => XEN_DMOP_IO_RANGE_PORT,
        IoRange::Memory => XEN_DMOP_IO_RANGE_MEMORY,
        IoRange::Pci => XEN_DMOP_IO_RANGE_PCI,
    }
}

// The dm_op buffers, built apart from the ioctl so tests can check them.

fn op_io_range(map: bool, id: u16, kind: IoRange, start: u64, end: u64) -> XenDmOp {
    let op = if map {
        XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER
    } else {
        XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER
    };
    XenDmOp::new(
        op,
        XenDmOpIoreqServerRange {
            id,
            pad: 0,
            type_: io_range_type(kind),
            start,
            end,
        }
        .into(),
    )
}

fn op_set_state(id: u16, enabled: bool) -> XenDmOp {
    XenDmOp::new(
        XEN_DMOP_SET_IOREQ_SERVER_STATE,
        XenDmOpSetIoreqServerState {
            id,
            enabled: enabled.into(),
            pad: 0,
        }
        .into(),
    )
}

fn op_intx(bus: u8, dev: u8, intx: u8, level: bool) -> XenDmOp {
    XenDmOp::new(
        XEN_DMOP_SET_PCI_INTX_LEVEL,
        XenDmOpSetPciIntxLevel {
            domain: 0,
            bus,
            device: dev,
            intx,
            level: level.into(),
        }
        .into(),
    )
}

fn op_msi(addr: u64, data: u32) -> XenDmOp {
    XenDmOp::new(
        XEN_DMOP_INJECT_MSI,
        XenDmOpInjectMsi { data, pad: 0, addr }.into(),
    )
}

/// `/dev/xen/privcmd`, opened for one domain: device-model operations
/// (`IOCTL_PRIVCMD_DM_OP`) and foreign mappings.
///
/// Mappings share the descriptor (each [`MmapRegion`] holds a reference
/// through its [`FileOffset`]) and are unmapped when dropped.
#[derive(Debug)]
pub struct Privcmd {
    file: Arc<File>,
    domid: u16,
}

impl Privcmd {
    /// Opens [`PRIVCMD_PATH`] for domain `domid`.
    pub fn open(domid: u16) -> io::Result<Self> {
        Self::open_path(Path::new(PRIVCMD_PATH), domid)
    }

    /// Opens `path` as the privcmd device for domain `domid`.
    pub fn open_path(path: &Path, domid: u16) -> io::Result<Self> {
        let file = open_device(path, 0, "xen-privcmd")?;
        Ok(Privcmd {
            file: Arc::new(file),
            domid,
        })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// `HYPERVISOR_dm_op(domid, bufs)` with `op` as buffer 0 and, if not
    /// empty, `extra` as buffer 1. Xen writes results back into `op.u`.
    fn dm_op<T: Copy>(&self, op: &mut XenDmOp, extra: &mut [T]) -> io::Result<()> {
        let mut bufs = [
            PrivcmdDmOpBuf {
                uptr: (op as *mut XenDmOp).cast::<c_void>(),
                size: size_of::<XenDmOp>(),
            },
            PrivcmdDmOpBuf {
                uptr: extra.as_mut_ptr().cast::<c_void>(),
                size: std::mem::size_of_val(extra),
            },
        ];
        let mut arg = PrivcmdDmOp {
            dom: self.domid,
            num: if extra.is_empty() { 1 } else { 2 },
            ubufs: bufs.as_mut_ptr(),
        };
        // SAFETY: `arg` is a privcmd_dm_op whose `num` buffers point to
        // `op` and `extra`, both borrowed mutably (Xen may write them back)
        // and alive across the call; the sizes are theirs.
        unsafe { ioctl(self.fd(), IOCTL_PRIVCMD_DM_OP, &mut arg) }.map(drop)
    }

    /// A fresh shared privcmd mapping of `pages` pages, still empty: the
    /// caller populates it with an ioctl.
    fn map_pages(&self, pages: usize) -> io::Result<MmapRegion> {
        let size = pages
            .checked_mul(XEN_PAGE_SIZE)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        MmapRegion::build(
            Some(FileOffset::from_arc(Arc::clone(&self.file), 0)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(mmap_error)
    }
}

impl Hypervisor for Privcmd {
    fn domid(&self) -> u16 {
        self.domid
    }

    fn nr_vcpus(&self) -> io::Result<u32> {
        let mut op = XenDmOp::new(XEN_DMOP_NR_VCPUS, XenDmOpNrVcpus::default().into());
        self.dm_op::<u8>(&mut op, &mut [])?;
        // SAFETY: every member of the union is plain data and `op.u` was
        // fully initialised by `From`; Xen wrote the result in place.
        Ok(unsafe { op.u.nr_vcpus }.vcpus)
    }

    fn create_ioreq_server(&self) -> io::Result<u16> {
        let mut op = XenDmOp::new(
            XEN_DMOP_CREATE_IOREQ_SERVER,
            XenDmOpCreateIoreqServer {
                handle_bufioreq: HVM_IOREQSRV_BUFIOREQ_OFF,
                pad: [0; 3],
                id: 0,
            }
            .into(),
        );
        self.dm_op::<u8>(&mut op, &mut [])?;
        // SAFETY: as in `nr_vcpus`: plain data, fully initialised.
        Ok(unsafe { op.u.create_ioreq_server }.id)
    }

    fn map_ioreq_page(&self, id: u16) -> io::Result<MmapRegion> {
        let region = self.map_pages(1)?;
        let mut arg = PrivcmdMmapResource {
            dom: self.domid,
            type_: XENMEM_RESOURCE_IOREQ_SERVER,
            id: id.into(),
            idx: xenmem_resource_ioreq_server_frame_ioreq(0),
            num: 1,
            addr: region.as_ptr() as u64,
        };
        // SAFETY: `arg` is a privcmd_mmap_resource; `addr` is the start of
        // a privcmd mapping of exactly `num` pages that we own (`region`),
        // so the driver only replaces pages of our own mapping.
        unsafe { ioctl(self.fd(), IOCTL_PRIVCMD_MMAP_RESOURCE, &mut arg) }?;
        Ok(region)
    }

    fn set_ioreq_server_state(&self, id: u16, enabled: bool) -> io::Result<()> {
        self.dm_op::<u8>(&mut op_set_state(id, enabled), &mut [])
    }

    fn map_io_range(&self, id: u16, kind: IoRange, start: u64, end: u64) -> io::Result<()> {
        self.dm_op::<u8>(&mut op_io_range(true, id, kind, start, end), &mut [])
    }

    fn unmap_io_range(&self, id: u16, kind: IoRange, start: u64, end: u64) -> io::Result<()> {
        self.dm_op::<u8>(&mut op_io_range(false, id, kind, start, end), &mut [])
    }

    fn ioreq_server_alive(&self, id: u16) -> io::Result<()> {
        let mut op = XenDmOp::new(
            XEN_DMOP_GET_IOREQ_SERVER_INFO,
            XenDmOpGetIoreqServerInfo {
                id,
                flags: XEN_DMOP_NO_GFNS,
                ..Default::default()
            }
            .into(),
        );
        self.dm_op::<u8>(&mut op, &mut [])
    }

    fn destroy_ioreq_server(&self, id: u16) -> io::Result<()> {
        let mut op = XenDmOp::new(
            XEN_DMOP_DESTROY_IOREQ_SERVER,
            XenDmOpDestroyIoreqServer { id, pad: 0 }.into(),
        );
        self.dm_op::<u8>(&mut op, &mut [])
    }

    fn set_pci_intx_level(&self, bus: u8, dev: u8, intx: u8, level: bool) -> io::Result<()> {
        self.dm_op::<u8>(&mut op_intx(bus, dev, intx, level), &mut [])
    }

    fn inject_msi(&self, addr: u64, data: u32) -> io::Result<()> {
        self.dm_op::<u8>(&mut op_msi(addr, data), &mut [])
    }

    fn modified_memory(&self, first_pfn: u64, nr: u32) -> io::Result<()> {
        if nr == 0 {
            return Ok(());
        }
        let mut op = XenDmOp::new(
            XEN_DMOP_MODIFIED_MEMORY,
            XenDmOpModifiedMemory {
                nr_extents: 1,
                opaque: 0,
            }
            .into(),
        );
        let mut extent = [XenDmOpModifiedMemoryExtent {
            nr,
            pad: 0,
            first_pfn,
        }];
        self.dm_op(&mut op, &mut extent)
    }

    fn map_guest(&self, first_gfn: u64, count: usize) -> io::Result<ForeignMapping> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        if count == 0 {
            return Err(invalid("map_guest: no pages"));
        }
        let num = u32::try_from(count).map_err(|_| invalid("map_guest: too many pages"))?;
        let gfns = (0..u64::from(num))
            .map(|i| first_gfn.checked_add(i))
            .collect::<Option<Vec<XenPfn>>>()
            .ok_or_else(|| invalid("map_guest: gfn overflow"))?;
        let region = self.map_pages(count)?;
        let mut errors: Vec<c_int> = vec![0; count];
        let mut arg = PrivcmdMmapBatchV2 {
            num,
            dom: self.domid,
            addr: region.as_ptr() as u64,
            arr: gfns.as_ptr(),
            err: errors.as_mut_ptr(),
        };
        // SAFETY: `arg` is a privcmd_mmapbatch_v2; `addr` is the start of
        // a fresh privcmd mapping of exactly `num` pages that we own,
        // `arr` and `err` point to `num` elements each, alive across the
        // call.
        match unsafe { ioctl(self.fd(), IOCTL_PRIVCMD_MMAPBATCH_V2, &mut arg) } {
            Ok(_) => {}
            // Some pages are paged out: their errors say which.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        if errors.iter().all(|&e| e != 0) {
            let errno = errors[0]
                .checked_neg()
                .filter(|e| *e > 0)
                .unwrap_or(libc::EIO);
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(ForeignMapping { region, errors })
    }

    fn restrict(&self) -> io::Result<()> {
        let mut dom: DomId = self.domid;
        // SAFETY: IOCTL_PRIVCMD_RESTRICT reads one domid_t from `dom`.
        unsafe { ioctl(self.fd(), IOCTL_PRIVCMD_RESTRICT, &mut dom) }.map(drop)
    }
}

/// `/dev/xen/evtchn` (non-blocking), for channels to one domain. Ports
/// still bound are unbound on drop.
#[derive(Debug)]
pub struct Evtchn {
    file: File,
    domid: u16,
    bound: Vec<u32>,
}

impl Evtchn {
    /// Opens [`EVTCHN_PATH`] for channels to domain `domid`.
    pub fn open(domid: u16) -> io::Result<Self> {
        Self::open_path(Path::new(EVTCHN_PATH), domid)
    }

    /// Opens `path` as the event channel device for domain `domid`.
    pub fn open_path(path: &Path, domid: u16) -> io::Result<Self> {
        let file = open_device(path, libc::O_NONBLOCK, "xen-evtchn")?;
        Ok(Self::from_file(file, domid))
    }

    fn from_file(file: File, domid: u16) -> Self {
        Evtchn {
            file,
            domid,
            bound: Vec::new(),
        }
    }

    /// The local ports currently bound through this handle.
    pub fn bound_ports(&self) -> &[u32] {
        &self.bound
    }

    fn unbind_port(&self, port: u32) -> io::Result<()> {
        let mut arg = IoctlEvtchnUnbind { port };
        // SAFETY: IOCTL_EVTCHN_UNBIND reads one ioctl_evtchn_unbind.
        unsafe { ioctl(self.file.as_raw_fd(), IOCTL_EVTCHN_UNBIND, &mut arg) }.map(drop)
    }
}

impl EventChannels for Evtchn {
    fn bind_interdomain(&mut self, remote_port: u32) -> io::Result<u32> {
        let mut arg = IoctlEvtchnBindInterdomain {
            remote_domain: self.domid.into(),
            remote_port,
        };
        // SAFETY: IOCTL_EVTCHN_BIND_INTERDOMAIN reads one
        // ioctl_evtchn_bind_interdomain; it returns the local port.
        let port = unsafe {
            ioctl(
                self.file.as_raw_fd(),
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                &mut arg,
            )
        }?;
        let port = u32::try_from(port).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.bound.push(port);
        Ok(port)
    }

    fn unbind(&mut self, local_port: u32) -> io::Result<()> {
        self.unbind_port(local_port)?;
        self.bound.retain(|&p| p != local_port);
        Ok(())
    }

    fn notify(&self, local_port: u32) -> io::Result<()> {
        let mut arg = IoctlEvtchnNotify { port: local_port };
        // SAFETY: IOCTL_EVTCHN_NOTIFY reads one ioctl_evtchn_notify.
        unsafe { ioctl(self.file.as_raw_fd(), IOCTL_EVTCHN_NOTIFY, &mut arg) }.map(drop)
    }

    fn pending(&mut self) -> io::Result<Vec<u32>> {
        // The driver hands out whole u32 ports, at most a page per read;
        // read until EAGAIN so edge-triggered polling works too.
        let mut buf = [0u8; 1024];
        let mut ports = Vec::new();
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => ports.extend(
                    buf[..n - n % 4]
                        .chunks_exact(4)
                        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])),
                ),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(ports)
    }

    fn unmask(&mut self, local_port: u32) -> io::Result<()> {
        let n = self.file.write(&local_port.to_ne_bytes())?;
        if n != 4 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("evtchn unmask {local_port}: short write ({n} bytes)"),
            ));
        }
        Ok(())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn restrict(&mut self) -> io::Result<()> {
        let mut arg = IoctlEvtchnRestrictDomid { domid: self.domid };
        // SAFETY: IOCTL_EVTCHN_RESTRICT_DOMID reads one
        // ioctl_evtchn_restrict_domid.
        unsafe { ioctl(self.file.as_raw_fd(), IOCTL_EVTCHN_RESTRICT_DOMID, &mut arg) }.map(drop)
    }
}

impl Drop for Evtchn {
    fn drop(&mut self) {
        for port in std::mem::take(&mut self.bound) {
            if let Err(e) = self.unbind_port(port) {
                tracing::debug!("evtchn: unbind {port}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    fn raw(op: &XenDmOp) -> [u64; 3] {
        // SAFETY: the test ops are built through `From`, fully initialised
        // plain data.
        unsafe { op.u.raw }
    }

    #[test]
    fn open_missing_device_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("privcmd");
        let e = Privcmd::open_path(&path, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("open {}: ", path.display())),
            "{msg}"
        );
        assert!(
            msg.contains("is this dom0 with xen-privcmd loaded?"),
            "{msg}"
        );
        let e = Evtchn::open_path(&dir.path().join("evtchn"), 1).unwrap_err();
        assert!(e.to_string().contains("xen-evtchn"), "{e}");
    }

    #[test]
    fn ioctls_on_a_plain_file_fail_with_enotty() {
        // A regular file takes the whole path down to the ioctl, which
        // the kernel refuses: proves the errno comes back untouched.
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4 * 4096).unwrap();
        let p = Privcmd::open_path(f.path(), 3).unwrap();
        assert_eq!(p.domid(), 3);
        let enotty = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::ENOTTY);
        assert_eq!(p.nr_vcpus().unwrap_err().raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(
            p.create_ioreq_server().unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert!(enotty(p.set_ioreq_server_state(1, true)));
        assert!(enotty(p.map_io_range(1, IoRange::Pci, 0x28, 0x28)));
        assert!(enotty(p.unmap_io_range(1, IoRange::Port, 0xc000, 0xc01f)));
        assert!(enotty(p.destroy_ioreq_server(1)));
        assert!(enotty(p.set_pci_intx_level(0, 5, 0, true)));
        assert!(enotty(p.inject_msi(0xfee0_0000, 0x41)));
        assert!(enotty(p.modified_memory(0x100, 2)));
        assert!(p.modified_memory(0x100, 0).is_ok());
        assert!(enotty(p.restrict()));
        // The mmap of the file works; MMAP_RESOURCE / MMAPBATCH_V2 do not.
        assert_eq!(
            p.map_ioreq_page(1).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            p.map_guest(0x1000, 4).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            p.map_guest(0x1000, 0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            p.map_guest(u64::MAX, 2).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn dm_op_payloads() {
        let op = op_io_range(true, 0x0102, IoRange::Memory, 0xf000_0000, 0xf000_ffff);
        assert_eq!(op.op, 3);
        assert_eq!(
            raw(&op),
            [
                0x0000_0001_0000_0102,
                0x0000_0000_f000_0000,
                0x0000_0000_f000_ffff
            ]
        );
        let op = op_io_range(false, 1, IoRange::Pci, 0xf8, 0xf8);
        assert_eq!((op.op, raw(&op)[0]), (4, 0x0000_0002_0000_0001));
        assert_eq!(raw(&op_io_range(true, 1, IoRange::Port, 0, 0))[0] >> 32, 0);
        let op = op_set_state(7, true);
        assert_eq!((op.op, raw(&op)), (5, [0x0001_0007, 0, 0]));
        let op = op_intx(0, 0x1f, 3, true);
        assert_eq!((op.op, raw(&op)), (8, [0x0103_1f00_0000, 0, 0]));
        let op = op_msi(0xfee0_1000, 0x4041);
        assert_eq!((op.op, raw(&op)), (14, [0x4041, 0xfee0_1000, 0]));
    }

    #[test]
    fn evtchn_pending_and_unmask_over_a_socket() {
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut ev = Evtchn::from_file(File::from(OwnedFd::from(ours)), 5);
        assert!(ev.pending().unwrap().is_empty());
        // More than one read's worth, to exercise the loop.
        let ports: Vec<u32> = (0..600).collect();
        let bytes: Vec<u8> = ports.iter().flat_map(|p| p.to_ne_bytes()).collect();
        (&peer).write_all(&bytes).unwrap();
        assert_eq!(ev.pending().unwrap(), ports);
        assert!(ev.pending().unwrap().is_empty());
        ev.unmask(0x1234_5678).unwrap();
        let mut got = [0u8; 4];
        (&peer).read_exact(&mut got).unwrap();
        assert_eq!(u32::from_ne_bytes(got), 0x1234_5678);
        // Binding needs the real device.
        assert_eq!(
            ev.bind_interdomain(3).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert!(ev.bound_ports().is_empty());
        assert!(ev.as_raw_fd() >= 0);
    }
}
