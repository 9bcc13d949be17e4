//! Shutdown tells the truth (issue 10, item 4), end to end beside qemu-storage-daemon: on
//! SIGTERM, SIGINT or `quit` with jobs running, every job is paused, then cancelled one at a
//! time, newest first, and the clients see every event of it (`paused`, then per job
//! `running`, `aborting`, `BLOCK_JOB_CANCELLED`, `concluded`, `null`) before the connection
//! closes; then the images are flushed and closed, and an image that cannot be flushed makes
//! the exit status non-zero (qemu-storage-daemon 10.0.2 exits 0 there, saying nothing).

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const QSD: &str = "qemu-storage-daemon";
const WAIT: Duration = Duration::from_secs(30);

/// One line per message, without timestamps and without a job's progress (how far a
/// throttled job got before the signal is not part of the contract).
fn summary(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            if let Some(name) = m["event"].as_str() {
                let d = &m["data"];
                match name {
                    "JOB_STATUS_CHANGE" => format!("{name} {} {}", d["id"], d["status"]),
                    "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_COMPLETED" => format!(
                        "{name} {} {} len={} speed={} error={}",
                        d["device"], d["type"], d["len"], d["speed"], d["error"]
                    ),
                    _ => format!("{name} {d}"),
                }
            } else if let Some(e) = m.get("error") {
                format!("error {e}")
            } else {
                format!("return {}", m["return"])
            }
        })
        .collect()
}

fn null_nodes(qmp: &mut Qmp, names: &[&str]) {
    for name in names {
        qmp.execute(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": name, "size": 1u64 << 30}),
        )
        .unwrap();
    }
}

fn backup(id: &str, n: u32, extra: Value) -> Value {
    let mut args = json!({
        "job-id": id, "device": format!("s{n}"), "target": format!("t{n}"),
        "sync": "full", "speed": 1,
    });
    if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    args
}

/// Waits until `count` jobs have each copied their first request (1 MiB) and sleep in their
/// rate limit (`busy: false`), so that the stop finds each at the same point in both
/// daemons; forgets the events of the start, which are not what these tests are about.
fn settle(qmp: &mut Qmp, count: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let jobs = qmp.execute("query-block-jobs", json!({})).unwrap();
        let jobs = jobs.as_array().cloned().unwrap_or_default();
        let settled = jobs.len() == count
            && jobs
                .iter()
                .all(|j| j["busy"] == false && j["offset"].as_u64().is_some_and(|o| o > 0));
        if settled {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs did not settle: {jobs:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = qmp.until_now();
}

/// How the jobs are started before the daemon is stopped.
#[derive(Clone, Copy, Debug)]
enum Jobs {
    /// Three throttled backups: `a`, `b` (auto-dismiss off), `c` (auto-finalize off).
    Three,
    /// `a` and `b` in one grouped transaction, then `c` alone.
    Grouped,
}

/// How the daemon is stopped.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Signal(&'static str),
    Quit,
}

/// Starts the jobs, stops the daemon; returns every message after the last job was started
/// (until the connection closed) and the exit code.
fn stop_with_jobs(program: &Path, jobs: Jobs, stop: Stop) -> (Vec<String>, Option<i32>) {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::spawn(program, dir.path());
    let mut qmp = daemon.connect();
    null_nodes(&mut qmp, &["s1", "t1", "s2", "t2", "s3", "t3"]);
    match jobs {
        Jobs::Three => {
            qmp.execute("blockdev-backup", backup("a", 1, json!({})))
                .unwrap();
            qmp.execute(
                "blockdev-backup",
                backup("b", 2, json!({"auto-dismiss": false})),
            )
            .unwrap();
            qmp.execute(
                "blockdev-backup",
                backup("c", 3, json!({"auto-finalize": false})),
            )
            .unwrap();
        }
        Jobs::Grouped => {
            let action =
                |id, n| json!({"type": "blockdev-backup", "data": backup(id, n, json!({}))});
            qmp.execute(
                "transaction",
                json!({"actions": [action("a", 1), action("b", 2)],
                       "properties": {"completion-mode": "grouped"}}),
            )
            .unwrap();
            qmp.execute("blockdev-backup", backup("c", 3, json!({})))
                .unwrap();
        }
    }
    settle(&mut qmp, 3);
    match stop {
        Stop::Signal(name) => daemon.signal(name),
        Stop::Quit => qmp.send("quit", json!({})),
    }
    let after = qmp.until_closed(WAIT);
    (summary(&after), daemon.wait_exit_code(WAIT))
}

/// Per job, newest first: QEMU's `job_cancel_sync_all` after `bdrv_drain_all_begin`.
fn cancelled(id: &str) -> Vec<String> {
    vec![
        format!("JOB_STATUS_CHANGE \"{id}\" \"running\""),
        format!("JOB_STATUS_CHANGE \"{id}\" \"aborting\""),
        format!("BLOCK_JOB_CANCELLED \"{id}\" \"backup\" len=1073741824 speed=1 error=null"),
        format!("JOB_STATUS_CHANGE \"{id}\" \"concluded\""),
        format!("JOB_STATUS_CHANGE \"{id}\" \"null\""),
    ]
}

fn expected(stop: Stop) -> Vec<String> {
    let mut want: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|id| format!("JOB_STATUS_CHANGE \"{id}\" \"paused\""))
        .collect();
    for id in ["c", "b", "a"] {
        want.extend(cancelled(id));
    }
    if let Stop::Quit = stop {
        want.push("return {}".into());
    }
    want
}

