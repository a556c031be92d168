//! `xen-dm.toml`: one controller, one transport, any number of devices.
//!
//! Unknown keys are errors (a typo must not silently drop a device); every
//! error names the key or file it is about.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Configuration errors, one line each.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// Configuration file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or schema error (names the key).
    #[error("{path}: {msg}")]
    Parse {
        /// Configuration file.
        path: PathBuf,
        /// The parser's message, flattened to one line.
        msg: String,
    },
    /// A value is wrong.
    #[error("{path}: {key}: {msg}")]
    Invalid {
        /// Configuration file.
        path: PathBuf,
        /// The offending key, e.g. `device[0].image`.
        key: String,
        /// Why.
        msg: String,
    },
}

/// Controller model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// xHCI (USB 3).
    Xhci,
    /// EHCI (USB 2), full- and low-speed devices behind its built-in hub.
    Ehci,
    /// UHCI (USB 1.1), full- and low-speed devices on its two ports.
    Uhci,
}

/// `[controller]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// Controller model.
    pub model: Model,
}

/// Transport kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// vfio-user server on a UNIX socket.
    VfioUser,
    /// Xen ioreq server next to qemu-xen.
    Xen,
}

/// `[transport]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transport {
    /// Transport kind.
    pub kind: TransportKind,
    /// vfio-user: the socket path to listen on.
    pub socket: Option<PathBuf>,
    /// Xen: the domain to serve, by id...
    pub domid: Option<u16>,
    /// ...or by name (resolved with `xl domid`). In wrapper mode libxl's
    /// `-xen-domid` is used instead.
    pub domain: Option<String>,
    /// Xen: our function's PCI address, `[segment:]bus:device.function`
    /// (a slot qemu-xen does not use, e.g. `00:1e.0`).
    pub pci: Option<String>,
    /// Xen: after set-up, restrict the hypervisor descriptors to the
    /// domain (implied by `uid`/`chroot`).
    #[serde(default)]
    pub restrict: bool,
    /// Xen: after set-up, switch to this user id (and `gid`).
    pub uid: Option<u32>,
    /// Xen: group id to switch to (default: `uid`).
    pub gid: Option<u32>,
    /// Xen: after set-up, chroot to this (empty) directory.
    pub chroot: Option<PathBuf>,
}

/// A parsed `pci` value.
pub fn parse_pci(s: &str) -> Option<(u16, u8, u8, u8)> {
    let (seg, rest) = match s.matches(':').count() {
        2 => {
            let (seg, rest) = s.split_once(':')?;
            (u16::from_str_radix(seg, 16).ok()?, rest)
        }
        1 => (0, s),
        _ => return None,
    };
    let (bus, devfn) = rest.split_once(':')?;
    let (dev, func) = devfn.split_once('.')?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some((seg, bus, dev, func))
}

/// Device kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// USB mass storage on an image file.
    Storage,
    /// A physical USB device of this host, passed through usbfs.
    Host,
    /// An emulated boot keyboard (HID); keys come from the control socket.
    Keyboard,
    /// An emulated boot mouse (relative motion, buttons, wheel).
    Mouse,
    /// An emulated tablet (absolute position: the guest's cursor follows
    /// the host's), as QEMU's usb-tablet.
    Tablet,
}

/// Device speed in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SpeedCfg {
    /// USB 2 full speed (storage: 64-byte bulk packets; on a USB 2 port).
    Full,
    /// USB 2 high speed (a USB 2 root port).
    High,
    /// USB 3 SuperSpeed (a USB 3 root port).
    #[default]
    Super,
}

