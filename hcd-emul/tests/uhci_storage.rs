//! The emulated full-speed stick behind our UHCI, driven like Linux's
//! uhci_hcd + usb-storage: port reset and enable, enumeration on a control
//! QH (the address-0 QH unlinked by waiting a frame), bulk URBs added by
//! memory only as one TD per 64-byte packet with unaligned buffers, short
//! reads that stop the queue (SPD) and are fixed up as Linux does, a
//! stalled CSW cleared; data checksummed against the image file. Also:
//! FSBR's looping terminating QH, IOC on the inactive terminating TD, a
//! QH unlinked while its transfer is in flight (the transfer is dropped
//! before FRNUM moves), and the frame counter.

#[path = "common/fake.rs"]
#[allow(dead_code)]
mod fake;
mod uhci_common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use hcd_emul::uhci::regs::*;
use hcd_emul::usb::Speed;
use hcd_emul::UsbStorage;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use uhci_common::*;

const IMAGE: u64 = 8 << 20;
const BUF: u32 = DATA_BASE as u32;

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

fn running_stick(speed: Speed) -> (Driver, std::fs::File) {
    let mut d = Driver::new();
    let f = image();
    let dev = UsbStorage::from_file(f.try_clone().unwrap(), false, speed).unwrap();
    let p = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    assert_eq!(p, 1);
    d.start();
    (d, f)
}

