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
/// Killed (SIGKILL) on drop if it is still running.
pub struct Daemon {
    child: Child,
    /// The QMP monitor's unix socket.
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `program` with its monitor on `dir/qmp.sock` (working directory `dir`) and waits
    /// until the socket exists.
    pub fn spawn(program: &Path, dir: &Path) -> Daemon {
        Daemon::spawn_full(program, dir, &[], Stdio::null())
    }

    /// [`Daemon::spawn`] with the daemon's stderr going to `stderr` (e.g. a log file).
    pub fn spawn_with_stderr(program: &Path, dir: &Path, stderr: impl Into<Stdio>) -> Daemon {
        Daemon::spawn_full(program, dir, &[], stderr)
    }

    /// [`Daemon::spawn`] with more options after the monitor's (`--object`, `--blockdev`...).
    pub fn spawn_with(program: &Path, dir: &Path, options: &[String]) -> Daemon {
        Daemon::spawn_full(program, dir, options, Stdio::null())
    }

    /// [`Daemon::spawn`] with more options and the daemon's stderr going to `stderr`.
    pub fn spawn_full(
        program: &Path,
        dir: &Path,
        options: &[String],
        stderr: impl Into<Stdio>,
    ) -> Daemon {
        let socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
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
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut daemon = Daemon { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The file appears at bind(), a moment before listen(): `Qmp::connect`
        // retries a refused connection (no probe connection here: a daemon's
        // monitor serves one client at a time).
        while !daemon.socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("{} exited at start: {status}", program.display());
            }
            assert!(Instant::now() < deadline, "no QMP socket after 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    /// Connects a QMP client and negotiates capabilities.
    pub fn connect(&self) -> Qmp {
        Qmp::connect(&self.socket)
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
        // The socket file appears at bind(), a moment before listen(): retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("connect to {}: {e}", socket.display()),
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
        let greeting = qmp.read().expect("QMP greeting");
        assert!(greeting.get("QMP").is_some(), "not a greeting: {greeting}");
        qmp.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        qmp
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
