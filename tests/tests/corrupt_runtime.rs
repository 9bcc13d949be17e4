//! BLOCK_IMAGE_CORRUPTED at run time, through the daemon beside qemu-storage-daemon (issue 14):
//! a qcow2 image damaged on disk while a daemon has it open (an L2 entry made to point at the
//! L1 table or the refcount table, as QEMU's iotest 060 does), written through a writable NBD
//! export. Both daemons must refuse the write (EIO), send the same event (device, node-name,
//! msg, offset, size, fatal), take no more I/O through the node, fail
//! `query-named-block-nodes` with `Block device <node> is ejected`, and leave the image as it
//! was but for the corrupt bit.

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, qcow2_node};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const QSD: &str = "qemu-storage-daemon";

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} (install qemu-utils): {e}"))
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

/// Where the damaged L2 entry points: the L1 table or the refcount table.
type Target = fn(&[u8]) -> u64;

const DAMAGES: &[(&str, Target)] = &[
    ("an L2 entry pointing at the L1 table", |b| be64(b, 40)),
    ("an L2 entry pointing at the refcount table", |b| {
        be64(b, 48)
    }),
];

/// What one daemon did with the damaged image.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// qemu-io's exit code and words for the write that meets the damage.
    first_write: (i32, String),
    /// Whether the I/O after it failed (write elsewhere, read).
    /// The later requests' exit codes and messages (QEMU's EINVAL for an ejected node).
    later_io: Vec<(i32, String)>,
    events: Vec<Value>,
    query: Result<Value, Value>,
    /// Offsets of the bytes that differ from the damaged image once the daemon has quit.
    changed: Vec<usize>,
    check: Option<i32>,
}

fn nbd_io(uri: &str, command: &str) -> (i32, String) {
    let out = run("qemu-io", &["-f", "raw", "-c", command, uri]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text.trim().to_string())
}

fn outcome(program: &Path, target: Target) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    let path = img.to_str().unwrap();
    assert!(
        run("qemu-img", &["create", "-q", "-f", "qcow2", path, "1M"])
            .status
            .success()
    );
    assert!(
        run("qemu-io", &["-c", "write -P 0x22 0 64k", path])
            .status
            .success()
    );
    let mut daemon = Daemon::spawn(program, dir.path());
    let mut qmp = daemon.connect();
    qmp.execute("blockdev-add", qcow2_node("q", &img)).unwrap();
    // Damaged while open: the L2 table is read at the first access after this.
    let mut bytes = std::fs::read(&img).unwrap();
    let l2 = be64(&bytes, be64(&bytes, 40)) & 0x00ff_ffff_ffff_fe00;
    let at = target(&bytes);
    bytes[l2 as usize..l2 as usize + 8].copy_from_slice(&(at | 1 << 63).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let sock = dir.path().join("nbd.sock");
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .unwrap();
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "q", "writable": true}),
    )
    .unwrap();
    let uri = format!("nbd+unix:///q?socket={}", sock.display());
    let first_write = nbd_io(&uri, "write -P 0x5a 0 64k");
    // An ejected node's I/O fails with QEMU's EINVAL, mapped onto the wire as QEMU maps it.
    let later_io = ["write -P 0x5a 512k 64k", "read 0 4k"]
        .iter()
        .map(|c| nbd_io(&uri, c))
        .collect();
    let query = qmp.execute("query-named-block-nodes", json!({"flat": true}));
    let events = qmp
        .until_now()
        .into_iter()
        .filter(|e| e["event"] == "BLOCK_IMAGE_CORRUPTED")
        .map(|e| e["data"].clone())
        .collect();
    qmp.execute("block-export-del", json!({"id": "e"})).unwrap();
    qmp.execute("blockdev-del", json!({"node-name": "q"}))
        .unwrap();
    qmp.send("quit", json!({}));
    assert!(daemon.wait_exit(Duration::from_secs(10)));
    let after = std::fs::read(&img).unwrap();
    let changed = (0..bytes.len().max(after.len()))
        .filter(|&i| bytes.get(i) != after.get(i))
        .collect();
    Outcome {
        first_write,
        later_io,
        events,
        query,
        changed,
        check: run("qemu-img", &["check", "-q", path]).status.code(),
    }
}

