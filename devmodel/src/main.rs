//! `xen-usb-dm --config FILE`: serve one USB host controller.
//! `xen-usb-dm --config FILE --wrap QEMU -- ARGS...`: libxl's
//! `device_model_override` (see `devmodel::wrap`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;

/// Set by SIGTERM/SIGINT; the event loop checks it after every wake-up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        // No SA_RESTART: epoll_wait returns EINTR and the loop sees STOP.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// USB host controller device model (xHCI) for Xen HVM guests and
/// vfio-user clients such as QEMU.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (see xen-dm.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Run as libxl's device_model_override: serve the domain named by
    /// `-xen-domid` in ARGS, then exec this QEMU with ARGS unchanged.
    #[arg(long, value_name = "QEMU")]
    wrap: Option<PathBuf>,
    /// The device model arguments (after `--`), for --wrap.
    #[arg(last = true, value_name = "ARGS")]
    qemu_args: Vec<OsString>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XEN_USB_DM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    install_signal_handlers();
    if let Some(qemu) = &args.wrap {
        // Runs only if the exec of QEMU (or our set-up) failed.
        let e = devmodel::wrap::run(qemu, &args.qemu_args, |domid, ready| {
            let mut cfg = devmodel::Config::load(&args.config)?;
            let r = devmodel::wrap::qemu_restrict(&args.qemu_args);
            devmodel::wrap::apply_qemu_restrict(&mut cfg.transport, &r)?;
            devmodel::run_xen(&cfg, Some(domid), ready, || STOP.load(Ordering::Relaxed))
        });
        if let Err(e) = e {
            eprintln!("xen-usb-dm: {e:#}");
        }
        return ExitCode::FAILURE;
    }
    if !args.qemu_args.is_empty() {
        eprintln!("xen-usb-dm: arguments after -- are only for --wrap");
        return ExitCode::from(2);
    }
    let cfg = match devmodel::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xen-usb-dm: {e}");
            return ExitCode::from(2);
        }
    };
    match devmodel::run(&cfg, || STOP.load(Ordering::Relaxed)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xen-usb-dm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
