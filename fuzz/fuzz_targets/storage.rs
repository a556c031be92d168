//! Fuzzes the emulated stick directly through the `UsbDevice` trait, as a
//! host controller would drive it: Bulk-Only (CBW / data / CSW), UAS
//! (Command and Task Management IUs, status and data transfers on
//! streams), SCSI CDBs, control requests, cancellations and bus resets,
//! over a 1 MiB image shared by the process and 256 KiB of anonymous guest
//! memory.
//!
//! Input: byte 0 picks BOT (high speed) or UAS (SuperSpeed with streams,
//! or high speed with Ready IUs; `uas = true`, SET_INTERFACE alternate
//! setting 1 after SET_CONFIGURATION) and read-only or not; then at most [`MAX_OPS`] operations. CDBs are
//! mostly well-formed commands the SCSI layer knows, with LBAs and lengths
//! mostly inside the image.
//!
//! Checked: every transfer completes exactly once: after the final bus
//! reset, everything submitted and not cancelled by the "controller" has a
//! completion; nothing completes twice.
#![no_main]

use std::collections::{HashMap, HashSet};

use hcd_emul::storage::uas::{EP_COMMAND, EP_DATA_IN, EP_DATA_OUT, EP_STATUS};
use hcd_emul::usb::Segment;
use hcd_emul::usb::{
    CompletionQueue, Direction, SetupPacket, Speed, Transfer, TransferHandle, TransferId,
    TransferKind, UsbDevice,
};
use hcd_emul::{GuestRam, UsbStorage};
use hcd_emul_fuzz::{image, run_small_stack};
use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;

const MAX_OPS: usize = 128;
const RAM: usize = 256 << 10;
/// Blocks in the image (1 MiB / 512).
const BLOCKS: u32 = 2048;
const CBW_SIGNATURE: u32 = 0x4342_5355;

/// SCSI operation codes the stick implements (and a few it does not).
const OPCODES: [u8; 24] = [
    0x00, 0x03, 0x12, 0x15, 0x1a, 0x1b, 0x1e, 0x23, 0x25, 0x28, 0x2a, 0x2f, 0x35, 0x55, 0x5a, 0x88,
    0x8a, 0x8f, 0x91, 0x9e, 0xa0, 0xa8, 0xaa, 0x04,
];

struct Host {
    dev: UsbStorage,
    ram: GuestRam,
    q: CompletionQueue,
    next: u64,
    handles: Vec<TransferHandle>,
    /// Submitted and not (yet) cancelled by us.
    live: HashSet<TransferId>,
    done: HashMap<TransferId, u32>,
}

impl Host {
    fn submit(
        &mut self,
        ep: u8,
        dir: Direction,
        kind: TransferKind,
        segs: Vec<Segment>,
        stream: u16,
    ) {
        let id = TransferId(self.next);
        self.next += 1;
        let (mut t, h) = Transfer::new(
            id,
            ep,
            dir,
            kind,
            segs,
            self.ram.clone(),
            vec![],
            self.q.clone(),
        );
        t.set_stream_id(stream);
        self.handles.push(h);
        self.live.insert(id);
        self.dev.submit(t);
        self.collect();
    }

    fn collect(&mut self) {
        for r in self.q.drain() {
            let n = self.done.entry(r.id).or_default();
            *n += 1;
            assert_eq!(*n, 1, "transfer {:?} completed twice", r.id);
        }
    }

    fn control(&mut self, setup: SetupPacket, addr: u64) {
        let dir = setup.direction();
        let segs = if setup.length == 0 {
            vec![]
        } else {
            vec![Segment::Guest {
                addr,
                len: usize::from(setup.length),
            }]
        };
        self.submit(0, dir, TransferKind::Control(setup), segs, 0);
    }
}

/// A guest buffer: mostly inside RAM, sometimes straddling its end or
/// outside it, sometimes inline data.
fn segs(u: &mut Unstructured, len: usize) -> AResult<Vec<Segment>> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => vec![Segment::Inline(u.bytes(len.min(8).min(u.len()))?.to_vec())],
        1 => vec![Segment::Guest {
            addr: u.arbitrary()?,
            len,
        }],
        2 => {
            // Scattered in two pieces.
            let a = len / 2;
            vec![
                Segment::Guest {
                    addr: u64::from(u.int_in_range(0u32..=RAM as u32)?),
                    len: a,
                },
                Segment::Guest {
                    addr: u64::from(u.int_in_range(0u32..=RAM as u32)?),
                    len: len - a,
                },
            ]
        }
        _ => vec![Segment::Guest {
            addr: u64::from(u.int_in_range(0u32..=(RAM - len.min(RAM)) as u32)?),
            len,
        }],
    })
}

fn length(u: &mut Unstructured) -> AResult<usize> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => 0,
        1 => 13,
        2 => 31,
        3 => 512,
        4 => 4096,
        5 => u.int_in_range(0usize..=64 << 10)?,
        _ => u.int_in_range(0usize..=1024)?,
    })
}

