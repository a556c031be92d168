//! The log format as deployments see it: no ANSI colour escapes when stderr
//! is not a terminal (libxl's qemu-dm-NAME.log, journald), plain lines
//! under systemd, and one JSON object per line with
//! XEN_USB_DM_LOG_FORMAT=json.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts xen-usb-dm on a vfio-user socket with `env`, waits for it to be
/// ready, stops it with SIGTERM, returns what it logged.
fn log_of(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dm.sock");
    let img = dir.path().join("s.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let cfg = dir.path().join("xen-dm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[controller]\nmodel = \"uhci\"\n[transport]\nkind = \"vfio-user\"\nsocket = \"{}\"\n\
             [[device]]\nkind = \"storage\"\nimage = \"{}\"\n",
            sock.display(),
            img.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xen-usb-dm"));
    cmd.arg("--config")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    cmd.env_remove("JOURNAL_STREAM")
        .env_remove("XEN_USB_DM_LOG_FORMAT")
        .env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sock.exists(), "xen-usb-dm did not come up");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn no_colour_escapes_when_not_a_terminal() {
    let log = log_of(&[]);
    assert!(log.contains("served over vfio-user"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file: {log:?}"
    );
    // Timestamps stay in the default format.
    assert!(
        log.lines().next().is_some_and(|l| l.starts_with("20")),
        "{log}"
    );
}

#[test]
fn plain_lines_under_systemd() {
    let log = log_of(&[("JOURNAL_STREAM", "8:1234")]);
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.trim_start().starts_with("INFO"),
        "no timestamp for journald: {first:?}"
    );
    assert!(!log.contains('\u{1b}'));
}

#[test]
fn json_lines_on_request() {
    let log = log_of(&[("XEN_USB_DM_LOG_FORMAT", "json")]);
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{v}");
        n += 1;
    }
    assert!(n >= 2, "{log}");
    let bad = log_of(&[("XEN_USB_DM_LOG_FORMAT", "xml")]);
    assert!(bad.contains("not json, plain or full"), "{bad}");
}
