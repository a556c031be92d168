//! Whether Xen's C headers (Debian's `libxen-dev`) are installed: the Xen
//! ABI test (`tests/xen_abi.rs`) compiles a C program against them and is
//! built only with `cfg(xen_headers)`. Without them a plain `cargo test`
//! says so in a cargo warning, and the README's test command
//! (`XEN_USB_DM_REQUIRE_XEN_HEADERS=1`, set by scripts/test.sh) refuses to
//! build: there the check can never be skipped quietly.

use std::path::Path;

/// The headers the test includes that only libxen-dev provides.
const HEADERS: &[&str] = &[
    "xen/xen.h",
    "xen/hvm/dm_op.h",
    "xen/hvm/ioreq.h",
    "xen/sys/privcmd.h",
    "xen/sys/evtchn.h",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(xen_headers)");
    println!("cargo::rerun-if-env-changed=XEN_USB_DM_REQUIRE_XEN_HEADERS");
    println!("cargo::rerun-if-env-changed=XEN_INCLUDE_DIR");
    println!("cargo::rerun-if-changed=build.rs");
    let dir = std::env::var("XEN_INCLUDE_DIR").unwrap_or_else(|_| "/usr/include".into());
    let missing: Vec<&str> = HEADERS
        .iter()
        .copied()
        .filter(|h| !Path::new(&dir).join(h).exists())
        .collect();
    for h in HEADERS {
        println!("cargo::rerun-if-changed={dir}/{h}");
    }
    if missing.is_empty() {
        println!("cargo::rustc-cfg=xen_headers");
        return;
    }
    let what = format!(
        "Xen's headers are missing under {dir} ({}): the Xen ABI test (devmodel/tests/xen_abi.rs) \
         is not built. Install them with `apt-get install libxen-dev` (scripts/setup.sh does).",
        missing.join(", ")
    );
    if std::env::var("XEN_USB_DM_REQUIRE_XEN_HEADERS").as_deref() == Ok("1") {
        panic!("{what} XEN_USB_DM_REQUIRE_XEN_HEADERS=1: the test command needs them.");
    }
    println!("cargo::warning={what}");
}
