//! Push-mode backup throughput: `blockdev-backup` (sync=full) of a 1 GiB qcow2 image full of data
//! to an `nbd` node on a `qemu-nbd` export of an empty qcow2 image, blockjobd against
//! qemu-storage-daemon in the same run on the same images (runs alternate between the daemons).
//!
//! Each run: recreate the target (`qemu-img create`), start `qemu-nbd` on it (unix socket,
//! writeback cache, its default), start the daemon, `blockdev-add` the source and the `nbd`
//! node, then time from sending `blockdev-backup` to
//! - **done**: the job's `BLOCK_JOB_COMPLETED` event, and
//! - **flushed**: the return of `blockdev-del` of the `nbd` node (after the job's
//!   `JOB_STATUS_CHANGE` to `null`): both daemons send FLUSH before they disconnect, and
//!   qemu-nbd answers it once its image is written out.
//!
//! Then `quit`, qemu-nbd is stopped (SIGTERM: it closes its image), and `qemu-img compare` of
//! source and target: a run whose copy differs aborts the benchmark. Figures: best and median
//! MiB/s per daemon and the ratio blockjobd / qemu-storage-daemon.
//!
//! `cargo bench -p blockjobd --bench nbd_push`. Environment:
//! - `PUSH_BENCH_SIZE` image size for `qemu-img` (default `1G`; `64M` under `cargo test`),
//! - `PUSH_BENCH_RUNS` runs per daemon (default 5; 1 under `cargo test`),
//! - `PUSH_BENCH_DIR` where the temp dir with the images goes (default the system temp dir),
//! - `PUSH_BENCH_BLOCKJOBD` another blockjobd binary to measure.

mod common;

use common::{Qmp, path_str, qcow2, spawn};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("run {program}: {e} (install it with `apt-get install qemu-utils`)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-nbd` serving `image` (qcow2) as export `disk` on `socket`; stopped when dropped.
struct QemuNbd {
    pid_file: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, image: &Path, socket: &Path) -> QemuNbd {
        let pid_file = dir.join("qemu-nbd.pid");
        let _ = std::fs::remove_file(socket);
        let _ = std::fs::remove_file(&pid_file);
        let pid_arg = format!("--pid-file={}", path_str(&pid_file));
        tool(
            "qemu-nbd",
            &[
                "--fork",
                &pid_arg,
                "-k",
                path_str(socket),
                "-f",
                "qcow2",
                "-x",
                "disk",
                "-t",
                path_str(image),
            ],
        );
        QemuNbd { pid_file }
    }

    /// SIGTERM (qemu-nbd closes its image) and waits until the process is gone.
    fn stop(&mut self) {
        let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        else {
            return;
        };
        // SAFETY: plain syscalls on a process this benchmark started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "qemu-nbd did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.stop();
    }
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

/// One timed push: (until BLOCK_JOB_COMPLETED, until the nbd node is flushed and closed, the
/// daemon's CPU time meanwhile).
fn push_once(program: &Path, dir: &Path, size: &str) -> (Duration, Duration, Duration) {
    let source = dir.join("src.qcow2");
    let target = dir.join("tgt.qcow2");
    let _ = std::fs::remove_file(&target);
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&target), size],
    );
    let nbd_socket = dir.join("nbd.sock");
    let mut server = QemuNbd::start(dir, &target, &nbd_socket);
    let socket = dir.join("qmp.sock");
    let mut daemon = spawn(program, &socket);
    let mut qmp = Qmp::connect(&socket);
    qmp.execute("blockdev-add", qcow2("src", &source));
    qmp.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "tgt", "export": "disk",
               "server": {"type": "unix", "path": path_str(&nbd_socket)}}),
    );

    let pid = daemon.0.id();
    let cpu = cpu_time(pid);
    let start = Instant::now();
    qmp.send(
        "blockdev-backup",
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
    );
    let completed = qmp.wait("BLOCK_JOB_COMPLETED", |d| d["device"] == "j");
    let done = start.elapsed();
    assert!(
        completed["data"].get("error").is_none(),
        "backup failed: {completed}"
    );
    qmp.wait("JOB_STATUS_CHANGE", |d| {
        d["id"] == "j" && d["status"] == "null"
    });
    qmp.execute("blockdev-del", json!({"node-name": "tgt"}));
    let flushed = start.elapsed();
    let cpu = cpu_time(pid) - cpu;

    qmp.send("quit", json!({}));
    let _ = daemon.0.wait();
    server.stop();
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .args([path_str(&source), path_str(&target)])
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "{}: target differs from source after the push: {}",
        program.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    (done, flushed, cpu)
}

