//! The proxy between a fake libxl and a fake QEMU: greeting pass-through,
//! ids and error classes unchanged, descriptors passed on, USB commands
//! served and never seen by QEMU, a client leaving mid-command, malformed
//! JSON.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::proxy::{End, Proxy, UsbHost};
use super::usb::{Owned, QmpError};
use super::wire;
use crate::config::Model;

const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u7\"}, \"capabilities\": [\"oob\"]}}";

#[derive(Default)]
struct FakeHost {
    log: Arc<Mutex<Vec<String>>>,
    ctrls: Vec<(String, u8)>,
    devices: Vec<String>,
    started: bool,
}

impl Owned for FakeHost {
    fn owns_controller(&self, id: &str) -> bool {
        self.ctrls.iter().any(|(c, _)| c == id)
    }
    fn owns_device(&self, id: &str) -> bool {
        self.devices.iter().any(|d| d == id)
    }
}

impl UsbHost for FakeHost {
    fn slots_in_use(&self) -> Vec<u8> {
        self.ctrls.iter().map(|(_, s)| *s).collect()
    }
    fn add_controller(
        &mut self,
        id: &str,
        model: Model,
        ports: Option<u32>,
        slot: u8,
    ) -> Result<String, QmpError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("add_controller {id} {model:?} {ports:?} {slot}"));
        self.ctrls.push((id.into(), slot));
        Ok("fake".into())
    }
    fn del_controller(&mut self, id: &str) -> Result<(), QmpError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("del_controller {id}"));
        Err(QmpError::generic("no hot-unplug"))
    }
    fn add_host(
        &mut self,
        id: &str,
        controller: &str,
        port: Option<u32>,
        hostbus: u32,
        hostaddr: u32,
    ) -> Result<(), QmpError> {
        self.log.lock().unwrap().push(format!(
            "add_host {id} {controller} {port:?} {hostbus} {hostaddr}"
        ));
        if hostbus == 99 {
            return Err(QmpError::generic("no such device"));
        }
        self.devices.push(id.into());
        Ok(())
    }
    fn del_device(&mut self, id: &str) -> Result<(), QmpError> {
        self.log.lock().unwrap().push(format!("del_device {id}"));
        self.devices.retain(|d| d != id);
        Ok(())
    }
    fn guest_starting(&mut self) -> Result<(), QmpError> {
        self.log.lock().unwrap().push("guest_starting".into());
        self.started = true;
        Ok(())
    }
    fn started(&self) -> bool {
        self.started
    }
}

/// A fake QEMU monitor: greeting, capabilities, then canned answers. It
/// records every command it sees (and writes "fd" into passed files).
#[allow(clippy::needless_pass_by_value)]
fn fake_qemu(mut s: UnixStream, seen: Arc<Mutex<Vec<String>>>) {
    s.write_all(format!("{GREETING}\r\n").as_bytes()).unwrap();
    let mut split = wire::Splitter::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let mut fds: Vec<OwnedFd> = Vec::new();
        // Blocking read: wait for readability first.
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd of ours.
        unsafe { libc::poll(&mut p, 1, 10_000) };
        let n = match wire::recv_with_fds(s.as_raw_fd(), &mut buf, &mut fds) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        split.push(&buf[..n]).unwrap();
        while let Some(wire::Piece::Msg(_, m)) = split.next_piece() {
            let exec = m["execute"].as_str().unwrap_or("").to_owned();
            seen.lock().unwrap().push(exec.clone());
            let id = m.get("id").cloned();
            let mut reply = match exec.as_str() {
                "qmp_capabilities" | "cont" | "stop" => json!({"return": {}}),
                "query-status" => json!({"return": {"status": "prelaunch", "running": false}}),
                "query-pci" => json!({"return": [{"bus": 0, "devices": [
                    {"bus": 0, "slot": 0, "function": 0}, {"bus": 0, "slot": 1, "function": 1},
                    {"bus": 0, "slot": 2, "function": 0}, {"bus": 0, "slot": 3, "function": 0}]}]}),
                "add-fd" => {
                    for f in fds.drain(..) {
                        let mut f = std::fs::File::from(f);
                        f.write_all(b"fd").unwrap();
                    }
                    json!({"return": {"fdset-id": 1, "fd": 10}})
                }
                "slow" => {
                    std::thread::sleep(Duration::from_millis(300));
                    s.write_all(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESUME\"}\r\n").unwrap();
                    json!({"return": "slow"})
                }
                _ => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {exec} has not been found")}})
                }
            };
            if let Some(id) = id {
                reply["id"] = id;
            }
            let mut b = serde_json::to_vec(&reply).unwrap();
            b.extend_from_slice(b"\r\n");
            s.write_all(&b).unwrap();
        }
    }
}

