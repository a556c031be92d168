//! `--wrap` with libxl's monitor interposed, against a real QEMU (the
//! host's qemu-system-x86_64 behind a stand-in that drops `-xen-domid`,
//! which only Xen builds accept): libxl's side sees QEMU's own greeting
//! and replies, in both of libxl's forms (`path=`, and `fd=` as under
//! dm_restrict); xl's USB commands are ours (here, without Xen, creating
//! a controller fails with our error, not QEMU's); and when QEMU quits,
//! the service process ends too.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn stand_in(dir: &Path) -> PathBuf {
    let q = dir.join("qemu");
    std::fs::write(
        &q,
        "#!/bin/sh\n[ \"$1\" = -xen-domid ] && shift 2\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    let mut p = std::fs::metadata(&q).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(&q, p).unwrap();
    q
}

fn wrapper(dir: &Path, chardev: &str, pass_fd: Option<&UnixListener>) -> Child {
    let cfg = dir.join("xen-dm.toml");
    std::fs::write(&cfg, "[transport]\nkind = \"xen\"\n").unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_xen-usb-dm"));
    c.arg("--config")
        .arg(&cfg)
        .arg("--wrap")
        .arg(stand_in(dir))
        .args([
            "--",
            "-xen-domid",
            "5",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-chardev",
            chardev,
            "-mon",
            "chardev=libxl-cmd,mode=control",
        ])
        .env("XEN_USB_DM_LOG", "debug")
        .stderr(std::fs::File::create(dir.join("log")).unwrap());
    if let Some(l) = pass_fd {
        let fd = l.as_raw_fd();
        // SAFETY: only dup2 between fork and exec (async-signal-safe).
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(fd, 9) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.spawn().unwrap()
}

struct Libxl {
    s: UnixStream,
    r: BufReader<UnixStream>,
}

impl Libxl {
    fn connect(path: &Path) -> Self {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self {
            r: BufReader::new(s.try_clone().unwrap()),
            s,
        }
    }
    fn msg(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "{l:?}");
        serde_json::from_str(&l).unwrap()
    }
    #[allow(clippy::needless_pass_by_value)]
    fn cmd(&mut self, v: Value) -> Value {
        let mut b = serde_json::to_vec(&v).unwrap();
        b.extend_from_slice(b"\r\n");
        self.s.write_all(&b).unwrap();
        loop {
            let m = self.msg();
            if m.get("event").is_none() {
                return m;
            }
        }
    }
}

/// Processes (not zombies) whose command line mentions `needle`.
fn procs_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn session(dir: &Path, sock: &Path, mut child: Child) {
    let mut c = Libxl::connect(sock);
    let g = c.msg();
    assert!(
        g["QMP"]["version"]["qemu"]["major"].as_u64().is_some(),
        "QEMU's own greeting: {g}"
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "id": 0x786c7100u32})),
        json!({"return": {}, "id": 0x786c7100u32})
    );
    let r = c.cmd(json!({"execute": "query-status", "id": 0x786c7101u32}));
    assert_eq!(r["return"]["status"], "prelaunch", "{r}");
    assert_eq!(r["id"], 0x786c7101u32);
    let r = c.cmd(json!({"execute": "no-such-command", "id": 2}));
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    // usbctrl: served by us (no Xen here: our error, not QEMU's).
    let r = c.cmd(json!({"execute": "device_add", "id": 3,
        "arguments": {"driver": "nec-usb-xhci", "id": "xenusb-0", "p2": 8, "p3": 8}}));
    let desc = r["error"]["desc"].as_str().unwrap_or_default().to_owned();
    assert!(desc.starts_with("xen-usb-dm: "), "{r}");
    assert_eq!(r["id"], 3);
    drop(c);
    // A new connection per operation, as libxl does.
    let mut c = Libxl::connect(sock);
    c.msg();
    c.cmd(json!({"execute": "qmp_capabilities", "id": 4}));
    let r = c.cmd(json!({"execute": "quit", "id": 5}));
    assert_eq!(r, json!({"return": {}, "id": 5}));
    let st = child.wait().unwrap();
    assert!(st.success(), "QEMU: {st:?}");
    let t0 = Instant::now();
    let needle = dir.to_string_lossy().into_owned();
    while !procs_with(&needle).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the service process outlived QEMU: {:?}\n{}",
            procs_with(&needle),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    assert!(log.contains("serving xl's USB commands"), "{log}");
    assert!(log.contains("stopping (QemuGone)"), "{log}");
}

#[test]
fn libxls_path_form_is_interposed() {
    if !qemu_available() {
        eprintln!("SKIPPED: no qemu-system-x86_64 (scripts/setup.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp-libxl-5");
    let child = wrapper(
        dir.path(),
        &format!(
            "socket,id=libxl-cmd,path={},server=on,wait=off",
            sock.display()
        ),
        None,
    );
    session(dir.path(), &sock, child);
}

#[test]
fn libxls_fd_form_is_interposed() {
    if !qemu_available() {
        eprintln!("SKIPPED: no qemu-system-x86_64 (scripts/setup.sh installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp-libxl-5");
    // libxl__pre_open_qmp_socket: bound and listening before the spawn.
    let l = UnixListener::bind(&sock).unwrap();
    let child = wrapper(
        dir.path(),
        "socket,id=libxl-cmd,fd=9,server=on,wait=off",
        Some(&l),
    );
    drop(l);
    session(dir.path(), &sock, child);
}
