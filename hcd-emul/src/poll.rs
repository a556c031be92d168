//! The adaptive poll of a schedule the guest edits by memory alone (EHCI's
//! asynchronous list, UHCI's frame list): right after activity it runs at
//! its shortest interval for a number of walks (a guest streaming adds
//! its next request right after handling the last completion), then the
//! interval doubles on every walk that finds nothing, up to its longest.

use std::time::{Duration, Instant};

/// One schedule's poll.
#[derive(Debug, Clone, Copy)]
pub struct AdaptivePoll {
    due: Option<Instant>,
    interval: Duration,
    idle: u32,
    min: Duration,
    max: Duration,
    fast_walks: u32,
}

impl AdaptivePoll {
    /// A stopped poll: `min` after activity for `fast_walks` idle walks,
    /// then doubling up to `max`.
    pub fn new(min: Duration, max: Duration, fast_walks: u32) -> Self {
        AdaptivePoll {
            due: None,
            interval: min,
            idle: 0,
            min,
            max,
            fast_walks,
        }
    }

    /// When the next walk is due (`None`: stopped).
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Whether a walk is due at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|t| t <= now)
    }

    /// Activity (a register write, a completion, the schedule enabled): a
    /// walk now, fast from here.
    pub fn kick(&mut self, now: Instant) {
        self.due = Some(now);
        self.interval = self.min;
        self.idle = 0;
    }

    /// A walk now, at whatever pace the poll has (a retry).
    pub fn now(&mut self, now: Instant) {
        self.due = Some(now);
    }

    /// No more walks until the next kick (schedule off, controller halted).
    pub fn stop(&mut self) {
        self.due = None;
    }

    /// A walk happened; `busy` if it found work. Schedules the next one.
    pub fn walked(&mut self, busy: bool) {
        if busy {
            self.idle = 0;
            self.interval = self.min;
        } else {
            self.idle = self.idle.saturating_add(1);
            if self.idle > self.fast_walks {
                self.interval = (self.interval * 2).min(self.max);
            }
        }
        self.due = Some(Instant::now() + self.interval);
    }
}

/// Schedule memory that could not be read or written (a vfio-user client
/// remapping guest RAM in several messages) is retried every millisecond
/// for a grace period before it is a Host System Error (EHCI, UHCI).
#[derive(Debug, Clone, Copy)]
pub struct FaultGrace {
    grace: Duration,
    since: Option<Instant>,
    retry: Option<Instant>,
    /// A fault was pending when the current wake-up began.
    pending: bool,
}

impl FaultGrace {
    /// Faults forgiven for `grace`.
    pub fn new(grace: Duration) -> Self {
        FaultGrace {
            grace,
            since: None,
            retry: None,
            pending: false,
        }
    }

    /// A fault now: `true` if the memory has been missing for the whole
    /// grace period (then a Host System Error; the state is cleared),
    /// else a retry is due in a millisecond.
    pub fn fault(&mut self) -> bool {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= self.grace {
            *self = FaultGrace::new(self.grace);
            return true;
        }
        self.retry = Some(now + Duration::from_millis(1));
        false
    }

    /// At the start of a wake-up: whether the retry is due (it is taken).
    pub fn begin(&mut self, now: Instant) -> bool {
        self.pending = self.since.is_some();
        if self.retry.is_some_and(|t| t <= now) {
            self.retry = None;
            return true;
        }
        false
    }

    /// At the end of a wake-up: if nothing faulted again and nothing
    /// waits (`clear`), the fault is over.
    pub fn end(&mut self, clear: bool) {
        if self.pending && self.retry.is_none() && clear {
            self.since = None;
        }
    }

    /// When the retry is due.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry
    }

    /// Forgets everything (controller reset).
    pub fn reset(&mut self) {
        *self = FaultGrace::new(self.grace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_after_activity_then_backing_off() {
        let ms = Duration::from_millis;
        let mut p = AdaptivePoll::new(ms(1), ms(8), 2);
        assert_eq!(p.due(), None);
        let t = Instant::now();
        p.kick(t);
        assert!(p.is_due(t));
        let next = |p: &AdaptivePoll| p.due().unwrap().saturating_duration_since(Instant::now());
        p.walked(false);
        p.walked(false);
        assert!(next(&p) <= ms(1), "still fast");
        p.walked(false);
        assert!(next(&p) > ms(1) && next(&p) <= ms(2));
        for _ in 0..10 {
            p.walked(false);
        }
        assert!(next(&p) > ms(4) && next(&p) <= ms(8), "capped");
        p.walked(true);
        assert!(next(&p) <= ms(1), "busy: fast again");
        p.stop();
        assert_eq!(p.due(), None);
    }
}
