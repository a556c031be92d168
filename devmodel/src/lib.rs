//! The `xen-usb-dm` device-model process: configuration, PCI wiring and
//! the transports. `main.rs` only parses arguments and calls [`run`].
//!
//! Transports: [`vfio_user`] (QEMU and other VMMs) and [`xen`] (a
//! secondary ioreq server next to qemu-xen; [`wrap`] runs it as libxl's
//! `device_model_override`).
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod control;
pub mod ctl;
pub mod evdev_source;
mod evloop;
pub mod mailbox;
pub mod qmp;
pub mod service;
pub mod timeline;
pub mod vfio_user;
pub mod wrap;
pub mod xen;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use hcd_emul::controller::{Controller, Model};
use hcd_emul::usb::Speed;
use hcd_emul::UsbStorage;
use tracing::info;

pub use config::Config;
pub use hcd_emul;

/// The controller model `cfg` asks for (xHCI without a `[controller]`).
pub fn model_of(cfg: &Config) -> Model {
    match cfg.controller.as_ref().map(|c| c.model) {
        Some(config::Model::Ehci) => Model::Ehci,
        Some(config::Model::Uhci) => Model::Uhci,
        _ => Model::Xhci,
    }
}

/// Builds the configured controller with the configured devices, on
/// `ram`, with device completions waking the event loop through `waker`.
pub fn build_controller(
    cfg: &Config,
    ram: hcd_emul::GuestRam,
    waker: Box<dyn Fn() + Send + Sync>,
    inputs: &mut Inputs,
) -> anyhow::Result<Controller> {
    build_with(model_of(cfg), &cfg.devices, ram, waker, inputs)
}

/// The devices plugged in, as the control socket sees them (configured
/// ones and those added by `device_add`).
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    /// In the order they were plugged in.
    pub devices: Vec<Plugged>,
    /// The controller's reset count.
    pub resets: Option<hcd_emul::controller::ResetCount>,
}

/// One device plugged into the controller.
#[derive(Debug, Clone)]
pub struct Plugged {
    /// `device[N]` for the configuration's device N, else the id given to
    /// `device_add`.
    pub id: String,
    /// Where it is.
    pub port: hcd_emul::controller::PortPath,
    /// What it is.
    pub kind: config::DeviceKind,
    /// An emulated keyboard's, mouse's or tablet's input.
    pub input: Option<hcd_emul::hid::InputHandle>,
    /// Its capture switch.
    pub capture: hcd_emul::capture::CaptureSwitch,
    /// A host device's monitor (whether it is plugged in on the host).
    pub host: Option<passthrough::HostMonitor>,
    /// An input device's evdev source: it runs until the last clone of
    /// this goes (the device unplugged, the process ending).
    pub source: Option<Arc<evdev_source::EvdevSource>>,
}

/// A device built from its configuration, not plugged in yet.
pub struct Built {
    /// The device behind its capture switch.
    pub dev: Box<dyn hcd_emul::usb::UsbDevice>,
    /// Its capture switch (started if the configuration captures).
    pub capture: hcd_emul::capture::CaptureSwitch,
    /// An emulated HID device's input.
    pub input: Option<hcd_emul::hid::InputHandle>,
    /// A host device's monitor.
    pub host: Option<passthrough::HostMonitor>,
    /// An input device's evdev source (runs while this lives).
    pub source: Option<Arc<evdev_source::EvdevSource>>,
    /// For the log: what it is.
    pub desc: String,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("desc", &self.desc)
            .finish_non_exhaustive()
    }
}

fn speed_of(s: config::SpeedCfg) -> Speed {
    match s {
        config::SpeedCfg::Full => Speed::Full,
        config::SpeedCfg::High => Speed::High,
        config::SpeedCfg::Super => Speed::Super,
    }
}

/// Builds a `model` controller with `devices` (see [`build_controller`]).
pub fn build_with(
    model: Model,
    devices: &[config::Device],
    ram: hcd_emul::GuestRam,
    waker: Box<dyn Fn() + Send + Sync>,
    inputs: &mut Inputs,
) -> anyhow::Result<Controller> {
    let mut x = Controller::new(model, ram);
    x.completion_queue().set_waker(waker);
    inputs.resets = Some(x.reset_count());
    for (i, d) in devices.iter().enumerate() {
        attach_device(&mut x, i, d, inputs)?;
    }
    Ok(x)
}

