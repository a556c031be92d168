//! The control socket against real clients on its Unix socket: greeting
//! and negotiation, the commands, malformed JSON, wrong types, oversized
//! input, a client leaving mid-command, two clients, too many clients,
//! quit. The controller (a UHCI with a stick and a keyboard) runs on a
//! thread of its own serving the mailbox, as a transport's loop would.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hcd_emul::controller::{Controller, Model};
use hcd_emul::hid::Keyboard;
use hcd_emul::pci::{InterruptTransport, MsiMessage, PciFunction};
use hcd_emul::usb::Speed;
use serde_json::{json, Value};

use super::*;

#[derive(Debug)]
struct NoIrq;
impl InterruptTransport for NoIrq {
    fn set_intx(&mut self, _: bool) {}
    fn send_msi(&mut self, _: MsiMessage) {}
}

struct Bed {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    control: Option<Control>,
    kbd: InputHandle,
    tablet: InputHandle,
    quit: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    mailbox: Mailbox,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.control.take();
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bed() -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let (kbd, handle) = Keyboard::new(Speed::Full).unwrap();
    let (tab, tablet) =
        hcd_emul::hid::HidDevice::with_kind(hcd_emul::hid::Kind::Tablet, Speed::Full).unwrap();
    let mut x = Controller::new(Model::Uhci, hcd_emul::GuestRam::anonymous(1 << 20));
    let capture = hcd_emul::capture::CaptureSwitch::default();
    let p0 = x
        .attach(Box::new(hcd_emul::capture::Captured::new(
            Box::new(kbd),
            capture.clone(),
        )))
        .unwrap();
    let p1 = x.attach(Box::new(tab)).unwrap();
    let resets = x.reset_count();
    let plugged = vec![
        crate::Plugged {
            id: "device[0]".into(),
            port: p0,
            kind: DeviceKind::Keyboard,
            input: Some(handle.clone()),
            capture,
            host: None,
            source: None,
        },
        crate::Plugged {
            id: "device[1]".into(),
            port: p1,
            kind: DeviceKind::Tablet,
            input: Some(tablet.clone()),
            capture: Default::default(),
            host: None,
            source: None,
        },
    ];
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mailbox = Mailbox::new(Box::new(move || {
        let _ = tx.send(());
    }));
    let done = Arc::new(AtomicBool::new(false));
    let (mb, d) = (mailbox.clone(), done.clone());
    let thread = std::thread::spawn(move || {
        let mut pci = PciFunction::new(x, Box::new(NoIrq));
        while !d.load(Ordering::Relaxed) {
            let _ = rx.recv_timeout(Duration::from_millis(50));
            mb.run(&mut pci);
        }
    });
    let quit = Arc::new(AtomicBool::new(false));
    let control = Control::start(
        &path,
        Target::new(mailbox.clone(), Model::Uhci, plugged, quit.clone()).with_resets(Some(resets)),
    )
    .unwrap();
    Bed {
        _dir: dir,
        path,
        control: Some(control),
        kbd: handle,
        tablet,
        quit,
        done,
        mailbox,
        thread: Some(thread),
    }
}

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(b: &Bed) -> (Client, Value) {
        let s = UnixStream::connect(&b.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        let g = c.read().expect("greeting");
        (c, g)
    }

    fn ready(b: &Bed) -> Client {
        let (mut c, _) = Client::connect(b);
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }

    fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                assert!(line.ends_with("\r\n"), "{line:?}");
                Some(serde_json::from_str(&line).unwrap())
            }
        }
    }

    fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).unwrap();
    }

    fn cmd(&mut self, v: impl std::fmt::Display) -> Value {
        self.send(v.to_string().as_bytes());
        self.read().expect("an answer")
    }
}

fn class(v: &Value) -> &str {
    v["error"]["class"].as_str().unwrap_or("")
}

