//! Emulated USB HID devices (HID 1.11): a keyboard, a mouse and a tablet
//! (HID Usage Tables chapters 4 and 10 for the usages).
//!
//! One interface, its interrupt IN endpoint 0x81. The keyboard is class 3
//! subclass 1 (boot) protocol 1 with the 8-byte boot report (modifier bits,
//! reserved, six key codes) in both protocols and an output report for the
//! LEDs (SET_REPORT); the mouse is a boot mouse (protocol 2: buttons, X, Y
//! and a wheel; boot protocol drops the wheel); the tablet reports absolute
//! X and Y in 0..=0x7fff (QMP's range), buttons and a wheel, like QEMU's
//! usb-tablet. Interrupt IN transfers park in the device until there is a
//! report: no polling anywhere. Key and button events are queued in order
//! and never merged (up to [`MAX_QUEUED`] reports the guest has not read
//! yet); pointer motion is coalesced the way real devices do it (relative
//! motion summed, the tablet's latest position), flushed into a report of
//! its own before a button changes. SET_IDLE is remembered and reported by
//! GET_IDLE, but reports are sent on change only (what every OS asks for
//! with a duration of 0).
//!
//! Input arrives through an [`InputHandle`] from any thread.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::usb::descriptor::{
    ConfigDescriptor, DeviceDescriptor, EndpointDescriptor, InterfaceDescriptor,
};
use crate::usb::std_requests::{complete_in, DescriptorSet, StdOutcome, StdRequests};
use crate::usb::{
    Direction, SetupPacket, Speed, Transfer, TransferId, TransferKind, TransferStatus, UsbDevice,
    Wakeup,
};

/// Reports kept for a guest that does not read them; later key events are
/// dropped (and logged) rather than growing without bound.
pub const MAX_QUEUED: usize = 256;
/// The interrupt IN endpoint.
pub const EP_IN: u8 = 0x81;
const VENDOR_ID: u16 = 0x46f4;
const PRODUCT_ID: u16 = 0x0002;

/// Which HID device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A boot keyboard.
    Keyboard,
    /// A boot mouse with a wheel (relative motion).
    Mouse,
    /// A tablet (absolute position), as QEMU's usb-tablet.
    Tablet,
}

/// Largest absolute coordinate (QMP's INPUT_EVENT_ABS_MAX).
pub const ABS_MAX: i32 = 0x7fff;

/// The boot mouse report descriptor with a wheel (HID 1.11 appendix B.2
/// plus the wheel).
pub const MOUSE_REPORT_DESCRIPTOR: [u8; 52] = [
    0x05, 0x01, 0x09, 0x02, 0xa1, 0x01, // Generic Desktop, Mouse, Application
    0x09, 0x01, 0xa1, 0x00, // Pointer, Physical
    0x05, 0x09, 0x19, 0x01, 0x29, 0x03, // Buttons 1..3
    0x15, 0x00, 0x25, 0x01, 0x95, 0x03, 0x75, 0x01, 0x81, 0x02, // 3 bits
    0x95, 0x01, 0x75, 0x05, 0x81, 0x01, // padding
    0x05, 0x01, 0x09, 0x30, 0x09, 0x31, 0x09, 0x38, // X, Y, Wheel
    0x15, 0x81, 0x25, 0x7f, 0x75, 0x08, 0x95, 0x03, 0x81, 0x06, // relative
    0xc0, 0xc0,
];

/// The tablet's report descriptor: buttons, absolute X and Y (16 bits,
/// 0..=0x7fff), a relative wheel.
pub const TABLET_REPORT_DESCRIPTOR: [u8; 74] = [
    0x05, 0x01, 0x09, 0x02, 0xa1, 0x01, // Generic Desktop, Mouse, Application
    0x09, 0x01, 0xa1, 0x00, // Pointer, Physical
    0x05, 0x09, 0x19, 0x01, 0x29, 0x03, // Buttons 1..3
    0x15, 0x00, 0x25, 0x01, 0x95, 0x03, 0x75, 0x01, 0x81, 0x02, // 3 bits
    0x95, 0x01, 0x75, 0x05, 0x81, 0x01, // padding
    0x05, 0x01, 0x09, 0x30, 0x09, 0x31, // X, Y
    0x15, 0x00, 0x26, 0xff, 0x7f, 0x35, 0x00, 0x46, 0xff, 0x7f, // 0..0x7fff
    0x75, 0x10, 0x95, 0x02, 0x81, 0x02, // absolute
    0x05, 0x01, 0x09, 0x38, // Wheel
    0x15, 0x81, 0x25, 0x7f, 0x35, 0x00, 0x45, 0x00, // -127..127
    0x75, 0x08, 0x95, 0x01, 0x81, 0x06, // relative
    0xc0, 0xc0,
];

