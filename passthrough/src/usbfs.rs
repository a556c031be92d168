//! Linux usbfs (`/dev/bus/usb/BBB/DDD`) through its ioctls
//! (`include/uapi/linux/usbdevice_fs.h`, `drivers/usb/core/devio.c`).
//!
//! Every `unsafe` block of the crate that talks to the kernel is here. The
//! asynchronous URB interface is what the backend needs: many URBs in
//! flight per endpoint (`SUBMITURB`), cancellation (`DISCARDURB`),
//! completion in the order the host controller finished them
//! (`REAPURBNDELAY`, with `poll` telling when one is ready), isochronous
//! packets with per-packet status, bulk continuation for transfers split
//! over several URBs. usbfs copies IN data to the URB's user buffer only
//! inside the `REAPURB` call, and OUT data from it inside `SUBMITURB`: a
//! buffer pointing into guest RAM is touched only during those two calls.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// URB types (`USBDEVFS_URB_TYPE_*`).
pub mod urb_type {
    /// Isochronous.
    pub const ISO: u8 = 0;
    /// Interrupt.
    pub const INTERRUPT: u8 = 1;
    /// Control (buffer starts with the 8-byte SETUP packet).
    pub const CONTROL: u8 = 2;
    /// Bulk.
    pub const BULK: u8 = 3;
}

/// URB flags (`USBDEVFS_URB_*`).
pub mod urb_flag {
    /// A short IN packet is an error (-EREMOTEIO).
    pub const SHORT_NOT_OK: u32 = 0x01;
    /// Isochronous: start as soon as possible.
    pub const ISO_ASAP: u32 = 0x02;
    /// Continues the previous bulk URB of the same transfer: cancelled by
    /// the kernel when an earlier URB of the transfer ends short or failed.
    pub const BULK_CONTINUATION: u32 = 0x04;
}

/// Most isochronous packets in one URB.
pub const MAX_ISO_PACKETS: usize = 128;

/// `struct usbdevfs_iso_packet_desc`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IsoPacketDesc {
    /// Requested length.
    pub length: u32,
    /// Bytes moved.
    pub actual_length: u32,
    /// 0 or a negative errno, as unsigned.
    pub status: u32,
}

/// `struct usbdevfs_urb` (pointers as `usize`: same size and alignment on
/// Linux, and the struct stays `Send`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RawUrb {
    /// `urb_type::*`.
    pub urb_type: u8,
    /// Endpoint address (direction bit included; 0 for control).
    pub endpoint: u8,
    /// Completion status: 0 or a negative errno.
    pub status: i32,
    /// `urb_flag::*`.
    pub flags: u32,
    /// User buffer.
    pub buffer: usize,
    /// Its length.
    pub buffer_length: i32,
    /// Bytes moved (for isochronous URBs the sum over packets).
    pub actual_length: i32,
    /// Isochronous start frame.
    pub start_frame: i32,
    /// Isochronous packets, or the bulk stream id.
    pub number_of_packets: i32,
    /// Isochronous packets that failed.
    pub error_count: i32,
    /// Signal on completion (0: none).
    pub signr: u32,
    /// Ours: a token identifying the URB.
    pub usercontext: usize,
}

/// A URB with room for its isochronous packet descriptors, which the
/// kernel expects right after the header (a flexible array member).
#[repr(C)]
#[derive(Debug, Clone)]
pub struct UrbBlock {
    /// The URB.
    pub urb: RawUrb,
    /// Isochronous packets (`urb.number_of_packets` of them are used).
    pub iso: [IsoPacketDesc; MAX_ISO_PACKETS],
}

impl Default for UrbBlock {
    fn default() -> Self {
        Self {
            urb: RawUrb::default(),
            iso: [IsoPacketDesc::default(); MAX_ISO_PACKETS],
        }
    }
}

const fn ioc(dir: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u32) << 16) | ((b'U' as u32) << 8) | nr) as libc::c_ulong
}
const NONE: u32 = 0;
const WRITE: u32 = 1;
const READ: u32 = 2;

#[repr(C)]
struct SetInterface {
    interface: u32,
    altsetting: u32,
}
#[repr(C)]
struct GetDriver {
    interface: u32,
    driver: [u8; 256],
}
#[repr(C)]
struct IoctlReq {
    ifno: i32,
    ioctl_code: i32,
    data: usize,
}
#[repr(C)]
struct DisconnectClaim {
    interface: u32,
    flags: u32,
    driver: [u8; 256],
}

