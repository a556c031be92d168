//! Passthrough checks through our UHCI against real usbfs, run inside a
//! Linux VM (`tests/passthrough/run.sh uhci` boots it) whose QEMU-emulated
//! USB devices are real devices to its kernel: a full-speed usb-storage
//! stick and a usb-kbd on QEMU's UHCI, a high-speed stick on its EHCI. Our
//! UHCI, driven in-process by the Linux-shaped guest driver of the hcd-emul
//! UHCI tests, passes the full-speed devices through usbfs on its two
//! ports and refuses the high-speed stick.
//!
//! One `RESULT name PASS|FAIL detail` line per check; `PT-WAIT what` lines
//! ask the script outside the VM to act through QMP (`key`, `key2`: a key
//! press; `unplug`, `replug`: the full-speed stick).

#[path = "../../hcd-emul/tests/uhci_common/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod uhci_common;
mod vmcommon;

use std::time::{Duration, Instant};

use hcd_emul::uhci::regs::*;
use hcd_emul::uhci::AttachError;
use hcd_emul::usb::Speed;
use passthrough::descriptors::HostDescriptors;
use passthrough::{HostMonitor, MatchRule};
use rand::{RngCore, SeedableRng};
use uhci_common::{setup, Driver, Queue, TdSpec, DATA_BASE};
use vmcommon::*;

const BLOCK: u32 = 512;
const HS_SERIAL: &str = "PTHS01";
const FS_SERIAL: &str = "PTFS01";
const LBA: u32 = 2048;
const FS_ADDR: u8 = 2;
const KBD_ADDR: u8 = 3;
const FS_ADDR2: u8 = 4;
/// Up to Linux's 120 KiB URB (1920 TDs of 64 bytes); the outer QEMU's
/// full-speed bus moves about 1 MB/s.
const FS_SIZES: [u32; 4] = [4096, 20480, 65536, 122880];
const BUF: u32 = DATA_BASE as u32;

fn read_guest(d: &Driver, addr: u32, len: u32) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    d.ram.read(u64::from(addr), &mut v).unwrap();
    v
}

/// A device our driver enumerated on `port`.
struct Enumerated {
    ep0: Queue,
    dev: Vec<u8>,
    cfg: Vec<u8>,
}

/// Enumeration as Linux's hub_port_init does it on UHCI: port reset and
/// enable, GET_DESCRIPTOR(64) at address 0 with an 8-byte ep0,
/// SET_ADDRESS, the address-0 QH unlinked (a frame waited), a new ep0 QH
/// with the real bMaxPacketSize0, device and configuration descriptors.
fn enumerate(d: &mut Driver, port: usize, addr: u8) -> Result<Enumerated, String> {
    let sc = d.reset_port(port);
    if sc & (PORT_PE | PORT_CCS) != PORT_PE | PORT_CCS {
        return Err(format!("port {port} after reset: {sc:#06x}"));
    }
    let skel = d.skel_fs_ctrl;
    let mut q0 = d.make_queue(skel, 0, 0, 8, false);
    let dev = d
        .control_in(&mut q0, setup(0x80, 6, 0x0100, 0, 64))
        .map_err(|_| "GET_DESCRIPTOR(device) at address 0 stalled".to_string())?;
    if dev.len() != 18 || dev[1] != 1 {
        return Err(format!("device descriptor {dev:02x?}"));
    }
    let (_, stalled) = d.control(&mut q0, setup(0, 5, u16::from(addr), 0, 0), None);
    d.unlink(&q0);
    if stalled {
        return Err("SET_ADDRESS stalled".into());
    }
    let mut ep0 = d.make_queue(skel, addr, 0, u32::from(dev[7]), false);
    let dev = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0100, 0, 18))
        .map_err(|_| "GET_DESCRIPTOR(device) stalled".to_string())?;
    let head = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0200, 0, 9))
        .map_err(|_| "GET_DESCRIPTOR(config, 9) stalled".to_string())?;
    let total = u16::from_le_bytes([head[2], head[3]]);
    let cfg = d
        .control_in(&mut ep0, setup(0x80, 6, 0x0200, 0, total))
        .map_err(|_| "GET_DESCRIPTOR(config) stalled".to_string())?;
    if cfg.len() != usize::from(total) {
        return Err(format!("configuration {} of {total} bytes", cfg.len()));
    }
    Ok(Enumerated { ep0, dev, cfg })
}

