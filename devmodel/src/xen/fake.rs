//! An in-process simulation of the hypervisor side, for the protocol
//! tests: the ioreq page and guest RAM are shared files mapped by both
//! sides, event channels are a queue plus an eventfd, and every device
//! model operation is recorded.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::abi;
use super::hv::{EventChannels, ForeignMapping, Hypervisor, IoRange};

const PAGE: usize = 4096;

/// What the device model did to the fake hypervisor.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub servers_created: u32,
    pub enabled: bool,
    pub destroyed: bool,
    pub ranges: Vec<(IoRange, u64, u64)>,
    pub intx: Vec<bool>,
    pub msis: Vec<(u64, u32)>,
    pub map_calls: u64,
    pub restricted: bool,
}

#[derive(Debug)]
pub struct FakeXen {
    vcpus: u32,
    page: File,
    guest: File,
    guest_pages: u64,
    /// Guest frames that are not RAM (the MMIO hole).
    hole: std::ops::Range<u64>,
    pub rec: Mutex<Record>,
    dead: std::sync::atomic::AtomicBool,
}

fn shared(f: &File, off: u64, len: usize) -> MmapRegion {
    MmapRegion::build(
        Some(FileOffset::new(f.try_clone().unwrap(), off)),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .unwrap()
}

impl FakeXen {
    /// A domain with `vcpus` vCPUs and `guest_bytes` of RAM from 0, with
    /// frames in `hole` not mapping.
    pub fn new(vcpus: u32, guest_bytes: u64, hole: std::ops::Range<u64>) -> Arc<Self> {
        let page = tempfile::tempfile().unwrap();
        page.set_len(PAGE as u64).unwrap();
        let guest = tempfile::tempfile().unwrap();
        guest.set_len(guest_bytes).unwrap();
        Arc::new(Self {
            vcpus,
            page,
            guest,
            guest_pages: guest_bytes / PAGE as u64,
            hole,
            rec: Mutex::new(Record::default()),
            dead: false.into(),
        })
    }

    /// The test's own view of the ioreq page.
    pub fn page(&self) -> MmapRegion {
        shared(&self.page, 0, PAGE)
    }

    /// The test's own view of guest RAM.
    pub fn guest(&self) -> MmapRegion {
        shared(&self.guest, 0, (self.guest_pages as usize) * PAGE)
    }

    pub fn rec(&self) -> Record {
        self.rec.lock().unwrap().clone()
    }

    /// The domain dies: every later operation fails with ESRCH.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    fn alive(&self) -> io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::ESRCH))
        } else {
            Ok(())
        }
    }

    /// Remote (Xen-side) port of vCPU `v`.
    pub fn remote_port(v: u32) -> u32 {
        100 + v
    }
}

