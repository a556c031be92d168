//! `xen-usb-dm list` and `xen-usb-dm check` as an admin runs them: exit
//! statuses, one line per problem, `--json` that parses, `--help` with
//! examples. (The logic itself is unit-tested in `devmodel::admin` against
//! fixture sysfs trees; the passthrough VM runs `list` on a real usbfs.)

use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xen-usb-dm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(t: &Path) {
    let d = t.join("sys/3-2");
    std::fs::create_dir_all(&d).unwrap();
    for (k, v) in [
        ("busnum", "3"),
        ("devnum", "4"),
        ("idVendor", "0627"),
        ("idProduct", "0001"),
        ("speed", "12"),
        ("product", "QEMU USB Keyboard"),
    ] {
        std::fs::write(d.join(k), format!("{v}\n")).unwrap();
    }
    std::fs::create_dir_all(t.join("dev")).unwrap();
}

#[test]
fn list_prints_text_and_json_and_check_exits_by_the_problems() {
    let t = tempfile::tempdir().unwrap();
    fixture(t.path());
    let sys = t.path().join("sys");
    let dev = t.path().join("dev");
    let (sys, dev) = (sys.to_str().unwrap(), dev.to_str().unwrap());
    let (rc, out, _) = run(&["list", "--sysfs", sys, "--devfs", dev]);
    assert_eq!(rc, 0);
    assert!(
        out.contains("3-2 addr 004 0627:0001 full \"QEMU USB Keyboard\""),
        "{out}"
    );
    assert!(out.contains("cannot be opened read-write"), "{out}");
    let (rc, out, _) = run(&["list", "--json", "--sysfs", sys, "--devfs", dev]);
    assert_eq!(rc, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["devices"][0]["product"], "0001");
    assert_eq!(v["devices"][0]["openable"], false);

    let img = t.path().join("s.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let cfg = t.path().join("c.toml");
    let write = |devices: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[controller]\nmodel = \"xhci\"\n[transport]\nkind = \"vfio-user\"\nsocket = \"{}\"\n{devices}",
                t.path().join("dm.sock").display()
            ),
        )
        .unwrap()
    };
    write("[[device]]\nkind = \"storage\"\nimage = \"s.img\"\n");
    let c = cfg.to_str().unwrap();
    let (rc, out, _) = run(&["check", "-c", c, "--sysfs", sys, "--devfs", dev]);
    assert_eq!((rc, out.trim()), (0, format!("{c}: ok").as_str()));
    write(
        "[[device]]\nkind = \"storage\"\nimage = \"s.img\"\nspeed = \"full\"\nuas = true\n\
         [[device]]\nkind = \"host\"\nvendor = 0x0627\nproduct = 1\n",
    );
    let (rc, out, _) = run(&["check", "-c", c, "--sysfs", sys, "--devfs", dev]);
    assert_eq!(rc, 2, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(&format!("{c}: device[0]")), "{out}");
    assert!(
        lines[1].starts_with(&format!(
            "{c}: device[1]: host 0627:0001: {dev}/003/004 cannot be opened"
        )),
        "{out}"
    );
    // list --config with that rule names it.
    let (rc, out, _) = run(&["list", "-c", c, "--sysfs", sys, "--devfs", dev]);
    assert_eq!(rc, 0);
    assert!(
        out.contains("<- device[1]") && out.contains("device[1] (0627:0001): takes 3-2"),
        "{out}"
    );
}

#[test]
fn help_shows_the_subcommands_with_examples() {
    let (rc, out, _) = run(&["--help"]);
    assert_eq!(rc, 0);
    for s in ["ctl", "list", "check"] {
        assert!(out.contains(s), "{s} missing from --help:\n{out}");
    }
    for (sub, example) in [
        ("list", "xen-usb-dm list --config"),
        ("check", "xen-usb-dm check --config"),
    ] {
        let (rc, out, _) = run(&[sub, "--help"]);
        assert_eq!(rc, 0);
        assert!(out.contains(example), "{sub} --help:\n{out}");
    }
}
