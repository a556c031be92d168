//! UAS (alternate setting 1) driven the way Linux's uas driver does:
//! status and data transfers queued on stream `tag` before the Command IU.

use super::*;
use crate::storage::uas::{EP_COMMAND, EP_DATA_IN, EP_DATA_OUT, EP_STATUS, MAX_TASKS};

const IU_BUF: u64 = 0x4000;
/// Status buffers: one 128-byte slot per stream.
const STATUS_BASE: u64 = 0x8000;
/// Data buffers: 64 KiB per stream.
const DATA_BASE: u64 = 0x20_0000;

fn uas_host(readonly: bool, file: File) -> Host {
    uas_host_at(Speed::Super, readonly, file)
}

fn uas_host_at(speed: Speed, readonly: bool, file: File) -> Host {
    let check = file.try_clone().unwrap();
    let mut h = Host {
        dev: UsbStorage::from_file(file, readonly, speed)
            .unwrap()
            .with_uas(true),
        ram: GuestRam::anonymous(8 << 20),
        q: CompletionQueue::new(),
        next: 1,
        image: check,
    };
    h.configure();
    assert_eq!(h.control_out(0x01, 11, 1, 0), TransferStatus::Success);
    assert!(h.dev.uas_active());
    h
}

fn status_buf(stream: u16) -> u64 {
    STATUS_BASE + u64::from(stream) * 128
}
fn data_buf(stream: u16) -> u64 {
    DATA_BASE + u64::from(stream) * 0x1_0000
}

impl Host {
    fn submit_stream(&mut self, addr: u8, stream: u16, segs: Vec<Segment>) -> TransferId {
        let id = TransferId(self.next);
        self.next += 1;
        let dir = if addr & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        };
        let (mut t, _h) = Transfer::new(
            id,
            addr & 0x0f,
            dir,
            TransferKind::Bulk,
            segs,
            self.ram.clone(),
            vec![],
            self.q.clone(),
        );
        t.set_stream_id(stream);
        self.dev.submit(t);
        id
    }

    fn status_on(&mut self, stream: u16) -> TransferId {
        self.submit_stream(EP_STATUS, stream, vec![seg(status_buf(stream), 112)])
    }

    fn data_in_on(&mut self, stream: u16, len: usize) -> TransferId {
        self.submit_stream(EP_DATA_IN, stream, vec![seg(data_buf(stream), len)])
    }

    fn data_out_on(&mut self, stream: u16, data: &[u8]) -> TransferId {
        self.ram.write(data_buf(stream), data).unwrap();
        self.submit_stream(EP_DATA_OUT, stream, vec![seg(data_buf(stream), data.len())])
    }

    fn iu(&mut self, b: &[u8]) -> TransferId {
        self.ram.write(IU_BUF, b).unwrap();
        self.submit_stream(EP_COMMAND, 0, vec![seg(IU_BUF, b.len())])
    }

    fn command_iu(&mut self, tag: u16, lun: u8, cdb: &[u8]) -> TransferId {
        let mut b = [0u8; 32];
        b[0] = 1;
        b[2..4].copy_from_slice(&tag.to_be_bytes());
        b[9] = lun;
        b[16..16 + cdb.len()].copy_from_slice(cdb);
        self.iu(&b)
    }

    /// Drains completions into a map by id.
    fn done(&mut self) -> std::collections::HashMap<TransferId, TransferResult> {
        self.results().into_iter().map(|r| (r.id, r)).collect()
    }

    /// The Sense IU in stream `s`'s status buffer: (tag, status, sense).
    fn sense_iu(&self, s: u16, r: &TransferResult) -> (u16, u8, Vec<u8>) {
        let mut b = vec![0u8; r.actual];
        self.ram.read(status_buf(s), &mut b).unwrap();
        assert_eq!(b[0], 3, "Sense IU expected: {b:?}");
        let len = usize::from(u16::from_be_bytes([b[14], b[15]]));
        assert_eq!(r.actual, 16 + len);
        (u16::from_be_bytes([b[2], b[3]]), b[6], b[16..].to_vec())
    }

    /// The Response IU in stream `s`'s status buffer: (tag, code).
    fn response_iu(&self, s: u16, r: &TransferResult) -> (u16, u8) {
        let mut b = vec![0u8; r.actual];
        self.ram.read(status_buf(s), &mut b).unwrap();
        assert_eq!((b[0], r.actual), (4, 8), "Response IU expected: {b:?}");
        (u16::from_be_bytes([b[2], b[3]]), b[7])
    }
}

