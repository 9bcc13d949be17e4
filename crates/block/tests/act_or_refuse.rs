//! What the block-driver options accepted here do (issue 10: no argument is accepted and
//! ignored). Which options are refused, and that QEMU's own refusals read the same, is
//! checked beside qemu-storage-daemon in `tests/tests/driver_options.rs`.

mod common;
use common::AddJson;

use block::{BlockGraph, BlockNode, Perm};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn qcow2_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(size)
        .status()
        .expect("qemu-img (install qemu-utils)")
        .success();
    assert!(ok);
    path
}

fn qcow2(g: &mut BlockGraph, path: &Path, extra: Value) -> Arc<BlockNode> {
    let mut o = json!({"driver": "qcow2", "node-name": "q",
        "file": {"driver": "file", "filename": path.to_str().unwrap()}});
    if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    g.blockdev_add_json(&o).unwrap()
}

/// `(L2 tables, refcount blocks)` the node's caches may hold.
fn capacity(node: &BlockNode) -> (usize, usize) {
    let ((l2, _), (rb, _)) = node.driver().metadata_caches().expect("a qcow2 node");
    (l2, rb)
}

/// `(L2 tables, refcount blocks)` the node's caches hold.
fn held(node: &BlockNode) -> (usize, usize) {
    let ((_, l2), (_, rb)) = node.driver().metadata_caches().expect("a qcow2 node");
    (l2, rb)
}

#[test]
fn qcow2_cache_sizes_bound_the_caches_as_qemu_settles_them() {
    let dir = tempfile::tempdir().unwrap();
    let small = qcow2_image(dir.path(), "small.qcow2", "64M");
    let big = qcow2_image(dir.path(), "big.qcow2", "100G");
    // (options, image, (L2 tables, refcount blocks)), 64 KiB clusters.
    let cases: &[(Value, &Path, (usize, usize))] = &[
        // The crate's own sizes when no size is given: 32 MiB and 4 MiB.
        (json!({}), &small, (512, 64)),
        // QEMU: the whole L2 table set of a 64 MiB disk is one cluster (64 KiB), the rest
        // (960 KiB) goes to refcounts: 15 blocks. The L2 cache holds 4 tables at least here
        // (QEMU: 2 entries).
        (json!({"cache-size": 1 << 20}), &small, (4, 15)),
        // 4 MiB of L2 tables for a 100 GiB disk (which would need 12.5 MiB): 64 tables;
        // refcounts get QEMU's 4 clusters.
        (json!({"l2-cache-size": 4 << 20}), &big, (64, 4)),
        (json!({"refcount-cache-size": 1 << 20}), &big, (200, 16)),
        (
            json!({"cache-size": 8 << 20, "refcount-cache-size": 1 << 20}),
            &big,
            (112, 16),
        ),
    ];
    for (options, image, want) in cases {
        let mut g = BlockGraph::new();
        let node = qcow2(&mut g, image, options.clone());
        assert_eq!(capacity(&node), *want, "{options}");
        drop(node);
        g.close_all().unwrap();
    }
}

#[test]
fn qcow2_cache_clean_interval_drops_unused_tables_as_qemus_timer_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_image(dir.path(), "a.qcow2", "64M");
    let ok = Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 1M"])
        .arg(&path)
        .status()
        .expect("qemu-io (install qemu-utils)")
        .success();
    assert!(ok);
    let read = |node: &BlockNode| {
        let mut buf = vec![0u8; 4096];
        node.read_at(0, &mut buf).unwrap();
        assert_eq!(buf[0], 0x5a);
    };

    // Every second: within two passes of the timer the L2 table read is dropped.
    let mut g = BlockGraph::new();
    let node = qcow2(&mut g, &path, json!({"cache-clean-interval": 1}));
    read(&node);
    assert_eq!(held(&node).0, 1, "the L2 table read is cached");
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&node).0 != 0 {
        assert!(Instant::now() < deadline, "not cleaned within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(node);
    g.close_all().unwrap();

    // 0: never (QEMU's default is 600 s: not within this test either).
    let mut g = BlockGraph::new();
    let node = qcow2(&mut g, &path, json!({"cache-clean-interval": 0}));
    read(&node);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(held(&node).0, 1, "kept without cleaning");
    drop(node);
    g.close_all().unwrap();
}

fn blkdebug(g: &mut BlockGraph, extra: Value) -> Arc<BlockNode> {
    let mut o = json!({"driver": "blkdebug", "node-name": "dbg",
        "image": {"driver": "null-co", "size": 1 << 20}});
    if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    g.blockdev_add_json(&o).unwrap()
}

#[test]
fn blkdebug_child_permissions_are_taken_and_unshared_as_asked() {
    let mut g = BlockGraph::new();
    let node = blkdebug(&mut g, json!({}));
    let (perm, shared) = node.child("image").unwrap().cumulative_perms();
    assert!(!perm.contains(Perm::RESIZE) && shared.contains(Perm::WRITE));
    drop(node);
    g.close_all().unwrap();

    let mut g = BlockGraph::new();
    let node = blkdebug(
        &mut g,
        json!({"take-child-perms": ["resize", "consistent-read"], "unshare-child-perms": ["write"]}),
    );
    let (perm, shared) = node.child("image").unwrap().cumulative_perms();
    assert!(
        perm.contains(Perm::RESIZE | Perm::CONSISTENT_READ),
        "{perm:?}"
    );
    assert!(!shared.contains(Perm::WRITE), "{shared:?}");
    assert!(
        shared.contains(Perm::RESIZE | Perm::CONSISTENT_READ),
        "{shared:?}"
    );
    drop(node);
    g.close_all().unwrap();
}

#[test]
fn blkdebug_rules_of_event_none_are_active_from_the_open_and_immediately_activates_nothing() {
    // QEMU fires `none` once at the end of its open.
    let mut g = BlockGraph::new();
    let node = blkdebug(
        &mut g,
        json!({"inject-error": [{"event": "none", "errno": 28, "once": true}]}),
    );
    let mut buf = [0u8; 512];
    assert_eq!(node.read_at(0, &mut buf).unwrap_err().errno(), Some(28));
    node.read_at(0, &mut buf).unwrap();
    drop(node);
    g.close_all().unwrap();

    // `immediately` decides in QEMU whether the failing request yields first; the rule still
    // waits for its event.
    let mut g = BlockGraph::new();
    let node = blkdebug(
        &mut g,
        json!({"inject-error": [{"event": "pwritev", "immediately": true}]}),
    );
    node.read_at(0, &mut buf).unwrap();
    assert_eq!(node.write_at(0, &buf).unwrap_err().errno(), Some(5));
    drop(node);
    let _ = g.close_all();
}
