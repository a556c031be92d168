//! The SCSI target behind the Bulk-Only Transport: a direct-access block
//! device with 512-byte blocks (SPC-4 and SBC-3 subset).
//!
//! [`Scsi::plan`] decodes one command descriptor block and decides what the
//! device wants to do in the data phase ([`Plan`]); the transport moves the
//! data. Block data never passes through here: a READ or WRITE becomes a
//! file range that the transport moves between the image file and guest
//! memory directly.

use std::fs::File;

/// Logical block size in bytes.
pub const BLOCK_SIZE: u64 = 512;

/// Sense key NO SENSE (SPC-4 table 27).
pub const KEY_NO_SENSE: u8 = 0x00;
/// Sense key MEDIUM ERROR.
pub const KEY_MEDIUM_ERROR: u8 = 0x03;
/// Sense key ILLEGAL REQUEST.
pub const KEY_ILLEGAL_REQUEST: u8 = 0x05;
/// Sense key DATA PROTECT.
pub const KEY_DATA_PROTECT: u8 = 0x07;
/// Sense key ABORTED COMMAND.
pub const KEY_ABORTED_COMMAND: u8 = 0x0b;

/// Sense data of the last failed command (SPC-4 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq }
    }
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x20, 0);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x21, 0);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB.
    pub const INVALID_FIELD: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x24, 0);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x25, 0);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x39, 0);
    /// DATA PROTECT, WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(KEY_DATA_PROTECT, 0x27, 0);
    /// MEDIUM ERROR, UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x11, 0);
    /// MEDIUM ERROR, WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x0c, 0);
    /// ABORTED COMMAND (the transport could not move the data).
    pub const ABORTED: Sense = Sense::new(KEY_ABORTED_COMMAND, 0, 0);

    /// Fixed-format sense data, 18 bytes (SPC-4 §4.5.3).
    pub fn to_fixed(self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

/// What a command wants from the data phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No data, GOOD status.
    NoData,
    /// Send these bytes (already cut to the allocation length), GOOD status.
    Reply(Vec<u8>),
    /// Send `len` bytes of the image from byte `offset`.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// Receive `len` bytes into the image at byte `offset`.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Byte count.
        len: u64,
    },
    /// No data, CHECK CONDITION with this sense.
    Fail(Sense),
}

/// Operation codes (SPC-4 / SBC-3).
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// INQUIRY vendor identification (8 bytes, ASCII).
pub const VENDOR: &[u8; 8] = b"HCDEMUL ";
/// INQUIRY product identification (16 bytes, ASCII).
pub const PRODUCT: &[u8; 16] = b"USB STORAGE     ";
/// INQUIRY product revision level (4 bytes, ASCII).
pub const REVISION: &[u8; 4] = b"0001";

fn be16(c: &[u8; 16], i: usize) -> u16 {
    u16::from_be_bytes([c[i], c[i + 1]])
}
fn be32(c: &[u8; 16], i: usize) -> u32 {
    u32::from_be_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]])
}
fn be64(c: &[u8; 16], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[i..i + 8]);
    u64::from_be_bytes(b)
}

fn reply(mut v: Vec<u8>, alloc: usize) -> Plan {
    v.truncate(alloc);
    Plan::Reply(v)
}

/// The logical unit: an image file of `blocks` 512-byte blocks.
#[derive(Debug)]
pub struct Scsi {
    file: File,
    blocks: u64,
    readonly: bool,
    serial: String,
    sense: Sense,
}

impl Scsi {
    /// A logical unit over `file` of `blocks` blocks.
    pub fn new(file: File, blocks: u64, readonly: bool, serial: String) -> Self {
        Self {
            file,
            blocks,
            readonly,
            serial,
            sense: Sense::default(),
        }
    }

    /// The unit serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Records the sense of a command that failed in the transport (an I/O
    /// error in the data phase, a bad LUN).
    pub fn set_sense(&mut self, s: Sense) {
        self.sense = s;
    }

    /// Forgets any pending sense (bus reset).
    pub fn clear_sense(&mut self) {
        self.sense = Sense::default();
    }

    /// Decodes `cdb` and returns what to do. Failures also become the
    /// pending sense that REQUEST SENSE returns next.
    pub fn plan(&mut self, cdb: &[u8; 16]) -> Plan {
        let p = self.decode(cdb);
        if cdb[0] != op::REQUEST_SENSE {
            self.sense = match &p {
                Plan::Fail(s) => *s,
                _ => Sense::default(),
            };
        }
        p
    }