#[test]
fn uas_is_offered_when_enabled_at_superspeed_and_high_speed() {
    let uas_alt = |d: &UsbStorage| {
        d.descriptors()
            .config
            .interfaces
            .iter()
            .find(|i| i.alternate_setting == 1)
            .cloned()
    };
    let plain = UsbStorage::from_file(image(8), false, Speed::Super).unwrap();
    assert!(uas_alt(&plain).is_none());
    let fs = UsbStorage::from_file(image(8), false, Speed::Full)
        .unwrap()
        .with_uas(true);
    assert!(uas_alt(&fs).is_none(), "no UAS at full speed");
    // High speed: the same four pipes, 512-byte packets, no companions
    // (no streams), each with its Pipe Usage descriptor.
    let hs = UsbStorage::from_file(image(8), false, Speed::High)
        .unwrap()
        .with_uas(true);
    let alt = uas_alt(&hs).unwrap();
    assert_eq!((alt.class, alt.subclass, alt.protocol), (8, 6, 0x62));
    let parsed = parse_config(&hs.descriptors().config.to_bytes()).unwrap();
    let pipes: Vec<(u8, u8, u16)> = parsed.interfaces[1]
        .endpoints
        .iter()
        .map(|e| {
            assert!(e.ss_companion.is_none());
            assert_eq!(&e.extra[..2], &[4, 0x24]);
            (e.address, e.extra[2], e.max_packet_size)
        })
        .collect();
    assert_eq!(
        pipes,
        vec![
            (EP_COMMAND, 1, 512),
            (EP_STATUS, 2, 512),
            (EP_DATA_IN, 3, 512),
            (EP_DATA_OUT, 4, 512)
        ]
    );
    // The other-speed (full-speed) configuration stays BOT only.
    assert_eq!(
        hs.descriptors()
            .other_speed
            .as_ref()
            .unwrap()
            .interfaces
            .len(),
        1
    );
    let ss = UsbStorage::from_file(image(8), false, Speed::Super)
        .unwrap()
        .with_uas(true);
    let alt = uas_alt(&ss).unwrap();
    assert_eq!((alt.class, alt.subclass, alt.protocol), (8, 6, 0x62));
    let wire = ss.descriptors().config.to_bytes();
    let parsed = parse_config(&wire).unwrap();
    let eps = &parsed.interfaces[1].endpoints;
    let pipes: Vec<(u8, u8, u8)> = eps
        .iter()
        .map(|e| {
            let c = e.ss_companion.unwrap();
            assert_eq!(&e.extra[..2], &[4, 0x24]);
            (e.address, e.extra[2], c.attributes & 0x1f)
        })
        .collect();
    assert_eq!(
        pipes,
        vec![
            (EP_COMMAND, 1, 0),
            (EP_STATUS, 2, 5),
            (EP_DATA_IN, 3, 5),
            (EP_DATA_OUT, 4, 5)
        ]
    );
}

#[test]
fn uas_commands_on_streams_move_data_in_any_order() {
    let mut h = uas_host(false, image(BLOCKS));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut data = vec![0u8; 64 << 10];
    rng.fill_bytes(&mut data);
    // WRITE(10) of 128 blocks at LBA 8, tag 1: status and data first.
    let st = h.status_on(1);
    let dout = h.data_out_on(1, &data);
    assert!(h.done().is_empty(), "nothing completes before the command");
    let cmd = h.command_iu(1, 0, &cdb10(0x2a, 8, 128));
    let r = h.done();
    assert_eq!(r[&cmd].status, TransferStatus::Success);
    assert_eq!(
        (r[&dout].status, r[&dout].actual),
        (TransferStatus::Success, 64 << 10)
    );
    assert_eq!(h.sense_iu(1, &r[&st]), (1, 0, vec![]));
    let mut on_disk = vec![0u8; 64 << 10];
    h.image.read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(Sha256::digest(&on_disk), Sha256::digest(&data));
    // Two READs outstanding together (tags 3 and 2, each half), their
    // transfers queued in a different order than the commands.
    let s2 = h.status_on(2);
    let s3 = h.status_on(3);
    let d3 = h.data_in_on(3, 32 << 10);
    let c3 = h.command_iu(3, 0, &cdb10(0x28, 8 + 64, 64));
    let r = h.done();
    assert!(r.contains_key(&c3) && r.contains_key(&d3) && r.contains_key(&s3));
    assert!(!r.contains_key(&s2), "tag 2 has no command yet");
    let d2 = h.data_in_on(2, 32 << 10);
    let c2 = h.command_iu(2, 0, &cdb10(0x28, 8, 64));
    let r2 = h.done();
    for (s, d, r, half) in [(3u16, d3, &r, 1usize), (2, d2, &r2, 0)] {
        assert_eq!(r[&d].actual, 32 << 10);
        let mut got = vec![0u8; 32 << 10];
        h.ram.read(data_buf(s), &mut got).unwrap();
        assert_eq!(got, data[half * (32 << 10)..(half + 1) * (32 << 10)]);
    }
    assert_eq!(h.sense_iu(2, &r2[&s2]), (2, 0, vec![]));
    assert_eq!(r2[&c2].status, TransferStatus::Success);
    assert_eq!(h.dev.uas.tasks(), 0);
    // A buffer larger than the data: short packet, GOOD status (INQUIRY).
    let s = h.status_on(4);
    let d = h.data_in_on(4, 255);
    h.command_iu(4, 0, &[0x12, 0, 0, 0, 255, 0]);
    let r = h.done();
    assert_eq!(
        (r[&d].status, r[&d].actual),
        (TransferStatus::ShortPacket, 36)
    );
    assert_eq!(h.sense_iu(4, &r[&s]).1, 0);
}

