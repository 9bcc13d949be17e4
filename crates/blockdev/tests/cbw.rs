//! Copy-before-write: while a backup runs, a write to its source first copies the clusters it
//! overwrites to the target, so the target ends up holding the source as it was when the job
//! started (QEMU's copy-before-write filter), checked with qemu-img and qemu-io.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use block::{BlockGraph, BlockNode};
use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool).args(args).output().expect(tool);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn qcow2(dir: &Path, name: &str) -> String {
    let path = dir.join(name).to_str().unwrap().to_string();
    assert!(run("qemu-img", &["create", "-q", "-f", "qcow2", &path, "4M"]).0);
    path
}

fn qemu_io(path: &str, cmd: &str) {
    let (ok, out) = run("qemu-io", &["-f", "qcow2", "-c", cmd, path]);
    assert!(
        ok && !out.contains("Pattern verification failed"),
        "{cmd}: {out}"
    );
}

fn open(graph: &mut BlockGraph, node: &str, path: &str) -> Arc<BlockNode> {
    graph
        .blockdev_add(&options(json!({"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": path}})))
        .unwrap()
}

/// A source of 0xab with 0x11 at 1M, its copy as it is now, and an empty target, opened in a
/// harness; returns the source node to write through.
fn setup(dir: &Path) -> (Harness, Arc<BlockNode>, String, String, String) {
    let src = qcow2(dir, "src.qcow2");
    qemu_io(&src, "write -P 0xab 0 4M");
    qemu_io(&src, "write -P 0x11 1M 64k");
    let before = dir.join("before.qcow2").to_str().unwrap().to_string();
    std::fs::copy(&src, &before).unwrap();
    let tgt = qcow2(dir, "tgt.qcow2");
    let mut graph = BlockGraph::new();
    let source = open(&mut graph, "src", &src);
    open(&mut graph, "tgt", &tgt);
    let h = Harness::over(
        Box::new(blockdev::BlockLayer::new(graph)),
        MemGraph::default(),
    );
    (h, source, src, before, tgt)
}

/// New data over copied and not yet copied clusters, unaligned, and zeroes.
fn overwrite(source: &BlockNode) {
    source.write_at(4096, &[0xee; 8192]).unwrap();
    source.write_at(3 * MIB - 512, &[0xcd; 70000]).unwrap();
    source.write_zeroes_at(MIB, 64 << 10).unwrap();
}

#[test]
fn a_full_backup_keeps_the_sources_contents_at_job_start_while_the_source_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (mut h, source, src, before, tgt) = setup(dir.path());
    h.ok(
        "blockdev-backup",
        with(backup("j1", "src", "tgt"), json!({"speed": MIB})),
    );
    h.step();
    overwrite(&source);
    h.settle();
    let ev = h.take_events();
    assert!(ev.contains(&r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"j1","len":4194304,"offset":4194304,"speed":1048576}"#.to_string()), "{ev:?}");
    drop(source);
    h.bd.shutdown().unwrap();
    assert_eq!(
        run("qemu-img", &["compare", &before, &tgt]),
        (true, "Images are identical.".to_string())
    );
    qemu_io(&src, "read -P 0xcd 3145216 70000");
}

#[test]
fn a_sync_none_backup_copies_exactly_the_clusters_about_to_be_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (mut h, source, _src, _before, tgt) = setup(dir.path());
    h.ok(
        "blockdev-backup",
        with(backup("j1", "src", "tgt"), json!({"sync": "none"})),
    );
    h.step();
    overwrite(&source);
    h.ok("block-job-cancel", json!({"device": "j1"}));
    h.settle();
    drop(source);
    h.bd.shutdown().unwrap();
    // The old data of every touched 64 KiB cluster, nothing else.
    qemu_io(&tgt, "read -P 0xab 0 64k");
    qemu_io(&tgt, "read -P 0x11 1M 64k");
    qemu_io(&tgt, "read -P 0xab 3008k 192k");
    let (ok, map) = run("qemu-img", &["map", "--output=json", &tgt]);
    assert!(ok);
    let data: Vec<(u64, u64)> = serde_json::from_str::<serde_json::Value>(&map)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(0, 65536), (MIB, 65536), (3008 << 10, 196608)]);
}

