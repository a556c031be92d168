//! Drives `UsbStorage` the way a host driver would: control transfers for
//! enumeration, then BOT CBW / data / CSW on the bulk endpoints.

use std::os::unix::fs::FileExt;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use super::*;
use crate::mem::GuestRam;
use crate::usb::descriptor::{self as desc, parse_config, parse_string};
use crate::usb::{CompletionQueue, Segment, TransferResult};

const BLOCKS: u64 = 2048; // 1 MiB image
const CTRL_BUF: u64 = 0x1000;
const CBW_BUF: u64 = 0x2000;
const CSW_BUF: u64 = 0x3000;
const DATA_BUF: u64 = 0x10_0000;

struct Host {
    dev: UsbStorage,
    ram: GuestRam,
    q: CompletionQueue,
    next: u64,
    image: File,
}

fn image(blocks: u64) -> File {
    let f = tempfile::tempfile().unwrap();
    f.set_len(blocks * 512).unwrap();
    f
}

fn host_with(speed: Speed, readonly: bool, file: File) -> Host {
    let check = file.try_clone().unwrap();
    Host {
        dev: UsbStorage::from_file(file, readonly, speed).unwrap(),
        ram: GuestRam::anonymous(8 << 20),
        q: CompletionQueue::new(),
        next: 1,
        image: check,
    }
}

fn configured(speed: Speed) -> Host {
    let mut h = host_with(speed, false, image(BLOCKS));
    h.configure();
    h
}

fn seg(addr: u64, len: usize) -> Segment {
    Segment::Guest { addr, len }
}

fn cdb10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

impl Host {
    fn submit(
        &mut self,
        ep: u8,
        dir: Direction,
        kind: TransferKind,
        segs: Vec<Segment>,
    ) -> TransferId {
        let id = TransferId(self.next);
        self.next += 1;
        let (t, _h) = Transfer::new(
            id,
            ep,
            dir,
            kind,
            segs,
            self.ram.clone(),
            vec![],
            self.q.clone(),
        );
        self.dev.submit(t);
        id
    }

    fn results(&mut self) -> Vec<TransferResult> {
        self.q.drain()
    }

    fn one(&mut self, id: TransferId) -> TransferResult {
        let r = self.results();
        assert_eq!(r.len(), 1, "exactly one completion expected: {r:?}");
        assert_eq!(r[0].id, id);
        r[0].clone()
    }

    fn control_in(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        len: u16,
    ) -> (TransferStatus, Vec<u8>) {
        let setup = SetupPacket {
            request_type: rt,
            request: req,
            value,
            index,
            length: len,
        };
        let id = self.submit(
            0,
            Direction::In,
            TransferKind::Control(setup),
            vec![seg(CTRL_BUF, usize::from(len))],
        );
        let r = self.one(id);
        let mut b = vec![0u8; r.actual];
        self.ram.read(CTRL_BUF, &mut b).unwrap();
        (r.status, b)
    }

    fn control_out(&mut self, rt: u8, req: u8, value: u16, index: u16) -> TransferStatus {
        let setup = SetupPacket {
            request_type: rt,
            request: req,
            value,
            index,
            length: 0,
        };
        let id = self.submit(0, Direction::Out, TransferKind::Control(setup), vec![]);
        self.one(id).status
    }

    fn get_descriptor(&mut self, ty: u8, index: u8, len: u16) -> (TransferStatus, Vec<u8>) {
        self.control_in(0x80, 6, u16::from(ty) << 8 | u16::from(index), 0, len)
    }

    fn configure(&mut self) {
        assert_eq!(self.control_out(0, 5, 3, 0), TransferStatus::Success);
        assert_eq!(self.control_out(0, 9, 1, 0), TransferStatus::Success);
    }

    fn clear_halt(&mut self, ep: u8) {
        assert_eq!(
            self.control_out(0x02, 1, 0, u16::from(ep)),
            TransferStatus::Success
        );
    }

    fn reset_recovery(&mut self) {
        assert_eq!(self.control_out(0x21, 0xff, 0, 0), TransferStatus::Success);
        self.clear_halt(EP_IN);
        self.clear_halt(EP_OUT);
    }

