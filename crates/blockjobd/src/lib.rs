//! blockjobd: the daemon around the QMP server — qemu-storage-daemon's command line, startup
//! (`--blockdev` nodes, monitors, pidfile, daemonizing), signals, and orderly shutdown.
//!
//! The binary's `main` is [`main_with`]: it takes the command line and a function that builds
//! the daemon's [`Services`] (command backend and shutdown hook) from the monitor's
//! [`Broadcast`] the backend's events go to.

pub mod backend;
pub mod cli;
pub mod keyval;
pub mod keyval_types;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use monitor::{Broadcast, Endpoint, MonitorServer, QmpBackend, ServerConfig};
use serde_json::{Map, Value};

use crate::cli::{Command, Options};

/// The socket served when blockjobd runs without options.
pub const DEFAULT_SOCKET: &str = "blockjobd.sock";

/// Called with a `--monitor`'s chardev id and QEMU's text for it.
pub type MonitorChardevHook = Box<dyn Fn(&str, &str) + Send + Sync>;

/// What the rest of the daemon plugs into the server.
pub struct Services {
    /// Executes every command except `qmp_capabilities` and `quit`.
    pub backend: Arc<dyn QmpBackend>,
    /// Runs once when the daemon stops (after `quit`, SIGTERM, SIGINT or SIGHUP, once the
    /// monitors are closed, and on a failed startup): the block layer flushes and closes its
    /// images here. An error (an image that could not be flushed) makes the exit status 1.
    pub on_shutdown: OnShutdown,
    /// Told of each `--monitor`'s chardev (id, QEMU's text for it) once it listens, so that
    /// `query-chardev` lists it and `chardev-remove` refuses it.
    pub monitor_chardev: Option<MonitorChardevHook>,
}

/// [`Services::on_shutdown`].
pub type OnShutdown = Box<dyn FnOnce() -> Result<(), String> + Send>;

impl Services {
    pub fn new(
        backend: Arc<dyn QmpBackend>,
        on_shutdown: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Self {
        Services {
            backend,
            on_shutdown: Box::new(on_shutdown),
            monitor_chardev: None,
        }
    }
}

/// The daemon as the `blockjobd` binary runs it: the process's command line, the block command
/// layer behind the monitor. Returns the exit code.
pub fn main() -> ExitCode {
    init_logging();
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(arg) => {
                eprintln!(
                    "{}: {}: argument is not valid UTF-8",
                    program(),
                    arg.to_string_lossy()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    main_with(&args, backend::block_services)
}

/// Log lines go to stderr: warnings and errors by default, `RUST_LOG` for more.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn program() -> &'static str {
    "blockjobd"
}

/// Run the daemon with `args` (without the program name). Returns the process exit code: 0
/// after an orderly shutdown, 1 on a command line or startup error, or when an image could
/// not be flushed and closed at shutdown (printed to stderr; qemu-storage-daemon 10.0 exits
/// 0 there, saying nothing).
pub fn main_with(args: &[String], build: impl FnOnce(Broadcast) -> Services) -> ExitCode {
    let options = if args.is_empty() {
        default_options()
    } else {
        match cli::parse(args) {
            Ok(Command::Run(options)) => options,
            Ok(Command::Help) => {
                print!("{}", cli::HELP);
                return ExitCode::SUCCESS;
            }
            Ok(Command::Version) => {
                println!(
                    "{} version {} (QMP drop-in for qemu-storage-daemon 10.0)",
                    program(),
                    env!("CARGO_PKG_VERSION")
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("{}: {e}", program());
                return ExitCode::FAILURE;
            }
        }
    };
    let announce = args.is_empty();

    // Fork before any thread exists; the parent waits for the child's startup verdict.
    let startup_pipe = if options.daemonize {
        match daemon::fork() {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("{}: cannot daemonize: {e}", program());
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", program());
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve(options, build, announce, startup_pipe));
    // A stdio monitor may still be blocked reading stdin; do not wait for it.
    runtime.shutdown_background();
    code
}

fn default_options() -> Options {
    Options {
        monitors: vec![(
            format!("--chardev socket,path={DEFAULT_SOCKET}"),
            Endpoint::Unix(PathBuf::from(DEFAULT_SOCKET)),
        )],
        monitor_chardevs: vec!["monitor0".to_string()],
        ..Options::default()
    }
}

async fn serve(
    options: Options,
    build: impl FnOnce(Broadcast) -> Services,
    announce: bool,
    startup_pipe: Option<daemon::StartupPipe>,
) -> ExitCode {
    // Installed first, so that a signal arriving once startup is visible (pidfile) is handled.
    let signals = daemon::TerminationSignals::install();
    let events = Broadcast::new();
    let services = build(events.clone());
    let fail = |option: &str, message: String, on_shutdown: OnShutdown| {
        eprintln!("{}: {option}: {message}", program());
        if let Err(e) = on_shutdown() {
            eprintln!("{}: {e}", program());
        }
        ExitCode::FAILURE
    };

    for step in &options.startup {
        if let Err(e) = services
            .backend
            .execute(step.command, Some(step.arguments.clone()))
        {
            return fail(&step.option, e.desc, services.on_shutdown);
        }
    }

    let config = ServerConfig {
        version: blockdev::version_info(),
        ..ServerConfig::default()
    };
    let mut server = MonitorServer::with_events(services.backend.clone(), events, config);
    for ((option, endpoint), id) in options.monitors.iter().zip(&options.monitor_chardevs) {
        if let Err(e) = server.listen(endpoint.clone()).await {
            let what = match endpoint {
                Endpoint::Unix(path) => format!("Failed to bind socket to {}: {e}", path.display()),
                Endpoint::Tcp { host, port } => {
                    format!("Failed to bind socket to {host}:{port}: {e}")
                }
                Endpoint::Stdio => format!("cannot use stdio: {e}"),
            };
            return fail(option, what, services.on_shutdown);
        }
        if let Some(register) = &services.monitor_chardev {
            register(id, &monitor_filename(endpoint));
        }
    }

    if let Some(path) = &options.pidfile
        && let Err(e) = write_pidfile(path)
    {
        return fail(
            &format!("--pidfile {}", path.display()),
            format!("cannot write pid file: {e}"),
            services.on_shutdown,
        );
    }

    if announce {
        println!(
            "{}: QMP monitor listening on ./{DEFAULT_SOCKET}\n  connect: socat - UNIX-CONNECT:./{DEFAULT_SOCKET}\n  then send: {{\"execute\": \"qmp_capabilities\"}}",
            program()
        );
        let _ = std::io::stdout().flush();
    }
    if let Some(pipe) = startup_pipe {
        daemon::startup_complete(pipe);
    }

    let shutdown = server.shutdown_handle();
    tokio::spawn(async move {
        signals.wait().await;
        shutdown.request();
    });
    // `run` returns once the backend's `stop` (jobs cancelled, their events sent) has run and
    // the monitors are closed.
    let reason = server.run().await;
    tracing::info!(?reason, "shutting down");
    let closed = (services.on_shutdown)();
    if let Some(path) = &options.pidfile {
        let _ = std::fs::remove_file(path);
    }
    match closed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", program());
            ExitCode::FAILURE
        }
    }
}

/// QEMU's `query-chardev` file name of a monitor's socket with its client connected.
fn monitor_filename(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Unix(path) => format!("unix:{},server=on", path.display()),
        Endpoint::Tcp { host, port } => format!("tcp:{host}:{port},server=on"),
        Endpoint::Stdio => "stdio".to_string(),
    }
}

fn write_pidfile(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
}

mod daemon {
    //! Daemonizing (QEMU's `--daemonize`: the parent exits once the child's startup is
    //! complete, with the child's verdict) and termination signals.

    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};

