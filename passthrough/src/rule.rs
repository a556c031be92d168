//! Which host device to pass through: by bus and address, by port path
//! (`1-2.3`: bus 1, root port 2, hub port 3), or by vendor:product
//! (optionally serial). Devices are found in sysfs
//! (`/sys/bus/usb/devices`), the same tree `lsusb -t` reads.

use std::fs;
use std::path::Path;

use hcd_emul::usb::Speed;

/// A match rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchRule {
    /// `bus` + `addr`: one enumeration of one device (a re-plugged device
    /// gets a new address, so this rule does not follow it).
    BusAddr {
        /// Bus number.
        bus: u32,
        /// Device address.
        addr: u32,
    },
    /// Whatever is plugged into this port (sysfs name, e.g. `1-2.3`).
    Port(String),
    /// Vendor and product, and the serial number if given.
    Id {
        /// idVendor.
        vendor: u16,
        /// idProduct.
        product: u16,
        /// iSerialNumber string.
        serial: Option<String>,
    },
}

/// Why a rule is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A port path that is not `BUS-PORT[.PORT...]`.
    #[error("port {0:?} is not BUS-PORT[.PORT...] (e.g. 1-2.3)")]
    BadPort(String),
    /// Address out of range.
    #[error("address {0} is not 1-127")]
    BadAddr(u32),
    /// Bus 0.
    #[error("bus {0} is not a USB bus number")]
    BadBus(u32),
}

impl MatchRule {
    /// Checks a rule's values.
    pub fn validate(&self) -> Result<(), RuleError> {
        match self {
            MatchRule::BusAddr { bus, addr } => {
                if *bus == 0 || *bus > 0xffff {
                    return Err(RuleError::BadBus(*bus));
                }
                if !(1..=127).contains(addr) {
                    return Err(RuleError::BadAddr(*addr));
                }
            }
            MatchRule::Port(p) => {
                let ok = p.split_once('-').is_some_and(|(bus, path)| {
                    let num = |s: &str| {
                        !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit())
                    };
                    num(bus)
                        && bus != "0"
                        && path.split('.').count() <= 7
                        && path.split('.').all(num)
                });
                if !ok {
                    return Err(RuleError::BadPort(p.clone()));
                }
            }
            MatchRule::Id { .. } => {}
        }
        Ok(())
    }

    /// Whether `d` is the device this rule asks for.
    pub fn matches(&self, d: &HostDeviceInfo) -> bool {
        match self {
            MatchRule::BusAddr { bus, addr } => d.bus == *bus && d.addr == *addr,
            MatchRule::Port(p) => d.port == *p,
            MatchRule::Id {
                vendor,
                product,
                serial,
            } => {
                d.vendor == *vendor
                    && d.product == *product
                    && serial.as_ref().is_none_or(|s| d.serial.as_ref() == Some(s))
            }
        }
    }
}

impl std::fmt::Display for MatchRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MatchRule::BusAddr { bus, addr } => write!(f, "bus {bus} addr {addr}"),
            MatchRule::Port(p) => write!(f, "port {p}"),
            MatchRule::Id {
                vendor,
                product,
                serial,
            } => {
                write!(f, "{vendor:04x}:{product:04x}")?;
                if let Some(s) = serial {
                    write!(f, " serial {s}")?;
                }
                Ok(())
            }
        }
    }
}

/// A USB device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDeviceInfo {
    /// busnum.
    pub bus: u32,
    /// devnum.
    pub addr: u32,
    /// The sysfs name: the port path (`1-2.3`).
    pub port: String,
    /// idVendor.
    pub vendor: u16,
    /// idProduct.
    pub product: u16,
    /// serial, if the device has one.
    pub serial: Option<String>,
    /// Speed from the `speed` attribute (Mb/s).
    pub speed: Option<Speed>,
}

fn attr(dir: &Path, name: &str) -> Option<String> {
    let s = fs::read_to_string(dir.join(name)).ok()?;
    Some(s.trim().to_string())
}

/// Maps sysfs `speed` (Mb/s) to a bus speed; SuperSpeed Plus counts as
/// SuperSpeed.
pub fn speed_from_sysfs(s: &str) -> Option<Speed> {
    match s {
        "1.5" => Some(Speed::Low),
        "12" => Some(Speed::Full),
        "480" => Some(Speed::High),
        "5000" | "10000" | "20000" => Some(Speed::Super),
        _ => None,
    }
}