/// A stick driven through Bulk-Only Transport as Linux's usb-storage over
/// uhci_hcd: one TD per 64-byte packet, URBs added by memory.
struct Bot {
    ep0: Queue,
    bin: Queue,
    bout: Queue,
    ein: u8,
    eout: u8,
    ifno: u8,
    tag: u32,
    cbw: u32,
    csw: u32,
}

impl Bot {
    fn setup(d: &mut Driver, e: Enumerated, addr: u8) -> Result<Bot, String> {
        let descs = HostDescriptors::parse(&[e.dev.clone(), e.cfg.clone()].concat())
            .map_err(|x| format!("descriptors: {x}"))?;
        let all = descs.endpoints();
        let bin = all
            .iter()
            .find(|x| x.ep_type == 2 && x.address & 0x80 != 0)
            .ok_or("no bulk IN")?;
        let bout = all
            .iter()
            .find(|x| x.ep_type == 2 && x.address & 0x80 == 0)
            .ok_or("no bulk OUT")?;
        let mut ep0 = e.ep0;
        if d.control(&mut ep0, setup(0, 9, u16::from(e.cfg[5]), 0, 0), None)
            .1
        {
            return Err("SET_CONFIGURATION stalled".into());
        }
        let skel = d.skel_bulk;
        let bq_in = d.make_queue(
            skel,
            addr,
            bin.address & 0xf,
            u32::from(bin.max_packet & 0x7ff),
            false,
        );
        let bq_out = d.make_queue(
            skel,
            addr,
            bout.address & 0xf,
            u32::from(bout.max_packet & 0x7ff),
            false,
        );
        let cbw = d.alloc(64, 64);
        let csw = d.alloc(64, 64);
        let mut b = Bot {
            ep0,
            bin: bq_in,
            bout: bq_out,
            ein: bin.address,
            eout: bout.address,
            ifno: bin.interface,
            tag: 1,
            cbw,
            csw,
        };
        b.reset_recovery(d)?;
        Ok(b)
    }

    /// Bulk-Only Mass Storage Reset and CLEAR_FEATURE(ENDPOINT_HALT) on
    /// both bulk endpoints; the toggles start at DATA0 again.
    fn reset_recovery(&mut self, d: &mut Driver) -> Result<(), String> {
        if d.control(
            &mut self.ep0,
            setup(0x21, 0xff, 0, u16::from(self.ifno), 0),
            None,
        )
        .1
        {
            return Err("Bulk-Only Mass Storage Reset stalled".into());
        }
        for ep in [self.ein, self.eout] {
            if d.control(&mut self.ep0, setup(0x02, 1, 0, u16::from(ep), 0), None)
                .1
            {
                return Err(format!("CLEAR_FEATURE(ENDPOINT_HALT) {ep:#x} stalled"));
            }
        }
        self.bin.toggle = false;
        self.bout.toggle = false;
        Ok(())
    }

    fn command(
        &mut self,
        d: &mut Driver,
        cdb: &[u8],
        data: Option<(bool, u32, u32)>,
    ) -> Result<u8, String> {
        let len = data.map_or(0, |x| x.2);
        let mut c = [0u8; 31];
        c[0..4].copy_from_slice(b"USBC");
        c[4..8].copy_from_slice(&self.tag.to_le_bytes());
        c[8..12].copy_from_slice(&len.to_le_bytes());
        c[12] = if data.is_some_and(|x| x.0) { 0x80 } else { 0 };
        c[14] = cdb.len() as u8;
        c[15..15 + cdb.len()].copy_from_slice(cdb);
        d.ram.write(u64::from(self.cbw), &c).unwrap();
        let (r, _) = d.bulk(&mut self.bout, PID_OUT, self.cbw, 31);
        if r.stalled() {
            return Err(format!("CBW failed: {:x?}", r.status));
        }
        if let Some((din, buf, len)) = data {
            let (q, pid) = if din {
                (&mut self.bin, PID_IN)
            } else {
                (&mut self.bout, PID_OUT)
            };
            let (r, specs) = d.bulk(q, pid, buf, len);
            let moved = r.actual(&specs, pid);
            if r.stalled() || moved != len {
                return Err(format!(
                    "data phase: {moved} of {len} bytes, {:x?}",
                    &r.status[..r.status.len().min(4)]
                ));
            }
        }
        let (r, _) = d.bulk(&mut self.bin, PID_IN, self.csw, 13);
        if r.stalled() {
            return Err(format!("CSW failed: {:x?}", r.status));
        }
        let s = read_guest(d, self.csw, 13);
        if &s[0..4] != b"USBS" || s[4..8] != self.tag.to_le_bytes() {
            return Err(format!("bad CSW {s:02x?}"));
        }
        self.tag = self.tag.wrapping_add(1);
        Ok(s[12])
    }

