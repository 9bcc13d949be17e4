//! Two blockjobd processes on loopback. Pull mode: A exports a point-in-time view of its disk
//! (fleecing, both ways QEMU offers: an overlay filled by `blockdev-backup sync=none`, or the
//! `copy-before-write` filter under `snapshot-access`) with the bitmap of what changed since
//! the last full backup, and the dirty extents are pulled into an incremental qcow2 served by
//! B; layered on the full backup it equals A's disk at the fleecing point, checked against a
//! backup taken at the same point, while a writer keeps writing to A. Push mode: A backs up
//! into B's export. And a client that goes away mid-request leaves the view intact.

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp, qcow2_node};
use blockjobs_tests::servers::{Writer, assert_same_image, qcow2, qemu_io, tool};
use nbd::client::pull::{PullReport, pull};
use nbd::client::{Connector, ServerAddr};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
const SIZE: &str = "16M";
const SIZE_BYTES: u64 = 16 << 20;
/// The writer of the pull tests writes within the first 4 MiB, so that the bitmap marks a
/// part of the disk only.
const SPAN: u64 = 4 << 20;

/// A daemon in its own directory, its NBD server on `dir/nbd.sock`.
struct Host {
    daemon: Daemon,
    qmp: Qmp,
    dir: PathBuf,
}

impl Host {
    fn start(root: &Path, tag: &str) -> Host {
        let dir = root.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let daemon = Daemon::spawn(&blockjobd(), &dir);
        let mut qmp = daemon.connect();
        qmp.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix",
                            "data": {"path": dir.join("nbd.sock").to_str().unwrap()}}}),
        )
        .expect("nbd-server-start");
        Host { daemon, qmp, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.qmp
            .execute(command, arguments.clone())
            .unwrap_or_else(|e| panic!("{command} {arguments}: {e}"))
    }

    fn connector(&self, export: &str) -> Connector {
        Connector::new(ServerAddr::Unix(self.socket()), export)
    }

    fn wait_job(&mut self, id: &str) {
        self.wait_jobs(&[id]);
    }

    /// Waits until every job of `ids` has completed successfully, in any order.
    fn wait_jobs(&mut self, ids: &[&str]) {
        let mut left: Vec<&str> = ids.to_vec();
        while !left.is_empty() {
            let done = self.qmp.wait_event("BLOCK_JOB_COMPLETED", WAIT, |d| {
                left.iter().any(|id| d["device"] == *id)
            });
            assert!(done["data"].get("error").is_none(), "{done}");
            left.retain(|id| done["data"]["device"] != *id);
        }
    }

    /// `quit`, and the images are closed (flushed) when it returns.
    fn quit(mut self) {
        self.ok("quit", json!({}));
        assert!(self.daemon.wait_exit(WAIT), "the daemon did not exit");
    }
}

/// A's disk: 16 MiB of a pattern, opened as `disk` and exported writable as `live` (where the
/// writer writes).
fn start_a(root: &Path) -> Host {
    let mut a = Host::start(root, "a");
    let disk = qcow2(&a.dir, "disk.qcow2", SIZE);
    qemu_io(disk.to_str().unwrap(), "qcow2", &["write -P 0x5e 0 16M"]);
    a.ok("blockdev-add", qcow2_node("disk", &disk));
    a.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "live", "name": "live", "node-name": "disk",
               "writable": true}),
    );
    a
}

/// The full backup of A's disk into `full.qcow2`, with bitmap `b0` recording from the same
/// point on; returns the image's path (closed once this returns).
fn full_backup(a: &mut Host) -> PathBuf {
    let full = qcow2(&a.dir, "full.qcow2", SIZE);
    a.ok("blockdev-add", qcow2_node("full", &full));
    a.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk", "name": "b0", "granularity": 65536}},
            {"type": "blockdev-backup",
             "data": {"job-id": "full", "device": "disk", "target": "full", "sync": "full"}}]}),
    );
    a.wait_job("full");
    a.ok("blockdev-del", json!({"node-name": "full"}));
    full
}

/// B: `inc.qcow2` over the full backup, exported writable as `inc`.
fn start_b(root: &Path, full: &Path) -> (Host, PathBuf) {
    let mut b = Host::start(root, "b");
    let inc = b.dir.join("inc.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            full.to_str().unwrap(),
            "-F",
            "qcow2",
            inc.to_str().unwrap(),
        ],
    );
    b.ok("blockdev-add", qcow2_node("inc", &inc));
    b.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "inc", "node-name": "inc", "writable": true}),
    );
    (b, inc)
}

