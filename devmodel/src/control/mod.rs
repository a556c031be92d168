//! The control socket (`[control] socket = PATH`): a JSON protocol shaped
//! like QMP, so QMP clients and habits carry over. On connect the server
//! sends a greeting; the client sends `qmp_capabilities`, then commands
//! `{"execute": NAME, "arguments": {...}, "id": ANY}` answered with
//! `{"return": ...}` or `{"error": {"class", "desc"}}`, the `id` echoed,
//! every message ending in `\r\n`.
//!
//! Commands: `query-status`, `query-usb` (what is plugged in where, with
//! ids), `device_add` (`{"id": ID, "kind": ..., KEY: VALUE ...}`, the keys
//! of a `[[device]]` table, paths absolute) and `device_del` (`{"id": ID}`;
//! the configuration's devices are `device[N]`), `input-send-event`
//! (QMP's argument shape: key events for the emulated keyboard,
//! btn/rel/abs for the mouse or tablet), `send-key` (QMP's: press in
//! order, hold, release in reverse), `capture-start`/`capture-stop`,
//! `quit`. Events (QMP's form, to every negotiated client): `DEVICE_ADDED`
//! and `DEVICE_DELETED` (`{"device": ID, "port": N, "hub-port": N}`), `USB_HOST_DISCONNECTED`
//! and `USB_HOST_CONNECTED` (a host device left or came back on the host),
//! `CONTROLLER_RESET` (`{"resets": N}`: the guest reset the controller). Access is the
//! socket's file permissions (0600, owner only). Every field is validated;
//! input is capped (1 MiB pending, 8 clients, 64 events per command, 32
//! added devices, 256 queued events per client).
//!
//! One thread accepts; each client gets a thread of its own. Commands that
//! touch the controller are posted to the transport's thread through a
//! [`Mailbox`]; key events go straight to the keyboards' input handles.

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod keys;
mod protocol;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hcd_emul::guest_info;
use hcd_emul::hid::InputHandle;

use crate::config::DeviceKind;
use crate::mailbox::Mailbox;
use crate::qmp::wire::{Piece, Splitter};
use crate::Plugged;

/// Most clients at once.
pub const MAX_CLIENTS: usize = 8;

/// What the control socket acts on.
#[derive(Debug, Clone)]
pub struct Target {
    /// The controller's thread.
    pub mailbox: Mailbox,
    /// The controller's model (what `device_add` builds for).
    pub model: hcd_emul::controller::Model,
    /// What is plugged in (configured and added devices).
    pub devices: Arc<Mutex<Vec<Plugged>>>,
    /// The clients' event queues.
    pub events: Arc<Events>,
    /// Set by `quit` (the transport's loop stops; the mailbox wakes it).
    pub quit: Arc<AtomicBool>,
    /// The controller's reset count (for `CONTROLLER_RESET`).
    pub resets: Option<hcd_emul::controller::ResetCount>,
}

/// What the watcher saw last (see [`Target::watch`]).
#[derive(Debug, Default)]
struct Seen {
    resets: Option<u64>,
    /// Per host device: id, times it was opened, times it went away.
    hosts: Vec<(String, u64, u64)>,
}

impl Target {
    /// A target serving `devices` on the controller behind `mailbox`.
    pub fn new(
        mailbox: Mailbox,
        model: hcd_emul::controller::Model,
        devices: Vec<Plugged>,
        quit: Arc<AtomicBool>,
    ) -> Self {
        Target {
            mailbox,
            model,
            devices: Arc::new(Mutex::new(devices)),
            events: Arc::default(),
            quit,
            resets: None,
        }
    }

    /// With the controller's reset count watched.
    pub fn with_resets(mut self, resets: Option<hcd_emul::controller::ResetCount>) -> Self {
        self.resets = resets;
        self
    }

