//! The admin subcommands: `xen-usb-dm list` (host USB devices, and which
//! `[[device]] kind = "host"` rule would take each) and `xen-usb-dm check`
//! (what start-up would refuse, without starting anything).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use passthrough::list::{list, openable, usbfs_path, DeviceListing};
use passthrough::MatchRule;
use serde_json::{json, Value};

use crate::config::{self, Config, DeviceKind};

/// Where the host's USB devices are: sysfs and the usbfs nodes (tests point
/// these at fixture trees).
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// Normally `/sys/bus/usb/devices`.
    pub sysfs: PathBuf,
    /// Normally `/dev/bus/usb`.
    pub devfs: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sysfs: PathBuf::from("/sys/bus/usb/devices"),
            devfs: PathBuf::from("/dev/bus/usb"),
        }
    }
}

/// The host-device rules of a configuration: (index in `[[device]]`, rule).
fn host_rules(cfg: &Config) -> Vec<(usize, Option<MatchRule>)> {
    cfg.devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.kind == DeviceKind::Host)
        .map(|(i, d)| (i, d.host_rule()))
        .collect()
}

/// What a rule finds: the matching devices' ports, in the order
/// [`passthrough::rule::find`] tries them (the first is the one taken).
fn matches<'a>(rule: &MatchRule, devs: &'a [DeviceListing]) -> Vec<&'a DeviceListing> {
    devs.iter().filter(|d| rule.matches(&d.info)).collect()
}

fn speed_name(d: &DeviceListing) -> &'static str {
    use hcd_emul::usb::Speed;
    match d.info.speed {
        Some(Speed::Low) => "low",
        Some(Speed::Full) => "full",
        Some(Speed::High) => "high",
        Some(Speed::Super) => "super",
        None => "?",
    }
}

/// `xen-usb-dm list`: the text (or JSON) to print. With `cfg`, each device
/// names the rules that match it, and rules matching none or several are
/// listed after the devices.
pub fn list_report(paths: &HostPaths, cfg: Option<&Config>, as_json: bool) -> String {
    let devs = list(&paths.sysfs);
    let rules = cfg.map(host_rules).unwrap_or_default();
    let rules_of = |d: &DeviceListing| -> Vec<usize> {
        rules
            .iter()
            .filter(|(_, r)| r.as_ref().is_some_and(|r| r.matches(&d.info)))
            .map(|(i, _)| *i)
            .collect()
    };
    if as_json {
        let devices: Vec<Value> = devs
            .iter()
            .map(|d| {
                let access = openable(&paths.devfs, &d.info);
                json!({
                    "bus": d.info.bus,
                    "addr": d.info.addr,
                    "port": d.info.port,
                    "vendor": format!("{:04x}", d.info.vendor),
                    "product": format!("{:04x}", d.info.product),
                    "serial": d.info.serial,
                    "speed": speed_name(d),
                    "usb-version": d.usb_version,
                    "class": d.class,
                    "manufacturer": d.manufacturer,
                    "product-name": d.product_name,
                    "usbfs": usbfs_path(&paths.devfs, &d.info),
                    "openable": access.is_ok(),
                    "open-error": access.err().map(|e| e.to_string()),
                    "interfaces": d.interfaces.iter().map(|i| json!({
                        "name": i.name,
                        "class": i.class.0,
                        "subclass": i.class.1,
                        "protocol": i.class.2,
                        "driver": i.driver,
                    })).collect::<Vec<_>>(),
                    "rules": rules_of(d),
                })
            })
            .collect();
        let rule_list: Vec<Value> = rules
            .iter()
            .map(|(i, r)| {
                let m: Vec<&str> = r
                    .as_ref()
                    .map(|r| {
                        matches(r, &devs)
                            .iter()
                            .map(|d| d.info.port.as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "device": i,
                    "rule": r.as_ref().map(|r| r.to_string()),
                    "matches": m,
                    "taken": m.first(),
                })
            })
            .collect();
        return format!("{}\n", json!({ "devices": devices, "rules": rule_list }));
    }
    let mut out = String::new();
    if devs.is_empty() {
        let _ = writeln!(
            out,
            "no USB devices under {} (root hubs are not listed)",
            paths.sysfs.display()
        );
    }
    let mut bus = None;
    for d in &devs {
        if bus != Some(d.info.bus) {
            bus = Some(d.info.bus);
            let _ = writeln!(out, "Bus {:03}", d.info.bus);
        }
        // Depth in the tree: 1-2 is on a root port, 1-2.3 behind a hub.
        let depth = d.info.port.matches('.').count();
        let indent = "  ".repeat(depth + 1);
        let strings = match (&d.manufacturer, &d.product_name) {
            (Some(m), Some(p)) => format!("{m} {p}"),
            (None, Some(p)) => p.clone(),
            (Some(m), None) => m.clone(),
            (None, None) => String::new(),
        };
        let _ = write!(
            out,
            "{indent}{} addr {:03} {:04x}:{:04x} {} \"{}\"",
            d.info.port,
            d.info.addr,
            d.info.vendor,
            d.info.product,
            speed_name(d),
            strings
        );
        if let Some(s) = &d.info.serial {
            let _ = write!(out, " serial {s}");
        }
        let _ = writeln!(out);
        for i in &d.interfaces {
            let _ = writeln!(
                out,
                "{indent}    {} class {:02x}/{:02x}/{:02x} driver {}",
                i.name,
                i.class.0,
                i.class.1,
                i.class.2,
                i.driver.as_deref().unwrap_or("-")
            );
        }
        let access = match openable(&paths.devfs, &d.info) {
            Ok(()) => "can be opened read-write".to_string(),
            Err(e) => format!("cannot be opened read-write: {e}"),
        };
        let _ = writeln!(
            out,
            "{indent}    usbfs {} {access}",
            usbfs_path(&paths.devfs, &d.info).display()
        );
        for i in rules_of(d) {
            let _ = writeln!(out, "{indent}    <- device[{i}]");
        }
    }
    for (i, r) in &rules {
        match r {
            None => {
                let _ = writeln!(out, "device[{i}]: no match rule");
            }
            Some(r) => {
                let m = matches(r, &devs);
                match m.len() {
                    0 => {
                        let _ =
                            writeln!(out, "device[{i}] ({r}): matches no device plugged in now");
                    }
                    1 => {
                        let _ = writeln!(out, "device[{i}] ({r}): takes {}", m[0].info.port);
                    }
                    _ => {
                        let ports: Vec<&str> = m.iter().map(|d| d.info.port.as_str()).collect();
                        let _ = writeln!(
                            out,
                            "device[{i}] ({r}): matches {} devices ({}); the first, {}, is taken",
                            m.len(),
                            ports.join(", "),
                            ports[0]
                        );
                    }
                }
            }
        }
    }
    out
}

/// One problem `check` found: the key it is about and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The configuration key (`device[1].image`, `transport.socket`), or
    /// the file itself.
    pub key: String,
    /// What is wrong.
    pub msg: String,
}

