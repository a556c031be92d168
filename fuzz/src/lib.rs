//! Shared helpers of the fuzz targets.
//!
//! Every target runs its body through [`on_small_stack`]: libFuzzer calls
//! the target on the process's main thread, whose stack is the 8 MiB of
//! `ulimit -s`, so runaway recursion would need a very deep input to be
//! noticed. On a thread with a [`STACK`]-byte stack it overflows quickly;
//! Rust's guard page turns that into "thread has overflowed its stack" and
//! an abort, which libFuzzer reports as a crash (deadly signal) and saves.
//! (`RUST_MIN_STACK` would not help: it only sizes threads the code under
//! test spawns itself, not the thread libFuzzer runs the target on.)

use std::fs::File;
use std::sync::OnceLock;

/// Stack of the thread the code under test runs on. The deepest legitimate
/// call chains (xHCI doorbell -> ring -> device -> SCSI, with the extra
/// stack sanitizers use) need a few tens of KiB.
pub const STACK: usize = 256 << 10;

/// Runs `f` on a fresh thread with a [`STACK`]-byte stack and waits for it.
/// A panic in `f` is re-raised here (the panic hook of `fuzz_target!`
/// already aborts on the first one, in any thread).
pub fn on_small_stack<F: FnOnce() + Send>(f: F) {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("fuzz-body".into())
            .stack_size(STACK)
            .spawn_scoped(s, f)
            .expect("spawning the fuzz thread");
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    });
}

/// A new unlinked file of `len` bytes (sparse), in /dev/shm when there is
/// one (tmpfs: the same as a memfd), else in the temporary directory.
pub fn shm_file(len: u64) -> File {
    let f = tempfile::tempfile_in("/dev/shm")
        .or_else(|_| tempfile::tempfile())
        .expect("creating a temporary file");
    f.set_len(len).expect("sizing a temporary file");
    f
}

/// Size of the stick image shared by all inputs of a process.
pub const IMAGE_LEN: u64 = 1 << 20;

/// A descriptor of the process's 1 MiB stick image (created once; every
/// stick gets its own descriptor, reads and writes are positioned by the
/// stick itself).
pub fn image() -> File {
    static IMG: OnceLock<File> = OnceLock::new();
    IMG.get_or_init(|| shm_file(IMAGE_LEN))
        .try_clone()
        .expect("dup of the image descriptor")
}
