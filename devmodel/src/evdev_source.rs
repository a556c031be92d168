//! Host input devices as the source of an emulated HID device
//! (`evdev = "/dev/input/..."` on a `[[device]]` of kind keyboard, mouse or
//! tablet), as QEMU's input-linux: a thread reads the evdev node and feeds
//! the device's [`InputHandle`].
//!
//! - `grab = true` (the default) takes the node exclusively (EVIOCGRAB):
//!   the host's own desktop sees nothing while the guest has it. The
//!   `grab_toggle` combination (QEMU's names: `ctrl-ctrl`, the default,
//!   `alt-alt`, `shift-shift`, `meta-meta`, `scrolllock`,
//!   `ctrl-scrolllock`) hands the device to the host and back: released,
//!   every key the guest holds goes up first, so no key stays stuck there.
//! - A keyboard's LEDs set by the guest (SET_REPORT) go back to the evdev
//!   device as EV_LED events.
//! - A node that goes away (unplugged) is looked for again every second
//!   and picked up when it is back (a `/dev/input/by-id/...` link names the
//!   same device again); the guest's held keys and buttons are released
//!   when it goes.
//!
//! Translation: Linux key codes to HID keyboard usages (the table below,
//! the inverse of the kernel's `hid_keyboard` map for the keys a PC
//! keyboard has), BTN_LEFT/RIGHT/MIDDLE to buttons, REL_X/Y and REL_WHEEL
//! to a mouse's motion and wheel, ABS_X/Y scaled from the device's range
//! to 0..=[`ABS_MAX`] for a tablet. Key repeats (value 2) are dropped: the
//! guest repeats by itself. What the emulated device cannot carry is
//! ignored.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hcd_emul::hid::{Axis, Button, InputHandle, Kind, ABS_MAX};
use hcd_emul::{guest_info, guest_warn};

/// Linux input event types and codes used here (input-event-codes.h).
mod code {
    pub const EV_SYN: u16 = 0x00;
    pub const EV_KEY: u16 = 0x01;
    pub const EV_REL: u16 = 0x02;
    pub const EV_ABS: u16 = 0x03;
    pub const EV_LED: u16 = 0x11;
    pub const REL_X: u16 = 0x00;
    pub const REL_Y: u16 = 0x01;
    pub const REL_WHEEL: u16 = 0x08;
    pub const ABS_X: u16 = 0x00;
    pub const ABS_Y: u16 = 0x01;
    pub const BTN_LEFT: u16 = 0x110;
    pub const BTN_RIGHT: u16 = 0x111;
    pub const BTN_MIDDLE: u16 = 0x112;
    pub const BTN_TOUCH: u16 = 0x14a;
    pub const KEY_LEFTCTRL: u16 = 29;
    pub const KEY_RIGHTCTRL: u16 = 97;
    pub const KEY_LEFTSHIFT: u16 = 42;
    pub const KEY_RIGHTSHIFT: u16 = 54;
    pub const KEY_LEFTALT: u16 = 56;
    pub const KEY_RIGHTALT: u16 = 100;
    pub const KEY_LEFTMETA: u16 = 125;
    pub const KEY_RIGHTMETA: u16 = 126;
    pub const KEY_SCROLLLOCK: u16 = 70;
}

