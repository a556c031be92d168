//! An emulated USB 2.0 high-speed hub with a single transaction translator
//! (USB 2.0 chapter 11), modelled on Intel's "Integrated Rate Matching
//! Hub" 8087:0024, which every PCH system shows as device 2 of each EHCI
//! bus with its full- and low-speed devices below it. An EHCI controller
//! without companion controllers puts one on each root port that needs
//! full/low-speed devices: every guest (Linux, Windows, SeaBIOS, OVMF,
//! GRUB, U-Boot) knows that topology and addresses those devices with
//! split transactions naming this hub and its port.
//!
//! * Descriptors (§11.23): device class 9, protocol 1 (single TT), one
//!   configuration, self-powered with remote wakeup, interface 9/0/0, the
//!   status change endpoint 0x81 (interrupt, bInterval 12 = 256 ms); a
//!   device qualifier and the full-speed other-speed configuration; the hub
//!   descriptor (type 0x29) with per-port power switching and over-current
//!   reporting, TT think time 8 FS bit times (wHubCharacteristics 0x0009),
//!   bPwrOn2PwrGood 50 (100 ms), no removable-device bits.
//! * Hub class requests (§11.24.2): hub and port status, the port features
//!   of table 11-17, and the TT requests. There is no real TT: the
//!   controller routes split transactions straight to the device behind the
//!   port ([`HubPorts::port_device`]), so CLEAR_TT_BUFFER, RESET_TT and
//!   STOP_TT only acknowledge (a stopped TT is remembered for GET_TT_STATE,
//!   which then answers an empty vendor-specific state).
//! * Ports (§11.5, figure 11-10) change state at once: power-on shows a
//!   device that is there (C_PORT_CONNECTION), reset completes inside the
//!   request (the device gets [`UsbDevice::reset`], the port is enabled,
//!   C_PORT_RESET is set), resume completes inside CLEAR_FEATURE
//!   (C_PORT_SUSPEND). Power-off returns a port to the Powered-off state:
//!   every status and change bit clear, the device reset (it lost VBUS).
//!   The hub's own reset and SET_CONFIGURATION(0) power every port off
//!   (§11.11: ports of an unconfigured hub are powered off).
//! * The status change endpoint (§11.12.4) reports the hub and port status
//!   change bitmap (bit 0 the hub, bit N port N) whenever a change bit is
//!   set: a transfer submitted while one is set completes at once, one
//!   submitted while none is set waits ("parked", no polling) until one is.
//!   Like a real hub, it keeps reporting a change until the host clears it.

use std::collections::VecDeque;

use super::descriptor::{
    ConfigDescriptor, DeviceDescriptor, EndpointDescriptor, InterfaceDescriptor,
};
use super::std_requests::{complete_in, DescriptorSet, StdOutcome, StdRequests};
use super::{
    Direction, HubPorts, SetupPacket, Speed, Transfer, TransferId, TransferKind, TransferStatus,
    UsbDevice, Wakeup,
};

/// idVendor: Intel.
pub const VENDOR_ID: u16 = 0x8087;
/// idProduct: Integrated Rate Matching Hub.
pub const PRODUCT_ID: u16 = 0x0024;
/// Ports of [`Hub::default`] (the 8087:0024 has four).
pub const DEFAULT_PORTS: u8 = 4;
/// Most downstream ports a hub may have (USB 2.0 §11.23.2.1 allows 255;
/// two bytes of status change bitmap are enough for 15).
pub const MAX_PORTS: u8 = 15;
/// Address of the status change endpoint (interrupt IN).
pub const EP_STATUS: u8 = 0x81;
/// Descriptor type of the hub descriptor (USB 2.0 table 11-13).
pub const DT_HUB: u8 = 0x29;
/// wHubCharacteristics: per-port power switching (bits 1..0 = 01),
/// per-port over-current protection (bits 4..3 = 01), TT think time 8 FS
/// bit times, no port indicators (USB 2.0 table 11-13).
pub const HUB_CHARACTERISTICS: u16 = 0x0009;
/// bPwrOn2PwrGood in 2 ms units.
pub const POWER_ON_TO_GOOD: u8 = 50;

