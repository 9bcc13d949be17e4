//! Crash safety: `kill -9` of blockjobd in the middle of a backup, a snapshot, a stream or a
//! commit (intermediate or active, up to READY and through the pivot) never leaves a corrupt
//! qcow2 image behind. After every kill, `qemu-img check` on every image involved (source, backup target, snapshot overlay, every layer of a chain) must exit 0
//! (clean) or 3 (leaked clusters only, which QEMU itself allows after a crash), never 2
//! (corruption) or 1 (check failed); and what the guest sees must still read exactly as before
//! (`qemu-img compare` of the source, or of a chain's top through whatever chain its header
//! names now). An overlay file killed before its creation wrote anything (empty or all zeros) is
//! not an image yet and is not checked.
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

/// The pristine images every run starts from (copied into each run's directory), the nodes
/// each run adds, and the image whose guest-visible content no scenario may change.
struct Pristine {
    dir: tempfile::TempDir,
    /// File names in `dir`.
    files: Vec<&'static str>,
    /// `blockdev-add` arguments, given the run's directory.
    nodes: fn(&Path) -> Vec<Value>,
    /// The file name of the image the guest sees.
    guest: &'static str,
}

/// A source full of data (a few patterns, so the copy is not uniform) and an empty qcow2
/// backup target of the same size, added as `src` and `tgt`.
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
        dir,
        files: vec!["src.qcow2", "tgt.qcow2"],
        nodes: |d| {
            vec![
                qcow2_node("src", &d.join("src.qcow2")),
                qcow2_node("tgt", &d.join("tgt.qcow2")),
            ]
        },
        guest: "src.qcow2",
    }
}