/// The HID keyboard usage of Linux key code `k`, if a boot keyboard has it.
pub fn hid_usage(k: u16) -> Option<u8> {
    // Linux codes 1..=88 in order (0: none).
    const LOW: [u8; 89] = [
        0, 0x29, // esc
        0x1e, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, // 1..0
        0x2d, 0x2e, 0x2a, 0x2b, // minus equal backspace tab
        0x14, 0x1a, 0x08, 0x15, 0x17, 0x1c, 0x18, 0x0c, 0x12, 0x13, // q..p
        0x2f, 0x30, 0x28, 0xe0, // [ ] enter leftctrl
        0x04, 0x16, 0x07, 0x09, 0x0a, 0x0b, 0x0d, 0x0e, 0x0f, // a..l
        0x33, 0x34, 0x35, 0xe1, 0x31, // ; ' ` leftshift backslash
        0x1d, 0x1b, 0x06, 0x19, 0x05, 0x11, 0x10, // z..m
        0x36, 0x37, 0x38, 0xe5, 0x55, 0xe2, 0x2c, 0x39, // , . / rshift kp* lalt space caps
        0x3a, 0x3b, 0x3c, 0x3d, 0x3e, 0x3f, 0x40, 0x41, 0x42, 0x43, // f1..f10
        0x53, 0x47, // numlock scrolllock
        0x5f, 0x60, 0x61, 0x56, // kp7 kp8 kp9 kp-
        0x5c, 0x5d, 0x5e, 0x57, // kp4 kp5 kp6 kp+
        0x59, 0x5a, 0x5b, 0x62, 0x63, // kp1 kp2 kp3 kp0 kp.
        0, 0, // 84 (unused), 85 zenkakuhankaku
        0x64, 0x44, 0x45, // 102nd f11 f12
    ];
    let u = match k {
        0..=88 => LOW[usize::from(k)],
        96 => 0x58,                          // kp enter
        97 => 0xe4,                          // right ctrl
        98 => 0x54,                          // kp /
        99 => 0x46,                          // sysrq / print screen
        100 => 0xe6,                         // right alt
        102 => 0x4a,                         // home
        103 => 0x52,                         // up
        104 => 0x4b,                         // page up
        105 => 0x50,                         // left
        106 => 0x4f,                         // right
        107 => 0x4d,                         // end
        108 => 0x51,                         // down
        109 => 0x4e,                         // page down
        110 => 0x49,                         // insert
        111 => 0x4c,                         // delete
        113 => 0x7f,                         // mute
        114 => 0x81,                         // volume down
        115 => 0x80,                         // volume up
        116 => 0x66,                         // power
        117 => 0x67,                         // kp =
        119 => 0x48,                         // pause
        121 => 0x85,                         // kp ,
        125 => 0xe3,                         // left meta
        126 => 0xe7,                         // right meta
        127 => 0x65,                         // compose (application)
        183..=194 => 0x68 + (k - 183) as u8, // f13..f24
        _ => 0,
    };
    (u != 0).then_some(u)
}

/// What the host hands the device over with (QEMU input-linux's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toggle {
    /// Both control keys.
    CtrlCtrl,
    /// Both alt keys.
    AltAlt,
    /// Both shift keys.
    ShiftShift,
    /// Both meta keys.
    MetaMeta,
    /// Scroll lock.
    ScrollLock,
    /// A control key and scroll lock.
    CtrlScrollLock,
}

impl Toggle {
    /// The names `grab_toggle` takes.
    pub const NAMES: &'static [&'static str] = &[
        "ctrl-ctrl",
        "alt-alt",
        "shift-shift",
        "meta-meta",
        "scrolllock",
        "ctrl-scrolllock",
    ];

    /// From its name.
    pub fn parse(s: &str) -> Option<Toggle> {
        Some(match s {
            "ctrl-ctrl" => Toggle::CtrlCtrl,
            "alt-alt" => Toggle::AltAlt,
            "shift-shift" => Toggle::ShiftShift,
            "meta-meta" => Toggle::MetaMeta,
            "scrolllock" => Toggle::ScrollLock,
            "ctrl-scrolllock" => Toggle::CtrlScrollLock,
            _ => return None,
        })
    }

    /// Whether the keys down (`down(code)`) make the combination.
    fn made(self, down: impl Fn(u16) -> bool) -> bool {
        use code::*;
        match self {
            Toggle::CtrlCtrl => down(KEY_LEFTCTRL) && down(KEY_RIGHTCTRL),
            Toggle::AltAlt => down(KEY_LEFTALT) && down(KEY_RIGHTALT),
            Toggle::ShiftShift => down(KEY_LEFTSHIFT) && down(KEY_RIGHTSHIFT),
            Toggle::MetaMeta => down(KEY_LEFTMETA) && down(KEY_RIGHTMETA),
            Toggle::ScrollLock => down(KEY_SCROLLLOCK),
            Toggle::CtrlScrollLock => {
                (down(KEY_LEFTCTRL) || down(KEY_RIGHTCTRL)) && down(KEY_SCROLLLOCK)
            }
        }
    }
}

/// Where an evdev source reads and how.
#[derive(Debug, Clone)]
pub struct EvdevOptions {
    /// The evdev node (a `/dev/input/by-id/...` link survives re-plugging).
    pub path: PathBuf,
    /// Take the node exclusively while the guest has it.
    pub grab: bool,
    /// The combination that hands the device between host and guest.
    pub toggle: Toggle,
}