/// Hub class request codes (USB 2.0 table 11-16).
pub mod request {
    /// GetHubStatus / GetPortStatus.
    pub const GET_STATUS: u8 = 0;
    /// ClearHubFeature / ClearPortFeature.
    pub const CLEAR_FEATURE: u8 = 1;
    /// SetHubFeature / SetPortFeature.
    pub const SET_FEATURE: u8 = 3;
    /// GetHubDescriptor.
    pub const GET_DESCRIPTOR: u8 = 6;
    /// SetHubDescriptor (optional; this hub stalls it).
    pub const SET_DESCRIPTOR: u8 = 7;
    /// ClearTTBuffer.
    pub const CLEAR_TT_BUFFER: u8 = 8;
    /// ResetTT.
    pub const RESET_TT: u8 = 9;
    /// GetTTState.
    pub const GET_TT_STATE: u8 = 10;
    /// StopTT.
    pub const STOP_TT: u8 = 11;
}

/// Hub class feature selectors (USB 2.0 table 11-17).
pub mod feature {
    /// Hub: local power status changed.
    pub const C_HUB_LOCAL_POWER: u16 = 0;
    /// Hub: over-current status changed.
    pub const C_HUB_OVER_CURRENT: u16 = 1;
    /// Port: current connect status (not settable or clearable).
    pub const PORT_CONNECTION: u16 = 0;
    /// Port: enabled (clear only: disables the port).
    pub const PORT_ENABLE: u16 = 1;
    /// Port: suspended (set suspends, clear resumes).
    pub const PORT_SUSPEND: u16 = 2;
    /// Port: over-current (not settable or clearable).
    pub const PORT_OVER_CURRENT: u16 = 3;
    /// Port: reset (set only).
    pub const PORT_RESET: u16 = 4;
    /// Port: power.
    pub const PORT_POWER: u16 = 8;
    /// Port: low-speed device attached (not settable or clearable).
    pub const PORT_LOW_SPEED: u16 = 9;
    /// Port: connection changed.
    pub const C_PORT_CONNECTION: u16 = 16;
    /// Port: enable changed (port error).
    pub const C_PORT_ENABLE: u16 = 17;
    /// Port: resume completed.
    pub const C_PORT_SUSPEND: u16 = 18;
    /// Port: over-current changed.
    pub const C_PORT_OVER_CURRENT: u16 = 19;
    /// Port: reset completed.
    pub const C_PORT_RESET: u16 = 20;
    /// Port: test mode (set only; the selector in wIndex bits 15..8).
    pub const PORT_TEST: u16 = 21;
    /// Port: indicator control (the selector in wIndex bits 15..8).
    pub const PORT_INDICATOR: u16 = 22;
}

/// wPortStatus bits (USB 2.0 table 11-21).
pub mod port_status {
    /// A device is connected.
    pub const CONNECTION: u16 = 1 << 0;
    /// The port is enabled.
    pub const ENABLE: u16 = 1 << 1;
    /// The port is suspended.
    pub const SUSPEND: u16 = 1 << 2;
    /// Over-current condition.
    pub const OVER_CURRENT: u16 = 1 << 3;
    /// Reset signalling in progress (never seen: resets complete at once).
    pub const RESET: u16 = 1 << 4;
    /// The port is powered.
    pub const POWER: u16 = 1 << 8;
    /// A low-speed device is attached.
    pub const LOW_SPEED: u16 = 1 << 9;
    /// A high-speed device is attached.
    pub const HIGH_SPEED: u16 = 1 << 10;
    /// The port is in test mode.
    pub const TEST: u16 = 1 << 11;
    /// Port indicator under software control.
    pub const INDICATOR: u16 = 1 << 12;
}