    /// Emits the events of what changed since `seen` without a command:
    /// `CONTROLLER_RESET` (`{"resets": N}`, the count since start) when the
    /// guest reset the controller, `USB_HOST_DISCONNECTED` /
    /// `USB_HOST_CONNECTED` (`{"device": ID, "port": N, "hub-port": N}`) when a host
    /// device left or came back on the host. Called by the accept loop
    /// (at least every 200 ms).
    fn watch(&self, seen: &mut Seen) {
        if let Some(r) = &self.resets {
            let n = r.get();
            if seen.resets.is_some_and(|s| s != n) {
                self.events
                    .emit("CONTROLLER_RESET", serde_json::json!({"resets": n}));
            }
            seen.resets = Some(n);
        }
        // Both counters come from one snapshot taken under the device's
        // lock, where they change: the device is open exactly when it was
        // opened more often than it went away. (Reading `connected()` beside
        // a counter raced with the device going: a look between the two
        // updates saw it gone and still there.)
        let now: Vec<(String, u64, u64, hcd_emul::controller::PortPath)> = self
            .plugged()
            .iter()
            .filter_map(|p| {
                let s = p.host.as_ref()?.stats();
                Some((p.id.clone(), s.attaches, s.disconnects, p.port))
            })
            .collect();
        for (id, opened, gone, port) in &now {
            let Some((_, opened_before, gone_before)) = seen.hosts.iter().find(|(i, ..)| i == id)
            else {
                continue;
            };
            let data = located(id, *port);
            for event in host_events((*opened_before, *gone_before), (*opened, *gone)) {
                self.events.emit(event, data.clone());
            }
        }
        seen.hosts = now.into_iter().map(|(i, o, g, _)| (i, o, g)).collect();
    }

    fn plugged(&self) -> std::sync::MutexGuard<'_, Vec<Plugged>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The keyboards' inputs, in the order they were plugged in.
    pub fn keyboards(&self) -> Vec<InputHandle> {
        self.inputs(|k| k == DeviceKind::Keyboard)
    }

    /// The mice' and tablets' inputs, in the order they were plugged in.
    pub fn pointers(&self) -> Vec<InputHandle> {
        self.inputs(|k| matches!(k, DeviceKind::Mouse | DeviceKind::Tablet))
    }

    fn inputs(&self, want: impl Fn(DeviceKind) -> bool) -> Vec<InputHandle> {
        self.plugged()
            .iter()
            .filter(|p| want(p.kind))
            .filter_map(|p| p.input.clone())
            .collect()
    }
}

/// The events a host device's (times opened, times gone) counters give
/// between two looks. When both moved, the order follows from how it was at
/// the first look: a device that was there left first. Cycles between two
/// looks collapse to one pair.
fn host_events(before: (u64, u64), now: (u64, u64)) -> Vec<&'static str> {
    let came = now.0 > before.0;
    let left = now.1 > before.1;
    let order = if before.0 > before.1 {
        [
            ("USB_HOST_DISCONNECTED", left),
            ("USB_HOST_CONNECTED", came),
        ]
    } else {
        [
            ("USB_HOST_CONNECTED", came),
            ("USB_HOST_DISCONNECTED", left),
        ]
    };
    order
        .into_iter()
        .filter(|(_, m)| *m)
        .map(|(e, _)| e)
        .collect()
}

/// The asynchronous events for the connected clients: each has a bounded
/// queue; a client that does not read loses events (logged, rate-limited)
/// and never blocks the sender.
#[derive(Debug, Default)]
pub struct Events {
    queues: Mutex<Vec<mpsc::SyncSender<Vec<u8>>>>,
}

/// Most events queued for one client.
pub const EVENT_QUEUE: usize = 256;

impl Events {
    /// A new client's queue.
    pub fn subscribe(&self) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// Sends QMP's event form `{"event": NAME, "data": DATA, "timestamp":
    /// {"seconds", "microseconds"}}` to every client.
    pub fn emit(&self, name: &str, data: serde_json::Value) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut v = serde_json::json!({
            "event": name,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        v["data"] = data;
        let mut msg = serde_json::to_vec(&v).unwrap_or_default();
        msg.extend_from_slice(b"\r\n");
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        q.retain(|tx| match tx.try_send(msg.clone()) {
            Ok(()) => true,
            Err(mpsc::TrySendError::Full(_)) => {
                guest_info!(target: "control", "control client does not read its events: one dropped");
                true
            }
            Err(mpsc::TrySendError::Disconnected(_)) => false,
        });
    }
}

/// A running control socket; dropping it stops the threads and removes
/// the socket file.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Control {
    /// Binds `path` and serves `target` on it: [`Control::bind`] then
    /// [`Listening::serve`].
    pub fn start(path: &Path, target: Target) -> io::Result<Control> {
        Self::bind(path)?.serve(target)
    }

