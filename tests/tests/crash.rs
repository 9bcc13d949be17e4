//! Crash safety: `kill -9` of blockjobd in the middle of a backup or a snapshot never leaves a
//! corrupt qcow2 image behind. After every kill, `qemu-img check` on every image involved
//! (source, backup target, snapshot overlay) must exit 0 (clean) or 3 (leaked clusters only,
//! which QEMU itself allows after a crash), never 2 (corruption) or 1 (check failed); and the
//! source must still read exactly as before (`qemu-img compare`). An overlay file killed before
//! its creation wrote anything (empty or all zeros) is not an image yet and is not checked.
//!
//! Each scenario is first run to completion once to measure how long it takes (T); the 20 kills
//! then land at evenly spread points from 0 to 1.2 × T after the command is sent, so they cover
//! the set-up, the copy or metadata updates, and the end.
//!
//! `CRASH_DAEMON=/path/to/qemu-storage-daemon` runs the same tests against another daemon
//! (the reference, as a control of the tests themselves).

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp, qcow2_node};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const KILLS: u32 = 20;
const IMAGE_SIZE: &str = "32M";

fn daemon_program() -> PathBuf {
    std::env::var_os("CRASH_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(blockjobd)
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// The pristine images every run starts from: a source full of data (a few patterns, so the
/// copy is not uniform) and an empty qcow2 backup target of the same size.
struct Pristine {
    _dir: tempfile::TempDir,
    source: PathBuf,
    target: PathBuf,
}

fn pristine() -> Pristine {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("src.qcow2");
    let target = dir.path().join("tgt.qcow2");
    for image in [&source, &target] {
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", path_str(image), IMAGE_SIZE],
        );
    }
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 24M",
            "-c",
            "write -P 0x5c 8M 4M",
            "-c",
            "write -z 28M 2M",
            path_str(&source),
        ],
    );
    Pristine {
        _dir: dir,
        source,
        target,
    }
}

/// A file holding no data yet: empty, or only zeros.
fn never_written(file: &Path) -> bool {
    std::fs::read(file)
        .expect("read image file")
        .iter()
        .all(|&b| b == 0)
}

/// The first and last lines of a long `qemu-img check` report (one line per bad cluster).
fn abridged(report: &str) -> String {
    let lines: Vec<&str> = report.lines().collect();
    if lines.len() <= 12 {
        return report.to_string();
    }
    format!(
        "{}\n  ... {} more lines ...\n{}\n",
        lines[..4].join("\n"),
        lines.len() - 10,
        lines[lines.len() - 6..].join("\n")
    )
}

/// One run's working copy of the images and its daemon.
struct Run {
    dir: tempfile::TempDir,
    daemon: Daemon,
    qmp: Qmp,
}

impl Run {
    fn start(pristine: &Pristine) -> Run {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::copy(&pristine.source, dir.path().join("src.qcow2")).expect("copy source");
        std::fs::copy(&pristine.target, dir.path().join("tgt.qcow2")).expect("copy target");
        let daemon = Daemon::spawn(&daemon_program(), dir.path());
        let mut qmp = daemon.connect();
        for (node, file) in [("src", "src.qcow2"), ("tgt", "tgt.qcow2")] {
            qmp.execute("blockdev-add", qcow2_node(node, &dir.path().join(file)))
                .unwrap_or_else(|e| panic!("blockdev-add {node}: {e}"));
        }
        Run { dir, daemon, qmp }
    }