#[test]
fn greeting_negotiation_and_commands() {
    let b = bed();
    let (mut c, g) = Client::connect(&b);
    assert!(g["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("xen-usb-dm"));
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    let r = c.cmd(json!({"execute": "query-status", "id": 1}));
    assert_eq!(
        (class(&r), &r["id"]),
        ("CommandNotFound", &json!(1)),
        "before negotiation: {r}"
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "id": "x"})),
        json!({"return": {}, "id": "x"})
    );
    assert_eq!(
        class(&c.cmd(json!({"execute": "qmp_capabilities"}))),
        "CommandNotFound"
    );
    let r = c.cmd(json!({"execute": "query-status", "id": {"a": [1]}}));
    assert_eq!(
        r,
        json!({"return": {"status": "running", "running": true}, "id": {"a": [1]}})
    );
    let r = c.cmd(json!({"execute": "query-usb"}));
    assert_eq!(r["return"]["controller"], "uhci");
    let devs = r["return"]["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 2);
    assert!(devs[1]["device"].as_str().unwrap().contains("tablet"));
    assert_eq!(
        (devs[0]["port"].clone(), devs[0]["speed"].clone()),
        (json!(1), json!("full"))
    );
    assert!(devs[0]["device"].as_str().unwrap().contains("keyboard"));
    // Keys: 'a' down and up, QMP's shape; two reports queued for the guest.
    let ev = |down| json!({"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": "a"}}});
    let r = c.cmd(
        json!({"execute": "input-send-event", "arguments": {"events": [ev(true), ev(false)]}}),
    );
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(b.kbd.pending(), 2);
    let r = c.cmd(json!({"execute": "send-key", "arguments": {"keys": [
        {"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"}, {"type": "qcode", "data": "delete"}],
        "hold-time": 10}}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(b.kbd.pending(), 8, "three presses, three releases");
    assert_eq!(
        class(&c.cmd(json!({"execute": "frobnicate"}))),
        "CommandNotFound"
    );
    // Pointer: an absolute move and a click go to the tablet (the move is
    // coalesced, then flushed before the click: two reports).
    let r = c.cmd(
        json!({"execute": "input-send-event", "arguments": {"events": [
        {"type": "abs", "data": {"axis": "x", "value": 100}},
        {"type": "abs", "data": {"axis": "y", "value": 200}},
        {"type": "btn", "data": {"down": true, "button": "left"}}]}}),
    );
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(b.tablet.pending(), 2);
}

#[test]
fn bad_input_gets_errors_and_the_session_goes_on() {
    let b = bed();
    let mut c = Client::ready(&b);
    let cases: Vec<(&[u8], &str)> = vec![
        (b"{\"execute\": \"query-status\",,}\n", "JSON parse error"),
        (b"[1, 2]", "must be an object"),
        (b"{\"execute\": 5}", "'execute' must be a string"),
        (b"{\"arguments\": {}}", "lacks member 'execute'"),
        (b"{\"execute\": \"query-status\", \"arguments\": []}", "'arguments' must be an object"),
        (b"{\"execute\": \"query-status\", \"extra\": 1}", "'extra' is unexpected"),
        (b"{\"execute\": \"query-status\", \"arguments\": {\"x\": 1}}", "'x' is unexpected"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": 3}}", "'events'"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": []}}", "1 to 64"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"key\", \"data\": {\"down\": 1}}]}}", "down must be a boolean"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"key\", \"data\": {\"down\": true, \"key\": {\"type\": \"qcode\", \"data\": \"nosuchkey\"}}}]}}", "unknown qcode"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"key\", \"data\": {\"down\": true, \"key\": {\"type\": \"number\", \"data\": 30}}}]}}", "numbers are not supported"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"rel\", \"data\": {\"axis\": \"x\", \"value\": 1}}]}}", "no mouse"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"abs\", \"data\": {\"axis\": \"z\", \"value\": 1}}]}}", "axis must be"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"abs\", \"data\": {\"axis\": \"x\", \"value\": 1e99}}]}}", "32-bit integer"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"btn\", \"data\": {\"down\": true, \"button\": \"side\"}}]}}", "button must be"),
        (b"{\"execute\": \"input-send-event\", \"arguments\": {\"events\": [{\"type\": \"joystick\"}]}}", "type must be"),
        (b"{\"execute\": \"send-key\", \"arguments\": {\"keys\": [{\"type\": \"qcode\", \"data\": \"a\"}], \"hold-time\": 999999}}", "hold-time"),
        (b"{\"execute\": \"send-key\", \"arguments\": {\"keys\": \"a\"}}", "'keys'"),
    ];
    for (raw, want) in cases {
        c.send(raw);
        let r = c.read().expect("an answer");
        let desc = r["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains(want), "{}: {r}", String::from_utf8_lossy(raw));
    }
    assert_eq!(b.kbd.pending(), 0, "nothing half-sent");
    // A list of events with one bad entry sends none of them.
    let r = c.cmd(
        json!({"execute": "input-send-event", "arguments": {"events": [
        {"type": "key", "data": {"down": true, "key": {"type": "qcode", "data": "b"}}},
        {"type": "key", "data": {"down": true, "key": {"type": "qcode", "data": "??"}}}]}}),
    );
    assert_eq!(class(&r), "GenericError");
    assert_eq!(b.kbd.pending(), 0);
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["running"],
        true
    );
}

#[test]
fn oversized_input_closes_only_that_client() {
    let b = bed();
    let mut c = Client::ready(&b);
    let mut big = b"{\"execute\": \"query-status\", \"arguments\": {\"pad\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', (1 << 20) + 10));
    let _ = c.w.write_all(&big);
    let r = c.read().expect("an error before the close");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("too large"),
        "{r}"
    );
    assert!(c.read().is_none(), "closed");
    let mut d = Client::ready(&b);
    assert_eq!(
        d.cmd(json!({"execute": "query-status"}))["return"]["running"],
        true
    );
}