#[test]
fn sigterm_sigint_and_quit_cancel_every_job_with_qemu_storage_daemons_events() {
    let ours = blockjobd();
    for stop in [Stop::Signal("TERM"), Stop::Signal("INT"), Stop::Quit] {
        for jobs in [Jobs::Three, Jobs::Grouped] {
            let (reference, reference_code) = stop_with_jobs(Path::new(QSD), jobs, stop);
            let (got, code) = stop_with_jobs(&ours, jobs, stop);
            assert_eq!(
                reference,
                expected(stop),
                "qemu-storage-daemon's events on {stop:?} with {jobs:?} are not what this test knows"
            );
            assert_eq!(
                got, reference,
                "blockjobd's events on {stop:?} with {jobs:?}"
            );
            assert_eq!(reference_code, Some(0));
            assert_eq!(
                code,
                Some(0),
                "blockjobd's exit code on {stop:?} with {jobs:?}"
            );
        }
    }
}

/// A raw image over blkdebug whose flushes fail from the first flush event on, written by a
/// throttled backup that is still running when SIGTERM comes.
fn flush_fails_at_shutdown(program: &Path, inject: bool) -> (Vec<String>, Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let log = dir.path().join("stderr.log");
    let mut daemon = Daemon::spawn_with_stderr(program, dir.path(), &log);
    let mut qmp = daemon.connect();
    qmp.execute(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "s1", "size": 64u64 << 20}),
    )
    .unwrap();
    let rules = if inject {
        json!([{"event": "flush_to_os", "iotype": "flush"}])
    } else {
        json!([])
    };
    qmp.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "t1", "file": {
            "driver": "blkdebug", "inject-error": rules,
            "image": {"driver": "file", "filename": image.to_str().unwrap()}}}),
    )
    .unwrap();
    qmp.execute("blockdev-backup", backup("j", 1, json!({})))
        .unwrap();
    settle(&mut qmp, 1);
    daemon.signal("TERM");
    let after = summary(&qmp.until_closed(WAIT));
    let code = daemon.wait_exit_code(WAIT);
    (
        after,
        code,
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn an_image_that_cannot_be_flushed_at_shutdown_makes_the_exit_status_non_zero() {
    let ours = blockjobd();
    let (events, code, stderr) = flush_fails_at_shutdown(&ours, true);
    let mut want = vec!["JOB_STATUS_CHANGE \"j\" \"paused\"".to_string()];
    want.extend(
        cancelled("j")
            .into_iter()
            .map(|l| l.replace("1073741824", "67108864")),
    );
    let want: Vec<String> = want
        .into_iter()
        .map(|l| l.replace("\"c\"", "\"j\""))
        .collect();
    assert_eq!(
        events, want,
        "the job is cancelled as without the failing flush"
    );
    assert_eq!(
        code,
        Some(1),
        "exit status with a failing flush (stderr: {stderr})"
    );
    assert!(
        stderr.contains("blockjobd: closing images:") && stderr.contains("Input/output error"),
        "stderr names the failed close: {stderr}"
    );

    // The same without the rule: a clean exit.
    let (_, code, stderr) = flush_fails_at_shutdown(&ours, false);
    assert_eq!(
        code,
        Some(0),
        "exit status without a failing flush (stderr: {stderr})"
    );

    // qemu-storage-daemon 10.0.2 sends the same events, then exits 0 without a word.
    let (reference, code, _) = flush_fails_at_shutdown(Path::new(QSD), true);
    assert_eq!(reference, events);
    assert_eq!(code, Some(0), "qemu-storage-daemon's exit status changed");
}