#[test]
fn uas_failures_carry_autosense_in_the_sense_iu() {
    let f = image(BLOCKS);
    f.write_all_at(&[0x5a; 4096], 0).unwrap();
    let mut h = uas_host(true, f);
    // Unsupported opcode, LUN 1, write to a read-only stick, LBA past the end.
    let cases: [(u16, u8, Vec<u8>, u8, u8); 4] = [
        (1, 0, vec![0xff], KEY_ILLEGAL_REQUEST, 0x20),
        (2, 1, vec![0x00], KEY_ILLEGAL_REQUEST, 0x25),
        (3, 0, cdb10(0x2a, 0, 8), KEY_DATA_PROTECT, 0x27),
        (
            4,
            0,
            cdb10(0x28, BLOCKS as u32, 1),
            KEY_ILLEGAL_REQUEST,
            0x21,
        ),
    ];
    for (tag, lun, cdb, key, asc) in cases {
        let s = h.status_on(tag);
        let d = h.data_out_on(tag, &[0u8; 4096]);
        h.command_iu(tag, lun, &cdb);
        let r = h.done();
        let (t, status, sense) = h.sense_iu(tag, &r[&s]);
        assert_eq!((t, status), (tag, 2), "CHECK CONDITION for tag {tag}");
        assert_eq!((sense[2] & 0x0f, sense[12]), (key, asc));
        // The data transfer stays queued until the host cancels it.
        assert!(!r.contains_key(&d));
        h.dev.cancel(d);
        assert_eq!(h.done()[&d].status, TransferStatus::Cancelled);
    }
    let mut b = [0u8; 4096];
    h.image.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x5a; 4096], "read-only image unchanged");
    // REPORT LUNS lists LUN 0 only.
    let s = h.status_on(5);
    let d = h.data_in_on(5, 64);
    h.command_iu(5, 0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]);
    let r = h.done();
    let mut l = vec![0u8; r[&d].actual];
    h.ram.read(data_buf(5), &mut l).unwrap();
    assert_eq!(l, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(h.sense_iu(5, &r[&s]).1, 0);
}

