//! The emulated stick behind our EHCI, driven like Linux's ehci_hcd +
//! usb-storage: root-port reset, enumeration on a control QH, unlink with
//! two IAA cycles, bulk URBs appended by memory only (no doorbell) in
//! multi-qTD chains with unaligned buffers, short reads that stop the
//! queue on the magic qTD, data checksummed against the image file; and a
//! full-speed stick behind the built-in hub through split transactions.

mod ehci_common;

use std::io::{Read, Seek, SeekFrom, Write};

use ehci_common::*;
use hcd_emul::ehci::regs::*;
use hcd_emul::usb::Speed;
use hcd_emul::UsbStorage;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const IMAGE: u64 = 8 << 20;

struct Stick {
    ep0: Queue,
    bulk_in: Queue,
    bulk_out: Queue,
    tag: u32,
    file: std::fs::File,
}

fn image() -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![0u8; IMAGE as usize]).unwrap();
    f
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Enumerates the device answering at address 0 on `eps` (through the
/// hub's TT if `hub` is given) as Linux does; returns its queues.
fn enumerate(
    d: &mut Driver,
    eps: Eps,
    hub: Option<(u8, u8)>,
    addr: u8,
    file: std::fs::File,
) -> Stick {
    let mps0 = 64;
    let mut ep0 = d.make_qh(0, 0, eps, mps0, true, hub, 0);
    d.link_async(&ep0);
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 64))
        .unwrap();
    assert_eq!(dev.len(), 18, "device descriptor (asked 64, short)");
    assert_eq!(dev[0..2], [18, 1]);
    assert_eq!(dev[7], 64);
    assert_eq!(u16::from_le_bytes([dev[8], dev[9]]), 0x46f4);
    let (_, stalled) = d.control(&mut ep0, setup(0, 5, u16::from(addr), 0, 0), None);
    assert!(!stalled, "SET_ADDRESS");
    // The address-0 QH goes away the way Linux retires it.
    d.unlink_async(&ep0);
    let mut ep0 = d.make_qh(addr, 0, eps, mps0, true, hub, 0);
    d.link_async(&ep0);
    let cfg = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0200, 0, 255))
        .unwrap();
    assert_eq!(cfg[1], 2);
    // Endpoints of interface 0, alternate 0.
    let mut i = 0;
    let (mut ein, mut eout, mut mps) = (0u8, 0u8, 0u32);
    let mut alt = 0;
    while i + 1 < cfg.len() {
        let (l, t) = (cfg[i] as usize, cfg[i + 1]);
        if t == 4 {
            alt = cfg[i + 3];
        }
        if t == 5 && alt == 0 {
            let a = cfg[i + 2];
            mps = u32::from(u16::from_le_bytes([cfg[i + 4], cfg[i + 5]]));
            if a & 0x80 != 0 {
                ein = a & 0xf;
            } else {
                eout = a;
            }
        }
        i += l.max(1);
    }
    assert_eq!(mps, if eps == Eps::High { 512 } else { 64 });
    let (_, stalled) = d.control(&mut ep0, setup(0, 9, 1, 0, 0), None);
    assert!(!stalled, "SET_CONFIGURATION");
    let bulk_in = d.make_qh(addr, ein, eps, mps, false, hub, 0);
    let bulk_out = d.make_qh(addr, eout, eps, mps, false, hub, 0);
    d.link_async(&bulk_in);
    d.link_async(&bulk_out);
    Stick {
        ep0,
        bulk_in,
        bulk_out,
        tag: 1,
        file,
    }
}

