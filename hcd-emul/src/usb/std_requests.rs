//! Standard device requests for emulated devices (USB 2.0 §9.4, USB 3.2
//! §9.4).
//!
//! [`StdRequests`] holds a device's [`DescriptorSet`] and its chapter-9 state
//! (address, configuration, endpoint halt bits) and answers the standard
//! requests on the default control pipe. The device feeds it every SETUP
//! packet with [`StdRequests::handle`] and acts on the [`StdOutcome`]:
//! answer data, acknowledge, STALL, run its own class/vendor handling
//! ([`StdOutcome::NotStandard`]), or react to an endpoint halt change or a
//! new configuration.
//!
//! The halt bits live here (one per endpoint address) so GET_STATUS reports
//! what the device set with [`StdRequests::set_halted`].

use super::descriptor::{self, Bos, ConfigDescriptor, DeviceDescriptor, DeviceQualifier};
use super::{request, Direction, SetupPacket, Speed, Transfer, TransferStatus};

/// Descriptor type values in the high byte of GET_DESCRIPTOR's wValue.
const DT_DEVICE: u8 = descriptor::DEVICE;

/// Everything a device describes itself with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorSet {
    /// Speed the descriptors are for.
    pub speed: Speed,
    /// The device descriptor.
    pub device: DeviceDescriptor,
    /// The one configuration (bConfigurationValue is usually 1).
    pub config: ConfigDescriptor,
    /// The configuration at the other speed (high-speed devices; OTHER_SPEED
    /// requests STALL without it).
    pub other_speed: Option<ConfigDescriptor>,
    /// The device qualifier (high-speed devices only).
    pub qualifier: Option<DeviceQualifier>,
    /// The BOS (SuperSpeed devices only).
    pub bos: Option<Bos>,
    /// Strings 1.. (string index `i` is `strings[i - 1]`); string 0 is the
    /// language list (US English only).
    pub strings: Vec<String>,
    /// Self-powered, reported by GET_STATUS(device).
    pub self_powered: bool,
}

impl DescriptorSet {
    /// Whether endpoint `address` is a bulk endpoint with streams (its
    /// SuperSpeed companion's MaxStreams is not zero) in any alternate
    /// setting of the configuration.
    pub fn offers_streams(&self, address: u8) -> bool {
        self.config
            .interfaces
            .iter()
            .flat_map(|i| i.endpoints.iter())
            .any(|e| {
                e.address == address
                    && e.attributes & 3 == 2
                    && e.ss_companion.is_some_and(|c| c.attributes & 0x1f != 0)
            })
    }
}

/// What the device should do with a control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdOutcome {
    /// Answer the data stage with these bytes (already cut to wLength).
    Data(Vec<u8>),
    /// Acknowledge; no data.
    NoData,
    /// Answer STALL (request error).
    Stall,
    /// Not a standard request for this helper: class or vendor request, or a
    /// standard request addressed to an interface the device must answer
    /// itself (HID's GET_DESCRIPTOR(REPORT), for example).
    NotStandard,
    /// CLEAR_FEATURE(ENDPOINT_HALT) on this endpoint address: the halt bit is
    /// clear; the device resets the endpoint's data toggle / sequence number
    /// and restarts it. Acknowledge.
    ClearHalt(u8),
    /// SET_FEATURE(ENDPOINT_HALT) on this endpoint address: the halt bit is
    /// set. Acknowledge.
    SetHalt(u8),
    /// SET_CONFIGURATION with this value (0: back to the address state);
    /// every halt bit is clear. Acknowledge.
    Configured(u8),
    /// SET_INTERFACE selected `alternate` of `interface` (it exists); the
    /// interface's endpoints are no longer halted. Acknowledge.
    InterfaceSet {
        /// bInterfaceNumber.
        interface: u8,
        /// bAlternateSetting now in effect.
        alternate: u8,
    },
}

/// Most interfaces whose alternate setting is tracked.
const MAX_INTERFACES: usize = 32;

/// Chapter-9 state of a device plus its descriptors.
#[derive(Debug, Clone)]
pub struct StdRequests {
    desc: DescriptorSet,
    address: u8,
    configuration: u8,
    /// Halt bit per endpoint: bit `n` for OUT endpoint `n`, bit `16 + n`
    /// for IN endpoint `n`.
    halted: u32,
    /// Current alternate setting per interface number.
    alt: [u8; MAX_INTERFACES],
    /// SET_FEATURE(DEVICE_REMOTE_WAKEUP) is in force.
    remote_wakeup: bool,
}

