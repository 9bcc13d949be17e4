//! The daemon's set-up: jobs on tokio, block I/O on tokio's blocking threads, real time.

use std::sync::{Arc, Mutex};

use blockdev::{BlockLayer, Blockdev, IoThreads};
use job::{TokioClock, TokioSpawn};
use serde_json::{Value, json};

fn call(bd: &mut Blockdev, name: &str, args: Value) -> Result<Value, qmp_api::QmpError> {
    qmp_api::dispatch(bd, name, args.as_object().cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_backup_runs_on_tokio_and_its_events_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let tgt = dir.path().join("tgt.raw");
    std::fs::write(&src, vec![7u8; 2 << 20]).unwrap();
    std::fs::write(&tgt, vec![0u8; 2 << 20]).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let mut bd = Blockdev::new(
        Arc::new(move |e: qmp_api::Event| {
            sink.lock()
                .unwrap()
                .push(e.name().to_string() + " " + &e.data().unwrap_or(Value::Null).to_string())
        }),
        Arc::new(TokioSpawn),
        Arc::new(TokioClock::default()),
    )
    .with_graph(Box::new(BlockLayer::new(block::BlockGraph::new())))
    .with_io_pool(Arc::new(IoThreads::default()));
    for (node, path) in [("src", &src), ("tgt", &tgt)] {
        call(
            &mut bd,
            "blockdev-add",
            json!({"driver": "raw", "node-name": node,
                   "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
        )
        .unwrap();
    }
    call(
        &mut bd,
        "blockdev-backup",
        json!({"job-id": "j1", "device": "src", "target": "tgt", "sync": "full", "speed": 4194304}),
    )
    .unwrap();
    let key = bd.jobs().key_of("j1").unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), bd.jobs().concluded(key))
        .await
        .unwrap();
    // auto-dismiss: the job goes to null right after concluding.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let names: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| {
            e.split(' ').next().unwrap().to_string()
                + " "
                + e.split("\"status\":\"")
                    .nth(1)
                    .map_or("", |s| s.split('"').next().unwrap())
        })
        .collect();
    assert_eq!(
        names,
        [
            "JOB_STATUS_CHANGE created",
            "JOB_STATUS_CHANGE running",
            "JOB_STATUS_CHANGE paused",
            "JOB_STATUS_CHANGE running",
            "JOB_STATUS_CHANGE waiting",
            "JOB_STATUS_CHANGE pending",
            "BLOCK_JOB_COMPLETED ",
            "JOB_STATUS_CHANGE concluded",
            "JOB_STATUS_CHANGE null",
        ]
    );
    bd.shutdown().unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&tgt).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_running_jobs_before_closing_their_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let tgt = dir.path().join("tgt.raw");
    std::fs::write(&src, vec![7u8; 4 << 20]).unwrap();
    std::fs::write(&tgt, vec![0u8; 4 << 20]).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let mut bd = Blockdev::for_tokio(Arc::new(move |e: qmp_api::Event| {
        sink.lock().unwrap().push(e.name().to_string())
    }));
    for (node, path) in [("src", &src), ("tgt", &tgt)] {
        call(
            &mut bd,
            "blockdev-add",
            json!({"driver": "raw", "node-name": node,
                   "file": {"driver": "file", "filename": path.to_str().unwrap()}}),
        )
        .unwrap();
    }
    call(
        &mut bd,
        "blockdev-backup",
        json!({"job-id": "j1", "device": "src", "target": "tgt", "sync": "full", "speed": 1048576}),
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let shutdown = tokio::task::spawn_blocking(move || bd.shutdown());
    shutdown.await.unwrap().unwrap();
    assert!(
        events
            .lock()
            .unwrap()
            .contains(&"BLOCK_JOB_CANCELLED".to_string())
    );
}
