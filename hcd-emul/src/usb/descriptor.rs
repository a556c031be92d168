//! Standard USB descriptors: building them for emulated devices and parsing
//! them from untrusted bytes (USB 2.0 §9.5-9.6, USB 3.2 §9.6).
//!
//! The builder types are plain data with a `to_bytes()` that produces the
//! wire form; [`ConfigDescriptor::to_bytes`] computes `wTotalLength` and
//! `bNumInterfaces`. The parsers ([`DeviceDescriptor::parse`],
//! [`parse_config`]) accept hostile input: every length is checked against
//! the buffer, a `bLength` of 0 or 1 is an error (it would never advance),
//! and the walk is bounded by `wTotalLength` (at most 65 535 bytes), so they
//! never panic and never loop forever.

/// Descriptor type DEVICE (USB 2.0 table 9-5).
pub const DEVICE: u8 = 1;
/// Descriptor type CONFIGURATION.
pub const CONFIGURATION: u8 = 2;
/// Descriptor type STRING.
pub const STRING: u8 = 3;
/// Descriptor type INTERFACE.
pub const INTERFACE: u8 = 4;
/// Descriptor type ENDPOINT.
pub const ENDPOINT: u8 = 5;
/// Descriptor type DEVICE_QUALIFIER.
pub const DEVICE_QUALIFIER: u8 = 6;
/// Descriptor type OTHER_SPEED_CONFIGURATION.
pub const OTHER_SPEED: u8 = 7;
/// Descriptor type BOS (USB 3.2 table 9-6).
pub const BOS: u8 = 15;
/// Descriptor type DEVICE CAPABILITY.
pub const DEVICE_CAPABILITY: u8 = 16;
/// Descriptor type SUPERSPEED_USB_ENDPOINT_COMPANION.
pub const SS_ENDPOINT_COMPANION: u8 = 48;

/// Device capability type USB 2.0 EXTENSION (USB 3.2 table 9-14).
pub const CAP_USB2_EXTENSION: u8 = 2;
/// Device capability type SUPERSPEED_USB.
pub const CAP_SUPERSPEED_USB: u8 = 3;

/// Language ID of US English, the one string language we offer.
pub const LANGID_EN_US: u16 = 0x0409;

/// Why descriptor bytes could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The buffer ends before the descriptor does.
    #[error("descriptor at offset {offset} needs {need} bytes, only {have} available")]
    Truncated {
        /// Offset of the descriptor in the buffer.
        offset: usize,
        /// Bytes the descriptor needs.
        need: usize,
        /// Bytes available from `offset`.
        have: usize,
    },
    /// A `bLength` that is too small for its descriptor type (0 included).
    #[error("descriptor at offset {offset} has invalid bLength {len}")]
    BadLength {
        /// Offset of the descriptor in the buffer.
        offset: usize,
        /// The `bLength` found.
        len: u8,
    },
    /// The descriptor is not of the expected type.
    #[error("expected descriptor type {expected}, found {found}")]
    WrongType {
        /// The type wanted.
        expected: u8,
        /// The type found.
        found: u8,
    },
    /// `wTotalLength` is smaller than the configuration descriptor itself.
    #[error("wTotalLength {0} is too small")]
    BadTotalLength(u16),
    /// An endpoint or companion descriptor appears before any interface or
    /// endpoint it could belong to.
    #[error("descriptor type {found} at offset {offset} has no parent")]
    Orphan {
        /// Offset of the descriptor in the buffer.
        offset: usize,
        /// Its type.
        found: u8,
    },
}

fn need(data: &[u8], offset: usize, n: usize) -> Result<(), DescriptorError> {
    let have = data.len().saturating_sub(offset);
    if have < n {
        return Err(DescriptorError::Truncated {
            offset,
            need: n,
            have,
        });
    }
    Ok(())
}

fn le16(b: &[u8], i: usize) -> u16 {
    match (b.get(i), b.get(i + 1)) {
        (Some(&lo), Some(&hi)) => u16::from_le_bytes([lo, hi]),
        _ => 0,
    }
}

