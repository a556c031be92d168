//! The emulated USB stick behind our xHCI, driven like Linux's xhci_hcd +
//! usb-storage: enumeration, BOT/SCSI, checksummed data integrity over
//! unaligned scatter/gather buffers, TDs spanning Link TRBs, two sticks at
//! once, and a read-only stick.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::{Driver, DATA_BASE};
use hcd_emul::usb::Speed;
use hcd_emul::xhci::context::ep_type;
use hcd_emul::xhci::trb::cc;
use hcd_emul::UsbStorage;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const BULK_IN: usize = 3;
const BULK_OUT: usize = 4;
const IMAGE: u64 = 8 << 20;

struct Stick {
    slot: usize,
    tag: u32,
    file: std::fs::File,
}

fn image() -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![0u8; IMAGE as usize]).unwrap();
    f
}

fn plug(d: &mut Driver, readonly: bool, speed: Speed) -> (usize, std::fs::File) {
    let f = image();
    let dev = UsbStorage::from_file(f.try_clone().unwrap(), readonly, speed).unwrap();
    let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    (port, f)
}

/// Enumeration as Linux does it, checking every field the guest uses.
fn enumerate(d: &mut Driver, port: usize, speed: Speed, file: std::fs::File) -> Stick {
    let slot = d.address(port);
    let dev = d.get_descriptor(slot, 1, 0, 18);
    assert_eq!(dev[0..2], [18, 1]);
    let bcd = u16::from_le_bytes([dev[2], dev[3]]);
    let (mps0, bulk_mps) = if speed == Speed::Super {
        assert!(bcd >= 0x0300);
        (9u8, 1024u16)
    } else {
        assert_eq!(bcd, 0x0200);
        (64, 512)
    };
    assert_eq!(dev[4], 0, "class defined by interface");
    assert_eq!(dev[7], mps0);
    assert_eq!(u16::from_le_bytes([dev[8], dev[9]]), 0x46f4);
    assert_eq!(u16::from_le_bytes([dev[10], dev[11]]), 0x0001);
    assert_eq!(dev[17], 1, "one configuration");
    assert_ne!(dev[16], 0, "serial number string (usb-storage needs it)");
    let serial = d.get_descriptor(slot, 3, dev[16], 255);
    assert!(serial.len() >= 2 + 2 * 12 && serial[1] == 3);
    let head = d.get_descriptor(slot, 2, 0, 9);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let cfg = d.get_descriptor(slot, 2, 0, total);
    assert_eq!(cfg.len(), total as usize);
    let conf_value = cfg[5];
    // Walk: interface 8/6/0x50 with bulk 0x81 and 0x02.
    let mut i = 0;
    let mut eps = Vec::new();
    let mut iface = None;
    while i + 2 <= cfg.len() {
        let (len, ty) = (cfg[i] as usize, cfg[i + 1]);
        assert!(len >= 2);
        match ty {
            4 => iface = Some((cfg[i + 5], cfg[i + 6], cfg[i + 7])),
            5 => eps.push((
                cfg[i + 2],
                cfg[i + 3],
                u16::from_le_bytes([cfg[i + 4], cfg[i + 5]]),
            )),
            _ => {}
        }
        i += len;
    }
    assert_eq!(iface, Some((8, 6, 0x50)));
    eps.sort();
    assert_eq!(eps, vec![(0x02, 2, bulk_mps), (0x81, 2, bulk_mps)]);
    if speed == Speed::Super {
        let bos = d.get_descriptor(slot, 15, 0, 5);
        assert_eq!(bos[1], 15);
        let all = d.get_descriptor(slot, 15, 0, u16::from_le_bytes([bos[2], bos[3]]));
        assert!(all.len() > 5);
    }
    assert_eq!(
        d.control_out(slot, [0, 9, conf_value, 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS
    );
    assert_eq!(
        d.control_in(slot, [0xa1, 0xfe, 0, 0, 0, 0, 1, 0]).unwrap(),
        vec![0],
        "max LUN 0"
    );
    let burst = if speed == Speed::Super { 15 } else { 0 };
    let code = d.configure(
        slot,
        &[
            (BULK_IN, ep_type::BULK_IN, bulk_mps as u32, burst),
            (BULK_OUT, ep_type::BULK_OUT, bulk_mps as u32, burst),
        ],
    );
    assert_eq!(code, cc::SUCCESS);
    Stick { slot, tag: 1, file }
}

/// Splits `[addr, addr+len)` into pieces of random lengths (a scatter list
/// like a page-cache bio's).
fn scatter(rng: &mut impl Rng, addr: u64, len: u32) -> Vec<(u64, u32)> {
    let mut v = Vec::new();
    let mut a = addr;
    let mut left = len;
    while left > 0 {
        let n = rng.gen_range(1..=9000).min(left);
        v.push((a, n));
        a += u64::from(n);
        left -= n;
    }
    v
}

/// One SCSI command over BOT. Returns the CSW status.
fn scsi(d: &mut Driver, s: &mut Stick, cdb: &[u8], data: Option<(bool, Vec<(u64, u32)>)>) -> u8 {
    let len: u32 = data
        .as_ref()
        .map(|(_, b)| b.iter().map(|x| x.1).sum())
        .unwrap_or(0);
    let dir_in = data.as_ref().is_some_and(|(i, _)| *i);
    let mut cbw = vec![0u8; 31];
    cbw[0..4].copy_from_slice(b"USBC");
    cbw[4..8].copy_from_slice(&s.tag.to_le_bytes());
    cbw[8..12].copy_from_slice(&len.to_le_bytes());
    cbw[12] = if dir_in { 0x80 } else { 0 };
    cbw[14] = cdb.len() as u8;
    cbw[15..15 + cdb.len()].copy_from_slice(cdb);
    let cbw_addr = DATA_BASE - 0x1000;
    d.ram.write(cbw_addr, &cbw).unwrap();
    assert_eq!(d.bulk(s.slot, BULK_OUT, &[(cbw_addr, 31)]).0, cc::SUCCESS);
    if let Some((din, bufs)) = data {
        let (code, n) = d.bulk(s.slot, if din { BULK_IN } else { BULK_OUT }, &bufs);
        assert_eq!((code, n), (cc::SUCCESS, len), "data phase");
    }
    let csw_addr = DATA_BASE - 0x800;
    let (code, n) = d.bulk(s.slot, BULK_IN, &[(csw_addr, 13)]);
    assert_eq!((code, n), (cc::SUCCESS, 13), "CSW");
    let mut csw = [0u8; 13];
    d.ram.read(csw_addr, &mut csw).unwrap();
    assert_eq!(&csw[0..4], b"USBS");
    assert_eq!(u32::from_le_bytes([csw[4], csw[5], csw[6], csw[7]]), s.tag);
    s.tag += 1;
    csw[12]
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [op, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn file_bytes(f: &mut std::fs::File, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    f.seek(SeekFrom::Start(off)).unwrap();
    f.read_exact(&mut v).unwrap();
    v
}

/// Writes `len` random bytes at `lba` and reads them back through fresh,
/// differently scattered buffers; compares checksums and the image file.
fn round_trip(d: &mut Driver, s: &mut Stick, rng: &mut impl Rng, lba: u32, len: u32) {
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    let wbuf = DATA_BASE + 0x123 + u64::from(rng.gen_range(0..4096u32));
    d.ram.write(wbuf, &data).unwrap();
    let bufs = scatter(rng, wbuf, len);
    assert_eq!(
        scsi(
            d,
            s,
            &rw10(0x2a, lba, (len / 512) as u16),
            Some((false, bufs))
        ),
        0,
        "WRITE(10)"
    );
    let rbuf = DATA_BASE + (8 << 20) + 0xffd + u64::from(rng.gen_range(0..4096u32));
    d.ram.write(rbuf, &vec![0xee; len as usize]).unwrap();
    let bufs = scatter(rng, rbuf, len);
    assert_eq!(
        scsi(
            d,
            s,
            &rw10(0x28, lba, (len / 512) as u16),
            Some((true, bufs))
        ),
        0,
        "READ(10)"
    );
    let mut back = vec![0u8; len as usize];
    d.ram.read(rbuf, &mut back).unwrap();
    assert_eq!(sha(&back), sha(&data), "read back {len} bytes at LBA {lba}");
    let on_disk = file_bytes(&mut s.file, u64::from(lba) * 512, len as usize);
    assert_eq!(sha(&on_disk), sha(&data), "image file holds the data");
}

#[test]
fn stick_enumerates_and_round_trips_512b_to_1mib_high_speed() {
    let mut d = Driver::new();
    let (port, f) = plug(&mut d, false, Speed::High);
    d.start();
    let mut s = enumerate(&mut d, port, Speed::High, f);
    // TEST UNIT READY, INQUIRY, READ CAPACITY(10).
    assert_eq!(scsi(&mut d, &mut s, &[0; 6], None), 0);
    let inq = DATA_BASE;
    assert_eq!(
        scsi(
            &mut d,
            &mut s,
            &[0x12, 0, 0, 0, 36, 0],
            Some((true, vec![(inq, 36)]))
        ),
        0
    );
    let mut b = [0u8; 36];
    d.ram.read(inq, &mut b).unwrap();
    assert_eq!(b[0] & 0x1f, 0, "direct-access block device");
    assert!(b[1] & 0x80 != 0, "removable");
    assert_eq!(
        scsi(
            &mut d,
            &mut s,
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Some((true, vec![(inq, 8)]))
        ),
        0
    );
    let mut cap = [0u8; 8];
    d.ram.read(inq, &mut cap).unwrap();
    assert_eq!(
        u32::from_be_bytes([cap[0], cap[1], cap[2], cap[3]]) as u64,
        IMAGE / 512 - 1
    );
    assert_eq!(u32::from_be_bytes([cap[4], cap[5], cap[6], cap[7]]), 512);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut lba = 0u32;
    let mut wrapped_inside_td = false;
    let sizes = [512u32, 4096, 8192 + 512, 65536, 65536 * 3 + 1024, 1 << 20];
    // Then 1 MiB commands until a data TD has crossed the Link TRB (the
    // 1024-TRB ring wraps after ~4 MiB of scattered writes).
    for len in sizes.into_iter().chain(std::iter::repeat_n(1 << 20, 8)) {
        if wrapped_inside_td && len == 1 << 20 && lba > 4096 {
            break;
        }
        let before = d.slots[&s.slot].rings[&BULK_OUT].enq;
        round_trip(&mut d, &mut s, &mut rng, lba, len);
        let after = d.slots[&s.slot].rings[&BULK_OUT].enq;
        // The CBW takes one TRB before the data TD; a wrap during the
        // command means the data TD crossed the Link TRB.
        wrapped_inside_td |= after < before && after > 1;
        lba += len / 512 + 7;
    }
    assert!(wrapped_inside_td, "a TD spanned the ring's Link TRB");
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn superspeed_stick_round_trips() {
    let mut d = Driver::new();
    let (port, f) = plug(&mut d, false, Speed::Super);
    d.start();
    let mut s = enumerate(&mut d, port, Speed::Super, f);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    for (lba, len) in [(3u32, 512u32), (100, 1 << 20), (4000, 12288)] {
        round_trip(&mut d, &mut s, &mut rng, lba, len);
    }
}

#[test]
fn two_sticks_interleaved() {
    let mut d = Driver::new();
    let (p1, f1) = plug(&mut d, false, Speed::High);
    let (p2, f2) = plug(&mut d, false, Speed::Super);
    d.start();
    let mut a = enumerate(&mut d, p1, Speed::High, f1);
    let mut b = enumerate(&mut d, p2, Speed::Super, f2);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    for k in 0..6u32 {
        let len = 512 * rng.gen_range(1..=256u32);
        round_trip(&mut d, &mut a, &mut rng, k * 600, len);
        round_trip(&mut d, &mut b, &mut rng, k * 600 + 1, len);
    }
    // Each image holds only its own writes: the same LBA differs.
    let x = file_bytes(&mut a.file, 0, 512);
    let y = file_bytes(&mut b.file, 0, 512);
    assert_ne!(x, y);
}

#[test]
fn readonly_stick_refuses_writes_with_data_protect() {
    let mut d = Driver::new();
    let (port, mut f) = plug(&mut d, true, Speed::High);
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&[0x5a; 4096]).unwrap();
    d.start();
    let mut s = enumerate(&mut d, port, Speed::High, f);
    d.ram.write(DATA_BASE, &[1u8; 4096]).unwrap();
    // The write's data phase is accepted and discarded, the CSW fails.
    let status = scsi(
        &mut d,
        &mut s,
        &rw10(0x2a, 0, 8),
        Some((false, vec![(DATA_BASE, 4096)])),
    );
    assert_eq!(status, 1);
    assert_eq!(
        scsi(
            &mut d,
            &mut s,
            &[0x03, 0, 0, 0, 18, 0],
            Some((true, vec![(DATA_BASE, 18)]))
        ),
        0
    );
    let mut sense = [0u8; 18];
    d.ram.read(DATA_BASE, &mut sense).unwrap();
    assert_eq!(
        (sense[2] & 0xf, sense[12]),
        (0x07, 0x27),
        "DATA PROTECT / WRITE PROTECTED"
    );
    assert_eq!(file_bytes(&mut s.file, 0, 4096), vec![0x5a; 4096]);
    // Reads still work.
    assert_eq!(
        scsi(
            &mut d,
            &mut s,
            &rw10(0x28, 0, 8),
            Some((true, vec![(DATA_BASE + 0x10000, 4096)]))
        ),
        0
    );
    let mut back = vec![0u8; 4096];
    d.ram.read(DATA_BASE + 0x10000, &mut back).unwrap();
    assert_eq!(back, vec![0x5a; 4096]);
}
