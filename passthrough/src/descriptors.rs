//! The host device's descriptors as usbfs hands them over (device
//! descriptor, then each configuration with its interfaces, endpoints and
//! class descriptors; USB 3.2 §9.6), and the rewrite that presents a
//! SuperSpeed device on a USB 2 root port (what QEMU's usb-host does with
//! its speed-compat check, see `docs/design.md`).
//!
//! The device is not trusted more than a guest: every length is checked,
//! and malformed descriptors are errors, never panics.

/// Descriptor types (USB 3.2 table 9-6).
pub mod dt {
    /// DEVICE.
    pub const DEVICE: u8 = 1;
    /// CONFIGURATION.
    pub const CONFIG: u8 = 2;
    /// INTERFACE.
    pub const INTERFACE: u8 = 4;
    /// ENDPOINT.
    pub const ENDPOINT: u8 = 5;
    /// SUPERSPEED_USB_ENDPOINT_COMPANION.
    pub const SS_EP_COMPANION: u8 = 0x30;
    /// SUPERSPEEDPLUS_ISOCHRONOUS_ENDPOINT_COMPANION.
    pub const SSP_ISO_COMPANION: u8 = 0x31;
}

/// Why the descriptors could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// Shorter than a device descriptor, or not one.
    #[error("no valid device descriptor")]
    BadDevice,
    /// A configuration's header or wTotalLength is inconsistent.
    #[error("configuration {0} is malformed")]
    BadConfig(usize),
}

/// One endpoint of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Interface number it belongs to.
    pub interface: u8,
    /// Alternate setting.
    pub alt: u8,
    /// bEndpointAddress.
    pub address: u8,
    /// Transfer type (bmAttributes & 3).
    pub ep_type: u8,
    /// wMaxPacketSize (bits 10..0 size, 12..11 extra transactions).
    pub max_packet: u16,
    /// MaxStreams from the SuperSpeed companion (bulk), 0 if none.
    pub max_streams: u8,
}

/// The device and configuration descriptors of a host device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDescriptors {
    /// The 18-byte device descriptor.
    pub device: Vec<u8>,
    /// Each configuration descriptor set, wTotalLength bytes.
    pub configs: Vec<Vec<u8>>,
}

/// Walks the descriptors inside one configuration blob: (offset, type).
fn walk(cfg: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        if off + 2 > cfg.len() {
            return None;
        }
        let len = cfg[off] as usize;
        if len < 2 || off + len > cfg.len() {
            return None;
        }
        let here = off;
        off += len;
        Some((here, cfg[here + 1]))
    })
}

impl HostDescriptors {
    /// Splits what `read()` on a usbfs node returns.
    pub fn parse(blob: &[u8]) -> Result<HostDescriptors, DescriptorError> {
        if blob.len() < 18 || blob[0] != 18 || blob[1] != dt::DEVICE {
            return Err(DescriptorError::BadDevice);
        }
        let device = blob[..18].to_vec();
        let n = device[17] as usize;
        let mut configs = Vec::new();
        let mut off = 18usize;
        for i in 0..n {
            let Some(h) = blob.get(off..off + 9) else {
                return Err(DescriptorError::BadConfig(i));
            };
            let total = u16::from_le_bytes([h[2], h[3]]) as usize;
            if h[0] < 9 || h[1] != dt::CONFIG || total < 9 {
                return Err(DescriptorError::BadConfig(i));
            }
            let Some(c) = blob.get(off..off + total) else {
                return Err(DescriptorError::BadConfig(i));
            };
            configs.push(c.to_vec());
            off += total;
        }
        Ok(HostDescriptors { device, configs })
    }

    /// idVendor.
    pub fn vendor(&self) -> u16 {
        u16::from_le_bytes([self.device[8], self.device[9]])
    }

    /// idProduct.
    pub fn product(&self) -> u16 {
        u16::from_le_bytes([self.device[10], self.device[11]])
    }

    /// The configuration whose bConfigurationValue is `value`.
    pub fn config(&self, value: u8) -> Option<&[u8]> {
        self.configs
            .iter()
            .find(|c| c.get(5) == Some(&value))
            .map(Vec::as_slice)
    }