/// The device descriptor (USB 2.0 table 9-8).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceDescriptor {
    /// bcdUSB: 0x0200, 0x0210, 0x0320...
    pub bcd_usb: u16,
    /// bDeviceClass.
    pub device_class: u8,
    /// bDeviceSubClass.
    pub device_subclass: u8,
    /// bDeviceProtocol.
    pub device_protocol: u8,
    /// bMaxPacketSize0 (bytes; an exponent for SuperSpeed: 9 = 512).
    pub max_packet_size0: u8,
    /// idVendor.
    pub vendor_id: u16,
    /// idProduct.
    pub product_id: u16,
    /// bcdDevice.
    pub bcd_device: u16,
    /// iManufacturer.
    pub manufacturer_index: u8,
    /// iProduct.
    pub product_index: u8,
    /// iSerialNumber.
    pub serial_index: u8,
    /// bNumConfigurations.
    pub num_configurations: u8,
}

impl DeviceDescriptor {
    /// Size of the wire form.
    pub const LEN: usize = 18;

    /// The wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        b.extend_from_slice(&[Self::LEN as u8, DEVICE]);
        b.extend_from_slice(&self.bcd_usb.to_le_bytes());
        b.extend_from_slice(&[
            self.device_class,
            self.device_subclass,
            self.device_protocol,
            self.max_packet_size0,
        ]);
        b.extend_from_slice(&self.vendor_id.to_le_bytes());
        b.extend_from_slice(&self.product_id.to_le_bytes());
        b.extend_from_slice(&self.bcd_device.to_le_bytes());
        b.extend_from_slice(&[
            self.manufacturer_index,
            self.product_index,
            self.serial_index,
            self.num_configurations,
        ]);
        b
    }

    /// Parses a device descriptor from untrusted bytes.
    pub fn parse(data: &[u8]) -> Result<DeviceDescriptor, DescriptorError> {
        need(data, 0, 2)?;
        if data[1] != DEVICE {
            return Err(DescriptorError::WrongType {
                expected: DEVICE,
                found: data[1],
            });
        }
        if usize::from(data[0]) < Self::LEN {
            return Err(DescriptorError::BadLength {
                offset: 0,
                len: data[0],
            });
        }
        need(data, 0, Self::LEN)?;
        Ok(DeviceDescriptor {
            bcd_usb: le16(data, 2),
            device_class: data[4],
            device_subclass: data[5],
            device_protocol: data[6],
            max_packet_size0: data[7],
            vendor_id: le16(data, 8),
            product_id: le16(data, 10),
            bcd_device: le16(data, 12),
            manufacturer_index: data[14],
            product_index: data[15],
            serial_index: data[16],
            num_configurations: data[17],
        })
    }

    /// The matching device qualifier (USB 2.0 §9.6.2), for high-speed
    /// devices: the same class fields, as the device would be at the other
    /// speed.
    pub fn qualifier(&self) -> DeviceQualifier {
        DeviceQualifier {
            bcd_usb: self.bcd_usb,
            device_class: self.device_class,
            device_subclass: self.device_subclass,
            device_protocol: self.device_protocol,
            max_packet_size0: self.max_packet_size0,
            num_configurations: self.num_configurations,
        }
    }
}

/// The device qualifier descriptor (USB 2.0 table 9-9).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceQualifier {
    /// bcdUSB.
    pub bcd_usb: u16,
    /// bDeviceClass.
    pub device_class: u8,
    /// bDeviceSubClass.
    pub device_subclass: u8,
    /// bDeviceProtocol.
    pub device_protocol: u8,
    /// bMaxPacketSize0 at the other speed.
    pub max_packet_size0: u8,
    /// bNumConfigurations at the other speed.
    pub num_configurations: u8,
}

impl DeviceQualifier {
    /// The wire form (10 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![10, DEVICE_QUALIFIER];
        b.extend_from_slice(&self.bcd_usb.to_le_bytes());
        b.extend_from_slice(&[
            self.device_class,
            self.device_subclass,
            self.device_protocol,
            self.max_packet_size0,
            self.num_configurations,
            0,
        ]);
        b
    }
}

/// The SuperSpeed endpoint companion descriptor (USB 3.2 table 9-27).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SsEndpointCompanion {
    /// bMaxBurst: packets per burst minus one (0-15).
    pub max_burst: u8,
    /// bmAttributes: MaxStreams for bulk, Mult for isochronous.
    pub attributes: u8,
    /// wBytesPerInterval (periodic endpoints).
    pub bytes_per_interval: u16,
}

