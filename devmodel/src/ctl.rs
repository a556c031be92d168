//! `xen-usb-dm ctl SOCKET COMMAND [ARGS]`: a small client of the control
//! socket (see `control`), with human-readable output or `--json`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Why a `ctl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command line does not make a command.
    #[error("{0}")]
    Usage(String),
    /// The socket could not be used.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("{class}: {desc}")]
    Remote {
        /// QMP error class.
        class: String,
        /// Its description.
        desc: String,
    },
    /// The server said something that is not the protocol.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// The request a command line makes: the command name and its arguments.
pub fn request(command: &str, args: &[String], hold_ms: Option<u64>) -> Result<Value, CtlError> {
    let usage = |m: &str| Err(CtlError::Usage(m.to_string()));
    match command {
        "query-usb" | "query-status" | "quit" => {
            if !args.is_empty() {
                return usage(&format!("{command} takes no arguments"));
            }
            Ok(json!({"execute": command}))
        }
        "send-key" => {
            let [combo] = args else {
                return usage("send-key KEYS (qcodes joined by '-', e.g. ctrl-alt-delete)");
            };
            let keys: Vec<Value> = combo
                .split('-')
                .map(|k| json!({"type": "qcode", "data": k}))
                .collect();
            let mut a = json!({"keys": keys});
            if let Some(ms) = hold_ms {
                a["hold-time"] = json!(ms);
            }
            Ok(json!({"execute": "send-key", "arguments": a}))
        }
        "device_add" => {
            if args.is_empty() {
                return usage(
                    "device_add id=ID kind=KIND KEY=VALUE... (the keys of a [[device]] table; \
                     true/false and numbers (0x.. hex too) typed, the rest strings)",
                );
            }
            let mut a = serde_json::Map::new();
            for kv in args {
                let Some((k, v)) = kv.split_once('=') else {
                    return usage(&format!("device_add: {kv:?} is not KEY=VALUE"));
                };
                if a.insert(k.to_string(), typed(v)).is_some() {
                    return usage(&format!("device_add: {k} given twice"));
                }
            }
            Ok(json!({"execute": "device_add", "arguments": a}))
        }
        "device_del" => {
            let [id] = args else {
                return usage("device_del ID (device_add's id, or device[N] of the configuration)");
            };
            Ok(json!({"execute": "device_del", "arguments": {"id": id}}))
        }
        "execute" => match args {
            [name] => Ok(json!({"execute": name})),
            [name, a] => {
                let a: Value = serde_json::from_str(a)
                    .map_err(|e| CtlError::Usage(format!("arguments: {e}")))?;
                Ok(json!({"execute": name, "arguments": a}))
            }
            _ => usage("execute NAME [ARGUMENTS-JSON]"),
        },
        other => usage(&format!(
            "unknown command {other:?} (query-usb, query-status, device_add, device_del, \
             send-key, quit, execute)"
        )),
    }
}

/// A `device_add` value: true/false, a decimal or 0x-hex number, else the
/// string itself.
fn typed(v: &str) -> Value {
    match v {
        "true" => return json!(true),
        "false" => return json!(false),
        _ => {}
    }
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None if v.bytes().all(|b| b.is_ascii_digit()) => v.parse().ok(),
        None => None,
    };
    n.map_or_else(|| json!(v), |n| json!(n))
}

/// Sends `req` on `socket` after the capabilities negotiation; returns
/// the `return` value.
pub fn call(socket: &Path, req: &Value) -> Result<Value, CtlError> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut next = || -> Result<Value, CtlError> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(CtlError::Protocol("connection closed".into()));
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| CtlError::Protocol(format!("{e}")))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = next()?;
    if greeting.get("QMP").is_none() {
        return Err(CtlError::Protocol(greeting.to_string()));
    }
    let mut answer = Value::Null;
    for msg in [&json!({"execute": "qmp_capabilities"}), req] {
        w.write_all(format!("{msg}\r\n").as_bytes())?;
        answer = next()?;
        if let Some(e) = answer.get("error") {
            return Err(CtlError::Remote {
                class: e["class"].as_str().unwrap_or("?").to_string(),
                desc: e["desc"].as_str().unwrap_or("?").to_string(),
            });
        }
    }
    // The request's answer (the last).
    Ok(answer.get("return").cloned().unwrap_or(Value::Null))
}

