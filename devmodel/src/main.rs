//! `xen-usb-dm --config FILE`: serve one USB host controller.
//! `xen-usb-dm --config FILE --wrap QEMU -- ARGS...`: libxl's
//! `device_model_override` (see `devmodel::wrap`).
//! `xen-usb-dm ctl|list|check ...`: the control-socket client and the
//! admin subcommands (see `--help`).

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

/// USB host controller device model (xHCI, EHCI, UHCI) for Xen HVM guests
/// and vfio-user clients such as QEMU.
#[derive(Debug, Parser)]
#[command(name = "xen-usb-dm", version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Configuration file (see xen-dm.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Run as libxl's device_model_override: serve the domain named by
    /// `-xen-domid` in ARGS, then exec this QEMU with ARGS unchanged.
    #[arg(long, value_name = "QEMU")]
    wrap: Option<PathBuf>,
    /// The device model arguments (after `--`), for --wrap.
    #[arg(last = true, value_name = "ARGS")]
    qemu_args: Vec<OsString>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Talk to a running device model's control socket (`[control] socket`).
    ///
    /// Examples:
    ///   xen-usb-dm ctl /run/xen-usb-dm/g1.ctl query-usb
    ///   xen-usb-dm ctl /run/xen-usb-dm/g1.ctl device_add id=s1 kind=storage image=/srv/x.img
    ///   xen-usb-dm ctl /run/xen-usb-dm/g1.ctl device_add id=k kind=host vendor=0x046d product=0xc52b
    ///   xen-usb-dm ctl /run/xen-usb-dm/g1.ctl device_del s1
    ///   xen-usb-dm ctl /run/xen-usb-dm/g1.ctl send-key ctrl-alt-delete
    ///   xen-usb-dm ctl --json /run/xen-usb-dm/g1.ctl query-status
    ///   xen-usb-dm ctl /run/xen-usb-dm/g1.ctl execute input-send-event '{"events": [...]}'
    #[command(verbatim_doc_comment)]
    Ctl {
        /// Print the server's JSON answer instead of text.
        #[arg(long)]
        json: bool,
        /// send-key: how long the keys stay down (ms; default 100).
        #[arg(long, value_name = "MS")]
        hold: Option<u64>,
        /// The control socket.
        socket: PathBuf,
        /// query-usb, query-status, device_add KEY=VALUE..., device_del ID, send-key KEYS, quit,
        /// or execute NAME [ARGUMENTS-JSON].
        command: String,
        /// The command's arguments.
        args: Vec<String>,
    },
    /// List the host's USB devices (like `lsusb -t`), with what passthrough
    /// rules match on: bus/addr, port path, vid:pid, serial, speed, strings,
    /// interfaces and their kernel drivers, whether the usbfs node can be
    /// opened; with --config, which `[[device]] kind = "host"` rule takes
    /// each device, and rules that match none or several.
    ///
    /// Examples:
    ///   xen-usb-dm list
    ///   xen-usb-dm list --config /etc/xen-usb-dm/g1.toml
    ///   xen-usb-dm list --json | jq '.devices[] | select(.vendor == "46f4")'
    #[command(verbatim_doc_comment)]
    List {
        /// A configuration whose host-device rules to match.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON: {"devices": [...], "rules": [...]}.
        #[arg(long)]
        json: bool,
        /// sysfs USB device directory (default /sys/bus/usb/devices).
        #[arg(long, value_name = "DIR", hide = true)]
        sysfs: Option<PathBuf>,
        /// usbfs directory (default /dev/bus/usb).
        #[arg(long, value_name = "DIR", hide = true)]
        devfs: Option<PathBuf>,
    },
    /// Write the man pages (`man`) or shell completions (`completions`)
    /// into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        /// man or completions.
        what: String,
        /// Output directory.
        dir: PathBuf,
    },
    /// Check a configuration without starting anything: keys, images,
    /// speeds and options as start-up validates them, socket directories,
    /// host devices present, unambiguous and openable (also by
    /// transport.uid). One line per problem, naming the key; exit 0 when
    /// all is well, 2 otherwise.
    ///
    /// Examples:
    ///   xen-usb-dm check --config /etc/xen-usb-dm/g1.toml
    ///   xen-usb-dm check -c xen-dm.toml && xen-usb-dm -c xen-dm.toml
    #[command(verbatim_doc_comment)]
    Check {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// sysfs USB device directory (default /sys/bus/usb/devices).
        #[arg(long, value_name = "DIR", hide = true)]
        sysfs: Option<PathBuf>,
        /// usbfs directory (default /dev/bus/usb).
        #[arg(long, value_name = "DIR", hide = true)]
        devfs: Option<PathBuf>,
    },
}