/// What one evdev event does to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A keyboard usage down or up.
    Key(u8, bool),
    /// A button down or up.
    Button(Button, bool),
    /// Relative motion.
    Rel(Axis, i32),
    /// Wheel steps (positive: up).
    Wheel(i32),
    /// An absolute position, already scaled to 0..=[`ABS_MAX`].
    Abs(Axis, i32),
}

/// An axis's range on the host device (min, max).
pub type Range = (i32, i32);

/// What `(ty, code, value)` does on a `kind` device whose ABS_X/ABS_Y
/// ranges are `ranges`.
pub fn translate(kind: Kind, ranges: [Range; 2], ty: u16, code: u16, value: i32) -> Option<Action> {
    use code::*;
    let button = |b| (kind != Kind::Keyboard).then_some(Action::Button(b, value != 0));
    match (ty, code) {
        (EV_KEY, _) if value == 2 => None,
        (EV_KEY, BTN_LEFT) | (EV_KEY, BTN_TOUCH) => button(Button::Left),
        (EV_KEY, BTN_RIGHT) => button(Button::Right),
        (EV_KEY, BTN_MIDDLE) => button(Button::Middle),
        (EV_KEY, k) if kind == Kind::Keyboard => hid_usage(k).map(|u| Action::Key(u, value != 0)),
        (EV_REL, REL_X) if kind == Kind::Mouse => Some(Action::Rel(Axis::X, value)),
        (EV_REL, REL_Y) if kind == Kind::Mouse => Some(Action::Rel(Axis::Y, value)),
        (EV_REL, REL_WHEEL) if kind != Kind::Keyboard => Some(Action::Wheel(value)),
        (EV_ABS, ABS_X | ABS_Y) if kind == Kind::Tablet => {
            let (axis, (lo, hi)) = if code == ABS_X {
                (Axis::X, ranges[0])
            } else {
                (Axis::Y, ranges[1])
            };
            if hi <= lo {
                return None;
            }
            let v = i64::from(value.clamp(lo, hi) - lo) * i64::from(ABS_MAX)
                / (i64::from(hi) - i64::from(lo));
            Some(Action::Abs(axis, v as i32))
        }
        _ => None,
    }
}

/// Applies `a` to `input`.
fn apply(input: &InputHandle, a: Action) {
    let ok = match a {
        Action::Key(u, down) => input.key(u, down),
        Action::Button(b, down) => input.button(b, down),
        Action::Rel(axis, v) => {
            input.rel(axis, v);
            true
        }
        Action::Wheel(n) => {
            let b = if n > 0 {
                Button::WheelUp
            } else {
                Button::WheelDown
            };
            for _ in 0..n.unsigned_abs().min(16) {
                input.button(b, true);
            }
            true
        }
        Action::Abs(axis, v) => {
            input.abs(axis, v);
            true
        }
    };
    if !ok {
        guest_info!(target: "evdev", "evdev: the guest is not reading its input device: an event dropped");
    }
}

