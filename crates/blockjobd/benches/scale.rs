//! Grouped transactions at scale: N `blockdev-backup` actions (null-co 1 MiB source → null-co
//! 1 MiB target, `completion-mode: grouped`) in one `transaction`, timed from sending it until
//! the client has read every job's `null` (and every other event on the way), through the
//! daemon and a client reading every event. blockjobd at N = 100, 1,000, 10,000 and
//! qemu-storage-daemon 10.0.2 at N = 100 and 1,000 (its cost grows with N², 10,000 takes
//! minutes), in the same run. Per N: total time, time per job, events read, the daemon's RSS
//! after the jobs are gone and its peak RSS (VmHWM: the whole run, node set-up included).
//!
//! `cargo bench -p blockjobd --bench scale`. Environment: `SCALE_BENCH_RUNS` runs per point
//! (default 3, best kept; 1 under `cargo test`), `SCALE_BENCH_SIZES` and
//! `SCALE_BENCH_QSD_SIZES` the values of N (comma-separated; empty skips),
//! `SCALE_BENCH_BLOCKJOBD` another blockjobd binary to measure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The daemon under test; killed if the benchmark fails before `quit`.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn spawn(program: &Path, dir: &Path) -> Daemon {
        let socket = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&socket);
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Daemon { child, socket }
    }

    /// Waits (up to 60 s) for the daemon to exit after `quit`.
    fn wait_exit(mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `VmRSS` and `VmHWM` (peak) of the daemon, in KiB.
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Qmp {
    fn connect(socket: &Path) -> Qmp {
        let stream = UnixStream::connect(socket).expect("connect");
        let mut qmp = Qmp {
            reader: BufReader::with_capacity(1 << 16, stream.try_clone().expect("clone")),
            writer: stream,
            line: String::new(),
        };
        qmp.next();
        qmp.send(&json!({"execute": "qmp_capabilities"}));
        qmp.reply();
        qmp
    }

    fn next(&mut self) -> Value {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).expect("read QMP");
        assert!(n > 0, "QMP stream ended");
        serde_json::from_str(&self.line).expect("QMP JSON")
    }

    fn send(&mut self, message: &Value) {
        let mut text = message.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).expect("write QMP");
    }

    /// The next reply (events before it are skipped); panics on an error reply.
    fn reply(&mut self) -> Value {
        loop {
            let msg = self.next();
            if msg.get("event").is_none() {
                assert!(msg.get("error").is_none(), "{msg}");
                return msg;
            }
        }
    }
}

struct Point {
    elapsed: Duration,
    events: usize,
    rss_after_kib: u64,
    peak_kib: u64,
}

/// One grouped transaction of `n` null-co backups on a fresh daemon.
fn run(program: &Path, n: usize) -> Point {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(program, dir.path());
    let mut qmp = Qmp::connect(&daemon.socket);
    // Nodes, pipelined in batches (set-up, not timed).
    for batch in (0..n).collect::<Vec<_>>().chunks(500) {
        for &i in batch {
            for name in [format!("s{i}"), format!("t{i}")] {
                qmp.send(&json!({"execute": "blockdev-add", "arguments":
                    {"driver": "null-co", "node-name": name, "size": 1 << 20}}));
            }
        }
        for _ in 0..2 * batch.len() {
            qmp.reply();
        }
    }
    let actions: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "blockdev-backup", "data": {"job-id": format!("j{i}"),
                "device": format!("s{i}"), "target": format!("t{i}"), "sync": "full"}})
        })
        .collect();
    let transaction = json!({"execute": "transaction", "arguments": {"actions": actions,
        "properties": {"completion-mode": "grouped"}}});
    let start = Instant::now();
    qmp.send(&transaction);
    let mut events = 0;
    let mut gone = 0;
    let mut replied = false;
    while gone < n || !replied {
        let msg = qmp.next();
        match msg.get("event") {
            Some(_) => {
                events += 1;
                if msg["event"] == "JOB_STATUS_CHANGE" && msg["data"]["status"] == "null" {
                    gone += 1;
                }
            }
            None => {
                assert!(msg.get("error").is_none(), "transaction: {msg}");
                replied = true;
            }
        }
    }
    let elapsed = start.elapsed();
    let (rss_after_kib, peak_kib) = daemon.rss_kib();
    qmp.send(&json!({"execute": "quit"}));
    daemon.wait_exit();
    Point {
        elapsed,
        events,
        rss_after_kib,
        peak_kib,
    }
}