    fn ready(&mut self, d: &mut Driver) -> Result<(), String> {
        let sense = d.alloc(32, 64);
        for _ in 0..8 {
            if self.command(d, &[0; 6], None)? == 0 {
                return Ok(());
            }
            self.command(d, &[3, 0, 0, 0, 18, 0], Some((true, sense, 18)))?;
        }
        Err("TEST UNIT READY never succeeded".into())
    }

    fn rw10(
        &mut self,
        d: &mut Driver,
        write: bool,
        lba: u32,
        buf: u32,
        len: u32,
    ) -> Result<(), String> {
        let mut cdb = [0u8; 10];
        cdb[0] = if write { 0x2a } else { 0x28 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&((len / BLOCK) as u16).to_be_bytes());
        match self.command(d, &cdb, Some((!write, buf, len)))? {
            0 => Ok(()),
            s => Err(format!("CSW status {s}")),
        }
    }

    /// WRITE(10)s of random data and READ(10)s back into unaligned
    /// buffers; returns everything written from `lba` on.
    fn round_trips(
        &mut self,
        d: &mut Driver,
        seed: u64,
        lba: u32,
        sizes: &[u32],
    ) -> Result<(Vec<u8>, String), String> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let (mut all, mut log, mut l) = (Vec::new(), Vec::new(), lba);
        for &len in sizes {
            let mut data = vec![0u8; len as usize];
            rng.fill_bytes(&mut data);
            let wbuf = BUF + 0x123 + rng.next_u32() % 4096;
            d.ram.write(u64::from(wbuf), &data).unwrap();
            self.rw10(d, true, l, wbuf, len)
                .map_err(|e| format!("WRITE {len} at {l}: {e}"))?;
            let rbuf = BUF + (8 << 20) + 0xffd + rng.next_u32() % 4096;
            d.ram
                .write(u64::from(rbuf), &vec![0xee; len as usize])
                .unwrap();
            self.rw10(d, false, l, rbuf, len)
                .map_err(|e| format!("READ {len} at {l}: {e}"))?;
            let back = read_guest(d, rbuf, len);
            if back != data {
                return Err(format!(
                    "{len} bytes at LBA {l}: read sha {} vs written {}",
                    sha(&back),
                    sha(&data)
                ));
            }
            log.push(format!("{len}:{}", sha(&data)));
            all.extend_from_slice(&data);
            l += len / BLOCK;
        }
        Ok((all, log.join(" ")))
    }
}

fn stick_up(
    r: &mut Results,
    d: &mut Driver,
    name: &str,
    port: usize,
    addr: u8,
) -> Result<Bot, String> {
    let e = enumerate(d, port, addr)?;
    let bcd = u16::from_le_bytes([e.dev[2], e.dev[3]]);
    let mps0 = e.dev[7];
    let mut bot = Bot::setup(d, e, addr)?;
    let lun = d.control_in(&mut bot.ep0, setup(0xa1, 0xfe, 0, u16::from(bot.ifno), 1));
    bot.ready(d)?;
    r.check(
        &format!("{name}_enumerated"),
        lun == Ok(vec![0]),
        format!("port {port} address {addr}, bcdUSB {bcd:#06x}, mps0 {mps0}, GET_MAX_LUN {lun:?}, TEST UNIT READY ok"),
    );
    Ok(bot)
}

