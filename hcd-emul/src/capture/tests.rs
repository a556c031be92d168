//! Captures of a stick driven the way a host driver would (SET_ADDRESS,
//! GET_DESCRIPTOR, a BOT WRITE and READ, a cancelled transfer), read back
//! field by field as Wireshark's usbmon dissector reads them.

use super::*;
use crate::mem::GuestRam;
use crate::usb::{CompletionQueue, Segment, SetupPacket, TransferHandle};
use crate::UsbStorage;

const BUF: u64 = 0x1000;
const DATA: u64 = 0x10_0000;

struct Host {
    dev: Captured,
    ram: GuestRam,
    q: CompletionQueue,
    next: u64,
}

impl Host {
    fn new(switch: CaptureSwitch) -> Host {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let stick = UsbStorage::from_file(f, false, Speed::High).unwrap();
        Host {
            dev: Captured::new(Box::new(stick), switch),
            ram: GuestRam::anonymous(4 << 20),
            q: CompletionQueue::new(),
            next: 1,
        }
    }

    fn xfer(
        &mut self,
        ep: u8,
        dir: Direction,
        kind: TransferKind,
        addr: u64,
        len: usize,
    ) -> (Transfer, TransferHandle) {
        let id = TransferId(self.next);
        self.next += 1;
        Transfer::new(
            id,
            ep,
            dir,
            kind,
            vec![Segment::Guest { addr, len }],
            self.ram.clone(),
            vec![],
            self.q.clone(),
        )
    }

    fn run(
        &mut self,
        ep: u8,
        dir: Direction,
        kind: TransferKind,
        addr: u64,
        len: usize,
    ) -> (TransferStatus, usize) {
        let (t, _h) = self.xfer(ep, dir, kind, addr, len);
        self.dev.submit(t);
        let r = self.q.drain().pop().expect("completed");
        (r.status, r.actual)
    }

    fn control(&mut self, rt: u8, req: u8, value: u16, length: u16) -> (TransferStatus, usize) {
        let sp = SetupPacket {
            request_type: rt,
            request: req,
            value,
            index: 0,
            length,
        };
        let dir = if rt & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        };
        self.run(0, dir, TransferKind::Control(sp), BUF, length.into())
    }

    /// A BOT command: CBW, data (if any), CSW.
    fn bot(&mut self, tag: u32, cdb: &[u8], dir_in: bool, data_len: u32) {
        let mut cbw = [0u8; 31];
        cbw[0..4].copy_from_slice(b"USBC");
        cbw[4..8].copy_from_slice(&tag.to_le_bytes());
        cbw[8..12].copy_from_slice(&data_len.to_le_bytes());
        cbw[12] = if dir_in { 0x80 } else { 0 };
        cbw[14] = cdb.len() as u8;
        cbw[15..15 + cdb.len()].copy_from_slice(cdb);
        self.ram.write(BUF, &cbw).unwrap();
        assert_eq!(
            self.run(2, Direction::Out, TransferKind::Bulk, BUF, 31).0,
            TransferStatus::Success
        );
        if data_len > 0 {
            let dir = if dir_in {
                Direction::In
            } else {
                Direction::Out
            };
            let ep = if dir_in { 1 } else { 2 };
            let r = self.run(ep, dir, TransferKind::Bulk, DATA, data_len as usize);
            assert_eq!(r, (TransferStatus::Success, data_len as usize));
        }
        assert_eq!(
            self.run(1, Direction::In, TransferKind::Bulk, BUF, 13),
            (TransferStatus::Success, 13)
        );
    }
}

/// One record of the file: the usbmon header fields and the data.
#[derive(Debug)]
struct Record {
    id: u64,
    event: u8,
    xfer_type: u8,
    epnum: u8,
    devnum: u8,
    bus: u16,
    flag_setup: u8,
    status: i32,
    length: u32,
    len_cap: u32,
    setup: [u8; 8],
    incl: u32,
    orig: u32,
    data: Vec<u8>,
}