fn ep_bit(addr: u8) -> u32 {
    let n = u32::from(addr & 0x0f);
    if addr & 0x80 != 0 {
        1 << (16 + n)
    } else {
        1 << n
    }
}

impl StdRequests {
    /// A device in the default state (address 0, unconfigured).
    pub fn new(desc: DescriptorSet) -> Self {
        Self {
            desc,
            address: 0,
            configuration: 0,
            halted: 0,
            alt: [0; MAX_INTERFACES],
            remote_wakeup: false,
        }
    }

    /// The descriptors.
    pub fn descriptors(&self) -> &DescriptorSet {
        &self.desc
    }

    /// Bus reset: address 0, unconfigured, no halts, remote wakeup off.
    pub fn reset(&mut self) {
        self.address = 0;
        self.configuration = 0;
        self.halted = 0;
        self.alt = [0; MAX_INTERFACES];
        self.remote_wakeup = false;
    }

    /// Whether the host enabled remote wakeup (SET_FEATURE
    /// DEVICE_REMOTE_WAKEUP; cleared by CLEAR_FEATURE and bus reset).
    pub fn remote_wakeup_enabled(&self) -> bool {
        self.remote_wakeup
    }

    /// Whether the configuration descriptor offers remote wakeup.
    fn supports_remote_wakeup(&self) -> bool {
        self.desc.config.attributes & ConfigDescriptor::ATTR_REMOTE_WAKEUP != 0
    }

    /// The alternate setting `interface` is in (0 if unknown).
    pub fn alternate(&self, interface: u8) -> u8 {
        self.alt.get(usize::from(interface)).copied().unwrap_or(0)
    }

    /// The interfaces (in their current alternate settings) of the
    /// configuration, if configured.
    fn active_interfaces(&self) -> impl Iterator<Item = &descriptor::InterfaceDescriptor> {
        let on = self.is_configured();
        self.desc
            .config
            .interfaces
            .iter()
            .filter(move |i| on && i.alternate_setting == self.alternate(i.interface_number))
    }

    /// The address from the last SET_ADDRESS.
    pub fn address(&self) -> u8 {
        self.address
    }

    /// The current configuration value (0: not configured).
    pub fn configuration(&self) -> u8 {
        self.configuration
    }

    /// Whether the device is configured.
    pub fn is_configured(&self) -> bool {
        self.configuration != 0
    }

    /// Whether endpoint `addr` (with direction bit) is halted.
    pub fn is_halted(&self, addr: u8) -> bool {
        self.halted & ep_bit(addr) != 0
    }

    /// Sets or clears the halt bit of endpoint `addr` (the device stalls an
    /// endpoint on its own, e.g. BOT's data-phase STALL).
    pub fn set_halted(&mut self, addr: u8, halted: bool) {
        if halted {
            self.halted |= ep_bit(addr);
        } else {
            self.halted &= !ep_bit(addr);
        }
    }

    fn endpoint_exists(&self, addr: u8) -> bool {
        (addr & 0x0f == 0 && addr & 0x70 == 0)
            || self
                .active_interfaces()
                .any(|i| i.endpoints.iter().any(|e| e.address == addr))
    }

    fn interface_exists(&self, index: u16) -> bool {
        self.is_configured() && u8::try_from(index).is_ok_and(|i| self.desc.config.has_interface(i))
    }