/// The keyboard on port 2: boot protocol, its interrupt IN queue on the
/// 8-frame skeleton. A transfer parks in the backend until a key is
/// injected; another is parked and its QH unlinked (Linux: unlink, wait a
/// frame, free the TDs): the URB must be discarded before FRNUM moves and
/// nothing written into the freed TD; a new queue gets the next press.
fn kbd_checks(r: &mut Results, d: &mut Driver, mon: &HostMonitor) {
    let e = match enumerate(d, 2, KBD_ADDR) {
        Ok(e) => e,
        Err(x) => return r.check("kbd_enumerated", false, x),
    };
    let descs = HostDescriptors::parse(&[e.dev.clone(), e.cfg.clone()].concat()).unwrap();
    let Some(ep) = descs
        .endpoints()
        .into_iter()
        .find(|x| x.ep_type == 3 && x.address & 0x80 != 0)
    else {
        return r.check("kbd_enumerated", false, "no interrupt IN endpoint");
    };
    let mut ep0 = e.ep0;
    let c = d
        .control(&mut ep0, setup(0, 9, u16::from(e.cfg[5]), 0, 0), None)
        .1;
    let p = d.control(&mut ep0, setup(0x21, 0x0b, 0, 0, 0), None).1;
    let i = d.control(&mut ep0, setup(0x21, 0x0a, 0, 0, 0), None).1;
    let skel = d.skel_int8;
    let mps = u32::from(ep.max_packet);
    let mut q = d.make_queue(skel, KBD_ADDR, ep.address & 0xf, mps, false);
    r.check(
        "kbd_enumerated",
        !c && !p && !i,
        format!(
            "port 2 address {KBD_ADDR}, mps0 {}, ep {:#x} mps {mps} on the int8 skeleton, \
             SET_CONFIGURATION/SET_PROTOCOL/SET_IDLE stalled {c}/{p}/{i}",
            e.dev[7], ep.address
        ),
    );
    let buf = d.alloc(64, 64);
    let mut spec = TdSpec {
        pid: PID_IN,
        buf,
        len: mps,
        toggle: false,
        spd: true,
        ioc: true,
    };
    let a = d.append(&mut q, &[spec]);
    d.timeout = Duration::from_millis(500);
    let early = d.run_until(|d| d.rd(a[0] + 4) & TD_ACTIVE == 0);
    let parked = mon.urbs_in_flight();
    println!("PT-WAIT key");
    d.timeout = Duration::from_secs(60);
    let t0 = Instant::now();
    let got = d.run_until(|d| d.rd(a[0] + 4) & TD_ACTIVE == 0);
    let st = d.rd(a[0] + 4);
    let rep = read_guest(d, buf, 8);
    let usbint = d.r16(REG_USBSTS) & STS_USBINT != 0;
    r.check(
        "kbd_report_from_injected_key",
        !early && parked == 1 && got && st & TD_STALLED == 0 && rep[2] == 0x04 && usbint,
        format!(
            "parked (URBs {parked}), completed after {} ms: status {st:#x} report {rep:02x?}, USBINT {usbint}",
            t0.elapsed().as_millis()
        ),
    );
    d.w16(REG_USBSTS, STS_USBINT);
    spec.toggle = true;
    let a2 = d.append(&mut q, &[spec]);
    let got2 = d.run_until(|d| d.rd(a2[0] + 4) & TD_ACTIVE == 0);
    let rep2 = read_guest(d, buf, 8);
    spec.toggle = false;
    let a3 = d.append(&mut q, &[spec]);
    d.timeout = Duration::from_millis(300);
    d.run_until(|_| false);
    let parked3 = mon.urbs_in_flight();
    let f0 = d.r16(REG_FRNUM);
    d.unlink(&q);
    let released = mon.urbs_in_flight() == 0;
    // Linux frees the TD: poison it, let the controller run.
    d.wr(a3[0] + 4, 0x00ba_d000);
    d.run_until(|_| false);
    let untouched = d.rd(a3[0] + 4) == 0x00ba_d000;
    r.check(
        "kbd_release_report",
        got2 && rep2[2] == 0 && parked3 == 1,
        format!("release report {rep2:02x?}; the next transfer parked (URBs {parked3})"),
    );
    let mut q2 = d.make_queue(skel, KBD_ADDR, ep.address & 0xf, mps, false);
    let a4 = d.append(&mut q2, &[spec]);
    d.ram.write(u64::from(buf), &[0xaa; 8]).unwrap();
    println!("PT-WAIT key2");
    d.timeout = Duration::from_secs(60);
    let got4 = d.run_until(|d| d.rd(a4[0] + 4) & TD_ACTIVE == 0);
    let rep4 = read_guest(d, buf, 8);
    r.check(
        "kbd_unlink_cancels",
        released && untouched && got4 && (rep4[2] == 0x04 || rep4[2] == 0) && rep4[0] == 0,
        format!(
            "QH unlinked at frame {f0}, FRNUM moved: URB discarded {released}, freed TD untouched {untouched}; \
             a new queue's TD completed {got4} with report {rep4:02x?}"
        ),
    );
}

