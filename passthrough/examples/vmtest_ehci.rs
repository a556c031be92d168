//! Passthrough checks through our EHCI against real usbfs, run inside a
//! Linux VM (`tests/passthrough/run.sh ehci` boots it) whose QEMU-emulated
//! USB devices are real devices to its kernel: a high-speed usb-storage
//! stick on QEMU's EHCI, a full-speed usb-storage stick and a usb-kbd on
//! QEMU's UHCI. Our EHCI, driven in-process by the Linux-shaped guest
//! driver of the hcd-emul EHCI tests, passes them through usbfs: the
//! high-speed stick on a root port, the full-speed devices behind the
//! rate-matching hub on root port 1 (split transactions).
//!
//! One `RESULT name PASS|FAIL detail` line per check; `PT-WAIT what` lines
//! ask the script outside the VM to act through QMP (`key`, `key2`: a key
//! press; `unplug`, `replug`: the full-speed stick).

#[path = "../../hcd-emul/tests/ehci_common/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod ehci_common;
mod vmcommon;

use std::time::{Duration, Instant};

use ehci_common::{setup, Driver, Eps, QtdSpec, Queue, DATA_BASE};
use hcd_emul::ehci::regs::*;
use hcd_emul::usb::Speed;
use passthrough::descriptors::HostDescriptors;
use passthrough::{HostDeviceInfo, HostMonitor, MatchRule};
use rand::{RngCore, SeedableRng};
use vmcommon::*;

const BLOCK: u32 = 512;
const HS_SERIAL: &str = "PTHS01";
const FS_SERIAL: &str = "PTFS01";
/// Where the checks write on both sticks (LBA).
const LBA: u32 = 2048;
/// USB addresses our guest driver gives out.
const HUB_ADDR: u8 = 1;
const FS_ADDR: u8 = 2;
const HS_ADDR: u8 = 3;
const KBD_ADDR: u8 = 4;
const FS_ADDR2: u8 = 5;
/// Round trip sizes: up to Linux's 120 KiB URB, and 1 MiB in 64 qTDs at
/// high speed (the full-speed bus of the outer QEMU moves ~1 MB/s).
const HS_SIZES: [u32; 4] = [4096, 65536, 122880, 1 << 20];
const FS_SIZES: [u32; 3] = [4096, 20480, 65536];

fn read_guest(d: &Driver, addr: u64, len: u32) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    d.ram.read(addr, &mut v).unwrap();
    v
}

/// A device our driver enumerated: its addressed control queue and
/// descriptors.
struct Enumerated {
    ep0: Queue,
    dev: Vec<u8>,
    cfg: Vec<u8>,
}

