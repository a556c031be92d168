//! The control socket's messages and commands (see the module above).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Map, Value};

use hcd_emul::hid::{Axis, Button, Kind};

use super::{keys, Target};

/// Most events in one `input-send-event`, keys in one `send-key`.
pub const MAX_EVENTS: usize = 64;
/// Longest `device_add` id.
pub const MAX_ID: usize = 64;
/// Most devices plugged in at once (configured and added).
pub const MAX_DEVICES: usize = 32;
/// Longest `send-key` hold time.
pub const MAX_HOLD_MS: u64 = 5000;

/// A command's result: a value, or an error class and description.
pub type Answer = Result<Value, (String, String)>;

/// An error answer.
pub fn error(class: &str, desc: String) -> Answer {
    Err((class.to_string(), desc))
}

fn generic(desc: impl Into<String>) -> Answer {
    error("GenericError", desc.into())
}

/// The wire form of an answer, with the command's `id` if it had one.
pub fn reply(a: &Answer, id: Option<&Value>) -> Vec<u8> {
    let mut m = Map::new();
    match a {
        Ok(v) => {
            m.insert("return".into(), v.clone());
        }
        Err((class, desc)) => {
            m.insert("error".into(), json!({"class": class, "desc": desc}));
        }
    }
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    let mut out = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
    out.extend_from_slice(b"\r\n");
    out
}

/// One client's state.
pub struct Session<'a> {
    target: &'a Target,
    negotiated: bool,
    closing: bool,
}

impl<'a> Session<'a> {
    /// A new session on `target`.
    pub fn new(target: &'a Target) -> Self {
        Session {
            target,
            negotiated: false,
            closing: false,
        }
    }

    /// QMP's greeting.
    pub fn greeting(&self) -> Vec<u8> {
        let v = json!({"QMP": {
            "version": {"package": format!("xen-usb-dm {}", env!("CARGO_PKG_VERSION"))},
            "capabilities": []
        }});
        let mut out = serde_json::to_vec(&v).unwrap_or_default();
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Whether `qmp_capabilities` was sent (events flow from then on).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the session ends after the last answer (`quit`).
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Answers one message (every message gets an answer).
    pub fn handle(&mut self, msg: &Value) -> Option<Vec<u8>> {
        let id = msg.get("id");
        Some(reply(&self.command(msg), id))
    }

    fn command(&mut self, msg: &Value) -> Answer {
        let Some(obj) = msg.as_object() else {
            return generic("QMP input must be a JSON object");
        };
        for k in obj.keys() {
            if !matches!(k.as_str(), "execute" | "arguments" | "id") {
                return generic(format!("QMP input member '{k}' is unexpected"));
            }
        }
        let Some(name) = obj.get("execute") else {
            return generic("QMP input lacks member 'execute'");
        };
        let Some(name) = name.as_str() else {
            return generic("QMP input member 'execute' must be a string");
        };
        let empty = Value::Object(Map::new());
        let args = obj.get("arguments").unwrap_or(&empty);
        if !args.is_object() {
            return generic("QMP input member 'arguments' must be an object");
        }
        if !self.negotiated {
            if name == "qmp_capabilities" {
                self.negotiated = true;
                return Ok(json!({}));
            }
            return error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            );
        }
        match name {
            "qmp_capabilities" => error(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored".into(),
            ),
            "query-status" => no_args(args).map(|()| json!({"status": "running", "running": true})),
            "query-usb" => no_args(args).and_then(|()| self.query_usb()),
            "input-send-event" => self.input_send_event(args),
            "send-key" => self.send_key(args),
            "device_add" => self.device_add(args),
            "device_del" => self.device_del(args),
            "capture-start" => self.capture_start(args),
            "capture-stop" => self.capture_stop(args),
            "quit" => no_args(args).map(|()| {
                self.target.quit.store(true, Ordering::Relaxed);
                self.target.mailbox.wake();
                self.closing = true;
                json!({})
            }),
            other => error(
                "CommandNotFound",
                format!("The command {other} has not been found"),
            ),
        }
    }