#[test]
fn uas_hostile_ius_get_response_ius_and_stay_bounded() {
    let mut h = uas_host(false, image(BLOCKS));
    // Too short to carry a tag: accepted and ignored.
    let c = h.iu(&[1, 0]);
    assert_eq!(h.done()[&c].status, TransferStatus::Success);
    // Unknown IU type, and a Command IU cut short: INVALID IU.
    for (tag, iu) in [
        (9u16, vec![0x42, 0, 0, 9]),
        (10, vec![1, 0, 0, 10, 0, 0, 0, 0]),
    ] {
        let s = h.status_on(tag);
        h.iu(&iu);
        let r = h.done();
        assert_eq!(h.response_iu(tag, &r[&s]), (tag, 0x02));
    }
    // A READ waiting for its data transfer, then the same tag again.
    h.command_iu(20, 0, &cdb10(0x28, 0, 1));
    let s = h.status_on(20);
    h.command_iu(20, 0, &cdb10(0x28, 0, 1));
    let r = h.done();
    assert_eq!(h.response_iu(20, &r[&s]), (20, 0x0a));
    assert_eq!(h.dev.uas.tasks(), 1);
    // Task management: QUERY TASK finds it, ABORT TASK removes it,
    // an unknown function is not supported.
    let tmf = |function: u8, tag: u16, task: u16| {
        let mut b = vec![0u8; 16];
        b[0] = 5;
        b[2..4].copy_from_slice(&tag.to_be_bytes());
        b[4] = function;
        b[6..8].copy_from_slice(&task.to_be_bytes());
        b
    };
    for (tag, function, code) in [
        (30u16, 0x80, 0x08),
        (31, 0x01, 0x00),
        (32, 0x80, 0x00),
        (33, 0x77, 0x04),
    ] {
        let s = h.status_on(tag);
        let iu = tmf(function, tag, 20);
        h.iu(&iu);
        let r = h.done();
        assert_eq!(
            h.response_iu(tag, &r[&s]),
            (tag, code),
            "function {function:#x}"
        );
    }
    assert_eq!(h.dev.uas.tasks(), 0);
    // More outstanding commands than the task set holds: TASK SET FULL.
    for tag in 100..100 + MAX_TASKS as u16 {
        h.command_iu(tag, 0, &cdb10(0x28, 0, 1));
    }
    let full = 100 + MAX_TASKS as u16;
    let s = h.status_on(full);
    h.command_iu(full, 0, &cdb10(0x28, 0, 1));
    let r = h.done();
    assert_eq!(h.sense_iu(full, &r[&s]).1, 0x28);
    assert_eq!(h.dev.uas.tasks(), MAX_TASKS);
    // LOGICAL UNIT RESET clears the task set.
    let s = h.status_on(40);
    let iu = tmf(0x08, 40, 0);
    h.iu(&iu);
    let r = h.done();
    assert_eq!(h.response_iu(40, &r[&s]), (40, 0));
    assert_eq!(h.dev.uas.tasks(), 0);
    // Random bytes of random lengths on the command pipe: no panic, and
    // the task set stays bounded.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..2000 {
        let mut b = vec![0u8; (rng.next_u32() % 48) as usize];
        rng.fill_bytes(&mut b);
        h.iu(&b);
        assert!(h.dev.uas.tasks() <= MAX_TASKS);
    }
    h.done();
}

#[test]
fn uas_cancel_reset_and_interface_switch_release_parked_transfers() {
    let mut h = uas_host(false, image(BLOCKS));
    let d = h.data_in_on(5, 4096);
    let s = h.status_on(5);
    h.dev.cancel(d);
    assert_eq!(h.done()[&d].status, TransferStatus::Cancelled);
    // Back to Bulk-Only: parked transfers are cancelled and BOT works.
    let setup = SetupPacket {
        request_type: 0x01,
        request: 11,
        value: 0,
        index: 0,
        length: 0,
    };
    let c = h.submit(0, Direction::Out, TransferKind::Control(setup), vec![]);
    let r = h.done();
    assert_eq!(r[&c].status, TransferStatus::Success);
    assert_eq!(r[&s].status, TransferStatus::Cancelled);
    assert!(!h.dev.uas_active());
    assert_eq!(h.command_none(&[0, 0, 0, 0, 0, 0]), 0);
    // UAS again; a bus reset cancels what is parked.
    assert_eq!(h.control_out(0x01, 11, 1, 0), TransferStatus::Success);
    let s = h.status_on(1);
    h.dev.reset();
    assert_eq!(h.done()[&s].status, TransferStatus::Cancelled);
    // A halted UAS pipe stalls.
    h.configure();
    assert_eq!(h.control_out(0x01, 11, 1, 0), TransferStatus::Success);
    assert_eq!(
        h.control_out(0x02, 3, 0, u16::from(EP_STATUS)),
        TransferStatus::Success
    );
    let s = h.status_on(1);
    assert_eq!(h.done()[&s].status, TransferStatus::Stall);
}