/// `[[device]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Device kind.
    pub kind: DeviceKind,
    /// Raw image file (storage), relative to the configuration file.
    pub image: Option<PathBuf>,
    /// Read-only medium.
    #[serde(default)]
    pub readonly: bool,
    /// Storage: also offer USB Attached SCSI (UAS) as alternate setting 1
    /// (SuperSpeed with bulk streams, or high speed without; default:
    /// Bulk-Only only).
    #[serde(default)]
    pub uas: bool,
    /// Any kind: capture the device's transfers into this pcap file (Linux
    /// usbmon format), relative to the configuration file.
    pub capture: Option<PathBuf>,
    /// Data bytes kept per packet in the capture (default 1024, at most
    /// 1 MiB).
    pub capture_snaplen: Option<usize>,
    /// A capture file is rotated before it grows past this many MiB
    /// (default 64; 0: never).
    pub capture_max_mib: Option<u64>,
    /// Rotated capture files kept as FILE.1 .. FILE.N (default 4).
    pub capture_keep: Option<u32>,
    /// Bus speed (storage: default "super"; host: the root port kind,
    /// default the speed of the device found at start).
    pub speed: Option<SpeedCfg>,
    /// Host: bus number (with `addr`).
    pub bus: Option<u32>,
    /// Host: device address on `bus`.
    pub addr: Option<u32>,
    /// Host: port path, e.g. "1-2.3".
    pub port: Option<String>,
    /// Host: idVendor (with `product`).
    pub vendor: Option<u16>,
    /// Host: idProduct.
    pub product: Option<u16>,
    /// Host: serial number string (with `vendor` and `product`).
    pub serial: Option<String>,
    /// Keyboard, mouse, tablet: a host evdev node as the input source
    /// (e.g. "/dev/input/by-id/usb-...-event-kbd").
    pub evdev: Option<PathBuf>,
    /// With `evdev`: take the node exclusively while the guest has it
    /// (default true).
    pub grab: Option<bool>,
    /// With `evdev`: the keys that hand the device between host and guest
    /// ("ctrl-ctrl", the default, "alt-alt", "shift-shift", "meta-meta",
    /// "scrolllock", "ctrl-scrolllock").
    pub grab_toggle: Option<String>,
}

impl Device {
    /// The capture this device is configured with, if any (bus 1).
    pub fn capture_options(&self) -> Option<hcd_emul::capture::CaptureOptions> {
        let path = self.capture.as_ref()?;
        let mut o = hcd_emul::capture::CaptureOptions::new(path);
        if let Some(n) = self.capture_snaplen {
            o.snaplen = n;
        }
        if let Some(m) = self.capture_max_mib {
            o.max_bytes = m.saturating_mul(1 << 20);
        }
        if let Some(k) = self.capture_keep {
            o.keep = k;
        }
        Some(o)
    }