/// `xen-usb-dm generate man|completions DIR`: the man pages (one per
/// command, section 8) or the bash, zsh and fish completions, for packages.
fn generate(what: &str, dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Args::command().name("xen-usb-dm").bin_name("xen-usb-dm");
    match what {
        "man" => {
            let mut pages = vec![("xen-usb-dm".to_string(), cmd.clone())];
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let name = format!("xen-usb-dm-{}", sub.get_name());
                // (clap names are &'static str; this runs once, at packaging)
                let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
                pages.push((name, sub.clone().name(static_name)));
            }
            for (name, c) in pages {
                let mut out = Vec::new();
                clap_mangen::Man::new(c).section("8").render(&mut out)?;
                std::fs::write(dir.join(format!("{name}.8")), out)?;
            }
            Ok(())
        }
        "completions" => {
            use clap_complete::{generate_to, Shell};
            for sh in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let path = generate_to(sh, &mut cmd.clone(), "xen-usb-dm", dir)?;
                if sh == Shell::Bash {
                    std::fs::rename(&path, dir.join("xen-usb-dm.bash"))?;
                }
            }
            Ok(())
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{other}: not man or completions"),
        )),
    }
}

fn host_paths(sysfs: &Option<PathBuf>, devfs: &Option<PathBuf>) -> devmodel::admin::HostPaths {
    let mut p = devmodel::admin::HostPaths::default();
    if let Some(s) = sysfs {
        p.sysfs = s.clone();
    }
    if let Some(d) = devfs {
        p.devfs = d.clone();
    }
    p
}

/// `xen-usb-dm ctl`: exit 0 on success, 1 on an error answer, 2 on a
/// usage or connection problem.
fn ctl(
    json: bool,
    hold: Option<u64>,
    socket: &std::path::Path,
    command: &str,
    args: &[String],
) -> ExitCode {
    use devmodel::ctl::{call, human, request, CtlError};
    let r = request(command, args, hold).and_then(|req| call(socket, &req));
    match r {
        Ok(v) if json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            print!("{}", human(command, &v));
            ExitCode::SUCCESS
        }
        Err(e @ CtlError::Remote { .. }) => {
            eprintln!("xen-usb-dm ctl: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("xen-usb-dm ctl: {}: {e}", socket.display());
            ExitCode::from(2)
        }
    }
}

/// Logging to stderr, filtered by `XEN_USB_DM_LOG` (default `info`), in
/// the format `XEN_USB_DM_LOG_FORMAT` names: `json` (one object a line),
/// `plain` (no colour, no timestamp: what journald and libxl's log files
/// want), `full` (timestamps; colour only on a terminal, and not with
/// `NO_COLOR`). Unset: `plain` under systemd (`JOURNAL_STREAM`), else
/// `full`.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("XEN_USB_DM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let asked = std::env::var("XEN_USB_DM_LOG_FORMAT").unwrap_or_default();
    let format = match asked.as_str() {
        "" if std::env::var_os("JOURNAL_STREAM").is_some() => "plain",
        "" => "full",
        f => f,
    };
    match format {
        "json" => b.json().init(),
        "plain" => b.with_ansi(false).without_time().init(),
        _ => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            b.with_ansi(colour).init();
        }
    }
    if !matches!(format, "json" | "plain" | "full") {
        // Once, at start-up, from our own environment: no guest repeats it.
        tracing::event!(
            tracing::Level::WARN,
            "XEN_USB_DM_LOG_FORMAT={asked:?}: not json, plain or full; using full"
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Cmd::Ctl {
        json,
        hold,
        socket,
        command,
        args,
    }) = &args.cmd
    {
        return ctl(*json, *hold, socket, command, args);
    }
    match &args.cmd {
        Some(Cmd::List {
            config,
            json,
            sysfs,
            devfs,
        }) => {
            let cfg = match config.as_deref().map(devmodel::Config::load).transpose() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("xen-usb-dm list: {e}");
                    return ExitCode::from(2);
                }
            };
            let paths = host_paths(sysfs, devfs);
            print!(
                "{}",
                devmodel::admin::list_report(&paths, cfg.as_ref(), *json)
            );
            return ExitCode::SUCCESS;
        }
        Some(Cmd::Check {
            config,
            sysfs,
            devfs,
        }) => {
            let problems = devmodel::admin::check(config, &host_paths(sysfs, devfs));
            if problems.is_empty() {
                println!("{}: ok", config.display());
                return ExitCode::SUCCESS;
            }
            for p in &problems {
                println!("{}: {}: {}", config.display(), p.key, p.msg);
            }
            return ExitCode::from(2);
        }
        Some(Cmd::Generate { what, dir }) => {
            return match generate(what, dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xen-usb-dm generate: {e}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
    }
    let Some(config) = args.config.clone() else {
        eprintln!("xen-usb-dm: --config FILE is required (or a subcommand: see --help)");
        return ExitCode::from(2);
    };
    init_logging();
    install_signal_handlers();
    if let Some(qemu) = &args.wrap {
        // Runs only if the exec of QEMU (or our set-up) failed.
        let e = devmodel::wrap::run(qemu, &args.qemu_args, |domid, qmp, ready| {
            let mut cfg = devmodel::Config::load(&config)?;
            let r = devmodel::wrap::qemu_restrict(&args.qemu_args);
            devmodel::wrap::apply_qemu_restrict(&mut cfg.transport, &r)?;
            devmodel::run_wrapped(&cfg, domid, qmp, ready, || STOP.load(Ordering::Relaxed))
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
    let cfg = match devmodel::Config::load(&config) {
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