/// The boot keyboard report descriptor (HID 1.11 appendix B.1), with the
/// five LED output bits.
pub const REPORT_DESCRIPTOR: [u8; 63] = [
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x06, // Usage (Keyboard)
    0xa1, 0x01, // Collection (Application)
    0x05, 0x07, //   Usage Page (Key Codes)
    0x19, 0xe0, //   Usage Minimum (224)
    0x29, 0xe7, //   Usage Maximum (231)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0x01, //   Logical Maximum (1)
    0x75, 0x01, //   Report Size (1)
    0x95, 0x08, //   Report Count (8)
    0x81, 0x02, //   Input (Data, Variable, Absolute): modifiers
    0x95, 0x01, //   Report Count (1)
    0x75, 0x08, //   Report Size (8)
    0x81, 0x01, //   Input (Constant): reserved byte
    0x95, 0x05, //   Report Count (5)
    0x75, 0x01, //   Report Size (1)
    0x05, 0x08, //   Usage Page (LEDs)
    0x19, 0x01, //   Usage Minimum (1)
    0x29, 0x05, //   Usage Maximum (5)
    0x91, 0x02, //   Output (Data, Variable, Absolute): LEDs
    0x95, 0x01, //   Report Count (1)
    0x75, 0x03, //   Report Size (3)
    0x91, 0x01, //   Output (Constant): padding
    0x95, 0x06, //   Report Count (6)
    0x75, 0x08, //   Report Size (8)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0xff, //   Logical Maximum (255)
    0x05, 0x07, //   Usage Page (Key Codes)
    0x19, 0x00, //   Usage Minimum (0)
    0x29, 0xff, //   Usage Maximum (255)
    0x81, 0x00, //   Input (Data, Array): key codes
    0xc0, // End Collection
];

// HID class requests (HID 1.11 §7.2).
const GET_REPORT: u8 = 0x01;
const GET_IDLE: u8 = 0x02;
const GET_PROTOCOL: u8 = 0x03;
const SET_REPORT: u8 = 0x09;
const SET_IDLE: u8 = 0x0a;
const SET_PROTOCOL: u8 = 0x0b;
const DT_HID: u8 = 0x21;
const DT_REPORT: u8 = 0x22;

/// What the guest and the input side share.
#[derive(Debug)]
struct Shared {
    kind: Kind,
    /// Boot protocol selected (SET_PROTOCOL 0).
    boot: bool,
    /// Pointer buttons (bit 0 left, 1 right, 2 middle).
    buttons: u8,
    /// The tablet's position.
    x: i32,
    y: i32,
    /// The mouse's motion and the wheel not reported yet.
    dx: i32,
    dy: i32,
    wheel: i32,
    /// Pointer state changed since the last report.
    dirty: bool,
    /// Keys down (usage codes 0x04..=0xdd), in press order.
    down: Vec<u8>,
    /// Modifier bits (usages 0xe0..=0xe7).
    modifiers: u8,
    /// Reports not yet sent, oldest first.
    queue: VecDeque<Vec<u8>>,
    /// LED bits the guest last set (num, caps, scroll, compose, kana).
    leds: u8,
    dropped: u64,
    /// Interrupt IN transfers waiting for a report, in order.
    parked: VecDeque<Transfer>,
    /// The port is suspended.
    suspended: bool,
    /// Remote wakeup was enabled when the port was suspended (the host
    /// cannot change it while suspended: no traffic reaches the device).
    remote_wakeup: bool,
    /// Input arrived while suspended with remote wakeup enabled: the
    /// controller shows a resume at its next look.
    wake_request: bool,
    /// Wakes the controller's event loop.
    wakeup: Option<Wakeup>,
}

impl Shared {
    fn new(kind: Kind) -> Self {
        Shared {
            kind,
            boot: false,
            buttons: 0,
            x: 0,
            y: 0,
            dx: 0,
            dy: 0,
            wheel: 0,
            dirty: false,
            down: Vec::new(),
            modifiers: 0,
            queue: VecDeque::new(),
            leds: 0,
            dropped: 0,
            parked: VecDeque::new(),
            suspended: false,
            remote_wakeup: false,
            wake_request: false,
            wakeup: None,
        }
    }

