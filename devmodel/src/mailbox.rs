//! Work posted to a controller's thread from another one (the QMP proxy's
//! USB commands, the control socket): closures run by the transport's
//! event loop between wake-ups, with the loop's waker to get there soon.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hcd_emul::controller::Controller;
use hcd_emul::pci::PciFunction;

type Job = Box<dyn FnOnce(&mut PciFunction<Controller>) + Send>;

/// Why a posted job gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the controller did not answer")]
pub struct NoAnswer;

/// A controller thread's mailbox (cloneable).
#[derive(Clone)]
pub struct Mailbox {
    jobs: Arc<Mutex<Vec<Job>>>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").finish_non_exhaustive()
    }
}

impl Mailbox {
    /// A mailbox whose loop is woken by `wake`.
    pub fn new(wake: Box<dyn Fn() + Send + Sync>) -> Self {
        Mailbox {
            jobs: Arc::default(),
            wake: Arc::from(wake),
        }
    }

    /// Wakes the loop (nothing posted).
    pub fn wake(&self) {
        (self.wake)();
    }

    /// Runs `f` on the controller's thread and returns its result (within
    /// 5 s).
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PciFunction<Controller>) -> R + Send + 'static,
    ) -> Result<R, NoAnswer> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(move |pci| {
                let _ = tx.send(f(pci));
            }));
        (self.wake)();
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| NoAnswer)
    }

    /// Runs what was posted (on the controller's thread); true if anything
    /// was.
    pub fn run(&self, pci: &mut PciFunction<Controller>) -> bool {
        let jobs = std::mem::take(&mut *self.jobs.lock().unwrap_or_else(|p| p.into_inner()));
        let any = !jobs.is_empty();
        for j in jobs {
            j(pci);
        }
        any
    }
}