fn scsi(d: &mut Driver, s: &mut Stick, cdb: &[u8], data: Option<(bool, u64, u32)>) -> u8 {
    let len = data.map_or(0, |x| x.2);
    let dir_in = data.is_some_and(|x| x.0);
    let mut cbw = vec![0u8; 31];
    cbw[0..4].copy_from_slice(b"USBC");
    cbw[4..8].copy_from_slice(&s.tag.to_le_bytes());
    cbw[8..12].copy_from_slice(&len.to_le_bytes());
    cbw[12] = if dir_in { 0x80 } else { 0 };
    cbw[14] = cdb.len() as u8;
    cbw[15..15 + cdb.len()].copy_from_slice(cdb);
    let cbw_addr = DATA_BASE - 0x1000;
    d.ram.write(cbw_addr, &cbw).unwrap();
    let r = d.bulk(&mut s.bulk_out, PID_OUT, cbw_addr, 31, 16384);
    assert!(!r.halted(), "CBW");
    if let Some((din, buf, len)) = data {
        let (q, pid) = if din {
            (&mut s.bulk_in, PID_IN)
        } else {
            (&mut s.bulk_out, PID_OUT)
        };
        // Linux's qtd_fill: 16 KiB qTDs, split on page boundaries.
        let specs_len = len;
        let r = d.bulk(q, pid, buf, specs_len, 16384);
        assert!(!r.halted(), "data phase halted: {:x?}", r.tokens);
        let moved: u32 = r
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let n = (len - 16384 * i as u32).min(16384);
                n - ((t >> TOK_BYTES_SHIFT) & TOK_BYTES_MASK)
            })
            .sum();
        assert_eq!(moved, len, "data phase bytes");
    }
    let csw_addr = DATA_BASE - 0x800;
    let r = d.bulk(&mut s.bulk_in, PID_IN, csw_addr, 13, 16384);
    assert!(!r.halted(), "CSW");
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

fn round_trip(d: &mut Driver, s: &mut Stick, rng: &mut impl Rng, lba: u32, len: u32) {
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    // Unaligned buffers: qTDs start mid-page.
    let wbuf = DATA_BASE + 0x123 + u64::from(rng.gen_range(0..4096u32));
    d.ram.write(wbuf, &data).unwrap();
    assert_eq!(
        scsi(
            d,
            s,
            &rw10(0x2a, lba, (len / 512) as u16),
            Some((false, wbuf, len))
        ),
        0,
        "WRITE(10)"
    );
    let rbuf = DATA_BASE + (8 << 20) + 0xffd + u64::from(rng.gen_range(0..4096u32));
    d.ram.write(rbuf, &vec![0xee; len as usize]).unwrap();
    assert_eq!(
        scsi(
            d,
            s,
            &rw10(0x28, lba, (len / 512) as u16),
            Some((true, rbuf, len))
        ),
        0,
        "READ(10)"
    );
    let mut back = vec![0u8; len as usize];
    d.ram.read(rbuf, &mut back).unwrap();
    assert_eq!(sha(&back), sha(&data), "read back {len} bytes at LBA {lba}");
    let mut on_disk = vec![0u8; len as usize];
    s.file.seek(SeekFrom::Start(u64::from(lba) * 512)).unwrap();
    s.file.read_exact(&mut on_disk).unwrap();
    assert_eq!(sha(&on_disk), sha(&data), "image file holds the data");
}

#[test]
fn high_speed_stick_round_trips_512b_to_240k() {
    let mut d = Driver::new();
    let f = image();
    let dev = UsbStorage::from_file(f.try_clone().unwrap(), false, Speed::High).unwrap();
    let (root, hp) = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    assert_eq!((root, hp), (2, 0), "high speed: a root port of its own");
    d.start();
    let sc = d.portsc(2);
    assert_ne!(sc & PORT_CCS, 0, "connected: {sc:#x}");
    assert_eq!(sc & PORT_LS, PORT_LS_J, "J state before reset");
    let sc = d.reset_port(2);
    assert_ne!(sc & PORT_PED, 0, "high-speed device: enabled by reset");
    d.enable_async();
    let mut s = enumerate(&mut d, Eps::High, None, 3, f);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // INQUIRY: a short read (36 of 255) that ends the URB.
    let buf = DATA_BASE + 0x10000;
    let mut cdb = [0u8; 6];
    cdb[0] = 0x12;
    cdb[4] = 36;
    assert_eq!(scsi(&mut d, &mut s, &cdb, Some((true, buf, 36))), 0);
    let mut lba = 16;
    for len in [512u32, 4096, 16384, 16896, 65536, 122880, 245760] {
        round_trip(&mut d, &mut s, &mut rng, lba, len);
        lba += len / 512 + 7;
    }
    let st = d.pci.controller().stats();
    assert!(st.qtds > st.transfers, "multi-qTD URBs merged: {st:?}");
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
    let _ = &s.ep0;
}

/// Hub class request on the hub's ep0.
fn hub_req(d: &mut Driver, q: &mut Queue, rt: u8, req: u8, value: u16, index: u16) -> bool {
    !d.control(q, setup(rt, req, value, index, 0), None).1
}