impl SsEndpointCompanion {
    /// Size of the wire form.
    pub const LEN: usize = 6;

    fn write(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&[
            Self::LEN as u8,
            SS_ENDPOINT_COMPANION,
            self.max_burst,
            self.attributes,
        ]);
        b.extend_from_slice(&self.bytes_per_interval.to_le_bytes());
    }
}

/// An endpoint descriptor (USB 2.0 table 9-13) with its optional
/// SuperSpeed companion and any class-specific descriptors after it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointDescriptor {
    /// bEndpointAddress: bit 7 set for IN, bits 3..0 the number.
    pub address: u8,
    /// bmAttributes: bits 1..0 transfer type (0 control, 1 iso, 2 bulk,
    /// 3 interrupt).
    pub attributes: u8,
    /// wMaxPacketSize (bits 12..11 additional transactions for HS periodic).
    pub max_packet_size: u16,
    /// bInterval.
    pub interval: u8,
    /// The SuperSpeed companion (SuperSpeed devices only).
    pub ss_companion: Option<SsEndpointCompanion>,
    /// Raw class- or vendor-specific descriptors that follow.
    pub extra: Vec<u8>,
}

impl EndpointDescriptor {
    /// Size of the wire form without companion and extras.
    pub const LEN: usize = 7;
    /// Transfer type bulk in `attributes`.
    pub const BULK: u8 = 2;
    /// Transfer type interrupt in `attributes`.
    pub const INTERRUPT: u8 = 3;

    /// A bulk endpoint.
    pub fn bulk(address: u8, max_packet_size: u16) -> Self {
        Self {
            address,
            attributes: Self::BULK,
            max_packet_size,
            ..Self::default()
        }
    }

    /// The wire form: endpoint, companion, extras.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.write(&mut b);
        b
    }

    fn write(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&[Self::LEN as u8, ENDPOINT, self.address, self.attributes]);
        b.extend_from_slice(&self.max_packet_size.to_le_bytes());
        b.push(self.interval);
        if let Some(c) = &self.ss_companion {
            c.write(b);
        }
        b.extend_from_slice(&self.extra);
    }
}

/// An interface descriptor (USB 2.0 table 9-12) with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InterfaceDescriptor {
    /// bInterfaceNumber.
    pub interface_number: u8,
    /// bAlternateSetting.
    pub alternate_setting: u8,
    /// bInterfaceClass.
    pub class: u8,
    /// bInterfaceSubClass.
    pub subclass: u8,
    /// bInterfaceProtocol.
    pub protocol: u8,
    /// iInterface.
    pub interface_index: u8,
    /// Raw class-specific descriptors between this descriptor and the
    /// first endpoint (a HID descriptor, for example).
    pub extra: Vec<u8>,
    /// The endpoints (bNumEndpoints is their count).
    pub endpoints: Vec<EndpointDescriptor>,
}

impl InterfaceDescriptor {
    /// Size of the wire form without extras and endpoints.
    pub const LEN: usize = 9;

    /// The wire form: interface, extras, endpoints.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.write(&mut b);
        b
    }

    fn write(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&[
            Self::LEN as u8,
            INTERFACE,
            self.interface_number,
            self.alternate_setting,
            u8::try_from(self.endpoints.len()).unwrap_or(u8::MAX),
            self.class,
            self.subclass,
            self.protocol,
            self.interface_index,
        ]);
        b.extend_from_slice(&self.extra);
        for e in &self.endpoints {
            e.write(b);
        }
    }
}

/// A configuration descriptor (USB 2.0 table 9-10) with everything below it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDescriptor {
    /// bConfigurationValue.
    pub configuration_value: u8,
    /// iConfiguration.
    pub configuration_index: u8,
    /// bmAttributes: bit 7 must be one, bit 6 self-powered, bit 5 remote
    /// wakeup.
    pub attributes: u8,
    /// bMaxPower in units of 2 mA (8 mA at SuperSpeed).
    pub max_power: u8,
    /// Raw descriptors between the configuration descriptor and the first
    /// interface (interface association descriptors, for example).
    pub extra: Vec<u8>,
    /// Interfaces, alternate settings included, in wire order.
    pub interfaces: Vec<InterfaceDescriptor>,
}