    /// The current report, taking the pointer motion it carries (the
    /// rest stays for the next one).
    fn take_report(&mut self) -> Vec<u8> {
        let step = |v: &mut i32| {
            let s = (*v).clamp(-127, 127);
            *v -= s;
            s as i8 as u8
        };
        match self.kind {
            Kind::Keyboard => {
                let mut r = vec![0u8; 8];
                r[0] = self.modifiers;
                if self.down.len() > 6 {
                    // Phantom state (HID 1.11 appendix C): too many keys.
                    r[2..].fill(0x01);
                } else {
                    r[2..2 + self.down.len()].copy_from_slice(&self.down);
                }
                r
            }
            Kind::Mouse => {
                let r = vec![
                    self.buttons,
                    step(&mut self.dx),
                    step(&mut self.dy),
                    step(&mut self.wheel),
                ];
                self.dirty = self.dx != 0 || self.dy != 0 || self.wheel != 0;
                if self.boot {
                    r[..3].to_vec()
                } else {
                    r
                }
            }
            Kind::Tablet => {
                let (x, y) = (self.x as u16, self.y as u16);
                let w = step(&mut self.wheel);
                self.dirty = self.wheel != 0;
                let (xb, yb) = (x.to_le_bytes(), y.to_le_bytes());
                vec![self.buttons, xb[0], xb[1], yb[0], yb[1], w]
            }
        }
    }

    /// Queues the current report (a key or button change). `false` if
    /// the queue is full.
    fn queue_report(&mut self) -> bool {
        if self.queue.len() >= MAX_QUEUED {
            self.dropped += 1;
            return false;
        }
        let r = self.take_report();
        self.queue.push_back(r);
        true
    }

    /// Completes parked transfers with queued reports in order, then with
    /// coalesced pointer motion (from whichever thread has the lock: a
    /// completion wakes the controller).
    ///
    /// A report with no transfer to take it on a suspended device with
    /// remote wakeup enabled asks for a resume (USB 2.0 §7.1.7.7: a
    /// keyboard wakes the host on a key press); the report waits for the
    /// guest's next transfer after the resume.
    fn pump(&mut self) {
        while !self.parked.is_empty() {
            let r = match self.queue.pop_front() {
                Some(r) => r,
                None if self.dirty => self.take_report(),
                None => return,
            };
            if let Some(t) = self.parked.pop_front() {
                complete_in(t, &r);
            }
        }
        let waiting = !self.queue.is_empty() || self.dirty;
        if waiting && self.suspended && self.remote_wakeup && !self.wake_request {
            self.wake_request = true;
            if let Some(w) = &self.wakeup {
                w.wake();
            }
        }
    }

    /// A pointer button changes: pending motion is reported first, then
    /// the button, each in a report of its own.
    fn set_button(&mut self, bit: u8, down: bool) -> bool {
        let now = if down {
            self.buttons | bit
        } else {
            self.buttons & !bit
        };
        if now == self.buttons {
            return true;
        }
        if self.dirty && !self.queue_report() {
            return false;
        }
        let before = self.buttons;
        self.buttons = now;
        if !self.queue_report() {
            self.buttons = before;
            return false;
        }
        self.pump();
        true
    }
}

/// The input side of a [`HidDevice`]: cloneable, usable from any thread.
#[derive(Debug, Clone)]
pub struct InputHandle(Arc<Mutex<Shared>>);

/// The input side of a keyboard.
pub type KeyboardHandle = InputHandle;

/// A pointer button (QMP's InputButton names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Button {
    /// Left.
    Left,
    /// Right.
    Right,
    /// Middle.
    Middle,
    /// One wheel step up (a press; the release does nothing).
    WheelUp,
    /// One wheel step down.
    WheelDown,
}

/// A pointer axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// X.
    X,
    /// Y.
    Y,
}

