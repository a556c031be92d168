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
use std::sync::Arc;

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
}

/// A cloneable handle to guest physical memory.
#[derive(Clone, Debug)]
pub struct GuestRam {
    inner: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl GuestRam {
    /// Wraps a memory map.
    pub fn new(map: GuestMemoryMmap) -> Self {
        Self {
            inner: GuestMemoryAtomic::new(map),
        }
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
        Self::check(addr, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.inner
            .memory()
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| DmaError::Unmapped {
                addr,
                len: buf.len(),
            })
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        Self::check(addr, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.inner
            .memory()
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| DmaError::Unmapped {
                addr,
                len: data.len(),
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
        if Self::check(addr, len).is_err() {
            return false;
        }
        len == 0
            || GuestMemory::check_range(
                &*self.inner.memory(),
                GuestAddress(addr),
                len,
                vm_memory::Permissions::ReadWrite,
            )
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
        let map = self.inner.memory().into_inner();
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
    /// straight from the file into guest RAM (no bounce buffer). Bytes past
    /// the end of the file read as zeros.
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
        Self::check(addr, len)?;
        if !self.is_mapped(addr, len) {
            return Err(DmaError::Unmapped { addr, len });
        }
        let mem = self.inner.memory();
        let mut done = 0;
        while done < len {
            let a = GuestAddress(addr + done as u64);
            match mem.read_volatile_from(a, src, len - done) {
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
    /// straight from guest RAM (no bounce buffer).
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
        Self::check(addr, len)?;
        if !self.is_mapped(addr, len) {
            return Err(DmaError::Unmapped { addr, len });
        }
        let mem = self.inner.memory();
        mem.write_all_volatile_to(GuestAddress(addr), dst, len)
            .map_err(|_| DmaError::Io)
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
}

impl<'a> FileCursor<'a> {
    /// A cursor at `off` (the descriptor's own offset is not trusted).
    pub fn new(file: &'a File, off: u64) -> Self {
        Self {
            file,
            off,
            os_pos: None,
        }
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