/// "port N" or "port N hub port M" from `port` and `hub-port`.
fn port_text(v: &Value) -> String {
    match v["hub-port"].as_u64().unwrap_or(0) {
        0 => format!("port {}", v["port"]),
        hub => format!("port {} hub port {hub}", v["port"]),
    }
}

/// A `return` value for people.
pub fn human(command: &str, v: &Value) -> String {
    match command {
        "query-usb" => {
            let mut out = format!("controller: {}\n", v["controller"].as_str().unwrap_or("?"));
            let devs = v["devices"].as_array().cloned().unwrap_or_default();
            if devs.is_empty() {
                out.push_str("no devices\n");
            }
            for d in devs {
                let at = port_text(&d);
                out.push_str(&format!(
                    "{at}: {}{} ({} speed{})\n",
                    d["id"]
                        .as_str()
                        .map(|i| format!("{i}: "))
                        .unwrap_or_default(),
                    d["device"].as_str().unwrap_or("?"),
                    d["speed"].as_str().unwrap_or("?"),
                    if d["connected"] == json!(false) {
                        ", not connected"
                    } else {
                        ""
                    }
                ));
            }
            out
        }
        "query-status" => format!("status: {}\n", v["status"].as_str().unwrap_or("?")),
        "device_add" => format!(
            "{}: plugged in at {}\n",
            v["id"].as_str().unwrap_or("?"),
            port_text(v)
        ),
        _ if v == &json!({}) => "ok\n".into(),
        _ => format!("{v}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_add_and_del_command_lines() {
        let a = |v: &[&str]| {
            request(
                "device_add",
                &v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                None,
            )
        };
        assert_eq!(
            a(&[
                "id=s1",
                "kind=storage",
                "image=/srv/x.img",
                "readonly=true",
                "vendor=0x46f4",
                "bus=3",
                "port=1-2.3"
            ])
            .unwrap(),
            json!({"execute": "device_add", "arguments": {"id": "s1", "kind": "storage",
                "image": "/srv/x.img", "readonly": true, "vendor": 0x46f4, "bus": 3, "port": "1-2.3"}})
        );
        assert!(matches!(a(&[]), Err(CtlError::Usage(_))));
        assert!(matches!(a(&["id"]), Err(CtlError::Usage(m)) if m.contains("KEY=VALUE")));
        assert!(matches!(a(&["id=a", "id=b"]), Err(CtlError::Usage(m)) if m.contains("twice")));
        assert_eq!(
            request("device_del", &["s1".into()], None).unwrap(),
            json!({"execute": "device_del", "arguments": {"id": "s1"}})
        );
        assert!(request("device_del", &[], None).is_err());
        assert_eq!(
            human("device_add", &json!({"id": "s1", "port": 3, "hub-port": 0})),
            "s1: plugged in at port 3\n"
        );
    }

    #[test]
    fn command_lines_make_requests() {
        assert_eq!(
            request("send-key", &["ctrl-alt-delete".into()], Some(50)).unwrap(),
            json!({"execute": "send-key", "arguments": {"keys": [
                {"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"},
                {"type": "qcode", "data": "delete"}], "hold-time": 50}})
        );
        assert_eq!(
            request("query-usb", &[], None).unwrap(),
            json!({"execute": "query-usb"})
        );
        assert!(request("query-usb", &["x".into()], None).is_err());
        assert!(request("send-key", &[], None).is_err());
        assert!(request("frob", &[], None).is_err());
        assert!(request("execute", &["x".into(), "{bad".into()], None).is_err());
        assert_eq!(
            request("execute", &["query-status".into(), "{}".into()], None).unwrap(),
            json!({"execute": "query-status", "arguments": {}})
        );
    }

    #[test]
    fn query_usb_reads_well() {
        let v = json!({"controller": "ehci", "devices": [
            {"port": 2, "hub-port": 0, "device": "storage s.img", "speed": "high", "connected": true},
            {"port": 1, "hub-port": 3, "device": "host 1-2", "speed": "full", "connected": false}]});
        assert_eq!(
            human("query-usb", &v),
            "controller: ehci\nport 2: storage s.img (high speed)\nport 1 hub port 3: host 1-2 (full speed, not connected)\n"
        );
        assert_eq!(human("quit", &json!({})), "ok\n");
    }
}