/// Every USB device (root hubs and interfaces excluded) under
/// `sysfs_devices` (normally `/sys/bus/usb/devices`), sorted by port.
/// Entries that cannot be read are skipped (a device may vanish while we
/// look).
pub fn scan(sysfs_devices: &Path) -> Vec<HostDeviceInfo> {
    let Ok(rd) = fs::read_dir(sysfs_devices) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // A bus has at most 127 devices; a machine a few dozen buses.
    for e in rd.flatten().take(8192) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(':') || name.starts_with("usb") {
            continue;
        }
        let dir = e.path();
        let num = |n: &str| attr(&dir, n).and_then(|s| s.parse::<u32>().ok());
        let hex = |n: &str| attr(&dir, n).and_then(|s| u16::from_str_radix(&s, 16).ok());
        let (Some(bus), Some(addr), Some(vendor), Some(product)) = (
            num("busnum"),
            num("devnum"),
            hex("idVendor"),
            hex("idProduct"),
        ) else {
            continue;
        };
        out.push(HostDeviceInfo {
            bus,
            addr,
            port: name,
            vendor,
            product,
            serial: attr(&dir, "serial"),
            speed: attr(&dir, "speed").and_then(|s| speed_from_sysfs(&s)),
        });
    }
    out.sort_by(|a, b| a.port.cmp(&b.port));
    out
}

/// The first device `rule` matches.
pub fn find(sysfs_devices: &Path, rule: &MatchRule) -> Option<HostDeviceInfo> {
    scan(sysfs_devices).into_iter().find(|d| rule.matches(d))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fake_device(
        root: &Path,
        port: &str,
        bus: u32,
        addr: u32,
        id: (u16, u16),
        serial: Option<&str>,
    ) {
        let d = root.join(port);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("busnum"), format!("{bus}\n")).unwrap();
        fs::write(d.join("devnum"), format!("{addr}\n")).unwrap();
        fs::write(d.join("idVendor"), format!("{:04x}\n", id.0)).unwrap();
        fs::write(d.join("idProduct"), format!("{:04x}\n", id.1)).unwrap();
        fs::write(d.join("speed"), "5000\n").unwrap();
        if let Some(s) = serial {
            fs::write(d.join("serial"), format!("{s}\n")).unwrap();
        }
    }

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fake_device(t.path(), "usb1", 1, 1, (0x1d6b, 2), None);
        fake_device(t.path(), "1-0:1.0", 1, 1, (0x1d6b, 2), None);
        fake_device(t.path(), "2-1", 2, 2, (0x46f4, 1), Some("A1"));
        fake_device(t.path(), "1-2.3", 1, 5, (0x46f4, 1), Some("B2"));
        fake_device(t.path(), "1-4", 1, 7, (0x0627, 1), None);
        // Half-written entry (device vanishing): skipped.
        fs::create_dir_all(t.path().join("1-9")).unwrap();
        t
    }

    #[test]
    fn scan_skips_root_hubs_interfaces_and_unreadable_entries() {
        let t = tree();
        let all = scan(t.path());
        let ports: Vec<&str> = all.iter().map(|d| d.port.as_str()).collect();
        assert_eq!(ports, vec!["1-2.3", "1-4", "2-1"]);
        assert_eq!(all[0].speed, Some(Speed::Super));
        assert_eq!(all[0].serial.as_deref(), Some("B2"));
    }

    #[test]
    fn each_rule_kind_finds_its_device() {
        let t = tree();
        let p = t.path();
        assert_eq!(
            find(p, &MatchRule::BusAddr { bus: 1, addr: 7 })
                .unwrap()
                .port,
            "1-4"
        );
        assert_eq!(find(p, &MatchRule::Port("2-1".into())).unwrap().addr, 2);
        let by_id = MatchRule::Id {
            vendor: 0x46f4,
            product: 1,
            serial: None,
        };
        assert_eq!(find(p, &by_id).unwrap().port, "1-2.3");
        let by_serial = MatchRule::Id {
            vendor: 0x46f4,
            product: 1,
            serial: Some("A1".into()),
        };
        assert_eq!(find(p, &by_serial).unwrap().port, "2-1");
        let none = MatchRule::Id {
            vendor: 0x46f4,
            product: 1,
            serial: Some("ZZ".into()),
        };
        assert!(find(p, &none).is_none());
        assert!(
            find(p, &MatchRule::BusAddr { bus: 1, addr: 1 }).is_none(),
            "root hub"
        );
    }

    #[test]
    fn bad_rules_are_rejected() {
        for bad in [
            "",
            "1",
            "-2",
            "1-",
            "1-2.",
            "0-1",
            "a-1",
            "1-2..3",
            "1-1.1.1.1.1.1.1.1",
        ] {
            assert!(MatchRule::Port(bad.into()).validate().is_err(), "{bad:?}");
        }
        for good in ["1-2", "1-2.3", "12-1.4.2"] {
            assert!(MatchRule::Port(good.into()).validate().is_ok(), "{good:?}");
        }
        assert_eq!(
            MatchRule::BusAddr { bus: 1, addr: 0 }.validate(),
            Err(RuleError::BadAddr(0))
        );
        assert_eq!(
            MatchRule::BusAddr { bus: 0, addr: 3 }.validate(),
            Err(RuleError::BadBus(0))
        );
    }
}