/// The full-speed stick unplugged from the outer QEMU: port 1 shows the
/// disconnect (CSC, PEC); re-plugged: a connection, reset, enumerated at
/// a new address, the data still there.
fn replug_checks(
    r: &mut Results,
    d: &mut Driver,
    old: &Bot,
    mon: &HostMonitor,
    want: &[u8],
) -> Option<Bot> {
    println!("PT-WAIT unplug");
    let t0 = Instant::now();
    d.timeout = Duration::from_secs(60);
    let gone = d.run_until(|d| d.portsc(1) & PORT_CCS == 0);
    let sc = d.portsc(1);
    for q in [&old.ep0, &old.bin, &old.bout] {
        d.unlink(q);
    }
    d.w16(REG_PORTSC, (sc & !PORT_RWC) | PORT_CSC | PORT_PEC);
    r.check(
        "fs_unplug_disconnects",
        gone && sc & (PORT_CSC | PORT_PEC | PORT_PE) == PORT_CSC | PORT_PEC && !mon.connected(),
        format!(
            "port 1 {sc:#06x} after {} ms, backend connected {}",
            t0.elapsed().as_millis(),
            mon.connected()
        ),
    );
    println!("PT-WAIT replug");
    d.timeout = Duration::from_secs(120);
    let back = d.run_until(|d| d.portsc(1) & PORT_CCS != 0);
    if !back {
        r.check(
            "fs_replug_reenumerated",
            false,
            format!("port 1 {:#06x}, stats {:?}", d.portsc(1), mon.stats()),
        );
        return None;
    }
    let res = stick_up(r, d, "fs_replugged", 1, FS_ADDR2).and_then(|mut b| {
        let n = want.len() as u32;
        let rbuf = BUF + (8 << 20);
        d.ram
            .write(u64::from(rbuf), &vec![0u8; n as usize])
            .unwrap();
        b.rw10(d, false, LBA, rbuf, n)?;
        Ok((b, read_guest(d, rbuf, n)))
    });
    let ok = matches!(&res, Ok((_, back)) if back == want);
    r.check(
        "fs_replug_reenumerated",
        ok && mon.stats().attaches == 2,
        format!(
            "{}, attaches {}, now {:?}",
            match &res {
                Ok((_, back)) => format!("read back sha {} vs {}", sha(back), sha(want)),
                Err(e) => e.clone(),
            },
            mon.stats().attaches,
            mon.device().map(|i| i.port)
        ),
    );
    res.ok().map(|(b, _)| b)
}