    fn out_bytes(&mut self, addr: u64, data: &[u8]) -> TransferResult {
        self.ram.write(addr, data).unwrap();
        let id = self.submit(
            2,
            Direction::Out,
            TransferKind::Bulk,
            vec![seg(addr, data.len())],
        );
        self.one(id)
    }

    fn cbw(&mut self, tag: u32, len: u32, dir_in: bool, cdb: &[u8]) -> TransferResult {
        self.cbw_lun(tag, len, dir_in, cdb, 0)
    }

    fn cbw_lun(&mut self, tag: u32, len: u32, dir_in: bool, cdb: &[u8], lun: u8) -> TransferResult {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let b = Cbw {
            tag,
            data_len: len,
            dir_in,
            lun,
            cdb: c,
        }
        .to_bytes();
        self.out_bytes(CBW_BUF, &b)
    }

    fn bulk_in(&mut self, segs: Vec<Segment>) -> TransferResult {
        let id = self.submit(1, Direction::In, TransferKind::Bulk, segs);
        self.one(id)
    }

    fn read_in(&mut self, len: usize) -> (TransferResult, Vec<u8>) {
        let r = self.bulk_in(vec![seg(DATA_BUF, len)]);
        let mut b = vec![0u8; r.actual];
        self.ram.read(DATA_BUF, &mut b).unwrap();
        (r, b)
    }

    /// Reads the CSW, clearing a bulk-IN halt first if the data phase ended
    /// with one; returns (tag, residue, status).
    fn csw(&mut self) -> (u32, u32, u8) {
        let mut r = self.bulk_in(vec![seg(CSW_BUF, 13)]);
        if r.status == TransferStatus::Stall {
            self.clear_halt(EP_IN);
            r = self.bulk_in(vec![seg(CSW_BUF, 13)]);
        }
        assert_eq!((r.status, r.actual), (TransferStatus::Success, 13));
        let mut b = [0u8; 13];
        self.ram.read(CSW_BUF, &mut b).unwrap();
        assert_eq!(&b[..4], b"USBS");
        let le = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (le(4), le(8), b[12])
    }

    /// A whole data-in command; returns (data, residue, status).
    fn command_in(&mut self, cdb: &[u8], len: u32) -> (Vec<u8>, u32, u8) {
        assert_eq!(
            self.cbw(0x77, len, true, cdb).status,
            TransferStatus::Success
        );
        let (r, data) = self.read_in(len as usize);
        let data = if r.status == TransferStatus::Stall {
            vec![]
        } else {
            data
        };
        let (tag, residue, status) = self.csw();
        assert_eq!(tag, 0x77);
        (data, residue, status)
    }

    fn command_none(&mut self, cdb: &[u8]) -> u8 {
        assert_eq!(
            self.cbw(0x55, 0, false, cdb).status,
            TransferStatus::Success
        );
        let (tag, residue, status) = self.csw();
        assert_eq!((tag, residue), (0x55, 0));
        status
    }

    fn sense(&mut self) -> (u8, u8) {
        let (d, _, st) = self.command_in(&[0x03, 0, 0, 0, 18, 0], 18);
        assert_eq!(st, 0);
        assert_eq!(d.len(), 18);
        assert_eq!(d[0], 0x70);
        (d[2] & 0x0f, d[12])
    }
}

#[test]
fn rejects_bad_images_and_speeds() {
    let f = tempfile::tempfile().unwrap();
    assert!(matches!(
        UsbStorage::from_file(f, false, Speed::High),
        Err(StorageError::Empty)
    ));
    let f = image(1);
    f.set_len(513).unwrap();
    assert!(matches!(
        UsbStorage::from_file(f, false, Speed::High),
        Err(StorageError::NotBlockMultiple(513))
    ));
    assert!(matches!(
        UsbStorage::from_file(image(1), false, Speed::Low),
        Err(StorageError::UnsupportedSpeed(Speed::Low))
    ));
    assert!(matches!(
        UsbStorage::open(Path::new("/nonexistent/stick.img"), true, Speed::High),
        Err(StorageError::Open { .. })
    ));
}