#[test]
fn log_flood_from_invalid_uas_ius_is_rate_limited() {
    let mut h = uas_host(false, image(BLOCKS));
    let log = LogCounter::default();
    let t0 = std::time::Instant::now();
    log.run(|| {
        for i in 0..100_000u32 {
            match i % 4 {
                // Unknown IU type.
                0 => h.iu(&[0x42, 0, 0, 9]),
                // Too short to carry a tag.
                1 => h.iu(&[1, 0]),
                // A command reusing the tag of one still waiting for data.
                2 => h.command_iu(7, 0, &cdb10(0x28, 0, 1)),
                // A transfer on a pipe UAS does not have.
                _ => h.submit_stream(0x81, 1, vec![seg(status_buf(1), 8)]),
            };
            if i % 1000 == 0 {
                h.results();
            }
        }
    });
    h.results();
    log.assert_bounded(t0.elapsed());
    assert!(log.sites().len() >= 4, "{:?}", log.sites());
    assert!(h.dev.uas.tasks() <= MAX_TASKS);
}

/// High speed (no streams): all transfers on stream 0, the buffers in
/// slots. (tag, IU id) of the IU in status slot `slot`; Sense IUs also
/// checked for GOOD status.
fn iu_in(h: &Host, slot: u16, r: &TransferResult) -> (u8, u16) {
    // (IUs are shorter than the 112-byte buffer: a short packet)
    assert_eq!(
        r.status,
        TransferStatus::ShortPacket,
        "status slot {slot}: {r:?}"
    );
    let mut b = vec![0u8; r.actual];
    h.ram.read(status_buf(slot), &mut b).unwrap();
    assert!(b.len() >= 4, "IU too short: {b:?}");
    let tag = u16::from_be_bytes([b[2], b[3]]);
    match b[0] {
        3 => assert_eq!((b.len(), b[6]), (16, 0), "Sense IU with GOOD status: {b:?}"),
        6 | 7 => assert_eq!(b.len(), 4, "Ready IU: {b:?}"),
        x => panic!("unexpected IU {x:#x}: {b:?}"),
    }
    (b[0], tag)
}

const SENSE: u8 = 3;
const READ_READY: u8 = 6;
const WRITE_READY: u8 = 7;

impl Host {
    fn hs_status(&mut self, slot: u16) -> TransferId {
        self.submit_stream(EP_STATUS, 0, vec![seg(status_buf(slot), 112)])
    }
    fn hs_data_in(&mut self, slot: u16, len: usize) -> TransferId {
        self.submit_stream(EP_DATA_IN, 0, vec![seg(data_buf(slot), len)])
    }
    fn hs_data_out(&mut self, slot: u16, data: &[u8]) -> TransferId {
        self.ram.write(data_buf(slot), data).unwrap();
        self.submit_stream(EP_DATA_OUT, 0, vec![seg(data_buf(slot), data.len())])
    }
}

#[test]
fn uas_at_high_speed_paces_data_with_ready_ius_like_linux() {
    let mut h = uas_host_at(Speed::High, false, image(BLOCKS));
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut data = vec![0u8; 64 << 10];
    rng.fill_bytes(&mut data);
    // Linux: a status transfer, then the Command IU; the data transfer
    // only after the Ready IU, with another status transfer before it.
    let s1 = h.hs_status(1);
    let c1 = h.command_iu(1, 0, &cdb10(0x2a, 8, 128));
    let r = h.done();
    assert_eq!(r[&c1].status, TransferStatus::Success);
    assert_eq!(iu_in(&h, 1, &r[&s1]), (WRITE_READY, 1));
    let s2 = h.hs_status(2);
    let d = h.hs_data_out(1, &data);
    let r = h.done();
    assert_eq!(
        (r[&d].status, r[&d].actual),
        (TransferStatus::Success, 64 << 10)
    );
    assert_eq!(iu_in(&h, 2, &r[&s2]), (SENSE, 1));
    let mut on_disk = vec![0u8; 64 << 10];
    h.image.read_exact_at(&mut on_disk, 8 * 512).unwrap();
    assert_eq!(Sha256::digest(&on_disk), Sha256::digest(&data));

    // Two READs queued (tags 1 and 2, a half each): one Ready IU at a
    // time; tag 2's comes on the status transfer after tag 1's Sense IU.
    let s3 = h.hs_status(3);
    let c_a = h.command_iu(1, 0, &cdb10(0x28, 8, 64));
    let s4 = h.hs_status(4);
    let c_b = h.command_iu(2, 0, &cdb10(0x28, 8 + 64, 64));
    let r = h.done();
    assert!(r.contains_key(&c_a) && r.contains_key(&c_b));
    assert_eq!(iu_in(&h, 3, &r[&s3]), (READ_READY, 1));
    assert!(!r.contains_key(&s4), "tag 2 waits for tag 1's data phase");
    assert_eq!(h.dev.uas.tasks(), 2);
    let s5 = h.hs_status(5);
    let d1 = h.hs_data_in(1, 32 << 10);
    let r = h.done();
    assert_eq!(r[&d1].actual, 32 << 10);
    assert_eq!(iu_in(&h, 4, &r[&s4]), (SENSE, 1));
    assert_eq!(iu_in(&h, 5, &r[&s5]), (READ_READY, 2));
    let s6 = h.hs_status(6);
    let d2 = h.hs_data_in(2, 32 << 10);
    let r = h.done();
    assert_eq!(r[&d2].actual, 32 << 10);
    assert_eq!(iu_in(&h, 6, &r[&s6]), (SENSE, 2));
    for (slot, half) in [(1u16, 0usize), (2, 1)] {
        let mut got = vec![0u8; 32 << 10];
        h.ram.read(data_buf(slot), &mut got).unwrap();
        assert_eq!(got, data[half * (32 << 10)..(half + 1) * (32 << 10)]);
    }
    assert_eq!(h.dev.uas.tasks(), 0);
}