impl ConfigDescriptor {
    /// Size of the configuration descriptor itself.
    pub const LEN: usize = 9;
    /// bmAttributes bit 7, reserved, always set.
    pub const ATTR_ONE: u8 = 0x80;
    /// bmAttributes self-powered bit.
    pub const ATTR_SELF_POWERED: u8 = 0x40;
    /// bmAttributes remote wakeup bit.
    pub const ATTR_REMOTE_WAKEUP: u8 = 0x20;

    /// The whole configuration as returned by GET_DESCRIPTOR(CONFIGURATION).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_as(CONFIGURATION)
    }

    /// The whole configuration with descriptor type `ty` (CONFIGURATION or
    /// OTHER_SPEED), `wTotalLength` and `bNumInterfaces` computed.
    pub fn to_bytes_as(&self, ty: u8) -> Vec<u8> {
        let mut b = vec![Self::LEN as u8, ty, 0, 0];
        let mut numbers: Vec<u8> = self.interfaces.iter().map(|i| i.interface_number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        b.extend_from_slice(&[
            u8::try_from(numbers.len()).unwrap_or(u8::MAX),
            self.configuration_value,
            self.configuration_index,
            self.attributes,
            self.max_power,
        ]);
        b.extend_from_slice(&self.extra);
        for i in &self.interfaces {
            i.write(&mut b);
        }
        let total = u16::try_from(b.len()).unwrap_or(u16::MAX);
        b[2..4].copy_from_slice(&total.to_le_bytes());
        b
    }

    /// Finds an endpoint by address in any interface.
    pub fn endpoint(&self, address: u8) -> Option<&EndpointDescriptor> {
        self.interfaces
            .iter()
            .flat_map(|i| i.endpoints.iter())
            .find(|e| e.address == address)
    }

    /// Whether an interface with this number exists.
    pub fn has_interface(&self, number: u8) -> bool {
        self.interfaces.iter().any(|i| i.interface_number == number)
    }
}

/// Parses a whole configuration (configuration descriptor followed by
/// interfaces, endpoints, companions and class-specific descriptors) from
/// untrusted bytes, e.g. the answer to GET_DESCRIPTOR(CONFIGURATION).
///
/// Only the first `wTotalLength` bytes are considered; a buffer shorter than
/// `wTotalLength` is [`DescriptorError::Truncated`]. `bNumInterfaces` and
/// `bNumEndpoints` are not trusted: the walk itself decides what belongs
/// where. Descriptors longer than their type requires are accepted (the
/// extra bytes are ignored, as USB 2.0 §9.5 asks).
pub fn parse_config(data: &[u8]) -> Result<ConfigDescriptor, DescriptorError> {
    need(data, 0, 2)?;
    let ty = data[1];
    if ty != CONFIGURATION && ty != OTHER_SPEED {
        return Err(DescriptorError::WrongType {
            expected: CONFIGURATION,
            found: ty,
        });
    }
    if usize::from(data[0]) < ConfigDescriptor::LEN {
        return Err(DescriptorError::BadLength {
            offset: 0,
            len: data[0],
        });
    }
    need(data, 0, ConfigDescriptor::LEN)?;
    let total = le16(data, 2);
    if usize::from(total) < usize::from(data[0]) {
        return Err(DescriptorError::BadTotalLength(total));
    }
    need(data, 0, usize::from(total))?;
    let data = &data[..usize::from(total)];
    let mut cfg = ConfigDescriptor {
        configuration_value: data[5],
        configuration_index: data[6],
        attributes: data[7],
        max_power: data[8],
        ..ConfigDescriptor::default()
    };
    let mut off = usize::from(data[0]);
    // Each step advances by bLength >= 2, within 65 535 bytes: bounded.
    while off < data.len() {
        need(data, off, 2)?;
        let len = data[off];
        let dty = data[off + 1];
        if len < 2 {
            return Err(DescriptorError::BadLength { offset: off, len });
        }
        need(data, off, usize::from(len))?;
        let d = &data[off..off + usize::from(len)];
        let min = match dty {
            INTERFACE => InterfaceDescriptor::LEN,
            ENDPOINT => EndpointDescriptor::LEN,
            SS_ENDPOINT_COMPANION => SsEndpointCompanion::LEN,
            _ => 2,
        };
        if d.len() < min {
            return Err(DescriptorError::BadLength { offset: off, len });
        }
        match dty {
            INTERFACE => cfg.interfaces.push(InterfaceDescriptor {
                interface_number: d[2],
                alternate_setting: d[3],
                class: d[5],
                subclass: d[6],
                protocol: d[7],
                interface_index: d[8],
                extra: Vec::new(),
                endpoints: Vec::new(),
            }),
            ENDPOINT => {
                let Some(iface) = cfg.interfaces.last_mut() else {
                    return Err(DescriptorError::Orphan {
                        offset: off,
                        found: dty,
                    });
                };
                iface.endpoints.push(EndpointDescriptor {
                    address: d[2],
                    attributes: d[3],
                    max_packet_size: le16(d, 4),
                    interval: d[6],
                    ss_companion: None,
                    extra: Vec::new(),
                });
            }
            SS_ENDPOINT_COMPANION => {
                let ep = cfg
                    .interfaces
                    .last_mut()
                    .and_then(|i| i.endpoints.last_mut())
                    .filter(|e| e.ss_companion.is_none() && e.extra.is_empty());
                let Some(ep) = ep else {
                    return Err(DescriptorError::Orphan {
                        offset: off,
                        found: dty,
                    });
                };
                ep.ss_companion = Some(SsEndpointCompanion {
                    max_burst: d[2],
                    attributes: d[3],
                    bytes_per_interval: le16(d, 4),
                });
            }
            _ => {
                let extra = match cfg.interfaces.last_mut() {
                    None => &mut cfg.extra,
                    Some(i) => match i.endpoints.last_mut() {
                        None => &mut i.extra,
                        Some(e) => &mut e.extra,
                    },
                };
                extra.extend_from_slice(d);
            }
        }
        off += usize::from(len);
    }
    Ok(cfg)
}