/// `struct usbdevfs_streams` (8 bytes, then `num_eps` endpoint addresses:
/// a flexible array member; one endpoint at a time here).
#[repr(C)]
struct StreamsReq {
    num_streams: u32,
    num_eps: u32,
    eps: [u8; 1],
}
/// `sizeof(struct usbdevfs_streams)`: the header alone.
const STREAMS_HDR: usize = 8;

const SETINTERFACE: libc::c_ulong = ioc(READ, 4, std::mem::size_of::<SetInterface>());
const SETCONFIGURATION: libc::c_ulong = ioc(READ, 5, 4);
const GETDRIVER: libc::c_ulong = ioc(WRITE, 8, std::mem::size_of::<GetDriver>());
const SUBMITURB: libc::c_ulong = ioc(READ, 10, std::mem::size_of::<RawUrb>());
const DISCARDURB: libc::c_ulong = ioc(NONE, 11, 0);
const REAPURBNDELAY: libc::c_ulong = ioc(WRITE, 13, std::mem::size_of::<usize>());
const CLAIMINTERFACE: libc::c_ulong = ioc(READ, 15, 4);
const RELEASEINTERFACE: libc::c_ulong = ioc(READ, 16, 4);
const IOCTL: libc::c_ulong = ioc(READ | WRITE, 18, std::mem::size_of::<IoctlReq>());
const RESET: libc::c_ulong = ioc(NONE, 20, 0);
const CLEAR_HALT: libc::c_ulong = ioc(READ, 21, 4);
const DISCONNECT: libc::c_ulong = ioc(NONE, 22, 0);
const CONNECT: libc::c_ulong = ioc(NONE, 23, 0);
const GET_CAPABILITIES: libc::c_ulong = ioc(READ, 26, 4);
const DISCONNECT_CLAIM: libc::c_ulong = ioc(READ, 27, std::mem::size_of::<DisconnectClaim>());
const ALLOC_STREAMS: libc::c_ulong = ioc(READ, 28, STREAMS_HDR);
const FREE_STREAMS: libc::c_ulong = ioc(READ, 29, STREAMS_HDR);
const GET_SPEED: libc::c_ulong = ioc(NONE, 31, 0);

/// `USBDEVFS_CAP_BULK_CONTINUATION`.
pub const CAP_BULK_CONTINUATION: u32 = 0x02;
/// `USBDEVFS_CAP_BULK_SCATTER_GATHER`.
pub const CAP_BULK_SCATTER_GATHER: u32 = 0x08;