/// A CDB: mostly a known opcode with a sane LBA and length.
fn cdb(u: &mut Unstructured) -> AResult<[u8; 16]> {
    let mut c = [0u8; 16];
    u.fill_buffer(&mut c)?;
    if u.ratio(1u8, 8)? {
        return Ok(c);
    }
    c[0] = *u.choose(&OPCODES)?;
    if u.ratio(3u8, 4)? {
        let lba = u.int_in_range(0u32..=BLOCKS + 2)?;
        let n = u.int_in_range(0u16..=64)?;
        match c[0] {
            0x28 | 0x2a | 0x2f | 0x35 | 0x55 | 0x5a => {
                c[2..6].copy_from_slice(&lba.to_be_bytes());
                c[7..9].copy_from_slice(&n.to_be_bytes());
            }
            0xa8 | 0xaa | 0xa0 => {
                c[2..6].copy_from_slice(&lba.to_be_bytes());
                c[6..10].copy_from_slice(&u32::from(n).to_be_bytes());
            }
            0x88 | 0x8a | 0x8f | 0x91 | 0x9e => {
                c[2..10].copy_from_slice(&u64::from(lba).to_be_bytes());
                c[10..14].copy_from_slice(&u32::from(n).to_be_bytes());
            }
            _ => {
                c[4] = n as u8;
            }
        }
    }
    Ok(c)
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let uas = mode & 1 != 0;
    let readonly = mode & 2 != 0;
    // UAS at SuperSpeed (streams) or, with bit 3, at high speed (Ready
    // IUs; the stream IDs the ops pick are then ignored).
    let speed = if uas && mode & 8 == 0 {
        Speed::Super
    } else {
        Speed::High
    };
    let Ok(dev) = UsbStorage::from_file(image(), readonly, speed) else {
        return;
    };
    let mut h = Host {
        dev: dev.with_uas(uas),
        ram: GuestRam::anonymous(RAM),
        q: CompletionQueue::new(),
        next: 1,
        handles: Vec::new(),
        live: HashSet::new(),
        done: HashMap::new(),
    };
    let setup = |rt: u8, req: u8, value: u16, index: u16, length: u16| SetupPacket {
        request_type: rt,
        request: req,
        value,
        index,
        length,
    };
    // SET_CONFIGURATION 1; for UAS SET_INTERFACE 0 alternate 1.
    h.control(setup(0x00, 9, 1, 0, 0), 0);
    if uas && mode & 4 == 0 {
        h.control(setup(0x01, 11, 1, 0, 0), 0);
    }

    let mut u = Unstructured::new(rest);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        if step(&mut h, &mut u, uas).is_err() {
            break;
        }
    }
    h.dev.reset();
    h.collect();
    for id in &h.live {
        assert!(
            h.done.contains_key(id),
            "transfer {id:?} neither completed nor cancelled after a bus reset"
        );
    }
}

