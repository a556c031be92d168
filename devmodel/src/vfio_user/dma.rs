//! Guest memory as the vfio-user client maps it (`DMA_MAP`/`DMA_UNMAP`).
//!
//! A real range map: a new mapping replaces whatever it overlaps, an unmap
//! may cover several mappings or part of one (QEMU maps and unmaps
//! overlapping sub-ranges while firmware shadows ROM). Pieces that survive
//! a partial overlap are mapped again from the same file at the adjusted
//! offset. After every change the controller's [`GuestRam`] is replaced
//! atomically; an access already under way keeps its old mapping alive, so
//! no access ever touches memory the client has unmapped once it returns.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};

use hcd_emul::{guest_warn, GuestRam};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::sigbus;

/// Granularity of DMA mappings.
const PAGE_SIZE: u64 = 4096;

/// Most mappings kept (QEMU uses a few dozen), whatever the mix of maps
/// and hole-punching unmaps that produced them.
pub const MAX_MAPPINGS: usize = 1024;

/// Why a DMA request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DmaMapError {
    /// Zero size, wrap-around (of the address or the file offset).
    #[error("invalid DMA range {addr:#x}+{size:#x}")]
    Invalid {
        /// Start.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// The change would leave more than [`MAX_MAPPINGS`] mappings.
    #[error("DMA range {addr:#x}+{size:#x} would need more than {MAX_MAPPINGS} mappings")]
    TooMany {
        /// Start.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// The file is shorter than `offset + size`.
    #[error("DMA range {addr:#x}+{size:#x} at file offset {offset:#x} is past the end of the file ({file_len:#x} bytes)")]
    BeyondFile {
        /// Start.
        addr: u64,
        /// Size.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// The file's size.
        file_len: u64,
    },
    /// mmap of the client's file failed.
    #[error("cannot map DMA range {addr:#x}+{size:#x}: {msg}")]
    Mmap {
        /// Start.
        addr: u64,
        /// Size.
        size: u64,
        /// Why.
        msg: String,
    },
}

/// A shared mapping of the client's file that we own: registered with the
/// SIGBUS handler for as long as it exists, unregistered before it is
/// unmapped.
#[derive(Debug)]
struct HostMap {
    ptr: usize,
    len: usize,
    reg: Option<sigbus::Registration>,
}

impl HostMap {
    fn faults(&self) -> u64 {
        self.reg.as_ref().map_or(0, sigbus::Registration::faults)
    }
}

impl Drop for HostMap {
    fn drop(&mut self) {
        // Unregister first: the range must not be ours to patch once
        // something else may be mapped there.
        self.reg.take();
        // SAFETY: `ptr..ptr+len` is the mapping `map_file` created; no
        // region refers to it any more (the last `GuestRegionMmap` over it
        // is gone, see `DmaMap::reap`).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[derive(Debug)]
struct Mapping {
    size: u64,
    file: Option<Arc<File>>,
    offset: u64,
    /// What the guest reaches (`None`: fd-less, or poisoned by a fault).
    region: Option<Arc<GuestRegionMmap>>,
    host: Option<HostMap>,
}

/// The client's DMA mappings, keyed by guest (IOVA) start address.
#[derive(Debug, Default)]
pub struct DmaMap {
    maps: BTreeMap<u64, Mapping>,
    /// Mappings no longer in the table whose regions an access (or a
    /// zero-copy URB) may still hold: unmapped once nobody does.
    retired: Vec<(Weak<GuestRegionMmap>, HostMap)>,
    /// [`sigbus::total_faults`] when last looked at.
    faults_seen: u64,
    /// Mappings dropped because the client's file shrank under them.
    pub poisoned: u64,
}

/// Maps `size` bytes of `file` at `offset` for guest address `addr`.
fn map_file(
    addr: u64,
    size: u64,
    file: &File,
    offset: u64,
) -> Result<(Arc<GuestRegionMmap>, HostMap), DmaMapError> {
    let err = |msg: String| DmaMapError::Mmap { addr, size, msg };
    let len = usize::try_from(size).map_err(|_| DmaMapError::Invalid { addr, size })?;
    let off = libc::off_t::try_from(offset).map_err(|_| DmaMapError::Invalid { addr, size })?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh shared mapping at an address the kernel picks; the
    // descriptor is valid for the call. The mapping is owned by the
    // `HostMap` returned (or unmapped below on failure).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    let mut host = HostMap {
        ptr: p as usize,
        len,
        reg: None,
    };
    host.reg =
        Some(sigbus::register(host.ptr, len).ok_or_else(|| err("SIGBUS registry full".into()))?);
    // SAFETY: `p..p+len` is the mapping just created with these prot and
    // flags; `host` keeps it alive at least as long as the region (it is
    // retired, not dropped, while the region is referenced).
    let region = unsafe { MmapRegion::build_raw(p.cast(), len, prot, libc::MAP_SHARED) }
        .map_err(|e| err(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(addr))
        .ok_or(DmaMapError::Invalid { addr, size })?;
    Ok((Arc::new(region), host))
}

impl DmaMap {
    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Host mappings still alive (in the table or retired but in use).
    pub fn host_mappings(&self) -> usize {
        self.maps.values().filter(|m| m.host.is_some()).count() + self.retired.len()
    }

    fn retire(&mut self, m: Mapping) {
        if let (Some(r), Some(h)) = (m.region, m.host) {
            self.retired.push((Arc::downgrade(&r), h));
        }
    }

    /// Unmaps retired mappings nobody uses any more.
    pub fn reap(&mut self) {
        self.retired.retain(|(r, _)| r.strong_count() > 0);
    }

    /// The pieces of existing mappings that survive removing
    /// `[addr, addr+size)`, and the starts of the mappings it touches.
    /// Nothing is changed; `end` has been checked not to overflow.
    #[allow(clippy::type_complexity)]
    fn cut(&self, addr: u64, end: u64) -> Result<(Vec<u64>, Vec<(u64, u64, u64)>), DmaMapError> {
        let mut touched = Vec::new();
        let mut pieces = Vec::new();
        for (&s, m) in self.maps.range(..end) {
            let m_end = s + m.size;
            if m_end <= addr {
                continue;
            }
            touched.push(s);
            if s < addr {
                pieces.push((s, addr - s, m.offset));
            }
            if m_end > end {
                let offset = m.offset.checked_add(end - s).ok_or(DmaMapError::Invalid {
                    addr: s,
                    size: m.size,
                })?;
                pieces.push((end, m_end - end, offset));
            }
        }
        Ok((touched, pieces))
    }

    /// Replaces `[addr, addr+size)` by `new` (a map) or nothing (an
    /// unmap): all or nothing, and never more than [`MAX_MAPPINGS`].
    fn change(&mut self, addr: u64, size: u64, new: Option<Mapping>) -> Result<(), DmaMapError> {
        let end = addr
            .checked_add(size)
            .ok_or(DmaMapError::Invalid { addr, size })?;
        let (touched, pieces) = self.cut(addr, end)?;
        let after = self.maps.len() - touched.len() + pieces.len() + usize::from(new.is_some());
        if after > MAX_MAPPINGS && after > self.maps.len() {
            return Err(DmaMapError::TooMany { addr, size });
        }
        // Map the surviving pieces first: a failure changes nothing.
        let mut made = Vec::with_capacity(pieces.len());
        for (start, len, offset) in pieces {
            let Some(old) = self.maps.range(..=start).next_back().map(|(_, m)| m) else {
                continue;
            };
            let (region, host) = match (&old.file, &old.region) {
                (Some(f), Some(_)) => {
                    let (r, h) = map_file(start, len, f, offset)?;
                    (Some(r), Some(h))
                }
                _ => (None, None),
            };
            made.push((
                start,
                Mapping {
                    size: len,
                    file: old.file.clone(),
                    offset,
                    region,
                    host,
                },
            ));
        }
        for s in touched {
            if let Some(m) = self.maps.remove(&s) {
                self.retire(m);
            }
        }
        self.maps.extend(made);
        if let Some(m) = new {
            self.maps.insert(addr, m);
        }
        Ok(())
    }

    /// `DMA_MAP`: `size` bytes at guest `addr`, backed by `file` at
    /// `offset` (no file: the range exists but cannot be accessed). The
    /// file must hold `offset + size` bytes.
    pub fn map(
        &mut self,
        addr: u64,
        size: u64,
        file: Option<File>,
        offset: u64,
    ) -> Result<(), DmaMapError> {
        let invalid = DmaMapError::Invalid { addr, size };
        // Page-aligned like the kernel's VFIO_IOMMU_MAP_DMA (QEMU only
        // maps whole host pages): a piece split off later can then always
        // be mapped from its file offset.
        let aligned = |v: u64| v.is_multiple_of(PAGE_SIZE);
        if size == 0
            || addr.checked_add(size).is_none()
            || !aligned(addr)
            || !aligned(size)
            || (file.is_some() && !aligned(offset))
        {
            return Err(invalid);
        }
        let file_end = offset.checked_add(size).ok_or(invalid)?;
        let (region, host, file) = match file {
            Some(f) => {
                let meta = f.metadata().map_err(|e| DmaMapError::Mmap {
                    addr,
                    size,
                    msg: e.to_string(),
                })?;
                if meta.file_type().is_file() && meta.len() < file_end {
                    return Err(DmaMapError::BeyondFile {
                        addr,
                        size,
                        offset,
                        file_len: meta.len(),
                    });
                }
                let (r, h) = map_file(addr, size, &f, offset)?;
                (Some(r), Some(h), Some(Arc::new(f)))
            }
            None => (None, None, None),
        };
        self.reap();
        self.change(
            addr,
            size,
            Some(Mapping {
                size,
                file,
                offset,
                region,
                host,
            }),
        )
    }

    /// `DMA_UNMAP` of `[addr, addr+size)`. Refused (nothing changed) if
    /// cutting a hole would leave more than [`MAX_MAPPINGS`] mappings.
    pub fn unmap(&mut self, addr: u64, size: u64) -> Result<(), DmaMapError> {
        if addr.checked_add(size).is_none() {
            return Err(DmaMapError::Invalid { addr, size });
        }
        if size == 0 {
            return Ok(());
        }
        self.reap();
        self.change(addr, size, None)
    }

    /// Forgets everything (client gone).
    pub fn clear(&mut self) {
        let maps = std::mem::take(&mut self.maps);
        for m in maps.into_values() {
            self.retire(m);
        }
    }

    /// Drops every mapping the client's file was shrunk under (a SIGBUS
    /// was absorbed there): later accesses fail as DMA errors. Returns
    /// whether the map changed (then [`publish`](Self::publish) it).
    pub fn check_faults(&mut self) -> bool {
        let total = sigbus::total_faults();
        if total == self.faults_seen {
            return false;
        }
        self.faults_seen = total;
        let mut changed = false;
        let mut dropped = Vec::new();
        for (&a, m) in self.maps.iter_mut() {
            if m.host.as_ref().is_some_and(|h| h.faults() > 0) {
                guest_warn!(
                    "vfio-user: DMA range {a:#x}+{:#x}: the client's file shrank under it; no longer accessible",
                    m.size
                );
                if let (Some(r), Some(h)) = (m.region.take(), m.host.take()) {
                    dropped.push((Arc::downgrade(&r), h));
                }
                self.poisoned += 1;
                changed = true;
            }
        }
        self.retired.extend(dropped);
        changed
    }

    /// Publishes the current mappings to the controller's guest memory.
    pub fn publish(&mut self, ram: &GuestRam) {
        let regions: Vec<Arc<GuestRegionMmap>> = self
            .maps
            .values()
            .filter_map(|m| m.region.clone())
            .collect();
        let map = if regions.is_empty() {
            GuestMemoryMmap::default()
        } else {
            GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default()
        };
        ram.replace(map);
        self.reap();
    }

    /// Checks the table's invariants (tests): sorted, non-overlapping,
    /// bounded, each accessible mapping backed by its own host mapping.
    #[cfg(test)]
    fn check(&self) {
        assert!(self.maps.len() <= MAX_MAPPINGS);
        let mut prev_end = 0u64;
        for (&a, m) in &self.maps {
            assert!(m.size > 0);
            assert!(a >= prev_end, "overlap at {a:#x}");
            prev_end = a + m.size;
            assert_eq!(m.region.is_some(), m.host.is_some());
            if let Some(r) = &m.region {
                use vm_memory::GuestMemoryRegion;
                assert_eq!((r.start_addr().0, r.len()), (a, m.size));
            }
        }
    }
}

impl Drop for DmaMap {
    /// Mappings something still uses (a device thread's zero-copy URB
    /// outliving the server) are left mapped rather than pulled from under
    /// it; the rest are unmapped.
    fn drop(&mut self) {
        self.clear();
        for (r, h) in self.retired.drain(..) {
            if r.strong_count() > 0 {
                std::mem::forget(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfile(size: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8).collect();
        f.write_all(&data).unwrap();
        f
    }

    #[test]
    fn overlapping_map_and_partial_unmap_keep_the_rest() {
        let ram = GuestRam::empty();
        let mut m = DmaMap::default();
        let f = memfile(16 * 4096);
        m.map(0, 16 * 4096, Some(f.try_clone().unwrap()), 0)
            .unwrap();
        // Unmap pages 4..6, remap page 5 from page 15 of the file.
        m.unmap(4 * 4096, 2 * 4096).unwrap();
        m.map(5 * 4096, 4096, Some(f.try_clone().unwrap()), 15 * 4096)
            .unwrap();
        m.publish(&ram);
        let byte = |a: u64| {
            let mut b = [0u8; 1];
            ram.read(a, &mut b).map(|_| b[0])
        };
        assert_eq!(byte(3 * 4096).unwrap(), 3);
        assert!(byte(4 * 4096).is_err(), "unmapped hole");
        assert_eq!(byte(5 * 4096).unwrap(), 15);
        assert_eq!(byte(6 * 4096).unwrap(), 6, "the tail kept its file offset");
        assert!(
            ram.read(4 * 4096 - 2, &mut [0u8; 4]).is_err(),
            "straddles the hole"
        );
        // A map over everything replaces all pieces.
        m.map(0, 16 * 4096, Some(f), 0).unwrap();
        assert_eq!(m.len(), 1);
        m.publish(&ram);
        assert_eq!(byte(4 * 4096).unwrap(), 4);
        m.unmap(0, u64::MAX / 2).unwrap();
        m.publish(&ram);
        m.check();
        assert!(byte(0).is_err());
        assert!(m.map(u64::MAX - 10, 4096, None, 0).is_err());
        assert!(m.map(0, 0, None, 0).is_err());
    }

    const PAGE: u64 = 4096;

    #[test]
    fn dma_map_past_the_end_of_the_file_is_refused() {
        let mut m = DmaMap::default();
        let f = memfile(4096);
        let e = m.map(0, 1 << 20, Some(f.try_clone().unwrap()), 0);
        assert!(matches!(e, Err(DmaMapError::BeyondFile { .. })), "{e:?}");
        let e = m.map(0, 4096, Some(f.try_clone().unwrap()), 4096);
        assert!(matches!(e, Err(DmaMapError::BeyondFile { .. })), "{e:?}");
        assert!(m.is_empty());
        m.map(0, 4096, Some(f), 0).unwrap();
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn dma_map_offset_overflow_is_refused_and_splits_never_overflow() {
        let mut m = DmaMap::default();
        // fd-less, offset + size past u64::MAX: splitting it used to
        // overflow `offset + delta`.
        assert!(m.map(0, 3 * PAGE, None, u64::MAX - PAGE).is_err());
        assert!(m.is_empty());
        // Just fits: the pieces keep their offsets.
        m.map(0, 3 * PAGE, None, u64::MAX - 3 * PAGE).unwrap();
        m.unmap(PAGE, PAGE).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m.maps[&(2 * PAGE)].offset, u64::MAX - PAGE);
        m.check();
    }

    #[test]
    fn unmap_hole_punching_cannot_grow_the_table_past_max_mappings() {
        let mut m = DmaMap::default();
        let pages = 4 * MAX_MAPPINGS as u64;
        let f = tempfile::tempfile().unwrap();
        f.set_len(pages * PAGE).unwrap();
        m.map(0, pages * PAGE, Some(f), 0).unwrap();
        let mut refused = 0;
        for i in 0..1500u64 {
            if m.unmap((2 * i + 1) * PAGE, PAGE).is_err() {
                refused += 1;
            }
            assert!(m.len() <= MAX_MAPPINGS, "{} mappings", m.len());
        }
        assert!(refused > 0);
        assert_eq!(m.len(), MAX_MAPPINGS);
        assert!(m.host_mappings() <= MAX_MAPPINGS);
        m.check();
        // Unmapping whole mappings (shrinking the table) still works.
        m.unmap(0, 8 * PAGE).unwrap();
        assert!(m.len() < MAX_MAPPINGS);
        m.check();
    }

    #[test]
    fn hostile_dma_map_unmap_sequences_keep_the_table_bounded_and_consistent() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ram = GuestRam::empty();
        let mut m = DmaMap::default();
        let f = memfile(64 * PAGE as usize);
        // The model: guest page -> file page (None: fd-less).
        let mut model: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        for op in 0..3000 {
            let addr = rng.gen_range(0..128u64) * PAGE;
            let do_map = rng.gen_bool(0.5);
            let size = match rng.gen_range(0..10) {
                0 => 0,
                1 if addr > 0 => u64::MAX - addr + 1,  // wraps
                2 if do_map => rng.gen_range(1..PAGE), // not page-sized
                _ => rng.gen_range(1..16u64) * PAGE,
            };
            if do_map {
                let fd = rng.gen_bool(0.8);
                let offset = rng.gen_range(0..70u64) * PAGE;
                let r = m.map(addr, size, fd.then(|| f.try_clone().unwrap()), offset);
                let fits = size > 0
                    && size % PAGE == 0
                    && addr.checked_add(size).is_some()
                    && (!fd || offset + size <= 64 * PAGE);
                assert_eq!(
                    r.is_ok(),
                    fits,
                    "op {op}: map {addr:#x}+{size:#x} @{offset:#x}: {r:?}"
                );
                if r.is_ok() {
                    for p in 0..size / PAGE {
                        model.insert(addr / PAGE + p, fd.then_some(offset / PAGE + p));
                    }
                }
            } else {
                let r = m.unmap(addr, size);
                let ok = addr.checked_add(size).is_some();
                assert_eq!(r.is_ok(), ok, "op {op}: unmap {addr:#x}+{size:#x}: {r:?}");
                if ok {
                    let (a, e) = (addr / PAGE, (addr + size) / PAGE);
                    model.retain(|p, _| *p < a || *p >= e);
                }
            }
            m.check();
            m.publish(&ram);
            assert!(m.host_mappings() <= MAX_MAPPINGS);
            for _ in 0..4 {
                let p = rng.gen_range(0..150u64);
                let mut b = [0u8; 1];
                let got = ram.read(p * PAGE, &mut b).ok().map(|_| b[0]);
                let want = model.get(&p).copied().flatten().map(|fp| fp as u8);
                assert_eq!(got, want, "op {op}: page {p}");
            }
        }
    }

    #[test]
    fn file_shrunk_under_a_mapping_is_a_dma_error_not_sigbus() {
        let ram = GuestRam::empty();
        let mut m = DmaMap::default();
        let f = memfile(16 * PAGE as usize);
        let other = memfile(PAGE as usize);
        m.map(0, 16 * PAGE, Some(f.try_clone().unwrap()), 0)
            .unwrap();
        m.map(1 << 20, PAGE, Some(other), 0).unwrap();
        m.publish(&ram);
        let mut b = [0u8; 4];
        ram.read(8 * PAGE, &mut b).unwrap();
        assert_eq!(b, [8; 4]);
        // The client shrinks its file: the pages past the end are gone.
        f.set_len(PAGE).unwrap();
        // The access during which it happens fails as a DMA error; the
        // process lives.
        assert!(matches!(
            ram.read(8 * PAGE, &mut b),
            Err(hcd_emul::mem::DmaError::Vanished { .. })
        ));
        assert!(ram.write(9 * PAGE, &[1, 2, 3]).is_err());
        assert!(m.check_faults(), "the fault was seen");
        m.publish(&ram);
        assert_eq!(m.poisoned, 1);
        // From now on the whole mapping is a DMA error...
        assert!(ram.read(8 * PAGE, &mut b).is_err());
        assert!(ram.read(0, &mut b).is_err());
        assert!(ram.write(10 * PAGE, &[1]).is_err());
        // ...and the other one still works.
        ram.read(1 << 20, &mut b).unwrap();
        assert!(!m.check_faults());
        m.check();
        m.clear();
        m.publish(&ram);
        assert_eq!(m.host_mappings(), 0, "everything unmapped once unused");
    }
}