/// A chain base <- mid <- top <- top2 (backing file names relative, so the files can be copied),
/// each layer with data of its own over part of the layers below, added as named nodes.
fn chain_pristine() -> Pristine {
    let dir = tempfile::tempdir().expect("temp dir");
    let layers = [
        ("base.qcow2", None, "write -P 0xab 0 24M"),
        ("mid.qcow2", Some("base.qcow2"), "write -P 0x5c 8M 8M"),
        ("top.qcow2", Some("mid.qcow2"), "write -P 0x3d 12M 12M"),
        ("top2.qcow2", Some("top.qcow2"), "write -z 28M 2M"),
    ];
    for (file, backing, write) in layers {
        let path = dir.path().join(file);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some(b) = backing {
            args.extend(["-b", b, "-F", "qcow2"]);
        }
        args.extend([path_str(&path), IMAGE_SIZE]);
        // Relative backing names resolve against the image's own directory.
        let out = Command::new("qemu-img")
            .args(&args)
            .current_dir(dir.path())
            .output()
            .expect("run qemu-img (install qemu-utils)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        run("qemu-io", &["-f", "qcow2", "-c", write, path_str(&path)]);
    }
    Pristine {
        dir,
        files: vec!["base.qcow2", "mid.qcow2", "top.qcow2", "top2.qcow2"],
        nodes: |d| {
            let mut backing = Value::Null;
            let mut nodes = Vec::new();
            for layer in ["base", "mid", "top", "top2"] {
                let mut node = qcow2_node(layer, &d.join(format!("{layer}.qcow2")));
                node["backing"] = backing;
                nodes.push(node);
                backing = json!(layer);
            }
            nodes
        },
        guest: "top2.qcow2",
    }
}

/// A file that is no image yet: empty, only zeros, or a creation killed before its header
/// was written (its first 512 bytes are zeros: the qcow2 creation writes the refcount
/// structures first and the header last, so no header means nothing points anywhere, and
/// nothing refers to the file). An image whose header was lost later is still caught: the
/// guest's chain would no longer read as before.
fn never_written(file: &Path) -> bool {
    let bytes = std::fs::read(file).expect("read image file");
    bytes.iter().take(512).all(|&b| b == 0)
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
        for file in &pristine.files {
            std::fs::copy(pristine.dir.path().join(file), dir.path().join(file))
                .unwrap_or_else(|e| panic!("copy {file}: {e}"));
        }
        let daemon = Daemon::spawn(&daemon_program(), dir.path());
        let mut qmp = daemon.connect();
        for node in (pristine.nodes)(dir.path()) {
            qmp.execute("blockdev-add", node.clone())
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
                // An overlay whose creation was interrupted before its header: no image yet
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

    /// None of the scenarios changes what the guest reads: `qemu-img compare` with the
    /// pristine image (through the chains each header names) must find them identical.
    fn source_changed(&self, pristine: &Pristine) -> Option<String> {
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(pristine.dir.path().join(pristine.guest))
            .arg(self.dir.path().join(pristine.guest))
            .output()
            .expect("run qemu-img compare");
        (!out.status.success()).then(|| {
            format!(
                "{} no longer reads as before: qemu-img compare exit {:?}\n{}{}",
                pristine.guest,
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

/// Runs `scenario` KILLS times on `pristine`'s images, killing the daemon at spread points;
/// returns a description of every run that left a corrupt image.
fn kill_repeatedly(pristine: &Pristine, scenario: &Scenario) -> Vec<String> {
    let full = measure(pristine, scenario);
    let mut failures = Vec::new();
    for i in 0..KILLS {
        let delay = full.mul_f64(1.2 * f64::from(i) / f64::from(KILLS - 1));
        let mut run = Run::start(pristine);
        (scenario.send)(&mut run.qmp, run.dir.path());
        let deadline = Instant::now() + delay;
        std::thread::sleep(delay);
        while Instant::now() < deadline {}
        run.daemon.kill();
        let mut bad = run.corrupt_images();
        bad.extend(run.source_changed(pristine));
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
    assert_never_corrupt_on(&pristine(), scenario);
}

fn assert_never_corrupt_on(pristine: &Pristine, scenario: Scenario) {
    let failures = kill_repeatedly(pristine, &scenario);
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
    assert!(event["data"].get("error").is_none(), "job failed: {event}");
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

#[test]
fn killing_the_daemon_mid_stream_never_corrupts_an_image() {
    // Killed while copying the chain into top2, and while relinking it and rewriting its header.
    assert_never_corrupt_on(
        &chain_pristine(),
        Scenario {
            name: "block-stream of the whole chain",
            send: |qmp, _| qmp.send("block-stream", json!({"job-id": "j", "device": "top2"})),
            done: job_completed,
        },
    );
}

#[test]
fn killing_the_daemon_mid_intermediate_commit_never_corrupts_an_image() {
    // Killed while copying top and mid into base, and while dropping them from the chain.
    assert_never_corrupt_on(
        &chain_pristine(),
        Scenario {
            name: "block-commit of top and mid into base",
            send: |qmp, _| {
                qmp.send(
                    "block-commit",
                    json!({"job-id": "j", "device": "top2", "top-node": "top",
                           "base-node": "base"}),
                )
            },
            done: job_completed,
        },
    );
}

fn active_commit(qmp: &mut Qmp) {
    qmp.send("block-commit", json!({"job-id": "j", "device": "top2"}));
}

fn active_commit_ready(qmp: &mut Qmp) {
    qmp.wait_event("BLOCK_JOB_READY", Duration::from_secs(60), |d| {
        d["device"] == "j"
    });
}

#[test]
fn killing_the_daemon_mid_active_commit_never_corrupts_an_image() {
    // Killed while copying top2, top and mid into base (the mirror_top filter above top2, the
    // base reopened read-write), and while READY.
    assert_never_corrupt_on(
        &chain_pristine(),
        Scenario {
            name: "active block-commit of the whole chain, to READY",
            send: |qmp, _| active_commit(qmp),
            done: active_commit_ready,
        },
    );
}

#[test]
fn killing_the_daemon_mid_active_commit_completion_never_corrupts_an_image() {
    // Killed between block-job-complete and the end: the pivot of top2's users onto base.
    assert_never_corrupt_on(
        &chain_pristine(),
        Scenario {
            name: "active block-commit of the whole chain, completed",
            send: |qmp, _| {
                active_commit(qmp);
                active_commit_ready(qmp);
                qmp.send("block-job-complete", json!({"device": "j"}));
            },
            done: job_completed,
        },
    );
}
