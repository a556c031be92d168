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

/// `tracing::warn!` at most ten times a second per call site.
#[macro_export]
macro_rules! guest_warn {
    (target: $target:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow() {
            tracing::event!(target: $target, tracing::Level::WARN, $($arg)+);
        }
    }};
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow() {
            tracing::event!(tracing::Level::WARN, $($arg)+);
        }
    }};
}

/// `tracing::info!` at most ten times a second per call site: for
/// notices a guest or client can repeat at will (connects, resets).
#[macro_export]
macro_rules! guest_info {
    (target: $target:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow() {
            tracing::event!(target: $target, tracing::Level::INFO, $($arg)+);
        }
    }};
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow() {
            tracing::event!(tracing::Level::INFO, $($arg)+);
        }
    }};
}

/// `tracing::error!` at most ten times a second per call site: for errors
/// a guest or client can provoke at will (a refused client, a broken
/// stream).
#[macro_export]
macro_rules! guest_error {
    (target: $target:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow() {
            tracing::event!(target: $target, tracing::Level::ERROR, $($arg)+);
        }
    }};
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow() {
            tracing::event!(tracing::Level::ERROR, $($arg)+);
        }
    }};
}
