//! Times one full backup of a qcow2 image to a fresh qcow2 target on the daemon's set-up
//! (jobs on tokio, I/O on its blocking threads) and prints MB/s.
//!
//! `cargo run --release -p blockdev --features tokio --example backup_speed -- [SIZE_MIB]`
//! (default 1024; the source is filled with `qemu-io -c 'write -P 0xab 0 <size>'`).

#[cfg(not(feature = "tokio"))]
fn main() {
    eprintln!("backup_speed needs --features tokio");
}

#[cfg(feature = "tokio")]
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    use std::process::Command;
    use std::sync::Arc;
    use std::time::Instant;

    use blockdev::{BlockLayer, Blockdev, IoThreads};
    use job::{TokioClock, TokioSpawn};
    use serde_json::json;

    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().expect("temporary directory");
    let src = dir.path().join("src.qcow2");
    let tgt = dir.path().join("tgt.qcow2");
    let size = format!("{mib}M");
    for path in [&src, &tgt] {
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(&size)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "qemu-img create");
    }
    let fill = format!("write -P 0xab 0 {size}");
    let ok = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &fill])
        .arg(&src)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "qemu-io write");

    let mut bd = Blockdev::new(
        Arc::new(|_| {}),
        Arc::new(TokioSpawn),
        Arc::new(TokioClock::default()),
    )
    .with_graph(Box::new(BlockLayer::new(block::BlockGraph::new())))
    .with_io_pool(Arc::new(IoThreads::default()));
    let call = |bd: &mut Blockdev, name: &str, args: serde_json::Value| {
        qmp_api::dispatch(bd, name, args.as_object().cloned())
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
    };
    for (node, path) in [("src", &src), ("tgt", &tgt)] {
        call(
            &mut bd,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node,
                   "file": {"driver": "file", "filename": path}}),
        );
    }
    let start = Instant::now();
    call(
        &mut bd,
        "blockdev-backup",
        json!({"job-id": "j1", "device": "src", "target": "tgt", "sync": "full"}),
    );
    let key = bd.jobs().key_of("j1").expect("job j1");
    bd.jobs().concluded(key).await;
    let secs = start.elapsed().as_secs_f64();
    let bytes = (mib << 20) as f64;
    println!(
        "full backup of {mib} MiB qcow2 -> qcow2: {secs:.3} s, {:.0} MB/s",
        bytes / secs / 1e6
    );
    bd.shutdown().expect("shutdown");
}