struct Bed {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    proxy: Option<std::thread::JoinHandle<std::io::Result<End>>>,
    qemu_seen: Arc<Mutex<Vec<String>>>,
    host_log: Arc<Mutex<Vec<String>>>,
}

impl Bed {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp-libxl-1");
        let libxl = UnixListener::bind(&path).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let qemu_seen = Arc::new(Mutex::new(Vec::new()));
        let seen = qemu_seen.clone();
        std::thread::spawn(move || fake_qemu(theirs, seen));
        let host = FakeHost::default();
        let host_log = host.log.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let proxy = std::thread::spawn(move || {
            let mut p = Proxy::new(libxl, ours, host)?;
            p.run(|| st.load(Ordering::Relaxed))
        });
        Self {
            path,
            _dir: dir,
            stop,
            proxy: Some(proxy),
            qemu_seen,
            host_log,
        }
    }

    fn connect(&self) -> Libxl {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Libxl {
            r: BufReader::new(s.try_clone().unwrap()),
            s,
        };
        let g = c.line();
        assert_eq!(
            g,
            format!("{GREETING}\r\n"),
            "QEMU's greeting, byte for byte"
        );
        c
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.proxy.take() {
            let _ = p.join();
        }
    }
}

struct Libxl {
    s: UnixStream,
    r: BufReader<UnixStream>,
}

impl Libxl {
    /// One message, which must end in \r\n (libxl's framing).
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "framing: {l:?}");
        l
    }
    #[allow(clippy::needless_pass_by_value)]
    fn cmd(&mut self, v: Value) -> Value {
        let mut b = serde_json::to_vec(&v).unwrap();
        b.extend_from_slice(b"\r\n");
        self.s.write_all(&b).unwrap();
        loop {
            let r: Value = serde_json::from_str(&self.line()).unwrap();
            if r.get("event").is_none() {
                return r;
            }
        }
    }
    fn negotiate(&mut self) {
        let r = self.cmd(json!({"execute": "qmp_capabilities", "id": 0x786c7100u32}));
        assert_eq!(r, json!({"return": {}, "id": 0x786c7100u32}));
    }
}