    /// Checks the keys of one device (named `label` in errors, e.g.
    /// `device[2]`) and makes its paths absolute against `base`; the error
    /// names the key (`label.key`) and what is wrong.
    pub fn resolve(&mut self, label: &str, base: &Path) -> Result<(), (String, String)> {
        match &self.capture {
            Some(c) => {
                if !c.is_absolute() {
                    self.capture = Some(base.join(c));
                }
                if self
                    .capture_snaplen
                    .is_some_and(|n| n > hcd_emul::capture::MAX_SNAPLEN)
                {
                    return Err((
                        format!("{label}.capture_snaplen"),
                        format!("at most {} bytes", hcd_emul::capture::MAX_SNAPLEN),
                    ));
                }
            }
            None => {
                let keys = [
                    ("capture_snaplen", self.capture_snaplen.is_some()),
                    ("capture_max_mib", self.capture_max_mib.is_some()),
                    ("capture_keep", self.capture_keep.is_some()),
                ];
                if let Some(k) = first_set(&keys) {
                    return Err((
                        format!("{label}.{k}"),
                        "only with capture = \"FILE.pcap\"".into(),
                    ));
                }
            }
        }
        let input_keys = [
            ("evdev", self.evdev.is_some()),
            ("grab", self.grab.is_some()),
            ("grab_toggle", self.grab_toggle.is_some()),
        ];
        if matches!(self.kind, DeviceKind::Storage | DeviceKind::Host) {
            if let Some(k) = first_set(&input_keys) {
                return Err((
                    format!("{label}.{k}"),
                    "only for an input device (keyboard, mouse, tablet)".into(),
                ));
            }
        }
        match self.kind {
            DeviceKind::Storage => {
                let Some(img) = &self.image else {
                    return Err((
                        format!("{label}.image"),
                        "required for kind = \"storage\"".into(),
                    ));
                };
                let full = if img.is_absolute() {
                    img.clone()
                } else {
                    base.join(img)
                };
                if let Err(e) = std::fs::metadata(&full) {
                    return Err((format!("{label}.image"), format!("{}: {e}", full.display())));
                }
                self.image = Some(full);
                if let Some(key) = first_set(&host_keys(self)) {
                    return Err((format!("{label}.{key}"), "only for kind = \"host\"".into()));
                }
            }
            DeviceKind::Host => {
                if let Err((key, msg)) = check_host(self) {
                    return Err((format!("{label}.{key}"), msg));
                }
            }
            DeviceKind::Keyboard | DeviceKind::Mouse | DeviceKind::Tablet => {
                if let Some(p) = &self.evdev {
                    if !p.is_absolute() {
                        return Err((
                            format!("{label}.evdev"),
                            "must be an absolute path (/dev/input/...)".into(),
                        ));
                    }
                } else if let Some(k) = first_set(&[
                    ("grab", self.grab.is_some()),
                    ("grab_toggle", self.grab_toggle.is_some()),
                ]) {
                    return Err((
                        format!("{label}.{k}"),
                        "only with evdev = \"/dev/input/...\"".into(),
                    ));
                }
                if let Some(t) = &self.grab_toggle {
                    if crate::evdev_source::Toggle::parse(t).is_none() {
                        return Err((
                            format!("{label}.grab_toggle"),
                            format!(
                                "{t:?}: one of {}",
                                crate::evdev_source::Toggle::NAMES.join(", ")
                            ),
                        ));
                    }
                }
                let storage_keys = [
                    ("image", self.image.is_some()),
                    ("readonly", self.readonly),
                    ("uas", self.uas),
                ];
                if let Some(key) = first_set(&storage_keys).or(first_set(&host_keys(self))) {
                    return Err((
                        format!("{label}.{key}"),
                        "not for an input device (keyboard, mouse, tablet)".into(),
                    ));
                }
                if self.speed == Some(SpeedCfg::Super) {
                    return Err((
                        format!("{label}.speed"),
                        "an input device is \"full\" or \"high\" speed".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The match rule of a `kind = "host"` device (after [`Config::parse`]
    /// validated it).
    pub fn host_rule(&self) -> Option<passthrough::MatchRule> {
        use passthrough::MatchRule;
        match (self, self.port.as_ref()) {
            (_, Some(p)) => Some(MatchRule::Port(p.clone())),
            (
                Device {
                    bus: Some(b),
                    addr: Some(a),
                    ..
                },
                None,
            ) => Some(MatchRule::BusAddr { bus: *b, addr: *a }),
            (
                Device {
                    vendor: Some(v),
                    product: Some(p),
                    ..
                },
                None,
            ) => Some(MatchRule::Id {
                vendor: *v,
                product: *p,
                serial: self.serial.clone(),
            }),
            _ => None,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[controller]`: the controller served from the start. Optional in
    /// wrapper mode, where xl's `usbctrl` can ask for controllers instead.
    pub controller: Option<Controller>,
    /// `[transport]`.
    pub transport: Transport,
    /// `[[device]]` entries.
    #[serde(default, rename = "device")]
    pub devices: Vec<Device>,
    /// `[control]`: the control socket, if any.
    pub control: Option<ControlCfg>,
}

/// `[control]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlCfg {
    /// Where the control socket is created (owner-only permissions).
    pub socket: PathBuf,
}

impl Config {
    /// Reads and validates `path`. Relative image paths are resolved
    /// against the configuration file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is used for
    /// messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            msg: e.to_string().replace('\n', " ").trim().to_string(),
        })?;
        let invalid = |key: String, msg: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            msg,
        };
        match &cfg.controller {
            Some(_) => {}
            None if cfg.transport.kind != TransportKind::Xen => {
                return Err(invalid(
                    "controller".into(),
                    "required for kind = \"vfio-user\"".into(),
                ));
            }
            None if !cfg.devices.is_empty() => {
                return Err(invalid(
                    "device[0]".into(),
                    "devices need a [controller] (xl's usbdev attaches host devices to \
                     xl's usbctrl controllers)"
                        .into(),
                ));
            }
            None => {}
        }
        match cfg.transport.kind {
            TransportKind::VfioUser => match &cfg.transport.socket {
                None => {
                    return Err(invalid(
                        "transport.socket".into(),
                        "required for kind = \"vfio-user\"".into(),
                    ))
                }
                Some(s) if s.exists() => {
                    return Err(invalid(
                        "transport.socket".into(),
                        format!(
                            "{} already exists (another server running, or a stale socket)",
                            s.display()
                        ),
                    ))
                }
                Some(_) => {}
            },
            TransportKind::Xen => {
                let t = &cfg.transport;
                if t.socket.is_some() {
                    return Err(invalid(
                        "transport.socket".into(),
                        "only for kind = \"vfio-user\"".into(),
                    ));
                }
                match t.pci.as_deref() {
                    None if cfg.controller.is_none() => {}
                    None => {
                        return Err(invalid(
                            "transport.pci".into(),
                            "required for kind = \"xen\" (e.g. \"00:1e.0\")".into(),
                        ))
                    }
                    Some(p) if parse_pci(p).is_none() => {
                        return Err(invalid(
                            "transport.pci".into(),
                            format!("{p:?} is not [segment:]bus:device.function (device < 32, function < 8)"),
                        ))
                    }
                    Some(_) => {}
                }
                if t.domid.is_some() && t.domain.is_some() {
                    return Err(invalid(
                        "transport.domain".into(),
                        "give domid or domain, not both".into(),
                    ));
                }
                if let Some(d) = t.domid {
                    if d == 0 || d >= 0x7ff0 {
                        return Err(invalid(
                            "transport.domid".into(),
                            format!("{d} is not a guest domain id"),
                        ));
                    }
                }
                if let Some(c) = &t.chroot {
                    if !c.is_dir() {
                        return Err(invalid(
                            "transport.chroot".into(),
                            format!("{} is not a directory", c.display()),
                        ));
                    }
                }
            }
        }
        if cfg.transport.kind != TransportKind::Xen {
            let t = &cfg.transport;
            let xen_only = [
                ("domid", t.domid.is_some()),
                ("domain", t.domain.is_some()),
                ("pci", t.pci.is_some()),
                ("restrict", t.restrict),
                ("uid", t.uid.is_some()),
                ("gid", t.gid.is_some()),
                ("chroot", t.chroot.is_some()),
            ];
            if let Some((k, _)) = xen_only.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    format!("transport.{k}"),
                    "only for kind = \"xen\"".into(),
                ));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for (i, d) in cfg.devices.iter_mut().enumerate() {
            d.resolve(&format!("device[{i}]"), base)
                .map_err(|(key, msg)| invalid(key, msg))?;
        }
        Ok(cfg)
    }
}

/// The host-device keys of `d` and whether each is set.
fn host_keys(d: &Device) -> [(&'static str, bool); 6] {
    [
        ("bus", d.bus.is_some()),
        ("addr", d.addr.is_some()),
        ("port", d.port.is_some()),
        ("vendor", d.vendor.is_some()),
        ("product", d.product.is_some()),
        ("serial", d.serial.is_some()),
    ]
}

/// The first key that is set.
fn first_set(keys: &[(&'static str, bool)]) -> Option<&'static str> {
    keys.iter().find(|(_, set)| *set).map(|(k, _)| *k)
}

/// Checks a `kind = "host"` entry: exactly one way to match, complete,
/// and no storage keys. The error names the key.
fn check_host(d: &Device) -> Result<(), (&'static str, String)> {
    if d.image.is_some() {
        return Err(("image", "only for kind = \"storage\"".into()));
    }
    if d.readonly {
        return Err(("readonly", "only for kind = \"storage\"".into()));
    }
    if d.uas {
        return Err(("uas", "only for kind = \"storage\"".into()));
    }
    let by_addr = d.bus.is_some() || d.addr.is_some();
    let by_port = d.port.is_some();
    let by_id = d.vendor.is_some() || d.product.is_some() || d.serial.is_some();
    let ways = [by_addr, by_port, by_id].iter().filter(|b| **b).count();
    if ways == 0 {
        return Err((
            "port",
            "kind = \"host\" needs bus + addr, port, or vendor + product (+ serial)".into(),
        ));
    }
    if ways > 1 {
        let key = if by_port { "port" } else { "bus" };
        return Err((
            key,
            "give one of bus + addr, port, vendor + product (+ serial)".into(),
        ));
    }
    if by_addr && d.bus.is_none() {
        return Err(("bus", "required with addr".into()));
    }
    if by_addr && d.addr.is_none() {
        return Err(("addr", "required with bus".into()));
    }
    if by_id && d.vendor.is_none() {
        return Err(("vendor", "required with product or serial".into()));
    }
    if by_id && d.product.is_none() {
        return Err(("product", "required with vendor or serial".into()));
    }
    let rule = d.host_rule().ok_or(("port", "no match rule".to_string()))?;
    rule.validate().map_err(|e| {
        let key = match e {
            passthrough::RuleError::BadPort(_) => "port",
            passthrough::RuleError::BadAddr(_) => "addr",
            passthrough::RuleError::BadBus(_) => "bus",
        };
        (key, e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/nonexistent/xen-dm.toml"))
    }

    #[test]
    fn controller_is_optional_only_for_xen() {
        let cfg = parse("[transport]\nkind = \"xen\"\nrestrict = true\n").unwrap();
        assert!(cfg.controller.is_none());
        let e = parse("[transport]\nkind=\"vfio-user\"\nsocket=\"/tmp/nonexistent-sock\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("controller: required"), "{e}");
        let e = parse("[transport]\nkind = \"xen\"\n[[device]]\nkind=\"host\"\nbus=1\naddr=2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("need a [controller]"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[controller]\nmodel = \"xhci\"\nmodle = 1\n[transport]\nkind=\"vfio-user\"\nsocket=\"/tmp/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("modle"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn missing_image_is_named() {
        let e = parse("[controller]\nmodel = \"xhci\"\n[transport]\nkind=\"vfio-user\"\nsocket=\"/tmp/nonexistent-sock\"\n[[device]]\nkind=\"storage\"\nimage=\"/nonexistent.img\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("device[0].image") && e.contains("/nonexistent.img"),
            "{e}"
        );
    }

    #[test]
    fn socket_taken_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        std::fs::write(&sock, b"").unwrap();
        let e = parse(&format!(
            "[controller]\nmodel = \"xhci\"\n[transport]\nkind=\"vfio-user\"\nsocket=\"{}\"\n",
            sock.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("transport.socket") && e.contains("already exists"),
            "{e}"
        );
    }

    const XEN: &str = "[controller]\nmodel = \"xhci\"\n[transport]\nkind = \"xen\"\n";

    #[test]
    fn xen_transport_keys_are_checked() {
        let cfg = parse(&format!("{XEN}domid = 3\npci = \"00:1e.0\"\n")).unwrap();
        assert_eq!(cfg.transport.domid, Some(3));
        assert_eq!(parse_pci("00:1e.0"), Some((0, 0, 0x1e, 0)));
        assert_eq!(parse_pci("0001:02:03.4"), Some((1, 2, 3, 4)));
        for (extra, key) in [
            ("domid = 3\n", "transport.pci"),
            ("domid = 3\npci = \"00:20.0\"\n", "transport.pci"),
            ("domid = 3\npci = \"00:1e.8\"\n", "transport.pci"),
            ("domid = 3\npci = \"1e.0\"\n", "transport.pci"),
            ("domid = 0\npci = \"00:1e.0\"\n", "transport.domid"),
            (
                "domid = 3\ndomain = \"g\"\npci = \"00:1e.0\"\n",
                "transport.domain",
            ),
            (
                "domid = 3\npci = \"00:1e.0\"\nsocket = \"/tmp/s\"\n",
                "transport.socket",
            ),
            (
                "domid = 3\npci = \"00:1e.0\"\nchroot = \"/nonexistent\"\n",
                "transport.chroot",
            ),
        ] {
            let e = parse(&format!("{XEN}{extra}")).unwrap_err().to_string();
            assert!(e.contains(key), "{extra:?}: {e}");
        }
        let e = parse("[controller]\nmodel = \"xhci\"\n[transport]\nkind = \"vfio-user\"\nsocket = \"/tmp/nonexistent-s\"\ndomid = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("transport.domid"), "{e}");
    }

    const HEAD: &str = "[controller]\nmodel = \"xhci\"\n[transport]\nkind=\"vfio-user\"\nsocket=\"/tmp/nonexistent-sock\"\n";

    #[test]
    fn host_devices_by_each_rule() {
        let cfg = parse(&format!(
            "{HEAD}[[device]]\nkind=\"host\"\nbus=1\naddr=4\n\
             [[device]]\nkind=\"host\"\nport=\"2-1.3\"\nspeed=\"high\"\n\
             [[device]]\nkind=\"host\"\nvendor=0x46f4\nproduct=0x0001\nserial=\"X1\"\n"
        ))
        .unwrap();
        use passthrough::MatchRule;
        assert_eq!(
            cfg.devices[0].host_rule(),
            Some(MatchRule::BusAddr { bus: 1, addr: 4 })
        );
        assert_eq!(
            cfg.devices[1].host_rule(),
            Some(MatchRule::Port("2-1.3".into()))
        );
        assert_eq!(cfg.devices[1].speed, Some(SpeedCfg::High));
        assert_eq!(
            cfg.devices[2].host_rule(),
            Some(MatchRule::Id {
                vendor: 0x46f4,
                product: 1,
                serial: Some("X1".into())
            })
        );
    }

    #[test]
    fn evdev_keys_are_checked() {
        let base = "[controller]\nmodel = \"xhci\"\n[transport]\nkind = \"vfio-user\"\nsocket = \"/tmp/x.sock\"\n";
        let ok = parse(&format!(
            "{base}[[device]]\nkind = \"keyboard\"\nevdev = \"/dev/input/event3\"\ngrab = false\ngrab_toggle = \"alt-alt\"\n"
        ))
        .unwrap();
        assert_eq!(ok.devices[0].grab_toggle.as_deref(), Some("alt-alt"));
        for (dev, key) in [
            ("kind = \"keyboard\"\nevdev = \"event3\"", "device[0].evdev"),
            ("kind = \"tablet\"\ngrab = true", "device[0].grab"),
            (
                "kind = \"mouse\"\nevdev = \"/dev/input/event3\"\ngrab_toggle = \"ctrl\"",
                "device[0].grab_toggle",
            ),
            (
                "kind = \"host\"\nbus = 1\naddr = 2\nevdev = \"/dev/input/event3\"",
                "device[0].evdev",
            ),
        ] {
            let e = parse(&format!("{base}[[device]]\n{dev}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{dev}: {e}");
        }
    }

    #[test]
    fn keyboard_takes_only_its_keys() {
        let ok = parse(&format!(
            "{HEAD}[[device]]\nkind = \"keyboard\"\nspeed = \"full\"\n"
        ))
        .unwrap();
        assert_eq!(ok.devices[0].kind, DeviceKind::Keyboard);
        for (body, key) in [
            ("image = \"x.img\"\n", "device[0].image"),
            ("bus = 1\naddr = 2\n", "device[0].bus"),
            ("speed = \"super\"\n", "device[0].speed"),
        ] {
            let e = parse(&format!("{HEAD}[[device]]\nkind = \"keyboard\"\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{body:?}: {e}");
        }
    }

    #[test]
    fn storage_speed_full_parses() {
        let d: Device =
            toml::from_str("kind=\"storage\"\nimage=\"s.img\"\nspeed=\"full\"\n").unwrap();
        assert_eq!(d.speed, Some(SpeedCfg::Full));
    }

    #[test]
    fn host_device_errors_name_the_key() {
        let cases = [
            ("", "device[0].port"),
            ("bus=1\n", "device[0].addr"),
            ("addr=3\n", "device[0].bus"),
            ("vendor=1\n", "device[0].product"),
            ("serial=\"a\"\n", "device[0].vendor"),
            ("port=\"1-\"\n", "device[0].port"),
            ("bus=1\naddr=200\n", "device[0].addr"),
            ("port=\"1-1\"\nvendor=1\nproduct=2\n", "device[0].port"),
            ("port=\"1-1\"\nimage=\"x.img\"\n", "device[0].image"),
            ("port=\"1-1\"\nuas=true\n", "device[0].uas"),
            ("vendor=0x10000\nproduct=1\n", "vendor"),
            ("bsu=1\n", "bsu"),
        ];
        for (body, key) in cases {
            let e = parse(&format!("{HEAD}[[device]]\nkind=\"host\"\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{body:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.img"), vec![0u8; 512]).unwrap();
        let e = Config::parse(
            &format!("{HEAD}[[device]]\nkind=\"storage\"\nimage=\"s.img\"\nport=\"1-1\"\n"),
            &dir.path().join("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("device[0].port"), "{e}");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../xen-dm.toml");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stick.img"), vec![0u8; 4096]).unwrap();
        let cfg = Config::parse(text, &dir.path().join("xen-dm.toml")).unwrap();
        assert_eq!(cfg.devices.len(), 1);
        assert_eq!(cfg.controller.unwrap().model, Model::Xhci);
    }
}
