//! Any of our host controllers, for code that picks the model at run time
//! (the device-model process reads it from its configuration).

use std::time::Instant;

use crate::ehci::Ehci;
use crate::pci::{BarInfo, IrqSink, MsixLayout, PciController, PciIdentity};
use crate::uhci::Uhci;
use crate::usb::{CompletionQueue, UsbDevice};
use crate::xhci::Xhci;
use crate::GuestRam;

/// Controller models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// xHCI (USB 3).
    Xhci,
    /// EHCI (USB 2) with the rate-matching hub.
    Ehci,
    /// UHCI (USB 1.1).
    Uhci,
}

/// Where a device is plugged in: a root port (1-based) and, for a device
/// behind EHCI's built-in hub, the hub's port (0: on the root port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortPath {
    /// Root port, 1-based.
    pub root: usize,
    /// Port of the hub on that root port; 0 for the root port itself.
    pub hub: u8,
}

impl std::fmt::Display for PortPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.hub == 0 {
            write!(f, "root port {}", self.root)
        } else {
            write!(f, "root port {} hub port {}", self.root, self.hub)
        }
    }
}

/// A device plugged into a controller (see [`Controller::devices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Where.
    pub at: PortPath,
    /// Its name for logs ("storage stick.img", "host 1-2").
    pub name: String,
    /// Its speed.
    pub speed: crate::usb::Speed,
    /// Whether it is there now (a passthrough device may be unplugged).
    pub connected: bool,
}

/// One of our controllers.
#[derive(Debug)]
pub enum Controller {
    /// xHCI.
    Xhci(Xhci),
    /// EHCI.
    Ehci(Ehci),
    /// UHCI.
    Uhci(Uhci),
}

