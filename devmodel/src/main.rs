//! `xen-usb-dm --config FILE`: serve one USB host controller.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// USB host controller device model (xHCI) for Xen HVM guests and
/// vfio-user clients such as QEMU.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (see xen-dm.toml).
    #[arg(long, short)]
    config: PathBuf,
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
    let cfg = match devmodel::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xen-usb-dm: {e}");
            return ExitCode::from(2);
        }
    };
    match devmodel::run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xen-usb-dm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