#[test]
fn enumerates_high_speed_descriptors() {
    let mut h = host_with(Speed::High, false, image(BLOCKS));
    let (st, d) = h.get_descriptor(desc::DEVICE, 0, 64);
    assert_eq!(st, TransferStatus::ShortPacket);
    let d = DeviceDescriptor::parse(&d).unwrap();
    assert_eq!((d.bcd_usb, d.max_packet_size0), (0x0200, 64));
    assert_eq!((d.vendor_id, d.product_id), (VENDOR_ID, PRODUCT_ID));

    let (_, head) = h.get_descriptor(desc::CONFIGURATION, 0, 9);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let (st, c) = h.get_descriptor(desc::CONFIGURATION, 0, total);
    assert_eq!(st, TransferStatus::Success);
    let c = parse_config(&c).unwrap();
    assert_ne!(c.attributes & ConfigDescriptor::ATTR_SELF_POWERED, 0);
    let i = &c.interfaces[0];
    assert_eq!((i.class, i.subclass, i.protocol), (8, 6, 0x50));
    let eps: Vec<(u8, u16, bool)> = i
        .endpoints
        .iter()
        .map(|e| (e.address, e.max_packet_size, e.ss_companion.is_some()))
        .collect();
    assert_eq!(eps, vec![(0x81, 512, false), (0x02, 512, false)]);

    let (st, q) = h.get_descriptor(desc::DEVICE_QUALIFIER, 0, 10);
    assert_eq!(
        (st, q.len(), q[1]),
        (TransferStatus::Success, 10, desc::DEVICE_QUALIFIER)
    );
    assert_eq!(h.get_descriptor(desc::BOS, 0, 5).0, TransferStatus::Stall);

    let (_, l) = h.get_descriptor(desc::STRING, 0, 255);
    assert_eq!(l, vec![4, 3, 0x09, 0x04]);
    let (_, s) = h.get_descriptor(desc::STRING, d.serial_index, 255);
    let serial = parse_string(&s).unwrap();
    assert!(
        serial.len() >= 12 && serial.chars().all(|c| c.is_ascii_hexdigit()),
        "{serial}"
    );
    assert_eq!(
        h.get_descriptor(desc::STRING, 9, 255).0,
        TransferStatus::Stall
    );

    // Bulk endpoints do not exist before SET_CONFIGURATION.
    let r = h.bulk_in(vec![seg(CSW_BUF, 13)]);
    assert_eq!(r.status, TransferStatus::Stall);
    assert_eq!(h.control_out(0, 9, 2, 0), TransferStatus::Stall);
    h.configure();
    assert_eq!(
        h.control_in(0x80, 8, 0, 0, 1),
        (TransferStatus::Success, vec![1])
    );
    assert_eq!(
        h.control_in(0xa1, 0xfe, 0, 0, 1),
        (TransferStatus::Success, vec![0])
    );
    assert_eq!(
        h.control_in(0x82, 0, 0, 0x81, 2),
        (TransferStatus::Success, vec![0, 0])
    );
}

#[test]
fn enumerates_full_speed_descriptors_and_moves_data() {
    let mut h = host_with(Speed::Full, false, image(BLOCKS));
    assert_eq!(h.dev.speed(), Speed::Full);
    let (_, d) = h.get_descriptor(desc::DEVICE, 0, 18);
    let d = DeviceDescriptor::parse(&d).unwrap();
    assert_eq!((d.bcd_usb, d.max_packet_size0), (0x0200, 64));

    let (_, head) = h.get_descriptor(desc::CONFIGURATION, 0, 9);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let (_, c) = h.get_descriptor(desc::CONFIGURATION, 0, total);
    let c = parse_config(&c).unwrap();
    let eps: Vec<(u8, u16, bool)> = c.interfaces[0]
        .endpoints
        .iter()
        .map(|e| (e.address, e.max_packet_size, e.ss_companion.is_some()))
        .collect();
    assert_eq!(eps, vec![(0x81, 64, false), (0x02, 64, false)]);
    assert_eq!(c.interfaces.len(), 1, "no UAS at full speed");

    // A full-speed-only device answers neither (USB 2.0 §9.6.2, §9.6.4).
    for ty in [desc::DEVICE_QUALIFIER, desc::OTHER_SPEED, desc::BOS] {
        assert_eq!(h.get_descriptor(ty, 0, 10).0, TransferStatus::Stall, "{ty}");
    }

    // Bulk-Only works unchanged: one block written and read back.
    h.configure();
    h.ram.write(DATA_BUF, &[0x5a; 512]).unwrap();
    assert_eq!(
        h.cbw(1, 512, false, &cdb10(0x2a, 3, 1)).status,
        TransferStatus::Success
    );
    let id = h.submit(
        2,
        Direction::Out,
        TransferKind::Bulk,
        vec![seg(DATA_BUF, 512)],
    );
    let r = h.one(id);
    assert_eq!((r.status, r.actual), (TransferStatus::Success, 512));
    assert_eq!(h.csw(), (1, 0, 0));
    let mut on_disk = [0u8; 512];
    h.image.read_exact_at(&mut on_disk, 3 * 512).unwrap();
    assert_eq!(on_disk, [0x5a; 512]);
    h.ram.write(DATA_BUF, &[0; 512]).unwrap();
    let (data, residue, status) = h.command_in(&cdb10(0x28, 3, 1), 512);
    assert_eq!((residue, status), (0, 0));
    assert_eq!(data, vec![0x5a; 512]);
}

