//! The `xen-usb-dm` device-model process: configuration, PCI wiring and
//! the transports. `main.rs` only parses arguments and calls [`run`].
//!
//! Transports: [`vfio_user`] (QEMU and other VMMs). The Xen ioreq-server
//! transport arrives with its own issue.
#![warn(missing_docs)]

pub mod config;
pub mod vfio_user;
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
                let dev = UsbStorage::open(img, d.readonly, speed)
                    .with_context(|| format!("device[{i}].image: {}", img.display()))?;
                let blocks = dev.blocks();
                let port = x
                    .attach(Box::new(dev))
                    .with_context(|| format!("device[{i}]: attach"))?;
                info!(
                    "device[{i}]: storage {} ({} MiB{}) on root port {port}",
                    img.display(),
                    (blocks * 512) >> 20,
                    if d.readonly { ", read-only" } else { "" }
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
/// (checked after every wake-up, at least once a second). The socket is
/// removed on return.
pub fn run(cfg: &Config, stop: impl Fn() -> bool) -> anyhow::Result<()> {
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