/// wPortChange bits (USB 2.0 table 11-22).
pub mod port_change {
    /// Connect status changed.
    pub const C_CONNECTION: u16 = 1 << 0;
    /// The port was disabled by a port error.
    pub const C_ENABLE: u16 = 1 << 1;
    /// Resume completed.
    pub const C_SUSPEND: u16 = 1 << 2;
    /// Over-current indicator changed.
    pub const C_OVER_CURRENT: u16 = 1 << 3;
    /// Reset completed.
    pub const C_RESET: u16 = 1 << 4;
}

use port_change::*;
use port_status::*;

/// Why a device could not be plugged into a hub port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The port number is 0 or beyond the hub's ports.
    #[error("hub has no port {0}")]
    NoSuchPort(u8),
    /// Another device is plugged into the port.
    #[error("hub port {0} is occupied")]
    PortOccupied(u8),
    /// A USB 2.0 hub has no SuperSpeed ports.
    #[error("a SuperSpeed device cannot attach to a USB 2.0 hub")]
    SuperSpeed,
}

/// One downstream facing port.
#[derive(Debug, Default)]
struct Port {
    device: Option<Box<dyn UsbDevice>>,
    /// wPortStatus without the speed bits (derived from the device).
    status: u16,
    /// wPortChange.
    change: u16,
    /// The device's USB address as the controller saw it set
    /// (`Hub::set_address_of`); 0 whenever the device is reset, powered
    /// off, disconnected or disabled.
    address: u8,
}

impl Port {
    fn powered(&self) -> bool {
        self.status & POWER != 0
    }

    /// What the host sees in wPortStatus.
    fn status(&self) -> u16 {
        let speed = match self.device.as_ref().map(|d| d.speed()) {
            _ if self.status & CONNECTION == 0 => 0,
            Some(Speed::Low) => LOW_SPEED,
            Some(Speed::High) => HIGH_SPEED,
            _ => 0,
        };
        self.status | speed
    }

    /// Back to the Powered-off state: the device loses VBUS and its state.
    fn power_off(&mut self) {
        if self.powered() {
            if let Some(d) = self.device.as_mut() {
                d.reset();
            }
        }
        self.status = 0;
        self.change = 0;
        self.address = 0;
    }

    /// Follows the device's presence: a powered port shows a device that
    /// is plugged in and connected; any change sets C_PORT_CONNECTION.
    /// Returns whether it changed.
    fn refresh_connection(&mut self) -> bool {
        let now = self.powered() && self.device.as_ref().is_some_and(|d| d.connected());
        let shown = self.status & CONNECTION != 0;
        if now == shown {
            return false;
        }
        if now {
            self.status |= CONNECTION;
        } else {
            // A disconnect disables the port; C_PORT_ENABLE is for port
            // errors only (§11.24.2.7.2.2).
            self.status &= !(CONNECTION | ENABLE | SUSPEND);
            self.address = 0;
        }
        self.change |= C_CONNECTION;
        true
    }
}

/// An emulated USB 2.0 hub with a single TT (see the module docs).
#[derive(Debug)]
pub struct Hub {
    std: StdRequests,
    ports: Vec<Port>,
    /// wHubChange: C_HUB_LOCAL_POWER (bit 0), C_HUB_OVER_CURRENT (bit 1).
    /// The emulated supply never changes, so only a request clears it.
    hub_change: u16,
    /// Interrupt IN transfers on the status change endpoint, waiting for a
    /// change to report.
    parked: VecDeque<Transfer>,
    /// The controller's wake-up, handed to every downstream device.
    wakeup: Option<Wakeup>,
    /// STOP_TT was received and no RESET_TT since.
    tt_stopped: bool,
    /// The hub's own upstream port is suspended.
    suspended: bool,
    /// A downstream resume or connection change while suspended, with
    /// remote wakeup enabled: the hub signals resume upstream.
    wake_request: bool,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(DEFAULT_PORTS)
    }
}

/// Bytes of the status change bitmap: one bit for the hub and one per port
/// (USB 2.0 §11.12.4).
fn bitmap_len(ports: u8) -> usize {
    usize::from(ports) / 8 + 1
}

