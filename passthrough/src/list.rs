//! What `xen-usb-dm list` shows of the host's USB devices: the sysfs
//! identity [`scan`] gives (the fields match rules use) plus what an admin
//! needs to pick one: strings, class, interfaces with their bound kernel
//! drivers, and whether this process could open the device's usbfs node.

use std::fs;
use std::path::Path;

use crate::rule::{scan, HostDeviceInfo};

/// One interface of the active configuration (`1-2:1.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// The sysfs name (`PORT:CONFIG.INTERFACE`).
    pub name: String,
    /// bInterfaceClass, bInterfaceSubClass, bInterfaceProtocol.
    pub class: (u8, u8, u8),
    /// The kernel driver bound to it (`usb-storage`, `usbhid`, `usbfs`
    /// when a process claimed it), if any.
    pub driver: Option<String>,
}

/// One host USB device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListing {
    /// The fields match rules look at.
    pub info: HostDeviceInfo,
    /// `manufacturer` string.
    pub manufacturer: Option<String>,
    /// `product` string.
    pub product_name: Option<String>,
    /// bcdUSB as sysfs prints it (`2.00`, `3.20`).
    pub usb_version: Option<String>,
    /// bDeviceClass (0: per interface).
    pub class: Option<u8>,
    /// The interfaces, sorted by name.
    pub interfaces: Vec<InterfaceInfo>,
}

fn attr(dir: &Path, name: &str) -> Option<String> {
    let s = fs::read_to_string(dir.join(name)).ok()?;
    Some(s.trim().to_string())
}

fn hex8(dir: &Path, name: &str) -> Option<u8> {
    attr(dir, name).and_then(|s| u8::from_str_radix(&s, 16).ok())
}

/// Every device [`scan`] finds under `sysfs_devices`, with its strings and
/// interfaces. A device that vanishes meanwhile keeps what was read.
pub fn list(sysfs_devices: &Path) -> Vec<DeviceListing> {
    let names: Vec<String> = fs::read_dir(sysfs_devices)
        .map(|rd| {
            rd.flatten()
                .take(8192)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(':'))
                .collect()
        })
        .unwrap_or_default();
    scan(sysfs_devices)
        .into_iter()
        .map(|info| {
            let dir = sysfs_devices.join(&info.port);
            let prefix = format!("{}:", info.port);
            let mut interfaces: Vec<InterfaceInfo> = names
                .iter()
                .filter(|n| n.starts_with(&prefix))
                .map(|n| {
                    let d = sysfs_devices.join(n);
                    let driver = fs::read_link(d.join("driver"))
                        .ok()
                        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
                    InterfaceInfo {
                        name: n.clone(),
                        class: (
                            hex8(&d, "bInterfaceClass").unwrap_or(0),
                            hex8(&d, "bInterfaceSubClass").unwrap_or(0),
                            hex8(&d, "bInterfaceProtocol").unwrap_or(0),
                        ),
                        driver,
                    }
                })
                .collect();
            interfaces.sort_by(|a, b| a.name.cmp(&b.name));
            DeviceListing {
                manufacturer: attr(&dir, "manufacturer"),
                product_name: attr(&dir, "product"),
                usb_version: attr(&dir, "version"),
                class: hex8(&dir, "bDeviceClass"),
                interfaces,
                info,
            }
        })
        .collect()
}

/// The usbfs node of a device under `devfs` (normally `/dev/bus/usb`).
pub fn usbfs_path(devfs: &Path, d: &HostDeviceInfo) -> std::path::PathBuf {
    devfs.join(format!("{:03}/{:03}", d.bus, d.addr))
}

/// Whether this process can open the device's usbfs node read-write (what
/// passthrough needs). Opening claims nothing: the node is closed again.
pub fn openable(devfs: &Path, d: &HostDeviceInfo) -> Result<(), std::io::Error> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(usbfs_path(devfs, d))
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::fake_device;

    #[test]
    fn listing_reads_strings_interfaces_and_drivers() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        fake_device(p, "1-2", 1, 3, (0x46f4, 1), Some("S1"));
        fs::write(p.join("1-2/manufacturer"), "QEMU\n").unwrap();
        fs::write(p.join("1-2/product"), "QEMU USB HARDDRIVE\n").unwrap();
        fs::write(p.join("1-2/version"), " 2.00\n").unwrap();
        fs::write(p.join("1-2/bDeviceClass"), "00\n").unwrap();
        let i = p.join("1-2:1.0");
        fs::create_dir_all(&i).unwrap();
        fs::write(i.join("bInterfaceClass"), "08\n").unwrap();
        fs::write(i.join("bInterfaceSubClass"), "06\n").unwrap();
        fs::write(i.join("bInterfaceProtocol"), "50\n").unwrap();
        let drv = p.join("drivers/usb-storage");
        fs::create_dir_all(&drv).unwrap();
        std::os::unix::fs::symlink(&drv, i.join("driver")).unwrap();
        // A second device without strings or interfaces.
        fake_device(p, "1-2.1", 1, 4, (0x0627, 1), None);
        let l = list(p);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].info.port, "1-2");
        assert_eq!(l[0].manufacturer.as_deref(), Some("QEMU"));
        assert_eq!(l[0].product_name.as_deref(), Some("QEMU USB HARDDRIVE"));
        assert_eq!(l[0].usb_version.as_deref(), Some("2.00"));
        assert_eq!(l[0].class, Some(0));
        assert_eq!(
            l[0].interfaces,
            vec![InterfaceInfo {
                name: "1-2:1.0".into(),
                class: (8, 6, 0x50),
                driver: Some("usb-storage".into()),
            }]
        );
        assert_eq!(l[1].info.port, "1-2.1");
        assert!(l[1].interfaces.is_empty(), "1-2:1.0 is not 1-2.1's");
        assert_eq!(l[1].manufacturer, None);
    }

    #[test]
    fn openable_reports_a_missing_node() {
        let t = tempfile::tempdir().unwrap();
        let d = HostDeviceInfo {
            bus: 1,
            addr: 3,
            port: "1-2".into(),
            vendor: 1,
            product: 2,
            serial: None,
            speed: None,
        };
        assert_eq!(usbfs_path(t.path(), &d), t.path().join("001/003"));
        assert!(openable(t.path(), &d).is_err());
        fs::create_dir_all(t.path().join("001")).unwrap();
        fs::write(t.path().join("001/003"), b"").unwrap();
        assert!(openable(t.path(), &d).is_ok());
    }
}
