//! libxl's QMP socket, interposed in wrapper mode: xl's own USB
//! configuration (`usbctrl`, `usbdev`) and commands (`xl usbdev-attach`,
//! `usbdev-detach`) are served by us, everything else reaches QEMU
//! unchanged. [`interpose`] rewires the device model's arguments before
//! QEMU starts; [`proxy::Proxy`] is the service process's side.
//!
//! libxl passes its monitor as `-chardev socket,id=libxl-cmd,path=P,...`
//! (QEMU listens on P) or, under `dm_restrict=1`, as `fd=N` (libxl listens
//! and passes the socket). Either way QEMU gets a private listening
//! socket instead (`fd=`; in the `fd=` form on the same descriptor
//! number, so its arguments do not change), which we have already
//! connected to — and then unlinked, so nobody else can — and we listen
//! where libxl expects: on P, or on libxl's own socket.

pub mod proxy;
pub mod usb;
pub mod wire;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use anyhow::{bail, Context};

/// libxl's chardev id for its monitor.
pub const LIBXL_CHARDEV: &str = "libxl-cmd";

/// The service process's ends: where libxl connects, and the connection
/// to QEMU's private monitor socket.
#[derive(Debug)]
pub struct Interposed {
    /// Listening where libxl connects.
    pub libxl: UnixListener,
    /// Connected to QEMU's monitor (QEMU accepts it when it starts).
    pub qemu: UnixStream,
}

/// QEMU's end, put in place in the process that execs QEMU.
#[derive(Debug)]
pub struct QemuSide {
    listener: OwnedFd,
    /// The `fd=N` form: the private socket goes onto N.
    onto: Option<RawFd>,
}

impl QemuSide {
    /// Puts QEMU's private socket where its arguments say (call in the
    /// process about to exec QEMU, after the service process forked).
    pub fn install(self) -> anyhow::Result<()> {
        let fd = self.listener.as_raw_fd();
        match self.onto {
            Some(n) => {
                // SAFETY: dup2 onto libxl's descriptor number, which this
                // process owns (its copy of libxl's socket is replaced);
                // the result has no FD_CLOEXEC, so QEMU inherits it.
                if unsafe { libc::dup2(fd, n) } < 0 {
                    return Err(std::io::Error::last_os_error()).context("dup2 QMP socket");
                }
            }
            None => {
                // SAFETY: clearing FD_CLOEXEC on a descriptor we own, so
                // the exec'd QEMU inherits it; it is leaked on purpose.
                unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
                std::mem::forget(self.listener);
            }
        }
        Ok(())
    }
}

/// Where libxl's monitor is in the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibxlMonitor {
    /// `path=P`: QEMU would listen on P.
    Path {
        /// Index of the `-chardev` value in the arguments.
        arg: usize,
        /// P.
        path: PathBuf,
    },
    /// `fd=N`: libxl's listening socket (dm_restrict).
    Fd {
        /// N.
        fd: RawFd,
    },
}

/// Finds libxl's monitor chardev.
pub fn find_monitor(args: &[OsString]) -> anyhow::Result<Option<LibxlMonitor>> {
    for (i, a) in args.iter().enumerate() {
        if a != "-chardev" {
            continue;
        }
        let Some(v) = args.get(i + 1).and_then(|v| v.to_str()) else {
            continue;
        };
        let opts: Vec<&str> = v.split(',').collect();
        if opts.first() != Some(&"socket") || !opts.contains(&"id=libxl-cmd") {
            continue;
        }
        for o in &opts[1..] {
            if let Some(p) = o.strip_prefix("path=") {
                return Ok(Some(LibxlMonitor::Path {
                    arg: i + 1,
                    path: p.into(),
                }));
            }
            if let Some(n) = o.strip_prefix("fd=") {
                let fd = n
                    .parse()
                    .with_context(|| format!("-chardev {v}: fd is not a number"))?;
                return Ok(Some(LibxlMonitor::Fd { fd }));
            }
        }
        bail!("-chardev {v}: neither path= nor fd=");
    }
    Ok(None)
}

