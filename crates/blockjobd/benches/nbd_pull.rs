//! NBD pull throughput: blockjobd's export against qemu-storage-daemon's, of the same image,
//! in the same run, runs alternating between the daemons.
//!
//! The image: a qcow2 of `NBD_BENCH_SIZE` (default 1 GiB) full of data, with a persistent
//! bitmap `b0` (64 KiB granularity) recording writes to 5% of its clusters, scattered
//! (a fixed pseudo-random choice), then disabled. Each daemon opens it read-only and exports
//! it with `bitmaps: [b0]`. Two pulls are timed:
//! - **full**: `nbdcopy URI /dev/null` (libnbd's copier: 4 connections when the server
//!   allows multi-conn, 64 requests in flight on each);
//! - **dirty**: only the dirty extents, as a pull-mode incremental backup reads them:
//!   `qemu:dirty-bitmap:b0` block status over the whole export, then READs of the dirty
//!   extents, 64 in flight over 4 connections (16 workers per connection, each reading its
//!   next extent into the buffer it reuses), with our client (`nbd::client`) — the same
//!   client for both servers. (nbdcopy cannot select extents by a bitmap; the alternatives
//!   are a libnbd script, or `qemu-img map` of an `x-dirty-bitmap` view plus one `qemu-io` per
//!   extent, which would time process start-ups.) The bytes pulled are checked.
//!
//! Figures: best and median seconds per daemon, and the speed-up (qemu-storage-daemon's time
//! divided by blockjobd's) of the best runs.
//!
//! `cargo bench -p blockjobd --bench nbd_pull`. Environment: `NBD_BENCH_SIZE` (default `1G`;
//! `64M` under `cargo test`), `NBD_BENCH_RUNS` (default 7; 1 under `cargo test`),
//! `NBD_BENCH_DIR` (where the image goes; default the system temp dir),
//! `NBD_BENCH_BLOCKJOBD` (another blockjobd binary).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nbd::client::{Connector, NbdClient, ServerAddr};
use serde_json::{Value, json};

const CLUSTER: u64 = 65536;
const CONNECTIONS: usize = 4;
const IN_FLIGHT: usize = 64;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            let package = match program {
                "nbdcopy" => "libnbd-bin",
                _ => "qemu-utils",
            };
            panic!("run {program}: {e} (install it with `apt-get install {package}`)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn parse_size(text: &str) -> u64 {
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().expect("a size like 1G or 64M");
    match unit {
        "G" => n << 30,
        "M" => n << 20,
        _ => panic!("size unit must be M or G"),
    }
}

/// The clusters made dirty: every 20th on average, chosen by a fixed LCG.
fn dirty_clusters(size: u64) -> Vec<u64> {
    let clusters = size / CLUSTER;
    let mut chosen = std::collections::BTreeSet::new();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    while (chosen.len() as u64) < clusters / 20 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        chosen.insert((state >> 33) % clusters);
    }
    chosen.into_iter().collect()
}

/// Creates the image: data everywhere, then the dirty clusters written with `b0` recording.
fn make_image(path: &Path, size: u64) -> u64 {
    let p = path.to_str().expect("UTF-8 path");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, &size.to_string()],
    );
    tool("qemu-io", &["-c", &format!("write -P 0x5a 0 {size}"), p]);
    tool("qemu-img", &["bitmap", "--add", p, "b0"]);
    let dirty = dirty_clusters(size);
    for chunk in dirty.chunks(512) {
        let mut args = Vec::new();
        for cluster in chunk {
            args.push("-c".to_string());
            args.push(format!("write -P 0x66 {} {CLUSTER}", cluster * CLUSTER));
        }
        args.push(p.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool("qemu-io", &args);
    }
    tool("qemu-img", &["bitmap", "--disable", p, "b0"]);
    dirty.len() as u64 * CLUSTER
}

/// A daemon exporting the image read-only with its bitmap; killed when dropped.
struct Daemon {
    child: Child,
    qmp: UnixStream,
    nbd: PathBuf,
}

impl Daemon {
    fn start(program: &Path, dir: &Path, image: &Path) -> Daemon {
        let qmp_path = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&nbd);
        let blockdev = json!({"driver": "qcow2", "node-name": "disk", "read-only": true,
                              "file": {"driver": "file", "filename": image}});
        let child = Command::new(program)
            .args(["--blockdev", &blockdev.to_string()])
            .args([
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", nbd.display()),
            ])
            .args([
                "--chardev",
                &format!("socket,id=m,path={},server=on,wait=off", qmp_path.display()),
                "--monitor",
                "chardev=m",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = loop {
            if let Ok(stream) = UnixStream::connect(&qmp_path) {
                break stream;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut daemon = Daemon { child, qmp, nbd };
        daemon.read();
        daemon.execute("qmp_capabilities", json!({}));
        daemon.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk", "name": "disk",
                   "bitmaps": ["b0"]}),
        );
        daemon
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let mut reader = BufReader::new(&self.qmp);
        reader.read_line(&mut line).expect("read QMP");
        serde_json::from_str(&line).expect("QMP JSON")
    }