impl InputHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Which device this feeds.
    pub fn kind(&self) -> Kind {
        self.lock().kind
    }

    /// A pointer button went down or up (mouse and tablet; ignored by a
    /// keyboard). `false` if the event was dropped (queue full).
    pub fn button(&self, b: Button, down: bool) -> bool {
        let mut s = self.lock();
        if s.kind == Kind::Keyboard {
            return true;
        }
        let bit = match b {
            Button::Left => 1,
            Button::Right => 2,
            Button::Middle => 4,
            Button::WheelUp | Button::WheelDown => {
                if down {
                    s.wheel = (s.wheel + if b == Button::WheelUp { 1 } else { -1 })
                        .clamp(-1 << 20, 1 << 20);
                    s.dirty = true;
                    s.pump();
                }
                return true;
            }
        };
        s.set_button(bit, down)
    }

    /// Relative motion (the mouse; ignored by others), summed until the
    /// guest reads it.
    pub fn rel(&self, axis: Axis, value: i32) {
        let mut s = self.lock();
        if s.kind != Kind::Mouse {
            return;
        }
        let v = match axis {
            Axis::X => &mut s.dx,
            Axis::Y => &mut s.dy,
        };
        *v = v.saturating_add(value).clamp(-1 << 20, 1 << 20);
        s.dirty = true;
        s.pump();
    }

    /// An absolute position, 0..=[`ABS_MAX`] (the tablet; ignored by
    /// others); the latest wins until the guest reads it.
    pub fn abs(&self, axis: Axis, value: i32) {
        let mut s = self.lock();
        if s.kind != Kind::Tablet {
            return;
        }
        let v = value.clamp(0, ABS_MAX);
        match axis {
            Axis::X => s.x = v,
            Axis::Y => s.y = v,
        }
        s.dirty = true;
        s.pump();
    }

    /// A key went down or up: `usage` is a HID usage code of the keyboard
    /// page (0x04 'a' .. 0xe7 right GUI). Unknown codes are ignored.
    /// Returns `false` if the event was dropped (the guest has not read
    /// [`MAX_QUEUED`] reports).
    pub fn key(&self, usage: u8, down: bool) -> bool {
        let mut s = self.lock();
        if s.kind != Kind::Keyboard {
            return true;
        }
        let before = (s.modifiers, s.down.clone());
        match usage {
            0xe0..=0xe7 => {
                let bit = 1 << (usage - 0xe0);
                if down {
                    s.modifiers |= bit;
                } else {
                    s.modifiers &= !bit;
                }
            }
            0x04..=0xdd => {
                s.down.retain(|&k| k != usage);
                if down {
                    s.down.push(usage);
                }
            }
            _ => return true,
        }
        if (s.modifiers, &s.down) == (before.0, &before.1) {
            return true;
        }
        if !s.queue_report() {
            // Undo: the guest never sees this event; its state stays
            // consistent with the reports it will read.
            s.modifiers = before.0;
            s.down = before.1;
            return false;
        }
        s.pump();
        true
    }

    /// The LED bits the guest set (bit 0 num lock, 1 caps, 2 scroll).
    pub fn leds(&self) -> u8 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).leds
    }

    /// Reports queued that the guest has not read yet.
    pub fn pending(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).queue.len()
    }

    /// Key events dropped because the guest did not read its reports.
    pub fn dropped(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).dropped
    }
}

/// An emulated HID device.
#[derive(Debug)]
pub struct HidDevice {
    kind: Kind,
    speed: Speed,
    std: StdRequests,
    shared: Arc<Mutex<Shared>>,
    idle: u8,
}

/// The keyboard (a [`HidDevice`] of [`Kind::Keyboard`]).
pub type Keyboard = HidDevice;

impl Kind {
    fn report_descriptor(self) -> &'static [u8] {
        match self {
            Kind::Keyboard => &REPORT_DESCRIPTOR,
            Kind::Mouse => &MOUSE_REPORT_DESCRIPTOR,
            Kind::Tablet => &TABLET_REPORT_DESCRIPTOR,
        }
    }
}