    /// The distinct interface numbers of configuration `value`, in order.
    pub fn interfaces(&self, value: u8) -> Vec<u8> {
        let Some(cfg) = self.config(value) else {
            return Vec::new();
        };
        let mut v: Vec<u8> = walk(cfg)
            .filter(|&(o, t)| t == dt::INTERFACE && cfg[o] >= 9)
            .map(|(o, _)| cfg[o + 2])
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Every endpoint of every configuration.
    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        let mut out: Vec<EndpointInfo> = Vec::new();
        for cfg in &self.configs {
            let (mut iface, mut alt) = (0u8, 0u8);
            for (o, t) in walk(cfg) {
                match t {
                    dt::INTERFACE if cfg[o] >= 9 => {
                        iface = cfg[o + 2];
                        alt = cfg[o + 3];
                    }
                    dt::ENDPOINT if cfg[o] >= 7 => out.push(EndpointInfo {
                        interface: iface,
                        alt,
                        address: cfg[o + 2],
                        ep_type: cfg[o + 3] & 3,
                        max_packet: u16::from_le_bytes([cfg[o + 4], cfg[o + 5]]),
                        max_streams: 0,
                    }),
                    dt::SS_EP_COMPANION if cfg[o] >= 6 => {
                        if let Some(e) = out.last_mut().filter(|e| e.ep_type == 2) {
                            e.max_streams = cfg[o + 3] & 0x1f;
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// Whether a SuperSpeed device can be shown as high speed: no
    /// isochronous endpoints, no bulk streams, interrupt packets of at most
    /// 1024 bytes (QEMU's `usb_host_speed_compat` rules).
    pub fn high_speed_compatible(&self) -> bool {
        self.endpoints().iter().all(|e| match e.ep_type {
            1 => false,
            2 => e.max_streams == 0,
            3 => e.max_packet & 0x7ff <= 1024,
            _ => true,
        })
    }

    /// The descriptors a high-speed twin of this SuperSpeed device would
    /// have: bcdUSB 2.00 and a 64-byte ep0 in the device descriptor;
    /// SuperSpeed companions dropped, bulk max packet 512, bMaxPower in
    /// 2 mA units, and wTotalLength fixed in each configuration.
    pub fn as_high_speed(&self) -> HostDescriptors {
        let mut device = self.device.clone();
        device[2..4].copy_from_slice(&0x0200u16.to_le_bytes());
        device[7] = 64;
        let configs = self
            .configs
            .iter()
            .map(|cfg| {
                let mut out = Vec::with_capacity(cfg.len());
                for (o, t) in walk(cfg) {
                    let d = &cfg[o..o + cfg[o] as usize];
                    match t {
                        dt::SS_EP_COMPANION | dt::SSP_ISO_COMPANION => {}
                        dt::ENDPOINT if d.len() >= 7 && d[3] & 3 == 2 => {
                            let mut e = d.to_vec();
                            let mps = u16::from_le_bytes([e[4], e[5]]).min(512);
                            e[4..6].copy_from_slice(&mps.to_le_bytes());
                            out.extend_from_slice(&e);
                        }
                        dt::CONFIG if d.len() >= 9 => {
                            let mut c = d.to_vec();
                            // SuperSpeed counts 8 mA units, USB 2 2 mA.
                            c[8] = (u32::from(c[8]) * 4).min(250) as u8;
                            out.extend_from_slice(&c);
                        }
                        _ => out.extend_from_slice(d),
                    }
                }
                if out.len() >= 4 {
                    let total = (out.len().min(0xffff) as u16).to_le_bytes();
                    out[2..4].copy_from_slice(&total);
                }
                out
            })
            .collect();
        HostDescriptors { device, configs }
    }

    /// The answer to GET_DESCRIPTOR(`dtype`, `index`) from these
    /// descriptors, if it is one of the device's or a configuration's.
    pub fn answer(&self, dtype: u8, index: u8) -> Option<&[u8]> {
        match dtype {
            dt::DEVICE if index == 0 => Some(&self.device),
            dt::CONFIG => self.configs.get(index as usize).map(Vec::as_slice),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A SuperSpeed mass-storage stick like QEMU's usb-storage.
    pub(crate) fn ss_stick() -> Vec<u8> {
        let mut v = vec![
            18, 1, 0x00, 0x03, 0, 0, 0, 9, 0x27, 0x06, 0x01, 0x00, 0, 1, 1, 2, 3, 1,
        ];
        let mut cfg = vec![9, 2, 0, 0, 1, 1, 0, 0xc0, 12];
        cfg.extend_from_slice(&[9, 4, 0, 0, 2, 8, 6, 0x50, 0]);
        cfg.extend_from_slice(&[7, 5, 0x81, 2, 0x00, 0x04, 0]);
        cfg.extend_from_slice(&[6, 0x30, 15, 0, 0, 0]);
        cfg.extend_from_slice(&[7, 5, 0x02, 2, 0x00, 0x04, 0]);
        cfg.extend_from_slice(&[6, 0x30, 15, 0, 0, 0]);
        let n = cfg.len() as u16;
        cfg[2..4].copy_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&cfg);
        v
    }

    #[test]
    fn parses_device_and_configs() {
        let d = HostDescriptors::parse(&ss_stick()).unwrap();
        assert_eq!((d.vendor(), d.product()), (0x0627, 0x0001));
        assert_eq!(d.configs.len(), 1);
        assert_eq!(d.interfaces(1), vec![0]);
        assert!(d.interfaces(2).is_empty());
        let eps = d.endpoints();
        assert_eq!(eps.len(), 2);
        assert_eq!((eps[0].address, eps[0].max_packet), (0x81, 1024));
    }

    #[test]
    fn truncated_or_lying_descriptors_are_errors() {
        let good = ss_stick();
        for cut in 0..good.len() {
            let r = HostDescriptors::parse(&good[..cut]);
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[18 + 2] = 5; // wTotalLength below a config header
        assert_eq!(
            HostDescriptors::parse(&bad),
            Err(DescriptorError::BadConfig(0))
        );
        // A zero-length descriptor inside a configuration ends the walk.
        let mut z = good;
        z[18 + 9] = 0;
        let d = HostDescriptors::parse(&z).unwrap();
        assert!(d.interfaces(1).is_empty());
        assert!(d.endpoints().is_empty());
    }

    #[test]
    fn superspeed_stick_becomes_a_high_speed_one() {
        let d = HostDescriptors::parse(&ss_stick()).unwrap();
        assert!(d.high_speed_compatible());
        let h = d.as_high_speed();
        assert_eq!(&h.device[2..4], &[0x00, 0x02]);
        assert_eq!(h.device[7], 64);
        let c = &h.configs[0];
        assert_eq!(u16::from_le_bytes([c[2], c[3]]) as usize, c.len());
        assert_eq!(c.len(), 9 + 9 + 7 + 7, "companions dropped");
        assert_eq!(c[8], 48, "12 x 8 mA = 48 x 2 mA");
        assert!(walk(c).all(|(_, t)| t != dt::SS_EP_COMPANION));
        let hp = HostDescriptors::parse(&[h.device.clone(), c.clone()].concat()).unwrap();
        assert!(hp.endpoints().iter().all(|e| e.max_packet == 512));
        assert_eq!(h.answer(dt::DEVICE, 0), Some(&h.device[..]));
        assert_eq!(h.answer(dt::CONFIG, 1), None);
    }

    #[test]
    fn iso_or_streams_are_not_high_speed_compatible() {
        let mut s = ss_stick();
        // Bulk IN companion with MaxStreams = 4.
        let comp = 18 + 9 + 9 + 7;
        assert_eq!(s[comp + 1], 0x30);
        s[comp + 3] = 4;
        let d = HostDescriptors::parse(&s).unwrap();
        assert_eq!(d.endpoints()[0].max_streams, 4);
        assert!(!d.high_speed_compatible());
        let mut i = ss_stick();
        i[18 + 9 + 9 + 3] = 1; // isochronous
        assert!(!HostDescriptors::parse(&i).unwrap().high_speed_compatible());
    }
}