    fn query_usb(&self) -> Answer {
        let r = self.target.mailbox.call(|pci| {
            let x = pci.controller_mut();
            (x.model(), x.devices())
        });
        let Ok((model, devices)) = r else {
            return generic("the controller did not answer");
        };
        let plugged = self.target.plugged();
        let list: Vec<Value> = devices
            .iter()
            .map(|d| {
                let id = plugged
                    .iter()
                    .find(|p| p.port == d.at)
                    .map(|p| p.id.as_str());
                json!({
                    "id": id,
                    "port": d.at.root,
                    "hub-port": d.at.hub,
                    "device": d.name,
                    "speed": format!("{:?}", d.speed).to_lowercase(),
                    "connected": d.connected,
                })
            })
            .collect();
        Ok(json!({"controller": format!("{model:?}").to_lowercase(), "devices": list}))
    }

    /// `device_add {"id": ID, "kind": KIND, ...}`: the other members are
    /// the keys of a `[[device]]` table (checked as the configuration's
    /// are; paths must be absolute). The device is built here (its image
    /// opened, a host device looked up) and plugged into the first free
    /// port that fits its speed on the controller's thread.
    fn device_add(&self, args: &Value) -> Answer {
        let Some(obj) = args.as_object() else {
            return generic("'arguments' must be an object");
        };
        let Some(id) = obj.get("id").and_then(Value::as_str) else {
            return generic("Parameter 'id' is missing or not a string");
        };
        let id_ok = (1..=MAX_ID).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && id.as_bytes()[0].is_ascii_alphabetic();
        if !id_ok {
            return generic(format!(
                "'id' must be 1 to {MAX_ID} letters, digits, '-', '_' or '.', starting with a letter"
            ));
        }
        let mut keys = obj.clone();
        keys.remove("id");
        for k in ["image", "capture"] {
            if let Some(p) = keys.get(k).and_then(Value::as_str) {
                if !std::path::Path::new(p).is_absolute() || p.len() > 4096 || p.contains('\0') {
                    return generic(format!(
                        "'{k}' must be an absolute path (at most 4096 bytes)"
                    ));
                }
            }
        }
        let mut d: crate::config::Device = match serde_json::from_value(Value::Object(keys)) {
            Ok(d) => d,
            Err(e) => return generic(format!("{id}: {e}")),
        };
        if let Err((key, msg)) = d.resolve(id, std::path::Path::new("/")) {
            return generic(format!("{key}: {msg}"));
        }
        {
            let plugged = self.target.plugged();
            if plugged.iter().any(|p| p.id == id) {
                return generic(format!("Duplicate device ID '{id}'"));
            }
            if plugged.len() >= MAX_DEVICES {
                return generic(format!("at most {MAX_DEVICES} devices"));
            }
        }
        let b = match crate::build_device(self.target.model, id, &d) {
            Ok(b) => b,
            Err(e) => return generic(format!("{e:#}")),
        };
        let (desc, capture, input, host, source) = (b.desc, b.capture, b.input, b.host, b.source);
        let dev = b.dev;
        let port = match self
            .target
            .mailbox
            .call(move |pci| pci.controller_mut().attach(dev))
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return generic(format!("{id}: {e}")),
            Err(_) => return generic("the controller did not answer"),
        };
        let mut plugged = self.target.plugged();
        // A second device_add with this id raced this one: the later one
        // goes away again.
        if plugged.iter().any(|p| p.id == id) {
            drop(plugged);
            let _ = self
                .target
                .mailbox
                .call(move |pci| drop(pci.controller_mut().detach(port)));
            return generic(format!("Duplicate device ID '{id}'"));
        }
        plugged.push(crate::Plugged {
            id: id.to_owned(),
            port,
            kind: d.kind,
            input,
            capture,
            host,
            source,
        });
        drop(plugged);
        tracing::info!("control: {id}: {desc} on {port}");
        self.target
            .events
            .emit("DEVICE_ADDED", super::located(id, port));
        Ok(json!({"id": id, "port": port.root, "hub-port": port.hub}))
    }

    /// `device_del {"id": ID}`: unplugs the device (the guest sees it
    /// disconnect; its transfers in flight end with an error) and drops it
    /// (an image is flushed and closed, a host device released).
    fn device_del(&self, args: &Value) -> Answer {
        only(args, &["id"])?;
        let Some(id) = args.get("id").and_then(Value::as_str) else {
            return generic("Parameter 'id' is missing or not a string");
        };
        let p = {
            let mut plugged = self.target.plugged();
            let Some(i) = plugged.iter().position(|p| p.id == id) else {
                return error("DeviceNotFound", format!("Device '{id}' not found"));
            };
            plugged.remove(i)
        };
        let port = p.port;
        if self
            .target
            .mailbox
            .call(move |pci| drop(pci.controller_mut().detach(port)))
            .is_err()
        {
            return generic("the controller did not answer");
        }
        drop(p.capture.stop());
        tracing::info!("control: {id}: unplugged from {port}");
        self.target
            .events
            .emit("DEVICE_DELETED", super::located(id, port));
        Ok(json!({}))
    }

    /// The capture switch of `args.device` (its index in `[[device]]`).
    /// The capture switch of `args.device`: its index in `[[device]]`, or
    /// a `device_add` id.
    fn capture_switch(
        &self,
        args: &Value,
    ) -> Result<hcd_emul::capture::CaptureSwitch, (String, String)> {
        let id =
            match args.get("device") {
                Some(Value::Number(n)) if n.as_u64().is_some() => {
                    format!("device[{}]", n.as_u64().unwrap_or_default())
                }
                Some(Value::String(s)) => s.clone(),
                _ => return Err((
                    "GenericError".into(),
                    "Parameter 'device' (the index in [[device]] or a device_add id) is missing \
                     or not a number or string"
                        .into(),
                )),
            };
        self.target
            .plugged()
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.capture.clone())
            .ok_or_else(|| ("DeviceNotFound".into(), format!("no {id}")))
    }

    /// `capture-start {"device": N, "file": ABSOLUTE_PATH, "snaplen": BYTES,
    /// "max-mib": N, "keep": N}`: captures device N's transfers into a new
    /// usbmon pcap file (replacing a capture already running).
    fn capture_start(&self, args: &Value) -> Answer {
        only(args, &["device", "file", "snaplen", "max-mib", "keep"])?;
        let sw = self.capture_switch(args)?;
        let Some(file) = args.get("file").and_then(Value::as_str) else {
            return generic("Parameter 'file' is missing or not a string");
        };
        let path = std::path::Path::new(file);
        if !path.is_absolute() || file.len() > 4096 || file.contains('\0') {
            return generic("'file' must be an absolute path (at most 4096 bytes)");
        }
        let mut o = hcd_emul::capture::CaptureOptions::new(path);
        let num = |k: &str, max: u64| -> Result<Option<u64>, (String, String)> {
            match args.get(k) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n <= max => Ok(Some(n)),
                    _ => Err((
                        "GenericError".into(),
                        format!("'{k}' must be a number from 0 to {max}"),
                    )),
                },
            }
        };
        if let Some(n) = num("snaplen", hcd_emul::capture::MAX_SNAPLEN as u64)? {
            o.snaplen = n as usize;
        }
        if let Some(n) = num("max-mib", 1 << 20)? {
            o.max_bytes = n << 20;
        }
        if let Some(n) = num("keep", 1000)? {
            o.keep = n as u32;
        }
        match sw.start(&o) {
            Ok(()) => Ok(json!({"file": file})),
            Err(e) => generic(format!("{file}: {e}")),
        }
    }

    /// `capture-stop {"device": N}`: ends device N's capture; answers with
    /// its file and counters (`records`, `dropped`).
    fn capture_stop(&self, args: &Value) -> Answer {
        only(args, &["device"])?;
        match self.capture_switch(args)?.stop() {
            Some((path, st)) => Ok(json!({
                "file": path.to_string_lossy(),
                "records": st.records,
                "dropped": st.dropped,
            })),
            None => generic("no capture is running on that device"),
        }
    }

    /// QMP's `input-send-event`: `{"events": [{"type": "key", "data":
    /// {"down": bool, "key": {"type": "qcode", "data": NAME}}}, {"type":
    /// "btn", "data": {"down": bool, "button": NAME}}, {"type": "rel" |
    /// "abs", "data": {"axis": "x" | "y", "value": N}}, ...]}`, optional
    /// `device` (ignored) and `head`. Every event is checked before any is
    /// sent.
    fn input_send_event(&self, args: &Value) -> Answer {
        only(args, &["events", "device", "head"])?;
        let Some(events) = args.get("events").and_then(Value::as_array) else {
            return generic("Parameter 'events' is missing or not an array");
        };
        if events.is_empty() || events.len() > MAX_EVENTS {
            return generic(format!("'events' must hold 1 to {MAX_EVENTS} events"));
        }
        enum Ev {
            Key(u8, bool),
            Btn(Button, bool),
            Rel(Axis, i32),
            Abs(Axis, i32),
        }
        let mut list = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let ty = e.get("type").and_then(Value::as_str);
            let Some(d) = e.get("data") else {
                return generic(format!(
                    "events[{i}]: type must be key, btn, rel or abs, with data"
                ));
            };
            let at = format!("events[{i}].data");
            let axis = || match d.get("axis").and_then(Value::as_str) {
                Some("x") => Ok(Axis::X),
                Some("y") => Ok(Axis::Y),
                _ => Err((
                    "GenericError".to_string(),
                    format!("{at}.axis must be \"x\" or \"y\""),
                )),
            };
            let value = || {
                d.get("value")
                    .and_then(Value::as_i64)
                    .and_then(|v| i32::try_from(v).ok())
                    .ok_or_else(|| {
                        (
                            "GenericError".to_string(),
                            format!("{at}.value must be a 32-bit integer"),
                        )
                    })
            };
            let down = || {
                d.get("down").and_then(Value::as_bool).ok_or_else(|| {
                    (
                        "GenericError".to_string(),
                        format!("{at}.down must be a boolean"),
                    )
                })
            };
            list.push(match ty {
                Some("key") => {
                    let dn = down()?;
                    Ev::Key(key_usage(d.get("key"), &format!("{at}.key"))?, dn)
                }
                Some("btn") => {
                    let b = match d.get("button").and_then(Value::as_str) {
                        Some("left") => Button::Left,
                        Some("right") => Button::Right,
                        Some("middle") => Button::Middle,
                        Some("wheel-up") => Button::WheelUp,
                        Some("wheel-down") => Button::WheelDown,
                        _ => {
                            return generic(format!(
                                "{at}.button must be left, right, middle, wheel-up or wheel-down"
                            ))
                        }
                    };
                    Ev::Btn(b, down()?)
                }
                Some("rel") => Ev::Rel(axis()?, value()?),
                Some("abs") => Ev::Abs(axis()?, value()?),
                _ => {
                    return generic(format!(
                        "events[{i}]: type must be key, btn, rel or abs, with data"
                    ))
                }
            });
        }
        // Pointer events go to a tablet if the command moves absolutely,
        // to a mouse if relatively; buttons alone to the first of either.
        let pointers = self.target.pointers();
        let find = |k: Kind| pointers.iter().find(|p| p.kind() == k);
        let has_abs = list.iter().any(|e| matches!(e, Ev::Abs(..)));
        let has_rel = list.iter().any(|e| matches!(e, Ev::Rel(..)));
        let has_ptr = list.iter().any(|e| !matches!(e, Ev::Key(..)));
        if has_abs && has_rel {
            return generic("one command cannot move both relatively and absolutely");
        }
        let missing = |what: &str| ("DeviceNotFound".to_string(), format!("no {what}"));
        let pointer = if has_abs {
            Some(
                find(Kind::Tablet)
                    .ok_or_else(|| missing("tablet ([[device]] kind = \"tablet\")"))?,
            )
        } else if has_rel {
            Some(find(Kind::Mouse).ok_or_else(|| missing("mouse ([[device]] kind = \"mouse\")"))?)
        } else if has_ptr {
            Some(pointers.first().ok_or_else(|| missing("mouse or tablet"))?)
        } else {
            None
        };
        if list.iter().any(|e| matches!(e, Ev::Key(..))) {
            self.keyboard()?;
        }
        for e in list {
            match e {
                Ev::Key(u, down) => self.press(u, down)?,
                Ev::Btn(b, down) => {
                    if let Some(p) = &pointer {
                        if !p.button(b, down) {
                            return generic("the guest is not reading the pointer: event dropped");
                        }
                    }
                }
                Ev::Rel(a, v) => {
                    if let Some(p) = &pointer {
                        p.rel(a, v);
                    }
                }
                Ev::Abs(a, v) => {
                    if let Some(p) = &pointer {
                        p.abs(a, v);
                    }
                }
            }
        }
        Ok(json!({}))
    }

    /// QMP's `send-key`: `{"keys": [KeyValue...], "hold-time": ms}`.
    fn send_key(&self, args: &Value) -> Answer {
        only(args, &["keys", "hold-time"])?;
        let Some(list) = args.get("keys").and_then(Value::as_array) else {
            return generic("Parameter 'keys' is missing or not an array");
        };
        if list.is_empty() || list.len() > MAX_EVENTS {
            return generic(format!("'keys' must hold 1 to {MAX_EVENTS} keys"));
        }
        let hold = match args.get("hold-time") {
            None => 100,
            Some(v) => match v.as_u64() {
                Some(ms) if ms <= MAX_HOLD_MS => ms,
                _ => return generic(format!("'hold-time' must be 0 to {MAX_HOLD_MS} ms")),
            },
        };
        let mut usages = Vec::new();
        for (i, k) in list.iter().enumerate() {
            usages.push(key_usage(Some(k), &format!("keys[{i}]"))?);
        }
        self.keyboard()?;
        for &u in &usages {
            self.press(u, true)?;
        }
        std::thread::sleep(Duration::from_millis(hold));
        for &u in usages.iter().rev() {
            self.press(u, false)?;
        }
        Ok(json!({}))
    }

    fn keyboard(&self) -> Result<(), (String, String)> {
        if self.target.keyboards().is_empty() {
            return Err((
                "DeviceNotFound".into(),
                "no keyboard ([[device]] kind = \"keyboard\")".into(),
            ));
        }
        Ok(())
    }

    /// A key event to the first keyboard (QMP's default device).
    fn press(&self, usage: u8, down: bool) -> Result<(), (String, String)> {
        if self
            .target
            .keyboards()
            .first()
            .is_some_and(|k| k.key(usage, down))
        {
            Ok(())
        } else {
            Err((
                "GenericError".into(),
                "the guest is not reading the keyboard: event dropped".into(),
            ))
        }
    }
}