/// Enumerates the device at address 0 on port 1 as Linux does.
fn enumerate(d: &mut Driver, addr: u8, file: std::fs::File) -> Stick {
    let sc = d.portsc(1);
    assert_eq!(
        sc & (PORT_CCS | PORT_CSC | PORT_LSDA),
        PORT_CCS | PORT_CSC,
        "full-speed device connected: {sc:#x}"
    );
    assert_eq!(sc & PORT_LS, PORT_LS_FS_J, "J state of a full-speed device");
    let sc = d.reset_port(1);
    assert_eq!(
        sc & (PORT_PE | PORT_CCS | PORT_CSC | PORT_PEC),
        PORT_PE | PORT_CCS,
        "{sc:#x}"
    );
    let skel = d.skel_fs_ctrl;
    let mut ep0 = d.make_queue(skel, 0, 0, 8, false);
    // Linux first reads 8 bytes of the device descriptor at mps 8.
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 64))
        .unwrap();
    assert_eq!(
        dev.len(),
        18,
        "device descriptor (asked 64, short): {dev:x?}"
    );
    assert_eq!(dev[7], 64, "bMaxPacketSize0");
    let (_, stalled) = d.control(&mut ep0, setup(0, 5, u16::from(addr), 0, 0), None);
    assert!(!stalled, "SET_ADDRESS");
    d.unlink(&ep0);
    let mut ep0 = d.make_queue(skel, addr, 0, 64, false);
    let cfg = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0200, 0, 255))
        .unwrap();
    assert_eq!(cfg[1], 2);
    let (mut ein, mut eout, mut mps) = (0u8, 0u8, 0u32);
    let mut i = 0;
    while i + 1 < cfg.len() {
        let (l, t) = (cfg[i] as usize, cfg[i + 1]);
        if t == 5 {
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
    assert_eq!(mps, 64, "full-speed bulk packets");
    assert!(
        !d.control(&mut ep0, setup(0, 9, 1, 0, 0), None).1,
        "SET_CONFIGURATION"
    );
    let bulk = d.skel_bulk;
    let bulk_in = d.make_queue(bulk, addr, ein, mps, false);
    let bulk_out = d.make_queue(bulk, addr, eout, mps, false);
    Stick {
        ep0,
        bulk_in,
        bulk_out,
        tag: 1,
        file,
    }
}

fn send_cbw(d: &mut Driver, s: &mut Stick, cdb: &[u8], len: u32, dir_in: bool) {
    let mut cbw = vec![0u8; 31];
    cbw[0..4].copy_from_slice(b"USBC");
    cbw[4..8].copy_from_slice(&s.tag.to_le_bytes());
    cbw[8..12].copy_from_slice(&len.to_le_bytes());
    cbw[12] = if dir_in { 0x80 } else { 0 };
    cbw[14] = cdb.len() as u8;
    cbw[15..15 + cdb.len()].copy_from_slice(cdb);
    let cbw_addr = BUF - 0x1000;
    d.ram.write(u64::from(cbw_addr), &cbw).unwrap();
    let (r, specs) = d.bulk(&mut s.bulk_out, PID_OUT, cbw_addr, 31);
    assert!(!r.stalled(), "CBW: {:x?}", r.status);
    assert_eq!(r.actual(&specs, PID_OUT), 31);
}

fn read_csw(d: &mut Driver, s: &mut Stick) -> Result<[u8; 13], UrbResult> {
    let csw_addr = BUF - 0x800;
    let (r, _) = d.bulk(&mut s.bulk_in, PID_IN, csw_addr, 13);
    if r.stalled() {
        return Err(r);
    }
    let mut csw = [0u8; 13];
    d.ram.read(u64::from(csw_addr), &mut csw).unwrap();
    assert_eq!(&csw[0..4], b"USBS");
    assert_eq!(u32::from_le_bytes([csw[4], csw[5], csw[6], csw[7]]), s.tag);
    s.tag += 1;
    Ok(csw)
}

fn scsi(d: &mut Driver, s: &mut Stick, cdb: &[u8], data: Option<(bool, u32, u32)>) -> u8 {
    let len = data.map_or(0, |x| x.2);
    send_cbw(d, s, cdb, len, data.is_some_and(|x| x.0));
    if let Some((din, buf, len)) = data {
        let (q, pid) = if din {
            (&mut s.bulk_in, PID_IN)
        } else {
            (&mut s.bulk_out, PID_OUT)
        };
        let (r, specs) = d.bulk(q, pid, buf, len);
        assert!(
            !r.stalled(),
            "data phase: {:x?}",
            &r.status[..r.status.len().min(4)]
        );
        assert_eq!(r.actual(&specs, pid), len, "data phase bytes");
    }
    read_csw(d, s).expect("CSW")[12]
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [op, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

fn round_trip(d: &mut Driver, s: &mut Stick, rng: &mut impl Rng, lba: u32, len: u32) {
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    let wbuf = BUF + 0x123 + rng.gen_range(0..4096u32);
    d.ram.write(u64::from(wbuf), &data).unwrap();
    let blocks = (len / 512) as u16;
    assert_eq!(
        scsi(d, s, &rw10(0x2a, lba, blocks), Some((false, wbuf, len))),
        0,
        "WRITE(10)"
    );
    let rbuf = BUF + (8 << 20) + 0xffd + rng.gen_range(0..4096u32);
    d.ram
        .write(u64::from(rbuf), &vec![0xee; len as usize])
        .unwrap();
    assert_eq!(
        scsi(d, s, &rw10(0x28, lba, blocks), Some((true, rbuf, len))),
        0,
        "READ(10)"
    );
    let mut back = vec![0u8; len as usize];
    d.ram.read(u64::from(rbuf), &mut back).unwrap();
    assert_eq!(sha(&back), sha(&data), "read back {len} bytes at LBA {lba}");
    let mut on_disk = vec![0u8; len as usize];
    s.file.seek(SeekFrom::Start(u64::from(lba) * 512)).unwrap();
    s.file.read_exact(&mut on_disk).unwrap();
    assert_eq!(sha(&on_disk), sha(&data), "image file holds the data");
}

#[test]
fn full_speed_stick_round_trips_512b_to_120k() {
    let (mut d, f) = running_stick(Speed::Full);
    let mut s = enumerate(&mut d, 2, f);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // INQUIRY (36 bytes: the last TD is a short packet of 36 - 64).
    let mut cdb = [0u8; 6];
    cdb[0] = 0x12;
    cdb[4] = 36;
    assert_eq!(
        scsi(&mut d, &mut s, &cdb, Some((true, BUF + 0x10000, 36))),
        0
    );
    let mut lba = 16;
    for len in [512u32, 4096, 16896, 65536, 122880] {
        round_trip(&mut d, &mut s, &mut rng, lba, len);
        lba += len / 512 + 7;
    }
    let st = d.pci.controller().stats();
    // 120 KiB in 64-byte TDs: one transfer per URB, not one per packet.
    assert!(
        st.tds > 20 * st.transfers,
        "TDs merged into transfers: {st:?}"
    );
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
    let _ = &s.ep0;
}

#[test]
fn short_read_stops_the_queue_then_stalled_csw_recovers_like_linux() {
    let (mut d, f) = running_stick(Speed::Full);
    let mut s = enumerate(&mut d, 2, f);
    for round in 0..3 {
        // MODE SENSE(6) asking 192 bytes: the device has 36 (short), and
        // then stalls the CSW read (Hi > Di) until CLEAR_FEATURE(HALT).
        send_cbw(&mut d, &mut s, &[0x1a, 0, 0x3f, 0, 192, 0], 192, true);
        let buf = BUF + 0x4000;
        let (r, specs) = d.bulk(&mut s.bulk_in, PID_IN, buf, 192);
        assert!(!r.stalled(), "round {round}: data {:x?}", r.status);
        let got = r.actual(&specs, PID_IN);
        assert!(got < 192, "round {round}: short read ({got})");
        assert_ne!(
            r.status[2] & TD_ACTIVE,
            0,
            "round {round}: TDs after the short one stay active"
        );
        let err = read_csw(&mut d, &mut s).expect_err("the CSW read stalls");
        assert!(
            err.stall_handshake(),
            "round {round}: a STALL handshake: {:x?}",
            err.status
        );
        assert_ne!(err.status[0] & TD_CERR, 0, "STALL keeps the error counter");
        assert_ne!(d.r16(REG_USBSTS) & STS_ERROR, 0, "USBERRINT");
        d.w16(REG_USBSTS, STS_ERROR | STS_USBINT);
        // usb_stor_clear_halt, then the CSW again (toggle reset to 0).
        assert!(!d.control(&mut s.ep0, setup(0x02, 1, 0, 0x81, 0), None).1);
        s.bulk_in.toggle = false;
        let csw = read_csw(&mut d, &mut s).expect("CSW after clear halt");
        assert_eq!(
            u32::from_le_bytes([csw[8], csw[9], csw[10], csw[11]]),
            192 - got
        );
    }
}

#[test]
fn interrupts_ioc_short_packet_and_inactive_terminating_td() {
    let (mut d, f) = running_stick(Speed::Full);
    let mut s = enumerate(&mut d, 2, f);
    // Interrupts went to INTx (UHCI has no MSI).
    d.w16(REG_USBSTS, 0x3f);
    assert!(!d.irq.lock().unwrap().intx, "acknowledged");
    let mut cdb = [0u8; 6];
    cdb[0] = 0x12;
    cdb[4] = 36;
    assert_eq!(scsi(&mut d, &mut s, &cdb, Some((true, BUF, 36))), 0);
    assert_ne!(d.r16(REG_USBSTS) & STS_USBINT, 0, "IOC -> USBINT");
    assert!(d.irq.lock().unwrap().intx, "INTx raised");
    d.w16(REG_USBSTS, STS_USBINT);
    assert!(!d.irq.lock().unwrap().intx, "USBINT cleared");
    // "An interrupt next frame": IOC on the inactive terminating TD.
    let st = d.rd(d.term_td + 4);
    d.wr(d.term_td + 4, st | TD_IOC);
    let ok = d.run_until(|d| d.r16(REG_USBSTS) & STS_USBINT != 0);
    assert!(ok, "inactive TD with IOC interrupts");
    d.wr(d.term_td + 4, st);
    d.w16(REG_USBSTS, STS_USBINT);
    // Once a frame at most, and not again once IOC is gone.
    d.wait_frame();
    d.wait_frame();
    assert_eq!(
        d.r16(REG_USBSTS) & STS_USBINT,
        0,
        "no interrupt without IOC"
    );
    // FSBR: the terminating QH loops back; work still completes, in order.
    d.fsbr(true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    round_trip(&mut d, &mut s, &mut rng, 100, 8192);
    d.fsbr(false);
    round_trip(&mut d, &mut s, &mut rng, 200, 4096);
}

#[test]
fn frame_counter_follows_the_clock_and_stops_when_halted() {
    let mut d = Driver::new();
    d.start();
    let f0 = d.r16(REG_FRNUM);
    std::thread::sleep(Duration::from_millis(30));
    let f1 = d.r16(REG_FRNUM);
    let moved = f1.wrapping_sub(f0) & 0x7ff;
    assert!(
        (25..200).contains(&moved),
        "about a frame per ms: {f0} -> {f1}"
    );
    // Writes while running are ignored.
    d.w16(REG_FRNUM, 0x123);
    assert_ne!(d.r16(REG_FRNUM), 0x123);
    d.w16(REG_USBCMD, CMD_CF);
    assert_ne!(d.r16(REG_USBSTS) & STS_HCH, 0, "halted at once");
    let h = d.r16(REG_FRNUM);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(d.r16(REG_FRNUM), h, "frozen while halted");
    d.w16(REG_FRNUM, 0x7fe);
    assert_eq!(d.r16(REG_FRNUM), 0x7fe);
    d.w16(REG_USBCMD, CMD_RS | CMD_CF);
    std::thread::sleep(Duration::from_millis(5));
    assert!(d.r16(REG_FRNUM) < 0x100, "wrapped past 0x7ff");
    // Halted: no poll at all.
    d.w16(REG_USBCMD, CMD_CF);
    assert_eq!(d.pci.next_deadline(), None, "no timer while halted");
}

#[test]
fn unlinked_qh_in_flight_is_dropped_before_the_frame_moves() {
    let mut d = Driver::new();
    let (mut dev, state) = fake::FakeDevice::new(Speed::Full);
    dev.park_in = true;
    d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    d.start();
    d.reset_port(1);
    let skel = d.skel_fs_ctrl;
    let mut ep0 = d.make_queue(skel, 0, 0, 64, false);
    assert!(
        !d.control(&mut ep0, setup(0, 5, 5, 0, 0), None).1,
        "SET_ADDRESS"
    );
    assert!(!d.control(&mut ep0, setup(0, 9, 1, 0, 0), None).1);
    let bulk = d.skel_bulk;
    let mut q = d.make_queue(bulk, 5, 1, 64, false);
    // An IN URB the device holds (a device with nothing to say).
    let tds = d.append(
        &mut q,
        &[TdSpec {
            pid: PID_IN,
            buf: BUF,
            len: 64,
            toggle: false,
            spd: true,
            ioc: true,
        }],
    );
    let ok = d.run_until(|d| d.pci.controller().transfers_in_flight() == 1);
    assert!(ok, "the IN transfer reached the device");
    // Linux: unlink, wait for FRNUM to move, free the TDs.
    d.unlink(&q);
    assert_eq!(
        d.pci.controller().transfers_in_flight(),
        0,
        "dropped before the guest saw a new frame"
    );
    assert_eq!(
        state.lock().unwrap().cancels.len(),
        1,
        "the device was told"
    );
    d.wr(tds[0] + 4, 0xdead_0000);
    d.timeout = Duration::from_millis(50);
    d.run_until(|_| false);
    assert_eq!(
        d.rd(tds[0] + 4),
        0xdead_0000,
        "nothing written into the freed TD"
    );
}
