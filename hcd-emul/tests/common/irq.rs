//! The interrupt side of the guest-driver harnesses: a transport that
//! records what the PCI function raised (shared by the xHCI and EHCI
//! harnesses).

use std::sync::{Arc, Mutex};

use hcd_emul::pci::{InterruptTransport, MsiMessage};

/// Interrupts the transport saw.
#[derive(Debug, Default)]
pub struct IrqLog {
    pub msgs: Vec<MsiMessage>,
    pub intx: bool,
}

#[derive(Debug, Clone)]
pub struct Recorder(pub Arc<Mutex<IrqLog>>);

impl InterruptTransport for Recorder {
    fn set_intx(&mut self, level: bool) {
        self.0.lock().unwrap().intx = level;
    }
    fn send_msi(&mut self, msg: MsiMessage) {
        self.0.lock().unwrap().msgs.push(msg);
    }
}