fn best_of(program: &Path, n: usize, runs: usize) -> Point {
    let mut best: Option<Point> = None;
    for _ in 0..runs {
        let p = run(program, n);
        if best.as_ref().is_none_or(|b| p.elapsed < b.elapsed) {
            best = Some(p);
        }
    }
    best.expect("at least one run")
}

fn row(name: &str, n: usize, p: &Point) {
    println!(
        "{name:>20} {n:>7} {:>11.1} ms {:>9.1} µs {:>9} {:>9.1} MiB {:>9.1} MiB",
        p.elapsed.as_secs_f64() * 1e3,
        p.elapsed.as_secs_f64() * 1e6 / n as f64,
        p.events,
        p.rss_after_kib as f64 / 1024.0,
        p.peak_kib as f64 / 1024.0,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep it small then.
    let testing = !std::env::args().any(|a| a == "--bench");
    let runs: usize = std::env::var("SCALE_BENCH_RUNS")
        .ok()
        .map(|r| r.parse().expect("SCALE_BENCH_RUNS: a number"))
        .unwrap_or(if testing { 1 } else { 3 });
    let ours = std::env::var_os("SCALE_BENCH_BLOCKJOBD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_blockjobd")));
    let qsd = PathBuf::from("qemu-storage-daemon");
    let qsd_version = Command::new(&qsd).arg("--version").output();
    assert!(
        qsd_version.as_ref().is_ok_and(|o| o.status.success()),
        "qemu-storage-daemon is needed beside blockjobd: install QEMU's tools \
         (Debian: apt-get install qemu-utils)"
    );
    let sizes = |var: &str, default: &[usize]| -> Vec<usize> {
        match std::env::var(var) {
            Ok(list) => list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|n| n.trim().parse().expect("a comma-separated list of sizes"))
                .collect(),
            Err(_) => default.to_vec(),
        }
    };
    let ours_sizes = sizes(
        "SCALE_BENCH_SIZES",
        if testing {
            &[100]
        } else {
            &[100, 1_000, 10_000]
        },
    );
    let qsd_sizes = sizes(
        "SCALE_BENCH_QSD_SIZES",
        if testing { &[100] } else { &[100, 1_000] },
    );
    println!(
        "grouped transaction of N null-co 1 MiB blockdev-backups, until the client has read \
         every job's null; best of {runs}"
    );
    println!(
        "{:>20} {:>7} {:>14} {:>12} {:>9} {:>13} {:>13}",
        "daemon", "N", "total", "per job", "events", "RSS after", "peak RSS"
    );
    let mut at_1000 = (None, None);
    for &n in &ours_sizes {
        let p = best_of(&ours, n, runs);
        row("blockjobd", n, &p);
        if n == 1_000 {
            at_1000.0 = Some(p.elapsed);
        }
    }
    for &n in &qsd_sizes {
        let p = best_of(&qsd, n, runs);
        row("qemu-storage-daemon", n, &p);
        if n == 1_000 {
            at_1000.1 = Some(p.elapsed);
        }
    }
    if let (Some(ours), Some(theirs)) = at_1000 {
        println!(
            "{:>20} at N = 1,000: blockjobd {:.1}x faster",
            "ours vs QSD",
            theirs.as_secs_f64() / ours.as_secs_f64()
        );
    }
}