    /// Binds `path` with owner-only permissions (0600 from the moment the
    /// socket has that name: see `bind_owner_only`); clients that
    /// connect wait until [`Listening::serve`]. A socket left there by a
    /// process that is gone (one that ran chrooted cannot remove it on
    /// exit) is replaced; one a running process still answers on, or a
    /// file that is not a socket, is not.
    pub fn bind(path: &Path) -> io::Result<Listening> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            let refused = |e: io::Error| e.kind() == io::ErrorKind::ConnectionRefused;
            let why = if !m.file_type().is_socket() {
                Some("not a socket")
            } else if !UnixStream::connect(path).is_err_and(refused) {
                Some("a running process serves it")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: already exists ({why})", path.display()),
                ));
            }
            guest_info!(target: "control", "{}: removing a stale socket", path.display());
            std::fs::remove_file(path)?;
        }
        let listener = bind_owner_only(path)?;
        listener.set_nonblocking(true)?;
        Ok(Listening {
            path: path.to_owned(),
            listener: Some(listener),
        })
    }
}

/// A bound control socket not serving yet (bound before the transport's
/// own socket appears, so a client that sees that one finds this one
/// too). Dropped unserved, it removes the socket file.
#[derive(Debug)]
pub struct Listening {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl Listening {
    /// Serves `target`: one thread accepts, each client gets its own.
    pub fn serve(mut self, target: Target) -> io::Result<Control> {
        let (Some(listener), path) = (self.listener.take(), std::mem::take(&mut self.path)) else {
            return Err(io::Error::other("control socket served twice"));
        };
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        match std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &Arc::new(target), &st))
        {
            Ok(thread) => Ok(Control {
                path,
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a listening socket at `path` that no other user can connect to
/// at any moment: bound in a fresh directory only we may enter (0700),
/// made 0600 there, then linked to `path` (failing if something took
/// that name meanwhile, never replacing it). Binding at `path` and then
/// changing its mode would leave a window with the umask's permissions.
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let private = dir.join(format!(
        ".xen-usb-dm.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inner = private.join("s");
    let bound = UnixListener::bind(&inner).and_then(|l| {
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&inner, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    bound
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where device `id` is, as events and `device_add` give it: the fields
/// `query-usb` uses (`port` the root port, `hub-port` 0 or the port of
/// EHCI's built-in hub).
pub(crate) fn located(id: &str, at: hcd_emul::controller::PortPath) -> serde_json::Value {
    serde_json::json!({"device": id, "port": at.root, "hub-port": at.hub})
}

/// Waits up to `ms` for `fd` to be readable.
pub(crate) fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn accept_loop(listener: &UnixListener, target: &Arc<Target>, stop: &Arc<AtomicBool>) {
    let clients = Arc::new(AtomicUsize::new(0));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        threads.retain(|t| !t.is_finished());
        target.watch(&mut seen);
        if !readable(listener.as_raw_fd(), 200) {
            continue;
        }
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        if clients.load(Ordering::Relaxed) >= MAX_CLIENTS {
            let _ = s.set_nonblocking(false);
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(&protocol::reply(
                &protocol::error("GenericError", "too many clients".into()),
                None,
            ));
            continue;
        }
        clients.fetch_add(1, Ordering::Relaxed);
        let (t, st, c) = (target.clone(), stop.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(s, &t, &st);
                c.fetch_sub(1, Ordering::Relaxed);
            });
        match spawned {
            Ok(h) => threads.push(h),
            Err(_) => {
                clients.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

/// One client: greeting, then messages until it leaves, breaks the
/// protocol beyond repair (input overflow) or the server stops.
fn serve_client(mut s: UnixStream, target: &Target, stop: &AtomicBool) {
    if s.set_nonblocking(false).is_err()
        || s.set_read_timeout(Some(Duration::from_millis(200)))
            .is_err()
        || s.set_write_timeout(Some(Duration::from_secs(5))).is_err()
    {
        return;
    }
    let mut session = protocol::Session::new(target);
    if s.write_all(&session.greeting()).is_err() {
        return;
    }
    let events = target.events.subscribe();
    let mut split = Splitter::default();
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        // Events reach a client once it negotiated (as QMP's do), between
        // its commands' answers, within a read timeout of being sent.
        while let Ok(ev) = events.try_recv() {
            if session.negotiated() && s.write_all(&ev).is_err() {
                return;
            }
        }
        let n = match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if split.push(&buf[..n]).is_err() {
            guest_info!(target: "control", "control client sent 1 MiB without a complete message; dropped");
            let _ = s.write_all(&protocol::reply(
                &protocol::error("GenericError", "message too large".into()),
                None,
            ));
            return;
        }
        while let Some(piece) = split.next_piece() {
            let out = match piece {
                Piece::Msg(_, v) => session.handle(&v),
                Piece::Bad(why) => {
                    Some(protocol::reply(&protocol::error("GenericError", why), None))
                }
            };
            if let Some(out) = out {
                if s.write_all(&out).is_err() {
                    return;
                }
            }
            if session.closing() {
                return;
            }
        }
    }
}