    /// Answers one SETUP packet. `data_out` is the data stage of an OUT
    /// request (SET_SEL carries six bytes; it is accepted and ignored).
    pub fn handle(&mut self, setup: &SetupPacket, data_out: &[u8]) -> StdOutcome {
        let _ = data_out;
        let kind = (setup.request_type >> 5) & 3;
        if kind != 0 {
            return StdOutcome::NotStandard;
        }
        let recipient = setup.request_type & 0x1f;
        let dir_in = setup.direction() == Direction::In;
        let ep_addr = u8::try_from(setup.index & 0xff).unwrap_or(0);
        let out = match (setup.request, dir_in, recipient) {
            (request::GET_STATUS, true, 0) => {
                let s = u8::from(self.desc.self_powered) | u8::from(self.remote_wakeup) << 1;
                StdOutcome::Data(vec![s, 0])
            }
            (request::GET_STATUS, true, 1) => {
                if self.interface_exists(setup.index) {
                    StdOutcome::Data(vec![0, 0])
                } else {
                    StdOutcome::Stall
                }
            }
            (request::GET_STATUS, true, 2) => {
                if self.endpoint_exists(ep_addr) {
                    StdOutcome::Data(vec![u8::from(self.is_halted(ep_addr)), 0])
                } else {
                    StdOutcome::Stall
                }
            }
            (request::CLEAR_FEATURE | request::SET_FEATURE, false, 2) => {
                let set = setup.request == request::SET_FEATURE;
                if setup.value != request::FEATURE_ENDPOINT_HALT || !self.endpoint_exists(ep_addr) {
                    StdOutcome::Stall
                } else if ep_addr & 0x0f == 0 {
                    // The default pipe's halt clears itself at the next SETUP.
                    StdOutcome::NoData
                } else {
                    self.set_halted(ep_addr, set);
                    if set {
                        StdOutcome::SetHalt(ep_addr)
                    } else {
                        StdOutcome::ClearHalt(ep_addr)
                    }
                }
            }
            // Remote wakeup: only where the configuration offers it (a
            // request for a feature the device lacks is a request error).
            (request::CLEAR_FEATURE | request::SET_FEATURE, false, 0)
                if setup.value == request::FEATURE_DEVICE_REMOTE_WAKEUP =>
            {
                if self.supports_remote_wakeup() {
                    self.remote_wakeup = setup.request == request::SET_FEATURE;
                    StdOutcome::NoData
                } else {
                    StdOutcome::Stall
                }
            }
            // Other device features: test mode (2), U1/U2/LTM enable
            // (48-50); interface: function suspend (0). Accepted.
            (request::CLEAR_FEATURE | request::SET_FEATURE, false, 0 | 1) => StdOutcome::NoData,
            (request::SET_ADDRESS, false, 0) => match u8::try_from(setup.value) {
                Ok(a) if a <= 127 => {
                    self.address = a;
                    StdOutcome::NoData
                }
                _ => StdOutcome::Stall,
            },
            (request::GET_DESCRIPTOR, true, 0) => self.get_descriptor(setup.value),
            (request::GET_DESCRIPTOR, _, _) => StdOutcome::NotStandard,
            (request::GET_CONFIGURATION, true, 0) => StdOutcome::Data(vec![self.configuration]),
            (request::SET_CONFIGURATION, false, 0) => {
                let v = setup.value;
                if v == 0 || v == u16::from(self.desc.config.configuration_value) {
                    self.configuration = u8::try_from(v).unwrap_or(0);
                    self.halted = 0;
                    self.alt = [0; MAX_INTERFACES];
                    StdOutcome::Configured(self.configuration)
                } else {
                    StdOutcome::Stall
                }
            }
            (request::GET_INTERFACE, true, 1) => match u8::try_from(setup.index) {
                Ok(i) if self.interface_exists(setup.index) => {
                    StdOutcome::Data(vec![self.alternate(i)])
                }
                _ => StdOutcome::Stall,
            },
            (request::SET_INTERFACE, false, 1) => self.set_interface(setup.index, setup.value),
            (request::SET_SEL | request::SET_ISOCH_DELAY, false, 0) => StdOutcome::NoData,
            // Other standard requests to an interface may be class-defined.
            (_, _, 1) => StdOutcome::NotStandard,
            _ => StdOutcome::Stall,
        };
        match out {
            StdOutcome::Data(mut v) => {
                v.truncate(usize::from(setup.length));
                StdOutcome::Data(v)
            }
            o => o,
        }
    }

    /// SET_INTERFACE (USB 2.0 §9.4.10): the alternate setting must exist;
    /// the endpoints of the new setting start unhalted.
    fn set_interface(&mut self, index: u16, value: u16) -> StdOutcome {
        let (Ok(interface), Ok(alternate)) = (u8::try_from(index), u8::try_from(value)) else {
            return StdOutcome::Stall;
        };
        let exists = self.is_configured()
            && usize::from(interface) < MAX_INTERFACES
            && self
                .desc
                .config
                .interfaces
                .iter()
                .any(|i| i.interface_number == interface && i.alternate_setting == alternate);
        if !exists {
            return StdOutcome::Stall;
        }
        self.alt[usize::from(interface)] = alternate;
        let eps: Vec<u8> = self
            .desc
            .config
            .interfaces
            .iter()
            .filter(|i| i.interface_number == interface)
            .flat_map(|i| i.endpoints.iter().map(|e| e.address))
            .collect();
        for e in eps {
            self.set_halted(e, false);
        }
        StdOutcome::InterfaceSet {
            interface,
            alternate,
        }
    }

