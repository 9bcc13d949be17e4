//! qcow2's tuning options (`cache-size`, `l2-cache-size`, `refcount-cache-size`,
//! `l2-cache-entry-size`, `cache-clean-interval`, `overlap-check`) act again each time the
//! image is reopened, as QEMU's `qcow2_update_options` runs at open and at every reopen: a
//! reopen read-write or read-only (a job's base, `blockdev-reopen`), inactivation and
//! activation (`blockdev-set-active`) keep them, and so does the corruption report;
//! `blockdev-reopen` with new values takes them, with QEMU's errors for bad ones, and going
//! back to the defaults when they are left out.

mod common;
use common::AddJson;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use block::{BlockEvent, BlockGraph, BlockNode};
use qmp_api::BlockdevOptions;
use serde_json::{Value, json};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qcow2_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size],
    );
    path
}

fn add(g: &mut BlockGraph, path: &Path, extra: Value) -> Arc<BlockNode> {
    let mut o = json!({"driver": "qcow2", "node-name": "q",
        "file": {"driver": "file", "node-name": "qf", "filename": path}});
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    g.blockdev_add_json(&o).unwrap()
}

fn reopen(g: &mut BlockGraph, extra: Value) -> Result<(), String> {
    let mut o = json!({"driver": "qcow2", "node-name": "q", "file": "qf"});
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    let options: BlockdevOptions = qmp_api::input::from_value(&o).map_err(|e| e.desc)?;
    g.reopen(&[options]).map_err(|e| e.desc().to_string())
}

/// `(L2 tables, refcount blocks)` the node's caches may hold.
fn capacity(node: &BlockNode) -> (usize, usize) {
    let ((l2, _), (rb, _)) = node.driver().metadata_caches().expect("a qcow2 node");
    (l2, rb)
}

#[test]
fn cache_sizes_stay_through_reopens_and_inactivation() {
    let dir = tempfile::tempdir().unwrap();
    let small = qcow2_image(dir.path(), "small.qcow2", "64M");
    let mut g = BlockGraph::new();
    // QEMU: 64 KiB of L2 tables (the whole disk's; 4 tables here at least), 15 refcount
    // blocks.
    let q = add(
        &mut g,
        &small,
        json!({"read-only": true, "cache-size": 1 << 20}),
    );
    let settled = (4, 15);
    assert_eq!(capacity(&q), settled);
    q.reopen_read_write().unwrap();
    assert_eq!(capacity(&q), settled, "after a reopen read-write");
    q.reopen_read_only().unwrap();
    assert_eq!(capacity(&q), settled, "after a reopen read-only");
    g.set_node_active(&q, false).unwrap();
    assert_eq!(capacity(&q), settled, "inactive");
    g.set_node_active(&q, true).unwrap();
    assert_eq!(capacity(&q), settled, "active again");
    drop(q);
    g.close_all().unwrap();
}

#[test]
fn blockdev_reopen_takes_new_cache_options_with_qemus_checks() {
    let dir = tempfile::tempdir().unwrap();
    let big = qcow2_image(dir.path(), "big.qcow2", "100G");
    let mut g = BlockGraph::new();
    let q = add(&mut g, &big, json!({"l2-cache-size": 4 << 20}));
    assert_eq!(capacity(&q), (64, 4));
    reopen(&mut g, json!({"l2-cache-size": 8 << 20})).unwrap();
    assert_eq!(capacity(&q), (128, 4));
    reopen(&mut g, json!({"refcount-cache-size": 1 << 20})).unwrap();
    assert_eq!(capacity(&q), (200, 16));
    // QEMU's words for what it refuses; nothing changes then.
    for (extra, error) in [
        (
            json!({"l2-cache-size": 2 << 20, "cache-size": 1 << 20}),
            "l2-cache-size may not exceed cache-size",
        ),
        (
            json!({"cache-size": -1}),
            "Value '-1' is out of range for parameter 'cache-size'",
        ),
        (
            json!({"l2-cache-entry-size": 1000}),
            "L2 cache entry size must be a power of two between 512 and the cluster size (65536)",
        ),
        (
            json!({"cache-size": 4 << 20, "l2-cache-size": 1 << 20, "refcount-cache-size": 1 << 20}),
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
        ),
        // What this block layer does not do, refused by name as at open.
        (
            json!({"l2-cache-entry-size": 4096}),
            "Parameter 'l2-cache-entry-size' is not supported with a value other than the \
             cluster size (65536) by this block layer",
        ),
        (
            json!({"pass-discard-request": true}),
            "Parameter 'pass-discard-request' is not supported with value true by this block layer",
        ),
    ] {
        assert_eq!(
            reopen(&mut g, extra.clone()),
            Err(error.to_string()),
            "{extra}"
        );
        assert_eq!(capacity(&q), (200, 16), "{extra}: nothing may change");
    }
    // Left out, they go back to their defaults (QEMU's reopen resets mutable options).
    reopen(&mut g, json!({})).unwrap();
    assert_eq!(capacity(&q), (512, 64));
    drop(q);
    g.close_all().unwrap();
}

/// A 1 MiB image whose first L2 entry points at its L1 table (QEMU's iotest 060 case).
fn l2_entry_on_l1(dir: &Path) -> (PathBuf, u64) {
    let path = qcow2_image(dir, "t.qcow2", "1M");
    run(
        "qemu-io",
        &["-c", "write -P 0x22 0 64k", path.to_str().unwrap()],
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&bytes, 40);
    let l2 = (be(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    bytes[l2..l2 + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    (path, l1)
}

#[test]
fn overlap_checks_and_the_corruption_report_survive_a_reopen_read_write() {
    let dir = tempfile::tempdir().unwrap();
    let (path, l1) = l2_entry_on_l1(dir.path());
    let mut g = BlockGraph::new();
    let seen: Arc<Mutex<Vec<BlockEvent>>> = Arc::default();
    let s = seen.clone();
    g.set_event_sink(Arc::new(move |e| s.lock().unwrap().push(e)));
    // Read-only first (a commit's base, a node reopened by blockdev-reopen), then writable.
    let q = add(&mut g, &path, json!({"read-only": true}));
    q.reopen_read_write().unwrap();
    let e = q.write_at(0, &[0x5a; 65536]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![BlockEvent::ImageCorrupted {
            node_name: "q".into(),
            msg: "Preventing invalid write on metadata (overlaps with active L1 table)".into(),
            offset: Some(l1),
            size: Some(65536),
            fatal: true,
        }]
    );
    drop(q);
    g.close_all().unwrap();
}

#[test]
fn overlap_check_given_by_blockdev_reopen_acts_on_the_open_image() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = l2_entry_on_l1(dir.path());
    let mut g = BlockGraph::new();
    let seen: Arc<Mutex<Vec<BlockEvent>>> = Arc::default();
    let s = seen.clone();
    g.set_event_sink(Arc::new(move |e| s.lock().unwrap().push(e)));
    let q = add(&mut g, &path, json!({}));
    // Unchecked, the write lands where the damaged L2 entry points (as in QEMU).
    reopen(&mut g, json!({"overlap-check": "none"})).unwrap();
    q.write_at(0, &[0x5a; 65536]).unwrap();
    assert!(seen.lock().unwrap().is_empty());
    drop(q);
    let _ = g.close_all();
}