fn port_status(d: &mut Driver, q: &mut Queue, port: u16) -> (u16, u16) {
    let v = d.control_in(q, setup(0xa3, 0, 0, port, 4)).unwrap();
    (
        u16::from_le_bytes([v[0], v[1]]),
        u16::from_le_bytes([v[2], v[3]]),
    )
}

#[test]
fn full_speed_stick_behind_the_hub_through_split_transactions() {
    let mut d = Driver::new();
    let f = image();
    let dev = UsbStorage::from_file(f.try_clone().unwrap(), false, Speed::Full).unwrap();
    let at = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    assert_eq!(at, (1, 1), "full speed: behind the hub on root port 1");
    d.start();
    assert_ne!(d.portsc(1) & PORT_CCS, 0, "the hub is connected");
    assert_ne!(d.reset_port(1) & PORT_PED, 0, "the hub is high speed");
    d.enable_async();
    d.enable_periodic();
    // The hub, as Linux's hub driver sees it.
    let mut ep0 = d.make_qh(0, 0, Eps::High, 64, true, None, 0);
    d.link_async(&ep0);
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .unwrap();
    assert_eq!((dev[4], dev[6]), (9, 1), "hub class, single TT");
    assert_eq!(u16::from_le_bytes([dev[8], dev[9]]), 0x8087);
    assert!(!d.control(&mut ep0, setup(0, 5, 1, 0, 0), None).1);
    d.unlink_async(&ep0);
    let mut hub0 = d.make_qh(1, 0, Eps::High, 64, true, None, 0);
    d.link_async(&hub0);
    assert!(!d.control(&mut hub0, setup(0, 9, 1, 0, 0), None).1);
    let hd = d
        .control_in(&mut hub0, setup(0xa0, 6, 0x2900, 0, 71))
        .unwrap();
    assert_eq!((hd[1], hd[2]), (0x29, 4), "hub descriptor, 4 ports");
    // Status change endpoint on the periodic schedule: parks until there
    // is something to say.
    let mut status = d.make_qh(1, 1, Eps::High, 1, false, None, 0x01);
    d.link_periodic(&status, 8);
    let sbuf = DATA_BASE + 0x20000;
    let st = d.append(
        &mut status,
        &[QtdSpec {
            pid: PID_IN,
            buf: sbuf,
            len: 1,
            ioc: true,
            toggle: false,
        }],
    );
    d.timeout = std::time::Duration::from_millis(100);
    assert!(
        !d.run_until(|d| d.rd(st[0] + 8) & TOK_ACTIVE == 0),
        "nothing to report yet: the interrupt transfer waits in the hub"
    );
    d.timeout = std::time::Duration::from_secs(10);
    assert!(
        hub_req(&mut d, &mut hub0, 0x23, 3, 8, 1),
        "SET_PORT_FEATURE(POWER)"
    );
    assert!(
        d.run_until(|d| d.rd(st[0] + 8) & TOK_ACTIVE == 0),
        "the change completes the parked status transfer"
    );
    let mut bitmap = [0u8; 1];
    d.ram.read(sbuf, &mut bitmap).unwrap();
    assert_eq!(bitmap[0], 0x02, "port 1 changed");
    assert_ne!(d.usbsts() & STS_USBINT, 0, "IOC raised USBINT");
    let (s, c) = port_status(&mut d, &mut hub0, 1);
    assert_eq!(
        (s & 0x101, c & 1),
        (0x101, 1),
        "powered, connected, C_CONNECTION"
    );
    assert!(
        hub_req(&mut d, &mut hub0, 0x23, 1, 16, 1),
        "clear C_PORT_CONNECTION"
    );
    assert!(
        hub_req(&mut d, &mut hub0, 0x23, 3, 4, 1),
        "SET_PORT_FEATURE(RESET)"
    );
    let (s, c) = port_status(&mut d, &mut hub0, 1);
    assert_eq!(s & 0x603, 0x003, "enabled, full speed (neither LS nor HS)");
    assert_ne!(c & 0x10, 0, "C_PORT_RESET");
    assert!(hub_req(&mut d, &mut hub0, 0x23, 1, 20, 1));
    // The stick through the TT: split fields name hub 1, port 1.
    let mut s = enumerate(&mut d, Eps::Full, Some((1, 1)), 2, f);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut lba = 3;
    for len in [512u32, 4096, 20480, 65536] {
        round_trip(&mut d, &mut s, &mut rng, lba, len);
        lba += len / 512 + 1;
    }
    // A split naming the wrong hub port reaches nobody: the queue halts.
    let mut wrong = d.make_qh(2, 0, Eps::Full, 64, true, Some((1, 2)), 0);
    d.link_async(&wrong);
    let r = d.control(
        &mut wrong,
        setup(0x80, 6, 0x0100, 0, 18),
        Some((DATA_BASE + 0x30000, 18)),
    );
    assert!(r.1, "transaction error halts the QH");
    assert_ne!(d.usbsts() & STS_USBERRINT, 0);
    assert!(
        hub_req(&mut d, &mut hub0, 0x23, 8, 0x0081, 1),
        "CLEAR_TT_BUFFER"
    );
    assert!(hub_req(&mut d, &mut hub0, 0x23, 9, 0, 1), "RESET_TT");
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

/// The BOT case Hi > Di as Linux's usb-storage meets it: MODE SENSE(6)
/// asks 192 bytes, the stick has 36 (a short read), then stalls the CSW
/// read; the host clears the halt (CLEAR_FEATURE, and ehci_endpoint_reset
/// unlinks the QH, two IAA cycles, relinks it with the toggle reset by
/// qh_refresh) and reads the CSW.
#[test]
fn short_data_phase_then_stalled_csw_recovers_like_linux() {
    let mut d = Driver::new();
    let f = image();
    let dev = UsbStorage::from_file(f.try_clone().unwrap(), false, Speed::High).unwrap();
    d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    d.start();
    d.reset_port(2);
    d.enable_async();
    let mut s = enumerate(&mut d, Eps::High, None, 3, f);
    for round in 0..3 {
        let mut cbw = vec![0u8; 31];
        cbw[0..4].copy_from_slice(b"USBC");
        cbw[4..8].copy_from_slice(&s.tag.to_le_bytes());
        cbw[8..12].copy_from_slice(&192u32.to_le_bytes());
        cbw[12] = 0x80;
        cbw[14] = 6;
        cbw[15..21].copy_from_slice(&[0x1a, 0, 0x3f, 0, 192, 0]);
        let cbw_addr = DATA_BASE - 0x1000;
        d.ram.write(cbw_addr, &cbw).unwrap();
        let r = d.bulk(&mut s.bulk_out, PID_OUT, cbw_addr, 31, 16384);
        assert!(!r.halted(), "round {round}: CBW {:x?}", r.tokens);
        let r = d.bulk(&mut s.bulk_in, PID_IN, DATA_BASE + 0x4000, 192, 16384);
        assert!(!r.halted(), "round {round}: data {:x?}", r.tokens);
        let left = (r.tokens[0] >> TOK_BYTES_SHIFT) & TOK_BYTES_MASK;
        assert!(left > 0, "short read");
        let csw_addr = DATA_BASE - 0x800;
        let r = d.bulk(&mut s.bulk_in, PID_IN, csw_addr, 13, 16384);
        assert!(r.halted(), "round {round}: the CSW read stalls (Hi > Di)");
        assert!(
            r.stalled(),
            "round {round}: a STALL, not an error: {:x?}",
            r.tokens
        );
        {
            // usb_stor_clear_halt.
            assert!(!d.control(&mut s.ep0, setup(0x02, 1, 0, 0x81, 0), None).1);
            d.unlink_async(&s.bulk_in);
            d.refresh(&s.bulk_in, false);
            d.link_async(&s.bulk_in);
            let r = d.bulk(&mut s.bulk_in, PID_IN, csw_addr, 13, 16384);
            assert!(
                !r.halted(),
                "round {round}: CSW after clear halt {:x?}",
                r.tokens
            );
        }
        let mut csw = [0u8; 13];
        d.ram.read(csw_addr, &mut csw).unwrap();
        assert_eq!(&csw[0..4], b"USBS", "round {round}");
        assert_eq!(u32::from_le_bytes([csw[4], csw[5], csw[6], csw[7]]), s.tag);
        assert_eq!(
            u32::from_le_bytes([csw[8], csw[9], csw[10], csw[11]]),
            192 - 36
        );
        s.tag += 1;
    }
}
