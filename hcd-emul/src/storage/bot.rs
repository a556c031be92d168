//! USB Mass Storage Class Bulk-Only Transport 1.0: the Command Block
//! Wrapper (§5.1), the Command Status Wrapper (§5.2) and the reconciliation
//! of what the host expects with what the device intends (§6.7, "the
//! thirteen cases").

use std::collections::VecDeque;
use std::fs::File;

use super::scsi::Plan;
use crate::mem::DmaError;
use crate::usb::{Transfer, TransferId, TransferStatus};

/// dCBWSignature, "USBC" little-endian.
pub const CBW_SIGNATURE: u32 = 0x4342_5355;
/// dCSWSignature, "USBS" little-endian.
pub const CSW_SIGNATURE: u32 = 0x5342_5355;
/// A CBW is exactly 31 bytes.
pub const CBW_LEN: usize = 31;
/// A CSW is exactly 13 bytes.
pub const CSW_LEN: usize = 13;

/// bCSWStatus: command passed.
pub const STATUS_PASSED: u8 = 0;
/// bCSWStatus: command failed.
pub const STATUS_FAILED: u8 = 1;
/// bCSWStatus: phase error.
pub const STATUS_PHASE_ERROR: u8 = 2;

/// A decoded, valid Command Block Wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cbw {
    /// dCBWTag, echoed in the CSW.
    pub tag: u32,
    /// dCBWDataTransferLength: bytes the host expects to move.
    pub data_len: u32,
    /// bmCBWFlags bit 7: data-in.
    pub dir_in: bool,
    /// bCBWLUN.
    pub lun: u8,
    /// CBWCB, zero past bCBWCBLength.
    pub cdb: [u8; 16],
}

impl Cbw {
    /// Decodes a CBW; `None` if it is not valid (§6.2.1: wrong size or
    /// signature) or not meaningful (bCBWCBLength outside 1..=16).
    pub fn parse(b: &[u8]) -> Option<Cbw> {
        let b: &[u8; CBW_LEN] = b.try_into().ok()?;
        let sig = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if sig != CBW_SIGNATURE {
            return None;
        }
        let cb_len = usize::from(b[14] & 0x1f);
        if !(1..=16).contains(&cb_len) {
            return None;
        }
        let mut cdb = [0u8; 16];
        cdb[..cb_len].copy_from_slice(&b[15..15 + cb_len]);
        Some(Cbw {
            tag: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            data_len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            dir_in: b[12] & 0x80 != 0,
            lun: b[13] & 0x0f,
            cdb,
        })
    }

    /// The wire form (for test drivers).
    pub fn to_bytes(&self) -> [u8; CBW_LEN] {
        let mut b = [0u8; CBW_LEN];
        b[0..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.data_len.to_le_bytes());
        b[12] = if self.dir_in { 0x80 } else { 0 };
        b[13] = self.lun;
        b[14] = 16;
        b[15..31].copy_from_slice(&self.cdb);
        b
    }
}

/// Builds a CSW.
pub fn csw(tag: u32, residue: u32, status: u8) -> [u8; CSW_LEN] {
    let mut b = [0u8; CSW_LEN];
    b[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
    b[4..8].copy_from_slice(&tag.to_le_bytes());
    b[8..12].copy_from_slice(&residue.to_le_bytes());
    b[12] = status;
    b
}

/// Where the device's side of the data phase goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevData {
    /// Nothing: IN transfers stall, OUT data is accepted and discarded.
    Nothing,
    /// Send from this buffer.
    Buffer(Vec<u8>),
    /// Send the image from this byte offset.
    Read(u64),
    /// Write to the image from this byte offset.
    Write(u64),
}

