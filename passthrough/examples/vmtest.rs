//! Passthrough checks against real usbfs, run inside a Linux VM whose
//! QEMU-emulated USB devices (usb-storage, usb-kbd, usb-audio) are real
//! devices to its kernel (`tests/passthrough/run.sh` boots it). Our xHCI,
//! driven in-process by the Linux-like guest driver of the hcd-emul tests,
//! passes transfers through usbfs to those devices.
//!
//! `vmtest check`: functional checks, one `RESULT name PASS|FAIL detail`
//! line each. `PT-WAIT what` lines ask the script outside the VM to act
//! (inject a key, unplug or re-plug the stick through QMP).
//! `vmtest bench [MiB]`: bulk read MiB/s through our controller versus a
//! direct usbfs read of the same stick, and their ratio.

#[path = "../../hcd-emul/tests/common/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod common;

use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Driver, DATA_BASE};
use hcd_emul::usb::{
    CompletionQueue, Direction, IsoPacket, Segment, SetupPacket, Transfer, TransferId,
    TransferKind, TransferStatus, UsbDevice,
};
use hcd_emul::xhci::context::ep_type;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::trb::{cc, ctl, ty, Trb};
use hcd_emul::GuestRam;
use passthrough::descriptors::HostDescriptors;
use passthrough::usbfs::{self, urb_type, UrbBlock, Usbfs};
use passthrough::{HostDevice, HostDeviceInfo, HostMonitor, HostOptions, MatchRule};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const SYSFS: &str = "/sys/bus/usb/devices";
const BLOCK: u32 = 512;

struct Results {
    pass: u32,
    fail: u32,
}

impl Results {
    fn check(&mut self, name: &str, ok: bool, detail: impl Display) {
        println!(
            "RESULT {name} {} {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        if ok {
            self.pass += 1;
        } else {
            self.fail += 1;
        }
    }

    /// Runs a section; a panic inside (a harness assertion) is a FAIL.
    fn section(&mut self, name: &str, f: impl FnOnce(&mut Results)) {
        let t = Instant::now();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(self)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            self.check(name, false, format!("panicked: {msg}"));
        }
        println!("METRIC section_{name}_ms {}", t.elapsed().as_millis());
    }
}