impl Hypervisor for FakeXen {
    fn domid(&self) -> u16 {
        7
    }
    fn nr_vcpus(&self) -> io::Result<u32> {
        self.alive()?;
        Ok(self.vcpus)
    }
    fn create_ioreq_server(&self) -> io::Result<u16> {
        self.alive()?;
        let mut r = self.rec.lock().unwrap();
        r.servers_created += 1;
        Ok(3)
    }
    fn map_ioreq_page(&self, id: u16) -> io::Result<MmapRegion> {
        self.alive()?;
        assert_eq!(id, 3);
        Ok(self.page())
    }
    fn set_ioreq_server_state(&self, id: u16, enabled: bool) -> io::Result<()> {
        self.alive()?;
        assert_eq!(id, 3);
        if enabled {
            // Xen fills in the vCPUs' ports when the server is enabled.
            let p = self.page();
            for v in 0..self.vcpus {
                p.as_volatile_slice()
                    .write_obj(
                        Self::remote_port(v),
                        v as usize * abi::IOREQ_SLOT_SIZE + abi::IOREQ_OFF_VP_EPORT,
                    )
                    .unwrap();
            }
        }
        self.rec.lock().unwrap().enabled = enabled;
        Ok(())
    }
    fn map_io_range(&self, id: u16, kind: IoRange, start: u64, end: u64) -> io::Result<()> {
        self.alive()?;
        assert_eq!(id, 3);
        let mut r = self.rec.lock().unwrap();
        if r.ranges
            .iter()
            .any(|&(k, s, e)| k == kind && s <= end && start <= e)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        r.ranges.push((kind, start, end));
        Ok(())
    }
    fn unmap_io_range(&self, id: u16, kind: IoRange, start: u64, end: u64) -> io::Result<()> {
        self.alive()?;
        assert_eq!(id, 3);
        let mut r = self.rec.lock().unwrap();
        let n = r.ranges.len();
        r.ranges.retain(|&x| x != (kind, start, end));
        if r.ranges.len() == n {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }
    fn ioreq_server_alive(&self, id: u16) -> io::Result<()> {
        self.alive()?;
        assert_eq!(id, 3);
        if self.rec.lock().unwrap().destroyed {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }
    fn destroy_ioreq_server(&self, id: u16) -> io::Result<()> {
        self.alive()?;
        assert_eq!(id, 3);
        self.rec.lock().unwrap().destroyed = true;
        Ok(())
    }
    fn set_pci_intx_level(&self, _bus: u8, _dev: u8, intx: u8, level: bool) -> io::Result<()> {
        self.alive()?;
        assert_eq!(intx, 0);
        self.rec.lock().unwrap().intx.push(level);
        Ok(())
    }
    fn inject_msi(&self, addr: u64, data: u32) -> io::Result<()> {
        self.alive()?;
        self.rec.lock().unwrap().msis.push((addr, data));
        Ok(())
    }
    fn modified_memory(&self, _first_pfn: u64, _nr: u32) -> io::Result<()> {
        self.alive()
    }
    fn map_guest(&self, first_gfn: u64, count: usize) -> io::Result<ForeignMapping> {
        self.alive()?;
        self.rec.lock().unwrap().map_calls += 1;
        // Like privcmd: the whole range is mapped, failed frames are
        // reported per page (and would fault if touched); here they are
        // backed by a scratch file so a bug touching them cannot be missed
        // by a SIGBUS taking the test down.
        let errors: Vec<i32> = (0..count as u64)
            .map(|i| {
                let g = first_gfn + i;
                if g >= self.guest_pages || self.hole.contains(&g) {
                    -libc::EINVAL
                } else {
                    0
                }
            })
            .collect();
        if errors.iter().all(|e| *e != 0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let region = if errors.iter().all(|e| *e == 0) {
            shared(&self.guest, first_gfn * PAGE as u64, count * PAGE)
        } else {
            let scratch = tempfile::tempfile()?;
            scratch.set_len((count * PAGE) as u64)?;
            shared(&scratch, 0, count * PAGE)
        };
        Ok(ForeignMapping { region, errors })
    }
    fn restrict(&self) -> io::Result<()> {
        self.rec.lock().unwrap().restricted = true;
        Ok(())
    }
}

/// Both ends of the fake event channels.
#[derive(Debug)]
pub struct FakeBus {
    efd: EventFd,
    st: Mutex<BusState>,
}

#[derive(Debug, Default)]
struct BusState {
    /// remote -> local
    bound: HashMap<u32, u32>,
    pending: VecDeque<u32>,
    notified: HashMap<u32, u64>,
    unmasked: u64,
}

impl FakeBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            efd: EventFd::new(EFD_NONBLOCK).unwrap(),
            st: Mutex::new(BusState::default()),
        })
    }

    /// The guest side signals `remote` (a vCPU hit one of our ranges);
    /// `false` if nobody is bound to it (the server is gone).
    pub fn try_fire(&self, remote: u32) -> bool {
        let mut st = self.st.lock().unwrap();
        let Some(&local) = st.bound.get(&remote) else {
            return false;
        };
        st.pending.push_back(local);
        self.efd.write(1).unwrap();
        true
    }

    /// Notifications the device model sent on the port bound to `remote`.
    pub fn notified(&self, remote: u32) -> u64 {
        let st = self.st.lock().unwrap();
        st.bound
            .get(&remote)
            .and_then(|l| st.notified.get(l))
            .copied()
            .unwrap_or(0)
    }

    pub fn bound(&self) -> usize {
        self.st.lock().unwrap().bound.len()
    }
}

/// The device model's end.
#[derive(Debug)]
pub struct FakeEvtchn {
    pub bus: Arc<FakeBus>,
    next: u32,
}

impl FakeEvtchn {
    pub fn new(bus: Arc<FakeBus>) -> Self {
        Self { bus, next: 10 }
    }
}

impl EventChannels for FakeEvtchn {
    fn bind_interdomain(&mut self, remote_port: u32) -> io::Result<u32> {
        let local = self.next;
        self.next += 1;
        self.bus.st.lock().unwrap().bound.insert(remote_port, local);
        Ok(local)
    }
    fn unbind(&mut self, local_port: u32) -> io::Result<()> {
        self.bus
            .st
            .lock()
            .unwrap()
            .bound
            .retain(|_, l| *l != local_port);
        Ok(())
    }
    fn notify(&self, local_port: u32) -> io::Result<()> {
        *self
            .bus
            .st
            .lock()
            .unwrap()
            .notified
            .entry(local_port)
            .or_default() += 1;
        Ok(())
    }
    fn pending(&mut self) -> io::Result<Vec<u32>> {
        let _ = self.bus.efd.read();
        Ok(self.bus.st.lock().unwrap().pending.drain(..).collect())
    }
    fn unmask(&mut self, _local_port: u32) -> io::Result<()> {
        self.bus.st.lock().unwrap().unmasked += 1;
        Ok(())
    }
    fn as_raw_fd(&self) -> RawFd {
        self.bus.efd.as_raw_fd()
    }
    fn restrict(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A guest vCPU issuing requests through its slot, as Xen does.
#[derive(Debug)]
pub struct FakeVcpu {
    pub v: u32,
    page: MmapRegion,
    bus: Arc<FakeBus>,
}

/// A request as the guest side writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Req {
    pub ty: u8,
    pub addr: u64,
    pub data: u64,
    pub count: u32,
    pub size: u32,
    pub read: bool,
    pub ptr: bool,
    pub df: bool,
}

impl FakeVcpu {
    pub fn new(xen: &FakeXen, bus: Arc<FakeBus>, v: u32) -> Self {
        Self {
            v,
            page: xen.page(),
            bus,
        }
    }