/// The device, configuration and qualifier descriptors of the 8087:0024.
fn descriptor_set(ports: u8) -> DescriptorSet {
    let device = DeviceDescriptor {
        bcd_usb: 0x0200,
        device_class: 9,
        device_subclass: 0,
        // Single TT (USB 2.0 §11.23.1).
        device_protocol: 1,
        max_packet_size0: 64,
        vendor_id: VENDOR_ID,
        product_id: PRODUCT_ID,
        bcd_device: 0,
        manufacturer_index: 0,
        product_index: 0,
        serial_index: 0,
        num_configurations: 1,
    };
    let mps = u16::try_from(bitmap_len(ports)).unwrap_or(2);
    let config = |interval: u8| ConfigDescriptor {
        configuration_value: 1,
        configuration_index: 0,
        attributes: ConfigDescriptor::ATTR_ONE
            | ConfigDescriptor::ATTR_SELF_POWERED
            | ConfigDescriptor::ATTR_REMOTE_WAKEUP,
        max_power: 0,
        extra: Vec::new(),
        interfaces: vec![InterfaceDescriptor {
            interface_number: 0,
            alternate_setting: 0,
            class: 9,
            subclass: 0,
            protocol: 0,
            interface_index: 0,
            extra: Vec::new(),
            endpoints: vec![EndpointDescriptor {
                address: EP_STATUS,
                attributes: EndpointDescriptor::INTERRUPT,
                max_packet_size: mps,
                interval,
                ss_companion: None,
                extra: Vec::new(),
            }],
        }],
    };
    // At full speed the hub would be a plain (TT-less) hub: protocol 0.
    let mut qualifier = device.qualifier();
    qualifier.device_protocol = 0;
    DescriptorSet {
        speed: Speed::High,
        device,
        // 2^(12-1) microframes = 256 ms.
        config: config(12),
        // Full speed: bInterval in frames, the longest.
        other_speed: Some(config(255)),
        qualifier: Some(qualifier),
        bos: None,
        strings: Vec::new(),
        self_powered: true,
    }
}

impl Hub {
    /// A hub with `ports` downstream ports (1 to [`MAX_PORTS`]; other
    /// values are clamped), all powered off and empty, unconfigured.
    pub fn new(ports: u8) -> Hub {
        let n = ports.clamp(1, MAX_PORTS);
        Hub {
            std: StdRequests::new(descriptor_set(n)),
            ports: (0..n).map(|_| Port::default()).collect(),
            hub_change: 0,
            parked: VecDeque::new(),
            wakeup: None,
            tt_stopped: false,
            suspended: false,
            wake_request: false,
        }
    }

    /// The descriptors the hub presents (the hub descriptor aside: see
    /// [`Hub::hub_descriptor`]).
    pub fn descriptors(&self) -> &DescriptorSet {
        self.std.descriptors()
    }

    /// The hub descriptor (USB 2.0 table 11-13): DeviceRemovable all zero,
    /// PortPwrCtrlMask all ones (USB 1.1 compatibility).
    pub fn hub_descriptor(&self) -> Vec<u8> {
        let n = self.port_count();
        let bytes = bitmap_len(n);
        let mut b = vec![
            0,
            DT_HUB,
            n,
            HUB_CHARACTERISTICS.to_le_bytes()[0],
            HUB_CHARACTERISTICS.to_le_bytes()[1],
            POWER_ON_TO_GOOD,
            // bHubContrCurrent: an integrated hub draws nothing from VBUS.
            0,
        ];
        b.extend(std::iter::repeat_n(0, bytes));
        b.extend(std::iter::repeat_n(0xff, bytes));
        b[0] = u8::try_from(b.len()).unwrap_or(u8::MAX);
        b
    }

    /// The port at 1-based `port`, if it exists.
    fn port_mut(&mut self, port: u8) -> Option<&mut Port> {
        usize::from(port)
            .checked_sub(1)
            .and_then(|i| self.ports.get_mut(i))
    }

    fn port(&self, port: u8) -> Option<&Port> {
        usize::from(port)
            .checked_sub(1)
            .and_then(|i| self.ports.get(i))
    }

