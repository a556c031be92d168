//! The `xen-usb-dm` device-model process: configuration, PCI wiring and
//! the transports. `main.rs` only parses arguments and calls [`run`].
//!
//! Transports: [`vfio_user`] (QEMU and other VMMs) and [`xen`] (a
//! secondary ioreq server next to qemu-xen; [`wrap`] runs it as libxl's
//! `device_model_override`).
#![warn(missing_docs)]

pub mod config;
mod evloop;
pub mod timeline;
pub mod vfio_user;
pub mod wrap;
pub mod xen;

use std::path::Path;

use anyhow::Context;
use hcd_emul::usb::Speed;
use hcd_emul::xhci::Xhci;
use hcd_emul::UsbStorage;
use tracing::info;

pub use config::Config;
pub use hcd_emul;

/// Builds the xHCI with the configured devices, on `ram`, with device
/// completions waking the event loop through `waker`.
pub fn build_xhci(
    cfg: &Config,
    ram: hcd_emul::GuestRam,
    waker: Box<dyn Fn() + Send + Sync>,
) -> anyhow::Result<Xhci> {
    let mut x = Xhci::new(ram);
    x.completion_queue().set_waker(waker);
    for (i, d) in cfg.devices.iter().enumerate() {
        match d.kind {
            config::DeviceKind::Storage => {
                let img = d
                    .image
                    .as_deref()
                    .context(format!("device[{i}].image missing"))?;
                let speed = match d.speed.unwrap_or_default() {
                    config::SpeedCfg::High => Speed::High,
                    config::SpeedCfg::Super => Speed::Super,
                };
                if d.uas && speed != Speed::Super {
                    anyhow::bail!("device[{i}].uas: UAS needs speed = \"super\" (bulk streams)");
                }
                let dev = UsbStorage::open(img, d.readonly, speed)
                    .with_context(|| format!("device[{i}].image: {}", img.display()))?
                    .with_uas(d.uas);
                let blocks = dev.blocks();
                let port = x
                    .attach(Box::new(dev))
                    .with_context(|| format!("device[{i}]: attach"))?;
                info!(
                    "device[{i}]: storage {} ({} MiB{}{}) on root port {port}",
                    img.display(),
                    (blocks * 512) >> 20,
                    if d.readonly { ", read-only" } else { "" },
                    if d.uas { ", BOT + UAS" } else { "" }
                );
            }
            config::DeviceKind::Host => {
                let rule = d
                    .host_rule()
                    .context(format!("device[{i}]: no match rule"))?;
                let opts = passthrough::HostOptions {
                    speed: d.speed.map(|s| match s {
                        config::SpeedCfg::High => Speed::High,
                        config::SpeedCfg::Super => Speed::Super,
                    }),
                    ..Default::default()
                };
                let dev = passthrough::HostDevice::new(rule.clone(), opts)
                    .with_context(|| format!("device[{i}]: host {rule}"))?;
                let present = dev.monitor().device();
                let port = x
                    .attach(Box::new(dev))
                    .with_context(|| format!("device[{i}]: attach"))?;
                match present {
                    Some(h) => info!(
                        "device[{i}]: host {rule} (now {} at bus {} addr {}) on root port {port}",
                        h.port, h.bus, h.addr
                    ),
                    None => {
                        info!("device[{i}]: host {rule} (not plugged in yet) on root port {port}")
                    }
                }
            }
        }
    }
    Ok(x)
}

/// Runs the device model described by `cfg` until `stop()` returns true
/// (checked after every wake-up, at least once a second) or, on Xen, the
/// domain is gone. The vfio-user socket is removed on return.
pub fn run(cfg: &Config, stop: impl Fn() -> bool) -> anyhow::Result<()> {
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
    let mut build_err = None;
    let mut server = vfio_user::Server::new(sock, |ram, waker| {
        match build_xhci(cfg, ram.clone(), waker) {
            Ok(x) => x,
            Err(e) => {
                build_err = Some(e);
                Xhci::new(ram)
            }
        }
    })?;
    if let Some(e) = build_err {
        return Err(e);
    }
    info!(
        "xen-usb-dm: xHCI served over vfio-user on {}",
        socket_display(sock)
    );
    server.run(|_| stop())?;
    info!("xen-usb-dm: stopping");
    Ok(())
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
    use std::sync::Arc;
    use xen::hv::Sbdf;
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
    let sbdf = Sbdf {
        seg,
        bus,
        dev,
        func,
    };
    let hv = Arc::new(xen::sys::Privcmd::open(domid)?);
    let ev = Box::new(xen::sys::Evtchn::open(domid)?);
    let mut build_err = None;
    let mut server = xen::server::XenServer::new(hv, ev, sbdf, |ram, waker| {
        match build_xhci(cfg, ram.clone(), waker) {
            Ok(x) => x,
            Err(e) => {
                build_err = Some(e);
                Xhci::new(ram)
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
        deprivilege(t)?;
    }
    info!(
        "xen-usb-dm: ready: serving xHCI to domain {domid} at {}",
        t.pci.as_deref().unwrap_or("")
    );
    ready();
    let exit = server.run(stop)?;
    info!("xen-usb-dm: stopping ({exit:?})");
    Ok(())
}

/// chroot, then drop groups, gid and uid, as the configuration asks.
fn deprivilege(t: &config::Transport) -> anyhow::Result<()> {
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
