//! The proxy between libxl and QEMU's QMP monitor.
//!
//! One connection to QEMU stays open for the domain's life; libxl opens a
//! new connection per operation. Each libxl connection gets QEMU's own
//! greeting (cached), its `qmp_capabilities` is answered here (the QEMU
//! connection negotiated once), and every other command is forwarded with
//! its bytes, id and descriptors unchanged and its reply passed back
//! unchanged — except the USB commands, which [`UsbHost`] serves. Commands
//! from all connections go to QEMU one at a time, in arrival order, so a
//! reply is always for the command in flight and ids never need rewriting;
//! answers made here are queued behind earlier commands of the same
//! connection, so every connection sees its replies in order.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use serde_json::{json, Value};
use tracing::{debug, info};

use super::usb::{self, QmpError, UsbCmd};
use super::wire::{self, Piece, Splitter};
use crate::config::Model;
use hcd_emul::guest_warn;

/// What serves the USB commands.
pub trait UsbHost: usb::Owned {
    /// PCI device numbers (bus 0) our controllers use.
    fn slots_in_use(&self) -> Vec<u8>;
    /// Creates controller `id` in device slot `slot` of bus 0; returns its
    /// description for the log.
    fn add_controller(
        &mut self,
        id: &str,
        model: Model,
        ports: Option<u32>,
        slot: u8,
    ) -> Result<String, QmpError>;
    /// Removes controller `id`.
    fn del_controller(&mut self, id: &str) -> Result<(), QmpError>;
    /// Attaches host device `hostbus`/`hostaddr` as `id` to `controller`
    /// (at xl's port if given).
    fn add_host(
        &mut self,
        id: &str,
        controller: &str,
        port: Option<u32>,
        hostbus: u32,
        hostaddr: u32,
    ) -> Result<(), QmpError>;
    /// Detaches device `id`.
    fn del_device(&mut self, id: &str) -> Result<(), QmpError>;
    /// libxl is about to let the guest run (its `cont`): controllers can
    /// no longer be added (that needs PCI hotplug, which qemu-xen's ACPI
    /// owns), and the process deprivileges now. An error (it could not)
    /// is answered instead of forwarding the `cont`.
    fn guest_starting(&mut self) -> Result<(), QmpError>;
    /// Whether [`UsbHost::guest_starting`] was called.
    fn started(&self) -> bool;
}

/// Why [`Proxy::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// QEMU closed its monitor (it exited: the domain is going away).
    QemuGone,
    /// `stop()` said so.
    Stopped,
}

/// Most libxl connections at once (libxl opens one at a time, per domain,
/// under its lock).
pub const MAX_CLIENTS: usize = 8;
/// Most commands queued from all connections.
pub const MAX_QUEUED: usize = 64;

#[derive(Debug)]
struct Client {
    key: u64,
    stream: UnixStream,
    split: Splitter,
    fds: Vec<OwnedFd>,
    negotiated: bool,
    greeted: bool,
}

#[derive(Debug)]
enum Job {
    /// An answer made here, sent when it reaches the queue's head.
    Reply { client: u64, bytes: Vec<u8> },
    /// A command from a client.
    Command {
        client: u64,
        raw: Vec<u8>,
        msg: Value,
        fds: Vec<OwnedFd>,
    },
}

#[derive(Debug)]
enum Inflight {
    /// Our own `qmp_capabilities`.
    Caps,
    /// A client's command; its reply goes back to it.
    Forward { client: u64 },
    /// Our `query-pci` before creating a controller.
    Slots {
        client: u64,
        id: Option<Value>,
        cmd: UsbCmd,
    },
}

/// The proxy state; see the module documentation.
#[derive(Debug)]
pub struct Proxy<H: UsbHost> {
    listener: UnixListener,
    qemu: UnixStream,
    qemu_split: Splitter,
    greeting: Option<Vec<u8>>,
    ready: bool,
    clients: Vec<Client>,
    next_key: u64,
    queue: VecDeque<Job>,
    inflight: Option<Inflight>,
    host: H,
}

fn reply_bytes(id: Option<&Value>, body: Value) -> Vec<u8> {
    let mut v = body;
    if let (Some(id), Some(o)) = (id, v.as_object_mut()) {
        o.insert("id".into(), id.clone());
    }
    let mut b = serde_json::to_vec(&v).unwrap_or_default();
    b.extend_from_slice(b"\r\n");
    b
}