/// Enumeration as Linux's hub_port_init does it on EHCI: GET_DESCRIPTOR
/// (64) at address 0 with a 64-byte ep0, SET_ADDRESS, the address-0 QH
/// unlinked (two IAA cycles), a new ep0 QH with the real bMaxPacketSize0,
/// the device and configuration descriptors.
fn enumerate(
    d: &mut Driver,
    eps: Eps,
    hub: Option<(u8, u8)>,
    addr: u8,
) -> Result<Enumerated, String> {
    let mut q0 = d.make_qh(0, 0, eps, 64, true, hub, 0);
    d.link_async(&q0);
    let dev = d
        .control_in(&mut q0, setup(0x80, 6, 0x0100, 0, 64))
        .map_err(|_| "GET_DESCRIPTOR(device) at address 0 stalled".to_string())?;
    if dev.len() != 18 || dev[1] != 1 {
        return Err(format!("device descriptor {dev:02x?}"));
    }
    let (_, stalled) = d.control(&mut q0, setup(0, 5, u16::from(addr), 0, 0), None);
    d.unlink_async(&q0);
    if stalled {
        return Err("SET_ADDRESS stalled".into());
    }
    let mut ep0 = d.make_qh(addr, 0, eps, u32::from(dev[7]), true, hub, 0);
    d.link_async(&ep0);
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

/// A stick driven through Bulk-Only Transport on async QHs, as Linux's
/// usb-storage over ehci_hcd: 16 KiB qTDs, URBs appended by memory.
struct Bot {
    ep0: Queue,
    bin: Queue,
    bout: Queue,
    ein: u8,
    eout: u8,
    ifno: u8,
    tag: u32,
    cbw: u64,
    csw: u64,
}

impl Bot {
    fn setup(
        d: &mut Driver,
        e: Enumerated,
        eps: Eps,
        hub: Option<(u8, u8)>,
        addr: u8,
    ) -> Result<Bot, String> {
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
        let bq_in = d.make_qh(
            addr,
            bin.address & 0xf,
            eps,
            u32::from(bin.max_packet & 0x7ff),
            false,
            hub,
            0,
        );
        let bq_out = d.make_qh(
            addr,
            bout.address & 0xf,
            eps,
            u32::from(bout.max_packet & 0x7ff),
            false,
            hub,
            0,
        );
        d.link_async(&bq_in);
        d.link_async(&bq_out);
        let cbw = u64::from(d.alloc(64, 64));
        let csw = u64::from(d.alloc(64, 64));
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
        // Reset recovery (BOT 5.3.4): the VM kernel's usb-storage may have
        // left the stick inside a command.
        b.reset_recovery(d)?;
        Ok(b)
    }

    /// Bulk-Only Mass Storage Reset, CLEAR_FEATURE(ENDPOINT_HALT) on both
    /// bulk endpoints, and (ehci_endpoint_reset) each bulk QH unlinked,
    /// refreshed with its toggle reset, relinked.
    fn reset_recovery(&mut self, d: &mut Driver) -> Result<(), String> {
        let r = d.control(
            &mut self.ep0,
            setup(0x21, 0xff, 0, u16::from(self.ifno), 0),
            None,
        );
        if r.1 {
            return Err("Bulk-Only Mass Storage Reset stalled".into());
        }
        for ep in [self.ein, self.eout] {
            if d.control(&mut self.ep0, setup(0x02, 1, 0, u16::from(ep), 0), None)
                .1
            {
                return Err(format!("CLEAR_FEATURE(ENDPOINT_HALT) {ep:#x} stalled"));
            }
        }
        for q in [self.bin.clone(), self.bout.clone()] {
            d.unlink_async(&q);
            d.refresh(&q, false);
            d.link_async(&q);
        }
        Ok(())
    }

    fn send_cbw(
        &mut self,
        d: &mut Driver,
        cdb: &[u8],
        len: u32,
        dir_in: bool,
    ) -> Result<(), String> {
        let mut c = [0u8; 31];
        c[0..4].copy_from_slice(b"USBC");
        c[4..8].copy_from_slice(&self.tag.to_le_bytes());
        c[8..12].copy_from_slice(&len.to_le_bytes());
        c[12] = if dir_in { 0x80 } else { 0 };
        c[14] = cdb.len() as u8;
        c[15..15 + cdb.len()].copy_from_slice(cdb);
        d.ram.write(self.cbw, &c).unwrap();
        let r = d.bulk(&mut self.bout, PID_OUT, self.cbw, 31, 16384);
        if r.halted() {
            return Err(format!("CBW halted: {:x?}", r.tokens));
        }
        Ok(())
    }

    fn recv_csw(&mut self, d: &mut Driver) -> Result<u8, String> {
        let r = d.bulk(&mut self.bin, PID_IN, self.csw, 13, 16384);
        if r.halted() {
            return Err(format!("CSW halted: {:x?}", r.tokens));
        }
        let mut s = [0u8; 13];
        d.ram.read(self.csw, &mut s).unwrap();
        if &s[0..4] != b"USBS" || s[4..8] != self.tag.to_le_bytes() {
            return Err(format!("bad CSW {s:02x?}"));
        }
        self.tag = self.tag.wrapping_add(1);
        Ok(s[12])
    }

    /// One SCSI command; the data phase one URB of 16 KiB qTDs.
    fn command(
        &mut self,
        d: &mut Driver,
        cdb: &[u8],
        data: Option<(bool, u64, u32)>,
    ) -> Result<u8, String> {
        let len = data.map_or(0, |x| x.2);
        self.send_cbw(d, cdb, len, data.is_some_and(|x| x.0))?;
        if let Some((din, buf, len)) = data {
            let (q, pid) = if din {
                (&mut self.bin, PID_IN)
            } else {
                (&mut self.bout, PID_OUT)
            };
            let r = d.bulk(q, pid, buf, len, 16384);
            let moved: u32 = r
                .tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let n = (len - 16384 * i as u32).min(16384);
                    n - ((t >> TOK_BYTES_SHIFT) & TOK_BYTES_MASK)
                })
                .sum();
            if r.halted() || (moved != len && !din) {
                return Err(format!(
                    "data phase: {moved} of {len} bytes, tokens {:x?}",
                    &r.tokens[..r.tokens.len().min(4)]
                ));
            }
        }
        self.recv_csw(d)
    }

    fn ready(&mut self, d: &mut Driver) -> Result<(), String> {
        let sense = u64::from(d.alloc(32, 64));
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
        buf: u64,
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

    /// WRITE(10)s of random data, READ(10)s back (unaligned buffers);
    /// returns the sha of everything written, from `lba` on.
    fn round_trips(
        &mut self,
        d: &mut Driver,
        seed: u64,
        lba: u32,
        sizes: &[u32],
    ) -> Result<(Vec<u8>, String), String> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut all = Vec::new();
        let mut l = lba;
        let mut log = Vec::new();
        for &len in sizes {
            let mut data = vec![0u8; len as usize];
            rng.fill_bytes(&mut data);
            let wbuf = DATA_BASE + 0x123 + u64::from(rng.next_u32() % 4096);
            d.ram.write(wbuf, &data).unwrap();
            self.rw10(d, true, l, wbuf, len)
                .map_err(|e| format!("WRITE {len} at {l}: {e}"))?;
            let rbuf = DATA_BASE + (8 << 20) + 0xffd + u64::from(rng.next_u32() % 4096);
            d.ram.write(rbuf, &vec![0xee; len as usize]).unwrap();
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

/// The hub on root port 1 as Linux's hub driver sees it.
struct HubDrv {
    ep0: Queue,
    status: Queue,
    sbuf: u64,
    /// The status change qTD in flight, if any.
    pending: Option<u32>,
}

impl HubDrv {
    fn req(&mut self, d: &mut Driver, rt: u8, req: u8, value: u16, index: u16) -> bool {
        !d.control(&mut self.ep0, setup(rt, req, value, index, 0), None)
            .1
    }

    fn port_status(&mut self, d: &mut Driver, port: u16) -> (u16, u16) {
        let v = d
            .control_in(&mut self.ep0, setup(0xa3, 0, 0, port, 4))
            .expect("GET_PORT_STATUS");
        (
            u16::from_le_bytes([v[0], v[1]]),
            u16::from_le_bytes([v[2], v[3]]),
        )
    }

    /// Queues a status change transfer (one byte: ports 1..4 + hub).
    fn arm(&mut self, d: &mut Driver) {
        if self.pending.is_some() {
            return;
        }
        d.ram.write(self.sbuf, &[0]).unwrap();
        let a = d.append(
            &mut self.status,
            &[QtdSpec {
                pid: PID_IN,
                buf: self.sbuf,
                len: 1,
                ioc: true,
                toggle: false,
            }],
        );
        self.pending = Some(a[0]);
    }

    /// Waits for the status change transfer; returns the bitmap.
    fn wait_change(&mut self, d: &mut Driver, timeout: Duration) -> Option<u8> {
        let q = self.pending?;
        let old = d.timeout;
        d.timeout = timeout;
        let done = d.run_until(|d| d.rd(q + 8) & TOK_ACTIVE == 0);
        d.timeout = old;
        if !done {
            return None;
        }
        self.pending = None;
        let mut b = [0u8; 1];
        d.ram.read(self.sbuf, &mut b).unwrap();
        Some(b[0])
    }

    /// Clears C_PORT_CONNECTION, resets the port (SET_FEATURE(RESET),
    /// C_PORT_RESET cleared); returns the port status after.
    fn reset_port(&mut self, d: &mut Driver, port: u16) -> u16 {
        assert!(self.req(d, 0x23, 1, 16, port), "clear C_PORT_CONNECTION");
        assert!(self.req(d, 0x23, 3, 4, port), "SET_FEATURE(PORT_RESET)");
        let (s, c) = self.port_status(d, port);
        assert_ne!(c & 0x10, 0, "C_PORT_RESET after reset: {s:#x} {c:#x}");
        assert!(self.req(d, 0x23, 1, 20, port), "clear C_PORT_RESET");
        s
    }
}

/// Root port 1 reset, the hub enumerated at HUB_ADDR and configured, its
/// status change endpoint on the periodic schedule, its ports powered.
fn bring_up_hub(r: &mut Results, d: &mut Driver) -> HubDrv {
    let sc = d.reset_port(1);
    assert_ne!(sc & PORT_PED, 0, "hub root port enabled: {sc:#x}");
    let mut q0 = d.make_qh(0, 0, Eps::High, 64, true, None, 0);
    d.link_async(&q0);
    let dev = d
        .control_in(&mut q0, setup(0x80, 6, 0x0100, 0, 18))
        .expect("hub device descriptor");
    assert!(
        !d.control(&mut q0, setup(0, 5, u16::from(HUB_ADDR), 0, 0), None)
            .1
    );
    d.unlink_async(&q0);
    let mut ep0 = d.make_qh(HUB_ADDR, 0, Eps::High, 64, true, None, 0);
    d.link_async(&ep0);
    assert!(!d.control(&mut ep0, setup(0, 9, 1, 0, 0), None).1);
    let hd = d
        .control_in(&mut ep0, setup(0xa0, 6, 0x2900, 0, 71))
        .expect("hub descriptor");
    let status = d.make_qh(HUB_ADDR, 1, Eps::High, 1, false, None, 0x01);
    d.link_periodic(&status, 8);
    let mut h = HubDrv {
        ep0,
        status,
        sbuf: u64::from(d.alloc(64, 64)),
        pending: None,
    };
    h.arm(d);
    let mut powered = true;
    for p in 1..=u16::from(hd[2]) {
        powered &= h.req(d, 0x23, 3, 8, p);
    }
    // A transfer parked before the power requests completes at the first
    // change (port 1 only); change bits stay set until cleared, so a
    // re-armed transfer reports every port that changed since.
    let mut bitmap = h.wait_change(d, Duration::from_secs(5));
    for _ in 0..2 {
        if bitmap.is_none_or(|b| b & 0b110 == 0b110) {
            break;
        }
        h.arm(d);
        bitmap = h.wait_change(d, Duration::from_secs(5));
    }
    let conn: Vec<u16> = (1..=u16::from(hd[2]))
        .filter(|&p| h.port_status(d, p).0 & 1 != 0)
        .collect();
    r.check(
        "hub_enumerated_ports_powered",
        dev[4] == 9 && hd[1] == 0x29 && powered && bitmap == Some(0b110) && conn == [1, 2],
        format!(
            "hub {:04x}:{:04x}, {} ports, change bitmap {bitmap:?}, connected ports {conn:?}",
            u16::from_le_bytes([dev[8], dev[9]]),
            u16::from_le_bytes([dev[10], dev[11]]),
            hd[2]
        ),
    );
    h
}

/// Unlinks `q` from every frame of the periodic schedule.
fn unlink_periodic(d: &mut Driver, q: &Queue) {
    for f in 0..1024u32 {
        let mut prev = d.frame_list + 4 * f;
        for _ in 0..8 {
            let link = d.rd(prev);
            if link & LINK_T != 0 {
                break;
            }
            if link & LINK_ADDR == q.qh {
                d.wr(prev, d.rd(q.qh));
                break;
            }
            prev = link & LINK_ADDR;
        }
    }
}

/// Links `q` at the head of every `period`-th frame.
fn relink_periodic(d: &mut Driver, q: &Queue, period: u32) {
    let first = d.rd(d.frame_list);
    d.wr(q.qh, first);
    for f in (0..1024).step_by(period as usize) {
        d.wr(d.frame_list + 4 * f, q.qh | TYPE_QH);
    }
}

struct Sticks {
    hs: Option<(Bot, HostMonitor, HostDeviceInfo, String)>,
    fs: Option<(Bot, HostMonitor, HostDeviceInfo, String)>,
}

fn stick_up(
    r: &mut Results,
    d: &mut Driver,
    name: &str,
    eps: Eps,
    hub: Option<(u8, u8)>,
    addr: u8,
) -> Result<Bot, String> {
    let e = enumerate(d, eps, hub, addr)?;
    let bcd = u16::from_le_bytes([e.dev[2], e.dev[3]]);
    let mps0 = e.dev[7];
    let mut bot = Bot::setup(d, e, eps, hub, addr)?;
    let lun = d.control_in(&mut bot.ep0, setup(0xa1, 0xfe, 0, u16::from(bot.ifno), 1));
    bot.ready(d)?;
    r.check(
        &format!("{name}_enumerated"),
        lun == Ok(vec![0]),
        format!(
            "address {addr}{}, bcdUSB {bcd:#06x}, mps0 {mps0}, GET_MAX_LUN {lun:?}, TEST UNIT READY ok",
            hub.map_or(String::new(), |(h, p)| format!(" behind hub {h} port {p}"))
        ),
    );
    Ok(bot)
}

/// A 1 MiB READ(10) on the full-speed stick cancelled mid data phase by
/// unlinking its bulk IN QH (two IAA cycles), given back as Linux does
/// (overlay deactivated, qh_refresh); then usb-storage's recovery (BOT
/// reset, clear halts) without a port reset, and the data reads back.
fn cancel_check(r: &mut Results, d: &mut Driver, bot: &mut Bot, mon: &HostMonitor, want: &[u8]) {
    let resets = mon.stats().resets;
    let len = 1u32 << 20;
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&LBA.to_be_bytes());
    cdb[7..9].copy_from_slice(&((len / BLOCK) as u16).to_be_bytes());
    if let Err(e) = bot.send_cbw(d, &cdb, len, true) {
        return r.check("fs_cancel_by_unlink", false, e);
    }
    let buf = DATA_BASE + (16 << 20);
    let specs: Vec<QtdSpec> = (0..len / 16384)
        .map(|i| QtdSpec {
            pid: PID_IN,
            buf: buf + u64::from(i * 16384),
            len: 16384,
            ioc: false,
            toggle: false,
        })
        .collect();
    let addrs = d.append(&mut bot.bin, &specs);
    // Until the URB is in the VM kernel (and a while more: data moving).
    let old = d.timeout;
    d.timeout = Duration::from_secs(5);
    let inflight = d.run_until(|_| mon.urbs_in_flight() > 0);
    d.timeout = Duration::from_millis(150);
    d.run_until(|_| false);
    d.timeout = old;
    let before = mon.urbs_in_flight();
    let first_tok = d.rd(addrs[0] + 8);
    d.unlink_async(&bot.bin);
    let cancelled = wait_until(Duration::from_secs(3), || mon.urbs_in_flight() == 0);
    let still_active = addrs.iter().all(|a| d.rd(a + 8) & TOK_ACTIVE != 0);
    // Give back: the qTDs and the overlay inactive, refreshed past them.
    for a in &addrs {
        let t = d.rd(a + 8);
        d.wr(a + 8, t & !TOK_ACTIVE);
    }
    let ov = d.rd(bot.bin.qh + 24);
    d.wr(bot.bin.qh + 24, ov & !TOK_ACTIVE);
    d.refresh(&bot.bin, true);
    d.link_async(&bot.bin);
    // Let a stray late completion show itself before the recovery.
    d.timeout = Duration::from_millis(200);
    d.run_until(|_| false);
    d.timeout = old;
    let untouched = addrs.iter().all(|a| d.rd(a + 8) & TOK_ACTIVE == 0);
    let rec = bot.reset_recovery(d).and_then(|_| bot.ready(d));
    let rbuf = DATA_BASE + (8 << 20);
    let n = want.len() as u32;
    let rd = rec.and_then(|_| bot.rw10(d, false, LBA, rbuf, n));
    let back = read_guest(d, rbuf, n);
    r.check(
        "fs_cancel_by_unlink",
        inflight
            && before > 0
            && cancelled
            && still_active
            && untouched
            && rd.is_ok()
            && back == want
            && mon.stats().resets == resets,
        format!(
            "URBs in flight {before} (first qTD token {first_tok:#x}), discarded after unlink + 2 IAA {cancelled}, \
             qTDs left active {still_active}, no late write {untouched}; recovery + READ {rd:?} sha {} vs {}; \
             host resets {resets} -> {}",
            sha(&back),
            sha(want),
            mon.stats().resets
        ),
    );
}

/// The keyboard behind the hub: SET_PROTOCOL/SET_IDLE, its interrupt IN
/// parked on the periodic schedule (split, S-mask 1, C-mask 0x1c) until a
/// key injected into the outer QEMU; then the release report; then a
/// parked transfer unlinked the way Linux's ehci_hcd unlinks an interrupt
/// URB (QH off the frame list, a few micro-frames, overlay deactivated,
/// qh_refresh, relinked), and the next key press lands in the next qTD.
fn kbd_checks(r: &mut Results, d: &mut Driver, mon: &HostMonitor, hp: u8) {
    let hub = Some((HUB_ADDR, hp));
    let e = match enumerate(d, Eps::Full, hub, KBD_ADDR) {
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
    // bInterval 10 ms at full speed: every 8th frame.
    let mut q = d.make_qh(
        KBD_ADDR,
        ep.address & 0xf,
        Eps::Full,
        u32::from(ep.max_packet),
        false,
        hub,
        0x01,
    );
    relink_periodic(d, &q, 8);
    r.check(
        "kbd_enumerated",
        !c && !p && !i,
        format!(
            "address {KBD_ADDR} behind hub {HUB_ADDR} port {hp}, mps0 {}, ep {:#x} mps {} bInterval-> period 8, \
             SET_CONFIGURATION/SET_PROTOCOL/SET_IDLE stalled {c}/{p}/{i}",
            e.dev[7], ep.address, ep.max_packet
        ),
    );
    let buf = u64::from(d.alloc(64, 64));
    let mps = u32::from(ep.max_packet);
    let spec = QtdSpec {
        pid: PID_IN,
        buf,
        len: mps,
        ioc: true,
        toggle: false,
    };
    let a = d.append(&mut q, &[spec]);
    d.timeout = Duration::from_millis(500);
    let early = d.run_until(|d| d.rd(a[0] + 8) & TOK_ACTIVE == 0);
    let parked = mon.urbs_in_flight();
    println!("PT-WAIT key");
    d.timeout = Duration::from_secs(60);
    let t0 = Instant::now();
    let got = d.run_until(|d| d.rd(a[0] + 8) & TOK_ACTIVE == 0);
    let tok = d.rd(a[0] + 8);
    let rep = read_guest(d, buf, 8);
    let usbint = d.usbsts() & STS_USBINT != 0;
    r.check(
        "kbd_report_from_injected_key",
        !early && parked == 1 && got && tok & TOK_HALTED == 0 && rep[2] == 0x04 && usbint,
        format!(
            "parked on the periodic schedule (URBs {parked}), completed after {} ms: token {tok:#x} report {rep:02x?}, USBINT {usbint}",
            t0.elapsed().as_millis()
        ),
    );
    d.w32(ehci_common::OP + OP_USBSTS, STS_USBINT);
    // The release.
    let a2 = d.append(&mut q, &[spec]);
    let got2 = d.run_until(|d| d.rd(a2[0] + 8) & TOK_ACTIVE == 0);
    let rep2 = read_guest(d, buf, 8);
    // A third, parked, then unlinked.
    let a3 = d.append(&mut q, &[spec]);
    d.timeout = Duration::from_millis(300);
    d.run_until(|_| false);
    let parked3 = mon.urbs_in_flight();
    unlink_periodic(d, &q);
    // ehci_hcd: 9 micro-frames after the unlink the QH is idle; the
    // brief's two IAA cycles on top.
    d.timeout = Duration::from_millis(5);
    d.run_until(|_| false);
    for _ in 0..2 {
        let c = d.r32(ehci_common::OP + OP_USBCMD);
        d.w32(ehci_common::OP + OP_USBCMD, c | CMD_IAAD);
        d.w32(ehci_common::OP + OP_USBSTS, STS_IAA);
    }
    // The controller runs (as the event loop would run it) until the
    // transfer of the QH no frame reaches any more is cancelled.
    d.timeout = Duration::from_secs(2);
    let released = d.run_until(|_| mon.urbs_in_flight() == 0);
    let tok3 = d.rd(a3[0] + 8);
    let ov = d.rd(q.qh + 24);
    // qh_completions on the idle QH: the overlay (our qTD) deactivated,
    // the URB given back, qh_refresh: the overlay's next is the dummy.
    d.wr(q.qh + 24, ov & !TOK_ACTIVE);
    d.refresh(&q, true);
    relink_periodic(d, &q, 8);
    let a4 = d.append(&mut q, &[spec]);
    d.ram.write(buf, &[0xaa; 8]).unwrap();
    println!("PT-WAIT key2");
    d.timeout = Duration::from_secs(60);
    let got4 = d.run_until(|d| d.rd(a4[0] + 8) & TOK_ACTIVE == 0);
    let rep4 = read_guest(d, buf, 8);
    let tok3_after = d.rd(a3[0] + 8);
    r.check(
        "kbd_release_report",
        got2 && rep2[2] == 0 && parked3 == 1,
        format!("release report {rep2:02x?}; the next transfer parked (URBs {parked3})"),
    );
    // Linux gives the unlinked URB back and frees its qTD: the controller
    // must have dropped the transfer (the URB discarded in usbfs) and must
    // not write into that qTD; the next press belongs to the next qTD.
    let given_back_untouched = tok3_after == tok3;
    r.check(
        "kbd_periodic_unlink_cancels",
        released && given_back_untouched && got4 && rep4[2] == 0x04,
        format!(
            "after the QH left the frame list, 9+ micro-frames and 2 IAA cycles: URB discarded {released}; \
             the given-back qTD {tok3:#x} -> {tok3_after:#x} (written after it was given back: {}); \
             next qTD completed {got4} with report {rep4:02x?}",
            !given_back_untouched
        ),
    );
    r.check(
        "kbd_reports_after_unlink",
        got4 && (rep4[2] == 0x04 || rep4[2] == 0) && rep4[0] == 0,
        format!("the relinked QH's next qTD completed {got4} with report {rep4:02x?}"),
    );
}

/// The full-speed stick unplugged from the outer QEMU: a hub port
/// connection change through the parked status transfer; re-plugged: the
/// change again, reset, enumerated at a new address, the data still there.
fn replug_checks(
    r: &mut Results,
    d: &mut Driver,
    h: &mut HubDrv,
    old: &Bot,
    mon: &HostMonitor,
    hp: u8,
    want: &[u8],
) -> Option<Bot> {
    h.arm(d);
    println!("PT-WAIT unplug");
    let t0 = Instant::now();
    let bm = h.wait_change(d, Duration::from_secs(60));
    let (s, c) = h.port_status(d, u16::from(hp));
    let ms = t0.elapsed().as_millis();
    // Linux drops the device's endpoints.
    for q in [&old.ep0, &old.bin, &old.bout] {
        d.unlink_async(q);
    }
    let cleared = h.req(d, 0x23, 1, 16, u16::from(hp));
    r.check(
        "fs_unplug_hub_connection_change",
        bm == Some(1 << hp) && s & 1 == 0 && c & 1 != 0 && cleared && !mon.connected(),
        format!(
            "status change bitmap {bm:?} after {ms} ms, port {hp} status {s:#06x} change {c:#06x}, backend connected {}",
            mon.connected()
        ),
    );
    h.arm(d);
    println!("PT-WAIT replug");
    let bm = h.wait_change(d, Duration::from_secs(120));
    let (s, c) = h.port_status(d, u16::from(hp));
    if bm != Some(1 << hp) || s & 1 == 0 {
        r.check(
            "fs_replug_reenumerated",
            false,
            format!(
                "bitmap {bm:?} status {s:#x} change {c:#x}, stats {:?}",
                mon.stats()
            ),
        );
        return None;
    }
    let st = h.reset_port(d, u16::from(hp));
    let res = stick_up(
        r,
        d,
        "fs_replugged",
        Eps::Full,
        Some((HUB_ADDR, hp)),
        FS_ADDR2,
    )
    .and_then(|mut b| {
        let n = want.len() as u32;
        let rbuf = DATA_BASE + (8 << 20);
        d.ram.write(rbuf, &vec![0u8; n as usize]).unwrap();
        b.rw10(d, false, LBA, rbuf, n)?;
        Ok((b, read_guest(d, rbuf, n)))
    });
    let ok = matches!(&res, Ok((_, back)) if back == want);
    r.check(
        "fs_replug_reenumerated",
        ok && st & 0x603 == 0x003 && mon.stats().attaches == 2,
        format!(
            "port status after reset {st:#06x}, {}, attaches {}, now {:?}",
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
            "{HS_SERIAL} {:?} {:?}, {FS_SERIAL} {:?} {:?}, keyboard {:?} {:?}",
            hs.as_ref().map(|i| &i.port),
            speeds.0,
            fs.as_ref().map(|i| &i.port),
            speeds.1,
            kbd.as_ref().map(|i| &i.port),
            speeds.2
        ),
    );
    let (Some(hs), Some(fs), Some(kbd)) = (hs, fs, kbd) else {
        println!("vmtest_ehci: {} passed, {} failed", r.pass, r.fail + 1);
        return;
    };
    let drivers_before = (iface_driver(&hs.port, 0), iface_driver(&fs.port, 0));
    let devs = (|| -> Result<_, String> {
        Ok((
            host(id_rule(&hs, HS_SERIAL))?,
            host(id_rule(&fs, FS_SERIAL))?,
            host(MatchRule::Port(kbd.port.clone()))?,
        ))
    })();
    let ((hs_dev, hs_mon), (fs_dev, fs_mon), (kbd_dev, kbd_mon)) = match devs {
        Ok(v) => v,
        Err(e) => {
            r.check("claimed_from_host_drivers", false, e);
            println!("vmtest_ehci: {} passed, {} failed", r.pass, r.fail);
            return;
        }
    };
    let drivers = (iface_driver(&hs.port, 0), iface_driver(&fs.port, 0));
    r.check(
        "claimed_from_host_drivers",
        drivers_before == (Some("usb-storage".into()), Some("usb-storage".into()))
            && drivers == (Some("usbfs".into()), Some("usbfs".into()))
            && hs_mon.connected()
            && fs_mon.connected()
            && kbd_mon.connected(),
        format!("sticks' drivers {drivers_before:?} -> {drivers:?}"),
    );
    let mut d = Driver::new();
    d.timeout = Duration::from_secs(20);
    let at = {
        let e = d.pci.controller_mut();
        (
            e.attach(Box::new(hs_dev)),
            e.attach(Box::new(fs_dev)),
            e.attach(Box::new(kbd_dev)),
        )
    };
    let ok = matches!(at, (Ok((2, 0)), Ok((1, 1)), Ok((1, 2))));
    r.check(
        "attach_topology",
        ok,
        format!(
            "high-speed stick {:?}, full-speed stick {:?}, keyboard {:?} (root port, hub port)",
            at.0, at.1, at.2
        ),
    );
    if !ok {
        println!("vmtest_ehci: {} passed, {} failed", r.pass, r.fail);
        return;
    }
    d.start();
    d.enable_async();
    d.enable_periodic();
    let mut sticks = Sticks { hs: None, fs: None };
    // The high-speed stick on root port 2.
    r.section("hs_stick", |r| {
        let sc = d.portsc(2);
        let sc2 = d.reset_port(2);
        let bot = stick_up(r, &mut d, "hs_stick", Eps::High, None, HS_ADDR);
        let mut bot = match bot {
            Ok(b) => b,
            Err(e) => return r.check("hs_stick_enumerated", false, e),
        };
        let zc0 = hs_mon.stats().zero_copy_urbs;
        match bot.round_trips(&mut d, 0x45, LBA, &HS_SIZES) {
            Ok((data, log)) => {
                let zc = hs_mon.stats().zero_copy_urbs - zc0;
                r.check(
                    "hs_stick_round_trips",
                    sc & PORT_CCS != 0 && sc2 & PORT_PED != 0,
                    format!(
                        "root port 2 {sc:#x} -> {sc2:#x} after reset; written and read back (size:sha) {log}; \
                         zero-copy URBs {zc}"
                    ),
                );
                sticks.hs = Some((bot, hs_mon.clone(), hs.clone(), sha(&data)));
                // Keep the data for the host's check after release.
                let _ = data;
            }
            Err(e) => r.check("hs_stick_round_trips", false, e),
        }
    });
    // The hub and, behind it, the full-speed stick and the keyboard.
    let mut hubdrv = r.section("hub", |r| bring_up_hub(r, &mut d));
    let mut fs_data = Vec::new();
    if let Some(h) = hubdrv.as_mut() {
        r.section("fs_stick", |r| {
            let st = h.reset_port(&mut d, 1);
            let bot = stick_up(r, &mut d, "fs_stick", Eps::Full, Some((HUB_ADDR, 1)), FS_ADDR);
            let mut bot = match bot {
                Ok(b) => b,
                Err(e) => return r.check("fs_stick_enumerated", false, e),
            };
            match bot.round_trips(&mut d, 0x46, LBA, &FS_SIZES) {
                Ok((data, log)) => {
                    r.check(
                        "fs_stick_split_round_trips",
                        st & 0x603 == 0x003,
                        format!(
                            "hub port 1 status {st:#06x} (enabled, full speed); written and read back (size:sha) {log}"
                        ),
                    );
                    fs_data = data;
                    sticks.fs = Some((bot, fs_mon.clone(), fs.clone(), String::new()));
                }
                Err(e) => r.check("fs_stick_split_round_trips", false, e),
            }
        });
        r.section("kbd", |r| {
            h.reset_port(&mut d, 2);
            kbd_checks(r, &mut d, &kbd_mon, 2)
        });
    }
    let fs_head: Vec<u8> = fs_data.clone();
    if let Some((bot, mon, _, _)) = sticks.fs.as_mut() {
        r.section("fs_cancel", |r| cancel_check(r, &mut d, bot, mon, &fs_head));
    }
    if let (Some(h), Some((bot, mon, _, _))) = (hubdrv.as_mut(), sticks.fs.as_ref()) {
        let mon = mon.clone();
        let nb = r
            .section("fs_replug", |r| {
                replug_checks(r, &mut d, h, bot, &mon, 1, &fs_head)
            })
            .flatten();
        if let Some(b) = nb {
            sticks.fs.as_mut().unwrap().0 = b;
        }
    }
    println!(
        "METRIC ehci_stats {:?} transfers in flight {}",
        d.pci.controller().stats(),
        d.pci.controller().transfers_in_flight()
    );
    // Release: the VM kernel's usb-storage binds again and reads what we
    // wrote through our EHCI, on both sticks.
    drop(d);
    let checks = [
        (
            "hs_host_reads_guest_data",
            HS_SERIAL,
            sticks.hs.as_ref().map(|s| s.3.clone()),
        ),
        (
            "fs_host_reads_guest_data",
            FS_SERIAL,
            (!fs_data.is_empty()).then(|| sha(&fs_data)),
        ),
    ];
    for (name, serial, want) in checks {
        let Some(want) = want else { continue };
        let len = if serial == HS_SERIAL {
            HS_SIZES.iter().sum::<u32>()
        } else {
            FS_SIZES.iter().sum::<u32>()
        } as usize;
        host_reads(&mut r, name, serial, LBA, len, &want);
    }
    println!("vmtest_ehci: {} passed, {} failed", r.pass, r.fail);
}
