//! Backing-chain jobs to completion, blockjobd beside qemu-storage-daemon in the same run on the
//! same images:
//! - **stream**: `block-stream` of `top` over a chain `base` (data in the first half) <- `mid`
//!   (data in the second half) <- `top` (empty): the whole virtual size is copied into `top`,
//!   whose backing file is then dropped;
//! - **active commit**: `block-commit` of `top` (data over the whole virtual size) into its empty
//!   `base`, `block-job-complete` at READY (the pivot onto `base`).
//!
//! Each run recreates the image the job writes (`top` for stream, `base` for commit), starts the
//! daemon, adds the chain with `blockdev-add`, then times from sending the job's command to
//! - **done**: the job's `BLOCK_JOB_COMPLETED` event, and
//! - **flushed**: the return of the `blockdev-del`s of the chain's written nodes (after the job's
//!   `JOB_STATUS_CHANGE` to `null`); both daemons write their caches out and `fdatasync` on
//!   close.
//!
//! Then `quit`, and `qemu-img compare` of what the job wrote against what it had to hold (a flat
//! copy of the chain for stream, `top` for commit): a run that differs aborts the benchmark.
//! Runs alternate between the daemons (which goes first alternates too). Figures: best and
//! median MiB/s of the virtual size, MiB per CPU second of the daemon (user + system, from
//! `/proc`: a loaded machine disturbs it far less than the rates), and the ratios blockjobd /
//! qemu-storage-daemon.
//!
//! `cargo bench -p blockjobs-tests --bench chain`. Environment:
//! - `CHAIN_BENCH_SIZE` virtual size (default `1G`; `64M` under `cargo test`),
//! - `CHAIN_BENCH_RUNS` runs per daemon and job (default 3; 1 under `cargo test`),
//! - `CHAIN_BENCH_DIR` where the temp dir with the images goes (default the system temp dir),
//! - `CHAIN_BENCH_ONLY` `stream` or `commit` to run one of the two.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, qcow2_node};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(600);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn tool(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e} (install qemu-utils)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create(dir: &Path, file: &str, backing: Option<&str>, size: &str) {
    let _ = std::fs::remove_file(dir.join(file));
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([file, size]);
    tool("qemu-img", &args, dir);
}

/// The two jobs measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Job {
    Stream,
    ActiveCommit,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Stream => "stream",
            Job::ActiveCommit => "commit",
        }
    }

    /// The chain's layers, bottom first.
    fn layers(self) -> &'static [&'static str] {
        match self {
            Job::Stream => &["base", "mid", "top"],
            Job::ActiveCommit => &["base", "top"],
        }
    }

    /// Images made once per benchmark.
    fn prepare(self, dir: &Path, size: &str, bytes: u64) {
        let half = format!("{}", bytes / 2);
        match self {
            Job::Stream => {
                create(dir, "base.qcow2", None, size);
                tool(
                    "qemu-io",
                    &[
                        "-f",
                        "qcow2",
                        "-c",
                        &format!("write -P 0x11 0 {half}"),
                        "base.qcow2",
                    ],
                    dir,
                );
                create(dir, "mid.qcow2", Some("base.qcow2"), size);
                let write = format!("write -P 0x22 {half} {half}");
                tool("qemu-io", &["-f", "qcow2", "-c", &write, "mid.qcow2"], dir);
                create(dir, "top.qcow2", Some("mid.qcow2"), size);
                tool(
                    "qemu-img",
                    &["convert", "-O", "qcow2", "top.qcow2", "ref.qcow2"],
                    dir,
                );
            }
            Job::ActiveCommit => {
                create(dir, "base.qcow2", None, size);
                create(dir, "top.qcow2", Some("base.qcow2"), size);
                let write = format!("write -P 0xab 0 {bytes}");
                tool("qemu-io", &["-f", "qcow2", "-c", &write, "top.qcow2"], dir);
            }
        }
    }

    /// The image the job writes, fresh for a run.
    fn reset(self, dir: &Path, size: &str) {
        match self {
            Job::Stream => create(dir, "top.qcow2", Some("mid.qcow2"), size),
            Job::ActiveCommit => create(dir, "base.qcow2", None, size),
        }
    }

    /// What must read the same after a run.
    fn compared(self) -> (&'static str, &'static str) {
        match self {
            Job::Stream => ("top.qcow2", "ref.qcow2"),
            Job::ActiveCommit => ("base.qcow2", "top.qcow2"),
        }
    }
}

/// The CPU time process `pid` has used so far (user + system, all its threads), from
/// `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat: (comm)") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| fields[i].parse::<u64>().expect("stat: a number of ticks");
    // SAFETY: sysconf reads a configuration value, nothing else.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).expect("CLK_TCK").max(1);
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// One run's times.
struct Times {
    /// Until BLOCK_JOB_COMPLETED.
    done: Duration,
    /// Until its images are flushed and closed.
    flushed: Duration,
    /// The daemon's CPU time from its start to then.
    cpu: Duration,
}

