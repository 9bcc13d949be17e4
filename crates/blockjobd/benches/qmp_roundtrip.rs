//! QMP round trips per second over a unix socket, blockjobd against qemu-storage-daemon, one
//! request in flight and eight in flight: a small command (`query-version`), and `query-jobs`
//! listing 100 concluded backup jobs (tiny null-co nodes, `auto-dismiss: false`).
//!
//! `cargo bench -p blockjobd --bench qmp_roundtrip` (qemu-storage-daemon is skipped when it
//! is not installed). `QMP_BENCH_SECONDS` sets the length of each measurement (default 3).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const QUERY_VERSION: &[u8] = b"{\"execute\": \"query-version\"}\n";
const QUERY_JOBS: &[u8] = b"{\"execute\": \"query-jobs\"}\n";
/// Concluded jobs listed by the `query-jobs` measurement.
const CONCLUDED_JOBS: usize = 100;

fn spawn(daemon: &str, socket: &Path) -> Option<Child> {
    let child = Command::new(daemon)
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["--monitor", "chardev=m"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(child)
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).expect("connect");
        let mut client = Client {
            reader: BufReader::with_capacity(1 << 16, stream.try_clone().expect("clone")),
            writer: stream,
            line: String::new(),
        };
        client.reader.read_line(&mut client.line).expect("greeting");
        client
            .writer
            .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
            .expect("write");
        client.read_reply();
        client
    }

    /// The next reply (events are skipped); panics on an error reply.
    fn read_reply(&mut self) {
        loop {
            self.line.clear();
            let n = self.reader.read_line(&mut self.line).expect("read");
            assert!(n > 0, "connection closed");
            if self.line.starts_with("{\"timestamp\"") || self.line.contains("\"event\"") {
                continue;
            }
            assert!(self.line.contains("\"return\""), "{}", self.line);
            return;
        }
    }

    fn execute(&mut self, request: &str) {
        self.writer.write_all(request.as_bytes()).expect("write");
        self.writer.write_all(b"\n").expect("write");
        self.read_reply();
    }

    /// `count` backup jobs of 64 KiB null-co nodes, left CONCLUDED (`auto-dismiss: false`).
    fn conclude_jobs(&mut self, count: usize) {
        let node = |name: &str| {
            format!(
                r#"{{"execute": "blockdev-add", "arguments": {{"driver": "null-co", "node-name": "{name}", "size": 65536}}}}"#
            )
        };
        self.execute(&node("src"));
        for i in 0..count {
            self.execute(&node(&format!("t{i}")));
            self.execute(&format!(
                r#"{{"execute": "blockdev-backup", "arguments": {{"job-id": "j{i}", "device": "src", "target": "t{i}", "sync": "full", "auto-dismiss": false}}}}"#
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.writer.write_all(QUERY_JOBS).expect("write");
            self.read_reply();
            if self.line.matches("\"concluded\"").count() == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "jobs did not conclude: {}",
                self.line
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Round trips per second of `request` with `window` requests in flight.
    fn measure(&mut self, request: &[u8], window: usize, seconds: f64) -> f64 {
        let burst: Vec<u8> = request.repeat(window);
        for _ in 0..100 {
            self.writer.write_all(request).expect("write");
            self.read_reply();
        }
        let start = Instant::now();
        let mut done = 0u64;
        // Keep `window` requests outstanding: refill the window as replies arrive.
        self.writer.write_all(&burst).expect("write");
        while start.elapsed().as_secs_f64() < seconds {
            self.read_reply();
            done += 1;
            self.writer.write_all(request).expect("write");
        }
        let elapsed = start.elapsed().as_secs_f64();
        for _ in 0..window {
            self.read_reply();
        }
        done as f64 / elapsed
    }
}

/// The daemon under test; killed if the benchmark fails before `quit`.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn bench(name: &str, daemon: &str, seconds: f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("qmp.sock");
    let Some(child) = spawn(daemon, &socket) else {
        println!("{name:>22}: not available ({daemon})");
        return;
    };
    let mut child = Daemon(child);
    let mut client = Client::connect(&socket);
    let one = client.measure(QUERY_VERSION, 1, seconds);
    let eight = client.measure(QUERY_VERSION, 8, seconds);
    println!(
        "{name:>22}: query-version  {one:>9.0} round trips/s (1 in flight)  {eight:>9.0} (8 in flight)"
    );
    client.conclude_jobs(CONCLUDED_JOBS);
    let one = client.measure(QUERY_JOBS, 1, seconds);
    let eight = client.measure(QUERY_JOBS, 8, seconds);
    println!(
        "{name:>22}: query-jobs ({CONCLUDED_JOBS} concluded)  {one:>9.0} round trips/s (1 in flight)  {eight:>9.0} (8 in flight)"
    );
    let _ = client.writer.write_all(b"{\"execute\": \"quit\"}\n");
    let _ = child.0.wait();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep it short then.
    let testing = !std::env::args().any(|a| a == "--bench");
    let seconds: f64 = std::env::var("QMP_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if testing { 0.2 } else { 3.0 });
    bench("blockjobd", env!("CARGO_BIN_EXE_blockjobd"), seconds);
    bench("qemu-storage-daemon", "qemu-storage-daemon", seconds);
}