    fn decode(&mut self, c: &[u8; 16]) -> Plan {
        match c[0] {
            op::TEST_UNIT_READY | op::PREVENT_ALLOW | op::START_STOP_UNIT => Plan::NoData,
            op::REQUEST_SENSE => {
                let s = std::mem::take(&mut self.sense);
                reply(s.to_fixed().to_vec(), usize::from(c[4]))
            }
            op::INQUIRY => self.inquiry(c),
            op::READ_CAPACITY_10 => {
                let last = self.blocks.saturating_sub(1).min(0xffff_ffff);
                let mut v = Vec::with_capacity(8);
                v.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                v.extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                Plan::Reply(v)
            }
            op::SERVICE_ACTION_IN_16 if c[1] & 0x1f == op::SA_READ_CAPACITY_16 => {
                let mut v = vec![0u8; 32];
                v[..8].copy_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
                v[8..12].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                reply(v, usize::try_from(be32(c, 10)).unwrap_or(usize::MAX))
            }
            op::READ_6 | op::WRITE_6 => {
                let lba = u64::from(be32(c, 0) & 0x001f_ffff);
                let n = if c[4] == 0 { 256 } else { u64::from(c[4]) };
                self.rw(c[0] == op::WRITE_6, lba, n)
            }
            op::READ_10 | op::WRITE_10 => self.rw(
                c[0] == op::WRITE_10,
                u64::from(be32(c, 2)),
                u64::from(be16(c, 7)),
            ),
            op::READ_16 | op::WRITE_16 => {
                self.rw(c[0] == op::WRITE_16, be64(c, 2), u64::from(be32(c, 10)))
            }
            op::VERIFY_10 => {
                if c[1] & 0x06 != 0 {
                    // BYTCHK: would need a data-out phase we do not offer.
                    return Plan::Fail(Sense::INVALID_FIELD);
                }
                match self.range(u64::from(be32(c, 2)), u64::from(be16(c, 7))) {
                    Ok(_) => Plan::NoData,
                    Err(s) => Plan::Fail(s),
                }
            }
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                if self.readonly {
                    return Plan::NoData;
                }
                match self.file.sync_data() {
                    Ok(()) => Plan::NoData,
                    Err(e) => {
                        guest_warn!(target: "storage::scsi", "fdatasync of the image failed: {e}");
                        Plan::Fail(Sense::WRITE_ERROR)
                    }
                }
            }
            op::REPORT_LUNS => {
                // One LUN, number 0 (SPC-4 §6.33): list length 8, then it.
                let mut v = vec![0u8; 16];
                v[3] = 8;
                reply(v, usize::try_from(be32(c, 6)).unwrap_or(usize::MAX))
            }
            op::MODE_SENSE_6 => self.mode_sense(c, false),
            op::MODE_SENSE_10 => self.mode_sense(c, true),
            _ => Plan::Fail(Sense::INVALID_OPCODE),
        }
    }

    /// Checks `[lba, lba + n)` against the capacity; returns the byte range.
    fn range(&self, lba: u64, n: u64) -> Result<(u64, u64), Sense> {
        match lba.checked_add(n) {
            Some(end) if end <= self.blocks => {}
            _ => return Err(Sense::LBA_OUT_OF_RANGE),
        }
        // end <= blocks and blocks * 512 fits (it came from a file length).
        let off = lba.checked_mul(BLOCK_SIZE).ok_or(Sense::LBA_OUT_OF_RANGE)?;
        let len = n.checked_mul(BLOCK_SIZE).ok_or(Sense::LBA_OUT_OF_RANGE)?;
        Ok((off, len))
    }

    fn rw(&self, write: bool, lba: u64, n: u64) -> Plan {
        if write && self.readonly {
            return Plan::Fail(Sense::WRITE_PROTECTED);
        }
        match self.range(lba, n) {
            Err(s) => Plan::Fail(s),
            Ok((_, 0)) => Plan::NoData,
            Ok((offset, len)) if write => Plan::Write { offset, len },
            Ok((offset, len)) => Plan::Read { offset, len },
        }
    }

    fn inquiry(&self, c: &[u8; 16]) -> Plan {
        let evpd = c[1] & 1 != 0;
        let page = c[2];
        let alloc = usize::from(be16(c, 3));
        if !evpd {
            if page != 0 {
                return Plan::Fail(Sense::INVALID_FIELD);
            }
            let mut v = vec![0u8; 36];
            v[0] = 0x00; // connected direct-access block device
            v[1] = 0x80; // RMB: removable medium
            v[2] = 0x06; // SPC-4
            v[3] = 0x02; // response data format 2
            v[4] = 31; // additional length
            v[8..16].copy_from_slice(VENDOR);
            v[16..32].copy_from_slice(PRODUCT);
            v[32..36].copy_from_slice(REVISION);
            return reply(v, alloc);
        }
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83],
            0x80 => self.serial.as_bytes().to_vec(),
            0x83 => {
                // One T10 vendor ID based designator (SPC-4 §7.8.6.4), ASCII.
                let mut id = VENDOR.to_vec();
                id.extend_from_slice(self.serial.as_bytes());
                id.truncate(250);
                let mut d = vec![0x02, 0x01, 0x00, u8::try_from(id.len()).unwrap_or(0)];
                d.extend_from_slice(&id);
                d
            }
            _ => return Plan::Fail(Sense::INVALID_FIELD),
        };
        let mut v = vec![0x00, page];
        v.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
        v.extend_from_slice(&body);
        reply(v, alloc)
    }

    fn mode_sense(&self, c: &[u8; 16], ten: bool) -> Plan {
        let pc = c[2] >> 6;
        let page = c[2] & 0x3f;
        let subpage = c[3];
        let alloc = if ten {
            usize::from(be16(c, 7))
        } else {
            usize::from(c[4])
        };
        if pc == 3 {
            return Plan::Fail(Sense::SAVING_NOT_SUPPORTED);
        }
        if subpage != 0 && !(subpage == 0xff && page == 0x3f) {
            return Plan::Fail(Sense::INVALID_FIELD);
        }
        let changeable = pc == 1;
        let caching = {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            if !changeable {
                p[2] = 0x04; // WCE: SYNCHRONIZE CACHE makes writes durable
            }
            p
        };
        let iec = {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 0x0a;
            p
        };
        let pages = match page {
            0x08 => caching,
            0x1c => iec,
            0x3f => [caching, iec].concat(),
            _ => return Plan::Fail(Sense::INVALID_FIELD),
        };
        let wp = if self.readonly { 0x80 } else { 0 };
        let mut v = if ten {
            vec![0, 0, 0, wp, 0, 0, 0, 0]
        } else {
            vec![0, 0, wp, 0]
        };
        v.extend_from_slice(&pages);
        if ten {
            let n = u16::try_from(v.len() - 2).unwrap_or(u16::MAX);
            v[..2].copy_from_slice(&n.to_be_bytes());
        } else {
            v[0] = u8::try_from(v.len() - 1).unwrap_or(u8::MAX);
        }
        reply(v, alloc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lun(blocks: u64, ro: bool) -> Scsi {
        Scsi::new(
            tempfile::tempfile().unwrap(),
            blocks,
            ro,
            "0123456789AB".into(),
        )
    }

    fn cdb(b: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..b.len()].copy_from_slice(b);
        c
    }

    #[test]
    fn read_capacity_10_caps_at_32_bits() {
        let mut s = lun(1 << 33, false);
        let Plan::Reply(v) = s.plan(&cdb(&[0x25])) else {
            panic!()
        };
        assert_eq!(v, [0xff, 0xff, 0xff, 0xff, 0, 0, 2, 0]);
        let Plan::Reply(v) = s.plan(&cdb(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32]))
        else {
            panic!()
        };
        assert_eq!(&v[..12], &[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 2, 0]);
    }

    #[test]
    fn lba_overflow_is_out_of_range() {
        let mut s = lun(100, false);
        let mut c = cdb(&[0x88]);
        c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c[13] = 1;
        assert_eq!(s.plan(&c), Plan::Fail(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(
            s.plan(&cdb(&[0x28, 0, 0, 0, 0, 99, 0, 0, 2])),
            Plan::Fail(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            s.plan(&cdb(&[0x28, 0, 0, 0, 0, 99, 0, 0, 1])),
            Plan::Read {
                offset: 99 * 512,
                len: 512
            }
        );
    }

    #[test]
    fn mode_sense_reports_write_protect_and_pages() {
        let mut s = lun(8, true);
        let Plan::Reply(v) = s.plan(&cdb(&[0x1a, 0, 0x3f, 0, 0xff])) else {
            panic!()
        };
        assert_eq!(v[2], 0x80);
        assert_eq!(usize::from(v[0]) + 1, v.len());
        assert_eq!(v.len(), 4 + 20 + 12);
        let Plan::Reply(v) = s.plan(&cdb(&[0x5a, 0, 0x08, 0, 0, 0, 0, 0, 0xff])) else {
            panic!()
        };
        assert_eq!(v.len(), 8 + 20);
        assert_eq!(v[3], 0x80);
        assert_eq!(
            s.plan(&cdb(&[0x1a, 0, 0x05, 0, 0xff])),
            Plan::Fail(Sense::INVALID_FIELD)
        );
    }
}
