//! Rate-limited logging for guest misbehaviour: a hostile guest must not be
//! able to flood the host's logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Per-call-site budget: at most `BURST` messages per second.
#[derive(Debug)]
pub struct RateLimit {
    window: AtomicU64,
    count: AtomicU64,
}

const BURST: u64 = 10;

impl RateLimit {
    /// A fresh limiter.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Whether a message may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < BURST
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// A `tracing` event at `$level`, at most ten times a second per call
/// site (the common body of [`guest_warn!`], [`guest_info!`] and
/// [`guest_error!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! guest_event {
    ($level:expr, target: $target:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        // (only lines someone records use up the budget)
        if tracing::enabled!(target: $target, $level) && LIMIT.allow() {
            tracing::event!(target: $target, $level, $($arg)+);
        }
    }};
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if tracing::enabled!($level) && LIMIT.allow() {
            tracing::event!($level, $($arg)+);
        }
    }};
}

/// `tracing::warn!` at most ten times a second per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::guest_event!(tracing::Level::WARN, $($arg)+)
    };
}

/// `tracing::info!` at most ten times a second per call site: for
/// notices a guest or client can repeat at will (connects, resets).
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)+) => {
        $crate::guest_event!(tracing::Level::INFO, $($arg)+)
    };
}

/// `tracing::error!` at most ten times a second per call site: for errors
/// a guest or client can provoke at will (a refused client, a broken
/// stream).
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {
        $crate::guest_event!(tracing::Level::ERROR, $($arg)+)
    };
}

/// Counts INFO/WARN/ERROR events per call site (file:line) where it is the
/// subscriber (`tracing::subscriber::with_default`, or [`LogCounter::run`]):
/// for tests that a flood of bad input logs no more than the limiter
/// allows.
#[derive(Clone, Default, Debug)]
pub struct LogCounter(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

impl LogCounter {
    /// Runs `f` with this counter as the thread's subscriber.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        tracing::subscriber::with_default(self.clone(), f)
    }

    /// Lines counted per call site.
    pub fn sites(&self) -> std::collections::HashMap<String, usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asserts that no call site logged more than the rate limiter allows
    /// over `elapsed` (10 a second, per started wall-clock second), and
    /// that something was logged at all (the flood did reach a log site).
    pub fn assert_bounded(&self, elapsed: std::time::Duration) {
        let sites = self.sites();
        assert!(!sites.is_empty(), "the flood reached no log site");
        let cap = 10 * (elapsed.as_secs() as usize + 2);
        for (site, n) in &sites {
            assert!(*n <= cap, "{site}: {n} lines in {elapsed:?} (cap {cap})");
        }
    }
}

impl tracing::Subscriber for LogCounter {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::INFO
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let m = e.metadata();
        let site = format!("{}:{}", m.file().unwrap_or("?"), m.line().unwrap_or(0));
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(site)
            .or_default() += 1;
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