#[test]
fn a_client_leaving_mid_command_and_two_clients_at_once() {
    let b = bed();
    {
        let mut c = Client::ready(&b);
        c.send(b"{\"execute\": \"query-u");
    }
    let mut one = Client::ready(&b);
    let mut two = Client::ready(&b);
    for _ in 0..3 {
        assert_eq!(
            one.cmd(json!({"execute": "query-usb"}))["return"]["controller"],
            "uhci"
        );
        assert_eq!(
            two.cmd(json!({"execute": "query-status"}))["return"]["running"],
            true
        );
    }
    // Pipelined commands come back in order.
    one.send(
        b"{\"execute\": \"query-status\", \"id\": 1}{\"execute\": \"query-usb\", \"id\": 2}\r\n",
    );
    assert_eq!(one.read().unwrap()["id"], 1);
    assert_eq!(one.read().unwrap()["id"], 2);
}

#[test]
fn too_many_clients_and_quit() {
    let b = bed();
    let mut held: Vec<Client> = (0..MAX_CLIENTS).map(|_| Client::ready(&b)).collect();
    let s = UnixStream::connect(&b.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("too many clients"), "{line}");
    let c = held.last_mut().unwrap();
    assert_eq!(c.cmd(json!({"execute": "quit"})), json!({"return": {}}));
    assert!(c.read().is_none(), "the session ends after quit");
    assert!(b.quit.load(Ordering::Relaxed));
    // The socket is owner-only and goes away with the server.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&b.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let path = b.path.clone();
    drop(held);
    drop(b);
    assert!(!path.exists());
}

