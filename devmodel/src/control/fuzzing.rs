//! Entry point of the `control` fuzz target (feature `fuzzing`, not for
//! production): a hostile control-socket client's bytes, split into
//! messages as the server splits them and answered by the server's own
//! session, against a UHCI with a keyboard and a tablet whose controller
//! thread is this one (the mailbox runs its jobs at once).
//!
//! Commands that reach outside the process are left out: `device_add` of a
//! storage or host device (it would open files and host devices the input
//! names), `capture-start` (it would create files), `quit`; `send-key`'s
//! hold time is capped to keep inputs fast. Everything else runs as the
//! server runs it: parsing, negotiation, every argument check, input
//! events, `device_add`/`device_del` of keyboards, mice and tablets (the
//! controller's ports fill and empty), `query-usb`, events.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use hcd_emul::controller::{Controller, Model};
use hcd_emul::pci::{InterruptTransport, MsiMessage, PciFunction};
use hcd_emul::usb::Speed;
use serde_json::Value;

use super::protocol::Session;
use super::Target;
use crate::config::DeviceKind;
use crate::mailbox::Mailbox;
use crate::qmp::wire::{Piece, Splitter};

#[derive(Debug)]
struct NoIrq;
impl InterruptTransport for NoIrq {
    fn set_intx(&mut self, _: bool) {}
    fn send_msi(&mut self, _: MsiMessage) {}
}

/// The server's state for one input: the target and a session on it.
#[derive(Debug)]
pub struct FuzzControl {
    target: Target,
    events: std::sync::mpsc::Receiver<Vec<u8>>,
    _cell: Arc<OnceLock<Mailbox>>,
}

impl FuzzControl {
    /// A UHCI with a keyboard and a tablet, as `device[0]` and `device[1]`.
    pub fn new() -> Self {
        let mut x = Controller::new(Model::Uhci, hcd_emul::GuestRam::anonymous(1 << 16));
        let mut plugged = Vec::new();
        for (i, kind) in [DeviceKind::Keyboard, DeviceKind::Tablet]
            .into_iter()
            .enumerate()
        {
            let hk = if kind == DeviceKind::Keyboard {
                hcd_emul::hid::Kind::Keyboard
            } else {
                hcd_emul::hid::Kind::Tablet
            };
            let Ok((dev, input)) = hcd_emul::hid::HidDevice::with_kind(hk, Speed::Full) else {
                continue;
            };
            let capture = hcd_emul::capture::CaptureSwitch::default();
            let dev = hcd_emul::capture::Captured::new(Box::new(dev), capture.clone());
            if let Ok(port) = x.attach(Box::new(dev)) {
                plugged.push(crate::Plugged {
                    id: format!("device[{i}]"),
                    port,
                    kind,
                    input: Some(input),
                    capture,
                    host: None,
                    source: None,
                });
            }
        }
        let pci = Arc::new(Mutex::new(PciFunction::new(x, Box::new(NoIrq))));
        // The mailbox's waker runs the mailbox: through a weak reference,
        // or the two would keep each other alive.
        let cell: Arc<OnceLock<Mailbox>> = Arc::default();
        let c = Arc::downgrade(&cell);
        let mailbox = Mailbox::new(Box::new(move || {
            if let Some(m) = c.upgrade().as_deref().and_then(OnceLock::get) {
                m.run(&mut pci.lock().unwrap_or_else(|p| p.into_inner()));
            }
        }));
        let _ = cell.set(mailbox.clone());
        let target = Target::new(
            mailbox,
            Model::Uhci,
            plugged,
            Arc::new(AtomicBool::new(false)),
        );
        let events = target.events.subscribe();
        FuzzControl {
            target,
            events,
            _cell: cell,
        }
    }

    /// Feeds `data` to a session in `chunk`-byte pieces, as a client's
    /// writes; returns the bytes of every answer.
    pub fn run(&self, data: &[u8], chunk: usize) -> usize {
        let mut session = Session::new(&self.target);
        let mut split = Splitter::default();
        let mut out = session.greeting().len();
        for piece in data.chunks(chunk.max(1)) {
            if split.push(piece).is_err() {
                break;
            }
            while let Some(p) = split.next_piece() {
                let answer = match p {
                    Piece::Msg(_, mut v) => {
                        if !allowed(&mut v) {
                            continue;
                        }
                        session.handle(&v)
                    }
                    Piece::Bad(why) => Some(super::protocol::reply(
                        &super::protocol::error("GenericError", why),
                        None,
                    )),
                };
                out += answer.map_or(0, |a| a.len());
                while let Ok(ev) = self.events.try_recv() {
                    out += ev.len();
                }
            }
        }
        out
    }
}

impl Default for FuzzControl {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the harness lets `v` through (see the module), capping
/// `send-key`'s hold time.
fn allowed(v: &mut Value) -> bool {
    let name = v.get("execute").and_then(Value::as_str).unwrap_or_default();
    match name {
        "quit" | "capture-start" => false,
        "device_add" => {
            matches!(
                v.pointer("/arguments/kind").and_then(Value::as_str),
                Some("keyboard" | "mouse" | "tablet")
            ) && v.pointer("/arguments/capture").is_none()
        }
        "send-key" => {
            if let Some(h) = v.pointer_mut("/arguments/hold-time") {
                if h.as_u64().is_some_and(|ms| ms > 1) {
                    *h = Value::from(1);
                }
            }
            true
        }
        _ => true,
    }
}
