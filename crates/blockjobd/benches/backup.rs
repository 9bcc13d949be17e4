//! Full backup throughput: `blockdev-backup` (sync=full) of a qcow2 image full of data to an
//! empty qcow2 target, blockjobd against qemu-storage-daemon in the same run on the same
//! images, plus `cp` of the source file as a page-cache ceiling.
//!
//! Each run: recreate the target (`qemu-img create`), start the daemon, `blockdev-add` source and
//! target, then time from sending `blockdev-backup` to
//! - **done**: the job's `BLOCK_JOB_COMPLETED` event, and
//! - **flushed**: the return of `blockdev-del` of the target (after the job's
//!   `JOB_STATUS_CHANGE` to `null`). Both daemons close the node on `blockdev-del`, which
//!   writes their caches out and `fdatasync`s the file before replying.
//!
//! Then `quit`, and `qemu-img compare` of source and target: a run whose copy differs aborts
//! the benchmark. Runs alternate between the daemons. Figures: best and median MiB/s (of the
//! image's virtual size) per daemon, and the ratio blockjobd / qemu-storage-daemon.
//!
//! `cargo bench -p blockjobd --bench backup`. Environment:
//! - `BACKUP_BENCH_SIZE` image size for `qemu-img` (default `1G`; `64M` under `cargo test`),
//! - `BACKUP_BENCH_RUNS` runs per daemon (default 3; 1 under `cargo test`),
//! - `BACKUP_BENCH_DIR` where the temp dir with the images goes (default the system temp dir,
//!   a real disk here; set it to `/dev/shm` to take the disk out),
//! - `BACKUP_BENCH_BLOCKJOBD` another blockjobd binary to measure.

mod common;

use common::{Qmp, path_str, qcow2, spawn};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One timed backup: (until BLOCK_JOB_COMPLETED, until the target is flushed and closed).
fn backup_once(program: &Path, dir: &Path, size: &str) -> (Duration, Duration) {
    let source = dir.join("src.qcow2");
    let target = dir.join("tgt.qcow2");
    let _ = std::fs::remove_file(&target);
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&target), size],
    );
    let socket = dir.join("qmp.sock");
    let mut daemon = spawn(program, &socket);
    let mut qmp = Qmp::connect(&socket);
    qmp.execute("blockdev-add", qcow2("src", &source));
    qmp.execute("blockdev-add", qcow2("tgt", &target));

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

    qmp.send("quit", json!({}));
    let _ = daemon.0.wait();
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .args([path_str(&source), path_str(&target)])
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "{}: target differs from source after backup: {}",
        program.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    (done, flushed)
}

/// `cp` of the source file, then `fdatasync` of the copy: (copied, synced).
fn cp_once(dir: &Path) -> (Duration, Duration) {
    let copy = dir.join("copy.qcow2");
    let _ = std::fs::remove_file(&copy);
    let start = Instant::now();
    tool("cp", &[path_str(&dir.join("src.qcow2")), path_str(&copy)]);
    let copied = start.elapsed();
    std::fs::File::open(&copy)
        .and_then(|f| f.sync_data())
        .expect("fdatasync copy");
    let synced = start.elapsed();
    let _ = std::fs::remove_file(&copy);
    (copied, synced)
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
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return size
                .parse()
                .expect("BACKUP_BENCH_SIZE: a number with K/M/G/T");
        }
    };
    digits.parse::<u64>().expect("BACKUP_BENCH_SIZE number") << shift
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep it small then.
    let testing = !std::env::args().any(|a| a == "--bench");
    let size = env_or("BACKUP_BENCH_SIZE", if testing { "64M" } else { "1G" });
    let runs: usize = env_or("BACKUP_BENCH_RUNS", if testing { "1" } else { "3" })
        .parse()
        .expect("BACKUP_BENCH_RUNS: a number");
    assert!(runs > 0, "BACKUP_BENCH_RUNS must be at least 1");
    let bytes = size_in_bytes(&size);
    let parent = std::env::var_os("BACKUP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("backup-bench")
        .tempdir_in(&parent)
        .expect("temp dir for images");
    let ours = std::env::var_os("BACKUP_BENCH_BLOCKJOBD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_blockjobd")));
    let qsd = PathBuf::from("qemu-storage-daemon");
    let qsd_available = Command::new(&qsd)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        qsd_available,
        "the benchmark runs qemu-storage-daemon 10.0 beside ours: install it \
         (Debian: apt-get install qemu-utils from bookworm-backports)"
    );

    let source = dir.path().join("src.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&source), &size],
    );
    let write = format!("write -P 0xab 0 {size}");
    tool("qemu-io", &["-f", "qcow2", "-c", &write, path_str(&source)]);
    println!(
        "full backup of a {size} qcow2 (all data) to a qcow2 target in {}, {runs} run(s) each",
        dir.path().display()
    );

    let mut ours_done = Vec::new();
    let mut ours_flushed = Vec::new();
    let mut qsd_done = Vec::new();
    let mut qsd_flushed = Vec::new();
    let mut cp_copied = Vec::new();
    let mut cp_synced = Vec::new();
    for _ in 0..runs {
        let (d, f) = backup_once(&ours, dir.path(), &size);
        ours_done.push(d);
        ours_flushed.push(f);
        if qsd_available {
            let (d, f) = backup_once(&qsd, dir.path(), &size);
            qsd_done.push(d);
            qsd_flushed.push(f);
        }
        let (c, s) = cp_once(dir.path());
        cp_copied.push(c);
        cp_synced.push(s);
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
    if qsd_available {
        let qd = row(
            "qemu-storage-daemon",
            "until BLOCK_JOB_COMPLETED",
            &qsd_done,
        );
        let qf = row("qemu-storage-daemon", "until target flushed", &qsd_flushed);
        println!(
            "{:>20} completed: best {:.2}, median {:.2}; flushed: best {:.2}, median {:.2}",
            "ours / QSD",
            od.best / qd.best,
            od.median / qd.median,
            of.best / qf.best,
            of.median / qf.median
        );
    }
    row("cp (source file)", "copied (page cache)", &cp_copied);
    row("cp (source file)", "copied + fdatasync", &cp_synced);
}
