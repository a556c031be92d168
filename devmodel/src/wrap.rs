//! `device_model_override` mode: `xen-usb-dm --config F --wrap QEMU -- ARGS`.
//!
//! libxl starts its device model twice. The probe (`-machine none`, no
//! `-xen-domid`) only asks QEMU about its options: it is handed straight
//! to the real QEMU. On the real run we read `-xen-domid`, fork a service
//! process that sets up our ioreq server (enabled, PCI function claimed)
//! and reports back through a pipe, and only then exec the real QEMU with
//! argv, environment and file descriptors unchanged — so libxl talks QMP
//! to the real QEMU under the pid it started, and the guest (started
//! paused) sees our device from its first instruction. The service process
//! keeps stdout/stderr (libxl's device-model log) and no other inherited
//! descriptor, and ends when the domain dies.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{bail, Context};

/// The domain id libxl passes as `-xen-domid N`, if any.
pub fn xen_domid(args: &[OsString]) -> anyhow::Result<Option<u16>> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == OsStr::new("-xen-domid") {
            let v = it.next().context("-xen-domid without a value")?;
            let d = v
                .to_str()
                .and_then(|s| s.parse::<u16>().ok())
                .with_context(|| format!("-xen-domid {v:?} is not a domain id"))?;
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// Replaces this process with `qemu args...` (argv, environment and open
/// descriptors unchanged). Returns only on failure.
pub fn exec_qemu(qemu: &Path, args: &[OsString]) -> anyhow::Error {
    let e = std::process::Command::new(qemu).args(args).exec();
    anyhow::Error::new(e).context(format!("exec {}", qemu.display()))
}

/// Closes every descriptor above 2 except `keep` (the service process must
/// not hold libxl's QMP socket or anything else meant for QEMU).
fn close_inherited(keep: i32) {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing a descriptor number this process inherited;
            // nothing in this (freshly forked, single-threaded) process
            // owns it as a Rust object except `keep`, which is skipped.
            // The directory iterator's own descriptor is already closed.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

/// Runs the wrapper: never returns on success (the process becomes QEMU).
/// `serve(domid, ready)` sets up and runs the server in the service
/// process and must call `ready` once the guest may run.
pub fn run(
    qemu: &Path,
    args: &[OsString],
    serve: impl FnOnce(u16, &mut dyn FnMut()) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let Some(domid) = xen_domid(args)? else {
        // libxl's probe (or anything else): not ours.
        return Err(exec_qemu(qemu, args));
    };
    start_service(domid, serve)?;
    Err(exec_qemu(qemu, args))
}

/// Forks the service process, which runs `serve(domid, ready)`, and
/// returns its pid as soon as it called `ready` (it keeps serving), or the
/// reason it failed before that.
fn start_service(
    domid: u16,
    serve: impl FnOnce(u16, &mut dyn FnMut()) -> anyhow::Result<()>,
) -> anyhow::Result<libc::pid_t> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both descriptors were just created and are owned only here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded at this point (nothing has
    // spawned a thread before the wrapper runs), so the child may run
    // arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        drop(rd);
        close_inherited(wr.as_raw_fd());
        // Closed as soon as the answer is written: the parent reads one
        // line, but an open pipe must not be what holds QEMU back.
        let mut pipe = Some(File::from(wr));
        let mut report = |msg: &str| {
            if let Some(mut p) = pipe.take() {
                let _ = p.write_all(msg.as_bytes());
            }
        };
        let r = serve(domid, &mut || report("ok\n"));
        let code = match r {
            Ok(()) => 0,
            Err(e) => {
                let msg = format!("{e:#}");
                // Straight to descriptor 2 and out with _exit: no lock
                // (stderr's, stdout's at exit) that a thread of the parent
                // may have held at fork time (the unit tests fork from a
                // multi-threaded harness), and no atexit handler of the
                // parent's.
                let line = format!("xen-usb-dm: {msg}\n");
                // SAFETY: writing a buffer we own to descriptor 2.
                unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
                report(&format!("error: {msg}\n"));
                1
            }
        };
        // SAFETY: ends this (forked) process without unwinding.
        unsafe { libc::_exit(code) }
    }
    drop(wr);
    // One line: "ok", or "error: why"; EOF if the service process died
    // without a word.
    let mut answer = String::new();
    let _ = BufReader::new(File::from(rd)).read_line(&mut answer);
    if answer.starts_with("ok") {
        return Ok(pid);
    }
    // The service process failed before the guest could run: reap it and
    // fail the device model start, so libxl fails the domain creation
    // rather than start a guest without its USB controller.
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let why = answer
        .strip_prefix("error: ")
        .unwrap_or("the service process ended without a word")
        .trim()
        .to_owned();
    bail!("domain {domid}: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn domid_is_found_where_libxl_puts_it() {
        let real = args(&[
            "-xen-domid",
            "12",
            "-chardev",
            "socket,id=libxl-cmd,fd=9,server=on,wait=off",
            "-mon",
            "chardev=libxl-cmd,mode=control",
            "-no-shutdown",
            "-S",
            "-machine",
            "xenfv,suppress-vmdesc=on",
        ]);
        assert_eq!(xen_domid(&real).unwrap(), Some(12));
        let probe = args(&[
            "-S",
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-machine",
            "none,accel=xen",
            "-chardev",
            "socket,id=m,fd=5",
        ]);
        assert_eq!(xen_domid(&probe).unwrap(), None);
        assert!(xen_domid(&args(&["-xen-domid"])).is_err());
        assert!(xen_domid(&args(&["-xen-domid", "x"])).is_err());
        assert!(xen_domid(&args(&["-xen-domid", "70000"])).is_err());
    }

    /// The wrapper must exec QEMU as soon as the service process is ready,
    /// while that process goes on serving (the bug the real-Xen bed found:
    /// the wrapper waited for the pipe's end of file, i.e. for the
    /// service process to exit, and libxl timed out waiting for QEMU).
    #[test]
    fn ready_returns_while_the_service_runs() {
        let t0 = std::time::Instant::now();
        let pid = start_service(7, |domid, ready| {
            if domid == 7 {
                ready();
            }
            std::thread::sleep(std::time::Duration::from_secs(60));
            Ok(())
        })
        .unwrap();
        assert!(t0.elapsed() < std::time::Duration::from_secs(20));
        let mut status = 0;
        // SAFETY: signalling and reaping our own child.
        unsafe {
            assert_eq!(
                libc::waitpid(pid, &mut status, libc::WNOHANG),
                0,
                "still serving"
            );
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
    }
}