    fn base(&self) -> usize {
        self.v as usize * abi::IOREQ_SLOT_SIZE
    }

    pub fn state(&self) -> u8 {
        self.page
            .as_volatile_slice()
            .load::<u8>(self.base() + abi::IOREQ_OFF_FLAGS, Ordering::Acquire)
            .unwrap()
            & abi::IOREQ_FLAG_STATE_MASK
    }

    /// Writes `r` into the slot with `state` (READY for a real request)
    /// and fires the channel; does not wait.
    pub fn post(&self, r: Req, state: u8) {
        assert!(self.try_post(r, state), "vCPU {}: port not bound", self.v);
    }

    /// [`post`](Self::post), or `false` if the server has unbound its port.
    pub fn try_post(&self, r: Req, state: u8) -> bool {
        let s = self.page.as_volatile_slice();
        let b = self.base();
        s.write_obj(r.addr, b + abi::IOREQ_OFF_ADDR).unwrap();
        s.write_obj(r.data, b + abi::IOREQ_OFF_DATA).unwrap();
        s.write_obj(r.count, b + abi::IOREQ_OFF_COUNT).unwrap();
        s.write_obj(r.size, b + abi::IOREQ_OFF_SIZE).unwrap();
        s.store(r.ty, b + abi::IOREQ_OFF_TYPE, Ordering::Relaxed)
            .unwrap();
        let mut f = state;
        if r.ptr {
            f |= abi::IOREQ_FLAG_DATA_IS_PTR;
        }
        if r.read {
            f |= abi::IOREQ_FLAG_DIR_READ;
        }
        if r.df {
            f |= abi::IOREQ_FLAG_DF;
        }
        s.store(f, b + abi::IOREQ_OFF_FLAGS, Ordering::Release)
            .unwrap();
        self.bus.try_fire(FakeXen::remote_port(self.v))
    }

    /// Issues `r` and waits for the answer (Xen then resets the slot).
    pub fn request(&self, r: Req) -> u64 {
        self.post(r, abi::STATE_IOREQ_READY);
        let t0 = Instant::now();
        while self.state() != abi::STATE_IORESP_READY {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "vCPU {}: no answer to {r:?}",
                self.v
            );
            std::thread::sleep(Duration::from_micros(20));
        }
        let s = self.page.as_volatile_slice();
        let d: u64 = s.read_obj(self.base() + abi::IOREQ_OFF_DATA).unwrap();
        let f = s
            .load::<u8>(self.base() + abi::IOREQ_OFF_FLAGS, Ordering::Acquire)
            .unwrap();
        s.store(
            f & !abi::IOREQ_FLAG_STATE_MASK,
            self.base() + abi::IOREQ_OFF_FLAGS,
            Ordering::Release,
        )
        .unwrap();
        d
    }

    pub fn mmio_read(&self, addr: u64, size: u32) -> u64 {
        self.request(Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr,
            count: 1,
            size,
            read: true,
            ..Default::default()
        })
    }

    pub fn mmio_write(&self, addr: u64, size: u32, data: u64) {
        self.request(Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr,
            data,
            count: 1,
            size,
            ..Default::default()
        });
    }

    fn cfg_addr(sbdf: u32, reg: u32) -> u64 {
        (u64::from(sbdf) << 32) | u64::from(reg)
    }

    pub fn cfg_read(&self, sbdf: u32, reg: u32, size: u32) -> u64 {
        self.request(Req {
            ty: abi::IOREQ_TYPE_PCI_CONFIG,
            addr: Self::cfg_addr(sbdf, reg),
            count: 1,
            size,
            read: true,
            ..Default::default()
        })
    }

    pub fn cfg_write(&self, sbdf: u32, reg: u32, size: u32, data: u64) {
        self.request(Req {
            ty: abi::IOREQ_TYPE_PCI_CONFIG,
            addr: Self::cfg_addr(sbdf, reg),
            data,
            count: 1,
            size,
            ..Default::default()
        });
    }
}

/// Helper for tests: read/write guest RAM from the test's side.
pub fn guest_write(g: &MmapRegion, addr: u64, data: &[u8]) {
    g.as_volatile_slice()
        .write_slice(data, addr as usize)
        .unwrap();
}

pub fn guest_read(g: &MmapRegion, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    g.as_volatile_slice()
        .read_slice(&mut v, addr as usize)
        .unwrap();
    v
}
