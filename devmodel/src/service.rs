//! The wrapper's service process when libxl's monitor is interposed: the
//! configured controller (if any) and the ones xl's `usbctrl` asks for,
//! each served by its own ioreq server on its own thread, and the USB
//! commands of the QMP proxy carried out on them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use hcd_emul::controller::{Model as HcModel, PortPath};
use hcd_emul::ehci::regs as ehci_regs;
use hcd_emul::xhci::regs;
use tracing::info;

use crate::config::{self, Config, Model};
use crate::mailbox::Mailbox;
use crate::qmp::proxy::UsbHost;
use crate::qmp::usb::{Owned, QmpError};
use crate::xen::hv::Sbdf;

struct Controller {
    id: String,
    model: HcModel,
    sbdf: Sbdf,
    mailbox: Mailbox,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    /// Devices attached over QMP: id and port.
    devices: Vec<(String, PortPath)>,
}

/// The controllers of one domain.
pub struct Service {
    cfg: Arc<Config>,
    domid: u16,
    ctrls: Vec<Controller>,
    started: bool,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("domid", &self.domid)
            .field(
                "controllers",
                &self.ctrls.iter().map(|c| &c.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The id of the controller from `[controller]` (not one of xl's).
pub const CONFIGURED: &str = "xen-dm.toml";

impl Service {
    /// No controllers yet.
    pub fn new(cfg: Config, domid: u16) -> Self {
        Self {
            cfg: Arc::new(cfg),
            domid,
            ctrls: Vec::new(),
            started: false,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts the controller the configuration describes, with its
    /// devices, at `transport.pci`. Returns what the control socket needs
    /// of it: its mailbox and its devices.
    pub fn start_configured(&mut self) -> anyhow::Result<(Mailbox, crate::Inputs)> {
        let (seg, bus, dev, func) = self
            .cfg
            .transport
            .pci
            .as_deref()
            .and_then(config::parse_pci)
            .context("transport.pci")?;
        let model = crate::model_of(&self.cfg);
        self.spawn(
            CONFIGURED,
            model,
            Sbdf {
                seg,
                bus,
                dev,
                func,
            },
            true,
        )
    }

    /// Starts a controller on its own thread; returns its mailbox and its
    /// devices (those of the configuration if `devices`).
    fn spawn(
        &mut self,
        id: &str,
        model: HcModel,
        sbdf: Sbdf,
        devices: bool,
    ) -> anyhow::Result<(Mailbox, crate::Inputs)> {
        let cfg = self.cfg.clone();
        let domid = self.domid;
        let stop = self.stop.clone();
        let (tx, rx) = mpsc::sync_channel::<Result<(Mailbox, crate::Inputs), String>>(1);
        let name = format!("usb-{id}");
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || -> anyhow::Result<()> {
                let mut inputs = crate::Inputs::default();
                let mut server =
                    match crate::xen_server(&cfg, model, devices, domid, sbdf, &mut inputs) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(format!("{e:#}")));
                            return Err(e);
                        }
                    };
                let mailbox = match server.waker() {
                    Ok(w) => Mailbox::new(w),
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e}")));
                        return Err(e.into());
                    }
                };
                let _ = tx.send(Ok((mailbox.clone(), inputs)));
                let exit =
                    server.run_with(|| stop.load(Ordering::Relaxed), |pci| mailbox.run(pci))?;
                info!("xen-usb-dm: controller at {sbdf:?} stopping ({exit:?})");
                Ok(())
            })
            .context("spawning a controller thread")?;
        match rx.recv() {
            Ok(Ok((mailbox, inputs))) => {
                self.ctrls.push(Controller {
                    id: id.to_owned(),
                    sbdf,
                    model,
                    mailbox: mailbox.clone(),
                    thread: Some(thread),
                    devices: Vec::new(),
                });
                Ok((mailbox, inputs))
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                anyhow::bail!("{e}")
            }
            Err(_) => {
                let r = thread.join();
                anyhow::bail!("controller thread ended: {r:?}")
            }
        }
    }

