//! Guest memory on Xen: a map cache of 1 MiB buckets of foreign mappings,
//! filled when DMA first touches a bucket and dropped as a whole on
//! INVALIDATE or when it outgrows its budget.
//!
//! Pinning comes from [`GuestRam`](hcd_emul::GuestRam): an access holds
//! the map it started with, and with it every mapping in that map, until it
//! ends; dropping a bucket from the cache only unmaps it once the last
//! access using it is done. So an INVALIDATE during DMA never pulls memory
//! from under an access, and the next access maps the guest's new p2m.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hcd_emul::mem::GuestMapper;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use super::hv::Hypervisor;
use hcd_emul::guest_warn;

/// Bucket size: 256 pages, as QEMU's map cache.
pub const BUCKET_SHIFT: u32 = 20;
const PAGE_SHIFT: u32 = 12;
const PAGES_PER_BUCKET: u64 = 1 << (BUCKET_SHIFT - PAGE_SHIFT);
/// Most buckets one access may map (a single DMA segment is far smaller).
const MAX_BUCKETS_PER_ACCESS: u64 = 64;

/// Counters.
#[derive(Debug, Default)]
pub struct MapCacheStats {
    /// `map_guest` calls made.
    pub map_calls: AtomicU64,
    /// Pages Xen refused to map.
    pub failed_pages: AtomicU64,
    /// Times the whole cache was dropped (INVALIDATE or budget).
    pub flushes: AtomicU64,
}

/// The map cache: a [`GuestMapper`] over [`Hypervisor::map_guest`].
#[derive(Debug)]
pub struct MapCache {
    hv: Arc<dyn Hypervisor>,
    /// Most bytes mapped at once before the cache starts over.
    budget: u64,
    /// Frames Xen refused (not RAM, or not the guest's): not asked for
    /// again until the next flush, so a guest pointing DMA at holes cannot
    /// make us hammer the hypervisor.
    refused: Mutex<HashSet<u64>>,
    /// Counters.
    pub stats: MapCacheStats,
}

impl MapCache {
    /// A cache mapping at most `budget` bytes at once.
    pub fn new(hv: Arc<dyn Hypervisor>, budget: u64) -> Self {
        Self {
            hv,
            budget: budget.max(1 << BUCKET_SHIFT),
            refused: Mutex::new(HashSet::new()),
            stats: MapCacheStats::default(),
        }
    }

    /// Forgets refused frames (call with the INVALIDATE flush).
    pub fn flushed(&self) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Maps frames `first..first + n` (all expected to work) as one region.
    /// If Xen refuses the whole run (a hole: not RAM, not the guest's),
    /// its frames are remembered as refused like single failed frames, so
    /// a guest pointing DMA at a hole again and again costs one
    /// `MMAPBATCH` per flush, not one per access.
    fn map_run(&self, first: u64, n: u64) -> Option<(MmapRegion, Vec<i32>)> {
        self.stats.map_calls.fetch_add(1, Ordering::Relaxed);
        match self.hv.map_guest(first, n as usize) {
            Ok(m) => Some((m.region, m.errors)),
            Err(e) => {
                guest_warn!("xen: mapping guest frames {first:#x}+{n}: {e}");
                self.stats.failed_pages.fetch_add(n, Ordering::Relaxed);
                if e.raw_os_error() != Some(libc::ENOENT) {
                    self.refused
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(first..first + n);
                }
                None
            }
        }
    }