    /// The child's end of the pipe the parent waits on.
    pub struct StartupPipe(OwnedFd);

    /// Fork. Only the child returns; the parent exits 0 when the child reports a complete
    /// startup, 1 when the child dies first.
    pub fn fork() -> io::Result<StartupPipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe(2) succeeded, so both descriptors are open and owned by us alone.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: called before any other thread exists (see `main_with`).
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                drop(read_end);
                // SAFETY: plain system call without pointers.
                unsafe { libc::setsid() };
                Ok(StartupPipe(write_end))
            }
            _parent => {
                drop(write_end);
                let mut verdict = [1u8; 1];
                let ok =
                    matches!(File::from(read_end).read(&mut verdict), Ok(1)) && verdict[0] == 0;
                std::process::exit(if ok { 0 } else { 1 });
            }
        }
    }

    /// Tell the parent startup is complete and detach from the terminal, as QEMU does.
    pub fn startup_complete(pipe: StartupPipe) {
        let _ = File::from(pipe.0).write_all(&[0]);
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            for fd in 0..3 {
                // SAFETY: `null` is open; dup2 onto the standard descriptors.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        let _ = std::env::set_current_dir("/");
    }

    /// SIGTERM, SIGINT and SIGHUP: QEMU shuts down on all three.
    pub struct TerminationSignals(Option<[tokio::signal::unix::Signal; 3]>);

    impl TerminationSignals {
        pub fn install() -> Self {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) {
                (Ok(term), Ok(int), Ok(hup)) => TerminationSignals(Some([term, int, hup])),
                _ => {
                    tracing::warn!("cannot install signal handlers");
                    TerminationSignals(None)
                }
            }
        }

        /// Resolves when one of the signals arrives.
        pub async fn wait(self) {
            let Some([mut term, mut int, mut hup]) = self.0 else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        }
    }
}

/// `--nbd-server` keyval options (QEMU's `NbdServerOptions`: a flat `SocketAddress`, numbers
/// as text) as `nbd-server-start` arguments (`SocketAddressLegacy`: `{type, data}`, numbers).
pub(crate) fn nbd_server_start_arguments(options: &Map<String, Value>) -> Map<String, Value> {
    let mut arguments = Map::new();
    for (key, value) in options {
        let value = match (key.as_str(), value) {
            ("addr", Value::Object(addr)) => {
                let mut data = addr.clone();
                let kind = data.remove("type").unwrap_or(Value::Null);
                serde_json::json!({"type": kind, "data": data})
            }
            ("max-connections" | "handshake-max-seconds", Value::String(text)) => {
                match text.parse::<u64>() {
                    Ok(number) => Value::from(number),
                    // Left as text: the command's input check names the bad member.
                    Err(_) => value.clone(),
                }
            }
            _ => value.clone(),
        };
        arguments.insert(key.clone(), value);
    }
    arguments
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nbd_server_option_becomes_nbd_server_start_arguments() {
        let options = json!({"addr": {"type": "unix", "path": "/tmp/n.sock"},
                             "max-connections": "4"});
        let arguments = nbd_server_start_arguments(options.as_object().unwrap());
        assert_eq!(
            Value::Object(arguments),
            json!({"addr": {"type": "unix", "data": {"path": "/tmp/n.sock"}},
                   "max-connections": 4})
        );
    }
}
