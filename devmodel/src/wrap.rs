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
//!
//! When the arguments carry libxl's QMP monitor (`-chardev
//! socket,id=libxl-cmd,...`), it is interposed first ([`crate::qmp`]):
//! the service process then listens where libxl connects, forwards to
//! QEMU what is QEMU's and serves xl's USB commands itself; its
//! controllers come from `[controller]` and from xl's `usbctrl`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{bail, Context};

use crate::qmp::Interposed;

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

/// What libxl's `dm_restrict=1` asks of QEMU in its arguments, which the
/// service process takes on too: `-xen-domid-restrict`, and the user and
/// chroot QEMU drops to (`-run-with user=U,chroot=D`, or `-runas U` and
/// `-chroot D` on older QEMU).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QemuRestrict {
    /// `-xen-domid-restrict`: Xen descriptors restricted to the domain.
    pub domid_restrict: bool,
    /// The user QEMU runs as (a name, or `uid:gid`).
    pub user: Option<String>,
    /// The directory QEMU chroots into.
    pub chroot: Option<std::path::PathBuf>,
}

/// The `dm_restrict` options in libxl's device model arguments.
pub fn qemu_restrict(args: &[OsString]) -> QemuRestrict {
    let mut r = QemuRestrict::default();
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        match a.as_ref() {
            "-xen-domid-restrict" => r.domid_restrict = true,
            "-runas" => r.user = it.next().map(|v| v.into_owned()),
            "-chroot" => r.chroot = it.next().map(|v| v.into_owned().into()),
            "-run-with" => {
                let Some(v) = it.next() else { break };
                for kv in v.split(',') {
                    if let Some(u) = kv.strip_prefix("user=") {
                        r.user = Some(u.to_owned());
                    } else if let Some(d) = kv.strip_prefix("chroot=") {
                        r.chroot = Some(d.into());
                    }
                }
            }
            _ => {}
        }
    }
    r
}

/// Takes on QEMU's confinement under `dm_restrict=1` where the
/// configuration does not say otherwise: `-xen-domid-restrict` turns on
/// `restrict`; QEMU's user and chroot become ours unless `uid`/`chroot`
/// are configured. So libxl's kill-by-uid on destroy ends us with QEMU,
/// and we are never less confined than the QEMU beside us.
pub fn apply_qemu_restrict(
    t: &mut crate::config::Transport,
    r: &QemuRestrict,
) -> anyhow::Result<()> {
    if r.domid_restrict {
        t.restrict = true;
    }
    if let (None, Some(user)) = (t.uid, &r.user) {
        let (uid, gid) = resolve_user(user)?;
        t.uid = Some(uid);
        t.gid = Some(t.gid.unwrap_or(gid));
    }
    if let (None, Some(dir)) = (&t.chroot, &r.chroot) {
        t.chroot = Some(dir.clone());
    }
    Ok(())
}

/// Resolves a QEMU `-runas` user: `uid:gid` as numbers, or a name looked
/// up in the password database (its primary group).
pub fn resolve_user(user: &str) -> anyhow::Result<(u32, u32)> {
    if let Some((u, g)) = user.split_once(':') {
        if let (Ok(u), Ok(g)) = (u.parse(), g.parse()) {
            return Ok((u, g));
        }
    }
    let name = std::ffi::CString::new(user).context("user name with a NUL byte")?;
    // SAFETY: getpwnam_r writes into `pw` and `buf`, both ours and of the
    // sizes passed; `result` points at `pw` or is null afterwards.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            bail!("user {user:?} (from QEMU's -runas/-run-with) not found");
        }
        Ok((pw.pw_uid, pw.pw_gid))
    }
}

/// libxl's `dm_restrict=1` puts every process it starts for the device
/// model (ours too) under RLIMIT_FSIZE 256 KiB: a write to the stick image
/// past 256 KiB would fail with EFBIG, or kill the process with SIGXFSZ.
/// The service process lifts the limit (it runs as root until it
/// deprivileges), and ignores SIGXFSZ so that, were a limit ever left in
/// place, a write past it fails as an I/O error the guest sees instead of
/// killing the process. If the limit cannot be lifted, set-up fails: no
/// guest may run with a stick that silently loses writes.
pub fn lift_file_size_limit() -> anyhow::Result<()> {
    // SAFETY: setting a signal's disposition to SIG_IGN and plain
    // getrlimit/setrlimit calls on structs we own.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_FSIZE, &mut cur) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_FSIZE)");
        }
        if cur.rlim_cur == libc::RLIM_INFINITY {
            return Ok(());
        }
        let inf = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_FSIZE, &inf) != 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "file writes are limited to {} bytes (RLIMIT_FSIZE, libxl's dm_restrict) \
                 and the limit cannot be lifted ({e}): the stick image would lose writes",
                cur.rlim_cur
            );
        }
    }
    Ok(())
}