#[test]
fn commands_and_replies_pass_unchanged() {
    let bed = Bed::new();
    let mut c = bed.connect();
    // Before negotiation, as QEMU answers.
    let r = c.cmd(json!({"execute": "query-status", "id": 1}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(r["id"], 1);
    c.negotiate();
    let r = c.cmd(json!({"execute": "query-status", "id": 0x786c7101u32}));
    assert_eq!(
        r,
        json!({"return": {"status": "prelaunch", "running": false}, "id": 0x786c7101u32})
    );
    // Error classes reach libxl as QEMU wrote them (its fallbacks key on
    // CommandNotFound).
    let r = c.cmd(json!({"execute": "query-cpus-fast", "id": 0x786c7102u32}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(r["id"], 0x786c7102u32);
    // A string id and no id at all.
    assert_eq!(c.cmd(json!({"execute": "stop", "id": "s"}))["id"], "s");
    assert!(c.cmd(json!({"execute": "stop"})).get("id").is_none());
    let r = c.cmd(json!({"execute": "qmp_capabilities", "id": 9}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    // QEMU negotiated once, for the proxy, and saw the forwarded commands
    // only.
    assert_eq!(
        *bed.qemu_seen.lock().unwrap(),
        [
            "qmp_capabilities",
            "query-status",
            "query-cpus-fast",
            "stop",
            "stop"
        ]
    );
    // A second connection (libxl opens one per operation) gets the same
    // greeting and works the same.
    drop(c);
    let mut c = bed.connect();
    c.negotiate();
    assert_eq!(c.cmd(json!({"execute": "cont", "id": 5}))["id"], 5);
}

#[test]
fn descriptors_reach_qemu_with_add_fd() {
    let bed = Bed::new();
    let mut c = bed.connect();
    c.negotiate();
    let mut f = tempfile::tempfile().unwrap();
    let fd = OwnedFd::from(f.try_clone().unwrap());
    wire::send_with_fds(
        c.s.as_raw_fd(),
        b"{\"execute\":\"add-fd\",\"id\":3}\r\n",
        &[fd],
    )
    .unwrap();
    let r: Value = serde_json::from_str(&c.line()).unwrap();
    assert_eq!(r, json!({"return": {"fdset-id": 1, "fd": 10}, "id": 3}));
    let mut got = String::new();
    use std::io::Seek;
    f.rewind().unwrap();
    f.read_to_string(&mut got).unwrap();
    assert_eq!(got, "fd", "QEMU wrote through the descriptor libxl passed");
}

#[test]
fn xls_usb_commands_are_served_here() {
    let bed = Bed::new();
    let mut c = bed.connect();
    c.negotiate();
    let r = c.cmd(json!({"execute": "device_add", "id": 10,
        "arguments": {"driver": "nec-usb-xhci", "id": "xenusb-0", "p2": 8, "p3": 8}}));
    assert_eq!(r, json!({"return": {}, "id": 10}));
    let r = c.cmd(json!({"execute": "device_add", "id": 11,
        "arguments": {"id": "xenusb-1-4", "driver": "usb-host", "bus": "xenusb-0.0",
                      "port": "1", "hostbus": 1, "hostaddr": 4}}));
    assert_eq!(r, json!({"return": {}, "id": 11}));
    let r = c.cmd(json!({"execute": "device_add", "id": 12,
        "arguments": {"id": "xenusb-99-4", "driver": "usb-host", "bus": "xenusb-0.0",
                      "hostbus": 99, "hostaddr": 4}}));
    assert_eq!(
        r["error"],
        json!({"class": "GenericError", "desc": "no such device"})
    );
    assert_eq!(r["id"], 12);
    let r = c.cmd(json!({"execute": "device_del", "id": 13, "arguments": {"id": "xenusb-1-4"}}));
    assert_eq!(r, json!({"return": {}, "id": 13}));
    let r = c.cmd(json!({"execute": "device_del", "id": 14, "arguments": {"id": "xenusb-0"}}));
    assert_eq!(r["error"]["class"], "GenericError");
    // libxl's unpause; then a controller can no longer be added.
    assert_eq!(c.cmd(json!({"execute": "cont", "id": 15}))["id"], 15);
    let r = c.cmd(json!({"execute": "device_add", "id": 16,
        "arguments": {"driver": "nec-usb-xhci", "id": "xenusb-1"}}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("running guest"),
        "{r}"
    );
    // Other device_adds are QEMU's.
    let r = c.cmd(json!({"execute": "device_add", "id": 17,
        "arguments": {"driver": "xen-pci-passthrough", "id": "pci-pt-03_00.0"}}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(
        *bed.host_log.lock().unwrap(),
        [
            // The highest slot QEMU does not use.
            "add_controller xenusb-0 Xhci Some(8) 31",
            "add_host xenusb-1-4 xenusb-0 Some(1) 1 4",
            "add_host xenusb-99-4 xenusb-0 None 99 4",
            "del_device xenusb-1-4",
            "del_controller xenusb-0",
            "guest_starting",
        ]
    );
    assert_eq!(
        *bed.qemu_seen.lock().unwrap(),
        ["qmp_capabilities", "query-pci", "cont", "device_add"],
        "QEMU never saw the USB commands"
    );
}

#[test]
fn a_client_leaving_mid_command_and_bad_json_harm_nobody() {
    let bed = Bed::new();
    let mut c = bed.connect();
    c.negotiate();
    c.s.write_all(b"{\"execute\":\"slow\",\"id\":1}\r\n")
        .unwrap();
    drop(c);
    let mut c = bed.connect();
    c.negotiate();
    // The event QEMU sent meanwhile may arrive; the first connection's
    // reply must not.
    let r = c.cmd(json!({"execute": "query-status", "id": 2}));
    assert_eq!(r["id"], 2, "{r}");
    // Malformed JSON: an error, and the connection goes on.
    c.s.write_all(b"{\"execute\": ]\r\n").unwrap();
    let r: Value = serde_json::from_str(&c.line()).unwrap();
    assert_eq!(r["error"]["class"], "GenericError");
    let r = c.cmd(json!({"execute": "stop", "id": 3}));
    assert_eq!(r, json!({"return": {}, "id": 3}));
    // Pipelined commands are answered in order, whoever answers them.
    c.s.write_all(b"{\"execute\":\"stop\",\"id\":4}{\"execute\":\"device_del\",\"arguments\":{\"id\":\"nope\"},\"id\":5}{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"usb-tablet\",\"bus\":\"xenusb-7.0\"},\"id\":6}\r\n").unwrap();
    let ids: Vec<Value> = (0..3)
        .map(|_| serde_json::from_str::<Value>(&c.line()).unwrap()["id"].clone())
        .collect();
    assert_eq!(ids, [json!(4), json!(5), json!(6)]);
}

#[test]
fn the_proxy_ends_when_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let libxl = UnixListener::bind(dir.path().join("q")).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(theirs);
    let mut p = Proxy::new(libxl, ours, FakeHost::default()).unwrap();
    assert_eq!(p.run(|| false).unwrap(), End::QemuGone);
}