    /// (wPortStatus, wPortChange) of 1-based `port`, as GET_PORT_STATUS
    /// answers it.
    pub fn port_status(&self, port: u8) -> Option<(u16, u16)> {
        self.port(port).map(|p| (p.status(), p.change))
    }

    /// Plugs `dev` into `port` (1-based). A powered port shows the
    /// connection (C_PORT_CONNECTION, reported on the status change
    /// endpoint); an unpowered one shows it once powered. The device gets
    /// the controller's wake-up if the hub has one.
    pub fn attach(&mut self, port: u8, dev: Box<dyn UsbDevice>) -> Result<(), HubError> {
        if dev.speed().is_superspeed() {
            return Err(HubError::SuperSpeed);
        }
        let wakeup = self.wakeup.clone();
        let p = self.port_mut(port).ok_or(HubError::NoSuchPort(port))?;
        if p.device.is_some() {
            return Err(HubError::PortOccupied(port));
        }
        let mut dev = dev;
        if let Some(w) = wakeup {
            dev.set_wakeup(w);
        }
        p.device = Some(dev);
        p.refresh_connection();
        self.port_changed();
        Ok(())
    }

    /// Unplugs the device from `port` (1-based) and returns it; the port
    /// shows the disconnect (C_PORT_CONNECTION). Failing the device's
    /// transfers still in flight is the controller's business (as for a
    /// root port).
    pub fn detach(&mut self, port: u8) -> Option<Box<dyn UsbDevice>> {
        let p = self.port_mut(port)?;
        let dev = p.device.take()?;
        p.refresh_connection();
        self.port_changed();
        Some(dev)
    }