    fn execute(&mut self, command: &str, arguments: Value) {
        let mut text = json!({"execute": command, "arguments": arguments}).to_string();
        text.push('\n');
        self.qmp.write_all(text.as_bytes()).expect("write QMP");
        loop {
            let reply = self.read();
            if reply.get("event").is_none() {
                assert!(reply.get("error").is_none(), "{command}: {reply}");
                return;
            }
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.nbd.display())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pulls the dirty extents with our client; returns the bytes read.
async fn pull_dirty(socket: &Path, size: u64) -> u64 {
    let connector = Connector::new(ServerAddr::Unix(socket.to_path_buf()), "disk")
        .meta_context("qemu:dirty-bitmap:b0");
    let mut clients: Vec<Arc<NbdClient>> = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Arc::new(connector.connect().await.expect("connect")));
    }
    let context = clients[0]
        .info()
        .context_id("qemu:dirty-bitmap:b0")
        .expect("the bitmap's context");
    // The dirty extents, from block status over the whole export.
    let mut dirty = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(1 << 30) as u32;
        let status = clients[0]
            .block_status(offset, len, false)
            .await
            .expect("block status");
        let extents = status.extents(context).expect("bitmap extents");
        let mut at = offset;
        for extent in extents {
            if extent.flags & 1 != 0 {
                dirty.push((at, extent.length));
            }
            at += extent.length;
        }
        assert!(at > offset, "block status made no progress");
        offset = at;
    }
    // READs of at most 1 MiB, IN_FLIGHT at once, spread over the connections.
    let mut reads = Vec::new();
    for (start, len) in dirty {
        let mut at = start;
        while at < start + len {
            let piece = (start + len - at).min(1 << 20);
            reads.push((at, piece as u32));
            at += piece;
        }
    }
    // IN_FLIGHT workers, each on one connection (the same number on each), each taking the
    // next read and reusing its buffer.
    let reads = Arc::new(reads);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..IN_FLIGHT {
        let client = Arc::clone(&clients[worker % CONNECTIONS]);
        let (reads, next) = (Arc::clone(&reads), Arc::clone(&next));
        workers.spawn(async move {
            let mut buffer = Vec::new();
            let mut pulled = 0u64;
            while let Some(&(offset, len)) = reads.get(next.fetch_add(1, Ordering::Relaxed)) {
                buffer.resize(len as usize, 0);
                buffer = client.read_buf(offset, buffer).await.expect("read");
                assert!(
                    buffer[0] == 0x66 && buffer[buffer.len() - 1] == 0x66,
                    "dirty data"
                );
                pulled += u64::from(len);
            }
            pulled
        });
    }
    let mut pulled = 0u64;
    while let Some(done) = workers.join_next().await {
        pulled += done.expect("read worker");
    }
    for client in clients {
        if let Ok(client) = Arc::try_unwrap(client) {
            client.disconnect().await;
        }
    }
    pulled
}

struct Figures {
    full: Vec<Duration>,
    dirty: Vec<Duration>,
    /// The daemon's CPU time (user + system) during the full pull.
    full_cpu: Vec<Duration>,
}

/// CPU time (user + system) process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (in parentheses): utime and stime are the 12th and 13th.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

fn best_median(times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    (times[0].as_secs_f64(), times[times.len() / 2].as_secs_f64())
}

fn main() {
    let testing = !std::env::args().any(|a| a == "--bench");
    let size = parse_size(&env_or(
        "NBD_BENCH_SIZE",
        if testing { "64M" } else { "1G" },
    ));
    let runs: usize = env_or("NBD_BENCH_RUNS", if testing { "1" } else { "7" })
        .parse()
        .expect("NBD_BENCH_RUNS is a number");
    let base = std::env::var("NBD_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let ours = std::env::var("NBD_BENCH_BLOCKJOBD")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_blockjobd")));
    let daemons = [
        ("blockjobd", ours),
        ("qemu-storage-daemon", PathBuf::from("qemu-storage-daemon")),
    ];
    let image = dir.path().join("image.qcow2");
    println!("preparing a {} MiB image (5% dirty in b0)...", size >> 20);
    let dirty_bytes = make_image(&image, size);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut figures: Vec<Figures> = (0..daemons.len())
        .map(|_| Figures {
            full: Vec::new(),
            dirty: Vec::new(),
            full_cpu: Vec::new(),
        })
        .collect();
    for _ in 0..runs {
        for (i, (_, program)) in daemons.iter().enumerate() {
            let daemon = Daemon::start(program, dir.path(), &image);
            let uri = daemon.uri();
            let pid = daemon.child.id();
            let cpu = cpu_time(pid);
            let start = Instant::now();
            tool("nbdcopy", &[&uri, "/dev/null"]);
            figures[i].full.push(start.elapsed());
            figures[i].full_cpu.push(cpu_time(pid) - cpu);

            let start = Instant::now();
            let pulled = runtime.block_on(pull_dirty(&daemon.nbd, size));
            figures[i].dirty.push(start.elapsed());
            assert_eq!(pulled, dirty_bytes, "the dirty extents pulled");
            drop(daemon);
        }
    }

    println!(
        "NBD pull of a {} MiB qcow2 export ({} MiB dirty), {runs} runs each, seconds:",
        size >> 20,
        dirty_bytes >> 20
    );
    println!(
        "{:<22}{:>12}{:>12}{:>12}{:>12}{:>14}",
        "daemon", "full best", "full med", "dirty best", "dirty med", "full CPU med"
    );
    let mut best = Vec::new();
    for ((name, _), figures) in daemons.iter().zip(&mut figures) {
        let (full_best, full_median) = best_median(&mut figures.full);
        let (dirty_best, dirty_median) = best_median(&mut figures.dirty);
        let (_, cpu_median) = best_median(&mut figures.full_cpu);
        println!(
            "{name:<22}{full_best:>12.3}{full_median:>12.3}{dirty_best:>12.3}{dirty_median:>12.3}{cpu_median:>14.3}"
        );
        best.push((full_best, full_median, dirty_best, dirty_median));
    }
    println!(
        "blockjobd speed-up (qemu-storage-daemon's time / ours): full {:.2}x best, {:.2}x median; \
         dirty {:.2}x best, {:.2}x median",
        best[1].0 / best[0].0,
        best[1].1 / best[0].1,
        best[1].2 / best[0].2,
        best[1].3 / best[0].3,
    );
}