/// A listening socket only we can reach: bound in a fresh private
/// directory, connected to, then unlinked. Returns it and the connection.
fn private_socket() -> anyhow::Result<(UnixListener, UnixStream)> {
    let mut tmpl = *b"/tmp/xen-usb-dm-qmp.XXXXXX\0";
    // SAFETY: mkdtemp rewrites the template in place (a NUL-terminated
    // buffer of ours) and creates the directory with mode 0700.
    let p = unsafe { libc::mkdtemp(tmpl.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(std::io::Error::last_os_error()).context("mkdtemp for QEMU's QMP socket");
    }
    let dir = PathBuf::from(std::str::from_utf8(&tmpl[..tmpl.len() - 1]).unwrap_or("/tmp"));
    let path = dir.join("qmp");
    let r = (|| {
        let l = UnixListener::bind(&path).context("bind QEMU's QMP socket")?;
        let c = UnixStream::connect(&path).context("connect QEMU's QMP socket")?;
        Ok((l, c))
    })();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    r
}

/// Interposes on libxl's monitor in `args` (rewritten in the `path=`
/// form). `None` when the arguments have no libxl monitor.
pub fn interpose(args: &mut [OsString]) -> anyhow::Result<Option<(Interposed, QemuSide)>> {
    let Some(mon) = find_monitor(args)? else {
        return Ok(None);
    };
    let (private, qemu) = private_socket()?;
    let (libxl, onto) = match mon {
        LibxlMonitor::Path { arg, path } => {
            // As QEMU would: a stale socket of an earlier domain goes.
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)
                .with_context(|| format!("listening on libxl's QMP socket {}", path.display()))?;
            let v = args[arg].to_string_lossy().into_owned();
            let rewritten: Vec<String> = v
                .split(',')
                .map(|o| {
                    if o.starts_with("path=") {
                        format!("fd={}", private.as_raw_fd())
                    } else {
                        o.to_owned()
                    }
                })
                .collect();
            args[arg] = rewritten.join(",").into();
            (l, None)
        }
        LibxlMonitor::Fd { fd } => {
            // SAFETY: F_DUPFD_CLOEXEC on the descriptor libxl passed; the
            // copy is ours alone.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if dup < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("libxl's QMP socket fd={fd}"));
            }
            // SAFETY: `dup` was just created and is owned only here.
            let l = UnixListener::from(unsafe { OwnedFd::from_raw_fd(dup) });
            (l, Some(fd))
        }
    };
    Ok(Some((
        Interposed { libxl, qemu },
        QemuSide {
            listener: private.into(),
            onto,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn both_forms_of_libxls_monitor_are_found() {
        let a = args(&[
            "-xen-domid",
            "3",
            "-chardev",
            "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-3,server=on,wait=off",
            "-mon",
            "chardev=libxl-cmd,mode=control",
            "-chardev",
            "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-3,server=on,wait=off",
        ]);
        assert_eq!(
            find_monitor(&a).unwrap(),
            Some(LibxlMonitor::Path {
                arg: 3,
                path: "/var/run/xen/qmp-libxl-3".into()
            })
        );
        let a = args(&["-chardev", "socket,id=libxl-cmd,fd=9,server=on,wait=off"]);
        assert_eq!(find_monitor(&a).unwrap(), Some(LibxlMonitor::Fd { fd: 9 }));
        // Older libxl: server,nowait.
        let a = args(&["-chardev", "socket,id=libxl-cmd,path=/x,server,nowait"]);
        assert!(matches!(
            find_monitor(&a).unwrap(),
            Some(LibxlMonitor::Path { .. })
        ));
        assert_eq!(
            find_monitor(&args(&["-chardev", "socket,id=other,path=/x"])).unwrap(),
            None
        );
        assert!(find_monitor(&args(&["-chardev", "socket,id=libxl-cmd,fd=x"])).is_err());
        assert!(find_monitor(&args(&["-chardev", "socket,id=libxl-cmd"])).is_err());
    }

    #[test]
    fn the_path_form_is_rewritten_to_a_private_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qmp-libxl-3");
        std::fs::write(&p, b"stale").unwrap();
        let mut a = args(&[
            "-chardev",
            &format!(
                "socket,id=libxl-cmd,path={},server=on,wait=off",
                p.display()
            ),
        ]);
        let (ip, side) = interpose(&mut a).unwrap().unwrap();
        let v = a[1].to_str().unwrap().to_owned();
        assert!(v.starts_with("socket,id=libxl-cmd,fd="), "{v}");
        assert!(v.ends_with(",server=on,wait=off"), "{v}");
        let n: RawFd = v.split(',').nth(2).unwrap()[3..].parse().unwrap();
        assert_eq!(n, side.listener.as_raw_fd());
        // libxl reaches us at its path.
        let _c = UnixStream::connect(&p).unwrap();
        assert!(ip.libxl.accept().is_ok());
        // QEMU's socket already holds our connection and nobody else's.
        let q = UnixListener::from(side.listener);
        let (mut s, _) = q.accept().unwrap();
        use std::io::{Read, Write};
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        let mut qemu = ip.qemu;
        qemu.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }
}

#[cfg(test)]
mod proxy_tests;