#[test]
fn uas_at_high_speed_runs_a_read_and_a_write_together_and_no_data_commands_at_once() {
    let mut h = uas_host_at(Speed::High, false, image(BLOCKS));
    let data = vec![0x5au8; 4096];
    // A WRITE (tag 1), a READ (tag 2) and a TEST UNIT READY (tag 3).
    let s1 = h.hs_status(1);
    h.command_iu(1, 0, &cdb10(0x2a, 100, 8));
    let s2 = h.hs_status(2);
    h.command_iu(2, 0, &cdb10(0x28, 100, 8));
    let s3 = h.hs_status(3);
    h.command_iu(3, 0, &[0, 0, 0, 0, 0, 0]);
    let r = h.done();
    // One Ready IU per direction; the no-data command's Sense IU too.
    let mut got: Vec<(u8, u16)> = [(1, s1), (2, s2), (3, s3)]
        .iter()
        .map(|&(slot, id)| iu_in(&h, slot, &r[&id]))
        .collect();
    got.sort();
    assert_eq!(got, vec![(SENSE, 3), (READ_READY, 2), (WRITE_READY, 1)]);
    // Data for the write; the read's data comes after (it reads what the
    // write left only if the write went first: it did not have to).
    let s4 = h.hs_status(4);
    let dout = h.hs_data_out(1, &data);
    let s5 = h.hs_status(5);
    let din = h.hs_data_in(2, 4096);
    let r = h.done();
    assert_eq!(r[&dout].actual, 4096);
    assert_eq!(r[&din].actual, 4096);
    let mut senses: Vec<(u8, u16)> = [(4, s4), (5, s5)]
        .iter()
        .map(|&(slot, id)| iu_in(&h, slot, &r[&id]))
        .collect();
    senses.sort();
    assert_eq!(senses, vec![(SENSE, 1), (SENSE, 2)]);
    assert_eq!(h.dev.uas.tasks(), 0);
}

#[test]
fn uas_at_high_speed_stalls_data_nobody_asked_for() {
    let mut h = uas_host_at(Speed::High, false, image(BLOCKS));
    // A data transfer with no Ready IU out: STALL, never given to the
    // next command.
    let stray = h.hs_data_out(1, &[0xffu8; 512]);
    let r = h.done();
    assert_eq!(r[&stray].status, TransferStatus::Stall);
    let mut before = vec![0u8; 512];
    h.image.read_exact_at(&mut before, 0).unwrap();
    // Recover the pipe as Linux would (CLEAR_FEATURE ENDPOINT_HALT), then
    // a write of block 0 gets its own Ready IU and data.
    assert_eq!(
        h.control_out(0x02, 1, 0, u16::from(EP_DATA_OUT)),
        TransferStatus::Success
    );
    let s1 = h.hs_status(1);
    h.command_iu(5, 0, &cdb10(0x2a, 0, 1));
    let r = h.done();
    assert_eq!(iu_in(&h, 1, &r[&s1]), (WRITE_READY, 5));
    let s2 = h.hs_status(2);
    let d = h.hs_data_out(1, &[0x11u8; 512]);
    let r = h.done();
    assert_eq!(r[&d].actual, 512);
    assert_eq!(iu_in(&h, 2, &r[&s2]), (SENSE, 5));
    let mut after = vec![0u8; 512];
    h.image.read_exact_at(&mut after, 0).unwrap();
    assert_eq!(after, vec![0x11u8; 512]);
    assert_ne!(before, after);
}