/// One timed job.
fn run_once(program: &Path, dir: &Path, job: Job, size: &str) -> Times {
    job.reset(dir, size);
    let mut daemon = Daemon::spawn(program, dir);
    let mut qmp = daemon.connect();
    let mut backing = Value::Null;
    for layer in job.layers() {
        let mut node = qcow2_node(layer, &dir.join(format!("{layer}.qcow2")));
        node["backing"] = backing;
        qmp.execute("blockdev-add", node)
            .unwrap_or_else(|e| panic!("blockdev-add {layer}: {e}"));
        backing = json!(layer);
    }
    let start = Instant::now();
    let completed = match job {
        Job::Stream => {
            qmp.execute("block-stream", json!({"job-id": "j", "device": "top"}))
                .unwrap_or_else(|e| panic!("block-stream: {e}"));
            qmp.wait_event("BLOCK_JOB_COMPLETED", WAIT, |d| d["device"] == "j")
        }
        Job::ActiveCommit => {
            qmp.execute("block-commit", json!({"job-id": "j", "device": "top"}))
                .unwrap_or_else(|e| panic!("block-commit: {e}"));
            qmp.wait_event("BLOCK_JOB_READY", WAIT, |d| d["device"] == "j");
            qmp.execute("block-job-complete", json!({"device": "j"}))
                .unwrap_or_else(|e| panic!("block-job-complete: {e}"));
            qmp.wait_event("BLOCK_JOB_COMPLETED", WAIT, |d| d["device"] == "j")
        }
    };
    let done = start.elapsed();
    assert!(
        completed["data"].get("error").is_none(),
        "{}: {} failed: {completed}",
        program.display(),
        job.name()
    );
    qmp.wait_event("JOB_STATUS_CHANGE", WAIT, |d| {
        d["id"] == "j" && d["status"] == "null"
    });
    // Top first: it holds the layers below.
    for layer in job.layers().iter().rev() {
        qmp.execute("blockdev-del", json!({"node-name": layer}))
            .unwrap_or_else(|e| panic!("blockdev-del {layer}: {e}"));
    }
    let flushed = start.elapsed();
    let cpu = cpu_time(daemon.pid());
    qmp.send("quit", json!({}));
    assert!(
        daemon.wait_exit(Duration::from_secs(60)),
        "{} did not quit",
        program.display()
    );
    let (a, b) = job.compared();
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2", a, b])
        .current_dir(dir)
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "{}: after {}, {a} does not read as {b}",
        program.display(),
        job.name()
    );
    Times { done, flushed, cpu }
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
        _ => return size.parse().expect("CHAIN_BENCH_SIZE: a number with K/M/G"),
    };
    digits.parse::<u64>().expect("CHAIN_BENCH_SIZE number") << shift
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep it small then.
    let testing = !std::env::args().any(|a| a == "--bench");
    let size = env_or("CHAIN_BENCH_SIZE", if testing { "64M" } else { "1G" });
    let runs: usize = env_or("CHAIN_BENCH_RUNS", if testing { "1" } else { "3" })
        .parse()
        .expect("CHAIN_BENCH_RUNS: a number");
    assert!(runs > 0, "CHAIN_BENCH_RUNS must be at least 1");
    let only = std::env::var("CHAIN_BENCH_ONLY").ok();
    let bytes = size_in_bytes(&size);
    let parent = std::env::var_os("CHAIN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let ours = blockjobd();
    let qsd = PathBuf::from("qemu-storage-daemon");
    let qsd_ok = Command::new(&qsd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        qsd_ok,
        "qemu-storage-daemon is needed for the comparison: install qemu-utils (10.0)"
    );
    for job in [Job::Stream, Job::ActiveCommit] {
        if only.as_deref().is_some_and(|o| o != job.name()) {
            continue;
        }
        let dir = tempfile::Builder::new()
            .prefix("chain-bench")
            .tempdir_in(&parent)
            .expect("temp dir for images");
        job.prepare(dir.path(), &size, bytes);
        println!(
            "{} of {size} in {}, {runs} run(s) each",
            match job {
                Job::Stream => "block-stream of a base <- mid <- top chain into top",
                Job::ActiveCommit => "active block-commit of top into base, completed at READY",
            },
            dir.path().display()
        );
        let (mut ours_t, mut qsd_t) = (Vec::new(), Vec::new());
        for run in 0..runs {
            // Which daemon goes first alternates.
            if run % 2 == 0 {
                ours_t.push(run_once(&ours, dir.path(), job, &size));
                qsd_t.push(run_once(&qsd, dir.path(), job, &size));
            } else {
                qsd_t.push(run_once(&qsd, dir.path(), job, &size));
                ours_t.push(run_once(&ours, dir.path(), job, &size));
            }
        }
        let row = |name: &str, what: &str, times: Vec<Duration>| {
            let f = figures(bytes, &times);
            println!(
                "{name:>20} {what:<26} best {:>8.1} MiB/s  median {:>8.1} MiB/s",
                f.best, f.median
            );
            f
        };
        let done = |t: &[Times]| t.iter().map(|x| x.done).collect::<Vec<_>>();
        let flushed = |t: &[Times]| t.iter().map(|x| x.flushed).collect::<Vec<_>>();
        let cpu = |t: &[Times]| t.iter().map(|x| x.cpu).collect::<Vec<_>>();
        let od = row("blockjobd", "until BLOCK_JOB_COMPLETED", done(&ours_t));
        let of = row("blockjobd", "until images flushed", flushed(&ours_t));
        let oc = row("blockjobd", "per CPU second", cpu(&ours_t));
        let qd = row(
            "qemu-storage-daemon",
            "until BLOCK_JOB_COMPLETED",
            done(&qsd_t),
        );
        let qf = row(
            "qemu-storage-daemon",
            "until images flushed",
            flushed(&qsd_t),
        );
        let qc = row("qemu-storage-daemon", "per CPU second", cpu(&qsd_t));
        println!(
            "{:>20} completed: best {:.2}, median {:.2}; flushed: best {:.2}, median {:.2}; \
             per CPU second: median {:.2}",
            "ours / QSD",
            od.best / qd.best,
            od.median / qd.median,
            of.best / qf.best,
            of.median / qf.median,
            oc.median / qc.median
        );
    }
}