/// An open usbfs device node.
#[derive(Debug)]
pub struct Usbfs {
    file: File,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Usbfs {
    /// Opens `/dev/bus/usb/BBB/DDD` under `devfs` (normally `/dev`).
    pub fn open(devfs: &Path, bus: u32, addr: u32) -> io::Result<Usbfs> {
        let p = devfs.join(format!("bus/usb/{bus:03}/{addr:03}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(p)?;
        Ok(Usbfs { file })
    }

    /// The descriptor: for `poll` (POLLOUT = a URB is ready to reap,
    /// POLLHUP/POLLERR = the device is gone).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The device descriptor followed by every configuration descriptor
    /// (wTotalLength each), as the kernel cached them at enumeration.
    pub fn read_descriptors(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        // A device has at most 255 configurations of at most 64 KiB.
        for _ in 0..4096 {
            let n = self.file.read_at(&mut buf, out.len() as u64)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    fn ioctl_val(&self, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
        // SAFETY: the requests passed here take no pointer argument (`_IO`)
        // or a plain integer, which the kernel does not dereference.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg) })
    }

    fn ioctl_u32(&self, req: libc::c_ulong, v: u32) -> io::Result<()> {
        let mut v = v;
        // SAFETY: `req` is one of the `_IOR(.., unsigned int)` requests;
        // the kernel reads 4 bytes from the valid, live `v`.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), req, &mut v as *mut u32) })?;
        Ok(())
    }

    /// `USBDEVFS_GET_SPEED`: the kernel's `enum usb_device_speed`
    /// (1 low, 2 full, 3 high, 4 wireless, 5 super, 6 super-plus).
    pub fn speed(&self) -> io::Result<u32> {
        self.ioctl_val(GET_SPEED, 0).map(|v| v as u32)
    }

    /// `USBDEVFS_GET_CAPABILITIES`.
    pub fn capabilities(&self) -> io::Result<u32> {
        let mut caps = 0u32;
        // SAFETY: the kernel writes 4 bytes to the valid, live `caps`.
        check(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                GET_CAPABILITIES,
                &mut caps as *mut u32,
            )
        })?;
        Ok(caps)
    }

    /// Claims interface `ifno` for this descriptor.
    pub fn claim(&self, ifno: u8) -> io::Result<()> {
        self.ioctl_u32(CLAIMINTERFACE, u32::from(ifno))
    }

    /// Releases a claimed interface.
    pub fn release(&self, ifno: u8) -> io::Result<()> {
        self.ioctl_u32(RELEASEINTERFACE, u32::from(ifno))
    }

    /// The kernel driver bound to interface `ifno`, if any.
    pub fn driver(&self, ifno: u8) -> Option<String> {
        let mut gd = GetDriver {
            interface: u32::from(ifno),
            driver: [0; 256],
        };
        // SAFETY: GETDRIVER reads the interface number from and writes a
        // NUL-terminated name into the valid, live `gd` of the right size.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), GETDRIVER, &mut gd as *mut GetDriver) };
        if r < 0 {
            return None;
        }
        gd.driver[255] = 0;
        CStr::from_bytes_until_nul(&gd.driver)
            .ok()
            .map(|c| c.to_string_lossy().into_owned())
    }

    fn iface_ioctl(&self, ifno: u8, code: libc::c_ulong) -> io::Result<()> {
        let mut req = IoctlReq {
            ifno: i32::from(ifno),
            ioctl_code: code as i32,
            data: 0,
        };
        // SAFETY: USBDEVFS_IOCTL reads the valid, live `req`; the wrapped
        // DISCONNECT/CONNECT codes take no data (`data` is null).
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), IOCTL, &mut req as *mut IoctlReq) })?;
        Ok(())
    }

    /// Detaches the kernel driver of interface `ifno` and claims it, in
    /// one step where the kernel can (`DISCONNECT_CLAIM`, Linux 3.18), else
    /// `DISCONNECT` then `CLAIMINTERFACE`.
    pub fn disconnect_claim(&self, ifno: u8) -> io::Result<()> {
        let mut dc = DisconnectClaim {
            interface: u32::from(ifno),
            flags: 0,
            driver: [0; 256],
        };
        // SAFETY: DISCONNECT_CLAIM reads the valid, live `dc`.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                DISCONNECT_CLAIM,
                &mut dc as *mut DisconnectClaim,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOTTY) {
            return Err(e);
        }
        match self.iface_ioctl(ifno, DISCONNECT) {
            Ok(()) => {}
            // No driver bound.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
        self.claim(ifno)
    }

    /// Asks the kernel to probe drivers for interface `ifno` again (gives
    /// it back to its host driver after release).
    pub fn connect_driver(&self, ifno: u8) -> io::Result<()> {
        self.iface_ioctl(ifno, CONNECT)
    }

    /// `SET_CONFIGURATION` through the kernel (no interface may be claimed).
    pub fn set_configuration(&self, value: i32) -> io::Result<()> {
        self.ioctl_u32(SETCONFIGURATION, value as u32)
    }

    /// `SET_INTERFACE` through the kernel.
    pub fn set_interface(&self, ifno: u32, alt: u32) -> io::Result<()> {
        let mut si = SetInterface {
            interface: ifno,
            altsetting: alt,
        };
        // SAFETY: SETINTERFACE reads the valid, live `si`.
        check(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                SETINTERFACE,
                &mut si as *mut SetInterface,
            )
        })?;
        Ok(())
    }

    /// `CLEAR_FEATURE(ENDPOINT_HALT)` through the kernel (also resets the
    /// host side's data toggle / sequence number).
    pub fn clear_halt(&self, ep: u8) -> io::Result<()> {
        self.ioctl_u32(CLEAR_HALT, u32::from(ep))
    }

    /// USBDEVFS_ALLOC_STREAMS for bulk endpoint `ep` (address): asks the
    /// host controller for stream IDs `1..=streams`. Returns how many the
    /// host granted (it may grant fewer: its controller's or the device's
    /// limit). The endpoint's interface must be claimed.
    pub fn alloc_streams(&self, ep: u8, streams: u32) -> io::Result<u32> {
        let mut req = StreamsReq {
            num_streams: streams,
            num_eps: 1,
            eps: [ep],
        };
        // SAFETY: `req` is a live `struct usbdevfs_streams` followed by
        // `num_eps` (1) endpoint bytes, all the kernel reads.
        let r = check(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                ALLOC_STREAMS,
                &mut req as *mut StreamsReq,
            )
        })?;
        Ok(r as u32)
    }

    /// USBDEVFS_FREE_STREAMS for bulk endpoint `ep` (address).
    pub fn free_streams(&self, ep: u8) -> io::Result<()> {
        let mut req = StreamsReq {
            num_streams: 0,
            num_eps: 1,
            eps: [ep],
        };
        // SAFETY: as in `alloc_streams`.
        check(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                FREE_STREAMS,
                &mut req as *mut StreamsReq,
            )
        })?;
        Ok(())
    }

    /// Port reset of the device (`USBDEVFS_RESET`). The kernel unbinds
    /// every interface's driver, usbfs included: claims are lost.
    pub fn reset(&self) -> io::Result<()> {
        self.ioctl_val(RESET, 0).map(|_| ())
    }

    /// Submits a URB.
    ///
    /// # Safety
    ///
    /// `urb` must point to a valid [`UrbBlock`] whose buffer (and the
    /// block itself) stay valid and unmoved until the kernel gives the URB
    /// back through [`Usbfs::reap`], or until this descriptor is closed.
    pub unsafe fn submit(&self, urb: *mut UrbBlock) -> io::Result<()> {
        // SAFETY: the caller guarantees `urb` and its buffer live until
        // reaped; SUBMITURB reads the header and the iso descriptors.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), SUBMITURB, urb) })?;
        Ok(())
    }

    /// Asks the kernel to cancel a submitted URB; it is still reaped later
    /// (with -ENOENT/-ECONNRESET). An error means it already completed.
    /// `urb` is the block's address as given to [`Usbfs::submit`].
    pub fn discard(&self, urb: usize) -> io::Result<()> {
        // SAFETY: DISCARDURB only compares the pointer value with the URBs
        // it knows; it never dereferences it.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), DISCARDURB, urb) })?;
        Ok(())
    }

    /// Takes one completed URB, if any: its status, lengths and iso packet
    /// results are written into the submitted block, IN data into its
    /// buffer. `Ok(None)`: none ready. `Err` with ENODEV: the device is gone
    /// (URBs that never completed are discarded by the kernel and never
    /// reaped).
    pub fn reap(&self) -> io::Result<Option<*mut UrbBlock>> {
        let mut p: usize = 0;
        // SAFETY: REAPURBNDELAY writes one pointer to the valid, live `p`,
        // and writes results into a block we submitted, which the caller
        // of `submit` keeps alive until it comes back here.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), REAPURBNDELAY, &mut p as *mut usize) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(p as *mut UrbBlock))
    }
}

