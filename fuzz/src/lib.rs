//! Shared helpers of the fuzz targets.
//!
//! Every target runs its body through [`run_small_stack`]: libFuzzer calls
//! the target on the process's main thread, whose stack is the 8 MiB of
//! `ulimit -s`, so runaway recursion would need a very deep input to be
//! noticed. On a thread with a [`STACK`]-byte stack it overflows quickly;
//! Rust's guard page turns that into "thread has overflowed its stack" and
//! an abort, which libFuzzer reports as a crash (deadly signal) and saves.
//! (`RUST_MIN_STACK` would not help: it only sizes threads the code under
//! test spawns itself, not the thread libFuzzer runs the target on.)

use std::fs::File;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

/// Stack of the thread the code under test runs on: a 32nd of the main
/// thread's. Legitimate inputs of every target run within it (with ASan's
/// larger frames), so an overflow is a finding.
pub const STACK: usize = 256 << 10;

type Job = (Vec<u8>, fn(&[u8]));

/// One long-lived thread with a [`STACK`]-byte stack that runs the inputs
/// (spawning a thread per input costs more than some targets' bodies).
struct Worker {
    jobs: Sender<Job>,
    done: Receiver<()>,
}

/// Runs `body(data)` on the process's small-stack worker thread and waits
/// for it. A panic there aborts the process (the panic hook of
/// `fuzz_target!` aborts on the first one, in any thread); a stack
/// overflow aborts it too.
pub fn run_small_stack(data: &[u8], body: fn(&[u8])) {
    static W: OnceLock<Mutex<Worker>> = OnceLock::new();
    let w = W.get_or_init(|| {
        let (jobs, rx) = channel::<Job>();
        let (tx, done) = channel();
        std::thread::Builder::new()
            .name("fuzz-body".into())
            .stack_size(STACK)
            .spawn(move || {
                for (data, body) in rx {
                    body(&data);
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the fuzz thread");
        Mutex::new(Worker { jobs, done })
    });
    let w = w.lock().unwrap_or_else(|e| e.into_inner());
    w.jobs
        .send((data.to_vec(), body))
        .expect("fuzz thread gone");
    if w.done.recv().is_err() {
        // The body panicked without the aborting hook (not under libFuzzer).
        panic!("fuzz body panicked");
    }
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