    /// Stops every controller and waits for them.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in &mut self.ctrls {
            c.mailbox.wake();
            if let Some(t) = c.thread.take() {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => hcd_emul::guest_error!("xen-usb-dm: controller {}: {e:#}", c.id),
                    Err(_) => hcd_emul::guest_error!("xen-usb-dm: controller {} panicked", c.id),
                }
            }
        }
    }

    fn ctrl(&self, id: &str) -> Option<&Controller> {
        self.ctrls.iter().find(|c| c.id == id)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Owned for Service {
    fn owns_controller(&self, id: &str) -> bool {
        self.ctrl(id).is_some()
    }
    fn owns_device(&self, id: &str) -> bool {
        self.ctrls
            .iter()
            .any(|c| c.devices.iter().any(|(d, _)| d == id))
    }
}

impl UsbHost for Service {
    fn slots_in_use(&self) -> Vec<u8> {
        self.ctrls
            .iter()
            .filter(|c| c.sbdf.seg == 0 && c.sbdf.bus == 0)
            .map(|c| c.sbdf.dev)
            .collect()
    }

    fn add_controller(
        &mut self,
        id: &str,
        model: Model,
        ports: Option<u32>,
        slot: u8,
    ) -> Result<String, QmpError> {
        let hc = match model {
            Model::Xhci => HcModel::Xhci,
            Model::Ehci => HcModel::Ehci,
            Model::Uhci => HcModel::Uhci,
        };
        if let Some(p) = ports {
            if !(1..=15).contains(&p) {
                return Err(QmpError::generic(format!(
                    "xen-usb-dm: {p} ports: a USB controller has 1 to 15"
                )));
            }
        }
        let sbdf = Sbdf {
            seg: 0,
            bus: 0,
            dev: slot,
            func: 0,
        };
        self.spawn(id, hc, sbdf, false)
            .map_err(|e| QmpError::generic(format!("xen-usb-dm: {e:#}")))?;
        Ok(match hc {
            HcModel::Xhci => format!(
                "xHCI at 00:{slot:02x}.0 ({} USB 2 and {} USB 3 root ports)",
                regs::USB2_PORTS,
                regs::USB3_PORTS
            ),
            HcModel::Ehci => format!(
                "EHCI at 00:{slot:02x}.0 ({} high-speed root ports, full/low speed behind the \
                 hub on root port 1)",
                ehci_regs::N_PORTS - 1
            ),
            HcModel::Uhci => format!(
                "UHCI at 00:{slot:02x}.0 ({} full/low-speed root ports)",
                hcd_emul::uhci::regs::N_PORTS
            ),
        })
    }

    fn del_controller(&mut self, id: &str) -> Result<(), QmpError> {
        Err(QmpError::generic(format!(
            "xen-usb-dm: {id} cannot be removed from a running guest (that needs PCI \
             hot-unplug, which qemu-xen's ACPI owns); detach its devices instead"
        )))
    }

    fn add_host(
        &mut self,
        id: &str,
        controller: &str,
        port: Option<u32>,
        hostbus: u32,
        hostaddr: u32,
    ) -> Result<(), QmpError> {
        let Some(ci) = self.ctrls.iter().position(|c| c.id == controller) else {
            return Err(QmpError {
                class: "DeviceNotFound",
                desc: format!("Bus '{controller}.0' not found"),
            });
        };
        let rule = passthrough::MatchRule::BusAddr {
            bus: hostbus,
            addr: hostaddr,
        };
        rule.validate()
            .map_err(|e| QmpError::generic(format!("xen-usb-dm: {e}")))?;
        let dev = passthrough::HostDevice::new(rule, Default::default()).map_err(|e| {
            QmpError::generic(format!("xen-usb-dm: host {hostbus}.{hostaddr}: {e}"))
        })?;
        if dev.monitor().device().is_none() {
            return Err(QmpError::generic(format!(
                "xen-usb-dm: no USB device at bus {hostbus} address {hostaddr}"
            )));
        }
        let speed = hcd_emul::usb::UsbDevice::speed(&dev);
        let model = self.ctrls[ci].model;
        // xl numbers a controller's ports 1..N. xHCI: each is a USB 2 and
        // a USB 3 root port (the one the device's speed needs). EHCI: a
        // high-speed device takes root port N+1 (root port 1 is the hub),
        // a full/low-speed one hub port N.
        let at = match (port, model) {
            (None, _) => None,
            (Some(p), HcModel::Xhci) if (1..=regs::USB2_PORTS as u32).contains(&p) => {
                Some(PortPath {
                    root: if speed.is_superspeed() {
                        regs::USB2_PORTS + p as usize
                    } else {
                        p as usize
                    },
                    hub: 0,
                })
            }
            (Some(p), HcModel::Ehci)
                if speed == hcd_emul::usb::Speed::High
                    && (1..ehci_regs::N_PORTS as u32).contains(&p) =>
            {
                Some(PortPath {
                    root: p as usize + 1,
                    hub: 0,
                })
            }
            (Some(p), HcModel::Ehci)
                if speed != hcd_emul::usb::Speed::High && (1..=4).contains(&p) =>
            {
                Some(PortPath {
                    root: 1,
                    hub: p as u8,
                })
            }
            (Some(p), HcModel::Uhci)
                if speed <= hcd_emul::usb::Speed::Full
                    && (1..=hcd_emul::uhci::regs::N_PORTS as u32).contains(&p) =>
            {
                Some(PortPath {
                    root: p as usize,
                    hub: 0,
                })
            }
            (Some(p), _) => {
                return Err(QmpError::generic(format!(
                "xen-usb-dm: port {p} of {controller} does not exist for a {speed:?}-speed device"
            )))
            }
        };
        let ctrl = &self.ctrls[ci];
        let r = ctrl.mailbox.call(move |pci| {
            let x = pci.controller_mut();
            match at {
                Some(p) => x.attach_at(p, Box::new(dev)).map(|()| p),
                None => x.attach(Box::new(dev)),
            }
        })?;
        let p = r.map_err(|e| QmpError::generic(format!("xen-usb-dm: {controller}: {e}")))?;
        self.ctrls[ci].devices.push((id.to_owned(), p));
        info!("xen-usb-dm: {id}: host {hostbus}.{hostaddr} on {controller} {p}");
        Ok(())
    }

    fn del_device(&mut self, id: &str) -> Result<(), QmpError> {
        for c in &mut self.ctrls {
            if let Some(i) = c.devices.iter().position(|(d, _)| d == id) {
                let port = c.devices[i].1;
                c.mailbox.call(move |pci| {
                    // Dropped here: the host device is released.
                    drop(pci.controller_mut().detach(port));
                })?;
                c.devices.remove(i);
                info!("xen-usb-dm: {id}: detached from {} {port}", c.id);
                return Ok(());
            }
        }
        Err(QmpError {
            class: "DeviceNotFound",
            desc: format!("Device '{id}' not found"),
        })
    }

    fn guest_starting(&mut self) -> Result<(), QmpError> {
        if !self.started {
            let t = &self.cfg.transport;
            if t.uid.is_some() || t.chroot.is_some() {
                crate::deprivilege(t).map_err(|e| {
                    QmpError::generic(format!("xen-usb-dm: cannot deprivilege: {e:#}"))
                })?;
            }
            self.started = true;
        }
        Ok(())
    }

    fn started(&self) -> bool {
        self.started
    }
}