    /// Regions covering the unmapped, not refused frames of `frames`.
    fn map_frames(&self, frames: &[u64]) -> Vec<GuestRegionMmap> {
        let mut out = Vec::new();
        for run in runs(frames) {
            let Some((region, errors)) = self.map_run(run.0, run.1) else {
                continue;
            };
            if errors.iter().all(|e| *e == 0) {
                out.extend(GuestRegionMmap::new(
                    region,
                    GuestAddress(run.0 << PAGE_SHIFT),
                ));
                continue;
            }
            // Some frames failed: the mapping cannot be split, so map each
            // good sub-run on its own and remember the refused frames
            // (ENOENT, paged out, is worth another try later).
            drop(region);
            let mut good = Vec::new();
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            for (i, e) in errors.iter().enumerate() {
                let gfn = run.0 + i as u64;
                if *e == 0 {
                    good.push(gfn);
                } else {
                    self.stats.failed_pages.fetch_add(1, Ordering::Relaxed);
                    if *e != -libc::ENOENT {
                        refused.insert(gfn);
                    }
                }
            }
            drop(refused);
            for sub in runs(&good) {
                if let Some((region, errors)) = self.map_run(sub.0, sub.1) {
                    if errors.iter().all(|e| *e == 0) {
                        out.extend(GuestRegionMmap::new(
                            region,
                            GuestAddress(sub.0 << PAGE_SHIFT),
                        ));
                    }
                }
            }
        }
        out
    }
}

/// Consecutive runs `(first, count)` of sorted frame numbers.
fn runs(frames: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &f in frames {
        match out.last_mut() {
            Some((s, n)) if *s + *n == f => *n += 1,
            _ => out.push((f, 1)),
        }
    }
    out
}

impl GuestMapper for MapCache {
    fn map(&self, addr: u64, len: usize, current: &GuestMemoryMmap) -> Option<GuestMemoryMmap> {
        let last = addr.checked_add(len.max(1) as u64 - 1)?;
        let (b0, b1) = (addr >> BUCKET_SHIFT, last >> BUCKET_SHIFT);
        if b1 - b0 >= MAX_BUCKETS_PER_ACCESS {
            guest_warn!("xen: DMA of {len:#x} bytes at {addr:#x} spans too many buckets");
            return None;
        }
        let mapped: u64 = current.iter().map(|r| r.len()).sum();
        let mut map = if mapped + ((b1 - b0 + 1) << BUCKET_SHIFT) > self.budget {
            self.flushed();
            GuestMemoryMmap::default()
        } else {
            current.clone()
        };
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut frames = Vec::new();
        for b in b0..=b1 {
            for gfn in (b * PAGES_PER_BUCKET)..((b + 1) * PAGES_PER_BUCKET) {
                let covered = map.find_region(GuestAddress(gfn << PAGE_SHIFT)).is_some();
                if !covered && !refused.contains(&gfn) {
                    frames.push(gfn);
                }
            }
        }
        if frames.is_empty() {
            return None;
        }
        for r in self.map_frames(&frames) {
            match map.insert_region(Arc::new(r)) {
                Ok(m) => map = m,
                Err(e) => guest_warn!("xen: map cache: {e}"),
            }
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::fake::FakeXen;

    /// A wholly invalid bucket (every frame refused, so `map_guest` fails
    /// as a whole) was not remembered: every access to the hole repeated
    /// a 256-page MMAPBATCH.
    #[test]
    fn repeated_dma_into_a_p2m_hole_maps_it_once_per_flush() {
        let xen = FakeXen::new(1, 16 << 20, 0x800..0x900);
        let cache = MapCache::new(xen.clone(), 1 << 30);
        let empty = GuestMemoryMmap::default();
        let hole = |a: u64| {
            cache
                .map(a, 8, &empty)
                .is_none_or(|m| m.find_region(GuestAddress(a)).is_none())
        };
        for i in 0..1000u64 {
            assert!(hole((0x800 << 12) + i * 8));
        }
        assert_eq!(xen.rec().map_calls, 1, "one MMAPBATCH for the hole");
        // RAM next to it still maps.
        assert!(cache
            .map(0x700 << 12, 8, &empty)
            .is_some_and(|m| m.find_region(GuestAddress(0x700 << 12)).is_some()));
        let calls = xen.rec().map_calls;
        // INVALIDATE forgets: the hole is asked for once more.
        cache.flushed();
        assert!(hole(0x800 << 12));
        assert!(hole(0x800 << 12));
        assert_eq!(xen.rec().map_calls, calls + 1);
    }
}
