//! A test device for the controllers' suspend and remote-wakeup paths:
//! it records what its port does to it and signals resume on demand.

use std::sync::{Arc, Mutex};

use super::{Speed, Transfer, TransferId, TransferStatus, UsbDevice};

/// What the port did and what the device asks for; shared with the test.
#[derive(Debug, Default)]
pub(crate) struct SleepState {
    /// `suspend` calls, in order.
    pub suspends: Vec<bool>,
    /// The device signals remote wakeup (taken by `remote_wakeup`).
    pub wake: bool,
    /// Bus resets.
    pub resets: usize,
}

/// A device that answers nothing but suspend and resume.
#[derive(Debug, Clone)]
pub(crate) struct Sleeper {
    pub speed: Speed,
    pub state: Arc<Mutex<SleepState>>,
}

impl Sleeper {
    pub fn new(speed: Speed) -> Sleeper {
        Sleeper {
            speed,
            state: Arc::default(),
        }
    }

    /// The `suspend` calls so far.
    pub fn suspends(&self) -> Vec<bool> {
        self.state.lock().unwrap().suspends.clone()
    }

    /// Asks for a resume at the controller's next look.
    pub fn signal_wakeup(&self) {
        self.state.lock().unwrap().wake = true;
    }
}

impl UsbDevice for Sleeper {
    fn name(&self) -> String {
        "sleeper".into()
    }
    fn speed(&self) -> Speed {
        self.speed
    }
    fn reset(&mut self) {
        self.state.lock().unwrap().resets += 1;
    }
    fn submit(&mut self, xfer: Transfer) {
        xfer.complete(TransferStatus::Stall, 0);
    }
    fn cancel(&mut self, _: TransferId) {}
    fn suspend(&mut self, suspended: bool) {
        self.state.lock().unwrap().suspends.push(suspended);
    }
    fn remote_wakeup(&mut self) -> bool {
        std::mem::take(&mut self.state.lock().unwrap().wake)
    }
}
