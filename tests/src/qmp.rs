//! A small synchronous QMP client and a daemon process handle, for tests that drive `blockjobd`
//! or `qemu-storage-daemon` command by command (and may kill them).

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon started with qemu-storage-daemon's command line, listening on `socket`.
/// Killed (SIGKILL) on drop if it is still running. Its stderr goes to a file (the caller's
/// or a temporary one) so that a failure can say what the daemon printed.
pub struct Daemon {
    child: Child,
    program: PathBuf,
    stderr: PathBuf,
    /// Deletes the temporary stderr file, if the caller gave none.
    _stderr_temp: Option<tempfile::TempPath>,
    /// The QMP monitor's unix socket.
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `program` with its monitor on `dir/qmp.sock` (working directory `dir`) and waits
    /// until the socket exists.
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
        let (file, stderr, stderr_temp) = match log {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                (file, path.to_path_buf(), None)
            }
            None => {
                let (file, temp) = tempfile::NamedTempFile::new()
                    .expect("temporary stderr file")
                    .into_parts();
                (file, temp.to_path_buf(), Some(temp))
            }
        };
        let child = Command::new(program)
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["--monitor", "chardev=m"])
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
            _stderr_temp: stderr_temp,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The file appears at bind(), a moment before listen(): `Qmp::connect`
        // retries a refused connection (no probe connection here: a daemon's
        // monitor serves one client at a time).
        while !daemon.socket.exists() {
            if daemon.status().is_some() {
                panic!("{}", daemon.failure("exited at start"));
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                daemon.failure("no QMP socket after 10 s")
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
                // A daemon that dropped the connection may be on its way out: give it a
                // moment, so that the message tells a crash from a daemon still running.
                let deadline = Instant::now() + Duration::from_secs(2);
                while self.status().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                panic!("{}", self.failure(&format!("QMP connect: {e}")))
            }
        }
    }

    /// How the process ended (`exited 1`, `killed by signal 6 (core dumped)`), or `None`
    /// while it runs; it is not reaped (waitid with WNOWAIT), so `Child` stays usable.
    fn status(&self) -> Option<String> {
        // SAFETY: siginfo_t is plain data; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: a valid pointer to a siginfo_t we own; the pid is our child.
        let r = unsafe { libc::waitid(libc::P_PID, self.child.id(), &mut info, flags) };
        // SAFETY: waitid filled the CLD_* fields when it found a child (si_pid != 0).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if r != 0 {
            // Already reaped (ECHILD): the status lives in `Child`, no longer here.
            return Some("exited (already reaped)".to_string());
        }
        if pid == 0 {
            return None;
        }
        Some(match info.si_code {
            libc::CLD_EXITED => format!("exited with status {status}"),
            libc::CLD_DUMPED => format!("killed by signal {status} (core dumped)"),
            _ => format!("killed by signal {status}"),
        })
    }

    /// The program's stderr so far (empty if it could not be read).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// A failure's report: what went wrong, the program, its status and its stderr.
    fn failure(&self, what: &str) -> String {
        let status = self.status().unwrap_or_else(|| "still running".to_string());
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
    pub fn try_connect(socket: &Path) -> Result<Qmp, String> {
        // The socket file appears at bind(), a moment before listen(): retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("connect to {}: {e}", socket.display())),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().expect("clone socket")),
            writer: stream,
            events: VecDeque::new(),
            passed: Vec::new(),
        };
        let greeting = qmp
            .read()
            .ok_or("the connection closed (or read failed) before the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a greeting: {greeting}"));
        }
        let request = json!({"execute": "qmp_capabilities", "arguments": {}});
        qmp.writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| format!("write qmp_capabilities: {e}"))?;
        loop {
            let msg = qmp
                .read()
                .ok_or("the connection closed (or read failed) before qmp_capabilities' reply")?;
            if msg.get("event").is_some() {
                qmp.events.push_back(msg);
            } else if msg.get("return").is_some() {
                return Ok(qmp);
            } else {
                return Err(format!("qmp_capabilities: {msg}"));
            }
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