    /// `qemu-img check` on every qcow2 file of the run; describes each image with a verdict
    /// other than clean (0) or leaked clusters only (3).
    fn corrupt_images(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("list run dir")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
            .collect();
        files.sort();
        for file in files {
            if never_written(&file) {
                // An overlay whose creation was interrupted before its first byte: no image yet
                // (the command never succeeded), nothing that could be corrupt.
                continue;
            }
            let out = Command::new("qemu-img")
                .args(["check", "-f", "qcow2", path_str(&file)])
                .output()
                .expect("run qemu-img check");
            let code = out.status.code();
            if !matches!(code, Some(0) | Some(3)) {
                bad.push(format!(
                    "{}: qemu-img check exit {code:?}\n{}{}",
                    file.display(),
                    abridged(&String::from_utf8_lossy(&out.stdout)),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        bad
    }

    /// None of the scenarios changes what the source reads as: `qemu-img compare` with the
    /// pristine source must find them identical.
    fn source_changed(&self, pristine: &Pristine) -> Option<String> {
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&pristine.source)
            .arg(self.dir.path().join("src.qcow2"))
            .output()
            .expect("run qemu-img compare");
        (!out.status.success()).then(|| {
            format!(
                "src.qcow2 no longer reads as before: qemu-img compare exit {:?}\n{}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Keeps the run's directory (for the failure report) and returns its path.
    fn keep(self) -> PathBuf {
        drop(self.qmp);
        drop(self.daemon);
        self.dir.keep()
    }
}

/// A scenario: `send` issues the command(s) without waiting, `done` waits until the work has
/// finished (used once, to measure how long the work takes).
struct Scenario {
    name: &'static str,
    send: fn(&mut Qmp, &Path),
    done: fn(&mut Qmp),
}

fn measure(pristine: &Pristine, scenario: &Scenario) -> Duration {
    let mut run = Run::start(pristine);
    let started = Instant::now();
    (scenario.send)(&mut run.qmp, run.dir.path());
    (scenario.done)(&mut run.qmp);
    let took = started.elapsed();
    run.qmp.send("quit", json!({}));
    run.daemon.wait_exit(Duration::from_secs(30));
    let bad = run.corrupt_images();
    assert!(
        bad.is_empty(),
        "{}: images corrupt after a clean run:\n{}",
        scenario.name,
        bad.join("\n")
    );
    took
}

/// Runs `scenario` KILLS times, killing the daemon at spread points; returns a description of
/// every run that left a corrupt image.
fn kill_repeatedly(scenario: &Scenario) -> Vec<String> {
    let pristine = pristine();
    let full = measure(&pristine, scenario);
    let mut failures = Vec::new();
    for i in 0..KILLS {
        let delay = full.mul_f64(1.2 * f64::from(i) / f64::from(KILLS - 1));
        let mut run = Run::start(&pristine);
        (scenario.send)(&mut run.qmp, run.dir.path());
        let deadline = Instant::now() + delay;
        std::thread::sleep(delay);
        while Instant::now() < deadline {}
        run.daemon.kill();
        let mut bad = run.corrupt_images();
        bad.extend(run.source_changed(&pristine));
        if !bad.is_empty() {
            let dir = run.keep();
            failures.push(format!(
                "{} killed {delay:?} after the command (full run {full:?}); images kept in {}:\n{}",
                scenario.name,
                dir.display(),
                bad.join("\n")
            ));
        }
    }
    failures
}

fn assert_never_corrupt(scenario: Scenario) {
    let failures = kill_repeatedly(&scenario);
    assert!(
        failures.is_empty(),
        "{} of {KILLS} kills left a corrupt image:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn job_completed(qmp: &mut Qmp) {
    let event = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |d| {
        d["device"] == "j"
    });
    assert!(
        event["data"].get("error").is_none(),
        "backup failed: {event}"
    );
}

fn reply_ok(qmp: &mut Qmp) {
    if let Err(e) = qmp.reply() {
        panic!("command failed: {e}");
    }
}

fn overlay_args(dir: &Path) -> Value {
    json!({
        "node-name": "src",
        "snapshot-file": path_str(&dir.join("ovl.qcow2")),
        "snapshot-node-name": "ovl",
        "format": "qcow2",
    })
}

fn internal_args() -> Value {
    json!({"device": "src", "name": "snap0"})
}

#[test]
fn killing_the_daemon_mid_backup_never_corrupts_an_image() {
    assert_never_corrupt(Scenario {
        name: "blockdev-backup sync=full",
        send: |qmp, _| {
            qmp.send(
                "blockdev-backup",
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
            )
        },
        done: job_completed,
    });
}

#[test]
fn killing_the_daemon_mid_throttled_backup_never_corrupts_an_image() {
    // 64 MiB/s: the 32 MiB copy takes about half a second, in rate-limited slices.
    assert_never_corrupt(Scenario {
        name: "blockdev-backup sync=full speed=64MiB/s",
        send: |qmp, _| {
            qmp.send(
                "blockdev-backup",
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                       "speed": 64 << 20}),
            )
        },
        done: job_completed,
    });
}

#[test]
fn killing_the_daemon_mid_external_snapshot_never_corrupts_an_image() {
    assert_never_corrupt(Scenario {
        name: "blockdev-snapshot-sync",
        send: |qmp, dir| qmp.send("blockdev-snapshot-sync", overlay_args(dir)),
        done: reply_ok,
    });
}

#[test]
fn killing_the_daemon_mid_internal_snapshot_never_corrupts_an_image() {
    assert_never_corrupt(Scenario {
        name: "blockdev-snapshot-internal-sync",
        send: |qmp, _| qmp.send("blockdev-snapshot-internal-sync", internal_args()),
        done: reply_ok,
    });
}

#[test]
fn killing_the_daemon_mid_snapshot_transaction_never_corrupts_an_image() {
    assert_never_corrupt(Scenario {
        name: "transaction [blockdev-snapshot-internal-sync, blockdev-snapshot-sync]",
        send: |qmp, dir| {
            qmp.send(
                "transaction",
                json!({"actions": [
                    {"type": "blockdev-snapshot-internal-sync", "data": internal_args()},
                    {"type": "blockdev-snapshot-sync", "data": overlay_args(dir)},
                ]}),
            )
        },
        done: reply_ok,
    });
}

#[test]
fn killing_the_daemon_mid_mirror_never_corrupts_an_image() {
    // Killed while copying and while READY (the filter above the source, the job's bitmap).
    assert_never_corrupt(Scenario {
        name: "blockdev-mirror sync=full",
        send: |qmp, _| {
            qmp.send(
                "blockdev-mirror",
                json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                       "filter-node-name": "mt"}),
            )
        },
        done: |qmp| {
            qmp.wait_event("BLOCK_JOB_READY", Duration::from_secs(60), |d| {
                d["device"] == "j"
            });
        },
    });
}