/// Builds device `i` of the configuration (`d`) and plugs it into `x`;
/// errors name `device[i]` and the key (`xen-usb-dm check` reports them).
pub fn attach_device(
    x: &mut Controller,
    i: usize,
    d: &config::Device,
    inputs: &mut Inputs,
) -> anyhow::Result<()> {
    let id = format!("device[{i}]");
    let b = build_device(x.model(), &id, d)?;
    let port = x
        .attach(b.dev)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{id}: attach"))?;
    info!("{id}: {} on {port}", b.desc);
    inputs.devices.push(Plugged {
        id,
        port,
        kind: d.kind,
        input: b.input,
        capture: b.capture,
        host: b.host,
        source: b.source,
    });
    Ok(())
}

/// Builds the device `d` (checked by [`config::Device::resolve`]) for a
/// `model` controller, behind a capture switch (started if `d` captures);
/// errors name `label` (`device[N]`, or `device_add`'s id) and the key.
pub fn build_device(model: Model, label: &str, d: &config::Device) -> anyhow::Result<Built> {
    use hcd_emul::capture::{CaptureSwitch, Captured};
    let mut host = None;
    let mut source = None;
    let (dev, input, desc): (Box<dyn hcd_emul::usb::UsbDevice>, _, _) = match d.kind {
        config::DeviceKind::Storage => {
            let img = d
                .image
                .as_deref()
                .context(format!("{label}.image missing"))?;
            // The fastest speed the controller has.
            let speed = d.speed.map(speed_of).unwrap_or(match model {
                Model::Xhci => Speed::Super,
                Model::Ehci => Speed::High,
                Model::Uhci => Speed::Full,
            });
            if d.uas && !matches!(speed, Speed::Super | Speed::High) {
                anyhow::bail!(
                    "{label}.uas: UAS needs speed = \"super\" or \"high\" (not at full speed)"
                );
            }
            if model == Model::Uhci && matches!(speed, Speed::High | Speed::Super) {
                anyhow::bail!("{label}.speed: UHCI is full and low speed only (\"full\")");
            }
            if model == Model::Ehci && speed == Speed::Super {
                anyhow::bail!(
                    "{label}.speed: \"super\" needs the xHCI (EHCI: \"high\" or \"full\")"
                );
            }
            let dev = UsbStorage::open(img, d.readonly, speed)
                .with_context(|| format!("{label}.image: {}", img.display()))?
                .with_uas(d.uas);
            let desc = format!(
                "storage {} ({} MiB{}{})",
                img.display(),
                (dev.blocks() * 512) >> 20,
                if d.readonly { ", read-only" } else { "" },
                if d.uas { ", BOT + UAS" } else { "" }
            );
            (Box::new(dev), None, desc)
        }
        config::DeviceKind::Keyboard | config::DeviceKind::Mouse | config::DeviceKind::Tablet => {
            use hcd_emul::hid::{HidDevice, Kind};
            // High speed where the controller has it (the guest polls
            // less often), full speed on the UHCI.
            let speed = d.speed.map(speed_of).unwrap_or(match model {
                Model::Uhci => Speed::Full,
                _ => Speed::High,
            });
            let kind = match d.kind {
                config::DeviceKind::Keyboard => Kind::Keyboard,
                config::DeviceKind::Mouse => Kind::Mouse,
                _ => Kind::Tablet,
            };
            let (dev, input) = HidDevice::with_kind(kind, speed)
                .map_err(anyhow::Error::msg)
                .with_context(|| label.to_owned())?;
            let mut desc = hcd_emul::usb::UsbDevice::name(&dev);
            if let Some(path) = &d.evdev {
                let opts = evdev_source::EvdevOptions {
                    path: path.clone(),
                    grab: d.grab.unwrap_or(true),
                    toggle: d
                        .grab_toggle
                        .as_deref()
                        .and_then(evdev_source::Toggle::parse)
                        .unwrap_or(evdev_source::Toggle::CtrlCtrl),
                };
                source = Some(Arc::new(
                    evdev_source::EvdevSource::start(opts, input.clone())
                        .with_context(|| format!("{label}.evdev"))?,
                ));
                desc = format!("{desc}, input from {}", path.display());
            }
            (Box::new(dev), Some(input), desc)
        }
        config::DeviceKind::Host => {
            let rule = d.host_rule().context(format!("{label}: no match rule"))?;
            let opts = passthrough::HostOptions {
                speed: d.speed.map(speed_of),
                ..Default::default()
            };
            let dev = passthrough::HostDevice::new(rule.clone(), opts)
                .with_context(|| format!("{label}: host {rule}"))?;
            let desc = match dev.monitor().device() {
                Some(h) => format!(
                    "host {rule} (now {} at bus {} addr {})",
                    h.port, h.bus, h.addr
                ),
                None => format!("host {rule} (not plugged in yet)"),
            };
            host = Some(dev.monitor());
            (Box::new(dev), None, desc)
        }
    };
    let capture = CaptureSwitch::default();
    if let Some(o) = d.capture_options() {
        capture
            .start(&o)
            .with_context(|| format!("{label}.capture: {}", o.path.display()))?;
        info!("{label}: capturing into {} (usbmon pcap)", o.path.display());
    }
    Ok(Built {
        dev: Box::new(Captured::new(dev, capture.clone())),
        capture,
        input,
        host,
        source,
        desc,
    })
}