/// The descriptor of libxl's QMP socket when it is passed listening
/// (`-chardev socket,id=libxl-cmd,fd=N,...`: always in libxl's probe,
/// and under `dm_restrict=1`).
pub fn qmp_listen_fd(args: &[OsString]) -> Option<i32> {
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a != "-chardev" {
            continue;
        }
        let v = it.next()?;
        let kv: Vec<&str> = v.split(',').collect();
        if kv.first() == Some(&"socket") && kv.contains(&"id=libxl-cmd") {
            return kv.iter().find_map(|p| p.strip_prefix("fd=")?.parse().ok());
        }
    }
    None
}

/// libxl 4.20+ probes QEMU first (`-machine none`) on a QMP socket it
/// bound at `/var/run/xen/qmp-libxl-N` and passes as `fd=`, then stops it
/// with `quit` and SIGHUP and, without waiting for it to exit, binds the
/// same path again for the real start under `dm_restrict=1`. QEMU unlinks
/// the path of a listening socket when it exits (`socket_listen_cleanup`),
/// so a probe slow to exit removes the real start's socket: libxl's
/// connect fails with ENOENT and the domain is not created (seen on the
/// nested test bed, where the probe's exit is slow; stock QEMU is exposed
/// the same way). The probe gets a private mount namespace in which an
/// empty tmpfs covers the socket's directory, so its unlink finds nothing.
/// Best effort: on any failure the probe runs as it would have.
fn shield_probe_qmp_path(args: &[OsString]) {
    let Some(fd) = qmp_listen_fd(args) else {
        return;
    };
    // SAFETY: getsockname into a sockaddr_un we own, with its size.
    let path = unsafe {
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_un).cast(), &mut len) != 0
            || sa.sun_family != libc::AF_UNIX as libc::sa_family_t
        {
            return;
        }
        let bytes: Vec<u8> = sa
            .sun_path
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        std::path::PathBuf::from(<OsString as std::os::unix::ffi::OsStringExt>::from_vec(
            bytes,
        ))
    };
    let Some(dir) = path
        .parent()
        .filter(|d| d.is_absolute() && *d != Path::new("/"))
    else {
        return;
    };
    let Ok(cdir) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
    else {
        return;
    };
    // SAFETY: unshare and mount with NUL-terminated strings we own (or
    // null where mount(2) allows it); they only change this process's
    // (new, private) mount namespace.
    let r = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
            && libc::mount(
                c"tmpfs".as_ptr(),
                cdir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=4k,mode=0700".as_ptr().cast(),
            ) == 0
    };
    if !r {
        eprintln!(
            "xen-usb-dm: probe: cannot shield {} from QEMU's exit ({}); libxl may lose its QMP socket",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Replaces this process with `qemu args...` (argv, environment and open
/// descriptors unchanged). Returns only on failure.
pub fn exec_qemu(qemu: &Path, args: &[OsString]) -> anyhow::Error {
    let e = std::process::Command::new(qemu).args(args).exec();
    anyhow::Error::new(e).context(format!("exec {}", qemu.display()))
}

/// Closes every descriptor above 2 except `keep` (the service process must
/// not hold libxl's QMP socket or anything else meant for QEMU).
fn close_inherited(keep: &[i32]) {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor number this process inherited;
            // nothing in this (freshly forked, single-threaded) process
            // owns it as a Rust object except those in `keep`, skipped.
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
    serve: impl FnOnce(u16, Option<Interposed>, &mut dyn FnMut()) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let Some(domid) = xen_domid(args)? else {
        // libxl's probe (or anything else): not ours.
        shield_probe_qmp_path(args);
        return Err(exec_qemu(qemu, args));
    };
    let mut args = args.to_vec();
    let (ours, qemu_side) = match crate::qmp::interpose(&mut args)? {
        Some((i, q)) => (Some(i), Some(q)),
        None => (None, None),
    };
    let keep: Vec<i32> = ours
        .as_ref()
        .map(|i| vec![i.libxl.as_raw_fd(), i.qemu.as_raw_fd()])
        .unwrap_or_default();
    let mut ours = ours;
    start_service(domid, &keep, |domid, ready| {
        serve(domid, ours.take(), ready)
    })?;
    // This process becomes QEMU: our ends are the service process's now.
    drop(ours);
    if let Some(q) = qemu_side {
        q.install()?;
    }
    Err(exec_qemu(qemu, &args))
}

/// Forks the service process, which runs `serve(domid, ready)`, and
/// returns its pid as soon as it called `ready` (it keeps serving), or the
/// reason it failed before that.
fn start_service(
    domid: u16,
    keep: &[i32],
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
        let mut keep = keep.to_vec();
        keep.push(wr.as_raw_fd());
        close_inherited(&keep);
        // Closed as soon as the answer is written: the parent reads one
        // line, but an open pipe must not be what holds QEMU back.
        let mut pipe = Some(File::from(wr));
        let mut report = |msg: &str| {
            if let Some(mut p) = pipe.take() {
                let _ = p.write_all(msg.as_bytes());
            }
        };
        let r = lift_file_size_limit().and_then(|()| serve(domid, &mut || report("ok\n")));
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

    #[test]
    fn qmp_listen_fd_is_libxls_passed_socket_only() {
        let probe = args(&[
            "-machine",
            "none,accel=xen",
            "-chardev",
            "socket,id=libxl-cmd,fd=16,server=on,wait=off",
            "-mon",
            "chardev=libxl-cmd,mode=control",
        ]);
        assert_eq!(qmp_listen_fd(&probe), Some(16));
        let path = args(&[
            "-chardev",
            "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-3,server=on,wait=off",
            "-chardev",
            "socket,id=libxenstat-cmd,fd=7,server=on,wait=off",
        ]);
        assert_eq!(qmp_listen_fd(&path), None);
        assert_eq!(qmp_listen_fd(&args(&["-chardev"])), None);
    }

    #[test]
    fn dm_restrict_options_are_read_in_both_qemu_spellings() {
        let new = args(&[
            "-xen-domid",
            "3",
            "-xen-domid-restrict",
            "-run-with",
            "chroot=/var/run/xen/qemu-root-3",
            "-run-with",
            "user=131075:131075",
        ]);
        let r = qemu_restrict(&new);
        assert!(r.domid_restrict);
        assert_eq!(r.user.as_deref(), Some("131075:131075"));
        assert_eq!(
            r.chroot.as_deref(),
            Some(Path::new("/var/run/xen/qemu-root-3"))
        );
        let old = args(&["-xen-domid", "3", "-runas", "nobody", "-chroot", "/x"]);
        let r = qemu_restrict(&old);
        assert!(!r.domid_restrict);
        assert_eq!(r.user.as_deref(), Some("nobody"));
        assert_eq!(r.chroot.as_deref(), Some(Path::new("/x")));
        assert_eq!(
            qemu_restrict(&args(&["-xen-domid", "3"])),
            QemuRestrict::default()
        );
        assert_eq!(resolve_user("5:6").unwrap(), (5, 6));
        assert_eq!(resolve_user("root").unwrap(), (0, 0));
        assert!(resolve_user("no-such-user-xyz").is_err());
        // Taken on where the configuration is silent, never over it.
        let transport = |extra: &str| -> crate::config::Transport {
            toml::from_str(&format!("kind = \"xen\"\n{extra}")).unwrap()
        };
        let mut t = transport("");
        apply_qemu_restrict(&mut t, &qemu_restrict(&new)).unwrap();
        assert!(t.restrict);
        assert_eq!((t.uid, t.gid), (Some(131075), Some(131075)));
        assert_eq!(
            t.chroot.as_deref(),
            Some(Path::new("/var/run/xen/qemu-root-3"))
        );
        let mut t = transport("uid = 65534\nchroot = \"/srv/empty\"");
        apply_qemu_restrict(&mut t, &qemu_restrict(&new)).unwrap();
        assert_eq!(
            (t.uid, t.chroot.as_deref()),
            (Some(65534), Some(Path::new("/srv/empty")))
        );
    }

    /// libxl's dm_restrict leaves RLIMIT_FSIZE at 256 KiB for the wrapper
    /// and what it forks: the service process must lift it, or a stick
    /// write past 256 KiB fails (or SIGXFSZ kills the process). Run in a
    /// forked child with the limit set as libxl sets it.
    #[test]
    fn service_process_lifts_dm_restricts_file_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("stick.img");
        std::fs::write(&img, []).unwrap();
        // SAFETY: the child only makes system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            use std::os::unix::fs::FileExt;
            let lim = libc::rlimit {
                rlim_cur: 256 << 10,
                rlim_max: 256 << 10,
            };
            // SAFETY: plain system calls in the forked child.
            unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) };
            let code = match lift_file_size_limit() {
                Ok(()) => {
                    let f = std::fs::OpenOptions::new().write(true).open(&img);
                    match f.and_then(|f| f.write_all_at(&[0xa5; 4096], 1 << 20)) {
                        Ok(()) => 0,
                        Err(_) => 2,
                    }
                }
                Err(_) => 3,
            };
            // SAFETY: ends the forked child without unwinding.
            unsafe { libc::_exit(code) }
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status),
            "child killed (SIGXFSZ?): {status:#x}"
        );
        let code = libc::WEXITSTATUS(status);
        // With CAP_SYS_RESOURCE (root in dom0) it is lifted and the write
        // lands; without it (some sandboxes) set-up must refuse, never
        // lose writes.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap();
        let can_lift = cap_eff & (1 << 24) != 0; // CAP_SYS_RESOURCE
        assert_eq!(code, if can_lift { 0 } else { 3 }, "exit code");
        if can_lift {
            assert_eq!(std::fs::metadata(&img).unwrap().len(), (1 << 20) + 4096);
        }
    }

    /// The wrapper must exec QEMU as soon as the service process is ready,
    /// while that process goes on serving (the bug the real-Xen bed found:
    /// the wrapper waited for the pipe's end of file, i.e. for the
    /// service process to exit, and libxl timed out waiting for QEMU).
    #[test]
    fn ready_returns_while_the_service_runs() {
        let t0 = std::time::Instant::now();
        let pid = start_service(7, &[], |domid, ready| {
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