fn descriptor_set(kind: Kind, speed: Speed) -> DescriptorSet {
    let hid = {
        let len = kind.report_descriptor().len() as u16;
        let l = len.to_le_bytes();
        // bcdHID 1.11, no country, one report descriptor.
        vec![9, DT_HID, 0x11, 0x01, 0, 1, DT_REPORT, l[0], l[1]]
    };
    let config = |interval: u8| ConfigDescriptor {
        configuration_value: 1,
        configuration_index: 0,
        // Bus powered, remote wakeup.
        attributes: ConfigDescriptor::ATTR_ONE | 0x20,
        max_power: 50,
        extra: Vec::new(),
        interfaces: vec![InterfaceDescriptor {
            interface_number: 0,
            alternate_setting: 0,
            class: 3,
            subclass: u8::from(kind != Kind::Tablet),
            protocol: match kind {
                Kind::Keyboard => 1,
                Kind::Mouse => 2,
                Kind::Tablet => 0,
            },
            interface_index: 0,
            extra: hid.clone(),
            endpoints: vec![EndpointDescriptor {
                address: EP_IN,
                attributes: EndpointDescriptor::INTERRUPT,
                max_packet_size: 8,
                interval,
                ..EndpointDescriptor::default()
            }],
        }],
    };
    let device = DeviceDescriptor {
        bcd_usb: if speed == Speed::High { 0x0200 } else { 0x0110 },
        max_packet_size0: if speed == Speed::Low { 8 } else { 64 },
        vendor_id: VENDOR_ID,
        product_id: match kind {
            Kind::Keyboard => PRODUCT_ID,
            Kind::Mouse => PRODUCT_ID + 1,
            Kind::Tablet => PRODUCT_ID + 2,
        },
        bcd_device: 0x0100,
        manufacturer_index: 1,
        product_index: 2,
        serial_index: 3,
        num_configurations: 1,
        ..DeviceDescriptor::default()
    };
    let product = match kind {
        Kind::Keyboard => "USB Keyboard",
        Kind::Mouse => "USB Mouse",
        Kind::Tablet => "USB Tablet",
    };
    let strings = vec!["hcd-emul".to_string(), product.to_string(), "1".to_string()];
    match speed {
        // 2^(7-1) micro-frames: 8 ms.
        Speed::High => DescriptorSet {
            speed,
            qualifier: Some(device.qualifier()),
            device,
            config: config(7),
            other_speed: Some(config(10)),
            bos: None,
            strings,
            self_powered: false,
        },
        _ => DescriptorSet {
            speed,
            qualifier: None,
            device,
            config: config(10),
            other_speed: None,
            bos: None,
            strings,
            self_powered: false,
        },
    }
}

impl HidDevice {
    /// A keyboard at `speed` (low, full or high) and its input handle.
    pub fn new(speed: Speed) -> Result<(HidDevice, InputHandle), String> {
        Self::with_kind(Kind::Keyboard, speed)
    }