    /// Looks at [`UsbDevice::connected`] of every downstream device (and,
    /// first, lets downstream hubs do the same): a device that vanished or
    /// came back on a powered port shows a connection change. The
    /// controller calls this, through [`HubPorts::poll_connections`],
    /// whenever it is woken up and checks its root ports' devices; the hub
    /// also calls it on every transfer it receives.
    ///
    /// It also passes on remote wakeup (§11.9): a device on a suspended
    /// port that signals resume gets its port resumed (C_PORT_SUSPEND);
    /// if the hub itself is suspended with remote wakeup enabled, that or
    /// a connection change makes the hub signal resume upstream
    /// ([`UsbDevice::remote_wakeup`]).
    pub fn poll_connections(&mut self) {
        let mut changed = false;
        for p in &mut self.ports {
            if let Some(h) = p.device.as_mut().and_then(|d| d.as_hub()) {
                h.poll_connections();
            }
            changed |= p.refresh_connection();
            if p.status & SUSPEND != 0 {
                if let Some(d) = p.device.as_mut() {
                    if d.remote_wakeup() {
                        d.suspend(false);
                        p.status &= !SUSPEND;
                        p.change |= C_SUSPEND;
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.port_changed();
        }
    }

    /// A port change bit was set: reported on the status change endpoint,
    /// and, on a suspended hub with remote wakeup enabled, signalled
    /// upstream (§11.4.4: connect, disconnect and resume events wake it).
    fn port_changed(&mut self) {
        if self.suspended && self.std.remote_wakeup_enabled() && !self.wake_request {
            self.wake_request = true;
            if let Some(w) = &self.wakeup {
                w.wake();
            }
        }
        self.report_changes();
    }

    /// The USB address of the device on `port` (0 until the controller
    /// records its SET_ADDRESS, and again after a reset, power-off,
    /// disconnect or disable). Controllers without a device context
    /// (EHCI, UHCI) route transactions by it.
    pub fn address_of(&self, port: u8) -> u8 {
        self.port(port).map_or(0, |p| p.address)
    }

    /// Records the address the device on `port` took with SET_ADDRESS.
    pub fn set_address_of(&mut self, port: u8, addr: u8) {
        if let Some(p) = self.port_mut(port) {
            p.address = addr;
        }
    }

    /// The status change bitmap: bit 0 the hub, bit N port N.
    fn change_bitmap(&self) -> u16 {
        let ports = self
            .ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.change != 0)
            .fold(0u16, |m, (i, _)| m | 1 << (i + 1));
        ports | u16::from(self.hub_change != 0)
    }

    /// Completes the parked status change transfers if there is a change
    /// to report.
    fn report_changes(&mut self) {
        let map = self.change_bitmap();
        if map == 0 {
            return;
        }
        let n = bitmap_len(self.port_count());
        let bytes = map.to_le_bytes();
        for t in self.parked.drain(..) {
            send_bitmap(t, &bytes[..n]);
        }
    }

    fn fail_parked(&mut self, status: TransferStatus) {
        for t in self.parked.drain(..) {
            t.complete(status, 0);
        }
    }

    fn power_off_all(&mut self) {
        for p in &mut self.ports {
            p.power_off();
        }
    }

    fn control(&mut self, xfer: Transfer, setup: SetupPacket) {
        // The hub takes no OUT data stage (SET_DESCRIPTOR stalls); an OUT
        // request's data is acknowledged as moved.
        let ack = if setup.direction() == Direction::Out {
            xfer.len().min(usize::from(setup.length))
        } else {
            0
        };
        match self.std.handle(&setup, &[]) {
            StdOutcome::Data(v) => complete_in(xfer, &v),
            StdOutcome::NoData | StdOutcome::InterfaceSet { .. } => {
                xfer.complete(TransferStatus::Success, ack)
            }
            StdOutcome::Stall => xfer.complete(TransferStatus::Stall, 0),
            StdOutcome::ClearHalt(_) => {
                xfer.complete(TransferStatus::Success, ack);
                self.report_changes();
            }
            StdOutcome::SetHalt(_) => {
                xfer.complete(TransferStatus::Success, ack);
                self.fail_parked(TransferStatus::Stall);
            }
            StdOutcome::Configured(v) => {
                xfer.complete(TransferStatus::Success, ack);
                if v == 0 {
                    self.power_off_all();
                    self.fail_parked(TransferStatus::Stall);
                }
            }
            StdOutcome::NotStandard => match self.class_request(setup) {
                Some(data) if setup.direction() == Direction::In => complete_in(xfer, &data),
                Some(_) => {
                    xfer.complete(TransferStatus::Success, ack);
                    self.report_changes();
                }
                None => {
                    guest_warn!(
                        target: "usb::hub",
                        "hub request {:02x}/{:02x} value {:#06x} index {:#06x} stalled",
                        setup.request_type,
                        setup.request,
                        setup.value,
                        setup.index
                    );
                    xfer.complete(TransferStatus::Stall, 0);
                }
            },
        }
    }

    /// A hub class request (USB 2.0 §11.24.2): the IN data (cut to
    /// wLength), or an empty vector for OUT requests; `None` to STALL.
    fn class_request(&mut self, s: SetupPacket) -> Option<Vec<u8>> {
        use request::*;
        let [port, selector] = s.index.to_le_bytes();
        let mut data = match (s.request_type, s.request) {
            (0xa0, GET_DESCRIPTOR) if s.value >> 8 == u16::from(DT_HUB) && s.index == 0 => {
                self.hub_descriptor()
            }
            (0xa0, GET_STATUS) if s.value == 0 && s.index == 0 => {
                // wHubStatus: local power good, no over-current.
                let c = self.hub_change.to_le_bytes();
                vec![0, 0, c[0], c[1]]
            }
            (0x20, CLEAR_FEATURE) if s.index == 0 => {
                let bit = match s.value {
                    feature::C_HUB_LOCAL_POWER => 1,
                    feature::C_HUB_OVER_CURRENT => 2,
                    _ => return None,
                };
                self.hub_change &= !bit;
                Vec::new()
            }
            (0xa3, GET_STATUS) if s.value == 0 && selector == 0 => {
                let (st, ch) = self.port_status(port)?;
                let (st, ch) = (st.to_le_bytes(), ch.to_le_bytes());
                vec![st[0], st[1], ch[0], ch[1]]
            }
            (0x23, SET_FEATURE) => {
                self.set_port_feature(port, s.value, selector)?;
                Vec::new()
            }
            (0x23, CLEAR_FEATURE) => {
                self.clear_port_feature(port, s.value, selector)?;
                Vec::new()
            }
            // wIndex is the TT port: 1 for a single-TT hub (any existing
            // port is accepted). Nothing is buffered in the emulated TT.
            (0x23, CLEAR_TT_BUFFER) if selector == 0 => {
                self.port(port)?;
                Vec::new()
            }
            (0x23, RESET_TT) if s.value == 0 && selector == 0 => {
                self.port(port)?;
                self.tt_stopped = false;
                Vec::new()
            }
            (0x23, STOP_TT) if s.value == 0 && selector == 0 => {
                self.port(port)?;
                self.tt_stopped = true;
                Vec::new()
            }
            // Only valid on a stopped TT (§11.24.2.6); the vendor-specific
            // state of an empty TT is empty.
            (0xa3, GET_TT_STATE) if selector == 0 && self.tt_stopped => {
                self.port(port)?;
                Vec::new()
            }
            _ => return None,
        };
        data.truncate(usize::from(s.length));
        Some(data)
    }

    /// SetPortFeature (§11.24.2.13); `None` for a request error.
    fn set_port_feature(&mut self, port: u8, value: u16, selector: u8) -> Option<()> {
        let p = self.port_mut(port)?;
        match value {
            feature::PORT_POWER if selector == 0 => {
                p.status |= POWER;
                p.refresh_connection();
            }
            feature::PORT_RESET if selector == 0 => {
                // Ignored on a powered-off port; on an empty one it
                // completes without enabling (Linux then sees no device).
                if p.powered() {
                    if p.status & CONNECTION != 0 {
                        if let Some(d) = p.device.as_mut() {
                            d.reset();
                            p.address = 0;
                        }
                        p.status = (p.status | ENABLE) & !SUSPEND;
                    }
                    p.change |= C_RESET;
                }
            }
            feature::PORT_SUSPEND if selector == 0 => {
                if p.status & (ENABLE | SUSPEND) == ENABLE {
                    p.status |= SUSPEND;
                    if let Some(d) = p.device.as_mut() {
                        d.suspend(true);
                    }
                }
            }
            // Test selectors J, K, SE0_NAK, Packet, Force_Enable (§7.1.20);
            // the port leaves test mode only by a hub reset.
            feature::PORT_TEST if (1..=5).contains(&selector) => p.status |= TEST,
            // Selectors: 0 automatic, 1 amber, 2 green, 3 off.
            feature::PORT_INDICATOR if selector <= 3 => {
                if selector == 0 {
                    p.status &= !INDICATOR;
                } else {
                    p.status |= INDICATOR;
                }
            }
            _ => return None,
        }
        Some(())
    }

    /// ClearPortFeature (§11.24.2.2); `None` for a request error.
    fn clear_port_feature(&mut self, port: u8, value: u16, selector: u8) -> Option<()> {
        let p = self.port_mut(port)?;
        if selector != 0 && value != feature::PORT_INDICATOR {
            return None;
        }
        match value {
            feature::PORT_ENABLE => {
                p.status &= !(ENABLE | SUSPEND);
                p.address = 0;
            }
            feature::PORT_SUSPEND => {
                // Resume completes at once.
                if p.status & SUSPEND != 0 {
                    p.status &= !SUSPEND;
                    p.change |= C_SUSPEND;
                    if let Some(d) = p.device.as_mut() {
                        d.suspend(false);
                    }
                }
            }
            feature::PORT_POWER => p.power_off(),
            feature::PORT_INDICATOR => p.status &= !INDICATOR,
            feature::C_PORT_CONNECTION => p.change &= !C_CONNECTION,
            feature::C_PORT_ENABLE => p.change &= !C_ENABLE,
            feature::C_PORT_SUSPEND => p.change &= !C_SUSPEND,
            feature::C_PORT_OVER_CURRENT => p.change &= !C_OVER_CURRENT,
            feature::C_PORT_RESET => p.change &= !C_RESET,
            _ => return None,
        }
        Some(())
    }
}

/// Completes a status change transfer with `bitmap`: a buffer too short
/// for it babbles, a longer one ends short.
fn send_bitmap(xfer: Transfer, bitmap: &[u8]) {
    match xfer.write_data(0, bitmap) {
        Ok(n) => {
            let status = match xfer.len() {
                l if l < bitmap.len() => TransferStatus::Babble,
                l if l > bitmap.len() => TransferStatus::ShortPacket,
                _ => TransferStatus::Success,
            };
            xfer.complete(status, n);
        }
        Err(e) => {
            guest_warn!(target: "usb::hub", "status change buffer not accessible: {e}");
            xfer.complete(TransferStatus::TransactionError, 0);
        }
    }
}

impl HubPorts for Hub {
    fn port_count(&self) -> u8 {
        u8::try_from(self.ports.len()).unwrap_or(MAX_PORTS)
    }

    fn port_enabled(&self, port: u8) -> bool {
        self.port(port).is_some_and(|p| p.status & ENABLE != 0)
    }

    fn port_device(&mut self, port: u8) -> Option<&mut (dyn UsbDevice + 'static)> {
        let p = self.port_mut(port)?;
        let reachable = POWER | CONNECTION | ENABLE;
        if p.status & (reachable | SUSPEND) != reachable {
            return None;
        }
        // A device that vanished since the last poll answers nothing.
        p.device.as_deref_mut().filter(|d| d.connected())
    }

    fn attached_device(&mut self, port: u8) -> Option<&mut (dyn UsbDevice + 'static)> {
        self.port_mut(port)?.device.as_deref_mut()
    }

    fn poll_connections(&mut self) {
        Hub::poll_connections(self);
    }
}

impl UsbDevice for Hub {
    fn name(&self) -> String {
        format!("hub ({} ports)", self.ports.len())
    }

    fn speed(&self) -> Speed {
        Speed::High
    }

    fn reset(&mut self) {
        self.std.reset();
        self.power_off_all();
        self.hub_change = 0;
        self.tt_stopped = false;
        self.suspended = false;
        self.wake_request = false;
        self.fail_parked(TransferStatus::Cancelled);
    }

    fn suspend(&mut self, suspended: bool) {
        self.suspended = suspended;
        self.wake_request = false;
    }

    fn remote_wakeup(&mut self) -> bool {
        self.suspended && std::mem::take(&mut self.wake_request)
    }

    fn submit(&mut self, xfer: Transfer) {
        self.poll_connections();
        match (xfer.kind(), xfer.endpoint(), xfer.direction()) {
            (TransferKind::Control(setup), 0, _) => self.control(xfer, setup),
            (TransferKind::Interrupt, 1, Direction::In) if self.std.is_configured() => {
                if self.std.is_halted(EP_STATUS) {
                    xfer.complete(TransferStatus::Stall, 0);
                } else {
                    self.parked.push_back(xfer);
                    self.report_changes();
                }
            }
            (kind, ep, dir) => {
                guest_warn!(target: "usb::hub", "transfer {kind:?} on endpoint {ep} {dir:?} rejected");
                xfer.complete(TransferStatus::Stall, 0);
            }
        }
    }

    fn cancel(&mut self, id: TransferId) {
        if let Some(i) = self.parked.iter().position(|t| t.id() == id) {
            if let Some(t) = self.parked.remove(i) {
                t.complete(TransferStatus::Cancelled, 0);
            }
        }
    }

    fn set_wakeup(&mut self, wakeup: Wakeup) {
        for d in self.ports.iter_mut().filter_map(|p| p.device.as_mut()) {
            d.set_wakeup(wakeup.clone());
        }
        self.wakeup = Some(wakeup);
    }

    fn is_interrupt_endpoint(&self, address: u8) -> bool {
        address == EP_STATUS
    }

    fn as_hub(&mut self) -> Option<&mut dyn HubPorts> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
