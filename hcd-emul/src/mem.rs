//! Guest memory: the one path through which every controller DMA goes.
//!
//! Controllers see guest physical memory only through [`GuestRam`], a cheap,
//! cloneable handle around rust-vmm's [`GuestMemoryAtomic`]`<`[`GuestMemoryMmap`]`>`.
//! Transports build the map: the vfio-user server from the file descriptors
//! of `DMA_MAP`, the Xen transport from foreign mappings, tests from
//! anonymous memory. The map can be replaced at any time (a client maps and
//! unmaps regions while firmware runs); an access to an address that is not
//! mapped — including the controller's own BAR, which is never guest RAM
//! here — is a [`DmaError`], never a panic.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, ReadVolatile, WriteVolatile,
};

/// An access to guest memory that could not be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// Some byte of the range is not backed by guest RAM.
    #[error("guest range {addr:#x}+{len:#x} is not mapped")]
    Unmapped {
        /// First guest-physical address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: usize,
    },
    /// The range wraps around the 64-bit address space.
    #[error("guest range {addr:#x}+{len:#x} overflows")]
    Overflow {
        /// First guest-physical address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: usize,
    },
    /// Reading or writing the host file failed.
    #[error("host file I/O failed during DMA")]
    Io,
    /// The memory behind the range went away during the access (a
    /// vfio-user client shrank the file under its DMA mapping): what was
    /// read or written is not guest memory.
    #[error("guest memory at {addr:#x}+{len:#x} vanished during the access")]
    Vanished {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: usize,
    },
}

/// Memory faults absorbed during guest-memory accesses, process-wide. A
/// transport whose guest memory can vanish under an access (vfio-user:
/// the client may truncate the file it mapped) replaces the faulting page
/// and calls [`note_memory_fault`] from its SIGBUS handler; every access
/// compares the count before and after and fails with
/// [`DmaError::Vanished`] if it moved, so the transfer that hit the fault
/// fails instead of going on with zeros.
static MEMORY_FAULTS: AtomicU64 = AtomicU64::new(0);

/// Counts a memory fault absorbed under a guest-memory access: the access
/// under way then fails with [`DmaError::Vanished`]. For a transport's
/// SIGBUS handler (vfio-user); async-signal-safe: one atomic add.
pub fn note_memory_fault() {
    MEMORY_FAULTS.fetch_add(1, Ordering::Release);
}

fn memory_faults() -> u64 {
    MEMORY_FAULTS.load(Ordering::Acquire)
}

/// Runs the access `f` on `addr..addr + len`; if a memory fault was
/// absorbed meanwhile, the access fails with [`DmaError::Vanished`]
/// whatever it returned.
fn unless_vanished<T>(
    addr: u64,
    len: usize,
    f: impl FnOnce() -> Result<T, DmaError>,
) -> Result<T, DmaError> {
    let faults = memory_faults();
    let r = f();
    if memory_faults() != faults {
        return Err(DmaError::Vanished { addr, len });
    }
    r
}

/// Maps guest memory on demand: the Xen transport's map cache, where guest
/// RAM is mapped bucket by bucket as DMA first touches it instead of all
/// at once.
///
/// [`GuestRam`] calls it, with the map locked against concurrent
/// replacement, when an access finds part of its range unmapped; the
/// access is retried once on the map it returns. Accesses already under
/// way keep the map they started with (and so its mappings) alive: a
/// mapping is never torn down under an in-flight DMA.
pub trait GuestMapper: Send + Sync + std::fmt::Debug {
    /// Returns a map that also covers as much of `addr..addr + len` as can
    /// be mapped (it may drop other mappings to stay within a budget), or
    /// `None` if nothing could be added.
    fn map(&self, addr: u64, len: usize, current: &GuestMemoryMmap) -> Option<GuestMemoryMmap>;
}

/// Whether `m` maps all of `addr..addr + len`.
fn covers(m: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    len == 0
        || GuestMemory::check_range(
            m,
            GuestAddress(addr),
            len,
            vm_memory::Permissions::ReadWrite,
        )
}