fn sha(b: &[u8]) -> String {
    let h = Sha256::digest(b);
    h.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

fn product_of(port: &str) -> String {
    std::fs::read_to_string(Path::new(SYSFS).join(port).join("product"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn find(product: &str) -> Option<HostDeviceInfo> {
    passthrough::rule::scan(Path::new(SYSFS))
        .into_iter()
        .find(|d| product_of(&d.port).contains(product))
}

fn iface_driver(port: &str, ifno: u8) -> Option<String> {
    let l = std::fs::read_link(Path::new(SYSFS).join(format!("{port}:1.{ifno}/driver"))).ok()?;
    Some(l.file_name()?.to_string_lossy().into_owned())
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn host(rule: MatchRule, speed: Option<hcd_emul::usb::Speed>) -> (HostDevice, HostMonitor) {
    let opts = HostOptions {
        speed,
        ..Default::default()
    };
    let d = HostDevice::new(rule, opts).expect("host device");
    let m = d.monitor();
    (d, m)
}

fn plug(dev: HostDevice) -> (Driver, usize) {
    let mut d = Driver::new();
    d.timeout = Duration::from_secs(20);
    let port = d
        .pci
        .controller_mut()
        .attach(Box::new(dev))
        .expect("attach");
    d.start();
    (d, port)
}

/// Enable Slot + Address Device + descriptors: (slot, device, config).
fn enumerate(d: &mut Driver, port: usize) -> (usize, Vec<u8>, Vec<u8>) {
    let slot = d.address(port);
    let dev = d.get_descriptor(slot, 1, 0, 18);
    let head = d.get_descriptor(slot, 2, 0, 9);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let cfg = d.get_descriptor(slot, 2, 0, total);
    (slot, dev, cfg)
}

fn parse(dev: &[u8], cfg: &[u8]) -> HostDescriptors {
    HostDescriptors::parse(&[dev, cfg].concat()).expect("descriptors parse")
}

fn dci_of(addr: u8) -> usize {
    2 * (addr & 0xf) as usize + usize::from(addr & 0x80 != 0)
}

fn clear_psc(d: &mut Driver) {
    d.poll_events();
    d.pending.retain(|t| t.trb_type() != ty::PORT_STATUS_CHANGE);
}

/// Waits until the port's connect status is `connected`.
fn wait_port(d: &mut Driver, port: usize, connected: bool, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        d.poll_events();
        d.pending.retain(|t| t.trb_type() != ty::PORT_STATUS_CHANGE);
        if (d.portsc(port) & PORTSC_CCS != 0) == connected {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A USB mass-storage device driven through Bulk-Only Transport.
struct Bot {
    slot: usize,
    in_dci: usize,
    out_dci: usize,
    tag: u32,
    cbw: u64,
    csw: u64,
}

impl Bot {
    /// SET_CONFIGURATION + Configure Endpoint for the stick's bulk pair.
    fn setup(d: &mut Driver, slot: usize, dev: &[u8], cfg: &[u8]) -> Bot {
        let descs = parse(dev, cfg);
        let eps = descs.endpoints();
        let bin = eps.iter().find(|e| e.ep_type == 2 && e.address & 0x80 != 0);
        let bout = eps.iter().find(|e| e.ep_type == 2 && e.address & 0x80 == 0);
        let (bin, bout) = (bin.expect("bulk IN"), bout.expect("bulk OUT"));
        assert_eq!(
            d.control_out(slot, [0, 9, cfg[5], 0, 0, 0, 0, 0], &[]),
            cc::SUCCESS,
            "SET_CONFIGURATION"
        );
        let (in_dci, out_dci) = (dci_of(bin.address), dci_of(bout.address));
        let code = d.configure(
            slot,
            &[
                (
                    in_dci,
                    ep_type::BULK_IN,
                    u32::from(bin.max_packet & 0x7ff),
                    0,
                ),
                (
                    out_dci,
                    ep_type::BULK_OUT,
                    u32::from(bout.max_packet & 0x7ff),
                    0,
                ),
            ],
        );
        assert_eq!(code, cc::SUCCESS, "configure endpoint");
        // Reset recovery (BOT 5.3.4): the host driver we took the stick
        // from may have left it inside a command.
        let ifno = u16::from(descs.endpoints()[0].interface).to_le_bytes();
        let rc = d.control_out(slot, [0x21, 0xff, 0, 0, ifno[0], ifno[1], 0, 0], &[]);
        assert_eq!(rc, cc::SUCCESS, "Bulk-Only Mass Storage Reset");
        for ep in [bin.address, bout.address] {
            let c = d.control_out(slot, [0x02, 1, 0, 0, ep, 0, 0, 0], &[]);
            assert_eq!(c, cc::SUCCESS, "CLEAR_FEATURE(ENDPOINT_HALT) {ep:#x}");
        }
        let cbw = d.alloc(64, 64);
        let csw = d.alloc(64, 64);
        Bot {
            slot,
            in_dci,
            out_dci,
            tag: 1,
            cbw,
            csw,
        }
    }

    fn send_cbw(
        &mut self,
        d: &mut Driver,
        len: u32,
        dir_in: bool,
        cdb: &[u8],
    ) -> Result<(), String> {
        let mut c = [0u8; 31];
        c[0..4].copy_from_slice(b"USBC");
        c[4..8].copy_from_slice(&self.tag.to_le_bytes());
        c[8..12].copy_from_slice(&len.to_le_bytes());
        c[12] = if dir_in { 0x80 } else { 0 };
        c[14] = cdb.len() as u8;
        c[15..15 + cdb.len()].copy_from_slice(cdb);
        d.ram.write(self.cbw, &c).unwrap();
        let (code, _) = d.bulk(self.slot, self.out_dci, &[(self.cbw, 31)]);
        if code != cc::SUCCESS {
            return Err(format!("CBW completion code {code}"));
        }
        Ok(())
    }

    fn recv_csw(&mut self, d: &mut Driver) -> Result<u8, String> {
        let (code, n) = d.bulk(self.slot, self.in_dci, &[(self.csw, 13)]);
        if code != cc::SUCCESS || n != 13 {
            return Err(format!("CSW completion code {code}, {n} bytes"));
        }
        let mut s = [0u8; 13];
        d.ram.read(self.csw, &mut s).unwrap();
        if &s[0..4] != b"USBS" || s[4..8] != self.tag.to_le_bytes() {
            return Err(format!("bad CSW {s:02x?}"));
        }
        self.tag = self.tag.wrapping_add(1);
        Ok(s[12])
    }

    /// One SCSI command with a data phase in one TD over `bufs`.
    fn command(
        &mut self,
        d: &mut Driver,
        cdb: &[u8],
        dir_in: bool,
        bufs: &[(u64, u32)],
    ) -> Result<u8, String> {
        let len: u32 = bufs.iter().map(|b| b.1).sum();
        self.send_cbw(d, len, dir_in, cdb)?;
        if len > 0 {
            let dci = if dir_in { self.in_dci } else { self.out_dci };
            let (code, n) = d.bulk(self.slot, dci, bufs);
            if code != cc::SUCCESS || n != len {
                return Err(format!("data phase code {code}, {n} of {len} bytes"));
            }
        }
        self.recv_csw(d)
    }

    fn ready(&mut self, d: &mut Driver) -> Result<(), String> {
        let sense = d.alloc(32, 64);
        for _ in 0..8 {
            if self.command(d, &[0; 6], false, &[])? == 0 {
                return Ok(());
            }
            self.command(d, &[3, 0, 0, 0, 18, 0], true, &[(sense, 18)])?;
        }
        Err("TEST UNIT READY never succeeded".into())
    }

    fn rw10(
        &mut self,
        d: &mut Driver,
        write: bool,
        lba: u32,
        bufs: &[(u64, u32)],
    ) -> Result<(), String> {
        let len: u32 = bufs.iter().map(|b| b.1).sum();
        let blocks = (len / BLOCK) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = if write { 0x2a } else { 0x28 };
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        match self.command(d, &cdb, !write, bufs)? {
            0 => Ok(()),
            s => Err(format!("CSW status {s}")),
        }
    }

    /// READ(10) whose data phase is `tds.len()` TDs queued at once (all in
    /// flight on the bulk IN endpoint together with the CSW's TD).
    fn read_pipelined(
        &mut self,
        d: &mut Driver,
        lba: u32,
        tds: &[(u64, u32)],
    ) -> Result<(), String> {
        let len: u32 = tds.iter().map(|b| b.1).sum();
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&((len / BLOCK) as u16).to_be_bytes());
        self.send_cbw(d, len, true, &cdb)?;
        // Every TRB of each TD: an error event points at the TRB where the
        // TD stopped, not necessarily its last.
        let mut tds_trbs = Vec::new();
        for &td in tds {
            let trbs = Driver::normal_trbs(&[td], true);
            tds_trbs.push(d.queue(self.slot, self.in_dci, &trbs));
        }
        // The CSW's TD goes on only after the data (as Linux's usb-storage
        // does): QEMU's stick can lose a status packet queued during the
        // data phase (seen about once in eight runs).
        let (slot, dci) = (self.slot, self.in_dci);
        let n_data = tds_trbs.len();
        for i in 0..=n_data {
            if i == n_data {
                let csw_trbs = Driver::normal_trbs(&[(self.csw, 13)], true);
                tds_trbs.push(d.queue(self.slot, self.in_dci, &csw_trbs));
            }
            let a = &tds_trbs[i];
            let what = if i == n_data {
                "CSW TD".to_string()
            } else {
                format!("TD {i}")
            };
            let ev = d.wait_event(|t| {
                t.trb_type() == ty::TRANSFER_EVENT
                    && (t.control >> 24) as usize == slot
                    && ((t.control >> 16) & 0x1f) as usize == dci
                    && a.contains(&t.parameter)
            });
            match ev {
                Some(t) if t.status >> 24 == cc::SUCCESS => {}
                Some(t) => return Err(format!("{what}: completion code {}", t.status >> 24)),
                None => {
                    return Err(format!(
                        "{what}: no event; controller holds {} transfers",
                        d.pci.controller().transfers_in_flight()
                    ))
                }
            }
        }
        let mut s = [0u8; 13];
        d.ram.read(self.csw, &mut s).unwrap();
        if &s[0..4] != b"USBS" || s[12] != 0 {
            return Err(format!("bad CSW {s:02x?}"));
        }
        self.tag = self.tag.wrapping_add(1);
        Ok(())
    }
}

fn read_guest(d: &Driver, bufs: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(a, l) in bufs {
        let mut v = vec![0u8; l as usize];
        d.ram.read(a, &mut v).unwrap();
        out.extend_from_slice(&v);
    }
    out
}

/// 4 KiB pages of a region in shuffled order: a page-cache-like scatter
/// list that is not contiguous in guest memory (the bounce-buffer path).
fn scattered(base: u64, len: u32, seed: u64) -> Vec<(u64, u32)> {
    let mut pages: Vec<u64> = (0..u64::from(len / 4096))
        .map(|i| base + i * 4096)
        .collect();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for i in (1..pages.len()).rev() {
        let j = (rng.next_u32() as usize) % (i + 1);
        pages.swap(i, j);
    }
    pages.into_iter().map(|a| (a, 4096)).collect()
}

/// What `xen-usb-dm list` shows (passthrough::list), on this kernel's real
/// sysfs and usbfs: the stick with its serial, strings, usb-storage bound
/// to its interface and its usbfs node openable; the keyboard's HID
/// interface (no usbhid in this VM: driver none);
/// a serial rule matching exactly the stick.
fn listing_checks(r: &mut Results) {
    let devfs = Path::new("/dev/bus/usb");
    let all = passthrough::list::list(Path::new(SYSFS));
    let stick = all
        .iter()
        .find(|d| d.info.serial.as_deref() == Some(STICK_SERIAL));
    let Some(stick) = stick else {
        return r.check(
            "list_stick",
            false,
            format!("serial {STICK_SERIAL} not among {} devices", all.len()),
        );
    };
    let drivers: Vec<Option<&str>> = stick
        .interfaces
        .iter()
        .map(|i| i.driver.as_deref())
        .collect();
    r.check(
        "list_stick",
        stick.interfaces.first().map(|i| i.class) == Some((8, 6, 0x50))
            && drivers == [Some("usb-storage")]
            && stick.product_name.as_deref().is_some_and(|p| !p.is_empty())
            && stick.usb_version.is_some(),
        format!(
            "{} {:04x}:{:04x} {:?} {:?} interfaces {:?}",
            stick.info.port,
            stick.info.vendor,
            stick.info.product,
            stick.manufacturer,
            stick.product_name,
            stick.interfaces
        ),
    );
    let open = passthrough::list::openable(devfs, &stick.info);
    r.check(
        "list_usbfs_openable",
        open.is_ok(),
        format!(
            "{} {open:?}",
            passthrough::list::usbfs_path(devfs, &stick.info).display()
        ),
    );
    let kbd = all.iter().find(|d| {
        d.product_name
            .as_deref()
            .is_some_and(|p| p.contains("Keyboard"))
    });
    r.check(
        "list_keyboard_hid",
        kbd.is_some_and(|k| k.interfaces.iter().any(|i| i.class.0 == 3)),
        format!("{:?}", kbd.map(|k| &k.interfaces)),
    );
    let rule = passthrough::MatchRule::Id {
        vendor: stick.info.vendor,
        product: stick.info.product,
        serial: Some(STICK_SERIAL.into()),
    };
    let n = all.iter().filter(|d| rule.matches(&d.info)).count();
    r.check(
        "list_rule_matches_one",
        n == 1,
        format!("{rule}: {n} devices"),
    );
}

const STICK_SERIAL: &str = "PT0001";
/// Where the checks write (LBA), and how much.
const LBA: u32 = 2048;
const BIG: u32 = 2 << 20;

/// The stick through our controller on a USB 3 port: enumeration, BOT,
/// 2 MiB writes and reads (contiguous = zero-copy, scattered = bounce)
/// verified by checksum, four 1 MiB TDs in flight at once, a cancelled
/// transfer, a guest port reset that resets the host device; then the host
/// driver gets the stick back and reads what the guest wrote.
fn stick_checks(r: &mut Results, written: &mut Option<String>) {
    let Some(info) = find("HARDDRIVE").or_else(|| find("Storage")) else {
        return r.check("stick_present", false, "no QEMU usb-storage in sysfs");
    };
    let before = iface_driver(&info.port, 0);
    r.check(
        "host_driver_before",
        before.as_deref() == Some("usb-storage"),
        format!("{:?} on {}", before, info.port),
    );
    let rule = MatchRule::Id {
        vendor: info.vendor,
        product: info.product,
        serial: Some(STICK_SERIAL.into()),
    };
    let (dev, mon) = host(rule, None);
    r.check(
        "claimed_from_host_driver",
        mon.connected() && iface_driver(&info.port, 0).as_deref() == Some("usbfs"),
        format!("driver now {:?}", iface_driver(&info.port, 0)),
    );
    let (mut d, port) = plug(dev);
    r.check(
        "superspeed_port",
        port > USB2_PORTS,
        format!("root port {port}"),
    );
    let (slot, dev, cfg) = enumerate(&mut d, port);
    let bcd = u16::from_le_bytes([dev[2], dev[3]]);
    r.check(
        "enumerate_superspeed",
        bcd >= 0x0300 && dev[7] == 9 && u16::from_le_bytes([dev[8], dev[9]]) == info.vendor,
        format!("bcdUSB {bcd:#06x} mps0 {} id {:02x?}", dev[7], &dev[8..12]),
    );
    let mut bot = Bot::setup(&mut d, slot, &dev, &cfg);
    let lun = d.control_in(slot, [0xa1, 0xfe, 0, 0, 0, 0, 1, 0]);
    r.check(
        "class_request_forwarded",
        lun == Ok(vec![0]),
        format!("GET_MAX_LUN {lun:?}"),
    );
    if let Err(e) = bot.ready(&mut d) {
        return r.check("bot_ready", false, e);
    }
    // 2 MiB of random data, one contiguous buffer: one TD, zero-copy,
    // split into two URBs (MAX_URB_LEN is 1 MiB).
    let mut data = vec![0u8; BIG as usize];
    rand::rngs::SmallRng::seed_from_u64(7).fill_bytes(&mut data);
    let src = DATA_BASE;
    d.ram.write(src, &data).unwrap();
    let zc0 = mon.stats().zero_copy_urbs;
    let w = bot.rw10(&mut d, true, LBA, &[(src, BIG)]);
    let dst = DATA_BASE + (4 << 20);
    d.ram.write(dst, &vec![0u8; BIG as usize]).unwrap();
    let rd = bot.rw10(&mut d, false, LBA, &[(dst, BIG)]);
    let back = read_guest(&d, &[(dst, BIG)]);
    let zc = mon.stats().zero_copy_urbs - zc0;
    r.check(
        "bulk_2mib_contiguous_zero_copy",
        w.is_ok() && rd.is_ok() && back == data && zc >= 4,
        format!(
            "write {w:?} read {rd:?} sha {} vs {} zero-copy URBs {zc}",
            sha(&back),
            sha(&data)
        ),
    );
    // Scattered 4 KiB pages: bounce buffers, same data.
    let sc_out = scattered(DATA_BASE + (8 << 20), BIG, 1);
    let mut data2 = vec![0u8; BIG as usize];
    rand::rngs::SmallRng::seed_from_u64(8).fill_bytes(&mut data2);
    let mut off = 0usize;
    for &(a, l) in &sc_out {
        d.ram.write(a, &data2[off..off + l as usize]).unwrap();
        off += l as usize;
    }
    let lba2 = LBA + BIG / BLOCK;
    let w = bot.rw10(&mut d, true, lba2, &sc_out);
    let sc_in = scattered(DATA_BASE + (12 << 20), BIG, 2);
    let rd = bot.rw10(&mut d, false, lba2, &sc_in);
    let back2 = read_guest(&d, &sc_in);
    r.check(
        "bulk_2mib_scattered_bounce",
        w.is_ok() && rd.is_ok() && back2 == data2,
        format!(
            "write {w:?} read {rd:?} sha {} vs {}",
            sha(&back2),
            sha(&data2)
        ),
    );
    // Four 1 MiB TDs + the CSW TD in flight on bulk IN at once.
    let tds: Vec<(u64, u32)> = (0..4)
        .map(|i| (DATA_BASE + (16 << 20) + i * (1 << 20), 1 << 20))
        .collect();
    let rp = bot.read_pipelined(&mut d, LBA, &tds).map_err(|e| {
        format!(
            "{e}; backend: {} URBs, {} transfers, {:?}",
            mon.urbs_in_flight(),
            mon.transfers_held(),
            mon.stats()
        )
    });
    let back3 = read_guest(&d, &tds);
    let want: Vec<u8> = [data.clone(), data2.clone()].concat();
    r.check(
        "bulk_in_flight_in_order",
        rp.is_ok() && back3 == want,
        format!("{rp:?} sha {} vs {}", sha(&back3), sha(&want)),
    );
    *written = Some(sha(&want));
    // An IN TD without a command: QEMU's stick answers STALL. Recovery as
    // Linux does it: Reset Endpoint, Set TR Dequeue Pointer past the TD,
    // CLEAR_FEATURE(ENDPOINT_HALT) (through the host kernel).
    let pend = d.alloc(512, 64);
    let a = d.queue(slot, bot.in_dci, &Driver::normal_trbs(&[(pend, 512)], true));
    let c = d.wait_transfer(slot, bot.in_dci, a[0]);
    let (rc, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: (ty::RESET_ENDPOINT << 10) | ((slot as u32) << 24) | ((bot.in_dci as u32) << 16),
    });
    let ring = d.slots[&slot].rings[&bot.in_dci].clone();
    let (dq, _) = d.command(Trb {
        parameter: ring.addr() | u64::from(ring.cycle),
        status: 0,
        control: (ty::SET_TR_DEQUEUE << 10) | ((slot as u32) << 24) | ((bot.in_dci as u32) << 16),
    });
    let in_ep = (bot.in_dci / 2) as u8 | 0x80;
    let ch = d.control_out(slot, [0x02, 1, 0, 0, in_ep, 0, 0, 0], &[]);
    let after = bot.ready(&mut d);
    r.check(
        "stall_then_clear_halt",
        c.code == cc::STALL
            && rc == cc::SUCCESS
            && dq == cc::SUCCESS
            && ch == cc::SUCCESS
            && after.is_ok(),
        format!(
            "event {}, reset ep {rc}, set deq {dq}, clear halt {ch}, then {after:?}",
            c.code
        ),
    );
    // Guest port reset after use: the host device is reset too.
    let resets = mon.stats().resets;
    let (code, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: (ty::DISABLE_SLOT << 10) | ((slot as u32) << 24),
    });
    let (slot2, dev2, cfg2) = enumerate(&mut d, port);
    let mut bot2 = Bot::setup(&mut d, slot2, &dev2, &cfg2);
    let ok = bot2.ready(&mut d).and_then(|_| {
        let buf = DATA_BASE + (20 << 20);
        bot2.rw10(&mut d, false, LBA, &[(buf, 1 << 20)])?;
        Ok(read_guest(&d, &[(buf, 1 << 20)]) == data[..1 << 20])
    });
    r.check(
        "port_reset_resets_host_device",
        code == cc::SUCCESS && mon.stats().resets == resets + 1 && ok == Ok(true),
        format!(
            "host resets {} -> {}, data after {ok:?}",
            resets,
            mon.stats().resets
        ),
    );
    // Release: the host's usb-storage driver binds again and reads what
    // the guest wrote (both directions verified outside our controller).
    drop(d);
    let back_drv = wait_until(Duration::from_secs(10), || {
        iface_driver(&info.port, 0).as_deref() == Some("usb-storage")
    });
    r.check(
        "host_driver_given_back",
        back_drv && !mon.connected(),
        format!("{:?}", iface_driver(&info.port, 0)),
    );
    // The node can appear before the re-probed disk reads: retry. (The
    // UAS disk is a block device too: find the stick's by its port.)
    let mut host_view = None;
    let mut node = String::from("none");
    wait_until(Duration::from_secs(20), || {
        let Some(b) = block_of(&info.port) else {
            return false;
        };
        node = format!("/dev/{b}");
        host_view = read_block_dev(&node, u64::from(LBA) * 512, 2 * BIG as usize);
        host_view.as_deref().map(sha).as_ref() == written.as_ref()
    });
    r.check(
        "host_reads_guest_data",
        host_view.as_deref().map(sha).as_ref() == written.as_ref(),
        format!(
            "{node} {:?} vs {:?}",
            host_view.as_deref().map(sha),
            written
        ),
    );
}

fn read_block_dev(path: &str, off: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut v = vec![0u8; len];
    // The page cache may hold stale data from before: drop it first.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    f.read_exact_at(&mut v, off).ok()?;
    Some(v)
}

/// The SuperSpeed stick on a USB 2 port, shown as high speed.
fn compat_checks(r: &mut Results) {
    let Some(info) = find("HARDDRIVE").or_else(|| find("Storage")) else {
        return r.check("compat_stick_present", false, "no stick");
    };
    let (dev, _mon) = host(
        MatchRule::Port(info.port.clone()),
        Some(hcd_emul::usb::Speed::High),
    );
    let (mut d, port) = plug(dev);
    let speed = (d.portsc(port) >> PORTSC_SPEED_SHIFT) & 0xf;
    let (slot, devd, cfg) = enumerate(&mut d, port);
    let descs = parse(&devd, &cfg);
    let eps = descs.endpoints();
    let no_companions = {
        let mut i = 0;
        let mut ok = true;
        while i + 2 <= cfg.len() && cfg[i] >= 2 {
            ok &= cfg[i + 1] != 0x30;
            i += cfg[i] as usize;
        }
        ok
    };
    r.check(
        "superspeed_shown_as_high_speed",
        port <= USB2_PORTS
            && speed == speed_id::HIGH
            && devd[2..4] == [0x00, 0x02]
            && devd[7] == 64
            && eps.iter().all(|e| e.max_packet == 512)
            && no_companions,
        format!(
            "port {port} speed {speed} bcdUSB {:02x?} mps0 {} eps {:?}",
            &devd[2..4],
            devd[7],
            eps.iter().map(|e| e.max_packet).collect::<Vec<_>>()
        ),
    );
    let mut bot = Bot::setup(&mut d, slot, &devd, &cfg);
    let buf = DATA_BASE;
    let ok = bot
        .ready(&mut d)
        .and_then(|_| bot.rw10(&mut d, false, LBA, &[(buf, 1 << 20)]));
    let mut want = vec![0u8; BIG as usize];
    rand::rngs::SmallRng::seed_from_u64(7).fill_bytes(&mut want);
    let got = read_guest(&d, &[(buf, 1 << 20)]);
    r.check(
        "high_speed_compat_bulk_read",
        ok.is_ok() && got == want[..1 << 20],
        format!("{ok:?} sha {} vs {}", sha(&got), sha(&want[..1 << 20])),
    );
}

/// usb-kbd through a port rule: interrupt IN reports when a key is
/// injected into the outer QEMU; an interrupt TD cancelled by Stop
/// Endpoint.
fn hid_checks(r: &mut Results) {
    let Some(info) = find("Keyboard") else {
        return r.check("kbd_present", false, "no usb-kbd");
    };
    let (dev, mon) = host(MatchRule::Port(info.port.clone()), None);
    let (mut d, port) = plug(dev);
    let (slot, devd, cfg) = enumerate(&mut d, port);
    let descs = parse(&devd, &cfg);
    let Some(ep) = descs
        .endpoints()
        .into_iter()
        .find(|e| e.ep_type == 3 && e.address & 0x80 != 0)
    else {
        return r.check("kbd_interrupt_ep", false, "none");
    };
    assert_eq!(
        d.control_out(slot, [0, 9, cfg[5], 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS
    );
    // HID SET_PROTOCOL(boot), SET_IDLE(0): class requests, forwarded.
    let p = d.control_out(slot, [0x21, 0x0b, 0, 0, 0, 0, 0, 0], &[]);
    let i = d.control_out(slot, [0x21, 0x0a, 0, 0, 0, 0, 0, 0], &[]);
    let dci = dci_of(ep.address);
    let code = d.configure(
        slot,
        &[(dci, ep_type::INTERRUPT_IN, u32::from(ep.max_packet), 0)],
    );
    r.check(
        "hid_enumerated",
        p == cc::SUCCESS && i == cc::SUCCESS && code == cc::SUCCESS,
        format!("port {port} SET_PROTOCOL {p} SET_IDLE {i} configure {code}"),
    );
    let buf = d.alloc(64, 64);
    let mps = u32::from(ep.max_packet);
    let a = d.queue(slot, dci, &Driver::normal_trbs(&[(buf, mps)], true));
    println!("PT-WAIT key");
    d.timeout = Duration::from_secs(60);
    let c = d.wait_transfer(slot, dci, a[0]);
    let mut rep = [0u8; 8];
    d.ram.read(buf, &mut rep).unwrap();
    r.check(
        "hid_report_from_injected_key",
        matches!(c.code, cc::SUCCESS | cc::SHORT_PACKET) && rep[2] == 0x04,
        format!("code {} report {rep:02x?}", c.code),
    );
    // The release report, then one that never comes: cancelled.
    let a2 = d.queue(slot, dci, &Driver::normal_trbs(&[(buf, mps)], true));
    let c2 = d.wait_transfer(slot, dci, a2[0]);
    d.ram.read(buf, &mut rep).unwrap();
    let a3 = d.queue(slot, dci, &Driver::normal_trbs(&[(buf, mps)], true));
    std::thread::sleep(Duration::from_millis(200));
    let pending = mon.urbs_in_flight();
    let (code, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: (ty::STOP_ENDPOINT << 10) | ((slot as u32) << 24) | ((dci as u32) << 16),
    });
    let c3 = d.wait_transfer(slot, dci, a3[0]);
    let released = wait_until(Duration::from_secs(2), || mon.urbs_in_flight() == 0);
    r.check(
        "hid_release_then_cancel",
        rep[2] == 0
            && c2.code != cc::STOPPED
            && pending == 1
            && code == cc::SUCCESS
            && c3.code == cc::STOPPED
            && released,
        format!(
            "release {rep:02x?}, pending URBs {pending}, stop {code}, event {}",
            c3.code
        ),
    );
}

/// usb-audio through a bus+addr rule: an isochronous OUT stream through
/// our controller, then multi-packet isochronous URBs straight through the
/// backend with per-packet status.
fn iso_checks(r: &mut Results) {
    let Some(info) = find("Audio") else {
        return r.check("audio_present", false, "no usb-audio");
    };
    let rule = MatchRule::BusAddr {
        bus: info.bus,
        addr: info.addr,
    };
    let (dev, mon) = host(rule.clone(), None);
    let (mut d, port) = plug(dev);
    let (slot, devd, cfg) = enumerate(&mut d, port);
    let descs = parse(&devd, &cfg);
    let Some(ep) = descs
        .endpoints()
        .into_iter()
        .find(|e| e.ep_type == 1 && e.address & 0x80 == 0)
    else {
        return r.check("audio_iso_ep", false, format!("{:?}", descs.endpoints()));
    };
    assert_eq!(
        d.control_out(slot, [0, 9, cfg[5], 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS
    );
    let si = d.control_out(slot, [0x01, 11, ep.alt, 0, ep.interface, 0, 0, 0], &[]);
    let dci = dci_of(ep.address);
    let mps = u32::from(ep.max_packet & 0x7ff);
    let code = d.configure(slot, &[(dci, ep_type::ISOCH_OUT, mps, 0)]);
    let pkt = mps.min(192);
    // 200 one-packet TDs (1 ms each at full speed) behind one doorbell.
    let n = 200u64;
    let buf = DATA_BASE;
    let tone: Vec<u8> = (0..pkt * n as u32).map(|i| (i * 7) as u8).collect();
    d.ram.write(buf, &tone).unwrap();
    let ram = d.ram.clone();
    let mut lasts = Vec::new();
    {
        let ring = d.slots.get_mut(&slot).unwrap().rings.get_mut(&dci).unwrap();
        // Interrupt on every 10th TD (a TD that fails reports anyway): a
        // burst of 200 completions would overflow the driver's 64-entry
        // event ring.
        for k in 0..n {
            let ioc = if k % 10 == 9 { ctl::IOC } else { 0 };
            let t = Trb {
                parameter: buf + k * u64::from(pkt),
                status: pkt,
                control: (ty::ISOCH << 10) | ioc | (1 << 31),
            };
            let a = ring.push_all(&ram, &[t])[0];
            if ioc != 0 {
                lasts.push(a);
            }
        }
    }
    let t0 = Instant::now();
    d.ring_doorbell(slot, dci);
    let mut codes = std::collections::BTreeMap::new();
    let mut events = 0;
    while let Some(c) = d.next_transfer(slot, dci) {
        *codes.entry(c.code).or_insert(0) += 1;
        events += 1;
        if c.trb == *lasts.last().unwrap() || events > n {
            break;
        }
    }
    let ms = t0.elapsed().as_millis();
    let ok = codes.get(&cc::SUCCESS).copied().unwrap_or(0);
    r.check(
        "iso_out_stream",
        si == cc::SUCCESS && code == cc::SUCCESS && ok == lasts.len() && codes.len() == 1,
        format!(
            "{n} packets of {pkt} B in {ms} ms, events {codes:?} (want {} successes), URBs {}",
            lasts.len(),
            mon.stats().urbs
        ),
    );
    drop(d);
    // Straight through the backend: 8-packet isochronous transfers, each
    // packet's status and length reported.
    let (mut dev, _mon) = host(rule, None);
    let ram = GuestRam::anonymous(1 << 20);
    let q = CompletionQueue::new();
    let mut next = 1u64;
    let mut ctl_xfer = |dev: &mut HostDevice, sp: SetupPacket| {
        let (x, _h) = Transfer::new(
            TransferId(next),
            0,
            Direction::Out,
            TransferKind::Control(sp),
            vec![],
            ram.clone(),
            vec![],
            q.clone(),
        );
        next += 1;
        dev.submit(x);
    };
    ctl_xfer(
        &mut dev,
        SetupPacket {
            request_type: 0,
            request: 9,
            value: u16::from(cfg[5]),
            index: 0,
            length: 0,
        },
    );
    ctl_xfer(
        &mut dev,
        SetupPacket {
            request_type: 1,
            request: 11,
            value: u16::from(ep.alt),
            index: u16::from(ep.interface),
            length: 0,
        },
    );
    let sets = wait_results(&q, 2);
    let mut handles = Vec::new();
    let per = 8usize;
    for k in 0..16u64 {
        let iso: Vec<IsoPacket> = (0..per)
            .map(|i| IsoPacket {
                offset: i * pkt as usize,
                length: pkt as usize,
                actual: 0,
                status: TransferStatus::TransactionError,
            })
            .collect();
        let (x, h) = Transfer::new(
            TransferId(100 + k),
            ep.address & 0xf,
            Direction::Out,
            TransferKind::Isochronous,
            vec![Segment::Guest {
                addr: 0x1000 + k * 0x2000,
                len: per * pkt as usize,
            }],
            ram.clone(),
            iso,
            q.clone(),
        );
        handles.push(h);
        dev.submit(x);
    }
    let res = wait_results(&q, 16);
    let packets_ok = res
        .iter()
        .flat_map(|t| t.iso_packets.iter())
        .filter(|p| p.status == TransferStatus::Success && p.actual == pkt as usize)
        .count();
    let in_order = res.iter().map(|t| t.id.0).eq(100..116);
    r.check(
        "iso_per_packet_status",
        sets.iter().all(|t| t.status == TransferStatus::Success)
            && res.len() == 16
            && packets_ok == 16 * per
            && in_order,
        format!(
            "set {:?}, {} transfers, {packets_ok}/{} packets ok, in order {in_order}",
            sets.iter().map(|t| t.status).collect::<Vec<_>>(),
            res.len(),
            16 * per
        ),
    );
    drop(dev);
}

/// One bulk endpoint of the UAS alternate setting.
#[derive(Clone, Copy, Debug, Default)]
struct UasPipe {
    addr: u8,
    max_packet: u16,
    burst: u8,
    /// log2 of the companion's MaxStreams.
    streams: u8,
}

/// The UAS alternate setting (interface protocol 0x62) of a
/// configuration: (interface, alt, pipes by pipe ID 1..=4: command,
/// status, data in, data out), from the pipe-usage descriptors (0x24).
fn uas_pipes(cfg: &[u8]) -> Option<(u8, u8, [UasPipe; 4])> {
    // Endpoints of the first UAS alternate setting, each with its pipe ID
    // (its companion and pipe-usage descriptors follow it, in either order).
    let mut eps: Vec<(UasPipe, u8)> = Vec::new();
    let mut cur: Option<(u8, u8)> = None;
    let mut found: Option<(u8, u8)> = None;
    let mut i = 0;
    while i + 2 <= cfg.len() && cfg[i] >= 2 {
        let d = &cfg[i..(i + cfg[i] as usize).min(cfg.len())];
        match d[1] {
            4 if d.len() >= 9 => {
                if found.is_some() {
                    break;
                }
                cur = (d[5] == 8 && d[6] == 6 && d[7] == 0x62).then_some((d[2], d[3]));
                found = cur;
                eps.clear();
            }
            5 if d.len() >= 7 && cur.is_some() => eps.push((
                UasPipe {
                    addr: d[2],
                    max_packet: u16::from_le_bytes([d[4], d[5]]),
                    ..Default::default()
                },
                0,
            )),
            0x30 if d.len() >= 4 => {
                if let Some((p, _)) = eps.last_mut() {
                    p.burst = d[2];
                    p.streams = d[3] & 0x1f;
                }
            }
            0x24 if d.len() >= 3 => {
                if let Some((_, id)) = eps.last_mut() {
                    *id = d[2];
                }
            }
            _ => {}
        }
        i += cfg[i] as usize;
    }
    let (ifno, alt) = found?;
    let mut pipes = [UasPipe::default(); 4];
    for (p, id) in eps {
        if (1..=4).contains(&id) {
            pipes[id as usize - 1] = p;
        }
    }
    pipes
        .iter()
        .all(|p| p.addr != 0)
        .then_some((ifno, alt, pipes))
}

/// A UAS device on our controller: the command pipe is a plain bulk OUT
/// ring, status / data in / data out have one ring per stream.
struct Uas {
    slot: usize,
    dcis: [usize; 4],
    /// Per pipe (status, data in, data out): stream ID -> ring.
    rings: [std::collections::HashMap<u16, common::ProducerRing>; 3],
    cmd_buf: u64,
    status_buf: u64,
}

const UAS_STATUS_LEN: u32 = 112;
/// Commands in flight at once, at most.
const UAS_SLOTS: usize = 8;

impl Uas {
    /// Configure Endpoint for the four pipes: MaxPStreams `mps` with a
    /// Linear Primary Stream Context Array of `2 << mps` entries on the
    /// three stream pipes.
    fn configure(d: &mut Driver, slot: usize, pipes: &[UasPipe; 4], mps: u32) -> (u32, Uas) {
        let inp = d.slots[&slot].in_ctx;
        let out = d.slots[&slot].out_ctx;
        let dcis = pipes.map(|p| dci_of(p.addr));
        let max_dci = *dcis.iter().max().unwrap() as u32;
        let mut sc = d.read_ctx(out, 0);
        sc[0] = (sc[0] & !(0x1f << 27)) | (max_dci << 27);
        sc[3] = 0;
        d.write_ctx(inp, 1, sc);
        let mut add = 1u32;
        let mut rings: [std::collections::HashMap<u16, common::ProducerRing>; 3] =
            Default::default();
        for (k, p) in pipes.iter().enumerate() {
            let dci = dcis[k];
            add |= 1 << dci;
            let t = if p.addr & 0x80 != 0 {
                ep_type::BULK_IN
            } else {
                ep_type::BULK_OUT
            };
            let dw1 = (3 << 1)
                | (t << 3)
                | (u32::from(p.burst) << 8)
                | (u32::from(p.max_packet & 0x7ff) << 16);
            if k == 0 {
                // Command pipe: no streams.
                let base = d.alloc(16 * 64, 64);
                d.slots.get_mut(&slot).unwrap().rings.insert(
                    dci,
                    common::ProducerRing {
                        base,
                        size: 64,
                        enq: 0,
                        cycle: true,
                    },
                );
                let c = [0, dw1, base as u32 | 1, (base >> 32) as u32, 32, 0, 0, 0];
                d.write_ctx(inp, dci as u64 + 1, c);
                continue;
            }
            let n = 2u64 << mps;
            let array = d.alloc(16 * n, 64);
            for sid in 1..n {
                let base = d.alloc(16 * 16, 64);
                let v = base | (1 << 1) | 1; // SCT = primary ring, DCS
                d.ram.write(array + 16 * sid, &v.to_le_bytes()).unwrap();
                rings[k - 1].insert(
                    sid as u16,
                    common::ProducerRing {
                        base,
                        size: 16,
                        enq: 0,
                        cycle: true,
                    },
                );
            }
            let dw0 = (mps << 10) | (1 << 15); // MaxPStreams, LSA
            let c = [dw0, dw1, array as u32, (array >> 32) as u32, 3072, 0, 0, 0];
            d.write_ctx(inp, dci as u64 + 1, c);
        }
        d.write_ctx(inp, 0, [0, add, 0, 0, 0, 0, 0, 0]);
        let code = d
            .command(Trb {
                parameter: inp,
                status: 0,
                control: (ty::CONFIGURE_ENDPOINT << 10) | ((slot as u32) << 24),
            })
            .0;
        let cmd_buf = d.alloc(64 * UAS_SLOTS as u64, 64);
        let status_buf = d.alloc(128 * UAS_SLOTS as u64, 64);
        (
            code,
            Uas {
                slot,
                dcis,
                rings,
                cmd_buf,
                status_buf,
            },
        )
    }

    /// Queues one single-TRB TD on stream `sid` of pipe `k` (1..=3) and
    /// rings its doorbell with the stream ID; returns the TRB address.
    fn queue_stream(&mut self, d: &mut Driver, k: usize, sid: u16, buf: u64, len: u32) -> u64 {
        let dci = self.dcis[k];
        let ram = d.ram.clone();
        let trbs = Driver::normal_trbs(&[(buf, len)], dci % 2 == 1);
        assert_eq!(trbs.len(), 1, "one TRB per TD");
        let a = self.rings[k - 1]
            .get_mut(&sid)
            .unwrap()
            .push_all(&ram, &trbs)[0];
        let db = dci as u32 | (u32::from(sid) << 16);
        d.w32(DOORBELL_OFFSET + 4 * self.slot as u64, db);
        a
    }

    fn wait_td(&mut self, d: &mut Driver, k: usize, trb: u64, what: &str) -> Result<u32, String> {
        let (slot, dci) = (self.slot, self.dcis[k]);
        let ev = d.wait_event(|t| {
            t.trb_type() == ty::TRANSFER_EVENT
                && (t.control >> 24) as usize == slot
                && ((t.control >> 16) & 0x1f) as usize == dci
                && t.parameter == trb
        });
        match ev {
            Some(t) if matches!(t.status >> 24, cc::SUCCESS | cc::SHORT_PACKET) => {
                Ok(t.status & 0xff_ffff)
            }
            Some(t) => Err(format!("{what}: completion code {}", t.status >> 24)),
            None => Err(format!(
                "{what}: no event; controller holds {} transfers",
                d.pci.controller().transfers_in_flight()
            )),
        }
    }

    /// One SCSI command: (SCSI status, data bytes moved, sense key).
    fn command(
        &mut self,
        d: &mut Driver,
        tag: u16,
        cdb: &[u8],
        data: Option<(bool, u64, u32)>,
    ) -> Result<(u8, u32, u8), String> {
        Ok(self.commands(d, &[(tag, cdb, data)])?[0])
    }

    /// SCSI commands in flight together, each on its own stream (its tag):
    /// all status and data TDs queued first (as Linux's uas does), then
    /// the Command IUs. Per command: (SCSI status, data bytes moved, sense
    /// key).
    #[allow(clippy::type_complexity)]
    fn commands(
        &mut self,
        d: &mut Driver,
        cmds: &[(u16, &[u8], Option<(bool, u64, u32)>)],
    ) -> Result<Vec<(u8, u32, u8)>, String> {
        assert!(cmds.len() <= UAS_SLOTS);
        let stride = u64::from(UAS_STATUS_LEN).next_multiple_of(64);
        let mut tds = Vec::new();
        for (i, &(tag, _, data)) in cmds.iter().enumerate() {
            let sbuf = self.status_buf + stride * i as u64;
            d.ram.write(sbuf, &[0u8; UAS_STATUS_LEN as usize]).unwrap();
            let st = self.queue_stream(d, 1, tag, sbuf, UAS_STATUS_LEN);
            let dt = data.map(|(din, buf, len)| {
                let k = if din { 2 } else { 3 };
                (k, len, self.queue_stream(d, k, tag, buf, len))
            });
            tds.push((sbuf, st, dt));
        }
        let mut cts = Vec::new();
        for (i, &(tag, cdb, _)) in cmds.iter().enumerate() {
            let mut iu = [0u8; 32];
            iu[0] = 0x01; // Command IU
            iu[2..4].copy_from_slice(&tag.to_be_bytes());
            iu[16..16 + cdb.len()].copy_from_slice(cdb);
            let cbuf = self.cmd_buf + 64 * i as u64;
            d.ram.write(cbuf, &iu).unwrap();
            let trbs = Driver::normal_trbs(&[(cbuf, 32)], false);
            cts.push(d.queue(self.slot, self.dcis[0], &trbs)[0]);
        }
        for ct in cts {
            self.wait_td(d, 0, ct, "Command IU")?;
        }
        let mut out = Vec::new();
        for (&(tag, _, _), (sbuf, st, dt)) in cmds.iter().zip(tds) {
            let moved = match dt {
                Some((k, len, trb)) => len - self.wait_td(d, k, trb, &format!("tag {tag} data"))?,
                None => 0,
            };
            let residue = self.wait_td(d, 1, st, &format!("tag {tag} status"))?;
            let mut s = [0u8; UAS_STATUS_LEN as usize];
            d.ram.read(sbuf, &mut s).unwrap();
            let got = (UAS_STATUS_LEN - residue) as usize;
            if u16::from_be_bytes([s[2], s[3]]) != tag {
                return Err(format!(
                    "tag {tag}: status IU for another tag: {:02x?}",
                    &s[..got.min(16)]
                ));
            }
            match s[0] {
                // Sense IU: status at 6, sense data from 16 (key in byte 2).
                0x03 => out.push((s[6], moved, if got > 18 { s[18] & 0xf } else { 0 })),
                _ => {
                    return Err(format!(
                        "tag {tag}: IU {:#04x}: {:02x?}",
                        s[0],
                        &s[..got.min(16)]
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// The block device the VM kernel made of a USB device, if any.
fn block_of(port: &str) -> Option<String> {
    let base = Path::new(SYSFS).join(format!("{port}:1.0"));
    let walk = |p: &Path, pre: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(pre))
            .map(|e| e.path())
            .collect()
    };
    for h in walk(&base, "host") {
        for t in walk(&h, "target") {
            for lun in walk(&t, "") {
                if let Some(b) = walk(&lun.join("block"), "sd").first() {
                    return Some(b.file_name()?.to_string_lossy().into_owned());
                }
            }
        }
    }
    None
}

/// QEMU's usb-uas (a scsi-hd on it) through our controller with bulk
/// streams: claimed from the VM kernel's uas driver, enumerated at
/// SuperSpeed, the UAS alternate setting's pipes configured with
/// MaxPStreams and stream context arrays, then INQUIRY, READ CAPACITY(10),
/// WRITE(10) and READ(10) of 64 KiB as Command IUs with the tag as stream
/// ID; the VM kernel reads the written blocks back after release.
fn uas_checks(r: &mut Results) {
    let Some(info) = passthrough::rule::scan(Path::new(SYSFS))
        .into_iter()
        .find(|d| {
            let p = Path::new(SYSFS).join(format!("{}:1.0/bInterfaceProtocol", d.port));
            std::fs::read_to_string(p).is_ok_and(|s| s.trim() == "62")
                || product_of(&d.port).contains("Attached SCSI")
        })
    else {
        return r.check("uas_streams", false, "no QEMU usb-uas in sysfs");
    };
    let before = iface_driver(&info.port, 0);
    let (dev, mon) = host(MatchRule::Port(info.port.clone()), None);
    let claimed = iface_driver(&info.port, 0);
    let (mut d, port) = plug(dev);
    d.timeout = Duration::from_secs(10);
    let speed = (d.portsc(port) >> 10) & 0xf;
    let (slot, _, cfg) = enumerate(&mut d, port);
    let Some((ifno, alt, pipes)) = uas_pipes(&cfg) else {
        return r.check(
            "uas_streams",
            false,
            format!("no UAS alt setting in {cfg:02x?}"),
        );
    };
    assert_eq!(
        d.control_out(slot, [0, 9, cfg[5], 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS,
        "SET_CONFIGURATION"
    );
    if alt != 0 {
        let rc = d.control_out(slot, [0x01, 11, alt, 0, ifno, 0, 0, 0], &[]);
        assert_eq!(rc, cc::SUCCESS, "SET_INTERFACE {ifno} alt {alt}");
    }
    // 32-entry arrays (streams 1..31) as Linux asks for; the device
    // offers 2^streams of them.
    let mps = 4;
    let (code, mut uas) = Uas::configure(&mut d, slot, &pipes, mps);
    assert_eq!(code, cc::SUCCESS, "Configure Endpoint with streams");
    let dev_streams = pipes[1].streams;
    let stats0 = mon.stats();
    let buf = DATA_BASE;
    let rbuf = DATA_BASE + (1 << 20);
    let len = 64 * 1024u32;
    let lba = 256u32;
    let mut tag = 0u16;
    let mut next_tag = || {
        tag = tag % ((1 << dev_streams.clamp(1, 4)) - 1) + 1;
        tag
    };
    let res = (|| -> Result<String, String> {
        let inq = uas.command(
            &mut d,
            next_tag(),
            &[0x12, 0, 0, 0, 36, 0],
            Some((true, buf, 36)),
        )?;
        let mut id = [0u8; 36];
        d.ram.read(buf, &mut id).unwrap();
        if inq.0 != 0 || inq.1 < 36 || id[0] & 0x1f != 0 {
            return Err(format!("INQUIRY {inq:?} {id:02x?}"));
        }
        let vendor = String::from_utf8_lossy(&id[8..32]).trim().to_string();
        // Unit attention after the reset: TEST UNIT READY until good.
        let mut tur = (0xff, 0, 0);
        for _ in 0..5 {
            tur = uas.command(&mut d, next_tag(), &[0; 6], None)?;
            if tur.0 == 0 {
                break;
            }
        }
        if tur.0 != 0 {
            return Err(format!("TEST UNIT READY {tur:?}"));
        }
        let cap = uas.command(
            &mut d,
            next_tag(),
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Some((true, buf, 8)),
        )?;
        let mut c = [0u8; 8];
        d.ram.read(buf, &mut c).unwrap();
        let last = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        let bs = u32::from_be_bytes([c[4], c[5], c[6], c[7]]);
        if cap.0 != 0 || cap.1 != 8 || bs != BLOCK {
            return Err(format!("READ CAPACITY {cap:?} {c:02x?}"));
        }
        let mut pat = vec![0u8; len as usize];
        rand::rngs::SmallRng::seed_from_u64(0x0a5).fill_bytes(&mut pat);
        d.ram.write(buf, &pat).unwrap();
        d.ram.write(rbuf, &vec![0u8; len as usize]).unwrap();
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&((len / BLOCK) as u16).to_be_bytes());
        let w = uas.command(&mut d, next_tag(), &cdb, Some((false, buf, len)))?;
        cdb[0] = 0x28;
        let rd = uas.command(&mut d, next_tag(), &cdb, Some((true, rbuf, len)))?;
        let got = read_guest(&d, &[(rbuf, len)]);
        if w.0 != 0 || rd.0 != 0 || rd.1 != len || sha(&got) != sha(&pat) {
            return Err(format!(
                "WRITE {w:?} READ {rd:?} sha {} vs {}",
                sha(&got),
                sha(&pat)
            ));
        }
        // Two 32 KiB READ(10)s of the two halves in flight together on
        // two streams, the second half's command first.
        let half = len / 2;
        let (b1, b2) = (rbuf + (2 << 20), rbuf + (3 << 20));
        d.ram.write(b1, &vec![0u8; 2 * half as usize]).unwrap();
        d.ram.write(b2, &vec![0u8; 2 * half as usize]).unwrap();
        let cdb_of = |lba: u32| {
            let mut c = [0u8; 10];
            c[0] = 0x28;
            c[2..6].copy_from_slice(&lba.to_be_bytes());
            c[7..9].copy_from_slice(&((half / BLOCK) as u16).to_be_bytes());
            c
        };
        let (c2, c1) = (cdb_of(lba + half / BLOCK), cdb_of(lba));
        let (t2, t1) = (next_tag(), next_tag());
        let both = uas.commands(
            &mut d,
            &[
                (t2, &c2, Some((true, b2, half))),
                (t1, &c1, Some((true, b1, half))),
            ],
        )?;
        let got = [read_guest(&d, &[(b1, half)]), read_guest(&d, &[(b2, half)])].concat();
        if both.iter().any(|c| c.0 != 0 || c.1 != half) || sha(&got) != sha(&pat) {
            return Err(format!(
                "two READs on streams {t2} and {t1}: {both:?} sha {} vs {}",
                sha(&got),
                sha(&pat)
            ));
        }
        Ok(format!(
            "\"{vendor}\", {} blocks of {bs}, 64 KiB written and read back sha {}, \
             then as two READs on streams {t2} and {t1} in flight together",
            u64::from(last) + 1,
            sha(&pat)
        ))
    })();
    let stats = mon.stats();
    drop(d);
    // The VM kernel's uas driver gets the device back and reads the
    // blocks we wrote.
    let want = {
        let mut pat = vec![0u8; len as usize];
        rand::rngs::SmallRng::seed_from_u64(0x0a5).fill_bytes(&mut pat);
        sha(&pat)
    };
    let mut host_sha = String::from("-");
    if res.is_ok() {
        wait_until(Duration::from_secs(20), || {
            host_sha = match block_of(&info.port) {
                Some(b) => read_block_dev(
                    &format!("/dev/{b}"),
                    u64::from(lba) * u64::from(BLOCK),
                    len as usize,
                )
                .map_or_else(|| format!("/dev/{b} unreadable"), |v| sha(&v)),
                None => "no block device after release".into(),
            };
            host_sha == want
        });
    }
    let ok = res.is_ok()
        && speed == 4
        && before.as_deref() == Some("uas")
        && claimed.as_deref() == Some("usbfs")
        && host_sha == want;
    r.check(
        "uas_streams",
        ok,
        format!(
            "{res:?}; speed {speed}, driver {before:?} -> {claimed:?}, device MaxStreams 2^{dev_streams}, \
             host reads back {host_sha}, URBs {}",
            stats.urbs - stats0.urbs
        ),
    );
}

fn wait_results(q: &CompletionQueue, n: usize) -> Vec<hcd_emul::usb::TransferResult> {
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while out.len() < n && Instant::now() < end {
        out.extend(q.drain());
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

/// The stick unplugged from the outer QEMU while a transfer is in flight,
/// then plugged in again and re-attached by its vendor/product/serial rule.
fn removal_checks(r: &mut Results, written: Option<&String>) {
    let Some(info) = find("HARDDRIVE").or_else(|| find("Storage")) else {
        return r.check("removal_stick_present", false, "no stick");
    };
    let rule = MatchRule::Id {
        vendor: info.vendor,
        product: info.product,
        serial: Some(STICK_SERIAL.into()),
    };
    let (dev, mon) = host(rule, None);
    let (mut d, port) = plug(dev);
    let (slot, devd, cfg) = enumerate(&mut d, port);
    let mut bot = Bot::setup(&mut d, slot, &devd, &cfg);
    if let Err(e) = bot.ready(&mut d) {
        return r.check("removal_ready", false, e);
    }
    clear_psc(&mut d);
    // Reads with four 1 MiB TDs in flight, over and over, until the stick
    // is pulled out from under them.
    println!("PT-WAIT unplug");
    d.timeout = Duration::from_secs(30);
    let tds: Vec<(u64, u32)> = (0..4)
        .map(|i| (DATA_BASE + i * (1 << 20), 1 << 20))
        .collect();
    let t0 = Instant::now();
    let mut reads = 0;
    let err = loop {
        if t0.elapsed() > Duration::from_secs(120) {
            break "still reading after 120 s".to_string();
        }
        match bot.read_pipelined(&mut d, LBA, &tds) {
            Ok(()) => reads += 1,
            Err(e) => break e,
        }
    };
    let disc = wait_port(&mut d, port, false, Duration::from_secs(30));
    let clean = wait_until(Duration::from_secs(5), || {
        mon.urbs_in_flight() == 0 && mon.transfers_held() == 0 && !mon.connected()
    });
    r.check(
        "unplug_mid_transfer_fails_and_disconnects",
        err.contains(&format!("code {}", cc::USB_TRANSACTION_ERROR))
            && disc
            && clean
            && d.pci.controller().transfers_in_flight() == 0,
        format!(
            "{reads} reads, then: {err}; port disconnected {disc}, backend clean {clean}, stats {:?}",
            mon.stats()
        ),
    );
    // Transfers while unplugged fail at once, nothing hangs.
    d.write_portsc(port, PORTSC_PP | PORTSC_CHANGE_MASK);
    println!("PT-WAIT replug");
    let conn = wait_port(&mut d, port, true, Duration::from_secs(120));
    let (code, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: (ty::DISABLE_SLOT << 10) | ((slot as u32) << 24),
    });
    d.write_portsc(port, PORTSC_PP | PORTSC_CHANGE_MASK);
    if !conn {
        return r.check(
            "replug_reattached",
            false,
            format!("no reconnect, stats {:?}", mon.stats()),
        );
    }
    let (slot2, devd2, cfg2) = enumerate(&mut d, port);
    let mut bot2 = Bot::setup(&mut d, slot2, &devd2, &cfg2);
    let buf = DATA_BASE;
    let rd = bot2
        .ready(&mut d)
        .and_then(|_| bot2.rw10(&mut d, false, LBA, &[(buf, 2 * BIG)]));
    let got = sha(&read_guest(&d, &[(buf, 2 * BIG)]));
    r.check(
        "replug_reattached",
        code == cc::SUCCESS && rd.is_ok() && Some(&got) == written && mon.stats().attaches == 2,
        format!(
            "{rd:?} sha {got} vs {written:?}, now {:?}, stats {:?}",
            mon.device().map(|i| i.port),
            mon.stats()
        ),
    );
}

/// Bulk read throughput: direct usbfs (BOT by hand, one 1 MiB READ(10)
/// at a time) versus the same commands through our controller and
/// passthrough. Three alternating rounds; medians and their ratio.
fn bench(mib: u32) {
    let Some(info) = find("HARDDRIVE").or_else(|| find("Storage")) else {
        println!("RESULT bench FAIL no stick");
        return;
    };
    let mut direct = Vec::new();
    let mut ours = Vec::new();
    let mut zc = (0, 0);
    for round in 0..3 {
        match direct_read(&info, mib) {
            Ok(t) => direct.push(f64::from(mib) / t.as_secs_f64()),
            Err(e) => return println!("RESULT bench FAIL direct round {round}: {e}"),
        }
        let (dev, mon) = host(MatchRule::Port(info.port.clone()), None);
        let (mut d, port) = plug(dev);
        let (slot, devd, cfg) = enumerate(&mut d, port);
        let mut bot = Bot::setup(&mut d, slot, &devd, &cfg);
        let r = bot.ready(&mut d).and_then(|_| {
            let t = Instant::now();
            for i in 0..mib {
                bot.rw10(&mut d, false, (i % 64) * 2048, &[(DATA_BASE, 1 << 20)])?;
            }
            Ok(t.elapsed())
        });
        match r {
            Ok(t) => ours.push(f64::from(mib) / t.as_secs_f64()),
            Err(e) => return println!("RESULT bench FAIL passthrough round {round}: {e}"),
        }
        zc = (mon.stats().zero_copy_urbs, mon.stats().urbs);
        drop(d);
        // The host's usb-storage driver binds again before the next round.
        wait_until(Duration::from_secs(10), || {
            iface_driver(&info.port, 0).is_some_and(|d| d != "usbfs")
        });
        println!("METRIC round{round}_direct_mibps {:.1}", direct[round]);
        println!("METRIC round{round}_passthrough_mibps {:.1}", ours[round]);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut direct), median(&mut ours));
    println!("METRIC direct_usbfs_read_mibps {a:.1}");
    println!("METRIC passthrough_read_mibps {b:.1}");
    println!("METRIC passthrough_ratio {:.2}", b / a);
    println!("METRIC zero_copy_urbs {} of {}", zc.0, zc.1);
    println!(
        "RESULT bench PASS {mib} MiB x 3: direct {a:.1} MiB/s, passthrough {b:.1} MiB/s, ratio {:.2}",
        b / a
    );
}

/// BOT READ(10) straight through usbfs, synchronously (submit, wait, reap).
fn direct_read(info: &HostDeviceInfo, mib: u32) -> Result<Duration, String> {
    let fd = Usbfs::open(Path::new("/dev"), info.bus, info.addr).map_err(|e| e.to_string())?;
    let descs = HostDescriptors::parse(&fd.read_descriptors().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let eps = descs.endpoints();
    let bin = eps
        .iter()
        .find(|e| e.ep_type == 2 && e.address & 0x80 != 0)
        .ok_or("no bulk IN")?
        .address;
    let bout = eps
        .iter()
        .find(|e| e.ep_type == 2 && e.address & 0x80 == 0)
        .ok_or("no bulk OUT")?
        .address;
    fd.disconnect_claim(0).map_err(|e| e.to_string())?;
    let xfer = |ep: u8, buf: &mut [u8]| -> Result<usize, String> {
        let mut b = Box::new(UrbBlock::default());
        b.urb.urb_type = urb_type::BULK;
        b.urb.endpoint = ep;
        b.urb.buffer = buf.as_mut_ptr() as usize;
        b.urb.buffer_length = buf.len() as i32;
        let p: *mut UrbBlock = &mut *b;
        // SAFETY: `b` and `buf` outlive the URB: we reap it before
        // returning (or the device is gone and the URB discarded).
        unsafe { fd.submit(p) }.map_err(|e| e.to_string())?;
        loop {
            usbfs::poll(&[(fd.raw_fd(), libc::POLLOUT)], 5000).map_err(|e| e.to_string())?;
            if let Some(q) = fd.reap().map_err(|e| e.to_string())? {
                if q != p {
                    return Err("reaped another URB".into());
                }
                break;
            }
        }
        if b.urb.status != 0 {
            return Err(format!("URB status {}", b.urb.status));
        }
        Ok(b.urb.actual_length as usize)
    };
    let mut data = vec![0u8; 1 << 20];
    let mut csw = [0u8; 13];
    let t = Instant::now();
    for i in 0..mib {
        let mut c = [0u8; 31];
        c[0..4].copy_from_slice(b"USBC");
        c[4..8].copy_from_slice(&(i + 1).to_le_bytes());
        c[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        c[12] = 0x80;
        c[14] = 10;
        c[15] = 0x28;
        c[17..21].copy_from_slice(&((i % 64) * 2048).to_be_bytes());
        c[22..24].copy_from_slice(&2048u16.to_be_bytes());
        xfer(bout, &mut c)?;
        let n = xfer(bin, &mut data)?;
        xfer(bin, &mut csw)?;
        if n != data.len() || csw[12] != 0 {
            return Err(format!("READ {i}: {n} bytes, CSW {csw:02x?}"));
        }
    }
    let el = t.elapsed();
    let _ = fd.release(0);
    let _ = fd.connect_driver(0);
    Ok(el)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("check");
    for dv in passthrough::rule::scan(Path::new(SYSFS)) {
        println!(
            "host device {} bus {} addr {} {:04x}:{:04x} {:?} {:?} \"{}\"",
            dv.port,
            dv.bus,
            dv.addr,
            dv.vendor,
            dv.product,
            dv.speed,
            dv.serial,
            product_of(&dv.port)
        );
    }
    if mode == "bench" {
        let mib = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
        bench(mib);
        return;
    }
    let mut r = Results { pass: 0, fail: 0 };
    let mut written = None;
    r.section("listing", listing_checks);
    r.section("stick", |r| stick_checks(r, &mut written));
    r.section("compat", compat_checks);
    r.section("hid", hid_checks);
    r.section("iso", iso_checks);
    r.section("uas", uas_checks);
    r.section("removal", |r| removal_checks(r, written.as_ref()));
    println!("vmtest: {} passed, {} failed", r.pass, r.fail);
}
