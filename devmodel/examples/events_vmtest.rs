//! The control socket's `USB_HOST_DISCONNECTED` / `USB_HOST_CONNECTED`
//! events against a real host device: run inside the passthrough test VM
//! (`tests/passthrough/run.sh events`, as root), where QEMU's usb-storage
//! stick (serial `PTEV01`, on QEMU's xHCI) is a real USB device in the
//! VM kernel's usbfs. Nothing in-process: the real `xen-usb-dm` binary
//! (beside this example in `target/release`) runs with a vfio-user
//! transport nobody connects to, a `[control] socket` and a
//! `[[device]] kind = "host"` matching the stick by vendor, product and
//! serial; this program is a client of its control socket only.
//!
//! Checks: the process serves the control socket and claims the stick
//! with no VMM attached (`query-usb` shows `device[0]` connected, the VM's
//! usb-storage detached); `PT-WAIT unplug` has the script outside the VM
//! remove the stick (QMP `device_del`): `USB_HOST_DISCONNECTED` with
//! `{"device": "device[0]"}` must arrive (and `query-usb` show it not
//! connected); `PT-WAIT replug` adds it again (`device_add`, possibly on
//! another port): `USB_HOST_CONNECTED` must arrive (and `query-usb` show
//! it connected, the VM's driver detached again); exactly those two
//! events, once each; `quit` ends the process, which gives the stick back
//! to usb-storage and removes its sockets. Every wait is bounded. Prints
//! `RESULT name PASS|FAIL detail` and `METRIC` lines, then the process's
//! log (`dm| `).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SERIAL: &str = "PTEV01";
const SYSFS: &str = "/sys/bus/usb/devices";
const ID: &str = "device[0]";

#[path = "common/results.rs"]
mod results;
use results::Results;

/// The stick as the VM kernel sees it.
#[derive(Debug, Clone)]
struct Stick {
    /// sysfs name (the port path, e.g. `2-1`).
    port: String,
    vendor: u16,
    product: u16,
}

fn sysfs_read(dir: &Path, attr: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(attr))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The USB device with our serial, if the VM kernel has it.
fn find_stick() -> Option<Stick> {
    for e in std::fs::read_dir(SYSFS).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Devices behind ports (`2-1`, `1-1.4`), not root hubs or interfaces.
        if !name.contains('-') || name.contains(':') {
            continue;
        }
        let dir = e.path();
        if sysfs_read(&dir, "serial").as_deref() != Some(SERIAL) {
            continue;
        }
        let hex = |a| sysfs_read(&dir, a).and_then(|s| u16::from_str_radix(&s, 16).ok());
        return Some(Stick {
            port: name,
            vendor: hex("idVendor")?,
            product: hex("idProduct")?,
        });
    }
    None
}

/// The driver bound to the stick's interface 0 (`usb-storage`, `usbfs`).
fn driver(port: &str) -> Option<String> {
    let link = std::fs::read_link(Path::new(SYSFS).join(format!("{port}:1.0/driver"))).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Polls `f` every 50 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client of the control socket (QMP's framing: one JSON value a line).
struct Client {
    s: UnixStream,
    buf: Vec<u8>,
    /// Every event received, with when.
    events: Vec<(Instant, Value)>,
    /// Events already returned by `wait_event`.
    consumed: usize,
}

impl Client {
    fn connect(path: &Path, limit: Duration) -> Result<Client, String> {
        let end = Instant::now() + limit;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= end => {
                    return Err(format!("{}: {e} after {limit:?}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        Ok(Client {
            s,
            buf: Vec::new(),
            events: Vec::new(),
            consumed: 0,
        })
    }

    /// The next message, or None once `until` passed (or the socket
    /// closed: Err).
    fn recv(&mut self, until: Instant) -> Result<Option<Value>, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let v: Value = serde_json::from_slice(&line)
                    .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&line)))?;
                if v.get("event").is_some() {
                    self.events.push((Instant::now(), v.clone()));
                }
                return Ok(Some(v));
            }
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            let wait = (until - now).min(Duration::from_millis(100));
            self.s
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => return Err("connection closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The greeting (the first message).
    fn greeting(&mut self, limit: Duration) -> Result<Value, String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(v) = self.recv(end)? {
                return Ok(v);
            }
        }
        Err(format!("no greeting within {limit:?}"))
    }

    /// Sends `cmd` and returns its answer (events on the way are kept).
    fn command(&mut self, cmd: &Value, limit: Duration) -> Result<Value, String> {
        self.s
            .write_all(format!("{cmd}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let end = Instant::now() + limit;
        while Instant::now() < end {
            match self.recv(end)? {
                Some(v) if v.get("event").is_none() => return Ok(v),
                _ => {}
            }
        }
        Err(format!("no answer to {cmd} within {limit:?}"))
    }

    /// `query-usb`'s entry for `id`.
    fn query_usb(&mut self, id: &str) -> Result<Value, String> {
        let a = self.command(&json!({"execute": "query-usb"}), Duration::from_secs(10))?;
        let devs = a["return"]["devices"]
            .as_array()
            .ok_or_else(|| format!("query-usb answered {a}"))?;
        devs.iter()
            .find(|d| d["id"] == json!(id))
            .cloned()
            .ok_or_else(|| format!("{id} not in {a}"))
    }

    /// Waits until `until` for an event `name` not returned before,
    /// calling `tick` every 100 ms or so.
    fn wait_event(
        &mut self,
        name: &str,
        until: Instant,
        tick: &mut dyn FnMut(),
    ) -> Result<Option<(Instant, Value)>, String> {
        loop {
            tick();
            while self.consumed < self.events.len() {
                let e = self.events[self.consumed].clone();
                self.consumed += 1;
                if e.1["event"] == json!(name) {
                    return Ok(Some(e));
                }
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            self.recv(until)?;
        }
    }
}

/// The `xen-usb-dm` process, killed if still running when dropped.
struct Dm {
    child: Child,
    log: PathBuf,
}

impl Dm {
    /// Waits up to `limit` for it to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut st = None;
        wait_until(limit, || {
            st = self.child.try_wait().ok().flatten();
            st.is_some()
        });
        st
    }
}

impl Drop for Dm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Ok(log) = std::fs::read_to_string(&self.log) {
            for l in log.lines() {
                println!("dm| {l}");
            }
        }
    }
}