fn pull_into(a: &Host, export: &str, b: &Host) -> PullReport {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(pull(
            &a.connector(export),
            "qemu:dirty-bitmap:b0",
            &b.connector("inc"),
        ))
        .expect("pull")
}

/// Bytes the image's own layer allocates.
fn allocated_here(image: &Path) -> u64 {
    let map: Value = serde_json::from_str(&tool(
        "qemu-img",
        &["map", "--output=json", image.to_str().unwrap()],
    ))
    .unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn pull_mode_through_an_overlay_filled_by_backup_sync_none() {
    let root = tempfile::tempdir().unwrap();
    let mut a = start_a(root.path());
    let mut writer = Writer::start_within(&a.socket(), "live", SPAN);
    writer.wait_for_writes(50);
    let full = full_backup(&mut a);
    writer.wait_for_writes(300);

    // The fleecing point: a temporary overlay over the live node, filled by copy-before-write,
    // and a backup taken at the same point to check against.
    let fleece = qcow2(&a.dir, "fleece.qcow2", SIZE);
    let expected = qcow2(&a.dir, "expected.qcow2", SIZE);
    a.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fleece", "backing": "disk",
               "file": {"driver": "file", "filename": fleece.to_str().unwrap()}}),
    );
    a.ok("blockdev-add", qcow2_node("expected", &expected));
    a.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "fleecing", "device": "disk",
                                                 "target": "fleece", "sync": "none"}},
            {"type": "blockdev-backup", "data": {"job-id": "check", "device": "disk",
                                                 "target": "expected", "sync": "full"}}]}),
    );
    a.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "fleece", "node-name": "fleece", "bitmaps": ["b0"]}),
    );
    let (b, inc) = start_b(root.path(), &full);
    writer.wait_for_writes(100);
    let report = pull_into(&a, "fleece", &b);
    writer.wait_for_writes(100);
    assert!(report.extents > 0 && report.bytes > 0, "{report:?}");
    assert!(report.bytes <= SPAN, "only dirty extents: {report:?}");

    a.wait_job("check");
    a.ok("block-export-del", json!({"id": "fleece", "mode": "hard"}));
    a.qmp
        .wait_event("BLOCK_EXPORT_DELETED", WAIT, |d| d["id"] == "fleece");
    a.ok("block-job-cancel", json!({"device": "fleecing"}));
    a.qmp
        .wait_event("BLOCK_JOB_CANCELLED", WAIT, |d| d["device"] == "fleecing");
    let writes = writer.stop();
    assert!(writes > 500, "the writer kept writing: {writes}");
    a.ok("blockdev-del", json!({"node-name": "fleece"}));
    a.ok("blockdev-del", json!({"node-name": "expected"}));
    b.quit();
    a.quit();
    assert_same_image(inc.to_str().unwrap(), expected.to_str().unwrap());
    // The incremental image holds the dirty clusters only.
    assert!(allocated_here(&inc) <= report.bytes, "{report:?}");
}

#[test]
fn pull_mode_through_the_copy_before_write_filter_and_snapshot_access() {
    let root = tempfile::tempdir().unwrap();
    let mut a = start_a(root.path());
    let mut writer = Writer::start_within(&a.socket(), "live", SPAN);
    writer.wait_for_writes(50);
    let full = full_backup(&mut a);
    writer.wait_for_writes(300);
    let before = writer.stop();

    // The fleecing point (the writer paused: blockdev-add is not a transaction action).
    let tmp = a.dir.join("tmp.raw");
    std::fs::File::create(&tmp)
        .unwrap()
        .set_len(SIZE_BYTES)
        .unwrap();
    a.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}}]}),
    );
    a.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tmp", "filename": tmp.to_str().unwrap()}),
    );
    a.ok(
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
               "target": "tmp", "bitmap": {"node": "disk", "name": "b0"}}),
    );
    a.ok(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "access", "file": "cbw"}),
    );
    a.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "access", "node-name": "access",
               "bitmaps": [{"node": "disk", "name": "b0"}]}),
    );
    // What the disk holds at the fleecing point, read while nothing writes.
    let expected = a.dir.join("expected.raw");
    let live = format!("nbd+unix:///live?socket={}", a.socket().display());
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &live,
            expected.to_str().unwrap(),
        ],
    );
    let mut writer = Writer::start_within(&a.socket(), "live", SPAN);
    writer.wait_for_writes(100);
    let (b, inc) = start_b(root.path(), &full);
    let report = pull_into(&a, "access", &b);
    writer.wait_for_writes(100);
    assert!(report.extents > 0 && report.bytes <= SPAN, "{report:?}");
    let after = writer.stop();
    assert!(before > 300 && after > 200, "{before} {after}");
    a.ok("block-export-del", json!({"id": "access", "mode": "hard"}));
    a.qmp
        .wait_event("BLOCK_EXPORT_DELETED", WAIT, |d| d["id"] == "access");
    a.ok("blockdev-del", json!({"node-name": "access"}));
    a.ok("blockdev-del", json!({"node-name": "cbw"}));
    a.ok("blockdev-del", json!({"node-name": "tmp"}));
    b.quit();
    a.quit();
    assert_same_image(inc.to_str().unwrap(), expected.to_str().unwrap());
}

