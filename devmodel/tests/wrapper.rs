//! `--wrap`: libxl's device_model_override, without Xen. The probe run must
//! reach the real QEMU with argv, environment and descriptors unchanged;
//! a real run on a machine without Xen must fail before QEMU starts.

use std::path::Path;
use std::process::Command;

/// A stand-in for qemu-system-i386 that records what it was given.
fn fake_qemu(dir: &Path) -> std::path::PathBuf {
    let q = dir.join("qemu");
    std::fs::write(
        &q,
        format!(
            "#!/bin/sh\n{{ for a in \"$@\"; do echo \"arg:$a\"; done; echo \"env:$LIBXL_TEST_VAR\"; \
             read line <&7 && echo \"fd7:$line\"; }} > {}/ran\nexit 0\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut p = std::fs::metadata(&q).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(&q, p).unwrap();
    q
}

fn config(dir: &Path) -> std::path::PathBuf {
    let c = dir.join("xen-dm.toml");
    std::fs::write(dir.join("stick.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(
        &c,
        "[controller]\nmodel = \"xhci\"\n[transport]\nkind = \"xen\"\npci = \"00:1e.0\"\n\
         [[device]]\nkind = \"storage\"\nimage = \"stick.img\"\n",
    )
    .unwrap();
    c
}

/// Runs the wrapper through a shell so that fd 7 is open (as libxl's QMP
/// socket would be) and an environment variable is set.
fn wrap(dir: &Path, args: &[&str]) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_xen-usb-dm");
    std::fs::write(dir.join("fd7"), "from-libxl\n").unwrap();
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 7<{}/fd7; exec {bin} --config {} --wrap {} -- {}",
            dir.display(),
            config(dir).display(),
            fake_qemu(dir).display(),
            quoted.join(" ")
        ))
        .env("LIBXL_TEST_VAR", "kept")
        .output()
        .unwrap()
}

#[test]
fn probe_is_passed_to_qemu_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "-S",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "-machine",
        "none,accel=xen",
        "-chardev",
        "socket,id=libxl-cmd,fd=7,server=on,wait=off",
        "an arg with spaces",
    ];
    let out = wrap(dir.path(), &args);
    assert!(out.status.success(), "{out:?}");
    let ran = std::fs::read_to_string(dir.path().join("ran")).expect("QEMU was not run");
    let mut want: Vec<String> = args.iter().map(|a| format!("arg:{a}")).collect();
    want.push("env:kept".into());
    want.push("fd7:from-libxl".into());
    assert_eq!(ran.lines().collect::<Vec<_>>(), want);
}

#[test]
fn real_run_without_xen_fails_before_qemu_starts() {
    if Path::new("/dev/xen/privcmd").exists() {
        return; // this test is about a machine without Xen
    }
    let dir = tempfile::tempdir().unwrap();
    let out = wrap(dir.path(), &["-xen-domid", "5", "-S", "-machine", "xenfv"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("domain 5") && err.contains("/dev/xen/privcmd"),
        "{err}"
    );
    assert!(
        !dir.path().join("ran").exists(),
        "QEMU must not run without our device"
    );
}

#[test]
fn bad_domid_argument_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = wrap(dir.path(), &["-xen-domid", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-xen-domid"), "{err}");
    assert!(!dir.path().join("ran").exists());
}