/// How often a controller was reset (shared: a cheap clone of a counter).
#[derive(Debug, Clone, Default)]
pub struct ResetCount(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl ResetCount {
    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

macro_rules! each {
    ($self:expr, $c:ident => $e:expr) => {
        match $self {
            Controller::Xhci($c) => $e,
            Controller::Ehci($c) => $e,
            Controller::Uhci($c) => $e,
        }
    };
}

impl Controller {
    /// A controller of `model` in power-on state on `ram`.
    pub fn new(model: Model, ram: GuestRam) -> Self {
        match model {
            Model::Xhci => Controller::Xhci(Xhci::new(ram)),
            Model::Ehci => Controller::Ehci(Ehci::new(ram)),
            Model::Uhci => Controller::Uhci(Uhci::new(ram)),
        }
    }

    /// Its model.
    pub fn model(&self) -> Model {
        match self {
            Controller::Xhci(_) => Model::Xhci,
            Controller::Ehci(_) => Model::Ehci,
            Controller::Uhci(_) => Model::Uhci,
        }
    }

    /// A handle on the count of the controller's resets (the guest's
    /// HCRESET and the transport's device resets), readable from any
    /// thread.
    pub fn reset_count(&self) -> ResetCount {
        each!(self, c => c.reset_count())
    }

    /// The queue devices post completions to.
    pub fn completion_queue(&self) -> &CompletionQueue {
        each!(self, c => c.completion_queue())
    }

    /// Transfers handed to devices and not yet reported.
    pub fn transfers_in_flight(&self) -> usize {
        each!(self, c => c.transfers_in_flight())
    }

    /// Plugs `dev` into the first free port that fits it.
    pub fn attach(&mut self, dev: Box<dyn UsbDevice>) -> Result<PortPath, String> {
        match self {
            Controller::Xhci(x) => x
                .attach(dev)
                .map(|root| PortPath { root, hub: 0 })
                .map_err(|e| e.to_string()),
            Controller::Ehci(e) => e
                .attach(dev)
                .map(|(root, hub)| PortPath { root, hub })
                .map_err(|e| e.to_string()),
            Controller::Uhci(u) => u
                .attach(dev)
                .map(|root| PortPath { root, hub: 0 })
                .map_err(|e| e.to_string()),
        }
    }

    /// Plugs `dev` in at `at`.
    pub fn attach_at(&mut self, at: PortPath, dev: Box<dyn UsbDevice>) -> Result<(), String> {
        match self {
            Controller::Xhci(x) if at.hub == 0 => {
                x.attach_at(at.root, dev).map_err(|e| e.to_string())
            }
            Controller::Xhci(_) => Err("the xHCI has no hub ports".into()),
            Controller::Ehci(e) => e.attach_at(at.root, at.hub, dev).map_err(|e| e.to_string()),
            Controller::Uhci(u) if at.hub == 0 => {
                u.attach_at(at.root, dev).map_err(|e| e.to_string())
            }
            Controller::Uhci(_) => Err("the UHCI has no hub ports".into()),
        }
    }

    /// The devices plugged in, where, with their name, speed and whether
    /// they are connected now (a passthrough device may be away).
    pub fn devices(&mut self) -> Vec<DeviceInfo> {
        let info = |root: usize, hub: u8, d: &dyn UsbDevice| DeviceInfo {
            at: PortPath { root, hub },
            name: d.name(),
            speed: d.speed(),
            connected: d.connected(),
        };
        match self {
            Controller::Xhci(x) => x
                .devices()
                .into_iter()
                .map(|(p, d)| info(p, 0, d))
                .collect(),
            Controller::Uhci(u) => u
                .devices()
                .into_iter()
                .map(|(p, d)| info(p, 0, d))
                .collect(),
            Controller::Ehci(e) => e
                .devices()
                .into_iter()
                .map(|(root, hub, name, speed, connected)| DeviceInfo {
                    at: PortPath { root, hub },
                    name,
                    speed,
                    connected,
                })
                .collect(),
        }
    }

    /// Unplugs the device at `at`.
    pub fn detach(&mut self, at: PortPath) -> Option<Box<dyn UsbDevice>> {
        match self {
            Controller::Xhci(x) if at.hub == 0 => x.detach(at.root),
            Controller::Xhci(_) => None,
            Controller::Ehci(e) => e.detach(at.root, at.hub),
            Controller::Uhci(u) if at.hub == 0 => u.detach(at.root),
            Controller::Uhci(_) => None,
        }
    }
}

impl PciController for Controller {
    fn identity(&self) -> PciIdentity {
        each!(self, c => c.identity())
    }
    fn bars(&self) -> Vec<BarInfo> {
        each!(self, c => c.bars())
    }
    fn msix(&self) -> Option<MsixLayout> {
        each!(self, c => c.msix())
    }
    fn msi_vectors(&self) -> u16 {
        each!(self, c => c.msi_vectors())
    }
    fn vendor_config(&self) -> Vec<(u8, u8, u8)> {
        each!(self, c => c.vendor_config())
    }
    fn vendor_config_written(&mut self, vendor: &mut [u8]) {
        each!(self, c => c.vendor_config_written(vendor))
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8], irq: &mut dyn IrqSink) {
        each!(self, c => c.bar_read(bar, offset, data, irq))
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8], irq: &mut dyn IrqSink) {
        each!(self, c => c.bar_write(bar, offset, data, irq))
    }
    fn reset(&mut self, irq: &mut dyn IrqSink) {
        each!(self, c => c.reset(irq))
    }
    fn process(&mut self, irq: &mut dyn IrqSink) {
        each!(self, c => c.process(irq))
    }
    fn new_access(&mut self) {
        each!(self, c => c.new_access())
    }
    fn set_bus_master(&mut self, enabled: bool) {
        each!(self, c => c.set_bus_master(enabled))
    }
    fn next_deadline(&self) -> Option<Instant> {
        each!(self, c => c.next_deadline())
    }
    fn summary(&self) -> String {
        each!(self, c => c.summary())
    }
}