#[test]
fn a_write_to_the_source_fails_when_its_copy_before_write_fails() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    qemu_io(&src, "write -P 0xab 0 4M");
    let mut graph = BlockGraph::new();
    let source = open(&mut graph, "src", &src);
    graph
        .blockdev_add(&options(json!({"driver": "blkdebug", "node-name": "tgt",
            "inject-error": [{"event": "pwritev", "errno": 5}],
            "image": {"driver": "null-co", "size": 4 * MIB}})))
        .unwrap();
    let mut h = Harness::over(
        Box::new(blockdev::BlockLayer::new(graph)),
        MemGraph::default(),
    );
    h.ok(
        "blockdev-backup",
        with(backup("j1", "src", "tgt"), json!({"sync": "none"})),
    );
    h.step();
    let e = source.write_at(0, &[0xcd; 512]).unwrap_err();
    assert_eq!(e.errno(), Some(5));
    h.ok("block-job-cancel", json!({"device": "j1"}));
    h.settle();
    drop(source);
    // The target was written (the copy failed), so closing flushes it, and its still active
    // rule fails the flush too (QEMU's `bdrv_close` meets the same error and ignores it).
    let closed = h.bd.shutdown();
    assert_eq!(closed.map_err(|e| e.raw_os_error()), Err(Some(5)));
    qemu_io(&src, "read -P 0xab 0 512");
}

#[test]
fn a_full_backup_of_a_sparse_source_copies_data_only_where_the_source_has_data() {
    // Unallocated and zero-written (zero cluster) ranges alike are zero writes, no data.
    // As QSD 10.0.2 on the same images: the same data extent, and zero writes leave zero
    // clusters (`present`).
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    qemu_io(&src, "write -P 0xab 0 1M");
    qemu_io(&src, "write -z 2M 1M");
    let tgt = qcow2(dir.path(), "tgt.qcow2");
    let mut graph = BlockGraph::new();
    open(&mut graph, "src", &src);
    open(&mut graph, "tgt", &tgt);
    let mut h = Harness::over(
        Box::new(blockdev::BlockLayer::new(graph)),
        MemGraph::default(),
    );
    h.ok("blockdev-backup", backup("j1", "src", "tgt"));
    h.settle();
    h.bd.shutdown().unwrap();
    let (ok, map) = run("qemu-img", &["map", "--output=json", &tgt]);
    assert!(ok);
    let extents: Vec<(u64, u64, bool, bool, bool)> =
        serde_json::from_str::<serde_json::Value>(&map)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["present"] == true,
                    e["zero"] == true,
                    e["data"] == true,
                )
            })
            .collect();
    assert_eq!(
        extents,
        vec![
            (0, MIB, true, false, true),
            (MIB, 3 * MIB, true, true, false)
        ]
    );
}

#[test]
fn an_incremental_backup_keeps_the_dirty_clusters_at_job_start_and_copies_nothing_clean() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    qemu_io(&src, "write -P 0x11 0 4M");
    assert!(run("qemu-img", &["bitmap", "--add", &src, "bm0"]).0);
    qemu_io(&src, "write -P 0x22 0 64k");
    qemu_io(&src, "write -P 0x33 3M 64k");
    let tgt = qcow2(dir.path(), "tgt.qcow2");
    let mut graph = BlockGraph::new();
    let source = open(&mut graph, "src", &src);
    open(&mut graph, "tgt", &tgt);
    let mut h = Harness::over(
        Box::new(blockdev::BlockLayer::new(graph)),
        MemGraph::default(),
    );
    h.ok(
        "blockdev-backup",
        json!({"job-id": "j1", "device": "src", "target": "tgt", "sync": "incremental",
               "bitmap": "bm0", "speed": 65536}),
    );
    h.step();
    // A dirty cluster the job has not reached yet, and a clean one.
    source.write_at(3 * MIB, &[0x44; 4096]).unwrap();
    source.write_at(2 * MIB, &[0x55; 4096]).unwrap();
    h.settle();
    let ev = h.take_events();
    assert!(ev.contains(&r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"j1","len":131072,"offset":131072,"speed":65536}"#.to_string()), "{ev:?}");
    drop(source);
    h.bd.shutdown().unwrap();
    qemu_io(&tgt, "read -P 0x22 0 64k");
    qemu_io(&tgt, "read -P 0x33 3M 64k");
    let (ok, map) = run("qemu-img", &["map", "--output=json", &tgt]);
    assert!(ok);
    let data: Vec<(u64, u64)> = serde_json::from_str::<serde_json::Value>(&map)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(0, 65536), (3 * MIB, 65536)]);
}