/// Waits until one of `fds` is ready for `events` (or `timeout_ms`
/// passes); returns the `revents` of each.
pub fn poll(fds: &[(RawFd, i16)], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of `p.len()` pollfd structs.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/usbdevice_fs.h> on x86_64 / aarch64.
        assert_eq!(SUBMITURB, 0x8038_550a);
        assert_eq!(REAPURBNDELAY, 0x4008_550d);
        assert_eq!(DISCARDURB, 0x550b);
        assert_eq!(CLAIMINTERFACE, 0x8004_550f);
        assert_eq!(RELEASEINTERFACE, 0x8004_5510);
        assert_eq!(SETINTERFACE, 0x8008_5504);
        assert_eq!(SETCONFIGURATION, 0x8004_5505);
        assert_eq!(GETDRIVER, 0x4104_5508);
        assert_eq!(IOCTL, 0xc010_5512);
        assert_eq!(RESET, 0x5514);
        assert_eq!(CLEAR_HALT, 0x8004_5515);
        assert_eq!(DISCONNECT, 0x5516);
        assert_eq!(CONNECT, 0x5517);
        assert_eq!(GET_CAPABILITIES, 0x8004_551a);
        assert_eq!(DISCONNECT_CLAIM, 0x8108_551b);
        assert_eq!(GET_SPEED, 0x551f);
        assert_eq!(ALLOC_STREAMS, 0x8008_551c);
        assert_eq!(FREE_STREAMS, 0x8008_551d);
        assert_eq!(std::mem::offset_of!(StreamsReq, eps), STREAMS_HDR);
    }

    #[test]
    fn urb_layout_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<RawUrb>(), 56);
        assert_eq!(std::mem::offset_of!(RawUrb, buffer), 16);
        assert_eq!(std::mem::offset_of!(RawUrb, usercontext), 48);
        assert_eq!(std::mem::offset_of!(UrbBlock, iso), 56);
        assert_eq!(std::mem::size_of::<IsoPacketDesc>(), 12);
    }

    #[test]
    fn stream_ioctls_on_a_node_that_is_not_usbfs_are_errors() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bus/usb/001")).unwrap();
        std::fs::write(d.path().join("bus/usb/001/002"), b"").unwrap();
        let fd = Usbfs::open(d.path(), 1, 2).unwrap();
        assert!(fd.alloc_streams(0x81, 15).is_err());
        assert!(fd.free_streams(0x81).is_err());
    }

    #[test]
    fn opening_a_missing_node_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let e = Usbfs::open(d.path(), 1, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