    fn get_descriptor(&self, value: u16) -> StdOutcome {
        let [index, ty] = value.to_le_bytes();
        let d = &self.desc;
        let bytes = match ty {
            DT_DEVICE => Some(d.device.to_bytes()),
            descriptor::CONFIGURATION if index == 0 => Some(d.config.to_bytes()),
            descriptor::STRING if index == 0 => {
                Some(descriptor::string_langids(&[descriptor::LANGID_EN_US]))
            }
            descriptor::STRING => d
                .strings
                .get(usize::from(index).saturating_sub(1))
                .map(|s| descriptor::string_descriptor(s)),
            descriptor::BOS if d.speed.is_superspeed() => d.bos.as_ref().map(Bos::to_bytes),
            descriptor::DEVICE_QUALIFIER if d.speed == Speed::High => {
                d.qualifier.as_ref().map(DeviceQualifier::to_bytes)
            }
            descriptor::OTHER_SPEED if d.speed == Speed::High && index == 0 => d
                .other_speed
                .as_ref()
                .map(|c| c.to_bytes_as(descriptor::OTHER_SPEED)),
            _ => None,
        };
        match bytes {
            Some(b) => StdOutcome::Data(b),
            None => StdOutcome::Stall,
        }
    }
}

/// Completes a control transfer's IN data stage with `data` (cut to the
/// buffer): [`TransferStatus::ShortPacket`] if it is shorter than the buffer.
pub fn complete_in(xfer: Transfer, data: &[u8]) {
    match xfer.write_data(0, data) {
        Ok(n) => {
            let status = if n < xfer.len() {
                TransferStatus::ShortPacket
            } else {
                TransferStatus::Success
            };
            xfer.complete(status, n);
        }
        Err(_) => xfer.complete(TransferStatus::TransactionError, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::descriptor::{EndpointDescriptor, InterfaceDescriptor};

    fn set(speed: Speed) -> DescriptorSet {
        let device = DeviceDescriptor {
            bcd_usb: 0x0200,
            max_packet_size0: 64,
            num_configurations: 1,
            ..DeviceDescriptor::default()
        };
        DescriptorSet {
            speed,
            qualifier: Some(device.qualifier()),
            device,
            config: ConfigDescriptor {
                configuration_value: 1,
                attributes: 0xc0,
                interfaces: vec![InterfaceDescriptor {
                    endpoints: vec![
                        EndpointDescriptor::bulk(0x81, 512),
                        EndpointDescriptor::bulk(0x02, 512),
                    ],
                    ..InterfaceDescriptor::default()
                }],
                ..ConfigDescriptor::default()
            },
            other_speed: None,
            bos: None,
            strings: vec!["a".into()],
            self_powered: true,
        }
    }

    fn sp(rt: u8, req: u8, value: u16, index: u16, length: u16) -> SetupPacket {
        SetupPacket {
            request_type: rt,
            request: req,
            value,
            index,
            length,
        }
    }

    #[test]
    fn descriptors_are_cut_to_wlength_and_unknown_ones_stall() {
        let mut s = StdRequests::new(set(Speed::High));
        let o = s.handle(&sp(0x80, 6, 0x0100, 0, 8), &[]);
        assert_eq!(o, StdOutcome::Data(vec![18, 1, 0, 2, 0, 0, 0, 64]));
        let StdOutcome::Data(c) = s.handle(&sp(0x80, 6, 0x0200, 0, 255), &[]) else {
            panic!()
        };
        assert_eq!(c.len(), 9 + 9 + 7 + 7);
        assert_eq!(
            s.handle(&sp(0x80, 6, 0x0302, 0, 255), &[]),
            StdOutcome::Stall
        );
        assert_eq!(
            s.handle(&sp(0x80, 6, 0x0f00, 0, 255), &[]),
            StdOutcome::Stall
        );
        assert!(matches!(
            s.handle(&sp(0x80, 6, 0x0600, 0, 10), &[]),
            StdOutcome::Data(_)
        ));
        assert_eq!(
            s.handle(&sp(0x80, 6, 0x0700, 0, 255), &[]),
            StdOutcome::Stall
        );
        let mut ss = StdRequests::new(set(Speed::Super));
        assert_eq!(
            ss.handle(&sp(0x80, 6, 0x0600, 0, 10), &[]),
            StdOutcome::Stall
        );
    }

    #[test]
    fn configuration_and_halt_state() {
        let mut s = StdRequests::new(set(Speed::High));
        assert_eq!(s.handle(&sp(0x00, 9, 2, 0, 0), &[]), StdOutcome::Stall);
        assert_eq!(s.handle(&sp(0x82, 0, 0, 0x81, 2), &[]), StdOutcome::Stall);
        assert_eq!(
            s.handle(&sp(0x00, 9, 1, 0, 0), &[]),
            StdOutcome::Configured(1)
        );
        assert_eq!(
            s.handle(&sp(0x80, 8, 0, 0, 1), &[]),
            StdOutcome::Data(vec![1])
        );
        assert_eq!(
            s.handle(&sp(0x02, 3, 0, 0x81, 0), &[]),
            StdOutcome::SetHalt(0x81)
        );
        assert_eq!(
            s.handle(&sp(0x82, 0, 0, 0x81, 2), &[]),
            StdOutcome::Data(vec![1, 0])
        );
        assert!(!s.is_halted(0x01));
        assert_eq!(
            s.handle(&sp(0x02, 1, 0, 0x81, 0), &[]),
            StdOutcome::ClearHalt(0x81)
        );
        assert!(!s.is_halted(0x81));
        assert_eq!(s.handle(&sp(0x02, 1, 0, 0x85, 0), &[]), StdOutcome::Stall);
        assert_eq!(
            s.handle(&sp(0x80, 0, 0, 0, 2), &[]),
            StdOutcome::Data(vec![1, 0])
        );
        assert_eq!(s.handle(&sp(0x01, 11, 1, 0, 0), &[]), StdOutcome::Stall);
        assert_eq!(
            s.handle(&sp(0x01, 11, 0, 0, 0), &[]),
            StdOutcome::InterfaceSet {
                interface: 0,
                alternate: 0
            }
        );
        assert_eq!(
            s.handle(&sp(0x21, 0xff, 0, 0, 0), &[]),
            StdOutcome::NotStandard
        );
        assert_eq!(
            s.handle(&sp(0x81, 6, 0x2200, 0, 64), &[]),
            StdOutcome::NotStandard
        );
        assert_eq!(s.handle(&sp(0x00, 5, 200, 0, 0), &[]), StdOutcome::Stall);
        assert_eq!(s.handle(&sp(0x00, 5, 7, 0, 0), &[]), StdOutcome::NoData);
        assert_eq!(s.address(), 7);
        s.reset();
        assert_eq!((s.address(), s.configuration()), (0, 0));
    }

    #[test]
    fn alternate_settings_select_their_endpoints() {
        let mut d = set(Speed::High);
        let alt1 = InterfaceDescriptor {
            interface_number: 0,
            alternate_setting: 1,
            endpoints: vec![EndpointDescriptor::bulk(0x83, 512)],
            ..InterfaceDescriptor::default()
        };
        d.config.interfaces.push(alt1);
        let mut s = StdRequests::new(d);
        assert_eq!(
            s.handle(&sp(0x00, 9, 1, 0, 0), &[]),
            StdOutcome::Configured(1)
        );
        // Alternate 0's endpoint exists, alternate 1's does not yet.
        assert_eq!(
            s.handle(&sp(0x82, 0, 0, 0x81, 2), &[]),
            StdOutcome::Data(vec![0, 0])
        );
        assert_eq!(s.handle(&sp(0x82, 0, 0, 0x83, 2), &[]), StdOutcome::Stall);
        s.set_halted(0x81, true);
        assert_eq!(
            s.handle(&sp(0x01, 11, 1, 0, 0), &[]),
            StdOutcome::InterfaceSet {
                interface: 0,
                alternate: 1
            }
        );
        assert_eq!(s.alternate(0), 1);
        assert_eq!(
            s.handle(&sp(0x81, 10, 0, 0, 1), &[]),
            StdOutcome::Data(vec![1])
        );
        assert_eq!(
            s.handle(&sp(0x82, 0, 0, 0x83, 2), &[]),
            StdOutcome::Data(vec![0, 0])
        );
        assert_eq!(s.handle(&sp(0x82, 0, 0, 0x81, 2), &[]), StdOutcome::Stall);
        // Back to 0: its endpoint starts unhalted. Missing settings and
        // interfaces stall; so does a 16-bit value.
        assert_eq!(
            s.handle(&sp(0x01, 11, 0, 0, 0), &[]),
            StdOutcome::InterfaceSet {
                interface: 0,
                alternate: 0
            }
        );
        assert!(!s.is_halted(0x81));
        assert_eq!(s.handle(&sp(0x01, 11, 2, 0, 0), &[]), StdOutcome::Stall);
        assert_eq!(s.handle(&sp(0x01, 11, 0, 1, 0), &[]), StdOutcome::Stall);
        assert_eq!(s.handle(&sp(0x01, 11, 0x101, 0, 0), &[]), StdOutcome::Stall);
        // SET_CONFIGURATION and reset go back to alternate 0.
        s.handle(&sp(0x01, 11, 1, 0, 0), &[]);
        s.handle(&sp(0x00, 9, 1, 0, 0), &[]);
        assert_eq!(s.alternate(0), 0);
        s.handle(&sp(0x01, 11, 1, 0, 0), &[]);
        s.reset();
        assert_eq!(s.alternate(0), 0);
    }
}