fn no_args(args: &Value) -> Result<(), (String, String)> {
    only(args, &[])
}

/// `args` holds no member but `allowed` ones.
fn only(args: &Value, allowed: &[&str]) -> Result<(), (String, String)> {
    if let Some(o) = args.as_object() {
        for k in o.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err((
                    "GenericError".into(),
                    format!("Parameter '{k}' is unexpected"),
                ));
            }
        }
    }
    Ok(())
}

/// A KeyValue (`{"type": "qcode", "data": NAME}`) as a HID usage.
fn key_usage(k: Option<&Value>, what: &str) -> Result<u8, (String, String)> {
    let bad = |m: String| ("GenericError".to_string(), m);
    let Some(k) = k else {
        return Err(bad(format!("{what} is missing")));
    };
    match (k.get("type").and_then(Value::as_str), k.get("data")) {
        (Some("qcode"), Some(Value::String(name))) => keys::usage(name).ok_or_else(|| {
            bad(format!(
                "{what}: unknown qcode '{}'",
                name.chars().take(32).collect::<String>()
            ))
        }),
        (Some("number"), _) => Err(bad(format!(
            "{what}: key numbers are not supported; use a qcode"
        ))),
        _ => Err(bad(format!(
            "{what} must be {{\"type\": \"qcode\", \"data\": NAME}}"
        ))),
    }
}