#[test]
fn capture_start_and_stop_by_device_index_with_every_field_checked() {
    let b = bed();
    let mut c = Client::ready(&b);
    let file = b.path.with_file_name("kbd.pcap");
    let f = file.to_str().unwrap();
    let err = |v: Value| v["error"]["desc"].as_str().unwrap_or("").to_string();
    // Refused: no such device, no file, a relative path, a bad snaplen,
    // an unknown member, stop without a capture.
    let e = c.cmd(json!({"execute": "capture-start", "arguments": {"device": 7, "file": f}}));
    assert_eq!(e["error"]["class"], "DeviceNotFound", "{e}");
    assert!(
        err(c.cmd(json!({"execute": "capture-start", "arguments": {"device": 0}})))
            .contains("'file'")
    );
    assert!(err(
        c.cmd(json!({"execute": "capture-start", "arguments": {"device": 0, "file": "x.pcap"}}))
    )
    .contains("absolute"));
    assert!(err(c.cmd(
        json!({"execute": "capture-start", "arguments": {"device": 0, "file": f, "snaplen": -1}})
    ))
    .contains("'snaplen'"));
    assert!(err(c.cmd(
        json!({"execute": "capture-start", "arguments": {"device": 0, "file": f, "bogus": 1}})
    ))
    .contains("'bogus'"));
    assert!(
        err(c.cmd(json!({"execute": "capture-stop", "arguments": {"device": 0}})))
            .contains("no capture")
    );
    assert!(err(c.cmd(
        json!({"execute": "capture-start", "arguments": {"device": 0, "file": "/nonexistent-dir/k.pcap"}})
    ))
    .contains("/nonexistent-dir/k.pcap"));
    assert!(!file.exists());
    // Started: the file has its pcap header; stopped: counters.
    let r = c.cmd(
        json!({"execute": "capture-start", "arguments": {"device": 0, "file": f, "snaplen": 64}}),
    );
    assert_eq!(r, json!({"return": {"file": f}}));
    let head = std::fs::read(&file).unwrap_or_default();
    let r = c.cmd(json!({"execute": "capture-stop", "arguments": {"device": 0}}));
    assert_eq!(r["return"]["file"], f, "{r}");
    assert_eq!(r["return"]["dropped"], 0, "{r}");
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() >= 24 && head.len() <= bytes.len());
    assert_eq!(&bytes[20..24], &220u32.to_le_bytes(), "usbmon link type");
    assert!(
        err(c.cmd(json!({"execute": "capture-stop", "arguments": {"device": 0}})))
            .contains("no capture")
    );
}