fn start_dm(dir: &Path, stick: &Stick) -> Result<Dm, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/examples/events_vmtest -> target/release/xen-usb-dm
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("xen-usb-dm"))
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("no xen-usb-dm beside {}", exe.display()))?;
    let cfg = dir.join("dm.toml");
    let text = format!(
        "[controller]\nmodel = \"xhci\"\n\n\
         [transport]\nkind = \"vfio-user\"\nsocket = \"{}\"\n\n\
         [[device]]\nkind = \"host\"\nvendor = {:#06x}\nproduct = {:#06x}\nserial = \"{SERIAL}\"\n\n\
         [control]\nsocket = \"{}\"\n",
        dir.join("vfio.sock").display(),
        stick.vendor,
        stick.product,
        dir.join("ctl.sock").display(),
    );
    std::fs::write(&cfg, &text).map_err(|e| e.to_string())?;
    let log = dir.join("dm.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let filter = std::env::var("PT_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "info".into());
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .env("XEN_USB_DM_LOG", filter)
        .env("XEN_USB_DM_LOG_FORMAT", "plain")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    Ok(Dm { child, log })
}

/// Where the stick is while we wait: when sysfs last changed its mind.
struct Watch {
    present: bool,
    since: Instant,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            present: find_stick().is_some(),
            since: Instant::now(),
        }
    }
    fn tick(&mut self) {
        let p = find_stick().is_some();
        if p != self.present {
            self.present = p;
            self.since = Instant::now();
        }
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn main() {
    let mut r = Results { failed: 0 };
    run(&mut r);
    println!(
        "events_vmtest: {}",
        if r.failed == 0 {
            "all passed"
        } else {
            "FAILED"
        }
    );
}

fn run(r: &mut Results) {
    // The stick is there and the VM's usb-storage has it.
    let Some(stick) = find_stick() else {
        return r.check(
            "events_setup",
            false,
            format!("no USB device with serial {SERIAL} in {SYSFS}"),
        );
    };
    let bound = wait_until(Duration::from_secs(10), || {
        driver(&stick.port).as_deref() == Some("usb-storage")
    });
    let dir = Path::new("/run/xtb-events");
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = std::fs::create_dir_all(dir) {
        return r.check("events_setup", false, e);
    }
    let mut dm = match start_dm(dir, &stick) {
        Ok(d) => d,
        Err(e) => return r.check("events_setup", false, e),
    };
    let ctl = dir.join("ctl.sock");
    let t0 = Instant::now();
    let mut c = match Client::connect(&ctl, Duration::from_secs(20)) {
        Ok(c) => c,
        Err(e) => {
            let st = dm.child.try_wait().ok().flatten();
            return r.check(
                "events_setup",
                false,
                format!("{e}; xen-usb-dm exit status {st:?}"),
            );
        }
    };
    let greeting = c.greeting(Duration::from_secs(10));
    let caps = c.command(
        &json!({"execute": "qmp_capabilities"}),
        Duration::from_secs(10),
    );
    // Nobody is connected to the vfio-user socket: the process serves the
    // control socket and the host device without a VMM.
    let ok = matches!(&greeting, Ok(g) if g.get("QMP").is_some())
        && matches!(&caps, Ok(a) if a["return"] == json!({}));
    r.check(
        "events_setup",
        ok,
        format!(
            "stick {:04x}:{:04x} at {} (usb-storage bound first {bound}); control socket after {} ms, greeting {greeting:?}, qmp_capabilities {caps:?}",
            stick.vendor,
            stick.product,
            stick.port,
            ms(t0.elapsed())
        ),
    );
    if !ok {
        return;
    }

    // The stick is claimed: connected in query-usb, usb-storage detached.
    let mut last = Value::Null;
    let claimed = wait_until(Duration::from_secs(10), || {
        if let Ok(d) = c.query_usb(ID) {
            last = d;
        }
        last["connected"] == json!(true) && driver(&stick.port).as_deref() == Some("usbfs")
    });
    r.check(
        "events_claimed_connected",
        claimed,
        format!(
            "query-usb {last}, interface driver {:?}",
            driver(&stick.port)
        ),
    );
    if !claimed {
        return;
    }
    let early: Vec<String> = c.events.iter().map(|(_, e)| e.to_string()).collect();

    // Unplugged from the outer QEMU.
    let mut w = Watch::new();
    println!("PT-WAIT unplug");
    let ev = c.wait_event(
        "USB_HOST_DISCONNECTED",
        Instant::now() + Duration::from_secs(60),
        &mut || w.tick(),
    );
    w.tick();
    let gone_in_sysfs = !w.present;
    match &ev {
        Ok(Some((at, e))) => {
            let after = at.saturating_duration_since(w.since);
            println!("METRIC events_disconnect_ms {}", ms(after));
            r.check(
                "events_host_disconnected",
                e["data"]["device"] == json!(ID)
                    && e["data"]["port"].is_u64()
                    && e["timestamp"]["seconds"].is_u64()
                    && gone_in_sysfs
                    && early.is_empty(),
                format!(
                    "{e}, {} ms after the stick left sysfs (gone there: {gone_in_sysfs}); events before: {early:?}",
                    ms(after)
                ),
            );
        }
        other => {
            r.check(
                "events_host_disconnected",
                false,
                format!("{other:?} within 60 s; stick gone from sysfs {gone_in_sysfs}"),
            );
        }
    }
    let q = c.query_usb(ID);
    r.check(
        "events_query_disconnected",
        matches!(&q, Ok(d) if d["connected"] == json!(false)),
        format!("{q:?}"),
    );

    // Added again (QEMU may put it on another port).
    println!("PT-WAIT replug");
    let ev = c.wait_event(
        "USB_HOST_CONNECTED",
        Instant::now() + Duration::from_secs(90),
        &mut || w.tick(),
    );
    w.tick();
    let back = find_stick();
    match &ev {
        Ok(Some((at, e))) => {
            let after = at.saturating_duration_since(w.since);
            println!("METRIC events_connect_ms {}", ms(after));
            r.check(
                "events_host_connected",
                e["data"]["device"] == json!(ID) && e["data"]["port"].is_u64() && back.is_some(),
                format!(
                    "{e}, {} ms after the stick came back in sysfs ({:?})",
                    ms(after),
                    back.as_ref().map(|s| &s.port)
                ),
            );
        }
        other => {
            r.check(
                "events_host_connected",
                false,
                format!("{other:?} within 90 s; stick in sysfs: {back:?}"),
            );
        }
    }
    let q = c.query_usb(ID);
    let back_port = back.map(|s| s.port).unwrap_or_default();
    let drv = driver(&back_port);
    r.check(
        "events_query_reconnected",
        matches!(&q, Ok(d) if d["connected"] == json!(true)) && drv.as_deref() == Some("usbfs"),
        format!("{q:?}, interface driver {drv:?}"),
    );

    // Nothing else: exactly one event of each, in order.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end && c.recv(end).is_ok() {}
    let names: Vec<&str> = c
        .events
        .iter()
        .filter_map(|(_, e)| e["event"].as_str())
        .collect();
    r.check(
        "events_exactly_two",
        names == ["USB_HOST_DISCONNECTED", "USB_HOST_CONNECTED"],
        format!("{names:?}"),
    );

    // quit: the process ends, gives the stick back, removes its sockets.
    let a = c.command(&json!({"execute": "quit"}), Duration::from_secs(10));
    let st = dm.wait_exit(Duration::from_secs(15));
    let rebound = wait_until(Duration::from_secs(10), || {
        driver(&back_port).as_deref() == Some("usb-storage")
    });
    let sockets_left: Vec<String> = ["ctl.sock", "vfio.sock"]
        .iter()
        .filter(|f| dir.join(f).exists())
        .map(|f| f.to_string())
        .collect();
    r.check(
        "events_quit_releases",
        matches!(&a, Ok(v) if v["return"] == json!({}))
            && st.is_some_and(|s| s.success())
            && rebound
            && sockets_left.is_empty(),
        format!(
            "quit {a:?}, exit {st:?}, usb-storage back {rebound}, sockets left {sockets_left:?}"
        ),
    );
}