fn step(h: &mut Host, u: &mut Unstructured, uas: bool) -> AResult<()> {
    let op = u.int_in_range(0u8..=19)?;
    match op {
        // BOT: a CBW on bulk OUT 2.
        0..=2 if !uas || op == 0 => {
            let c = cdb(u)?;
            let mut b = [0u8; 31];
            let sig = if u.ratio(15u8, 16)? {
                CBW_SIGNATURE
            } else {
                u.arbitrary()?
            };
            b[0..4].copy_from_slice(&sig.to_le_bytes());
            b[4..8].copy_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
            let dl = length(u)? as u32;
            let dl = if u.ratio(7u8, 8)? { dl } else { u.arbitrary()? };
            b[8..12].copy_from_slice(&dl.to_le_bytes());
            b[12] = if u.arbitrary()? { 0x80 } else { 0 };
            b[13] = if u.ratio(7u8, 8)? { 0 } else { u.arbitrary()? };
            b[14] = if u.ratio(7u8, 8)? {
                *u.choose(&[6u8, 10, 12, 16])?
            } else {
                u.arbitrary()?
            };
            b[15..31].copy_from_slice(&c);
            let len = if u.ratio(15u8, 16)? {
                31
            } else {
                u.int_in_range(0usize..=64)?
            };
            let at = 0x1000;
            let _ = h.ram.write(at, &b);
            h.submit(
                2,
                Direction::Out,
                TransferKind::Bulk,
                vec![Segment::Guest { addr: at, len }],
                0,
            );
        }
        // BOT: bulk IN 1 (data or CSW).
        3..=5 => {
            let len = length(u)?;
            let s = segs(u, len)?;
            let ep = if u.ratio(15u8, 16)? {
                1
            } else {
                u.int_in_range(0u8..=15)?
            };
            let stream = if uas { u.int_in_range(0u16..=33)? } else { 0 };
            let ep = if uas { EP_DATA_IN & 0xf } else { ep };
            h.submit(ep, Direction::In, TransferKind::Bulk, s, stream);
        }
        // Bulk OUT data.
        6 | 7 => {
            let len = length(u)?;
            let s = segs(u, len)?;
            let (ep, stream) = if uas {
                (EP_DATA_OUT, u.int_in_range(0u16..=33)?)
            } else {
                (2, 0)
            };
            h.submit(ep, Direction::Out, TransferKind::Bulk, s, stream);
        }
        // UAS Command IU.
        8..=10 => {
            let mut b = [0u8; 32];
            b[0] = if u.ratio(15u8, 16)? {
                1
            } else {
                u.arbitrary()?
            };
            let tag: u16 = if u.ratio(7u8, 8)? {
                u.int_in_range(1u16..=33)?
            } else {
                u.arbitrary()?
            };
            b[2..4].copy_from_slice(&tag.to_be_bytes());
            if u.ratio(1u8, 16)? {
                u.fill_buffer(&mut b[4..16])?;
            }
            b[16..32].copy_from_slice(&cdb(u)?);
            let len = if u.ratio(15u8, 16)? {
                32
            } else {
                u.int_in_range(0usize..=40)?
            };
            let at = 0x2000;
            let _ = h.ram.write(at, &b);
            h.submit(
                EP_COMMAND,
                Direction::Out,
                TransferKind::Bulk,
                vec![Segment::Guest { addr: at, len }],
                0,
            );
        }
        // UAS Task Management IU.
        11 => {
            let mut b = [0u8; 16];
            b[0] = 5;
            b[2..4].copy_from_slice(&u.int_in_range(1u16..=40)?.to_be_bytes());
            b[4] = *u.choose(&[0x01u8, 0x02, 0x04, 0x08, 0x10, 0x80, 0x40])?;
            b[6..8].copy_from_slice(&u.int_in_range(1u16..=33)?.to_be_bytes());
            if u.ratio(1u8, 8)? {
                b[8] = u.arbitrary()?;
            }
            let len = if u.ratio(15u8, 16)? {
                16
            } else {
                u.int_in_range(0usize..=32)?
            };
            let at = 0x2100;
            let _ = h.ram.write(at, &b);
            h.submit(
                EP_COMMAND,
                Direction::Out,
                TransferKind::Bulk,
                vec![Segment::Guest { addr: at, len }],
                0,
            );
        }
        // UAS status pipe on a stream.
        12 | 13 => {
            let stream = if u.ratio(15u8, 16)? {
                u.int_in_range(1u16..=33)?
            } else {
                u.arbitrary()?
            };
            let len = *u.choose(&[112usize, 8, 16, 0, 4096])?;
            let s = segs(u, len)?;
            h.submit(
                EP_STATUS & 0xf,
                Direction::In,
                TransferKind::Bulk,
                s,
                stream,
            );
        }
        // A control request.
        14 => {
            let any: u8 = u.arbitrary()?;
            let st = SetupPacket {
                request_type: *u
                    .choose(&[0x00u8, 0x80, 0x01, 0x81, 0x02, 0x82, 0x21, 0xa1, any])?,
                request: if u.ratio(3u8, 4)? {
                    u.int_in_range(0u8..=12)?
                } else {
                    u.arbitrary()?
                },
                value: u.arbitrary()?,
                index: if u.ratio(3u8, 4)? {
                    u.int_in_range(0u16..=2)?
                } else {
                    u.arbitrary()?
                },
                length: if u.ratio(3u8, 4)? {
                    u.int_in_range(0u16..=512)?
                } else {
                    u.arbitrary()?
                },
            };
            let at = u64::from(u.int_in_range(0u32..=RAM as u32)?);
            h.control(st, at);
        }
        // Cancel one in flight, as Stop Endpoint does.
        15 => {
            if !h.handles.is_empty() {
                let i = u.choose_index(h.handles.len())?;
                let hd = h.handles.swap_remove(i);
                if hd.cancel() {
                    h.live.remove(&hd.id());
                }
                h.dev.cancel(hd.id());
                h.collect();
            }
        }
        16 => {
            h.dev.reset();
            h.collect();
            if uas && u.arbitrary()? {
                h.control(
                    SetupPacket {
                        request_type: 0,
                        request: 9,
                        value: 1,
                        index: 0,
                        length: 0,
                    },
                    0,
                );
                h.control(
                    SetupPacket {
                        request_type: 1,
                        request: 11,
                        value: 1,
                        index: 0,
                        length: 0,
                    },
                    0,
                );
            }
        }
        // A transfer of any kind on any endpoint.
        17 => {
            let ep = u.int_in_range(0u8..=15)?;
            let dir = if u.arbitrary()? {
                Direction::In
            } else {
                Direction::Out
            };
            let kind = *u.choose(&[
                TransferKind::Bulk,
                TransferKind::Interrupt,
                TransferKind::Isochronous,
            ])?;
            let len = length(u)?;
            let s = segs(u, len)?;
            h.submit(ep, dir, kind, s, u.int_in_range(0u16..=3)?);
        }
        // Guest RAM patch (data-out contents).
        _ => {
            let at = u64::from(u.int_in_range(0u32..=RAM as u32 - 1)?);
            let n = u.int_in_range(1usize..=64)?;
            let b = u.bytes(n.min(u.len()))?;
            let _ = h.ram.write(at, b);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    run_small_stack(data, run);
});