    /// A device of `kind` at `speed` (low, full or high) and its input
    /// handle.
    pub fn with_kind(kind: Kind, speed: Speed) -> Result<(HidDevice, InputHandle), String> {
        if speed == Speed::Super {
            return Err("a HID device is a low-, full- or high-speed device".into());
        }
        let shared = Arc::new(Mutex::new(Shared::new(kind)));
        Ok((
            HidDevice {
                kind,
                speed,
                std: StdRequests::new(descriptor_set(kind, speed)),
                shared: shared.clone(),
                idle: 0,
            },
            InputHandle(shared),
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn class_request(&mut self, xfer: Transfer, sp: SetupPacket, data_out: &[u8]) {
        let to_interface = sp.request_type & 0x1f == 1 && sp.index == 0;
        match (sp.request_type, sp.request) {
            // GET_DESCRIPTOR(HID / REPORT) on the interface.
            (0x81, 6) if to_interface => match (sp.value >> 8) as u8 {
                DT_REPORT => {
                    let d = self.kind.report_descriptor();
                    complete_in(xfer, &d[..d.len().min(usize::from(sp.length))]);
                }
                DT_HID => {
                    let hid = &self.std.descriptors().config.interfaces[0].extra;
                    let n = hid.len().min(usize::from(sp.length));
                    let v = hid[..n].to_vec();
                    complete_in(xfer, &v);
                }
                _ => xfer.complete(TransferStatus::Stall, 0),
            },
            (0xa1, GET_REPORT) if to_interface => {
                let r = self.lock().take_report();
                complete_in(xfer, &r[..r.len().min(usize::from(sp.length))]);
            }
            (0xa1, GET_IDLE) if to_interface => {
                complete_in(xfer, &[self.idle][..usize::from(sp.length.min(1))])
            }
            (0xa1, GET_PROTOCOL) if to_interface && self.kind != Kind::Tablet => {
                let boot = self.lock().boot;
                complete_in(xfer, &[u8::from(!boot)][..usize::from(sp.length.min(1))]);
            }
            (0x21, SET_REPORT) if to_interface && self.kind == Kind::Keyboard => {
                // Output report (type 2): the LEDs.
                if sp.value >> 8 == 2 && !data_out.is_empty() {
                    self.lock().leds = data_out[0] & 0x1f;
                    xfer.complete(TransferStatus::Success, data_out.len());
                } else {
                    xfer.complete(TransferStatus::Stall, 0);
                }
            }
            (0x21, SET_IDLE) if to_interface => {
                self.idle = (sp.value >> 8) as u8;
                xfer.complete(TransferStatus::Success, 0);
            }
            (0x21, SET_PROTOCOL) if to_interface && sp.value <= 1 && self.kind != Kind::Tablet => {
                self.lock().boot = sp.value == 0;
                xfer.complete(TransferStatus::Success, 0);
            }
            _ => xfer.complete(TransferStatus::Stall, 0),
        }
    }

    fn control(&mut self, xfer: Transfer, sp: SetupPacket) {
        let mut data_out = Vec::new();
        if sp.direction() == Direction::Out {
            let n = xfer.len().min(usize::from(sp.length)).min(64);
            data_out = vec![0u8; n];
            if xfer.read_data(0, &mut data_out).is_err() {
                xfer.complete(TransferStatus::TransactionError, 0);
                return;
            }
        }
        let ack = data_out.len();
        match self.std.handle(&sp, &data_out) {
            StdOutcome::Data(v) => complete_in(xfer, &v),
            StdOutcome::NoData | StdOutcome::ClearHalt(_) | StdOutcome::SetHalt(_) => {
                xfer.complete(TransferStatus::Success, ack)
            }
            StdOutcome::Stall => xfer.complete(TransferStatus::Stall, 0),
            StdOutcome::Configured(v) => {
                if v == 0 {
                    self.fail_parked(TransferStatus::Stall);
                }
                self.lock().boot = false;
                xfer.complete(TransferStatus::Success, ack);
            }
            StdOutcome::InterfaceSet { .. } => xfer.complete(TransferStatus::Success, ack),
            StdOutcome::NotStandard => self.class_request(xfer, sp, &data_out),
        }
    }

    fn fail_parked(&mut self, status: TransferStatus) {
        let parked: Vec<Transfer> = self.lock().parked.drain(..).collect();
        for t in parked {
            t.complete(status, 0);
        }
    }
}

impl UsbDevice for HidDevice {
    fn name(&self) -> String {
        let k = match self.kind {
            Kind::Keyboard => "keyboard",
            Kind::Mouse => "mouse",
            Kind::Tablet => "tablet",
        };
        format!("{k} ({:?} speed)", self.speed)
    }

    fn speed(&self) -> Speed {
        self.speed
    }

    fn reset(&mut self) {
        self.std.reset();
        {
            let mut s = self.lock();
            s.boot = false;
            s.suspended = false;
            s.remote_wakeup = false;
            s.wake_request = false;
        }
        self.idle = 0;
        self.fail_parked(TransferStatus::Cancelled);
    }

    fn set_wakeup(&mut self, wakeup: Wakeup) {
        self.lock().wakeup = Some(wakeup);
    }

    fn suspend(&mut self, suspended: bool) {
        let mut s = self.lock();
        s.suspended = suspended;
        s.remote_wakeup = suspended && self.std.remote_wakeup_enabled();
        s.wake_request = false;
        if suspended {
            // Input that came while the guest was suspending the device
            // (nothing parked to take it) wakes it at once.
            s.pump();
        }
    }

    fn remote_wakeup(&mut self) -> bool {
        let mut s = self.lock();
        s.suspended && std::mem::take(&mut s.wake_request)
    }

    fn submit(&mut self, xfer: Transfer) {
        match (xfer.kind(), xfer.endpoint(), xfer.direction()) {
            (TransferKind::Control(sp), 0, _) => self.control(xfer, sp),
            (TransferKind::Interrupt | TransferKind::Bulk, 1, Direction::In)
                if self.std.is_configured() && !self.std.is_halted(EP_IN) =>
            {
                let mut s = self.lock();
                if s.parked.len() >= MAX_QUEUED {
                    drop(s);
                    xfer.complete(TransferStatus::Stall, 0);
                    return;
                }
                s.parked.push_back(xfer);
                s.pump();
            }
            (kind, ep, dir) => {
                guest_warn!(target: "hid", "transfer {kind:?} on endpoint {ep} {dir:?} rejected");
                xfer.complete(TransferStatus::Stall, 0);
            }
        }
    }

    fn cancel(&mut self, id: TransferId) {
        let t = {
            let mut s = self.lock();
            let i = s.parked.iter().position(|t| t.id() == id);
            i.and_then(|i| s.parked.remove(i))
        };
        if let Some(t) = t {
            t.complete(TransferStatus::Cancelled, 0);
        }
    }

    fn is_interrupt_endpoint(&self, address: u8) -> bool {
        address == EP_IN
    }
}

#[cfg(test)]
mod tests;