#[test]
fn a_write_through_an_export_onto_damaged_metadata_is_refused_like_qemu_storage_daemon() {
    for (what, target) in DAMAGES {
        let ours = outcome(&blockjobd(), *target);
        let qsd = outcome(&PathBuf::from(QSD), *target);
        assert_eq!(
            ours.first_write,
            (1, "write failed: Input/output error".to_string()),
            "{what}"
        );
        assert!(
            ours.later_io
                .iter()
                .all(|(code, text)| *code != 0 && text.ends_with("Invalid argument")),
            "{what}: {:?}",
            ours.later_io
        );
        assert_eq!(ours.events.len(), 1, "{what}: {:?}", ours.events);
        let e = &ours.events[0];
        assert_eq!(
            (&e["device"], &e["node-name"], &e["fatal"], &e["size"]),
            (&json!(""), &json!("q"), &json!(true), &json!(65536)),
            "{what}"
        );
        assert_eq!(
            ours.query,
            Err(json!({"class": "GenericError", "desc": "Block device q is ejected"})),
            "{what}"
        );
        // Nothing written through the node but the corrupt bit (byte 79, bit 1).
        assert_eq!(ours.changed, [79], "{what}");
        assert_eq!(ours, qsd, "{what}: ours, then qemu-storage-daemon's");
    }
}

/// What an active commit into a damaged base showed: every event up to the job's
/// BLOCK_JOB_ERROR, then (if `to_the_end`) the BLOCK_JOB_COMPLETED data and the base's
/// changed bytes once the daemon has quit.
fn commit_outcome(program: &Path, to_the_end: bool) -> (Vec<Value>, Value, Vec<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    assert!(
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "1M"])
            .status
            .success()
    );
    assert!(
        run("qemu-io", &["-c", "write -P 0x22 0 64k", b])
            .status
            .success()
    );
    assert!(
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]
        )
        .status
        .success()
    );
    assert!(
        run("qemu-io", &["-c", "write -P 0x33 0 64k", t])
            .status
            .success()
    );
    let mut daemon = Daemon::spawn(program, dir.path());
    let mut qmp = daemon.connect();
    qmp.execute("blockdev-add", qcow2_node("top", &top))
        .unwrap();
    // The base, opened read-only as the backing file, is damaged now; block-commit reopens it
    // read-write and the commit's first write meets the damage.
    let mut bytes = std::fs::read(&base).unwrap();
    let l1 = be64(&bytes, 40);
    let l2 = be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    bytes[l2 as usize..l2 as usize + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    std::fs::write(&base, &bytes).unwrap();
    qmp.execute("block-commit", json!({"job-id": "c", "device": "top"}))
        .unwrap();
    let events = qmp.events_until("BLOCK_JOB_ERROR", Duration::from_secs(30));
    if !to_the_end {
        return (events, Value::Null, Vec::new());
    }
    let completed = qmp
        .events_until("BLOCK_JOB_COMPLETED", Duration::from_secs(30))
        .last()
        .cloned()
        .unwrap_or_default()["data"]
        .clone();
    qmp.send("quit", json!({}));
    assert!(daemon.wait_exit(Duration::from_secs(10)));
    let after = std::fs::read(&base).unwrap();
    let changed = (0..bytes.len().max(after.len()))
        .filter(|&i| bytes.get(i) != after.get(i))
        .collect();
    (events, completed, changed)
}

/// qemu-storage-daemon 10.0.2 reports the corruption and the job's error, then dies of a
/// segmentation fault while the job aborts (the ejected base); here the job ends with the
/// error, the base keeps everything but its corrupt bit, and the daemon goes on.
#[test]
fn an_active_commit_into_a_base_damaged_while_open_reports_it_like_qemu_storage_daemon() {
    let (events, completed, changed) = commit_outcome(&blockjobd(), true);
    let (qsd_events, _, _) = commit_outcome(&PathBuf::from(QSD), false);
    // Generated node names differ between the daemons; timestamps too.
    let strip = |v: &[Value]| -> Vec<Value> {
        v.iter()
            .map(|e| {
                let mut e = e.clone();
                e["timestamp"] = Value::Null;
                if e["data"]["node-name"].is_string() {
                    e["data"]["node-name"] = json!("#block");
                }
                e
            })
            .collect()
    };
    assert_eq!(strip(&events), strip(&qsd_events));
    // The base was reopened read-write for the job: the event still comes from it.
    let corrupted: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "BLOCK_IMAGE_CORRUPTED")
        .collect();
    assert_eq!(corrupted.len(), 1, "{events:?}");
    assert_eq!(completed["error"], json!("Input/output error"));
    assert_eq!(changed, [79], "only the corrupt bit is written");
}