impl DevData {
    /// Moves up to `n` bytes of the device's data, from byte `at` of the
    /// data phase, into (`dir_in`) or out of the transfer's buffer: a reply
    /// buffer, or the image `file` directly. Data whose direction does not
    /// match moves nothing. Returns the bytes moved.
    pub fn move_data(
        &self,
        x: &Transfer,
        dir_in: bool,
        at: u64,
        n: usize,
        file: &File,
    ) -> Result<usize, DmaError> {
        match (self, dir_in) {
            (DevData::Buffer(v), true) => {
                let from = usize::try_from(at).unwrap_or(usize::MAX);
                match v.get(from..from.saturating_add(n)) {
                    Some(s) => x.write_data(0, s),
                    None => Ok(0),
                }
            }
            (DevData::Read(off), true) => match off.checked_add(at) {
                Some(o) => x.fill_from_file(0, n, file, o),
                None => Err(DmaError::Io),
            },
            (DevData::Write(off), false) => match off.checked_add(at) {
                Some(o) => x.drain_to_file(0, n, file, o),
                None => Err(DmaError::Io),
            },
            _ => Ok(0),
        }
    }
}

/// Completes parked transfer `id` as cancelled if it is in `q`.
pub fn cancel_parked(q: &mut VecDeque<Transfer>, id: TransferId) {
    if let Some(i) = q.iter().position(|t| t.id() == id) {
        if let Some(t) = q.remove(i) {
            t.complete(TransferStatus::Cancelled, 0);
        }
    }
}

/// A data phase in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPhase {
    /// dCBWTag.
    pub tag: u32,
    /// Host direction: IN.
    pub dir_in: bool,
    /// dCBWDataTransferLength.
    pub host_len: u64,
    /// Bytes moved on the bus so far.
    pub done: u64,
    /// Device source or sink.
    pub dev: DevData,
    /// Bytes the device will send or keep.
    pub dev_len: u64,
    /// Bytes the device has sent or kept so far.
    pub dev_done: u64,
    /// bCSWStatus when the phase ends normally.
    pub status: u8,
}

impl DataPhase {
    /// dCSWDataResidue: expected minus processed (§5.2).
    pub fn residue(&self) -> u32 {
        let r = self.host_len.saturating_sub(self.dev_done);
        u32::try_from(r).unwrap_or(u32::MAX)
    }
}

/// What follows a CBW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A data phase.
    Data(DataPhase),
    /// Straight to the CSW (no data expected by the host).
    Status([u8; CSW_LEN]),
}