#[test]
fn enumerates_superspeed_descriptors_with_bos() {
    let mut h = host_with(Speed::Super, false, image(BLOCKS));
    let (_, d) = h.get_descriptor(desc::DEVICE, 0, 18);
    let d = DeviceDescriptor::parse(&d).unwrap();
    assert_eq!((d.bcd_usb, d.max_packet_size0), (0x0320, 9));
    let (_, c) = h.get_descriptor(desc::CONFIGURATION, 0, 255);
    let c = parse_config(&c).unwrap();
    for e in &c.interfaces[0].endpoints {
        assert_eq!(e.max_packet_size, 1024);
        assert_eq!(e.ss_companion.map(|c| c.max_burst), Some(15));
    }
    let (st, bos) = h.get_descriptor(desc::BOS, 0, 255);
    assert_eq!(st, TransferStatus::ShortPacket);
    assert_eq!(usize::from(u16::from_le_bytes([bos[2], bos[3]])), bos.len());
    assert_eq!(bos[4], 2, "two capabilities");
    assert_eq!(
        (bos[7], bos[14]),
        (desc::CAP_USB2_EXTENSION, desc::CAP_SUPERSPEED_USB)
    );
    assert_eq!(
        h.get_descriptor(desc::DEVICE_QUALIFIER, 0, 10).0,
        TransferStatus::Stall
    );
    // SET_SEL and SET_ISOCH_DELAY are accepted.
    assert_eq!(h.control_out(0, 49, 40, 0), TransferStatus::Success);
    h.configure();
    assert_eq!(h.command_none(&[0]), 0);
}

