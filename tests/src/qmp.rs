//! A small synchronous QMP client and a daemon process handle, for tests that drive `blockjobd`
//! or `qemu-storage-daemon` command by command (and may kill them).

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The reference daemon's program name.
const REFERENCE: &str = "qemu-storage-daemon";

/// How many times [`Daemon::spawn_connected`] restarts the reference after its known
/// start-up failure.
pub const REFERENCE_RESTARTS: u32 = 3;

/// How a daemon process ended.
enum End {
    Exited(i32),
    /// The signal, and whether it dumped core.
    Signal(i32, bool),
    /// Reaped already (its status is in `Child`).
    Reaped,
}

/// A daemon started with qemu-storage-daemon's command line, listening on `socket`.
/// Killed (SIGKILL) on drop if it is still running. Its stderr goes to a file (the caller's
/// or a temporary one) so that a failure can say what the daemon printed.
pub struct Daemon {
    child: Child,
    program: PathBuf,
    stderr: PathBuf,
    /// Holds the pid file (and the stderr file if the caller gave none); deleted on drop.
    _scratch: tempfile::TempDir,
    /// The QMP monitor's unix socket.
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `program` with its monitor on `dir/qmp.sock` (working directory `dir`) and waits
    /// until it is ready for a client (its `--pidfile`, in a scratch directory, is written).
    pub fn spawn(program: &Path, dir: &Path) -> Daemon {
        Daemon::spawn_full(program, dir, &[], None)
    }

    /// [`Daemon::spawn`] with the daemon's stderr going to the file `log` (created or
    /// truncated).
    pub fn spawn_with_stderr(program: &Path, dir: &Path, log: &Path) -> Daemon {
        Daemon::spawn_full(program, dir, &[], Some(log))
    }

    /// [`Daemon::spawn`] with more options after the monitor's (`--object`, `--blockdev`...).
    pub fn spawn_with(program: &Path, dir: &Path, options: &[String]) -> Daemon {
        Daemon::spawn_full(program, dir, options, None)
    }