struct Figures {
    best: f64,
    median: f64,
}

fn figures(bytes: u64, times: &[Duration]) -> Figures {
    let mut rates: Vec<f64> = times
        .iter()
        .map(|t| bytes as f64 / (1024.0 * 1024.0) / t.as_secs_f64())
        .collect();
    rates.sort_by(|a, b| b.total_cmp(a));
    Figures {
        best: rates[0],
        median: rates[rates.len() / 2],
    }
}

fn size_in_bytes(size: &str) -> u64 {
    let (digits, unit) = size.split_at(size.len() - 1);
    let shift = match unit {
        "M" => 20,
        "G" => 30,
        _ => panic!("PUSH_BENCH_SIZE: a number with M or G"),
    };
    digits.parse::<u64>().expect("PUSH_BENCH_SIZE number") << shift
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep it small then.
    let testing = !std::env::args().any(|a| a == "--bench");
    let size = env_or("PUSH_BENCH_SIZE", if testing { "64M" } else { "1G" });
    let runs: usize = env_or("PUSH_BENCH_RUNS", if testing { "1" } else { "5" })
        .parse()
        .expect("PUSH_BENCH_RUNS: a number");
    assert!(runs > 0, "PUSH_BENCH_RUNS must be at least 1");
    let bytes = size_in_bytes(&size);
    let parent = std::env::var_os("PUSH_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("push-bench")
        .tempdir_in(&parent)
        .expect("temp dir for images");
    let ours = std::env::var_os("PUSH_BENCH_BLOCKJOBD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_blockjobd")));
    let qsd = PathBuf::from("qemu-storage-daemon");

    let source = dir.path().join("src.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&source), &size],
    );
    let write = format!("write -P 0xab 0 {size}");
    tool("qemu-io", &["-f", "qcow2", "-c", &write, path_str(&source)]);
    println!(
        "push-mode full backup of a {size} qcow2 (all data) to qemu-nbd serving a qcow2 target \
         in {}, {runs} run(s) each",
        dir.path().display()
    );

    let mut ours_done = Vec::new();
    let mut ours_flushed = Vec::new();
    let mut ours_cpu = Vec::new();
    let mut qsd_done = Vec::new();
    let mut qsd_flushed = Vec::new();
    let mut qsd_cpu = Vec::new();
    for _ in 0..runs {
        let (d, f, c) = push_once(&ours, dir.path(), &size);
        ours_done.push(d);
        ours_flushed.push(f);
        ours_cpu.push(c);
        let (d, f, c) = push_once(&qsd, dir.path(), &size);
        qsd_done.push(d);
        qsd_flushed.push(f);
        qsd_cpu.push(c);
    }

    let row = |name: &str, what: &str, times: &[Duration]| {
        let f = figures(bytes, times);
        println!(
            "{name:>20} {what:<26} best {:>8.1} MiB/s  median {:>8.1} MiB/s",
            f.best, f.median
        );
        f
    };
    let od = row("blockjobd", "until BLOCK_JOB_COMPLETED", &ours_done);
    let of = row("blockjobd", "until target flushed", &ours_flushed);
    let qd = row(
        "qemu-storage-daemon",
        "until BLOCK_JOB_COMPLETED",
        &qsd_done,
    );
    let qf = row("qemu-storage-daemon", "until target flushed", &qsd_flushed);
    let median_cpu = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2].as_secs_f64()
    };
    println!(
        "{:>20} daemon CPU time (user + system) median: blockjobd {:.3} s, \
         qemu-storage-daemon {:.3} s",
        "",
        median_cpu(&mut ours_cpu),
        median_cpu(&mut qsd_cpu)
    );
    println!(
        "{:>20} completed: best {:.2}, median {:.2}; flushed: best {:.2}, median {:.2}",
        "ours / QSD",
        od.best / qd.best,
        od.median / qd.median,
        of.best / qf.best,
        of.median / qf.median
    );
}
