//! `xen-usb-dm ctl` against a running `xen-usb-dm` (vfio-user transport, a
//! UHCI with a stick and a keyboard, a control socket): text and JSON
//! output, an error answer's exit status, `quit` stopping the server.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xen-usb-dm"))
}

fn ctl(sock: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    // Options first (--json, --hold MS), then the socket, then the command.
    let n = match args.first() {
        Some(&"--json") => 1,
        Some(&"--hold") => 2,
        _ => 0,
    };
    let out = bin()
        .arg("ctl")
        .args(&args[..n])
        .arg(sock)
        .args(&args[n..])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctl_talks_to_a_running_device_model() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dm.sock");
    let ctl_sock = dir.path().join("ctl.sock");
    let img = dir.path().join("s.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let cfg = dir.path().join("xen-dm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[controller]\nmodel = \"uhci\"\n[transport]\nkind = \"vfio-user\"\nsocket = \"{}\"\n\
             [[device]]\nkind = \"storage\"\nimage = \"{}\"\n[[device]]\nkind = \"keyboard\"\n\
             [control]\nsocket = \"{}\"\n",
            sock.display(),
            img.display(),
            ctl_sock.display()
        ),
    )
    .unwrap();
    /// Kills the device model if the test fails before `quit`.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(
        bin()
            .arg("--config")
            .arg(&cfg)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !ctl_sock.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rc, out, err) = ctl(&ctl_sock, &["query-usb"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.starts_with("controller: uhci\n"), "{out}");
    // (with each device's id: device[N] for the configuration's)
    assert!(out.contains("port 1: device[0]: storage"), "{out}");
    assert!(out.contains("port 2: device[1]: keyboard"), "{out}");
    let (rc, out, _) = ctl(&ctl_sock, &["--json", "query-status"]);
    assert_eq!(rc, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["running"], true);
    let (rc, out, _) = ctl(&ctl_sock, &["--hold", "10", "send-key", "ctrl-alt-delete"]);
    assert_eq!((rc, out.as_str()), (0, "ok\n"));
    let (rc, _, err) = ctl(&ctl_sock, &["send-key", "ctrl-nosuchkey"]);
    assert_eq!(rc, 1, "an error answer: {err}");
    assert!(err.contains("unknown qcode"), "{err}");
    let (rc, _, err) = ctl(&ctl_sock, &["frobnicate"]);
    assert_eq!(rc, 2, "{err}");
    // Hot-plug from the command line: both UHCI ports are taken (refused,
    // exit 1), the keyboard unplugged, a second stick on its port.
    let image = format!("image={}", img.display());
    let (rc, _, err) = ctl(&ctl_sock, &["device_add", "id=s2", "kind=storage", &image]);
    assert_eq!(rc, 1, "no free port: {err}");
    let (rc, out, err) = ctl(&ctl_sock, &["device_del", "device[1]"]);
    assert_eq!((rc, out.as_str()), (0, "ok\n"), "{err}");
    let (rc, out, err) = ctl(
        &ctl_sock,
        &[
            "device_add",
            "id=s2",
            "kind=storage",
            &image,
            "readonly=true",
        ],
    );
    assert_eq!(
        (rc, out.as_str()),
        (0, "s2: plugged in at port 2\n"),
        "{err}"
    );
    let (rc, out, _) = ctl(&ctl_sock, &["query-usb"]);
    assert!(out.contains("port 2: s2: storage s.img"), "{out}");
    let (rc2, _, err) = ctl(&ctl_sock, &["device_add", "kind=storage", &image]);
    assert_eq!((rc, rc2), (0, 1), "no id: {err}");
    assert!(err.contains("'id'"), "{err}");
    let (rc, out, _) = ctl(&ctl_sock, &["quit"]);
    assert_eq!((rc, out.as_str()), (0, "ok\n"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "quit stops the device model: {status:?}"
    );
    assert!(!ctl_sock.exists() && !sock.exists(), "sockets removed");
}