/// Runs the device model described by `cfg` until `stop()` returns true
/// (checked after every wake-up, at least once a second) or, on Xen, the
/// domain is gone. The vfio-user socket is removed on return.
pub fn run(cfg: &Config, stop: impl Fn() -> bool) -> anyhow::Result<()> {
    if cfg.controller.is_none() {
        anyhow::bail!(
            "no [controller] configured (only wrapper mode, --wrap, serves xl's usbctrl instead)"
        );
    }
    match cfg.transport.kind {
        config::TransportKind::VfioUser => run_vfio_user(cfg, stop),
        config::TransportKind::Xen => run_xen(cfg, None, || {}, stop),
    }
}

fn run_vfio_user(cfg: &Config, stop: impl Fn() -> bool) -> anyhow::Result<()> {
    let sock = cfg
        .transport
        .socket
        .as_deref()
        .context("transport.socket missing")?;
    let listening = bind_control(cfg)?;
    let mut build_err = None;
    let mut inputs = Inputs::default();
    let mut server = vfio_user::Server::new(sock, |ram, waker| {
        match build_controller(cfg, ram.clone(), waker, &mut inputs) {
            Ok(x) => x,
            Err(e) => {
                build_err = Some(e);
                Controller::new(Model::Xhci, ram)
            }
        }
    })?;
    if let Some(e) = build_err {
        return Err(e);
    }
    info!(
        "xen-usb-dm: {:?} served over vfio-user on {}",
        model_of(cfg),
        socket_display(sock)
    );
    let quit = Arc::new(AtomicBool::new(false));
    let mailbox = mailbox::Mailbox::new(server.waker()?);
    let _control = start_control(listening, cfg, &mailbox, &mut inputs, &quit)?;
    server.run_with(
        |_| stop() || quit.load(Ordering::Relaxed),
        |pci| mailbox.run(pci),
    )?;
    info!("xen-usb-dm: stopping");
    Ok(())
}

/// The control socket's listener, if the configuration has one. The
/// vfio-user transport binds it before its own socket appears: a client
/// that waits for that one finds the control socket there too.
fn bind_control(cfg: &Config) -> anyhow::Result<Option<control::Listening>> {
    cfg.control
        .as_ref()
        .map(|c| {
            control::Control::bind(&c.socket)
                .with_context(|| format!("control.socket: {}", c.socket.display()))
        })
        .transpose()
}

/// Serves the control socket bound by [`bind_control`], if any.
fn start_control(
    listening: Option<control::Listening>,
    cfg: &Config,
    mailbox: &mailbox::Mailbox,
    inputs: &mut Inputs,
    quit: &Arc<AtomicBool>,
) -> anyhow::Result<Option<control::Control>> {
    let (Some(listening), Some(c)) = (listening, &cfg.control) else {
        return Ok(None);
    };
    let ctl = listening
        .serve(
            control::Target::new(
                mailbox.clone(),
                model_of(cfg),
                inputs.devices.clone(),
                quit.clone(),
            )
            .with_resets(inputs.resets.clone()),
        )
        .with_context(|| format!("control.socket: {}", c.socket.display()))?;
    info!("xen-usb-dm: control socket on {}", c.socket.display());
    Ok(Some(ctl))
}

fn socket_display(p: &Path) -> String {
    p.display().to_string()
}