    /// [`Daemon::spawn`] with more options and the daemon's stderr going to the file `log`
    /// (`None`: a temporary file, read only to report a failure).
    pub fn spawn_full(
        program: &Path,
        dir: &Path,
        options: &[String],
        log: Option<&Path>,
    ) -> Daemon {
        let socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let pidfile = scratch.path().join("pid");
        let stderr = log.map_or_else(|| scratch.path().join("stderr"), Path::to_path_buf);
        let file = std::fs::File::create(&stderr)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr.display()));
        let child = Command::new(program)
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["--monitor", "chardev=m"])
            .arg("--pidfile")
            .arg(&pidfile)
            .args(options)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let daemon = Daemon {
            child,
            program: program.to_path_buf(),
            stderr,
            _scratch: scratch,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Ready once the pid file holds the daemon's pid: both daemons write it after their
        // monitors listen and before they accept a connection (QSD documents that order).
        // Not earlier: qemu-storage-daemon 10.0.2 connected to while it starts fails about
        // one start in 200 under load (a second greeting, a hang in accept4(), or SIGSEGV;
        // rarer after the pid file, not gone: `Daemon::spawn_connected`, docs/decisions.md).
        // No probe connection either: a monitor serves one client at a time.
        let pid = daemon.child.id().to_string();
        while !std::fs::read_to_string(&pidfile).is_ok_and(|text| text.trim() == pid) {
            if daemon.end().is_some() {
                panic!("{}", daemon.failure("exited at start"));
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                daemon.failure("no pid file after 30 s")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    /// Connects a QMP client and negotiates capabilities; panics naming the program, its
    /// exit status and its stderr if that fails.
    pub fn connect(&self) -> Qmp {
        match Qmp::try_connect(&self.socket) {
            Ok(qmp) => qmp,
            Err(e) => {
                self.settle();
                panic!("{}", self.failure(&format!("QMP connect: {e}")))
            }
        }
    }

    /// [`Daemon::spawn_full`] and [`Daemon::connect`], restarting the reference's known
    /// start-up failure.
    ///
    /// qemu-storage-daemon 10.0.2 fails about one start in 200 under CPU load when a client
    /// connects while it is still starting (docs/decisions.md): the greeting comes, then a
    /// second greeting instead of `qmp_capabilities`' reply (GLib's `g_source_unref:
    /// assertion 'source != NULL' failed` on its stderr), or its monitor thread blocks in
    /// accept4() on the listening socket and nothing more is answered, or the process dies of
    /// SIGSEGV. Waiting for the pid file ([`Daemon::spawn_full`]) makes it rarer but not
    /// impossible (QSD moves the monitor to its I/O thread in a bottom half after that). For
    /// that program and exactly that outcome (an accepted connection whose handshake failed;
    /// the daemon still running, or killed by signal 11) the run is restarted, at most
    /// [`REFERENCE_RESTARTS`] times, with a note on stderr. Any other failure, and every
    /// failure of blockjobd, panics with the report.
    pub fn spawn_connected(
        program: &Path,
        dir: &Path,
        options: &[String],
        log: Option<&Path>,
    ) -> (Daemon, Qmp) {
        let reference = program.file_name() == Some(std::ffi::OsStr::new(REFERENCE));
        let mut restarts = 0;
        loop {
            let mut daemon = Daemon::spawn_full(program, dir, options, log);
            let e = match Qmp::try_connect(&daemon.socket) {
                Ok(qmp) => return (daemon, qmp),
                Err(e) => e,
            };
            daemon.settle();
            let known = e.accepted && matches!(daemon.end(), None | Some(End::Signal(11, _)));
            let report = daemon.failure(&format!("QMP connect: {e}"));
            if !(reference && known && restarts < REFERENCE_RESTARTS) {
                panic!("{report}");
            }
            restarts += 1;
            eprintln!(
                "note: restarting {REFERENCE} ({restarts} of {REFERENCE_RESTARTS}) after its \
                 known start-up failure: {report}"
            );
            daemon.kill();
        }
    }

    /// Gives a daemon that dropped a connection a moment to exit, so that a report tells a
    /// crash from a daemon still running.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.end().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How the process ended, or `None` while it runs; it is not reaped (waitid with
    /// WNOWAIT), so `Child` stays usable.
    fn end(&self) -> Option<End> {
        // SAFETY: siginfo_t is plain data; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: a valid pointer to a siginfo_t we own; the pid is our child.
        let r = unsafe { libc::waitid(libc::P_PID, self.child.id(), &mut info, flags) };
        if r != 0 {
            // ECHILD: already reaped, the status lives in `Child`.
            return Some(End::Reaped);
        }
        // SAFETY: waitid filled the CLD_* fields when it found a child (si_pid != 0).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return None;
        }
        Some(match info.si_code {
            libc::CLD_EXITED => End::Exited(status),
            code => End::Signal(status, code == libc::CLD_DUMPED),
        })
    }

    /// The program's stderr so far (empty if it could not be read).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// A failure's report: what went wrong, the program, its status and its stderr.
    fn failure(&self, what: &str) -> String {
        let status = match self.end() {
            None => "still running".to_string(),
            Some(End::Exited(code)) => format!("exited with status {code}"),
            Some(End::Signal(signal, dumped)) => format!(
                "killed by signal {signal}{}",
                if dumped { " (core dumped)" } else { "" }
            ),
            Some(End::Reaped) => "exited (already reaped)".to_string(),
        };
        format!(
            "{}: {what}; daemon (pid {}) {status}; its stderr:\n{}",
            self.program.display(),
            self.child.id(),
            self.stderr()
        )
    }

    /// Sends signal `name` (`TERM`, `INT`, `HUP`, ...) to the process, with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill (procps)");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit (after `quit`), at most `timeout`; returns its exit code
    /// (`None`: killed after the timeout, or by a signal).
    pub fn wait_exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for the process to exit (after `quit`), at most `timeout`; kills it after that.
    /// Returns whether it exited by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// How long the QMP greeting and `qmp_capabilities`' reply may take before a connection
/// counts as hung.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why [`Qmp::try_connect`] failed.
#[derive(Debug)]
pub struct ConnectFailure {
    /// The daemon accepted the connection (the handshake failed), or never did.
    pub accepted: bool,
    /// What happened.
    pub what: String,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

/// A QMP session: commands in order, events queued until asked for.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    /// Events `wait_event` passed over since the last `events_until`.
    passed: Vec<Value>,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and sends `qmp_capabilities`.
    pub fn connect(socket: &Path) -> Qmp {
        Qmp::try_connect(socket).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Qmp::connect`], saying what went wrong instead of panicking.
    pub fn try_connect(socket: &Path) -> Result<Qmp, ConnectFailure> {
        // The socket file appears at bind(), a moment before listen(): retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => {
                    return Err(ConnectFailure {
                        accepted: false,
                        what: format!("connect to {}: {e}", socket.display()),
                    });
                }
            }
        };
        let handshake = |what: String| ConnectFailure {
            accepted: true,
            what,
        };
        // The greeting and qmp_capabilities' reply take milliseconds; 20 s means a hang.
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .expect("read timeout");
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().expect("clone socket")),
            writer: stream,
            events: VecDeque::new(),
            passed: Vec::new(),
        };
        let greeting = qmp
            .try_read()
            .map_err(|e| handshake(format!("no QMP greeting: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(handshake(format!("not a greeting: {greeting}")));
        }
        let request = json!({"execute": "qmp_capabilities", "arguments": {}});
        qmp.writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| handshake(format!("write qmp_capabilities: {e}")))?;
        loop {
            let msg = qmp
                .try_read()
                .map_err(|e| handshake(format!("no reply to qmp_capabilities: {e}")))?;
            if msg.get("event").is_some() {
                qmp.events.push_back(msg);
            } else if msg.get("return").is_some() {
                break;
            } else {
                return Err(handshake(format!("qmp_capabilities: {msg}")));
            }
        }
        qmp.writer
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        Ok(qmp)
    }

    /// The next message, or how the stream ended (closed, reset, timed out).
    fn try_read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the daemon closed the connection".to_string()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line}")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(format!(
                "nothing read for {HANDSHAKE_TIMEOUT:?} (the daemon hangs)"
            )),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("QMP line is JSON")),
        }
    }

    /// Sends a command without waiting for its reply (read it with [`Qmp::reply`]).
    pub fn send(&mut self, command: &str, arguments: Value) {
        let request = json!({"execute": command, "arguments": arguments});
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .expect("write QMP request");
    }

    /// The next reply: `Ok(return)` or `Err(error)`; events read meanwhile are queued.
    pub fn reply(&mut self) -> Result<Value, Value> {
        loop {
            let msg = self.read().expect("QMP reply before end of stream");
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            } else if let Some(error) = msg.get("error") {
                return Err(error.clone());
            } else {
                return Ok(msg.get("return").cloned().unwrap_or(Value::Null));
            }
        }
    }

    /// Sends a command and waits for its reply.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Value> {
        self.send(command, arguments);
        self.reply()
    }

    /// The events read so far and not yet asked for (they are forgotten).
    pub fn until_now(&mut self) -> Vec<Value> {
        self.passed.clear();
        self.events.drain(..).collect()
    }

    /// Every message still to come (events queued first) until the daemon closes the
    /// connection; panics if it stays open longer than `timeout`.
    pub fn until_closed(&mut self, timeout: Duration) -> Vec<Value> {
        let mut all: Vec<Value> = self.events.drain(..).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "connection still open after {timeout:?}");
            self.writer
                .set_read_timeout(Some(left))
                .expect("read timeout");
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return all,
                Ok(_) => all.push(serde_json::from_str(&line).expect("QMP line is JSON")),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
                Err(e) => panic!("reading until the daemon closes the connection: {e}"),
            }
        }
    }

    /// Every event up to and including the first one named `name`; panics after `timeout`.
    pub fn events_until(&mut self, name: &str, timeout: Duration) -> Vec<Value> {
        let mut seen = Vec::new();
        let last = self.wait_event(name, timeout, |_| true);
        // wait_event drops what it passes over: collect it on the way instead.
        std::mem::swap(&mut seen, &mut self.passed);
        seen.push(last);
        seen
    }

    /// Waits for the first event named `name` whose `data` satisfies `matches` (earlier events
    /// are dropped, and kept for [`Qmp::events_until`]); panics after `timeout`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(event) = self.events.pop_front() {
                if event["event"] == name && matches(&event["data"]) {
                    return event;
                }
                self.passed.push(event);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {name} event within {timeout:?}");
            self.writer
                .set_read_timeout(Some(left))
                .expect("read timeout");
            let msg = self
                .read()
                .unwrap_or_else(|| panic!("stream ended or timed out waiting for {name}"));
            self.events.push_back(msg);
        }
    }
}

/// Adds a qcow2 node `node` over a file node for `path`.
pub fn qcow2_node(node: &str, path: &Path) -> Value {
    json!({
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": path.to_str().expect("UTF-8 path")},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that fails says which program it was, how it ended and what it printed.
    #[test]
    fn a_daemon_that_exits_at_start_is_reported_with_its_status_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-daemon");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'fake: no such option' >&2\nexit 3\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let panic = std::panic::catch_unwind(|| Daemon::spawn(&script, dir.path()))
            .err()
            .expect("the fake daemon exits at start");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            message.contains("fake-daemon: exited at start"),
            "{message}"
        );
        assert!(message.contains("exited with status 3"), "{message}");
        assert!(message.contains("fake: no such option"), "{message}");
    }
}
