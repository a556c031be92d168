//! Interrupt delivery to a vfio-user client: one eventfd per INTx, MSI
//! and MSI-X vector, as handed over by `SET_IRQS`.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use hcd_emul::pci::{ExternalMsi, InterruptTransport, MsiMessage};

use super::proto::{IRQ_INTX, IRQ_MSI, IRQ_MSIX};

/// A `SET_IRQS` the device cannot honour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid interrupt vector range")]
pub struct BadVectors;

/// Most vectors per index accepted.
const MAX_VECTORS: usize = 2048;

/// The client's eventfds.
#[derive(Debug, Default)]
pub struct IrqFds {
    intx: Option<File>,
    intx_level: bool,
    msi: Vec<Option<File>>,
    msix: Vec<Option<File>>,
    /// Interrupts signalled (statistics).
    pub signalled: u64,
}

fn kick(f: &Option<File>) -> bool {
    match f.as_ref() {
        Some(mut f) => f.write_all(&1u64.to_ne_bytes()).is_ok(),
        None => false,
    }
}

impl IrqFds {
    /// Installs eventfds for vectors `start..` of `index`.
    pub fn set(&mut self, index: u32, start: u32, fds: Vec<File>) -> Result<(), BadVectors> {
        let list = match index {
            IRQ_INTX => {
                if start != 0 || fds.len() > 1 {
                    return Err(BadVectors);
                }
                self.intx = fds.into_iter().next();
                return Ok(());
            }
            IRQ_MSI => &mut self.msi,
            IRQ_MSIX => &mut self.msix,
            _ => return Ok(()),
        };
        let start = start as usize;
        let end = start
            .checked_add(fds.len())
            .filter(|e| *e <= MAX_VECTORS)
            .ok_or(BadVectors)?;
        if list.len() < end {
            list.resize_with(end, || None);
        }
        for (i, f) in fds.into_iter().enumerate() {
            list[start + i] = Some(f);
        }
        Ok(())
    }

    /// Disables `index`.
    pub fn clear(&mut self, index: u32) {
        match index {
            IRQ_INTX => self.intx = None,
            IRQ_MSI => self.msi.clear(),
            IRQ_MSIX => self.msix.clear(),
            _ => {}
        }
    }

    /// Disables vectors `start..start+count` of `index`.
    pub fn clear_range(&mut self, index: u32, start: u32, count: u32) {
        let list = match index {
            IRQ_INTX => {
                if start == 0 && count > 0 {
                    self.intx = None;
                }
                return;
            }
            IRQ_MSI => &mut self.msi,
            IRQ_MSIX => &mut self.msix,
            _ => return,
        };
        let end = (start as usize)
            .saturating_add(count as usize)
            .min(list.len());
        for v in list.iter_mut().take(end).skip(start as usize) {
            *v = None;
        }
    }

    /// Signals one vector.
    pub fn signal(&mut self, index: u32, vector: u32) {
        let f = match index {
            IRQ_INTX => &self.intx,
            IRQ_MSI => self.msi.get(vector as usize).unwrap_or(&None),
            IRQ_MSIX => self.msix.get(vector as usize).unwrap_or(&None),
            _ => &None,
        };
        if kick(f) {
            self.signalled += 1;
            crate::timeline::record(b'I', u64::from(index), u64::from(vector));
        }
    }

    /// INTx is automasked after each trigger; the client unmasks it after
    /// the guest's next access. Still asserted: trigger again.
    pub fn unmask_intx(&mut self) {
        if self.intx_level && kick(&self.intx) {
            self.signalled += 1;
        }
    }

    /// Which mode the client enabled.
    pub fn mode(&self) -> ExternalMsi {
        let n = |v: &Vec<Option<File>>| v.iter().rposition(Option::is_some).map(|i| (i + 1) as u16);
        if let Some(c) = n(&self.msix) {
            ExternalMsi::MsiX(c)
        } else if let Some(c) = n(&self.msi) {
            ExternalMsi::Msi(c)
        } else {
            ExternalMsi::None
        }
    }
}

/// The [`InterruptTransport`] the PCI function drives.
#[derive(Debug)]
pub struct VfioIrqTransport {
    fds: Arc<Mutex<IrqFds>>,
}

impl VfioIrqTransport {
    pub fn new(fds: Arc<Mutex<IrqFds>>) -> Self {
        Self { fds }
    }
}

impl InterruptTransport for VfioIrqTransport {
    fn set_intx(&mut self, level: bool) {
        if let Ok(mut f) = self.fds.lock() {
            let rising = level && !f.intx_level;
            f.intx_level = level;
            if rising {
                f.signal(IRQ_INTX, 0);
            }
        }
    }

    fn send_msi(&mut self, msg: MsiMessage) {
        if let Ok(mut f) = self.fds.lock() {
            let index = if msg.msix { IRQ_MSIX } else { IRQ_MSI };
            f.signal(index, u32::from(msg.vector));
        }
    }
}