/// The domain id for `cfg`: `domid`, or `domain` resolved by `xl domid`.
fn resolve_domid(cfg: &Config) -> anyhow::Result<u16> {
    if let Some(d) = cfg.transport.domid {
        return Ok(d);
    }
    let name = cfg
        .transport
        .domain
        .as_deref()
        .context("transport.domid or transport.domain is required")?;
    let out = std::process::Command::new("xl")
        .args(["domid", name])
        .output()
        .with_context(|| format!("transport.domain: running `xl domid {name}`"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .ok()
        .filter(|_| out.status.success())
        .with_context(|| {
            format!(
                "transport.domain: no domain named {name:?} ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

/// Serves `cfg`'s controller to a Xen domain (`domid`, or the
/// configuration's) as a secondary ioreq server. `ready()` is called once
/// the server is enabled and our PCI function claimed (the guest may be
/// unpaused from then on). Returns when `stop()` says so or the domain
/// is gone; the server is torn down either way.
pub fn run_xen(
    cfg: &Config,
    domid: Option<u16>,
    ready: impl FnOnce(),
    stop: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let domid = match domid {
        Some(d) => d,
        None => resolve_domid(cfg)?,
    };
    let t = &cfg.transport;
    let (seg, bus, dev, func) = t
        .pci
        .as_deref()
        .and_then(config::parse_pci)
        .context("transport.pci")?;
    let sbdf = xen::hv::Sbdf {
        seg,
        bus,
        dev,
        func,
    };
    let mut inputs = Inputs::default();
    let mut server = xen_server(cfg, model_of(cfg), true, domid, sbdf, &mut inputs)?;
    let quit = Arc::new(AtomicBool::new(false));
    let mailbox = mailbox::Mailbox::new(server.waker()?);
    let _control = start_control(bind_control(cfg)?, cfg, &mailbox, &mut inputs, &quit)?;
    deprivilege(t)?;
    info!(
        "xen-usb-dm: ready: serving {:?} to domain {domid} at {}",
        model_of(cfg),
        t.pci.as_deref().unwrap_or("")
    );
    ready();
    let exit = server.run_with(
        || stop() || quit.load(Ordering::Relaxed),
        |pci| mailbox.run(pci),
    )?;
    info!("xen-usb-dm: stopping ({exit:?})");
    Ok(())
}

/// An ioreq server for `domid` serving an xHCI at `sbdf` (with the
/// configured devices if `devices`), its Xen descriptors restricted to
/// the domain if the configuration asks for any confinement.
pub fn xen_server(
    cfg: &Config,
    model: Model,
    devices: bool,
    domid: u16,
    sbdf: xen::hv::Sbdf,
    inputs: &mut Inputs,
) -> anyhow::Result<xen::server::XenServer<Controller>> {
    use std::sync::Arc;
    let t = &cfg.transport;
    let hv = Arc::new(xen::sys::Privcmd::open(domid)?);
    let ev = Box::new(xen::sys::Evtchn::open(domid)?);
    let list: &[config::Device] = if devices { &cfg.devices } else { &[] };
    let mut build_err = None;
    let mut server = xen::server::XenServer::new(hv, ev, sbdf, |ram, waker| {
        match build_with(model, list, ram.clone(), waker, inputs) {
            Ok(x) => x,
            Err(e) => {
                build_err = Some(e);
                Controller::new(model, ram)
            }
        }
    })
    .with_context(|| format!("domain {domid}"))?;
    if let Some(e) = build_err {
        return Err(e);
    }
    if t.restrict || t.uid.is_some() || t.chroot.is_some() {
        server
            .restrict()
            .context("restricting the Xen descriptors to the domain")?;
    }
    Ok(server)
}

/// Wrapper mode with libxl's monitor interposed (`qmp`): the configured
/// controller (if any) before `ready()`, then the QMP proxy serving xl's
/// USB commands until QEMU exits or `stop()`. Without `qmp`, as
/// [`run_xen`].
pub fn run_wrapped(
    cfg: &Config,
    domid: u16,
    qmp: Option<qmp::Interposed>,
    ready: impl FnOnce(),
    stop: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let Some(qmp) = qmp else {
        if cfg.controller.is_none() {
            anyhow::bail!(
                "no [controller] configured and no libxl monitor in the arguments to serve \
                 xl's usbctrl: nothing to serve"
            );
        }
        return run_xen(cfg, Some(domid), ready, stop);
    };
    if cfg.control.is_some() && cfg.controller.is_none() {
        // The control socket serves the configured controller; xl's own
        // (usbctrl) are xl's to manage with its USB commands.
        anyhow::bail!(
            "control.socket: serves the [controller] of xen-dm.toml, and there is none \
             (xl's usbctrl controllers take xl's USB commands: usbdev-attach/-detach)"
        );
    }
    let mut svc = service::Service::new(cfg.clone(), domid);
    let quit = Arc::new(AtomicBool::new(false));
    let _control = match cfg.controller {
        Some(_) => {
            let (mailbox, mut inputs) = svc.start_configured()?;
            start_control(bind_control(cfg)?, cfg, &mailbox, &mut inputs, &quit)?
        }
        None => None,
    };
    info!(
        "xen-usb-dm: ready: domain {domid}{}, serving xl's USB commands on libxl's monitor",
        match &cfg.transport.pci {
            Some(p) if cfg.controller.is_some() => format!(", xHCI at {p}"),
            _ => String::new(),
        }
    );
    ready();
    let mut proxy = qmp::proxy::Proxy::new(qmp.libxl, qmp.qemu, svc)?;
    let end = proxy.run(|| stop() || quit.load(Ordering::Relaxed))?;
    info!("xen-usb-dm: stopping ({end:?})");
    proxy.host_mut().shutdown();
    Ok(())
}

/// chroot, then drop groups, gid and uid, as the configuration asks.
pub(crate) fn deprivilege(t: &config::Transport) -> anyhow::Result<()> {
    if t.chroot.is_none() && t.uid.is_none() {
        return Ok(());
    }
    if let Some(dir) = &t.chroot {
        std::os::unix::fs::chroot(dir)
            .with_context(|| format!("transport.chroot: {}", dir.display()))?;
        std::env::set_current_dir("/").context("chdir / after chroot")?;
    }
    if let Some(uid) = t.uid {
        let gid = t.gid.unwrap_or(uid);
        // SAFETY: plain system calls with integer arguments and no memory
        // shared with Rust; setgroups gets a null list of length 0.
        let failed = unsafe {
            libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
        };
        if failed {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("transport.uid: switching to {uid}:{gid}"));
        }
    }
    info!(
        "xen-usb-dm: deprivileged (chroot {:?}, uid {:?})",
        t.chroot, t.uid
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(image: &std::path::Path, speed: &str) -> Vec<config::Device> {
        let t = format!(
            "kind = \"storage\"\nimage = \"{}\"\n{speed}",
            image.display()
        );
        vec![toml::from_str(&t).unwrap()]
    }

    #[test]
    fn uhci_takes_a_full_speed_stick_and_refuses_faster_ones() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("s.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let ram = hcd_emul::GuestRam::anonymous(1 << 20);
        let x = build_with(
            Model::Uhci,
            &devices(&img, ""),
            ram.clone(),
            Box::new(|| {}),
            &mut Inputs::default(),
        );
        let x = x.expect("a stick on UHCI defaults to full speed");
        assert_eq!(x.model(), Model::Uhci);
        let e = build_with(
            Model::Uhci,
            &devices(&img, "speed = \"high\"\n"),
            ram,
            Box::new(|| {}),
            &mut Inputs::default(),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("full and low speed only"),
            "{e:#}"
        );
    }

    #[test]
    fn uas_at_super_and_high_speed_not_at_full_speed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("s.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let ram = hcd_emul::GuestRam::anonymous(1 << 20);
        let build = |model, extra: &str| {
            build_with(
                model,
                &devices(&img, extra),
                ram.clone(),
                Box::new(|| {}),
                &mut Inputs::default(),
            )
        };
        for (model, extra) in [
            (Model::Xhci, "uas = true\n"),
            (Model::Ehci, "uas = true\n"),
            (Model::Xhci, "uas = true\nspeed = \"high\"\n"),
        ] {
            build(model, extra).unwrap_or_else(|e| panic!("{model:?} {extra:?}: {e:#}"));
        }
        for (model, extra) in [
            (Model::Ehci, "uas = true\nspeed = \"full\"\n"),
            (Model::Uhci, "uas = true\n"),
        ] {
            let e = build(model, extra).map(|_| ()).unwrap_err();
            assert!(format!("{e:#}").contains("not at full speed"), "{e:#}");
        }
    }

    #[test]
    fn a_keyboard_beside_the_stick_on_every_controller() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("s.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let mut devs = devices(&img, "");
        devs.push(toml::from_str("kind = \"keyboard\"").unwrap());
        for model in [Model::Xhci, Model::Ehci, Model::Uhci] {
            let ram = hcd_emul::GuestRam::anonymous(1 << 20);
            let mut inputs = Inputs::default();
            let x = build_with(model, &devs, ram, Box::new(|| {}), &mut inputs);
            assert!(x.is_ok(), "{model:?}: {:?}", x.err());
            let kinds: Vec<_> = inputs
                .devices
                .iter()
                .map(|p| (p.id.as_str(), p.kind))
                .collect();
            assert_eq!(
                kinds,
                [
                    ("device[0]", config::DeviceKind::Storage),
                    ("device[1]", config::DeviceKind::Keyboard)
                ]
            );
            assert!(inputs.devices[1].input.is_some() && inputs.devices[0].input.is_none());
        }
    }
}
