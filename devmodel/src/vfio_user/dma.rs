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
use std::sync::Arc;

use hcd_emul::GuestRam;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Most mappings kept (QEMU uses a few dozen).
pub const MAX_MAPPINGS: usize = 1024;

/// Why a DMA request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DmaMapError {
    /// Zero size, wrap-around, or more mappings than [`MAX_MAPPINGS`].
    #[error("invalid DMA range {addr:#x}+{size:#x}")]
    Invalid {
        /// Start.
        addr: u64,
        /// Size.
        size: u64,
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

#[derive(Debug, Clone)]
struct Mapping {
    size: u64,
    file: Option<Arc<File>>,
    offset: u64,
    region: Option<Arc<GuestRegionMmap>>,
}

/// The client's DMA mappings, keyed by guest (IOVA) start address.
#[derive(Debug, Default)]
pub struct DmaMap {
    maps: BTreeMap<u64, Mapping>,
}

fn mmap(
    addr: u64,
    size: u64,
    file: &Arc<File>,
    offset: u64,
) -> Result<Arc<GuestRegionMmap>, DmaMapError> {
    let len = usize::try_from(size).map_err(|_| DmaMapError::Invalid { addr, size })?;
    GuestRegionMmap::from_range(
        GuestAddress(addr),
        len,
        Some(FileOffset::from_arc(file.clone(), offset)),
    )
    .map(Arc::new)
    .map_err(|e| DmaMapError::Mmap {
        addr,
        size,
        msg: e.to_string(),
    })
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

    /// Removes `[addr, addr+size)` from every mapping it touches, keeping
    /// the parts outside it.
    fn punch(&mut self, addr: u64, size: u64) -> Result<(), DmaMapError> {
        let end = addr + size;
        let touched: Vec<u64> = self
            .maps
            .range(..end)
            .filter(|(s, m)| **s + m.size > addr)
            .map(|(s, _)| *s)
            .collect();
        for s in touched {
            let Some(m) = self.maps.remove(&s) else {
                continue;
            };
            let m_end = s + m.size;
            if s < addr {
                self.insert_piece(s, addr - s, &m, 0)?;
            }
            if m_end > end {
                self.insert_piece(end, m_end - end, &m, end - s)?;
            }
        }
        Ok(())
    }

    fn insert_piece(
        &mut self,
        start: u64,
        size: u64,
        m: &Mapping,
        delta: u64,
    ) -> Result<(), DmaMapError> {
        let offset = m.offset + delta;
        let region = match &m.file {
            Some(f) => Some(mmap(start, size, f, offset)?),
            None => None,
        };
        self.maps.insert(
            start,
            Mapping {
                size,
                file: m.file.clone(),
                offset,
                region,
            },
        );
        Ok(())
    }

    /// `DMA_MAP`: `size` bytes at guest `addr`, backed by `file` at
    /// `offset` (no file: the range exists but cannot be accessed).
    pub fn map(
        &mut self,
        addr: u64,
        size: u64,
        file: Option<File>,
        offset: u64,
    ) -> Result<(), DmaMapError> {
        if size == 0 || addr.checked_add(size).is_none() || self.maps.len() >= MAX_MAPPINGS {
            return Err(DmaMapError::Invalid { addr, size });
        }
        let file = file.map(Arc::new);
        let region = match &file {
            Some(f) => Some(mmap(addr, size, f, offset)?),
            None => None,
        };
        self.punch(addr, size)?;
        self.maps.insert(
            addr,
            Mapping {
                size,
                file,
                offset,
                region,
            },
        );
        Ok(())
    }

    /// `DMA_UNMAP` of `[addr, addr+size)`.
    pub fn unmap(&mut self, addr: u64, size: u64) -> Result<(), DmaMapError> {
        if addr.checked_add(size).is_none() {
            return Err(DmaMapError::Invalid { addr, size });
        }
        if size == 0 {
            return Ok(());
        }
        self.punch(addr, size)
    }

    /// Forgets everything (client gone).
    pub fn clear(&mut self) {
        self.maps.clear();
    }

    /// Publishes the current mappings to the controller's guest memory.
    pub fn publish(&self, ram: &GuestRam) {
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
        assert!(byte(0).is_err());
        assert!(m.map(u64::MAX - 10, 4096, None, 0).is_err());
        assert!(m.map(0, 0, None, 0).is_err());
    }
}