#[test]
fn push_mode_backs_up_into_the_other_daemons_export_while_a_writer_writes() {
    let root = tempfile::tempdir().unwrap();
    let mut a = start_a(root.path());
    let mut b = Host::start(root.path(), "b");
    let target = qcow2(&b.dir, "target.qcow2", SIZE);
    b.ok("blockdev-add", qcow2_node("target", &target));
    b.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "target", "node-name": "target", "writable": true}),
    );
    let mut writer = Writer::start(&a.socket(), "live");
    writer.wait_for_writes(50);
    let expected = qcow2(&a.dir, "expected.qcow2", SIZE);
    a.ok("blockdev-add", qcow2_node("expected", &expected));
    a.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "export": "target",
               "reconnect-delay": 10,
               "server": {"type": "unix", "path": b.socket().to_str().unwrap()}}),
    );
    a.ok(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "push", "device": "disk",
                                                 "target": "remote", "sync": "full"}},
            {"type": "blockdev-backup", "data": {"job-id": "check", "device": "disk",
                                                 "target": "expected", "sync": "full"}}]}),
    );
    a.wait_jobs(&["push", "check"]);
    writer.stop();
    a.ok("blockdev-del", json!({"node-name": "remote"}));
    a.ok("blockdev-del", json!({"node-name": "expected"}));
    b.ok("block-export-del", json!({"id": "target", "mode": "hard"}));
    b.quit();
    a.quit();
    assert_same_image(target.to_str().unwrap(), expected.to_str().unwrap());
}

#[test]
fn a_client_gone_mid_request_leaves_the_view_and_the_writes_working() {
    let root = tempfile::tempdir().unwrap();
    let mut a = start_a(root.path());
    let tmp = a.dir.join("tmp.raw");
    std::fs::File::create(&tmp)
        .unwrap()
        .set_len(SIZE_BYTES)
        .unwrap();
    a.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tmp", "filename": tmp.to_str().unwrap()}),
    );
    a.ok(
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
               "target": "tmp"}),
    );
    a.ok(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "access", "file": "cbw"}),
    );
    a.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "access", "node-name": "access"}),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Large reads of the view from the live node, then the client hangs up before any
        // reply.
        for _ in 0..3 {
            let client = a.connector("access").connect().await.expect("connect");
            let client = std::sync::Arc::new(client);
            let reads: Vec<_> = (0..4u64)
                .map(|i| {
                    let client = client.clone();
                    tokio::spawn(async move { client.read(i * (4 << 20), 4 << 20).await })
                })
                .collect();
            tokio::task::yield_now().await;
            client.close();
            for read in reads {
                let _ = read.await;
            }
        }
    });
    // Writes to the live node go on (nothing holds them back), and the view is unchanged.
    let live = format!("nbd+unix:///live?socket={}", a.socket().display());
    qemu_io(&live, "raw", &["write -P 0x77 0 16M"]);
    let view = format!("nbd+unix:///access?socket={}", a.socket().display());
    tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5e 0 16M", &view],
    );
    qemu_io(&live, "raw", &["read -P 0x77 0 16M"]);
    a.ok("block-export-del", json!({"id": "access", "mode": "hard"}));
    a.quit();
}
