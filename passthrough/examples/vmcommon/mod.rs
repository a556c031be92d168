//! What the passthrough checks inside the VM share (vmtest_ehci,
//! vmtest_uhci): result lines, sysfs lookups of the VM's USB devices and
//! block nodes, claiming a host device.
#![allow(dead_code)]

use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use passthrough::{HostDevice, HostDeviceInfo, HostMonitor, HostOptions, MatchRule};
use sha2::{Digest, Sha256};

pub const SYSFS: &str = "/sys/bus/usb/devices";

pub struct Results {
    pub pass: u32,
    pub fail: u32,
}

impl Results {
    pub fn check(&mut self, name: &str, ok: bool, detail: impl Display) {
        println!(
            "RESULT {name} {} {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        if ok {
            self.pass += 1;
        } else {
            self.fail += 1;
        }
    }

    /// Runs a section; a panic inside (a harness assertion) is a FAIL.
    pub fn section<T>(&mut self, name: &str, f: impl FnOnce(&mut Results) -> T) -> Option<T> {
        let t = Instant::now();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(self)));
        println!("METRIC section_{name}_ms {}", t.elapsed().as_millis());
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.check(name, false, format!("panicked: {msg}"));
                None
            }
        }
    }
}

pub fn sha(b: &[u8]) -> String {
    let h = Sha256::digest(b);
    h.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

pub fn product_of(port: &str) -> String {
    std::fs::read_to_string(Path::new(SYSFS).join(port).join("product"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub fn by_serial(serial: &str) -> Option<HostDeviceInfo> {
    passthrough::rule::scan(Path::new(SYSFS))
        .into_iter()
        .find(|d| d.serial.as_deref() == Some(serial))
}

pub fn by_product(product: &str) -> Option<HostDeviceInfo> {
    passthrough::rule::scan(Path::new(SYSFS))
        .into_iter()
        .find(|d| product_of(&d.port).contains(product))
}

pub fn iface_driver(port: &str, ifno: u8) -> Option<String> {
    let l = std::fs::read_link(Path::new(SYSFS).join(format!("{port}:1.{ifno}/driver"))).ok()?;
    Some(l.file_name()?.to_string_lossy().into_owned())
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

pub fn block_of(port: &str) -> Option<String> {
    let base = Path::new(SYSFS).join(format!("{port}:1.0"));
    let walk = |p: &Path, pre: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(pre))
            .map(|e| e.path())
            .collect()
    };
    for h in walk(&base, "host") {
        for t in walk(&h, "target") {
            for lun in walk(&t, "") {
                if let Some(b) = walk(&lun.join("block"), "sd").first() {
                    return Some(b.file_name()?.to_string_lossy().into_owned());
                }
            }
        }
    }
    None
}

pub fn read_block_dev(path: &str, off: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut v = vec![0u8; len];
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    f.read_exact_at(&mut v, off).ok()?;
    Some(v)
}

pub fn host(rule: MatchRule) -> Result<(HostDevice, HostMonitor), String> {
    let d = HostDevice::new(rule, HostOptions::default()).map_err(|e| e.to_string())?;
    let m = d.monitor();
    Ok((d, m))
}

pub fn id_rule(info: &HostDeviceInfo, serial: &str) -> MatchRule {
    MatchRule::Id {
        vendor: info.vendor,
        product: info.product,
        serial: Some(serial.into()),
    }
}

/// Logs to stderr, filtered by PT_LOG (default info).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// One line per USB device the VM's kernel sees.
pub fn print_host_devices() {
    for dv in passthrough::rule::scan(Path::new(SYSFS)) {
        println!(
            "host device {} bus {} addr {} {:04x}:{:04x} {:?} {:?} \"{}\"",
            dv.port,
            dv.bus,
            dv.addr,
            dv.vendor,
            dv.product,
            dv.speed,
            dv.serial,
            product_of(&dv.port)
        );
    }
}

/// After release the VM kernel's usb-storage binds the stick `serial`
/// again: its block device holds `len` bytes at `lba` with sha `want`.
pub fn host_reads(r: &mut Results, name: &str, serial: &str, lba: u32, len: usize, want: &str) {
    let mut got = String::from("-");
    let mut node = String::from("none");
    wait_until(Duration::from_secs(20), || {
        let Some(info) = by_serial(serial) else {
            return false;
        };
        let Some(b) = block_of(&info.port) else {
            return false;
        };
        node = format!("/dev/{b}");
        got = read_block_dev(&node, u64::from(lba) * 512, len)
            .map_or_else(|| "unreadable".into(), |v| sha(&v));
        got == want
    });
    r.check(name, got == want, format!("{node}: {got} vs {want}"));
}
