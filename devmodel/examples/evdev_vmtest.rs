//! The evdev input sources against a real kernel's evdev and uinput: run
//! inside the passthrough test VM (`tests/passthrough/run.sh evdev`, as
//! root, `uinput` loaded). A uinput keyboard (with LEDs) and a uinput
//! tablet are the host's input devices; our emulated keyboard and tablet
//! (`kind = "keyboard"`/`"tablet"` with `evdev = ...`) read them and sit on
//! our xHCI, which the in-process guest driver (hcd-emul's test harness)
//! drives as a guest would: enumeration, SET_CONFIGURATION, interrupt IN
//! reports, SET_REPORT for the LEDs.
//!
//! Checks: key events arrive as the exact boot reports, in order; the node
//! is grabbed (another reader sees nothing); a tablet position is scaled
//! from the device's range; the guest's LEDs reach the uinput device as
//! EV_LED events; ctrl-ctrl hands the keyboard to the host (the guest gets
//! its keys released and then nothing, the other reader gets the events)
//! and back; the keyboard unplugged and plugged in again (a new uinput
//! device behind the same link) is picked up again. Prints RESULT lines.

#[path = "../../hcd-emul/tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Driver;
use devmodel::evdev_source::{EvdevOptions, EvdevSource, Toggle};
use hcd_emul::hid::{HidDevice, Kind, ABS_MAX};
use hcd_emul::usb::Speed;
use hcd_emul::xhci::context::ep_type;
use hcd_emul::xhci::trb::cc;

/// A raw uinput device (the evdev crate's builder has no LEDs).
struct Uinput {
    fd: OwnedFd,
    node: PathBuf,
}

// uinput.h: _IO/_IOW('U', n, ...).
const UI_DEV_CREATE: libc::c_ulong = 0x5501;
const UI_DEV_DESTROY: libc::c_ulong = 0x5502;
const UI_DEV_SETUP: libc::c_ulong = 0x405c_5503; // struct uinput_setup, 92 bytes
const UI_ABS_SETUP: libc::c_ulong = 0x401c_5504; // struct uinput_abs_setup, 28 bytes
const UI_SET_EVBIT: libc::c_ulong = 0x4004_5564;
const UI_SET_KEYBIT: libc::c_ulong = 0x4004_5565;
const UI_SET_ABSBIT: libc::c_ulong = 0x4004_5567;
const UI_SET_LEDBIT: libc::c_ulong = 0x4004_5569;
const fn ui_get_sysname(len: libc::c_ulong) -> libc::c_ulong {
    0x8000_0000 | (len << 16) | 0x552c
}

const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_ABS: u16 = 3;
const EV_LED: u16 = 0x11;
const KEY_A: u16 = 30;
const KEY_B: u16 = 48;
const KEY_LEFTSHIFT: u16 = 42;
const KEY_LEFTCTRL: u16 = 29;
const KEY_RIGHTCTRL: u16 = 97;
const BTN_LEFT: u16 = 0x110;
const ABS_RANGE: i32 = 4095;