fn error_bytes(id: Option<&Value>, e: &QmpError) -> Vec<u8> {
    reply_bytes(id, json!({"error": {"class": e.class, "desc": e.desc}}))
}

impl<H: UsbHost> Proxy<H> {
    /// A proxy listening on `listener` (libxl's socket) for QEMU's monitor
    /// on `qemu` (connected; QEMU sends its greeting when it starts).
    pub fn new(listener: UnixListener, qemu: UnixStream, host: H) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        qemu.set_nonblocking(false)?;
        wire::set_send_timeout(qemu.as_raw_fd(), 10);
        Ok(Self {
            listener,
            qemu,
            qemu_split: Splitter::default(),
            greeting: None,
            ready: false,
            clients: Vec::new(),
            next_key: 1,
            queue: VecDeque::new(),
            inflight: None,
            host,
        })
    }

    /// The USB host.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// The USB host.
    pub fn host_mut(&mut self) -> &mut H {
        &mut self.host
    }

    /// Serves until QEMU closes its monitor or `stop()` (checked at least
    /// once a second) says so.
    pub fn run(&mut self, mut stop: impl FnMut() -> bool) -> io::Result<End> {
        loop {
            if stop() {
                return Ok(End::Stopped);
            }
            let mut pfds = vec![
                libc::pollfd {
                    fd: self.qemu.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: if self.clients.len() < MAX_CLIENTS {
                        libc::POLLIN
                    } else {
                        0
                    },
                    revents: 0,
                },
            ];
            for c in &self.clients {
                pfds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events: if self.queue.len() < MAX_QUEUED {
                        libc::POLLIN
                    } else {
                        0
                    },
                    revents: 0,
                });
            }
            // SAFETY: poll reads and writes the array we own, of the
            // length given.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as _, 1000) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let keys: Vec<(u64, i16)> = self
                .clients
                .iter()
                .zip(&pfds[2..])
                .map(|(c, p)| (c.key, p.revents))
                .collect();
            if pfds[0].revents != 0 && !self.read_qemu()? {
                return Ok(End::QemuGone);
            }
            if pfds[1].revents != 0 {
                self.accept();
            }
            for (key, rev) in keys {
                if rev != 0 {
                    self.read_client(key);
                }
            }
            self.pump()?;
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        continue; // dropped: libxl retries the operation
                    }
                    wire::set_send_timeout(stream.as_raw_fd(), 2);
                    let key = self.next_key;
                    self.next_key += 1;
                    debug!("qmp: libxl connection {key}");
                    self.clients.push(Client {
                        key,
                        stream,
                        split: Splitter::default(),
                        fds: Vec::new(),
                        negotiated: false,
                        greeted: false,
                    });
                    self.greet();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    guest_warn!("qmp: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Sends QEMU's greeting to connections that have not had it.
    fn greet(&mut self) {
        let Some(g) = self.greeting.clone() else {
            return;
        };
        let waiting: Vec<u64> = self
            .clients
            .iter()
            .filter(|c| !c.greeted)
            .map(|c| c.key)
            .collect();
        for key in waiting {
            if let Some(c) = self.clients.iter_mut().find(|c| c.key == key) {
                c.greeted = true;
            }
            self.send_client(key, &g);
        }
    }

    fn drop_client(&mut self, key: u64) {
        self.clients.retain(|c| c.key != key);
        self.queue.retain(|j| match j {
            Job::Reply { client, .. } | Job::Command { client, .. } => *client != key,
        });
        debug!("qmp: libxl connection {key} closed");
    }

    fn send_client(&mut self, key: u64, bytes: &[u8]) {
        let Some(c) = self.clients.iter().find(|c| c.key == key) else {
            return; // gone: the reply is dropped
        };
        // Blocking (reads never block: they use MSG_DONTWAIT); a client
        // that cannot take a reply within its send timeout is dropped.
        let r = wire::send_with_fds(c.stream.as_raw_fd(), bytes, &[]);
        if let Err(e) = r {
            debug!("qmp: connection {key}: {e}");
            self.drop_client(key);
        }
    }

    fn read_client(&mut self, key: u64) {
        let Some(i) = self.clients.iter().position(|c| c.key == key) else {
            return;
        };
        let mut buf = vec![0u8; 64 << 10];
        let mut closed = false;
        loop {
            let c = &mut self.clients[i];
            match wire::recv_with_fds(c.stream.as_raw_fd(), &mut buf, &mut c.fds) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    if c.split.push(&buf[..n]).is_err() || c.fds.len() > wire::MAX_FDS {
                        guest_warn!("qmp: connection {key}: too much input, closed");
                        closed = true;
                        break;
                    }
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("qmp: connection {key}: {e}");
                    closed = true;
                    break;
                }
            }
        }
        // Complete messages are served even when the peer closed after
        // sending them (their replies are then dropped).
        while let Some(p) = self.clients[i].split.next_piece() {
            let job = match p {
                Piece::Bad(e) => Job::Reply {
                    client: key,
                    bytes: error_bytes(None, &QmpError::generic(e)),
                },
                Piece::Msg(raw, msg) => self.take_message(i, raw, msg),
            };
            if self.queue.len() >= MAX_QUEUED {
                closed = true;
                break;
            }
            self.queue.push_back(job);
        }
        if closed {
            self.drop_client(key);
        }
    }

    fn take_message(&mut self, i: usize, raw: Vec<u8>, msg: Value) -> Job {
        let c = &mut self.clients[i];
        let key = c.key;
        let id = msg.get("id");
        let exec = msg.get("execute").and_then(Value::as_str);
        if exec == Some("qmp_capabilities") {
            let bytes = if c.negotiated {
                error_bytes(
                    id,
                    &QmpError {
                        class: "CommandNotFound",
                        desc: "Capabilities negotiation is already complete, command ignored"
                            .into(),
                    },
                )
            } else {
                c.negotiated = true;
                reply_bytes(id, json!({"return": {}}))
            };
            return Job::Reply { client: key, bytes };
        }
        if !c.negotiated {
            return Job::Reply {
                client: key,
                bytes: error_bytes(
                    id,
                    &QmpError {
                        class: "CommandNotFound",
                        desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                    },
                ),
            };
        }
        Job::Command {
            client: key,
            raw,
            msg,
            fds: std::mem::take(&mut c.fds),
        }
    }

    /// Reads QEMU's output; false at its end.
    fn read_qemu(&mut self) -> io::Result<bool> {
        let mut buf = vec![0u8; 64 << 10];
        let mut fds = Vec::new();
        let n = match wire::recv_with_fds(self.qemu.as_raw_fd(), &mut buf, &mut fds) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
            Err(e) => return Err(e),
        };
        if self.qemu_split.push(&buf[..n]).is_err() {
            return Err(io::Error::other("QEMU's monitor sent a message over 1 MiB"));
        }
        while let Some(p) = self.qemu_split.next_piece() {
            let Piece::Msg(raw, msg) = p else { continue };
            self.on_qemu_message(raw, &msg)?;
        }
        Ok(true)
    }

    fn on_qemu_message(&mut self, mut raw: Vec<u8>, msg: &Value) -> io::Result<()> {
        raw.extend_from_slice(b"\r\n");
        if self.greeting.is_none() {
            if msg.get("QMP").is_some() {
                self.greeting = Some(raw);
                self.send_qemu(b"{\"execute\":\"qmp_capabilities\"}\r\n", &[])?;
                self.inflight = Some(Inflight::Caps);
            }
            return Ok(());
        }
        if msg.get("event").is_some() {
            let keys: Vec<u64> = self
                .clients
                .iter()
                .filter(|c| c.negotiated)
                .map(|c| c.key)
                .collect();
            for k in keys {
                self.send_client(k, &raw);
            }
            return Ok(());
        }
        if msg.get("return").is_none() && msg.get("error").is_none() {
            return Ok(());
        }
        match self.inflight.take() {
            Some(Inflight::Caps) => {
                if msg.get("error").is_some() {
                    return Err(io::Error::other(format!(
                        "QEMU refused qmp_capabilities: {msg}"
                    )));
                }
                self.ready = true;
                self.greet();
            }
            Some(Inflight::Forward { client }) => self.send_client(client, &raw),
            Some(Inflight::Slots { client, id, cmd }) => {
                let bytes = match msg.get("error") {
                    Some(e) => error_bytes(
                        id.as_ref(),
                        &QmpError::generic(format!("xen-usb-dm: query-pci failed: {e}")),
                    ),
                    None => {
                        let qemu = usb::qemu_slots(msg);
                        self.add_controller(id.as_ref(), cmd, &qemu)
                    }
                };
                self.send_client(client, &bytes);
            }
            None => guest_warn!("qmp: QEMU replied with nothing in flight: {msg}"),
        }
        Ok(())
    }

    fn send_qemu(&mut self, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        wire::send_with_fds(self.qemu.as_raw_fd(), bytes, fds)
    }

    /// Starts queued jobs while nothing is in flight.
    fn pump(&mut self) -> io::Result<()> {
        while self.ready && self.inflight.is_none() {
            let Some(job) = self.queue.pop_front() else {
                return Ok(());
            };
            match job {
                Job::Reply { client, bytes } => self.send_client(client, &bytes),
                Job::Command {
                    client,
                    mut raw,
                    msg,
                    fds,
                } => {
                    let id = msg.get("id").cloned();
                    match usb::classify(&msg, &self.host) {
                        None => {
                            if msg.get("execute").and_then(Value::as_str) == Some("cont") {
                                if let Err(e) = self.host.guest_starting() {
                                    self.send_client(client, &error_bytes(id.as_ref(), &e));
                                    continue;
                                }
                            }
                            raw.extend_from_slice(b"\r\n");
                            self.send_qemu(&raw, &fds)?;
                            self.inflight = Some(Inflight::Forward { client });
                        }
                        Some(Err(e)) => self.send_client(client, &error_bytes(id.as_ref(), &e)),
                        Some(Ok(cmd @ UsbCmd::AddController { .. })) => {
                            if self.host.started() {
                                let e = QmpError::generic(
                                    "xen-usb-dm: a USB controller cannot be added to a running \
                                     guest (that needs PCI hotplug, which qemu-xen's ACPI owns); \
                                     add it to the domain's configuration (usbctrl) instead",
                                );
                                self.send_client(client, &error_bytes(id.as_ref(), &e));
                                continue;
                            }
                            // The free slots are QEMU's to tell.
                            self.send_qemu(
                                b"{\"execute\":\"query-pci\",\"id\":\"xen-usb-dm\"}\r\n",
                                &[],
                            )?;
                            self.inflight = Some(Inflight::Slots { client, id, cmd });
                        }
                        Some(Ok(cmd)) => {
                            let r = self.serve(&cmd);
                            let bytes = match r {
                                Ok(()) => reply_bytes(id.as_ref(), json!({"return": {}})),
                                Err(e) => error_bytes(id.as_ref(), &e),
                            };
                            self.send_client(client, &bytes);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn add_controller(&mut self, id: Option<&Value>, cmd: UsbCmd, qemu: &[u8]) -> Vec<u8> {
        let UsbCmd::AddController {
            id: name,
            model,
            ports,
        } = cmd
        else {
            return error_bytes(id, &QmpError::generic("internal: not a controller"));
        };
        let ours = self.host.slots_in_use();
        let r = match usb::free_slot(qemu, &ours) {
            None => Err(QmpError::generic(
                "xen-usb-dm: no free PCI slot on bus 0 for a USB controller",
            )),
            Some(slot) => self.host.add_controller(&name, model, ports, slot),
        };
        match r {
            Ok(what) => {
                info!("xen-usb-dm: usbctrl {name}: {what}");
                reply_bytes(id, json!({"return": {}}))
            }
            Err(e) => {
                guest_warn!("xen-usb-dm: usbctrl {name}: {}", e.desc);
                error_bytes(id, &e)
            }
        }
    }

    fn serve(&mut self, cmd: &UsbCmd) -> Result<(), QmpError> {
        let r = match cmd {
            UsbCmd::AddController { .. } => {
                Err(QmpError::generic("internal: controller out of turn"))
            }
            UsbCmd::DelController { id } => self.host.del_controller(id),
            UsbCmd::AddHost {
                id,
                controller,
                port,
                hostbus,
                hostaddr,
            } => self
                .host
                .add_host(id, controller, *port, *hostbus, *hostaddr),
            UsbCmd::DelDevice { id } => self.host.del_device(id),
        };
        match &r {
            Ok(()) => info!("xen-usb-dm: served {cmd:?}"),
            Err(e) => guest_warn!("xen-usb-dm: {cmd:?}: {}", e.desc),
        }
        r
    }
}