/// A running evdev source; dropping it stops the thread (and releases the
/// grab).
#[derive(Debug)]
pub struct EvdevSource {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EvdevSource {
    /// Starts reading `opts.path` into `input` (the node need not exist
    /// yet).
    pub fn start(opts: EvdevOptions, input: InputHandle) -> io::Result<EvdevSource> {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("evdev".into())
            .spawn(move || run(&opts, &input, &st))?;
        Ok(EvdevSource {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EvdevSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(opts: &EvdevOptions, input: &InputHandle, stop: &AtomicBool) {
    let mut missing_logged = false;
    while !stop.load(Ordering::Relaxed) {
        match evdev::Device::open(&opts.path) {
            Ok(dev) => {
                missing_logged = false;
                guest_info!(target: "evdev", "evdev: {}: opened ({})", opts.path.display(), dev.name().unwrap_or("?"));
                serve(dev, opts, input, stop);
            }
            Err(e) if !missing_logged => {
                missing_logged = true;
                guest_info!(target: "evdev", "evdev: {}: {e}; looking again every second", opts.path.display());
            }
            Err(_) => {}
        }
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Serves one opened node until it goes away or `stop`.
fn serve(mut dev: evdev::Device, opts: &EvdevOptions, input: &InputHandle, stop: &AtomicBool) {
    let kind = input.kind();
    let range = |c: u16| -> Range {
        dev.get_abs_state()
            .ok()
            .and_then(|s| s.get(usize::from(c)).copied())
            .map_or((0, 0), |a| (a.minimum, a.maximum))
    };
    let ranges = [range(code::ABS_X), range(code::ABS_Y)];
    if let Err(e) = dev.set_nonblocking(true) {
        guest_warn!(target: "evdev", "evdev: {}: {e}", opts.path.display());
        return;
    }
    let mut to_guest = true;
    if opts.grab {
        if let Err(e) = dev.grab() {
            guest_warn!(target: "evdev", "evdev: {}: cannot grab: {e}", opts.path.display());
        }
    }
    // Keys down on the host device (by Linux code, for the toggle), and
    // what the guest was told is down (to release it).
    let mut host_down: Vec<u16> = Vec::new();
    let mut guest_keys: Vec<u8> = Vec::new();
    let mut guest_buttons: Vec<Button> = Vec::new();
    let mut toggle_armed = true;
    let mut leds = None;
    let release = |keys: &mut Vec<u8>, buttons: &mut Vec<Button>| {
        for k in keys.drain(..) {
            input.key(k, false);
        }
        for b in buttons.drain(..) {
            input.button(b, false);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        // The guest's LEDs back to a keyboard.
        if kind == Kind::Keyboard {
            let now = input.leds();
            if leds != Some(now) {
                let mut evs: Vec<evdev::InputEvent> = (0..5u16)
                    .map(|i| evdev::InputEvent::new(code::EV_LED, i, i32::from(now >> i & 1)))
                    .collect();
                evs.push(evdev::InputEvent::new(code::EV_SYN, 0, 0));
                if dev.send_events(&evs).is_ok() {
                    leds = Some(now);
                }
            }
        }
        if !crate::control::readable(dev.as_raw_fd(), 100) {
            continue;
        }
        let events: Vec<evdev::InputEvent> = match dev.fetch_events() {
            Ok(it) => it.collect(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                guest_info!(target: "evdev", "evdev: {}: gone ({e})", opts.path.display());
                release(&mut guest_keys, &mut guest_buttons);
                return;
            }
        };
        for ev in events {
            let (ty, c, v) = (ev.event_type().0, ev.code(), ev.value());
            if ty == code::EV_KEY && v != 2 {
                host_down.retain(|&k| k != c);
                if v != 0 {
                    host_down.push(c);
                }
                let made = opts.toggle.made(|k| host_down.contains(&k));
                if made && toggle_armed {
                    toggle_armed = false;
                    to_guest = !to_guest;
                    release(&mut guest_keys, &mut guest_buttons);
                    let r = if to_guest && opts.grab {
                        dev.grab()
                    } else if opts.grab {
                        dev.ungrab()
                    } else {
                        Ok(())
                    };
                    guest_info!(target: "evdev", "evdev: {}: now to the {} ({r:?})",
                        opts.path.display(), if to_guest { "guest" } else { "host" });
                    continue;
                }
                if !made {
                    toggle_armed = true;
                }
            }
            if !to_guest {
                continue;
            }
            let Some(a) = translate(kind, ranges, ty, c, v) else {
                continue;
            };
            match a {
                Action::Key(u, true) if !guest_keys.contains(&u) => guest_keys.push(u),
                Action::Key(u, false) => guest_keys.retain(|&k| k != u),
                Action::Button(b, true) if !guest_buttons.contains(&b) => guest_buttons.push(b),
                Action::Button(b, false) => guest_buttons.retain(|&x| x != b),
                _ => {}
            }
            apply(input, a);
        }
    }
    release(&mut guest_keys, &mut guest_buttons);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_codes_map_to_distinct_hid_usages() {
        // Spot checks against the HID usage tables (keyboard page).
        let want = [
            (30, 0x04), // a
            (44, 0x1d), // z
            (2, 0x1e),  // 1
            (11, 0x27), // 0
            (28, 0x28), // enter
            (1, 0x29),  // esc
            (57, 0x2c), // space
            (59, 0x3a), // f1
            (88, 0x45), // f12
            (29, 0xe0), // left ctrl
            (42, 0xe1), // left shift
            (56, 0xe2), // left alt
            (125, 0xe3),
            (97, 0xe4),
            (54, 0xe5),
            (100, 0xe6),
            (126, 0xe7),
            (103, 0x52), // up
            (108, 0x51), // down
            (105, 0x50), // left
            (106, 0x4f), // right
            (111, 0x4c), // delete
            (69, 0x53),  // num lock
            (82, 0x62),  // kp0
            (96, 0x58),  // kp enter
            (86, 0x64),  // 102nd
            (183, 0x68), // f13
            (194, 0x73), // f24
        ];
        for (k, u) in want {
            assert_eq!(hid_usage(k), Some(u), "key {k}");
        }
        assert_eq!(hid_usage(0), None);
        assert_eq!(hid_usage(84), None);
        assert_eq!(hid_usage(0x110), None, "BTN_LEFT is no key");
        let mut seen = std::collections::HashMap::new();
        for k in 0..=0x2ffu16 {
            if let Some(u) = hid_usage(k) {
                assert!(
                    seen.insert(u, k).is_none(),
                    "usage {u:#x} twice ({k} and {})",
                    seen[&u]
                );
            }
        }
        assert!(seen.len() > 100, "{} keys", seen.len());
    }

    #[test]
    fn events_translate_per_device_kind() {
        use code::*;
        let r = [(0, 1000), (-500, 500)];
        let t = translate;
        assert_eq!(
            t(Kind::Keyboard, r, EV_KEY, 30, 1),
            Some(Action::Key(0x04, true))
        );
        assert_eq!(
            t(Kind::Keyboard, r, EV_KEY, 30, 0),
            Some(Action::Key(0x04, false))
        );
        assert_eq!(t(Kind::Keyboard, r, EV_KEY, 30, 2), None, "repeats dropped");
        assert_eq!(t(Kind::Mouse, r, EV_KEY, 30, 1), None, "no keys on a mouse");
        assert_eq!(t(Kind::Keyboard, r, EV_KEY, BTN_LEFT, 1), None);
        assert_eq!(
            t(Kind::Mouse, r, EV_KEY, BTN_RIGHT, 1),
            Some(Action::Button(Button::Right, true))
        );
        assert_eq!(
            t(Kind::Tablet, r, EV_KEY, BTN_TOUCH, 0),
            Some(Action::Button(Button::Left, false))
        );
        assert_eq!(
            t(Kind::Mouse, r, EV_REL, REL_X, -7),
            Some(Action::Rel(Axis::X, -7))
        );
        assert_eq!(t(Kind::Tablet, r, EV_REL, REL_X, -7), None);
        assert_eq!(
            t(Kind::Mouse, r, EV_REL, REL_WHEEL, 1),
            Some(Action::Wheel(1))
        );
        // Absolute: scaled from the device's range, clamped.
        assert_eq!(
            t(Kind::Tablet, r, EV_ABS, ABS_X, 0),
            Some(Action::Abs(Axis::X, 0))
        );
        assert_eq!(
            t(Kind::Tablet, r, EV_ABS, ABS_X, 1000),
            Some(Action::Abs(Axis::X, ABS_MAX))
        );
        assert_eq!(
            t(Kind::Tablet, r, EV_ABS, ABS_X, 500),
            Some(Action::Abs(Axis::X, ABS_MAX / 2))
        );
        assert_eq!(
            t(Kind::Tablet, r, EV_ABS, ABS_Y, 0),
            Some(Action::Abs(Axis::Y, ABS_MAX / 2))
        );
        assert_eq!(
            t(Kind::Tablet, r, EV_ABS, ABS_Y, 9999),
            Some(Action::Abs(Axis::Y, ABS_MAX))
        );
        assert_eq!(
            t(Kind::Tablet, [(5, 5), (0, 1)], EV_ABS, ABS_X, 5),
            None,
            "empty range"
        );
        assert_eq!(t(Kind::Mouse, r, EV_ABS, ABS_X, 5), None);
        assert_eq!(t(Kind::Keyboard, r, EV_SYN, 0, 0), None);
    }

    #[test]
    fn toggles_parse_and_match() {
        use code::*;
        for n in Toggle::NAMES {
            assert!(Toggle::parse(n).is_some(), "{n}");
        }
        assert_eq!(Toggle::parse("ctrl"), None);
        let down = |keys: &'static [u16]| move |k| keys.contains(&k);
        assert!(Toggle::CtrlCtrl.made(down(&[KEY_LEFTCTRL, KEY_RIGHTCTRL])));
        assert!(!Toggle::CtrlCtrl.made(down(&[KEY_LEFTCTRL])));
        assert!(Toggle::CtrlScrollLock.made(down(&[KEY_RIGHTCTRL, KEY_SCROLLLOCK])));
        assert!(Toggle::ScrollLock.made(down(&[KEY_SCROLLLOCK])));
        assert!(!Toggle::AltAlt.made(down(&[KEY_LEFTALT, KEY_LEFTMETA])));
    }
}