/// The USB 2.0 Extension device capability (USB 3.2 table 9-15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usb2Extension {
    /// Link Power Management supported (bmAttributes bit 1).
    pub lpm: bool,
}

/// The SuperSpeed USB device capability (USB 3.2 table 9-16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SuperSpeedCapability {
    /// bmAttributes: bit 1 LTM capable.
    pub attributes: u8,
    /// wSpeedsSupported: bit 0 low, 1 full, 2 high, 3 5 Gb/s.
    pub speeds_supported: u16,
    /// bFunctionalitySupport: lowest speed with full functionality.
    pub functionality_support: u8,
    /// bU1DevExitLat in µs (at most 10).
    pub u1_exit_latency: u8,
    /// wU2DevExitLat in µs (at most 2047).
    pub u2_exit_latency: u16,
}

/// A Binary device Object Store (USB 3.2 §9.6.2) with the two capabilities
/// emulated devices need.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bos {
    /// The USB 2.0 Extension capability.
    pub usb2_extension: Option<Usb2Extension>,
    /// The SuperSpeed USB capability.
    pub superspeed: Option<SuperSpeedCapability>,
}

impl Bos {
    /// The BOS descriptor followed by its capabilities, `wTotalLength` and
    /// `bNumDeviceCaps` computed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![5, BOS, 0, 0, 0];
        let mut n = 0u8;
        if let Some(e) = &self.usb2_extension {
            let attrs: u32 = if e.lpm { 1 << 1 } else { 0 };
            b.extend_from_slice(&[7, DEVICE_CAPABILITY, CAP_USB2_EXTENSION]);
            b.extend_from_slice(&attrs.to_le_bytes());
            n += 1;
        }
        if let Some(s) = &self.superspeed {
            b.extend_from_slice(&[10, DEVICE_CAPABILITY, CAP_SUPERSPEED_USB, s.attributes]);
            b.extend_from_slice(&s.speeds_supported.to_le_bytes());
            b.extend_from_slice(&[s.functionality_support, s.u1_exit_latency]);
            b.extend_from_slice(&s.u2_exit_latency.to_le_bytes());
            n += 1;
        }
        let total = u16::try_from(b.len()).unwrap_or(u16::MAX);
        b[2..4].copy_from_slice(&total.to_le_bytes());
        b[4] = n;
        b
    }
}