#[test]
fn device_add_and_del_with_events_to_every_negotiated_client() {
    let b = bed();
    let mut c = Client::ready(&b);
    let mut watcher = Client::ready(&b);
    let img = b.path.with_file_name("hot.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let f = img.to_str().unwrap();
    let err = |v: &Value| v["error"]["desc"].as_str().unwrap_or("").to_string();
    // Refused, each with the reason, nothing plugged in.
    let cases = [
        (json!({"kind": "storage", "image": f}), "'id'"),
        (
            json!({"id": "", "kind": "storage", "image": f}),
            "'id' must be",
        ),
        (
            json!({"id": "9x", "kind": "storage", "image": f}),
            "'id' must be",
        ),
        (
            json!({"id": "a b", "kind": "storage", "image": f}),
            "'id' must be",
        ),
        (
            json!({"id": "x".repeat(65), "kind": "storage", "image": f}),
            "'id' must be",
        ),
        (
            json!({"id": "s", "kind": "storage", "image": "rel.img"}),
            "absolute",
        ),
        (json!({"id": "s", "kind": "storage"}), "s.image: required"),
        (
            json!({"id": "s", "kind": "storage", "image": "/nonexistent.img"}),
            "/nonexistent.img",
        ),
        (json!({"id": "s", "kind": "floppy"}), "unknown variant"),
        (
            json!({"id": "s", "kind": "storage", "image": f, "colour": 1}),
            "unknown field",
        ),
        (
            json!({"id": "s", "kind": "storage", "image": f, "readonly": "yes"}),
            "invalid type",
        ),
        (
            json!({"id": "s", "kind": "storage", "image": f, "speed": "high"}),
            "UHCI is full",
        ),
        (
            json!({"id": "s", "kind": "storage", "image": f, "uas": true, "speed": "full"}),
            "UAS needs",
        ),
        (
            json!({"id": "s", "kind": "keyboard", "image": f}),
            "not for an input device",
        ),
        (
            json!({"id": "device[0]", "kind": "keyboard"}),
            "'id' must be",
        ),
    ];
    for (args, want) in cases {
        let r = c.cmd(json!({"execute": "device_add", "arguments": args.clone()}));
        assert!(err(&r).contains(want), "{args}: {r}");
    }
    let devs = |c: &mut Client| -> Vec<Value> {
        c.cmd(json!({"execute": "query-usb"}))["return"]["devices"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert_eq!(devs(&mut c).len(), 2);
    // The UHCI's two ports are taken: refused, nothing left behind.
    let r = c.cmd(json!({"execute": "device_add", "arguments": {"id": "stick", "kind": "storage", "image": f}}));
    assert!(err(&r).contains("stick: "), "{r}");
    assert_eq!(devs(&mut c).len(), 2);
    // A configured device goes by device[N]: the tablet leaves.
    let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": "device[1]"}}));
    assert_eq!(r, json!({"return": {}}));
    let ev = watcher.read().expect("an event");
    assert_eq!(ev["event"], "DEVICE_DELETED", "{ev}");
    assert_eq!(ev["data"]["device"], "device[1]");
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(
        c.read().unwrap()["event"],
        "DEVICE_DELETED",
        "the sender's too"
    );
    assert_eq!(devs(&mut c).len(), 1);
    // Added: a stick on the freed port; its id shows in query-usb.
    let r = c.cmd(json!({"execute": "device_add", "arguments": {"id": "stick", "kind": "storage", "image": f}, "id": 5}));
    assert_eq!(r["id"], 5, "{r}");
    let port = r["return"]["port"].as_u64().expect("a port");
    // The same fields as query-usb's (the stick is on a root port).
    let at = json!({"device": "stick", "port": port, "hub-port": 0});
    assert_eq!(r["return"]["hub-port"], 0, "{r}");
    assert_eq!(r["return"]["id"], "stick");
    let ev = watcher.read().expect("an event");
    assert_eq!(ev["event"], "DEVICE_ADDED");
    assert_eq!(ev["data"], at);
    assert_eq!(c.read().unwrap()["event"], "DEVICE_ADDED");
    let list = devs(&mut c);
    let stick: Vec<_> = list.iter().filter(|d| d["id"] == "stick").collect();
    assert_eq!(stick.len(), 1, "{list:?}");
    assert!(
        stick[0]["device"].as_str().unwrap().contains("hot.img"),
        "{list:?}"
    );
    assert_eq!(list.iter().filter(|d| d["id"] == "device[0]").count(), 1);
    // The same id again: refused before anything is built.
    let r = c.cmd(json!({"execute": "device_add", "arguments": {"id": "stick", "kind": "storage", "image": f}}));
    assert!(err(&r).contains("Duplicate device ID"), "{r}");
    // Deleted: gone; unknown ids and bad arguments refused.
    let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": "stick"}}));
    assert_eq!(r, json!({"return": {}}));
    let ev = watcher.read().expect("an event");
    assert_eq!(ev["event"], "DEVICE_DELETED");
    assert_eq!(ev["data"], at);
    assert_eq!(c.read().unwrap()["event"], "DEVICE_DELETED");
    let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": "stick"}}));
    assert_eq!(class(&r), "DeviceNotFound", "{r}");
    let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": 3}}));
    assert!(err(&r).contains("'id'"), "{r}");
    let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": "x", "force": true}}));
    assert!(err(&r).contains("'force' is unexpected"), "{r}");
    // A tablet added takes pointer input at once.
    let r = c.cmd(json!({"execute": "device_add", "arguments": {"id": "tab2", "kind": "tablet"}}));
    assert!(r["return"]["port"].is_u64(), "{r}");
    assert_eq!(c.read().unwrap()["event"], "DEVICE_ADDED");
    let r = c.cmd(
        json!({"execute": "input-send-event", "arguments": {"events": [
        {"type": "abs", "data": {"axis": "x", "value": 1}}]}}),
    );
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(b.tablet.pending(), 0, "not the unplugged tablet's");
}

#[test]
fn an_event_reaches_a_client_only_after_negotiation() {
    let b = bed();
    let (mut early, _) = Client::connect(&b);
    let mut c = Client::ready(&b);
    let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": "device[1]"}}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(c.read().unwrap()["event"], "DEVICE_DELETED");
    // The client that never negotiated gets the answer to its command
    // and no event before it.
    let r = early.cmd(json!({"execute": "query-status"}));
    assert_eq!(class(&r), "CommandNotFound", "{r}");
}

#[test]
fn a_guest_reset_of_the_controller_is_an_event() {
    let b = bed();
    let mut c = Client::ready(&b);
    // The guest: I/O space on, then HCRESET in USBCMD.
    b.mailbox
        .call(|pci| {
            pci.config_write(4, &1u16.to_le_bytes());
            let cmd = hcd_emul::uhci::regs::CMD_HCRESET;
            pci.bar_write(4, hcd_emul::uhci::regs::REG_USBCMD, &cmd.to_le_bytes());
        })
        .unwrap();
    let ev = c.read().expect("an event");
    assert_eq!(ev["event"], "CONTROLLER_RESET", "{ev}");
    assert!(ev["data"]["resets"].as_u64().unwrap() >= 1, "{ev}");
    // Once per reset: a command answered next, no second event.
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["running"],
        true
    );
}

/// The socket path at start: a socket a running server answers on is
/// refused, so is a file that is not a socket; a stale socket (its server
/// gone without removing it, as a chrooted one must) is replaced.
#[test]
fn start_refuses_a_live_socket_and_replaces_a_stale_one() {
    let b = bed();
    let target = || {
        let mb = Mailbox::new(Box::new(|| {}));
        Target::new(
            mb,
            Model::Uhci,
            Vec::new(),
            Arc::new(AtomicBool::new(false)),
        )
    };
    let e = Control::start(&b.path, target()).expect_err("a live socket");
    assert!(e.to_string().contains("a running process serves it"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let e = Control::start(&file, target()).expect_err("not a socket");
    assert!(e.to_string().contains("not a socket"), "{e}");
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "a listener dropped leaves its file");
    let c = Control::start(&stale, target()).expect("a stale socket replaced");
    let s = UnixStream::connect(&stale).expect("served");
    drop(s);
    drop(c);
    assert!(!stale.exists(), "removed when the server stops");
}

/// The socket is owner-only (0600) under its name from the start and
/// nothing of its making is left beside it; a client that connects while
/// it is bound but not serving yet (the transport's socket not there yet)
/// is greeted once it serves; dropped unserved, the file goes.
#[test]
fn bind_is_owner_only_and_early_clients_are_served() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let listening = Control::bind(&path).unwrap();
    let m = std::fs::symlink_metadata(&path).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["c.sock"], "only the socket in its directory");
    let early = UnixStream::connect(&path).expect("connects before serve");
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let target = Target::new(
        Mailbox::new(Box::new(|| {})),
        Model::Uhci,
        Vec::new(),
        Arc::new(AtomicBool::new(false)),
    );
    let control = listening.serve(target).unwrap();
    let mut greeting = String::new();
    BufReader::new(&early).read_line(&mut greeting).unwrap();
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    drop(early);
    drop(control);
    assert!(!path.exists(), "removed when the server stops");
    drop(Control::bind(&path).unwrap());
    assert!(!path.exists(), "removed when dropped unserved");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn host_events_follow_the_counters_in_the_order_things_happened() {
    const GONE: &str = "USB_HOST_DISCONNECTED";
    const BACK: &str = "USB_HOST_CONNECTED";
    // Nothing moved, open or not.
    assert!(host_events((1, 0), (1, 0)).is_empty());
    assert!(host_events((1, 1), (1, 1)).is_empty());
    // Unplugged, plugged back, each seen by its own look.
    assert_eq!(host_events((1, 0), (1, 1)), [GONE]);
    assert_eq!(host_events((1, 1), (2, 1)), [BACK]);
    // Out and back in between two looks: both, leaving first.
    assert_eq!(host_events((1, 0), (2, 1)), [GONE, BACK]);
    // Absent at start, came and went between two looks: arriving first.
    assert_eq!(host_events((0, 0), (1, 1)), [BACK, GONE]);
    // Several cycles between two looks collapse to one pair.
    assert_eq!(host_events((1, 0), (4, 3)), [GONE, BACK]);
    // A look while the device is going (CI once saw "gone" and "still
    // there" at one look, then "gone" again): the counters move once.
    let looks = [(1, 0), (1, 1), (1, 1), (2, 1)];
    let events: Vec<_> = looks
        .windows(2)
        .flat_map(|w| host_events(w[0], w[1]))
        .collect();
    assert_eq!(events, [GONE, BACK]);
}
