//! The client (`qmp-client`) against real servers: blockjobd and qemu-storage-daemon 10.0.2,
//! both driven through blockjobd's generated API (`qmp-api`, a subset of QSD's schema).
//! The same scenario runs on both: greeting, typed replies, QMP errors as sent, a
//! grouped transaction whose jobs the client collects, waiting for and following jobs,
//! many calls in flight, typed events, and `quit`.

use blockjobs_tests::qmp::Daemon;
use blockjobs_tests::{blockjobd, require_tool};
use qmp_api::{
    BlockJobStatus, Event, JobDismissArguments, JobFinalizeArguments, QueryJobsArguments,
    QueryVersionArguments, TransactionArguments,
};
use qmp_client::{Client, Error, ErrorClass};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn null_node(client: &Client, name: &str, size: u64) {
    client
        .execute_value(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": name, "size": size}),
        )
        .await
        .unwrap_or_else(|e| panic!("blockdev-add {name}: {e}"));
}

fn backup(job: &str, source: &str, target: &str) -> Value {
    json!({"type": "blockdev-backup", "data": {
        "job-id": job, "device": source, "target": target, "sync": "full",
        "auto-finalize": false, "auto-dismiss": false}})
}

async fn scenario(program: &Path, expected_major: i64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(program, dir.path());
    // The socket file appears at bind(), a moment before listen(): a refused
    // connection is retried for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let client = loop {
        match Client::connect_unix(&daemon.socket).await {
            Ok(client) => break client,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("refused") => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(e) => panic!("connect and negotiate: {e}"),
        }
    };
    assert_eq!(
        client.greeting().expect("a greeting").version.major,
        expected_major
    );
    let mut events = client.events::<Event>();

    // Typed replies, and errors as the server sent them.
    let version = client
        .execute(QueryVersionArguments {})
        .await
        .expect("query-version");
    assert_eq!(version.qemu.major, expected_major);
    let error = client
        .execute(JobFinalizeArguments { id: "nope".into() })
        .await
        .expect_err("no such job");
    let qmp = error.qmp().expect("a QMP error");
    assert_eq!(qmp.class, ErrorClass::GenericError);
    assert_eq!(qmp.desc, "Job not found");
    let error = client
        .execute_value("no-such-command", Value::Null)
        .await
        .expect_err("unknown");
    assert!(
        matches!(&error, Error::Qmp(e) if e.class == ErrorClass::CommandNotFound
            && e.desc == "The command no-such-command has not been found"),
        "{error:?}"
    );

    // A grouped transaction of two backups: the client collects the jobs it started.
    for node in ["src", "t0", "t1"] {
        null_node(&client, node, 4 << 20).await;
    }
    let transaction: TransactionArguments = serde_json::from_value(json!({
        "actions": [backup("j0", "src", "t0"), backup("j1", "src", "t1")],
        "properties": {"completion-mode": "grouped"}
    }))
    .expect("transaction arguments");
    let ((), jobs) = client.transaction(transaction).await.expect("transaction");
    assert_eq!(jobs, ["j0", "j1"]);

    // Both wait for finalize (auto-finalize off); finalize one, both conclude.
    for job in &jobs {
        let pending = client
            .wait_job(job, BlockJobStatus::Pending)
            .await
            .expect("pending");
        assert_eq!(pending.status, BlockJobStatus::Pending);
    }
    client
        .execute(JobFinalizeArguments { id: "j0".into() })
        .await
        .expect("finalize");
    let concluded = client
        .wait_job("j1", BlockJobStatus::Concluded)
        .await
        .expect("concluded");
    assert_eq!(concluded.current, concluded.total);
    assert!(concluded.error.is_none());
    let error = client
        .wait_job("j0", BlockJobStatus::Running)
        .await
        .expect_err("j0 has ended");
    assert_eq!(
        error.to_string(),
        "Job 'j0' ended (concluded) without reaching 'running'"
    );

    // Many calls in flight at once, from many tasks.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.execute(QueryJobsArguments {}).await })
        })
        .collect();
    for call in calls {
        let listed = call.await.expect("task").expect("query-jobs");
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|j| j.status == BlockJobStatus::Concluded));
    }

    // Following a job: progress until it ends.
    null_node(&client, "t2", 4 << 20).await;
    let mut follow = client.follow_job::<BlockJobStatus>("j2", Duration::from_millis(5));
    let transaction: TransactionArguments = serde_json::from_value(json!({
        "actions": [backup("j2", "src", "t2")]
    }))
    .expect("transaction arguments");
    let ((), started) = client.transaction(transaction).await.expect("backup");
    assert_eq!(started, ["j2"]);
    let mut statuses = Vec::new();
    while let Some(progress) = follow.next().await {
        let progress = progress.expect("progress");
        assert_eq!(progress.id, "j2");
        statuses.push(progress.status);
        if progress.status == BlockJobStatus::Pending {
            client
                .execute(JobFinalizeArguments { id: "j2".into() })
                .await
                .expect("finalize j2");
        }
        if progress.has_ended() {
            assert_eq!(progress.current, progress.total);
        }
    }
    assert_eq!(statuses.last(), Some(&BlockJobStatus::Concluded));
    assert!(statuses.contains(&BlockJobStatus::Pending), "{statuses:?}");

    for job in ["j0", "j1", "j2"] {
        client
            .execute(JobDismissArguments { id: job.into() })
            .await
            .expect("dismiss");
    }

    // Following from before the job starts: its end is reported even when the job has
    // concluded and been dismissed (auto-dismiss) before the first `query-jobs`.
    null_node(&client, "t3", 4 << 20).await;
    let mut follow = client.follow_job::<BlockJobStatus>("j3", Duration::from_secs(3600));
    client
        .execute_value(
            "blockdev-backup",
            json!({"job-id": "j3", "device": "src", "target": "t3", "sync": "full"}),
        )
        .await
        .expect("blockdev-backup");
    let mut last = None;
    while let Some(progress) = follow.next().await {
        last = Some(progress.expect("progress"));
    }
    let last = last.expect("at least the end");
    assert_eq!(last.status, BlockJobStatus::Concluded);
    assert_eq!((last.current, last.total), (4 << 20, 4 << 20));

    // Every job's life as typed events, in order.
    client.quit().await.expect("quit");
    let mut lives: std::collections::BTreeMap<String, Vec<BlockJobStatus>> = Default::default();
    let mut completed = Vec::new();
    while let Some(event) = events.next().await {
        match event.expect("a typed event").event {
            Event::JobStatusChange(change) => {
                lives.entry(change.id).or_default().push(change.status)
            }
            Event::BlockJobCompleted(done) => completed.push(done.device),
            _ => {}
        }
    }
    for (job, life) in &lives {
        assert_eq!(
            life.first(),
            Some(&BlockJobStatus::Created),
            "{job}: {life:?}"
        );
        assert!(
            life.ends_with(&[
                BlockJobStatus::Waiting,
                BlockJobStatus::Pending,
                BlockJobStatus::Concluded,
                BlockJobStatus::Null,
            ]),
            "{job}: {life:?}"
        );
    }
    assert_eq!(lives.len(), 4);
    completed.sort();
    assert_eq!(completed, ["j0", "j1", "j2", "j3"]);
    drop(daemon);
}

#[test]
fn the_client_drives_blockjobd() {
    runtime().block_on(scenario(&blockjobd(), 10));
}

#[test]
fn the_client_drives_qemu_storage_daemon() {
    let qsd = require_tool("qemu-storage-daemon", "qemu-utils");
    runtime().block_on(scenario(&qsd, 10));
}