fn read_pcap(path: &Path) -> Vec<Record> {
    let b = fs::read(path).unwrap();
    assert_eq!(&b[0..4], &0xa1b2_c3d4u32.to_le_bytes(), "pcap magic");
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), 2);
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), 4);
    assert_eq!(
        u32::from_le_bytes(b[20..24].try_into().unwrap()),
        220,
        "LINKTYPE_USB_LINUX_MMAPPED"
    );
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut o = 24;
    while o < b.len() {
        let incl = u32_at(o + 8);
        let orig = u32_at(o + 12);
        let p = o + 16;
        let len_cap = u32_at(p + 36);
        let ndesc = u32_at(p + 60) as usize;
        let d0 = p + 64 + ndesc * 16;
        assert_eq!(
            incl as usize,
            64 + ndesc * 16 + len_cap as usize,
            "incl_len"
        );
        out.push(Record {
            id: u64::from_le_bytes(b[p..p + 8].try_into().unwrap()),
            event: b[p + 8],
            xfer_type: b[p + 9],
            epnum: b[p + 10],
            devnum: b[p + 11],
            bus: u16::from_le_bytes([b[p + 12], b[p + 13]]),
            flag_setup: b[p + 14],
            status: u32_at(p + 28) as i32,
            length: u32_at(p + 32),
            len_cap,
            setup: b[p + 40..p + 48].try_into().unwrap(),
            incl,
            orig,
            data: b[d0..d0 + len_cap as usize].to_vec(),
        });
        o = p + incl as usize;
    }
    assert_eq!(o, b.len(), "no partial record");
    out
}

fn opts(dir: &Path) -> CaptureOptions {
    CaptureOptions::new(dir.join("usb.pcap"))
}

#[test]
fn a_bot_session_reads_back_as_usbmon_records() {
    let d = tempfile::tempdir().unwrap();
    let sw = CaptureSwitch::default();
    sw.start(&CaptureOptions {
        snaplen: 64,
        ..opts(d.path())
    })
    .unwrap();
    let mut h = Host::new(sw.clone());
    // Enumeration as a host does it: SET_ADDRESS 5, GET_DESCRIPTOR(device).
    assert_eq!(h.control(0x00, 5, 5, 0).0, TransferStatus::Success);
    assert_eq!(
        h.control(0x80, 6, 0x0100, 18),
        (TransferStatus::Success, 18)
    );
    assert_eq!(h.control(0x00, 9, 1, 0).0, TransferStatus::Success);
    // WRITE(10) of 8 blocks, READ(10) of the same.
    h.ram.write(DATA, &vec![0xa5u8; 4096]).unwrap();
    h.bot(7, &[0x2a, 0, 0, 0, 0, 16, 0, 0, 8, 0], false, 4096);
    h.ram.write(DATA, &vec![0u8; 4096]).unwrap();
    h.bot(8, &[0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], true, 4096);
    // A bulk IN with no CBW before it parks; the controller cancels it.
    let (t, handle) = h.xfer(1, Direction::In, TransferKind::Bulk, BUF, 13);
    let cancelled = t.id();
    h.dev.submit(t);
    assert!(handle.cancel());
    h.dev.cancel(cancelled);
    let (path, stats) = sw.stop().unwrap();
    assert_eq!(stats.dropped, 0);

    let r = read_pcap(&path);
    assert_eq!(stats.records, r.len() as u64);
    // 3 control + 2 * 3 bulk transfers, S and C each, then S + C of the cancel.
    assert_eq!(r.len(), 2 * (3 + 6) + 2, "{r:#?}");
    assert!(r.iter().all(|x| x.bus == 1));
    // SET_ADDRESS: S with the setup packet, sent to address 0 (usbmon
    // shows the address the URB went to); later records carry 5.
    let (s, c) = (&r[0], &r[1]);
    assert_eq!(
        (s.event, s.xfer_type, s.epnum, s.flag_setup, s.devnum),
        (b'S', 2, 0x00, 0, 0)
    );
    assert_eq!(s.setup, [0x00, 5, 5, 0, 0, 0, 0, 0]);
    assert_eq!(s.status, -115, "-EINPROGRESS");
    assert_eq!(
        (c.event, c.id, c.status, c.flag_setup),
        (b'C', s.id, 0, b'-')
    );
    // GET_DESCRIPTOR: IN control (epnum 0x80), 18 bytes of data in the C.
    let (s, c) = (&r[2], &r[3]);
    assert_eq!((s.epnum, s.devnum, s.length, s.len_cap), (0x80, 5, 18, 0));
    assert_eq!(s.setup, [0x80, 6, 0, 1, 0, 0, 18, 0]);
    assert_eq!((c.length, c.len_cap), (18, 18));
    assert_eq!(&c.data[..2], &[18, 1], "the device descriptor");
    // The WRITE: CBW (S of bulk OUT 2 carries it), data capped at 64
    // bytes (orig_len keeps the 4096), CSW (C of bulk IN 1).
    let cbw = &r[6];
    assert_eq!(
        (cbw.event, cbw.xfer_type, cbw.epnum, cbw.length),
        (b'S', 3, 0x02, 31)
    );
    assert_eq!(&cbw.data[..4], b"USBC");
    assert_eq!(u32::from_le_bytes(cbw.data[4..8].try_into().unwrap()), 7);
    let data = &r[8];
    assert_eq!(
        (data.event, data.length, data.len_cap, data.orig),
        (b'S', 4096, 64, 64 + 4096)
    );
    assert_eq!(data.incl, 64 + 64);
    assert!(data.data.iter().all(|&x| x == 0xa5));
    assert_eq!(
        (r[9].event, r[9].length, r[9].len_cap),
        (b'C', 4096, 0),
        "OUT completion: no data"
    );
    let csw = &r[11];
    assert_eq!((csw.event, csw.epnum, csw.length), (b'C', 0x81, 13));
    assert_eq!(&csw.data[..4], b"USBS");
    assert_eq!(u32::from_le_bytes(csw.data[4..8].try_into().unwrap()), 7);
    assert_eq!(csw.data[12], 0, "command passed");
    // The READ's data: C of bulk IN with the bytes written before.
    let rd = &r[15];
    assert_eq!(
        (rd.event, rd.epnum, rd.length, rd.len_cap),
        (b'C', 0x81, 4096, 64)
    );
    assert!(rd.data.iter().all(|&x| x == 0xa5));
    // The cancelled transfer: S, then C with -ECONNRESET.
    let (s, c) = (&r[18], &r[19]);
    assert_eq!((s.event, s.id), (b'S', cancelled.0));
    assert_eq!(
        (c.event, c.id, c.status, c.length),
        (b'C', cancelled.0, -104, 0)
    );
    // Every S has exactly one C.
    for x in r.iter().filter(|x| x.event == b'S') {
        assert_eq!(
            r.iter().filter(|y| y.event == b'C' && y.id == x.id).count(),
            1,
            "{x:?}"
        );
    }
}

