//! An opt-in record of every guest register access and interrupt with its
//! wall-clock time, for finding where the time of a transfer goes
//! (`tests/guest/phases.sh`). Set `XEN_USB_DM_TIMELINE=FILE`: entries are
//! kept in memory (at most [`MAX_ENTRIES`]) and written to FILE when the
//! vfio-user client disconnects, one line per entry:
//! `MICROSECONDS KIND OFFSET VALUE` (KIND `R`/`W` for a BAR 0 read/write,
//! `I` for an interrupt). Costs one clock read and a push per event, so it
//! barely disturbs what it measures (a log line per access would).

use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Most entries kept (about 32 MiB); later events are dropped.
pub const MAX_ENTRIES: usize = 1 << 20;

struct Timeline {
    path: String,
    entries: Mutex<Vec<(u64, u8, u64, u64)>>,
}

static TIMELINE: OnceLock<Option<Timeline>> = OnceLock::new();

fn get() -> Option<&'static Timeline> {
    TIMELINE
        .get_or_init(|| {
            std::env::var("XEN_USB_DM_TIMELINE")
                .ok()
                .map(|path| Timeline {
                    path,
                    entries: Mutex::new(Vec::new()),
                })
        })
        .as_ref()
}

/// Whether recording is on.
pub fn enabled() -> bool {
    get().is_some()
}

/// Records one event (no-op unless enabled).
pub fn record(kind: u8, offset: u64, value: u64) {
    let Some(t) = get() else { return };
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    if let Ok(mut v) = t.entries.lock() {
        if v.len() < MAX_ENTRIES {
            v.push((us, kind, offset, value));
        }
    }
}

/// Writes and clears what was recorded (no-op unless enabled).
pub fn flush() {
    let Some(t) = get() else { return };
    let Ok(mut v) = t.entries.lock() else { return };
    let mut s = String::with_capacity(v.len() * 32);
    for (us, kind, off, val) in v.drain(..) {
        s.push_str(&format!("{us} {} {off:#x} {val:#x}\n", char::from(kind)));
    }
    if let Err(e) = std::fs::write(&t.path, s) {
        hcd_emul::guest_warn!("timeline: cannot write {}: {e}", t.path);
    }
}