/// String descriptor 0: the supported language IDs (USB 2.0 table 9-15).
pub fn string_langids(langids: &[u16]) -> Vec<u8> {
    // At most 126 IDs fit a one-byte bLength.
    let ids = &langids[..langids.len().min(126)];
    let mut b = vec![0, STRING];
    for id in ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    b[0] = u8::try_from(b.len()).unwrap_or(u8::MAX);
    b
}

/// A string descriptor holding `s` in UTF-16LE (USB 2.0 table 9-16),
/// truncated to the 126 code units that fit.
pub fn string_descriptor(s: &str) -> Vec<u8> {
    let mut b = vec![0, STRING];
    for u in s.encode_utf16().take(126) {
        b.extend_from_slice(&u.to_le_bytes());
    }
    b[0] = u8::try_from(b.len()).unwrap_or(u8::MAX);
    b
}

/// Decodes a string descriptor from untrusted bytes (lossy: unpaired
/// surrogates become U+FFFD).
pub fn parse_string(data: &[u8]) -> Result<String, DescriptorError> {
    need(data, 0, 2)?;
    if data[1] != STRING {
        return Err(DescriptorError::WrongType {
            expected: STRING,
            found: data[1],
        });
    }
    let len = usize::from(data[0]);
    if len < 2 {
        return Err(DescriptorError::BadLength {
            offset: 0,
            len: data[0],
        });
    }
    need(data, 0, len)?;
    let units: Vec<u16> = data[2..len]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_device() -> DeviceDescriptor {
        DeviceDescriptor {
            bcd_usb: 0x0320,
            device_class: 0,
            device_subclass: 0,
            device_protocol: 0,
            max_packet_size0: 9,
            vendor_id: 0x46f4,
            product_id: 0x0001,
            bcd_device: 0x0100,
            manufacturer_index: 1,
            product_index: 2,
            serial_index: 3,
            num_configurations: 1,
        }
    }

    fn sample_config() -> ConfigDescriptor {
        let comp = Some(SsEndpointCompanion {
            max_burst: 15,
            attributes: 0,
            bytes_per_interval: 0,
        });
        ConfigDescriptor {
            configuration_value: 1,
            configuration_index: 0,
            attributes: ConfigDescriptor::ATTR_ONE | ConfigDescriptor::ATTR_SELF_POWERED,
            max_power: 12,
            extra: vec![],
            interfaces: vec![
                InterfaceDescriptor {
                    interface_number: 0,
                    class: 8,
                    subclass: 6,
                    protocol: 0x50,
                    endpoints: vec![
                        EndpointDescriptor {
                            ss_companion: comp,
                            ..EndpointDescriptor::bulk(0x81, 1024)
                        },
                        EndpointDescriptor {
                            ss_companion: comp,
                            ..EndpointDescriptor::bulk(0x02, 1024)
                        },
                    ],
                    ..InterfaceDescriptor::default()
                },
                InterfaceDescriptor {
                    interface_number: 1,
                    class: 3,
                    extra: vec![9, 0x21, 0x11, 0x01, 0, 1, 0x22, 50, 0],
                    endpoints: vec![EndpointDescriptor {
                        address: 0x83,
                        attributes: EndpointDescriptor::INTERRUPT,
                        max_packet_size: 8,
                        interval: 10,
                        ss_companion: None,
                        extra: vec![3, 0x25, 7],
                    }],
                    ..InterfaceDescriptor::default()
                },
            ],
        }
    }

    #[test]
    fn device_descriptor_round_trips() {
        let d = sample_device();
        let b = d.to_bytes();
        assert_eq!(b.len(), 18);
        assert_eq!(&b[..4], &[18, 1, 0x20, 0x03]);
        assert_eq!(DeviceDescriptor::parse(&b).unwrap(), d);
    }

    #[test]
    fn config_round_trips_with_companions_and_extras() {
        let c = sample_config();
        let b = c.to_bytes();
        assert_eq!(usize::from(u16::from_le_bytes([b[2], b[3]])), b.len());
        assert_eq!(b[4], 2, "bNumInterfaces");
        assert_eq!(b.len(), 9 + 9 + 2 * (7 + 6) + 9 + 9 + 7 + 3);
        assert_eq!(parse_config(&b).unwrap(), c);
    }

    #[test]
    fn truncated_device_descriptor_is_an_error() {
        let b = sample_device().to_bytes();
        for n in 0..b.len() {
            assert!(DeviceDescriptor::parse(&b[..n]).is_err(), "length {n}");
        }
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(matches!(
            DeviceDescriptor::parse(&bad),
            Err(DescriptorError::BadLength { .. })
        ));
        bad = b;
        bad[1] = CONFIGURATION;
        assert!(matches!(
            DeviceDescriptor::parse(&bad),
            Err(DescriptorError::WrongType { .. })
        ));
    }

    #[test]
    fn malformed_configs_are_errors_not_panics() {
        let good = sample_config().to_bytes();
        // Every truncation: the total no longer fits.
        for n in 0..good.len() {
            assert!(parse_config(&good[..n]).is_err(), "length {n}");
        }
        // bLength 0 inside the walk.
        let mut b = good.clone();
        b[9] = 0;
        assert!(matches!(
            parse_config(&b),
            Err(DescriptorError::BadLength { offset: 9, len: 0 })
        ));
        // bLength running past wTotalLength.
        let mut b = good.clone();
        b[9] = 200;
        assert!(matches!(
            parse_config(&b),
            Err(DescriptorError::Truncated { .. })
        ));
        // wTotalLength smaller than the header.
        let mut b = good.clone();
        b[2] = 4;
        b[3] = 0;
        assert_eq!(parse_config(&b), Err(DescriptorError::BadTotalLength(4)));
        // wTotalLength larger than the buffer.
        let mut b = good.clone();
        b[2] = 0xff;
        b[3] = 0xff;
        assert!(matches!(
            parse_config(&b),
            Err(DescriptorError::Truncated { .. })
        ));
        // Endpoint before any interface.
        let b = [9, 2, 16, 0, 1, 1, 0, 0x80, 50, 7, 5, 0x81, 2, 0, 2, 0];
        assert!(matches!(
            parse_config(&b),
            Err(DescriptorError::Orphan { offset: 9, .. })
        ));
        // A too-short endpoint descriptor.
        let b = [
            9, 2, 22, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 1, 8, 6, 0x50, 0, 4, 5, 0x81, 2,
        ];
        assert!(matches!(
            parse_config(&b),
            Err(DescriptorError::BadLength { offset: 18, len: 4 })
        ));
    }

    #[test]
    fn wrong_totals_limit_the_walk() {
        let good = sample_config().to_bytes();
        // A shorter wTotalLength ends the walk there; trailing bytes ignored.
        let mut b = good.clone();
        b[2] = 18;
        b[3] = 0;
        let c = parse_config(&b).unwrap();
        assert_eq!(c.interfaces.len(), 1);
        assert!(c.interfaces[0].endpoints.is_empty());
    }

    #[test]
    fn parse_never_panics_on_random_bytes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let good = sample_config().to_bytes();
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..6) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let _ = parse_config(&b);
            let _ = DeviceDescriptor::parse(&b);
            let _ = parse_string(&b);
        }
    }

    #[test]
    fn strings_and_bos() {
        assert_eq!(string_langids(&[LANGID_EN_US]), vec![4, 3, 0x09, 0x04]);
        let s = string_descriptor("Hé");
        assert_eq!(s, vec![6, 3, b'H', 0, 0xe9, 0]);
        assert_eq!(parse_string(&s).unwrap(), "Hé");
        let long = string_descriptor(&"x".repeat(300));
        assert_eq!(long.len(), 254);
        assert_eq!(usize::from(long[0]), long.len());

        let bos = Bos {
            usb2_extension: Some(Usb2Extension { lpm: true }),
            superspeed: Some(SuperSpeedCapability {
                attributes: 0,
                speeds_supported: 0x0e,
                functionality_support: 1,
                u1_exit_latency: 0x0a,
                u2_exit_latency: 0x20,
            }),
        }
        .to_bytes();
        assert_eq!(bos.len(), 5 + 7 + 10);
        assert_eq!(&bos[..5], &[5, 15, 22, 0, 2]);
        assert_eq!(&bos[5..12], &[7, 16, 2, 2, 0, 0, 0]);
        assert_eq!(&bos[12..16], &[10, 16, 3, 0]);
    }
}