#[test]
fn write_then_read_round_trip_with_unaligned_segments() {
    let mut h = configured(Speed::High);
    let mut data = vec![0u8; 128 * 512];
    rand::rngs::SmallRng::seed_from_u64(42).fill_bytes(&mut data);
    let lba = 10u32;

    // Guest buffer in three unaligned pieces, each crossing 4 KiB pages.
    let pieces = [
        (0x20_0003u64, 5000usize),
        (0x30_0ffeu64, 12345),
        (0x40_0123u64, data.len() - 17345),
    ];
    let mut off = 0;
    for &(a, l) in &pieces {
        h.ram.write(a, &data[off..off + l]).unwrap();
        off += l;
    }
    assert_eq!(
        h.cbw(1, data.len() as u32, false, &cdb10(0x2a, lba, 128))
            .status,
        TransferStatus::Success
    );
    let id = h.submit(
        2,
        Direction::Out,
        TransferKind::Bulk,
        pieces.iter().map(|&(a, l)| seg(a, l)).collect(),
    );
    let r = h.one(id);
    assert_eq!((r.status, r.actual), (TransferStatus::Success, data.len()));
    assert_eq!(h.csw(), (1, 0, 0));
    assert_eq!(h.command_none(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0);

    let mut on_disk = vec![0u8; data.len()];
    h.image
        .read_exact_at(&mut on_disk, u64::from(lba) * 512)
        .unwrap();
    assert_eq!(Sha256::digest(&on_disk), Sha256::digest(&data));
    let mut before = [0u8; 512];
    h.image
        .read_exact_at(&mut before, u64::from(lba - 1) * 512)
        .unwrap();
    assert_eq!(before, [0u8; 512], "neighbouring block untouched");

    // Read it back into different unaligned pieces.
    let back = [
        (0x50_0001u64, 4095usize),
        (0x60_0abcu64, 40000),
        (0x70_0fffu64, data.len() - 44095),
    ];
    assert_eq!(
        h.cbw(2, data.len() as u32, true, &cdb10(0x28, lba, 128))
            .status,
        TransferStatus::Success
    );
    let r = h.bulk_in(back.iter().map(|&(a, l)| seg(a, l)).collect());
    assert_eq!((r.status, r.actual), (TransferStatus::Success, data.len()));
    assert_eq!(h.csw(), (2, 0, 0));
    let mut got = Vec::new();
    for &(a, l) in &back {
        let mut b = vec![0u8; l];
        h.ram.read(a, &mut b).unwrap();
        got.extend_from_slice(&b);
    }
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
}

#[test]
fn read_data_phase_split_across_three_transfers() {
    let mut h = configured(Speed::Super);
    let pattern: Vec<u8> = (0..16 * 512).map(|i| (i % 251) as u8).collect();
    h.image.write_all_at(&pattern, 100 * 512).unwrap();

    assert_eq!(
        h.cbw(5, 8192, true, &cdb10(0x28, 100, 16)).status,
        TransferStatus::Success
    );
    let mut got = Vec::new();
    for len in [1000usize, 3000, 4192] {
        let (r, b) = h.read_in(len);
        assert_eq!((r.status, r.actual), (TransferStatus::Success, len));
        got.extend_from_slice(&b);
    }
    assert_eq!(got, pattern);
    assert_eq!(h.csw(), (5, 0, 0));
}

#[test]
fn write_data_phase_split_across_transfers_lands_at_the_right_offsets() {
    let mut h = configured(Speed::High);
    let data: Vec<u8> = (0..4 * 512).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    let mut c = vec![0x8a, 0];
    c.extend_from_slice(&7u64.to_be_bytes());
    c.extend_from_slice(&4u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    assert_eq!(h.cbw(6, 2048, false, &c).status, TransferStatus::Success);
    assert_eq!(h.out_bytes(DATA_BUF, &data[..700]).actual, 700);
    assert_eq!(
        h.out_bytes(DATA_BUF + 0x1000, &[]).actual,
        0,
        "zero-length is harmless"
    );
    assert_eq!(h.out_bytes(DATA_BUF + 0x2000, &data[700..]).actual, 1348);
    assert_eq!(h.csw(), (6, 0, 0));
    let mut b = vec![0u8; 2048];
    h.image.read_exact_at(&mut b, 7 * 512).unwrap();
    assert_eq!(b, data);
}

#[test]
fn inquiry_and_read_capacity_fields() {
    let mut h = configured(Speed::High);
    let (d, residue, st) = h.command_in(&[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!((residue, st, d.len()), (0, 0, 36));
    assert_eq!(d[0] & 0x1f, 0, "direct-access block device");
    assert_eq!(d[1], 0x80, "removable");
    assert_eq!(&d[8..16], scsi::VENDOR);
    assert_eq!(&d[16..32], scsi::PRODUCT);

    let (d, _, st) = h.command_in(&[0x12, 1, 0x00, 0, 255, 0], 255);
    assert_eq!(st, 0);
    assert_eq!(&d[..7], &[0, 0, 0, 3, 0x00, 0x80, 0x83]);
    let (d, _, _) = h.command_in(&[0x12, 1, 0x80, 0, 255, 0], 255);
    assert_eq!(d[1], 0x80);
    assert!(usize::from(d[3]) >= 12);
    let (d, _, st) = h.command_in(&[0x12, 1, 0x83, 0, 255, 0], 255);
    assert_eq!((st, d[1], d[4]), (0, 0x83, 0x02));

    let (d, residue, st) = h.command_in(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!((residue, st), (0, 0));
    assert_eq!(
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
        BLOCKS as u32 - 1
    );
    assert_eq!(u32::from_be_bytes([d[4], d[5], d[6], d[7]]), 512);

    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let (d, _, st) = h.command_in(&c, 32);
    assert_eq!(st, 0);
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 512);

    // MODE SENSE(6) all pages: no write protect.
    let (d, residue, st) = h.command_in(&[0x1a, 0, 0x3f, 0, 192, 0], 192);
    assert_eq!((st, d[2] & 0x80), (0, 0));
    assert_eq!(residue as usize, 192 - d.len());
}

#[test]
fn unsupported_opcode_fails_and_request_sense_reports_it() {
    let mut h = configured(Speed::High);
    assert_eq!(h.command_none(&[0xd7]), 1);
    assert_eq!(h.sense(), (scsi::KEY_ILLEGAL_REQUEST, 0x20));
    assert_eq!(
        h.sense(),
        (scsi::KEY_NO_SENSE, 0),
        "REQUEST SENSE clears it"
    );
}

#[test]
fn readonly_write_is_data_protect_and_file_unchanged() {
    let f = image(BLOCKS);
    f.write_all_at(&[0xaa; 512], 0).unwrap();
    let mut h = host_with(Speed::High, true, f);
    h.configure();
    assert_eq!(
        h.cbw(3, 512, false, &cdb10(0x2a, 0, 1)).status,
        TransferStatus::Success
    );
    let r = h.out_bytes(DATA_BUF, &[0x55; 512]);
    assert_eq!(
        r.status,
        TransferStatus::Success,
        "case 9: data accepted and discarded"
    );
    assert_eq!(h.csw(), (3, 512, 1));
    assert_eq!(h.sense(), (scsi::KEY_DATA_PROTECT, 0x27));
    let mut b = [0u8; 512];
    h.image.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, [0xaa; 512]);
    let (d, _, st) = h.command_in(&[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!((st, d[3] & 0x80), (0, 0x80), "WP bit");
}

#[test]
fn invalid_cbw_stalls_until_reset_recovery() {
    let mut h = configured(Speed::High);
    let r = h.out_bytes(CBW_BUF, &[0x42; 31]);
    assert_eq!(r.status, TransferStatus::Success);
    assert_eq!(
        h.bulk_in(vec![seg(CSW_BUF, 13)]).status,
        TransferStatus::Stall
    );
    assert_eq!(
        h.control_in(0x82, 0, 0, 0x81, 2).1,
        vec![1, 0],
        "GET_STATUS reports halt"
    );
    // CLEAR_FEATURE alone does not help.
    h.clear_halt(EP_IN);
    assert_eq!(
        h.bulk_in(vec![seg(CSW_BUF, 13)]).status,
        TransferStatus::Stall
    );
    let mut c = [0u8; 16];
    c[0] = 0;
    let good = Cbw {
        tag: 1,
        data_len: 0,
        dir_in: false,
        lun: 0,
        cdb: c,
    }
    .to_bytes();
    assert_eq!(h.out_bytes(CBW_BUF, &good).status, TransferStatus::Stall);

    h.reset_recovery();
    assert_eq!(h.command_none(&[0]), 0);

    // A CBW of the wrong size is invalid too.
    assert_eq!(
        h.out_bytes(CBW_BUF, &good[..30]).status,
        TransferStatus::Success
    );
    assert_eq!(
        h.bulk_in(vec![seg(CSW_BUF, 13)]).status,
        TransferStatus::Stall
    );
    h.reset_recovery();
    assert_eq!(h.command_none(&[0]), 0);
}

#[test]
fn out_of_range_lba_stalls_data_in_and_fails() {
    let mut h = configured(Speed::High);
    assert_eq!(
        h.cbw(9, 1024, true, &cdb10(0x28, BLOCKS as u32 - 1, 2))
            .status,
        TransferStatus::Success
    );
    let (r, _) = h.read_in(1024);
    assert_eq!(r.status, TransferStatus::Stall, "case 4: nothing to send");
    assert_eq!(h.csw(), (9, 1024, 1));
    assert_eq!(h.sense(), (scsi::KEY_ILLEGAL_REQUEST, 0x21));
    // WRITE(16) past the end, host offers data: discarded, failed.
    let mut c = vec![0x8a, 0];
    c.extend_from_slice(&BLOCKS.to_be_bytes());
    c.extend_from_slice(&1u32.to_be_bytes());
    assert_eq!(h.cbw(10, 512, false, &c).status, TransferStatus::Success);
    assert_eq!(
        h.out_bytes(DATA_BUF, &[1; 512]).status,
        TransferStatus::Success
    );
    assert_eq!(h.csw(), (10, 512, 1));
    assert_eq!(h.sense(), (scsi::KEY_ILLEGAL_REQUEST, 0x21));
}

#[test]
fn host_expecting_more_gets_short_packet_then_stall_and_residue() {
    let mut h = configured(Speed::High);
    assert_eq!(
        h.cbw(11, 2048, true, &cdb10(0x28, 0, 1)).status,
        TransferStatus::Success
    );
    let (r, _) = h.read_in(2048);
    assert_eq!((r.status, r.actual), (TransferStatus::ShortPacket, 512));
    // The CSW read stalls once; csw() clears the halt and retries.
    assert_eq!(h.csw(), (11, 1536, 0));
}

#[test]
fn host_expecting_less_gets_phase_error() {
    let mut h = configured(Speed::High);
    // Case 7: READ of 2 blocks, host expects 512 bytes.
    assert_eq!(
        h.cbw(12, 512, true, &cdb10(0x28, 0, 2)).status,
        TransferStatus::Success
    );
    let (r, _) = h.read_in(512);
    assert_eq!((r.status, r.actual), (TransferStatus::Success, 512));
    assert_eq!(h.csw(), (12, 0, 2));
    // Case 2: data-in command, host expects nothing.
    assert_eq!(
        h.cbw(13, 0, true, &cdb10(0x28, 0, 1)).status,
        TransferStatus::Success
    );
    assert_eq!(h.csw(), (13, 0, 2));
    // Case 13: WRITE of 2 blocks, host sends 512: discarded, phase error.
    assert_eq!(
        h.cbw(14, 512, false, &cdb10(0x2a, 0, 2)).status,
        TransferStatus::Success
    );
    assert_eq!(
        h.out_bytes(DATA_BUF, &[7; 512]).status,
        TransferStatus::Success
    );
    assert_eq!(h.csw(), (14, 512, 2));
    let mut b = [0u8; 512];
    h.image.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, [0; 512]);
    // Case 8: host expects IN, device wants OUT.
    assert_eq!(
        h.cbw(15, 512, true, &cdb10(0x2a, 0, 1)).status,
        TransferStatus::Success
    );
    assert_eq!(h.read_in(512).0.status, TransferStatus::Stall);
    assert_eq!(h.csw(), (15, 512, 2));
}

#[test]
fn hostile_lengths_and_luns_never_panic() {
    let mut h = configured(Speed::High);
    // TEST UNIT READY with a 4 GiB data-in expectation: case 4.
    assert_eq!(
        h.cbw(20, u32::MAX, true, &[0]).status,
        TransferStatus::Success
    );
    assert_eq!(h.read_in(64).0.status, TransferStatus::Stall);
    assert_eq!(h.csw(), (20, u32::MAX, 0));
    // LUN 1 does not exist.
    assert_eq!(
        h.cbw_lun(21, 0, false, &[0], 1).status,
        TransferStatus::Success
    );
    assert_eq!(h.csw(), (21, 0, 1));
    assert_eq!(h.sense(), (scsi::KEY_ILLEGAL_REQUEST, 0x25));
    // Zero-length READ(10): no data.
    assert_eq!(h.command_none(&cdb10(0x28, 0, 0)), 0);
    // Zero-length bulk-IN during a data phase moves nothing.
    assert_eq!(
        h.cbw(22, 512, true, &cdb10(0x28, 0, 1)).status,
        TransferStatus::Success
    );
    assert_eq!(h.read_in(0).0.actual, 0);
    assert_eq!(h.read_in(512).0.actual, 512);
    assert_eq!(h.csw(), (22, 0, 0));
    // A CSW buffer too small is babble, and the CSW counts as sent.
    assert_eq!(h.cbw(23, 0, false, &[0]).status, TransferStatus::Success);
    assert_eq!(
        h.bulk_in(vec![seg(CSW_BUF, 4)]).status,
        TransferStatus::Babble
    );
    assert_eq!(h.command_none(&[0]), 0);
    // A data buffer outside guest RAM is a transaction error, no progress.
    assert_eq!(
        h.cbw(24, 512, true, &cdb10(0x28, 0, 1)).status,
        TransferStatus::Success
    );
    let r = h.bulk_in(vec![seg(1 << 40, 512)]);
    assert_eq!(r.status, TransferStatus::TransactionError);
    assert_eq!(h.read_in(512).0.actual, 512);
    assert_eq!(h.csw(), (24, 0, 0));
}

#[test]
fn in_transfers_submitted_early_are_parked_and_completed_in_order() {
    let mut h = configured(Speed::High);
    h.image.write_all_at(&[0x3c; 512], 0).unwrap();
    let data_id = h.submit(
        1,
        Direction::In,
        TransferKind::Bulk,
        vec![seg(DATA_BUF, 512)],
    );
    let csw_id = h.submit(1, Direction::In, TransferKind::Bulk, vec![seg(CSW_BUF, 13)]);
    assert!(
        h.results().is_empty(),
        "parked until a command produces data"
    );
    h.ram
        .write(
            CBW_BUF,
            &Cbw {
                tag: 30,
                data_len: 512,
                dir_in: true,
                lun: 0,
                cdb: {
                    let mut c = [0u8; 16];
                    c[..10].copy_from_slice(&cdb10(0x28, 0, 1));
                    c
                },
            }
            .to_bytes(),
        )
        .unwrap();
    let cbw_id = h.submit(
        2,
        Direction::Out,
        TransferKind::Bulk,
        vec![seg(CBW_BUF, 31)],
    );
    let r = h.results();
    let ids: Vec<TransferId> = r.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![cbw_id, data_id, csw_id]);
    assert!(r.iter().all(|r| r.status == TransferStatus::Success));
    let mut b = [0u8; 512];
    h.ram.read(DATA_BUF, &mut b).unwrap();
    assert_eq!(b, [0x3c; 512]);
    let mut c = [0u8; 13];
    h.ram.read(CSW_BUF, &mut c).unwrap();
    assert_eq!((&c[..4], c[4], c[12]), (&b"USBS"[..], 30, 0));
}

#[test]
fn reset_and_cancel_complete_parked_transfers() {
    let mut h = configured(Speed::High);
    let a = h.submit(1, Direction::In, TransferKind::Bulk, vec![seg(CSW_BUF, 13)]);
    let b = h.submit(1, Direction::In, TransferKind::Bulk, vec![seg(CSW_BUF, 13)]);
    h.dev.cancel(a);
    assert_eq!(h.one(a).status, TransferStatus::Cancelled);
    h.dev.reset();
    assert_eq!(h.one(b).status, TransferStatus::Cancelled);
    // Unconfigured after reset.
    assert_eq!(h.control_in(0x80, 8, 0, 0, 1).1, vec![0]);
    h.configure();
    assert_eq!(h.command_none(&[0]), 0);
}

mod uas;

pub(super) use crate::ratelimit::LogCounter;

#[test]
fn log_flood_from_bad_cbws_and_bad_requests_is_rate_limited() {
    let mut h = configured(Speed::High);
    let log = LogCounter::default();
    let t0 = std::time::Instant::now();
    log.run(|| {
        for i in 0..20_000u32 {
            // An invalid CBW (halts both pipes until Reset Recovery)...
            assert_eq!(
                h.out_bytes(CBW_BUF, &[0x42; 31]).status,
                TransferStatus::Success
            );
            h.reset_recovery();
            // ...an unsupported class request, a transfer on an endpoint
            // the stick does not have.
            let setup = SetupPacket {
                request_type: 0x21,
                request: 0x42,
                value: 0,
                index: 0,
                length: 0,
            };
            h.submit(0, Direction::Out, TransferKind::Control(setup), vec![]);
            h.submit(5, Direction::In, TransferKind::Bulk, vec![seg(DATA_BUF, 8)]);
            let r = h.results();
            assert!(
                r.len() == 2 && r.iter().all(|r| r.status == TransferStatus::Stall),
                "iteration {i}: {r:?}"
            );
        }
    });
    h.results();
    log.assert_bounded(t0.elapsed());
    assert!(log.sites().len() >= 3, "{:?}", log.sites());
    // Still a working stick.
    assert_eq!(h.command_none(&[0]), 0);
}
