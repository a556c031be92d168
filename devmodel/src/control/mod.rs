//! The control socket (`[control] socket = PATH`): a JSON protocol shaped
//! like QMP, so QMP clients and habits carry over. On connect the server
//! sends a greeting; the client sends `qmp_capabilities`, then commands
//! `{"execute": NAME, "arguments": {...}, "id": ANY}` answered with
//! `{"return": ...}` or `{"error": {"class", "desc"}}`, the `id` echoed,
//! every message ending in `\r\n`.
//!
//! Commands so far: `query-status`, `query-usb` (what is plugged in
//! where), `input-send-event` (QMP's argument shape: key events for the
//! emulated keyboard, btn/rel/abs for the mouse or tablet), `send-key`
//! (QMP's: press in order, hold, release in reverse), `quit`. Access is the socket's file permissions (0600,
//! owner only). Every field is validated; input is capped (1 MiB pending,
//! 8 clients, 64 events per command).
//!
//! One thread accepts; each client gets a thread of its own. Commands that
//! touch the controller are posted to the transport's thread through a
//! [`Mailbox`]; key events go straight to the keyboards' input handles.

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
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hcd_emul::guest_info;
use hcd_emul::hid::InputHandle;

use crate::mailbox::Mailbox;
use crate::qmp::wire::{Piece, Splitter};

/// Most clients at once.
pub const MAX_CLIENTS: usize = 8;

/// What the control socket acts on.
#[derive(Debug, Clone)]
pub struct Target {
    /// The controller's thread.
    pub mailbox: Mailbox,
    /// The emulated keyboards' inputs, in configuration order.
    pub keyboards: Vec<InputHandle>,
    /// The emulated mice' and tablets' inputs, in configuration order.
    pub pointers: Vec<InputHandle>,
    /// Every device's capture switch, by index in `[[device]]`.
    pub captures: Vec<(usize, hcd_emul::capture::CaptureSwitch)>,
    /// Set by `quit` (the transport's loop stops; the mailbox wakes it).
    pub quit: Arc<AtomicBool>,
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
    /// Binds `path` (owner-only permissions) and serves `target` on it.
    pub fn start(path: &Path, target: Target) -> io::Result<Control> {
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: already exists", path.display()),
            ));
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &Arc::new(target), &st))?;
        Ok(Control {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
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

/// Waits up to `ms` for `fd` to be readable.
fn readable(fd: i32, ms: i32) -> bool {
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
    while !stop.load(Ordering::Relaxed) {
        threads.retain(|t| !t.is_finished());
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
    let mut split = Splitter::default();
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
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