fn main() {
    init_tracing();
    print_host_devices();
    let mut r = Results { pass: 0, fail: 0 };
    let hs = by_serial(HS_SERIAL);
    let fs = by_serial(FS_SERIAL);
    let kbd = by_product("Keyboard");
    let speeds = (
        hs.as_ref().and_then(|i| i.speed),
        fs.as_ref().and_then(|i| i.speed),
        kbd.as_ref().and_then(|i| i.speed),
    );
    r.check(
        "host_speeds",
        speeds == (Some(Speed::High), Some(Speed::Full), Some(Speed::Full)),
        format!(
            "{HS_SERIAL} {:?}, {FS_SERIAL} {:?}, keyboard {:?}",
            speeds.0, speeds.1, speeds.2
        ),
    );
    let (Some(hs), Some(fs), Some(kbd)) = (hs, fs, kbd) else {
        println!("vmtest_uhci: {} passed, {} failed", r.pass, r.fail + 1);
        return;
    };
    let mut d = Driver::new();
    d.timeout = Duration::from_secs(20);
    // A high-speed device is refused with a clear error (and given back).
    match host(id_rule(&hs, HS_SERIAL)) {
        Ok((dev, _)) => {
            let e = d.pci.controller_mut().attach(Box::new(dev));
            let ok = matches!(&e, Err(AttachError::TooFast(Speed::High)));
            r.check(
                "high_speed_refused",
                ok,
                format!("{:?}", e.map_err(|e| e.to_string())),
            );
        }
        Err(e) => r.check("high_speed_refused", false, e),
    }
    let hs_driver_back = wait_until(Duration::from_secs(10), || {
        iface_driver(&hs.port, 0).as_deref() == Some("usb-storage")
    });
    r.check(
        "high_speed_given_back",
        hs_driver_back,
        format!("{:?}", iface_driver(&hs.port, 0)),
    );
    let devs = (|| -> Result<_, String> {
        Ok((
            host(id_rule(&fs, FS_SERIAL))?,
            host(MatchRule::Port(kbd.port.clone()))?,
        ))
    })();
    let ((fs_dev, fs_mon), (kbd_dev, kbd_mon)) = match devs {
        Ok(v) => v,
        Err(e) => {
            r.check("claimed_from_host_drivers", false, e);
            println!("vmtest_uhci: {} passed, {} failed", r.pass, r.fail);
            return;
        }
    };
    let at = {
        let u = d.pci.controller_mut();
        (u.attach(Box::new(fs_dev)), u.attach(Box::new(kbd_dev)))
    };
    let ok = matches!(at, (Ok(1), Ok(2)));
    r.check(
        "claimed_and_attached",
        ok && iface_driver(&fs.port, 0).as_deref() == Some("usbfs")
            && fs_mon.connected()
            && kbd_mon.connected(),
        format!(
            "stick {:?}, keyboard {:?} (ports); stick's driver {:?}",
            at.0,
            at.1,
            iface_driver(&fs.port, 0)
        ),
    );
    if !ok {
        println!("vmtest_uhci: {} passed, {} failed", r.pass, r.fail);
        return;
    }
    d.start();
    let mut fs_data = Vec::new();
    let mut bot = None;
    r.section("fs_stick", |r| {
        let b = stick_up(r, &mut d, "fs_stick", 1, FS_ADDR);
        let mut b = match b {
            Ok(b) => b,
            Err(e) => return r.check("fs_stick_enumerated", false, e),
        };
        let t0 = Instant::now();
        match b.round_trips(&mut d, 0x47, LBA, &FS_SIZES) {
            Ok((data, log)) => {
                r.check(
                    "fs_stick_round_trips",
                    true,
                    format!(
                        "written and read back (size:sha) {log} in {} ms",
                        t0.elapsed().as_millis()
                    ),
                );
                fs_data = data;
                bot = Some(b);
            }
            Err(e) => r.check("fs_stick_round_trips", false, e),
        }
    });
    r.section("kbd", |r| kbd_checks(r, &mut d, &kbd_mon));
    if let Some(b) = bot.as_ref() {
        let want = fs_data.clone();
        let mon = fs_mon.clone();
        r.section("fs_replug", |r| {
            replug_checks(r, &mut d, b, &mon, &want);
        });
    }
    println!(
        "METRIC uhci_stats {:?} transfers in flight {}",
        d.pci.controller().stats(),
        d.pci.controller().transfers_in_flight()
    );
    drop(d);
    if !fs_data.is_empty() {
        host_reads(
            &mut r,
            "fs_host_reads_guest_data",
            FS_SERIAL,
            LBA,
            fs_data.len(),
            &sha(&fs_data),
        );
    }
    println!("vmtest_uhci: {} passed, {} failed", r.pass, r.fail);
}