impl Uinput {
    fn ioctl(&self, req: libc::c_ulong, arg: libc::c_ulong) {
        // SAFETY: a uinput ioctl taking an int or nothing, on our fd.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, arg) };
        assert!(
            r >= 0,
            "ioctl {req:#x}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// A keyboard (a few keys, LEDs) or, with `abs`, a tablet.
    fn create(name: &str, abs: bool) -> Uinput {
        let path = CString::new("/dev/uinput").unwrap();
        // SAFETY: a NUL-terminated path; the fd is owned at once.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
        assert!(raw >= 0, "/dev/uinput: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut u = Uinput {
            fd,
            node: PathBuf::new(),
        };
        u.ioctl(UI_SET_EVBIT, EV_KEY.into());
        if abs {
            u.ioctl(UI_SET_KEYBIT, BTN_LEFT.into());
            u.ioctl(UI_SET_EVBIT, EV_ABS.into());
            for axis in [0u16, 1] {
                u.ioctl(UI_SET_ABSBIT, axis.into());
                // struct uinput_abs_setup { u16 code; (pad) ; input_absinfo
                // { value, minimum, maximum, fuzz, flat, resolution } }
                let mut s = [0u8; 28];
                s[0..2].copy_from_slice(&axis.to_le_bytes());
                s[12..16].copy_from_slice(&ABS_RANGE.to_le_bytes());
                // SAFETY: a 28-byte struct uinput_abs_setup for the call.
                let r = unsafe { libc::ioctl(u.fd.as_raw_fd(), UI_ABS_SETUP, s.as_ptr()) };
                assert!(r >= 0, "UI_ABS_SETUP: {}", std::io::Error::last_os_error());
            }
        } else {
            for k in [KEY_A, KEY_B, KEY_LEFTSHIFT, KEY_LEFTCTRL, KEY_RIGHTCTRL] {
                u.ioctl(UI_SET_KEYBIT, k.into());
            }
            u.ioctl(UI_SET_EVBIT, EV_LED.into());
            for led in 0..3u16 {
                u.ioctl(UI_SET_LEDBIT, led.into());
            }
        }
        // struct uinput_setup { input_id { bustype, vendor, product,
        // version }; char name[80]; u32 ff_effects_max }
        let mut s = [0u8; 92];
        s[0..2].copy_from_slice(&3u16.to_le_bytes()); // BUS_USB
        s[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
        s[4..6].copy_from_slice(&0x5678u16.to_le_bytes());
        s[8..8 + name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: a 92-byte struct uinput_setup for the call.
        let r = unsafe { libc::ioctl(u.fd.as_raw_fd(), UI_DEV_SETUP, s.as_ptr()) };
        assert!(r >= 0, "UI_DEV_SETUP: {}", std::io::Error::last_os_error());
        u.ioctl(UI_DEV_CREATE, 0);
        let mut sys = [0u8; 64];
        // SAFETY: a 64-byte buffer for the sysfs name.
        let r = unsafe { libc::ioctl(u.fd.as_raw_fd(), ui_get_sysname(64), sys.as_mut_ptr()) };
        assert!(
            r >= 0,
            "UI_GET_SYSNAME: {}",
            std::io::Error::last_os_error()
        );
        let sys = String::from_utf8_lossy(&sys[..sys.iter().position(|&b| b == 0).unwrap_or(0)])
            .to_string();
        let dir = Path::new("/sys/devices/virtual/input").join(&sys);
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let ev = std::fs::read_dir(&dir).ok().and_then(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .find(|n| n.starts_with("event"))
            });
            if let Some(ev) = ev {
                let node = Path::new("/dev/input").join(ev);
                if node.exists() {
                    u.node = node;
                    break;
                }
            }
            assert!(
                Instant::now() < end,
                "no event node under {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        u
    }

    fn emit(&self, ty: u16, code: u16, value: i32) {
        let mut ev = [0u8; 24];
        ev[16..18].copy_from_slice(&ty.to_le_bytes());
        ev[18..20].copy_from_slice(&code.to_le_bytes());
        ev[20..24].copy_from_slice(&value.to_le_bytes());
        // SAFETY: writes 24 bytes from our buffer.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), ev.as_ptr().cast(), 24) };
        assert_eq!(n, 24, "uinput write: {}", std::io::Error::last_os_error());
    }

    fn key(&self, code: u16, down: bool) {
        self.emit(EV_KEY, code, i32::from(down));
        self.emit(EV_SYN, 0, 0);
    }

    /// The (type, code, value) events written to the device (EV_LED from
    /// the source), waiting up to `t` for the first.
    fn read(&self, t: Duration) -> Vec<(u16, u16, i32)> {
        let end = Instant::now() + t;
        let mut out = Vec::new();
        loop {
            let mut ev = [0u8; 24];
            // SAFETY: reads at most 24 bytes into our buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), ev.as_mut_ptr().cast(), 24) };
            if n == 24 {
                out.push((
                    u16::from_le_bytes([ev[16], ev[17]]),
                    u16::from_le_bytes([ev[18], ev[19]]),
                    i32::from_le_bytes([ev[20], ev[21], ev[22], ev[23]]),
                ));
                continue;
            }
            if !out.is_empty() || Instant::now() >= end {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Uinput {
    fn drop(&mut self) {
        // SAFETY: UI_DEV_DESTROY takes no argument.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), UI_DEV_DESTROY, 0) };
    }
}

#[path = "common/results.rs"]
mod results;
use results::Results;

/// An interrupt IN pipe of an enumerated HID device: reports one at a
/// time, one TD outstanding.
struct Pipe {
    slot: usize,
    dci: usize,
    buf: u64,
    len: u32,
    queued: bool,
}

impl Pipe {
    fn report(&mut self, d: &mut Driver, t: Duration) -> Option<Vec<u8>> {
        if !self.queued {
            d.queue(
                self.slot,
                self.dci,
                &Driver::normal_trbs(&[(self.buf, self.len)], true),
            );
            self.queued = true;
        }
        let keep = d.timeout;
        d.timeout = t;
        let c = d.next_transfer(self.slot, self.dci);
        d.timeout = keep;
        let c = c?;
        self.queued = false;
        let n = (self.len - c.residue) as usize;
        let mut v = vec![0u8; n];
        d.ram.read(self.buf, &mut v).unwrap();
        Some(v)
    }

    /// Reports until none comes for `quiet`.
    fn drain(&mut self, d: &mut Driver, quiet: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(r) = self.report(d, quiet) {
            out.push(r);
            if out.len() > 64 {
                break;
            }
        }
        out
    }
}

/// Address, configure, boot protocol: the device's interrupt IN pipe.
fn enumerate(d: &mut Driver, port: usize) -> Pipe {
    let slot = d.address(port);
    let _dev = d.get_descriptor(slot, 1, 0, 18);
    let head = d.get_descriptor(slot, 2, 0, 9);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let cfg = d.get_descriptor(slot, 2, 0, total);
    // The interrupt IN endpoint descriptor.
    let mut i = 0;
    let mut ep = None;
    while i + 1 < cfg.len() {
        let (l, t) = (cfg[i] as usize, cfg[i + 1]);
        if l == 0 {
            break;
        }
        if t == 5 && cfg[i + 2] & 0x80 != 0 && cfg[i + 3] & 3 == 3 {
            ep = Some((cfg[i + 2], u16::from_le_bytes([cfg[i + 4], cfg[i + 5]])));
        }
        i += l;
    }
    let (addr, mps) = ep.expect("an interrupt IN endpoint");
    assert_eq!(
        d.control_out(slot, [0, 9, cfg[5], 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS
    );
    let dci = 2 * usize::from(addr & 0xf) + 1;
    assert_eq!(
        d.configure(slot, &[(dci, ep_type::INTERRUPT_IN, u32::from(mps), 0)]),
        cc::SUCCESS
    );
    let buf = d.alloc(64, 64);
    Pipe {
        slot,
        dci,
        buf,
        len: u32::from(mps).min(64),
        queued: false,
    }
}

fn link(target: &Path, at: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).unwrap();
}

fn main() {
    let mut r = Results { failed: 0 };
    let quiet = Duration::from_millis(400);
    let run = Path::new("/run");
    let kbd_link = run.join("xtb-kbd");
    let tab_link = run.join("xtb-tab");
    let kbd_dev = Uinput::create("xtb evdev keyboard", false);
    let tab_dev = Uinput::create("xtb evdev tablet", true);
    link(&kbd_dev.node, &kbd_link);
    link(&tab_dev.node, &tab_link);
    let (kbd, kin) = HidDevice::with_kind(Kind::Keyboard, Speed::High).unwrap();
    let (tab, tin) = HidDevice::with_kind(Kind::Tablet, Speed::High).unwrap();
    let opts = |path: &Path| EvdevOptions {
        path: path.to_owned(),
        grab: true,
        toggle: Toggle::CtrlCtrl,
    };
    let _ks = EvdevSource::start(opts(&kbd_link), kin.clone()).unwrap();
    let _ts = EvdevSource::start(opts(&tab_link), tin.clone()).unwrap();
    let mut d = Driver::new();
    let kp = d.pci.controller_mut().attach(Box::new(kbd)).unwrap();
    let tp = d.pci.controller_mut().attach(Box::new(tab)).unwrap();
    d.start();
    let mut kpipe = enumerate(&mut d, kp);
    let mut tpipe = enumerate(&mut d, tp);
    // Another reader of the keyboard's node (the host's desktop).
    let mut other = evdev::Device::open(&kbd_dev.node).unwrap();
    other.set_nonblocking(true).unwrap();
    let other_keys = |o: &mut evdev::Device| -> Vec<(u16, i32)> {
        std::thread::sleep(Duration::from_millis(300));
        match o.fetch_events() {
            Ok(it) => it
                .filter(|e| e.event_type().0 == EV_KEY)
                .map(|e| (e.code(), e.value()))
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    // The sources open and grab within a moment.
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        kbd_dev.key(KEY_B, true);
        kbd_dev.key(KEY_B, false);
        if !kpipe.drain(&mut d, Duration::from_millis(200)).is_empty() {
            break;
        }
    }
    let _ = other_keys(&mut other);

    // Keys: a, shift+b.
    kbd_dev.key(KEY_A, true);
    kbd_dev.key(KEY_A, false);
    kbd_dev.key(KEY_LEFTSHIFT, true);
    kbd_dev.key(KEY_B, true);
    kbd_dev.key(KEY_B, false);
    kbd_dev.key(KEY_LEFTSHIFT, false);
    let got: Vec<Vec<u8>> = kpipe
        .drain(&mut d, quiet)
        .into_iter()
        .map(|v| v[..3.min(v.len())].to_vec())
        .collect();
    let want: Vec<Vec<u8>> = [
        [0, 0, 4],
        [0, 0, 0],
        [2, 0, 0],
        [2, 0, 5],
        [2, 0, 0],
        [0, 0, 0],
    ]
    .iter()
    .map(|a| a.to_vec())
    .collect();
    r.check("evdev_keys_exact", got == want, format!("{got:?}"));
    let seen = other_keys(&mut other);
    r.check(
        "evdev_grabbed",
        seen.is_empty(),
        format!("the other reader saw {seen:?}"),
    );

    // Tablet: a position in the device's 0..4095, the button.
    tab_dev.emit(EV_ABS, 0, 4095);
    tab_dev.emit(EV_ABS, 1, 1024);
    tab_dev.emit(EV_KEY, BTN_LEFT, 1);
    tab_dev.emit(EV_SYN, 0, 0);
    let reps = tpipe.drain(&mut d, quiet);
    let last = reps.last().cloned().unwrap_or_default();
    let xy = |v: &[u8]| {
        (v.len() >= 5).then(|| {
            (
                v[0],
                i32::from(u16::from_le_bytes([v[1], v[2]])),
                i32::from(u16::from_le_bytes([v[3], v[4]])),
            )
        })
    };
    let want_y = 1024 * ABS_MAX / ABS_RANGE;
    r.check(
        "evdev_tablet_scaled",
        xy(&last) == Some((1, ABS_MAX, want_y)),
        format!("reports {reps:?}, want buttons 1 x {ABS_MAX} y {want_y}"),
    );

    // LEDs: the guest sets caps lock (SET_REPORT, output report).
    let _ = kbd_dev.read(Duration::from_millis(300)); // the initial state
    let code = d.control_out(kpipe.slot, [0x21, 0x09, 0, 2, 0, 0, 1, 0], &[0x02]);
    let leds = kbd_dev.read(Duration::from_secs(3));
    // (The kernel passes on changes only: caps lock on, nothing of the
    // LEDs that stay off.)
    let caps = leds.iter().any(|&(t, c, v)| (t, c, v) == (EV_LED, 1, 1));
    let others = leds
        .iter()
        .any(|&(t, c, v)| t == EV_LED && c != 1 && v != 0);
    r.check(
        "evdev_leds_to_host",
        code == cc::SUCCESS && caps && !others,
        format!("SET_REPORT {code}, the uinput device got {leds:?}"),
    );

    // ctrl-ctrl: to the host. The guest sees left ctrl go down, then
    // released at the toggle; then nothing; the other reader gets keys.
    kbd_dev.key(KEY_LEFTCTRL, true);
    kbd_dev.key(KEY_RIGHTCTRL, true);
    kbd_dev.key(KEY_RIGHTCTRL, false);
    kbd_dev.key(KEY_LEFTCTRL, false);
    let at_toggle: Vec<Vec<u8>> = kpipe
        .drain(&mut d, quiet)
        .into_iter()
        .map(|v| v[..3.min(v.len())].to_vec())
        .collect();
    let _ = other_keys(&mut other);
    kbd_dev.key(KEY_A, true);
    kbd_dev.key(KEY_A, false);
    let to_guest = kpipe.drain(&mut d, quiet);
    let seen = other_keys(&mut other);
    r.check(
        "evdev_toggle_to_host",
        at_toggle.last() == Some(&vec![0, 0, 0])
            && to_guest.is_empty()
            && seen == [(KEY_A, 1), (KEY_A, 0)],
        format!("at the toggle {at_toggle:?}; then the guest got {to_guest:?}, the host {seen:?}"),
    );
    // And back.
    kbd_dev.key(KEY_LEFTCTRL, true);
    kbd_dev.key(KEY_RIGHTCTRL, true);
    kbd_dev.key(KEY_RIGHTCTRL, false);
    kbd_dev.key(KEY_LEFTCTRL, false);
    let _ = kpipe.drain(&mut d, quiet);
    let _ = other_keys(&mut other);
    kbd_dev.key(KEY_B, true);
    kbd_dev.key(KEY_B, false);
    let back: Vec<Vec<u8>> = kpipe
        .drain(&mut d, quiet)
        .into_iter()
        .map(|v| v[..3.min(v.len())].to_vec())
        .collect();
    let seen = other_keys(&mut other);
    r.check(
        "evdev_toggle_to_guest",
        back == [vec![0, 0, 5], vec![0, 0, 0]] && seen.is_empty(),
        format!("the guest got {back:?}, the host {seen:?}"),
    );

    // Unplugged and plugged in again (a new device behind the link).
    drop(other);
    drop(kbd_dev);
    std::thread::sleep(Duration::from_millis(500));
    let kbd2 = Uinput::create("xtb evdev keyboard 2", false);
    link(&kbd2.node, &kbd_link);
    let end = Instant::now() + Duration::from_secs(10);
    let mut again = Vec::new();
    while Instant::now() < end && again.is_empty() {
        kbd2.key(KEY_A, true);
        kbd2.key(KEY_A, false);
        again = kpipe.drain(&mut d, Duration::from_millis(300));
    }
    r.check(
        "evdev_replugged",
        again.iter().any(|v| v.get(2) == Some(&4)),
        format!("reports after re-plugging: {again:?}"),
    );
    let _ = tin;
    println!("EVDEV-DONE failed={}", r.failed);
}