fn problem(key: impl Into<String>, msg: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        msg: msg.into(),
    }
}

/// Whether the directory `dir` lets this process create a file (socket,
/// capture) in it.
fn dir_writable(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: NUL in the path", dir.display()))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call;
    // access(2) only reads it.
    let r = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "{} is not writable: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// Whether `uid`/`gid` may read and write `path` (mode bits; no ACLs): a
/// device re-plugged after the privilege drop is opened as that user.
fn rw_for(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = m.mode();
    let bits = if uid == 0 {
        0o6
    } else if m.uid() == uid {
        (mode >> 6) & 0o7
    } else if m.gid() == gid {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    if bits & 0o6 == 0o6 {
        Ok(())
    } else {
        Err(format!(
            "{} (mode {:o}, owner {}:{}) is not read-write for uid {uid} gid {gid}",
            path.display(),
            mode & 0o7777,
            m.uid(),
            m.gid()
        ))
    }
}

/// `xen-usb-dm check --config FILE`: every problem start-up would hit (and
/// those it would hit later: a host device that is missing or cannot be
/// opened). Empty when all is well.
pub fn check(path: &Path, paths: &HostPaths) -> Vec<Problem> {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(config::ConfigError::Invalid { key, msg, .. }) => return vec![problem(key, msg)],
        Err(config::ConfigError::Parse { msg, .. }) => return vec![problem("syntax", msg)],
        Err(config::ConfigError::Read { source, .. }) => {
            return vec![problem("file", source.to_string())]
        }
    };
    let mut out = Vec::new();
    // Sockets: their directories must take a new socket.
    if let Some(s) = &cfg.transport.socket {
        if let Err(e) = dir_writable(s.parent().unwrap_or(Path::new("."))) {
            out.push(problem("transport.socket", e));
        }
    }
    if let Some(c) = &cfg.control {
        if c.socket.exists() {
            out.push(problem(
                "control.socket",
                format!("{} already exists", c.socket.display()),
            ));
        } else if let Err(e) = dir_writable(c.socket.parent().unwrap_or(Path::new("."))) {
            out.push(problem("control.socket", e));
        }
    }
    if cfg.transport.kind == config::TransportKind::Xen && !Path::new("/dev/xen/privcmd").exists() {
        out.push(problem(
            "transport.kind",
            "/dev/xen/privcmd is missing: not a Xen dom0 (or xen-privcmd not loaded)",
        ));
    }
    for (i, d) in cfg.devices.iter().enumerate() {
        // A capture's file is created at start-up, not by a check.
        if let Some(c) = &d.capture {
            if let Err(e) = dir_writable(c.parent().unwrap_or(Path::new("."))) {
                out.push(problem(format!("device[{i}].capture"), e));
            }
        }
        // Each emulated device as start-up builds it (images opened,
        // speeds and options checked), each on a controller of its own so
        // that each problem gets its own line.
        if cfg.controller.is_none() || d.kind == DeviceKind::Host {
            continue;
        }
        // An evdev source is not started (it would grab the device): its
        // node is looked at here. Missing is a problem worth a line even
        // though start-up waits for it (it looks again every second).
        if let Some(p) = &d.evdev {
            if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(p) {
                out.push(problem(
                    format!("device[{i}].evdev"),
                    format!("{}: {e} (start-up waits for it)", p.display()),
                ));
            }
        }
        let d = config::Device {
            capture: None,
            evdev: None,
            grab: None,
            grab_toggle: None,
            ..d.clone()
        };
        let mut x = hcd_emul::controller::Controller::new(
            crate::model_of(&cfg),
            hcd_emul::GuestRam::anonymous(4096),
        );
        if let Err(e) = crate::attach_device(&mut x, i, &d, &mut crate::Inputs::default()) {
            let msg = format!("{e:#}");
            let (key, msg) = match msg.split_once(": ") {
                Some((k, m)) if k.starts_with("device[") => (k.to_string(), m.to_string()),
                _ => (format!("device[{i}]"), msg),
            };
            out.push(problem(key, msg));
        }
    }
    // Host devices: present, unambiguous, openable (also by the user the
    // process drops to).
    let devs = list(&paths.sysfs);
    let drop_to = cfg
        .transport
        .uid
        .map(|u| (u, cfg.transport.gid.unwrap_or(u)));
    for (i, rule) in host_rules(&cfg) {
        let Some(rule) = rule else {
            out.push(problem(format!("device[{i}]"), "no match rule"));
            continue;
        };
        let m = matches(&rule, &devs);
        let Some(first) = m.first() else {
            out.push(problem(
                format!("device[{i}]"),
                format!("host {rule}: no such device plugged in (it is attached when it appears)"),
            ));
            continue;
        };
        if m.len() > 1 {
            let ports: Vec<&str> = m.iter().map(|d| d.info.port.as_str()).collect();
            out.push(problem(
                format!("device[{i}]"),
                format!(
                    "host {rule}: matches {} devices ({}); only the first is taken: narrow the rule (serial, port)",
                    m.len(),
                    ports.join(", ")
                ),
            ));
        }
        if let Err(e) = openable(&paths.devfs, &first.info) {
            out.push(problem(
                format!("device[{i}]"),
                format!(
                    "host {rule}: {} cannot be opened read-write: {e}",
                    usbfs_path(&paths.devfs, &first.info).display()
                ),
            ));
        } else if let Some((uid, gid)) = drop_to {
            if let Err(e) = rw_for(&usbfs_path(&paths.devfs, &first.info), uid, gid) {
                out.push(problem(
                    format!("device[{i}]"),
                    format!("host {rule}: after the privilege drop (transport.uid): {e}"),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A sysfs device directory and its usbfs node (mode `mode`).
    fn fake(t: &Path, port: &str, bus: u32, addr: u32, id: (u16, u16), serial: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let d = t.join("sys").join(port);
        fs::create_dir_all(&d).unwrap();
        for (k, v) in [
            ("busnum", bus.to_string()),
            ("devnum", addr.to_string()),
            ("idVendor", format!("{:04x}", id.0)),
            ("idProduct", format!("{:04x}", id.1)),
            ("speed", "480".into()),
            ("serial", serial.into()),
            ("product", "Stick".into()),
        ] {
            fs::write(d.join(k), format!("{v}\n")).unwrap();
        }
        let i = t.join("sys").join(format!("{port}:1.0"));
        fs::create_dir_all(&i).unwrap();
        fs::write(i.join("bInterfaceClass"), "08\n").unwrap();
        let node = t.join(format!("dev/{bus:03}/{addr:03}"));
        fs::create_dir_all(node.parent().unwrap()).unwrap();
        fs::write(&node, b"").unwrap();
        fs::set_permissions(&node, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn paths(t: &Path) -> HostPaths {
        HostPaths {
            sysfs: t.join("sys"),
            devfs: t.join("dev"),
        }
    }

    /// Two sticks with the same vid:pid (serials A and B) and a keyboard.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fake(t.path(), "1-1", 1, 2, (0x46f4, 1), "A", 0o666);
        fake(t.path(), "1-1.2", 1, 5, (0x46f4, 1), "B", 0o600);
        fake(t.path(), "2-1", 2, 3, (0x0627, 1), "K", 0o666);
        t
    }

    fn config(t: &Path, devices: &str) -> PathBuf {
        fs::write(t.join("s.img"), vec![0u8; 1 << 20]).unwrap();
        let p = t.join("c.toml");
        fs::write(
            &p,
            format!(
                "[controller]\nmodel = \"ehci\"\n[transport]\nkind = \"vfio-user\"\nsocket = \"{}\"\n{devices}",
                t.join("dm.sock").display()
            ),
        )
        .unwrap();
        p
    }

    #[test]
    fn list_names_the_rule_that_takes_each_device() {
        let t = tree();
        let p = config(
            t.path(),
            "[[device]]\nkind = \"host\"\nvendor = 0x46f4\nproduct = 1\n\
             [[device]]\nkind = \"host\"\nvendor = 0x46f4\nproduct = 1\nserial = \"B\"\n\
             [[device]]\nkind = \"host\"\nport = \"3-1\"\n",
        );
        let cfg = Config::load(&p).unwrap();
        let text = list_report(&paths(t.path()), Some(&cfg), false);
        assert!(
            text.contains("Bus 001\n  1-1 addr 002 46f4:0001 high \"Stick\" serial A\n"),
            "{text}"
        );
        assert!(
            text.contains("    1-1.2 addr 005"),
            "behind a hub: indented\n{text}"
        );
        assert!(text.contains("1-1:1.0 class 08/00/00 driver -"), "{text}");
        assert!(
            text.contains(
                "device[0] (46f4:0001): matches 2 devices (1-1, 1-1.2); the first, 1-1, is taken"
            ),
            "{text}"
        );
        assert!(
            text.contains("device[1] (46f4:0001 serial B): takes 1-1.2"),
            "{text}"
        );
        assert!(
            text.contains("device[2] (port 3-1): matches no device plugged in now"),
            "{text}"
        );

        // JSON: the same facts, machine-readable.
        let v: Value =
            serde_json::from_str(&list_report(&paths(t.path()), Some(&cfg), true)).unwrap();
        let devs = v["devices"].as_array().unwrap();
        assert_eq!(devs.len(), 3);
        assert_eq!(devs[0]["port"], "1-1");
        assert_eq!(devs[0]["vendor"], "46f4");
        assert_eq!(devs[0]["speed"], "high");
        assert_eq!(devs[0]["interfaces"][0]["class"], 8);
        assert_eq!(devs[0]["rules"], json!([0]));
        assert_eq!(devs[1]["rules"], json!([0, 1]));
        assert_eq!(devs[2]["rules"], json!([]));
        assert_eq!(v["rules"][0]["matches"], json!(["1-1", "1-1.2"]));
        assert_eq!(v["rules"][0]["taken"], "1-1");
        assert_eq!(v["rules"][2]["taken"], Value::Null);
        // The schema: exactly these members, with these JSON types.
        let num = |v: &Value| v.is_u64();
        let str_or_null = |v: &Value| v.is_string() || v.is_null();
        type Check = fn(&Value) -> bool;
        let device_schema: [(&str, Check); 16] = [
            ("bus", num),
            ("addr", num),
            ("port", Value::is_string),
            ("vendor", Value::is_string),
            ("product", Value::is_string),
            ("serial", str_or_null),
            ("speed", Value::is_string),
            ("usb-version", str_or_null),
            ("class", |v| v.is_u64() || v.is_null()),
            ("manufacturer", str_or_null),
            ("product-name", str_or_null),
            ("usbfs", Value::is_string),
            ("openable", Value::is_boolean),
            ("open-error", str_or_null),
            ("interfaces", Value::is_array),
            ("rules", Value::is_array),
        ];
        let iface_schema: [(&str, Check); 5] = [
            ("name", Value::is_string),
            ("class", num),
            ("subclass", num),
            ("protocol", num),
            ("driver", str_or_null),
        ];
        let conforms = |v: &Value, schema: &[(&str, Check)]| {
            let o = v.as_object().unwrap();
            o.len() == schema.len() && schema.iter().all(|(k, f)| o.get(*k).is_some_and(f))
        };
        for d in devs {
            assert!(conforms(d, &device_schema), "device {d}");
            for i in d["interfaces"].as_array().unwrap() {
                assert!(conforms(i, &iface_schema), "interface {i}");
            }
            assert!(d["rules"].as_array().unwrap().iter().all(num));
        }
        let rule_schema: [(&str, Check); 4] = [
            ("device", num),
            ("rule", str_or_null),
            ("matches", Value::is_array),
            ("taken", str_or_null),
        ];
        for r in v["rules"].as_array().unwrap() {
            assert!(conforms(r, &rule_schema), "rule {r}");
        }
    }

    #[test]
    fn list_without_devices_says_so() {
        let t = tempfile::tempdir().unwrap();
        let text = list_report(&paths(t.path()), None, false);
        assert!(text.starts_with("no USB devices under"), "{text}");
        let v: Value = serde_json::from_str(&list_report(&paths(t.path()), None, true)).unwrap();
        assert_eq!(v, json!({"devices": [], "rules": []}));
    }

    #[test]
    fn check_passes_a_good_config_and_names_each_problem_by_key() {
        let t = tree();
        let good = config(
            t.path(),
            "[[device]]\nkind = \"storage\"\nimage = \"s.img\"\n\
             [[device]]\nkind = \"host\"\nvendor = 0x46f4\nproduct = 1\nserial = \"A\"\n",
        );
        assert_eq!(check(&good, &paths(t.path())), vec![]);

        // Several problems at once, one line each.
        let bad = config(
            t.path(),
            "[[device]]\nkind = \"storage\"\nimage = \"s.img\"\nspeed = \"full\"\nuas = true\n\
             [[device]]\nkind = \"host\"\nvendor = 0x46f4\nproduct = 1\n\
             [[device]]\nkind = \"host\"\nport = \"3-1\"\n\
             [[control]]\n",
        );
        // ([[control]] is not a table array: a parse error, reported alone.)
        let p = check(&bad, &paths(t.path()));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "syntax");
        let p = check(&t.path().join("none.toml"), &paths(t.path()));
        assert_eq!((p.len(), p[0].key.as_str()), (1, "file"), "{p:?}");
        let bad = config(
            t.path(),
            "[[device]]\nkind = \"storage\"\nimage = \"s.img\"\nspeed = \"full\"\nuas = true\n\
             [[device]]\nkind = \"host\"\nvendor = 0x46f4\nproduct = 1\n\
             [[device]]\nkind = \"host\"\nport = \"3-1\"\n\
             [control]\nsocket = \"/nonexistent-dir/ctl.sock\"\n",
        );
        let p = check(&bad, &paths(t.path()));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["control.socket", "device[0].uas", "device[1]", "device[2]"],
            "{p:?}"
        );
        assert!(p[0].msg.contains("not a directory"), "{p:?}");
        assert!(p[1].msg.contains("not at full speed"), "{p:?}");
        assert!(p[2].msg.contains("matches 2 devices (1-1, 1-1.2)"), "{p:?}");
        assert!(p[3].msg.contains("no such device plugged in"), "{p:?}");

        // A capture: its directory is checked, its file not created.
        let cap = config(
            t.path(),
            "[[device]]\nkind = \"storage\"\nimage = \"s.img\"\ncapture = \"s.pcap\"\n\
             [[device]]\nkind = \"keyboard\"\ncapture = \"/nonexistent-dir/k.pcap\"\n",
        );
        let p = check(&cap, &paths(t.path()));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "device[1].capture");
        assert!(!t.path().join("s.pcap").exists(), "check starts no capture");

        // A missing image: the configuration itself fails, with its key.
        let missing = config(
            t.path(),
            "[[device]]\nkind = \"storage\"\nimage = \"nope.img\"\n",
        );
        let p = check(&missing, &paths(t.path()));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "device[0].image");
    }

    #[test]
    fn check_sees_a_device_the_dropped_user_cannot_open() {
        // rw_for judges mode bits for the uid/gid the process drops to.
        let t = tree();
        let n = t.path().join("dev/001/005"); // mode 0600, owned by us
        let me = std::fs::metadata(&n).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        });
        let (uid, gid) = me.unwrap();
        assert!(rw_for(&n, uid, gid).is_ok());
        let e = rw_for(&n, uid + 1000, gid + 1000).unwrap_err();
        assert!(
            e.contains("mode 600") && e.contains("not read-write"),
            "{e}"
        );
        assert!(rw_for(&t.path().join("dev/001/002"), uid + 1000, gid + 1000).is_ok());
    }
}