/// Reconciles the host's expectation (the CBW) with the device's intent (the
/// SCSI plan), following BOT §6.7:
///
/// * Hn: cases 1 (Dn: pass/fail as planned), 2 and 3 (Di/Do: phase error).
/// * Hi: case 4 (Dn: stall bulk-IN, residue H), 5 (Di < Hi: send D, stall,
///   residue), 6 (equal), 7 (Di > Hi: send H, phase error; a reply cut to
///   its allocation length is simply cut to H, as SCSI allows), 8 (Do:
///   stall, phase error).
/// * Ho: case 9 (Dn: accept and discard, residue H), 10 (Di: discard, phase
///   error), 11 (Do < Ho: write D, discard the rest, residue), 12 (equal),
///   13 (Do > Ho: discard, phase error).
///
/// Returns the next step.
pub fn reconcile(cbw: &Cbw, plan: Plan) -> Next {
    let h = u64::from(cbw.data_len);
    let (dev, dev_len, dev_in, status) = match plan {
        Plan::NoData => (DevData::Nothing, 0, None, STATUS_PASSED),
        Plan::Fail(_) => (DevData::Nothing, 0, None, STATUS_FAILED),
        Plan::Reply(v) if v.is_empty() => (DevData::Nothing, 0, None, STATUS_PASSED),
        Plan::Reply(mut v) => {
            // Allocation-length semantics: cut to what the host takes.
            v.truncate(usize::try_from(h).unwrap_or(usize::MAX));
            let n = v.len() as u64;
            (DevData::Buffer(v), n, Some(true), STATUS_PASSED)
        }
        Plan::Read { offset, len } => (DevData::Read(offset), len, Some(true), STATUS_PASSED),
        Plan::Write { offset, len } => (DevData::Write(offset), len, Some(false), STATUS_PASSED),
    };
    let phase = |dev, dev_len, status| DataPhase {
        tag: cbw.tag,
        dir_in: cbw.dir_in,
        host_len: h,
        done: 0,
        dev,
        dev_len,
        dev_done: 0,
        status,
    };
    if h == 0 {
        let st = if dev_in.is_some() && dev_len > 0 {
            STATUS_PHASE_ERROR
        } else {
            status
        };
        return Next::Status(csw(cbw.tag, 0, st));
    }
    // An empty reply with data expected behaves as Dn.
    let dev_in = if dev_len == 0 { None } else { dev_in };
    Next::Data(match (cbw.dir_in, dev_in) {
        (_, None) => phase(DevData::Nothing, 0, status),
        (true, Some(true)) => {
            if dev_len > h {
                phase(dev, h, STATUS_PHASE_ERROR)
            } else {
                phase(dev, dev_len, status)
            }
        }
        (false, Some(false)) if dev_len <= h => phase(dev, dev_len, status),
        _ => phase(DevData::Nothing, 0, STATUS_PHASE_ERROR),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbw(len: u32, dir_in: bool) -> Cbw {
        Cbw {
            tag: 9,
            data_len: len,
            dir_in,
            lun: 0,
            cdb: [0; 16],
        }
    }

    #[test]
    fn cbw_round_trips_and_rejects_garbage() {
        let c = cbw(4096, true);
        assert_eq!(Cbw::parse(&c.to_bytes()), Some(c));
        assert_eq!(Cbw::parse(&c.to_bytes()[..30]), None);
        let mut b = c.to_bytes();
        b[0] = 0;
        assert_eq!(Cbw::parse(&b), None);
        let mut b = c.to_bytes();
        b[14] = 0;
        assert_eq!(Cbw::parse(&b), None);
    }

    #[test]
    fn thirteen_cases() {
        let rd = |len| Plan::Read { offset: 0, len };
        let wr = |len| Plan::Write { offset: 0, len };
        // 1, 2, 3
        assert_eq!(
            reconcile(&cbw(0, false), Plan::NoData),
            Next::Status(csw(9, 0, 0))
        );
        assert_eq!(
            reconcile(&cbw(0, false), rd(512)),
            Next::Status(csw(9, 0, 2))
        );
        assert_eq!(
            reconcile(&cbw(0, false), wr(512)),
            Next::Status(csw(9, 0, 2))
        );
        let data = |n: Next| match n {
            Next::Data(d) => d,
            Next::Status(_) => panic!("expected data"),
        };
        // 4: Hi > Dn
        let d = data(reconcile(&cbw(512, true), Plan::NoData));
        assert_eq!((d.dev_len, d.status, d.residue()), (0, 0, 512));
        // 5, 6, 7
        let d = data(reconcile(&cbw(1024, true), rd(512)));
        assert_eq!((d.dev_len, d.status), (512, 0));
        let d = data(reconcile(&cbw(512, true), rd(512)));
        assert_eq!((d.dev_len, d.status), (512, 0));
        let d = data(reconcile(&cbw(512, true), rd(1024)));
        assert_eq!((d.dev_len, d.status), (512, 2));
        // 8: Hi <> Do
        let d = data(reconcile(&cbw(512, true), wr(512)));
        assert_eq!((d.dev, d.status), (DevData::Nothing, 2));
        // 9, 10, 11, 12, 13
        let d = data(reconcile(&cbw(512, false), Plan::NoData));
        assert_eq!((d.dev, d.status), (DevData::Nothing, 0));
        let d = data(reconcile(&cbw(512, false), rd(512)));
        assert_eq!((d.dev, d.status), (DevData::Nothing, 2));
        let d = data(reconcile(&cbw(1024, false), wr(512)));
        assert_eq!((d.dev_len, d.status), (512, 0));
        let d = data(reconcile(&cbw(512, false), wr(512)));
        assert_eq!((d.dev_len, d.status), (512, 0));
        let d = data(reconcile(&cbw(512, false), wr(1024)));
        assert_eq!((d.dev, d.status), (DevData::Nothing, 2));
    }
}