#[test]
fn switched_off_nothing_is_written_and_stop_reports_the_file() {
    let d = tempfile::tempdir().unwrap();
    let sw = CaptureSwitch::default();
    let mut h = Host::new(sw.clone());
    assert!(sw.status().is_none());
    assert!(sw.stop().is_none());
    h.control(0x00, 5, 3, 0);
    sw.start(&opts(d.path())).unwrap();
    h.control(0x80, 6, 0x0100, 18);
    let (path, st) = sw.status().unwrap();
    assert_eq!(path, d.path().join("usb.pcap"));
    assert_eq!(st.records, 2);
    sw.stop();
    h.control(0x80, 6, 0x0100, 18);
    let r = read_pcap(&path);
    assert_eq!(r.len(), 2, "only what ran while on");
}

#[test]
fn files_rotate_by_size_and_keep_only_the_newest() {
    let d = tempfile::tempdir().unwrap();
    let sw = CaptureSwitch::default();
    // Each GET_DESCRIPTOR pair is 2 * 16 + 64 + 64 + 18 = 178 bytes; a file
    // holds the 24-byte header and at most 1000 bytes.
    sw.start(&CaptureOptions {
        max_bytes: 1024,
        keep: 2,
        ..opts(d.path())
    })
    .unwrap();
    let mut h = Host::new(sw.clone());
    for _ in 0..40 {
        h.control(0x80, 6, 0x0100, 18);
    }
    let (path, st) = sw.stop().unwrap();
    assert_eq!((st.records, st.dropped), (80, 0));
    let mut total = 0;
    for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
        let len = fs::metadata(&p).unwrap().len();
        assert!(len <= 1024, "{} is {len} bytes", p.display());
        total += read_pcap(&p).len();
    }
    assert!(!numbered(&path, 3).exists(), "keep = 2");
    assert!(
        (2 * (1000 / 178)..80).contains(&total),
        "the oldest rotated away: {total}"
    );
}

#[test]
fn an_unwritable_file_is_an_error_at_start() {
    let sw = CaptureSwitch::default();
    assert!(sw
        .start(&CaptureOptions::new("/nonexistent-dir/x.pcap"))
        .is_err());
    assert!(sw.status().is_none());
}

#[test]
fn dropping_the_device_puts_every_record_in_the_file() {
    // No stop, no flush: the device model going away must not lose the
    // records still queued (a CI run lost the last 2 MiB of reads so).
    let d = tempfile::tempdir().unwrap();
    let sw = CaptureSwitch::default();
    sw.start(&opts(d.path())).unwrap();
    let mut h = Host::new(sw.clone());
    for _ in 0..500 {
        h.control(0x80, 6, 0x0100, 18);
    }
    let (path, st) = sw.status().unwrap();
    drop(h);
    assert_eq!(read_pcap(&path).len() as u64, st.records);
    assert_eq!(st.records, 1000);
}
