//! What the daemon benchmarks (`backup`, `mirror`, `nbd_push`) share: starting a daemon with
//! qemu-storage-daemon's command line, a minimal QMP connection, a qcow2 node's options.
//! Each benchmark uses part of it.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// The daemon under test; killed if the benchmark fails before `quit`.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

pub fn spawn(program: &Path, socket: &Path) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(program)
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["--monitor", "chardev=m"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    let daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not listen",
            program.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(socket: &Path) -> Qmp {
        let stream = UnixStream::connect(socket).expect("connect");
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        };
        qmp.next();
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    pub fn next(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP stream ended");
        serde_json::from_str(&line).expect("QMP JSON")
    }

    pub fn send(&mut self, command: &str, arguments: Value) {
        let mut text = json!({"execute": command, "arguments": arguments}).to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).expect("write QMP");
    }

    /// Sends a command and returns its reply, skipping events.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        self.send(command, arguments);
        loop {
            let msg = self.next();
            if msg.get("event").is_none() {
                assert!(msg.get("error").is_none(), "{command}: {msg}");
                return msg;
            }
        }
    }

    /// Waits for an event whose name and data match.
    pub fn wait(&mut self, event: &str, matches: impl Fn(&Value) -> bool) -> Value {
        loop {
            let msg = self.next();
            if msg["event"] == event && matches(&msg["data"]) {
                return msg;
            }
        }
    }
}

pub fn qcow2(node: &str, path: &Path) -> Value {
    json!({"driver": "qcow2", "node-name": node,
           "file": {"driver": "file", "filename": path_str(path)}})
}