/// A cloneable handle to guest physical memory.
#[derive(Clone, Debug)]
pub struct GuestRam {
    inner: GuestMemoryAtomic<GuestMemoryMmap>,
    mapper: Option<Arc<dyn GuestMapper>>,
    /// Guest-memory operations so far, by every clone of this handle
    /// (controllers budget their work per guest access with it).
    ops: Arc<AtomicU64>,
}

impl GuestRam {
    /// Wraps a memory map.
    pub fn new(map: GuestMemoryMmap) -> Self {
        Self {
            inner: GuestMemoryAtomic::new(map),
            mapper: None,
            ops: Arc::default(),
        }
    }

    /// An initially empty map filled on demand by `mapper` (see
    /// [`GuestMapper`]); [`GuestRam::replace`] with an empty map drops every
    /// mapping (Xen's INVALIDATE).
    pub fn with_mapper(mapper: Arc<dyn GuestMapper>) -> Self {
        Self {
            inner: GuestMemoryAtomic::new(GuestMemoryMmap::default()),
            mapper: Some(mapper),
            ops: Arc::default(),
        }
    }

    /// The current map, covering `addr..addr + len` (asking the mapper to
    /// map what is missing), or why not.
    fn mem(
        &self,
        addr: u64,
        len: usize,
    ) -> Result<GuestMemoryLoadGuard<GuestMemoryMmap>, DmaError> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        Self::check(addr, len)?;
        let covers = |m: &GuestMemoryMmap| covers(m, addr, len);
        let mem = self.inner.memory();
        if covers(&mem) {
            return Ok(mem);
        }
        drop(mem);
        self.fault(addr, len, &covers);
        let mem = self.inner.memory();
        if covers(&mem) {
            Ok(mem)
        } else {
            Err(DmaError::Unmapped { addr, len })
        }
    }

    /// Asks the mapper (if any) to map `addr..addr + len`, under the lock
    /// so that concurrent faults do not map the same range twice.
    fn fault(&self, addr: u64, len: usize, covers: &dyn Fn(&GuestMemoryMmap) -> bool) {
        let Some(mapper) = &self.mapper else {
            return;
        };
        let l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.inner.memory();
        if !covers(&cur) {
            if let Some(m) = mapper.map(addr, len, &cur) {
                drop(cur);
                l.replace(m);
            }
        }
    }

    /// Runs `f` on the current map; if it fails and a mapper is installed,
    /// maps the range and runs it once more. The common case (mapped)
    /// costs one region lookup, as a plain vm-memory access does.
    fn access<T>(
        &self,
        addr: u64,
        len: usize,
        mut f: impl FnMut(&GuestMemoryMmap) -> Option<T>,
    ) -> Result<T, DmaError> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        Self::check(addr, len)?;
        unless_vanished(addr, len, || {
            let mut r = f(&self.inner.memory());
            if r.is_none() && self.mapper.is_some() {
                self.fault(addr, len, &|m| covers(m, addr, len));
                r = f(&self.inner.memory());
            }
            r.ok_or(DmaError::Unmapped { addr, len })
        })
    }

    /// Guest-memory operations (reads, writes, range look-ups) made so far
    /// through this handle and its clones, whether they succeeded or not.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// A map with no memory: every access fails until [`GuestRam::replace`].
    pub fn empty() -> Self {
        Self::new(GuestMemoryMmap::default())
    }

    /// Anonymous memory from guest-physical 0, for tests and fuzzing.
    pub fn anonymous(size: usize) -> Self {
        match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]) {
            Ok(m) => Self::new(m),
            Err(_) => Self::empty(),
        }
    }

    /// Anonymous memory in the given `(start, size)` ranges.
    pub fn anonymous_ranges(ranges: &[(u64, usize)]) -> Self {
        let r: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        match GuestMemoryMmap::from_ranges(&r) {
            Ok(m) => Self::new(m),
            Err(_) => Self::empty(),
        }
    }

    /// The current map (its regions are shared, not copied): for building
    /// a changed map to [`GuestRam::replace`] with.
    pub fn current(&self) -> GuestMemoryMmap {
        (*self.inner.memory()).clone()
    }

    /// Replaces the whole map (transports call this on map/unmap). Accesses
    /// already under way keep the old map alive until they finish.
    pub fn replace(&self, map: GuestMemoryMmap) {
        let l = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        l.replace(map);
    }

    fn check(addr: u64, len: usize) -> Result<(), DmaError> {
        if len > 0 && addr.checked_add(len as u64 - 1).is_none() {
            return Err(DmaError::Overflow { addr, len });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if buf.is_empty() {
            return Self::check(addr, 0);
        }
        let len = buf.len();
        self.access(addr, len, |m| m.read_slice(buf, GuestAddress(addr)).ok())
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        if data.is_empty() {
            return Self::check(addr, 0);
        }
        self.access(addr, data.len(), |m| {
            m.write_slice(data, GuestAddress(addr)).ok()
        })
    }

    /// Reads a little-endian `u32`.
    pub fn read_u32(&self, addr: u64) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, DmaError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u32`.
    pub fn write_u32(&self, addr: u64, v: u32) -> Result<(), DmaError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Whether the whole range is backed by guest RAM.
    pub fn is_mapped(&self, addr: u64, len: usize) -> bool {
        self.mem(addr, len).is_ok()
    }

    /// The host address of `[addr, addr+len)` when the whole range lies in
    /// one mapped region, kept mapped for as long as the returned
    /// [`HostRange`] lives (a later [`GuestRam::replace`] does not unmap
    /// it). For backends that hand guest buffers to the host kernel
    /// (zero-copy); `None` for an empty, unmapped or split range.
    pub fn host_range(&self, addr: u64, len: usize) -> Option<HostRange> {
        if len == 0 || Self::check(addr, len).is_err() {
            return None;
        }
        let map = self.mem(addr, len).ok()?.into_inner();
        let host = {
            let slice = map.get_slice(GuestAddress(addr), len).ok()?;
            slice.ptr_guard_mut().as_ptr() as usize
        };
        Some(HostRange {
            _map: map,
            host,
            len,
        })
    }

    /// Fills guest memory at `addr` with `len` bytes of `file` from `file_off`,
    /// straight from the file into guest RAM where the file system allows
    /// it (else through a bounce buffer). Bytes past the end of the file
    /// read as zeros.
    pub fn fill_from_file(
        &self,
        addr: u64,
        len: usize,
        file: &File,
        file_off: u64,
    ) -> Result<(), DmaError> {
        self.fill_from(addr, len, &mut FileCursor::new(file, file_off))
    }

    /// Like [`GuestRam::fill_from_file`], reading at the cursor and moving
    /// it: consecutive calls on one cursor cost one `read` each (no seek).
    pub fn fill_from(
        &self,
        addr: u64,
        len: usize,
        src: &mut FileCursor<'_>,
    ) -> Result<(), DmaError> {
        let mem = self.mem(addr, len)?;
        unless_vanished(addr, len, || Self::fill_from_inner(&mem, addr, len, src))
    }

    fn fill_from_inner(
        mem: &GuestMemoryMmap,
        addr: u64,
        len: usize,
        src: &mut FileCursor<'_>,
    ) -> Result<(), DmaError> {
        let mut done = 0;
        while done < len {
            let a = GuestAddress(addr + done as u64);
            let got = if src.bounce {
                src.read_bounced(mem, a, len - done)
            } else {
                mem.read_volatile_from(a, src, len - done).or_else(|_| {
                    // Some files cannot DMA straight into foreign or
                    // device mappings (9p, FUSE, O_DIRECT pin the user
                    // pages; Xen's privcmd pages cannot be pinned): copy
                    // through a buffer from now on. A real I/O error
                    // fails again there.
                    src.bounce = true;
                    src.read_bounced(mem, a, len - done)
                })
            };
            match got {
                Ok(0) => {
                    mem.write_slice(&vec![0u8; len - done], a)
                        .map_err(|_| DmaError::Io)?;
                    src.off += (len - done) as u64;
                    src.os_pos = None;
                    break;
                }
                Ok(n) => done += n,
                Err(_) => return Err(DmaError::Io),
            }
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to `file` at `file_off`,
    /// straight from guest RAM where the file system allows it (else
    /// through a bounce buffer).
    pub fn drain_to_file(
        &self,
        addr: u64,
        len: usize,
        file: &File,
        file_off: u64,
    ) -> Result<(), DmaError> {
        self.drain_to(addr, len, &mut FileCursor::new(file, file_off))
    }

    /// Like [`GuestRam::drain_to_file`], writing at the cursor and moving it.
    pub fn drain_to(
        &self,
        addr: u64,
        len: usize,
        dst: &mut FileCursor<'_>,
    ) -> Result<(), DmaError> {
        let mem = self.mem(addr, len)?;
        unless_vanished(addr, len, || Self::drain_to_inner(&mem, addr, len, dst))
    }

    fn drain_to_inner(
        mem: &GuestMemoryMmap,
        addr: u64,
        len: usize,
        dst: &mut FileCursor<'_>,
    ) -> Result<(), DmaError> {
        if !dst.bounce {
            let start = dst.off;
            if mem
                .write_all_volatile_to(GuestAddress(addr), dst, len)
                .is_ok()
            {
                return Ok(());
            }
            // As in `fill_from`: retry the whole range through a buffer.
            dst.bounce = true;
            dst.off = start;
            dst.os_pos = None;
        }
        let mut done = 0;
        while done < len {
            let n = dst
                .write_bounced(mem, GuestAddress(addr + done as u64), len - done)
                .map_err(|_| DmaError::Io)?;
            done += n;
        }
        Ok(())
    }
}

/// A range of guest RAM at a fixed host address, mapped for as long as
/// this value lives (it holds the memory map). Only the address is handed
/// out: whoever dereferences it (a backend passing it to the kernel) is
/// responsible for doing so only while the transfer that owns the range is
/// pending.
#[derive(Clone)]
pub struct HostRange {
    _map: Arc<GuestMemoryMmap>,
    host: usize,
    len: usize,
}

impl std::fmt::Debug for HostRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRange")
            .field("host", &format_args!("{:#x}", self.host))
            .field("len", &self.len)
            .finish()
    }
}

impl HostRange {
    /// First byte, as a host pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.host as *mut u8
    }

    /// Length in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: empty ranges are never handed out.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A position in a file for DMA to and from guest memory. It seeks only
/// when the descriptor's offset is not already where the next access
/// starts, so a transfer spread over many guest segments costs one
/// `read`/`write` per segment. The device owns the descriptor: nothing else
/// may move its offset meanwhile.
#[derive(Debug)]
pub struct FileCursor<'a> {
    file: &'a File,
    off: u64,
    os_pos: Option<u64>,
    /// Direct file <-> guest memory I/O failed once: copy through a buffer.
    bounce: bool,
}

/// Bounce buffer size.
const BOUNCE: usize = 64 * 1024;

impl<'a> FileCursor<'a> {
    /// A cursor at `off` (the descriptor's own offset is not trusted).
    pub fn new(file: &'a File, off: u64) -> Self {
        Self {
            file,
            off,
            os_pos: None,
            bounce: false,
        }
    }

    /// Reads up to `len` bytes at the cursor through a buffer into guest
    /// memory at `a` (positioned read: the descriptor's offset is not used).
    fn read_bounced(
        &mut self,
        mem: &GuestMemoryMmap,
        a: GuestAddress,
        len: usize,
    ) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len.min(BOUNCE)];
        let n = self.file.read_at(&mut buf, self.off)?;
        mem.write_slice(&buf[..n], a)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.off += n as u64;
        Ok(n)
    }

    /// Writes up to `len` bytes of guest memory at `a` through a buffer to
    /// the file at the cursor.
    fn write_bounced(
        &mut self,
        mem: &GuestMemoryMmap,
        a: GuestAddress,
        len: usize,
    ) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len.min(BOUNCE)];
        mem.read_slice(&mut buf, a)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.file.write_all_at(&buf, self.off)?;
        self.off += buf.len() as u64;
        Ok(buf.len())
    }

    /// Moves the cursor.
    pub fn set_offset(&mut self, off: u64) {
        self.off = off;
    }

    fn seek(&mut self) -> Result<(), vm_memory::VolatileMemoryError> {
        use std::io::{Seek, SeekFrom};
        if self.os_pos != Some(self.off) {
            let mut f = self.file;
            f.seek(SeekFrom::Start(self.off))
                .map_err(vm_memory::VolatileMemoryError::IOError)?;
            self.os_pos = Some(self.off);
        }
        Ok(())
    }
}

impl ReadVolatile for FileCursor<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        self.seek()?;
        let mut f = self.file;
        let n = f.read_volatile(buf).inspect_err(|_| self.os_pos = None)?;
        self.off += n as u64;
        self.os_pos = Some(self.off);
        Ok(n)
    }
}

impl WriteVolatile for FileCursor<'_> {
    fn write_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        self.seek()?;
        let mut f = self.file;
        let n = f.write_volatile(buf).inspect_err(|_| self.os_pos = None)?;
        self.off += n as u64;
        self.os_pos = Some(self.off);
        Ok(n)
    }
}

/// The work one guest access (or one wake-up) may cause a controller:
/// guest-memory operations counted by [`GuestRam::ops`] since the access
/// began, plus other units the controller counts itself (cancelled
/// transfers, commands run). Shared by the controllers, which each cap it
/// with their own limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkBudget {
    ops_at_start: u64,
    work: u64,
}

impl WorkBudget {
    /// A new access begins: the count starts afresh.
    pub fn refill(&mut self, ram: &GuestRam) {
        self.ops_at_start = ram.ops();
        self.work = 0;
    }

    /// Counts `n` units of work that are not guest-memory operations.
    pub fn spend(&mut self, n: u64) {
        self.work = self.work.saturating_add(n);
    }

    /// Whether the work done since [`WorkBudget::refill`] is below `limit`.
    pub fn left(&self, ram: &GuestRam, limit: u64) -> bool {
        ram.ops().wrapping_sub(self.ops_at_start) + self.work < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_access_is_an_error_not_a_panic() {
        let ram = GuestRam::anonymous(0x10000);
        let mut b = [0u8; 8];
        assert!(ram.read(0x20000, &mut b).is_err());
        assert!(ram.read(0xfffc, &mut b).is_err(), "straddles the end");
        assert!(ram.read(u64::MAX - 2, &mut b).is_err());
        assert!(ram.write(0x20000, &b).is_err());
        ram.write(0x100, &[1, 2, 3, 4]).unwrap();
        assert_eq!(ram.read_u32(0x100).unwrap(), 0x0403_0201);
    }

    /// Maps 64 KiB anonymous buckets below 1 MiB, counting calls.
    #[derive(Debug, Default)]
    struct Buckets(std::sync::atomic::AtomicUsize);

    impl GuestMapper for Buckets {
        fn map(&self, addr: u64, len: usize, cur: &GuestMemoryMmap) -> Option<GuestMemoryMmap> {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut m = cur.clone();
            let last = (addr + len as u64 - 1) >> 16;
            for b in (addr >> 16)..=last.min(15) {
                let base = GuestAddress(b << 16);
                if m.iter().any(|r| r.start_addr() == base) {
                    continue;
                }
                let r = GuestRegionMmap::new(MmapRegion::new(0x10000).ok()?, base)?;
                m = m.insert_region(Arc::new(r)).ok()?;
            }
            Some(m)
        }
    }

    #[test]
    fn mapper_maps_on_first_touch_and_again_after_invalidate() {
        let mapper = Arc::new(Buckets::default());
        let ram = GuestRam::with_mapper(mapper.clone());
        let calls = || mapper.0.load(std::sync::atomic::Ordering::Relaxed);
        // An access straddling two buckets maps both at once.
        ram.write(0x1fffe, &[1, 2, 3, 4]).unwrap();
        assert_eq!(calls(), 1);
        assert_eq!(ram.read_u32(0x1fffe).unwrap(), 0x0403_0201);
        assert_eq!(calls(), 1, "mapped memory is not mapped again");
        // Beyond what the mapper can map: an error, not a panic.
        assert!(ram.read_u32(0x10_0000).is_err());
        assert!(!ram.is_mapped(0xf_fff0, 0x20));
        // Invalidate: everything is dropped, and mapped afresh on next touch.
        let held = ram.inner.memory();
        ram.replace(GuestMemoryMmap::default());
        assert!(
            GuestMemory::check_range(
                &*held,
                GuestAddress(0x1fffe),
                4,
                vm_memory::Permissions::ReadWrite
            ),
            "an access under way keeps its mappings"
        );
        let before = calls();
        assert_eq!(ram.read_u32(0x1fffe).unwrap(), 0, "fresh anonymous memory");
        assert_eq!(calls(), before + 1);
    }

    #[test]
    fn bounced_file_transfers_round_trip_like_direct_ones() {
        use std::io::Write;
        let ram = GuestRam::anonymous(0x40000);
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        f.write_all(&data).unwrap();
        for bounce in [false, true] {
            let mut c = FileCursor::new(&f, 1000);
            c.bounce = bounce;
            // Two segments on one cursor, the second past EOF (zeros).
            ram.fill_from(0x1003, 150_000, &mut c).unwrap();
            ram.fill_from(0x30000, 60_000 - 8192, &mut c).unwrap();
            let mut got = vec![0u8; 150_000];
            ram.read(0x1003, &mut got).unwrap();
            assert_eq!(got, data[1000..151_000], "bounce={bounce}");
            // And back out, to a different place in the file.
            let mut w = FileCursor::new(&f, 300_000);
            w.bounce = bounce;
            ram.drain_to(0x1003, 150_000, &mut w).unwrap();
            let mut back = vec![0u8; 150_000];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 300_000).unwrap();
            assert_eq!(back, got, "bounce={bounce}");
        }
    }

    #[test]
    fn file_transfers_round_trip() {
        use std::io::Write;
        let ram = GuestRam::anonymous(0x10000);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&(0..=255u8).cycle().take(8192).collect::<Vec<_>>())
            .unwrap();
        ram.fill_from_file(0x1001, 4000, &f, 100).unwrap();
        let mut b = [0u8; 4];
        ram.read(0x1001, &mut b).unwrap();
        assert_eq!(b, [100, 101, 102, 103]);
        ram.write(0x3000, &[9; 16]).unwrap();
        ram.drain_to_file(0x3000, 16, &f, 8000).unwrap();
        ram.fill_from_file(0x4000, 16, &f, 8000).unwrap();
        let mut c = [0u8; 16];
        ram.read(0x4000, &mut c).unwrap();
        assert_eq!(c, [9; 16]);
    }

    #[test]
    fn host_range_only_for_one_mapped_region_and_outlives_replace() {
        let ram = GuestRam::anonymous_ranges(&[(0, 0x2000), (0x2000, 0x2000)]);
        assert!(ram.host_range(0x1f00, 0x200).is_none(), "spans two regions");
        assert!(ram.host_range(0x9000, 16).is_none(), "unmapped");
        assert!(ram.host_range(0x100, 0).is_none(), "empty");
        let r = ram.host_range(0x2100, 3).unwrap();
        let r2 = ram.host_range(0x2180, 1).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r2.as_ptr() as usize - r.as_ptr() as usize, 0x80);
        ram.replace(GuestMemoryMmap::default());
        assert!(ram.host_range(0x2100, 3).is_none());
        // `r` still holds the old map: its address stays valid (the
        // passthrough crate reads through such ranges in its tests).
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn replace_unmaps() {
        let ram = GuestRam::anonymous(0x10000);
        assert!(ram.is_mapped(0x1000, 16));
        ram.replace(GuestMemoryMmap::default());
        assert!(!ram.is_mapped(0x1000, 16));
        assert!(ram.read_u32(0x1000).is_err());
    }
}
