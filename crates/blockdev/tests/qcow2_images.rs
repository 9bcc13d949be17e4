//! The QSD scenarios on real qcow2 images (the block crate's qcow2 driver), checked with
//! qemu-img and qemu-io.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{Value, json};

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

fn write(path: &str, pattern: &str, offset: &str, len: &str) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    assert!(run("qemu-io", &["-f", "qcow2", "-c", &cmd, path]).0);
}

fn add(h: &mut Harness, node: &str, path: &str) {
    h.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": path}}),
    );
}

fn node(h: &mut Harness, name: &str) -> Option<Value> {
    let nodes = h.ok("query-named-block-nodes", json!({"flat": true}));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
        .cloned()
}

fn info_chain(path: &str) -> Value {
    let (ok, out) = run(
        "qemu-img",
        &["info", "--output=json", "--backing-chain", "-U", path],
    );
    assert!(ok);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_full_backup_of_a_qcow2_image_is_identical_and_clean() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    write(&src, "0xab", "0", "4M");
    let tgt = qcow2(dir.path(), "tgt.qcow2");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    add(&mut h, "tgt", &tgt);
    h.ok("blockdev-backup", backup("j1", "src", "tgt"));
    h.settle();
    let ev = h.take_events();
    assert!(ev.contains(&r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"j1","len":4194304,"offset":4194304,"speed":0}"#.to_string()), "{ev:?}");
    h.bd.shutdown().unwrap();
    assert_eq!(
        run("qemu-img", &["compare", &src, &tgt]),
        (true, "Images are identical.".to_string())
    );
    assert!(run("qemu-img", &["check", "-q", &tgt]).0);
}

#[test]
fn an_incremental_backup_copies_the_persistent_bitmaps_dirty_clusters_and_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    write(&src, "0x11", "0", "4M");
    assert!(run("qemu-img", &["bitmap", "--add", &src, "bm0"]).0);
    write(&src, "0x22", "1M", "64k");
    write(&src, "0x33", "3M", "128k");
    let tgt = qcow2(dir.path(), "tgt.qcow2");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    add(&mut h, "tgt", &tgt);
    let bm = node(&mut h, "src").unwrap()["dirty-bitmaps"].clone();
    assert_eq!(
        (bm[0]["name"].clone(), bm[0]["count"].clone()),
        (json!("bm0"), json!(196608))
    );
    h.ok(
        "blockdev-backup",
        json!({"job-id": "j1", "device": "src", "target": "tgt", "sync": "incremental", "bitmap": "bm0"}),
    );
    h.settle();
    let ev = h.take_events();
    assert!(ev.contains(&r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"j1","len":196608,"offset":196608,"speed":0}"#.to_string()), "{ev:?}");
    let bm = node(&mut h, "src").unwrap()["dirty-bitmaps"].clone();
    assert_eq!(
        (bm[0]["count"].clone(), bm[0]["busy"].clone()),
        (json!(0), json!(false))
    );
    h.bd.shutdown().unwrap();
    for (pattern, offset, len) in [
        ("0x22", "1M", "64k"),
        ("0x33", "3M", "128k"),
        ("0", "0", "1M"),
        ("0", "2M", "1M"),
    ] {
        let cmd = format!("read -P {pattern} {offset} {len}");
        let (ok, out) = run("qemu-io", &["-f", "qcow2", "-c", &cmd, &tgt]);
        assert!(
            ok && !out.contains("Pattern verification failed"),
            "{cmd}: {out}"
        );
    }
}

#[test]
fn internal_snapshots_are_taken_refused_and_rolled_back_like_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    h.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "src", "name": "snap0"}),
    );
    assert_eq!(
        h.err(
            "blockdev-snapshot-internal-sync",
            json!({"device": "src", "name": "snap0"})
        ),
        "GenericError: Snapshot with name 'snap0' already exists on device 'src'"
    );
    assert_eq!(
        h.err(
            "blockdev-snapshot-internal-sync",
            json!({"device": "src", "name": ""})
        ),
        "GenericError: Name is empty"
    );
    assert_eq!(
        h.err(
            "transaction",
            json!({"actions": [{"type": "blockdev-snapshot-internal-sync", "data": {"device": "src", "name": "snap1"}},
                               {"type": "abort", "data": {}}]})
        ),
        "GenericError: Transaction aborted using Abort action"
    );
    h.ok(
        "transaction",
        json!({"actions": [{"type": "blockdev-snapshot-internal-sync", "data": {"device": "src", "name": "snap2"}}]}),
    );
    h.bd.shutdown().unwrap();
    let (ok, out) = run("qemu-img", &["snapshot", "-l", &src]);
    assert!(ok);
    let names: Vec<&str> = out
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(names, ["snap0", "snap2"]);
    assert!(run("qemu-img", &["check", "-q", &src]).0);
}

#[test]
fn snapshot_sync_writes_an_overlay_backed_by_the_old_image_and_inserts_it_under_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "top", "file": "src"}),
    );
    let ovl = dir.path().join("ovl.qcow2").to_str().unwrap().to_string();
    h.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "src", "snapshot-file": ovl, "snapshot-node-name": "ovl", "format": "qcow2"}),
    );
    let chain = info_chain(&ovl);
    assert_eq!(chain[0]["backing-filename"], json!(src));
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    assert_eq!(chain[1]["filename"], json!(src));
    let o = node(&mut h, "ovl").expect("the overlay is a named node");
    assert_eq!(o["backing_file"], json!(src));
    // An aborted snapshot leaves its file but not the node.
    let ovl2 = dir.path().join("ovl2.qcow2").to_str().unwrap().to_string();
    assert_eq!(
        h.err(
            "transaction",
            json!({"actions": [{"type": "blockdev-snapshot-sync", "data": {"node-name": "ovl",
                    "snapshot-file": ovl2, "snapshot-node-name": "ovl2"}}, {"type": "abort", "data": {}}]})
        ),
        "GenericError: Transaction aborted using Abort action"
    );
    assert!(Path::new(&ovl2).exists());
    assert!(node(&mut h, "ovl2").is_none());
    h.bd.shutdown().unwrap();
    assert!(run("qemu-img", &["check", "-q", &ovl]).0);
    assert_eq!(
        run("qemu-img", &["compare", &src, &ovl]),
        (true, "Images are identical.".to_string())
    );
}

#[test]
fn a_snapshot_overlay_nothing_uses_is_closed_after_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    let ovl = dir.path().join("ovl.qcow2").to_str().unwrap().to_string();
    h.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "src", "snapshot-file": ovl, "snapshot-node-name": "ovl", "format": "qcow2"}),
    );
    assert!(node(&mut h, "ovl").is_none());
    assert!(node(&mut h, "src").is_some());
    let chain = info_chain(&ovl);
    assert_eq!(chain[0]["backing-filename"], json!(src));
}

#[test]
fn a_sync_none_drive_backup_target_is_backed_by_the_running_source_node() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    write(&src, "0x42", "0", "1M");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    let target = dir.path().join("none.qcow2").to_str().unwrap().to_string();
    h.ok(
        "drive-backup",
        json!({"job-id": "jn", "device": "src", "target": target, "sync": "none"}),
    );
    let chain = info_chain(&target);
    assert_eq!(chain[0]["backing-filename"], json!(src));
    h.ok("block-job-cancel", json!({"device": "jn"}));
    h.settle();
    h.bd.shutdown().unwrap();
    // Nothing was copied: the target reads the source through its backing file.
    assert_eq!(
        run("qemu-img", &["compare", &src, &target]),
        (true, "Images are identical.".to_string())
    );
}

fn map(path: &str) -> Vec<Value> {
    let (ok, out) = run("qemu-img", &["map", "--output=json", "-U", path]);
    assert!(ok, "qemu-img map {path}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_compressed_backup_writes_compressed_clusters_that_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    write(&src, "0xab", "0", "1M");
    write(&src, "0xcd", "2M", "512k");
    let tgt = qcow2(dir.path(), "tgt.qcow2");
    let plain = qcow2(dir.path(), "plain.qcow2");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    add(&mut h, "tgt", &tgt);
    add(&mut h, "plain", &plain);
    h.ok(
        "blockdev-backup",
        with(backup("j1", "src", "tgt"), json!({"compress": true})),
    );
    h.settle();
    h.ok("blockdev-backup", backup("j2", "src", "plain"));
    h.settle();
    h.bd.shutdown().unwrap();
    assert_eq!(
        run("qemu-img", &["compare", &src, &tgt]),
        (true, "Images are identical.".to_string())
    );
    assert!(run("qemu-img", &["check", "-q", &tgt]).0);
    // What QSD 10.0.2 maps for the same backup: data compressed, the rest zero.
    let runs: Vec<(u64, u64, bool, bool)> = map(&tgt)
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"] == true,
                e["compressed"] == true,
            )
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (0, 1 << 20, true, true),
            (1 << 20, 1 << 20, false, false),
            (2 << 20, 512 << 10, true, true),
            (5 << 19, 3 << 19, false, false),
        ]
    );
    let size = |p: &str| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&tgt) * 4 < size(&plain),
        "compressed {} bytes, plain {}",
        size(&tgt),
        size(&plain)
    );
}

#[test]
fn discard_source_discards_what_was_copied_on_a_source_opened_with_discard_unmap() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2");
    write(&src, "0xab", "0", "1M");
    let kept = qcow2(dir.path(), "kept.qcow2");
    write(&kept, "0xab", "0", "1M");
    let tgt = qcow2(dir.path(), "tgt.qcow2");
    let tgt2 = qcow2(dir.path(), "tgt2.qcow2");
    let mut h = Harness::block_layer();
    h.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "src", "discard": "unmap",
               "file": {"driver": "file", "filename": src, "discard": "unmap"}}),
    );
    add(&mut h, "kept", &kept);
    add(&mut h, "tgt", &tgt);
    add(&mut h, "tgt2", &tgt2);
    for (job, device, target) in [("j1", "src", "tgt"), ("j2", "kept", "tgt2")] {
        h.ok(
            "blockdev-backup",
            with(backup(job, device, target), json!({"discard-source": true})),
        );
        h.settle();
    }
    h.bd.shutdown().unwrap();
    let read = |path: &str, pattern: &str| {
        let cmd = format!("read -P {pattern} 0 1M");
        let (ok, out) = run("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", &cmd, path]);
        ok && !out.contains("Pattern verification failed")
    };
    assert!(read(&tgt, "0xab") && read(&tgt2, "0xab"));
    // Discarded where the node allows it (discard=unmap), left alone where it does not.
    assert!(read(&src, "0"));
    assert!(read(&kept, "0xab"));
    assert!(run("qemu-img", &["check", "-q", &src]).0);
}

/// `(start KiB, length KiB, kind, has a host offset)` of each qemu-img map entry; kind is
/// `data`, `zero` (present in the image) or `absent` (reads as zeroes from nowhere).
fn zero_map(path: &str) -> Vec<(u64, u64, &'static str, bool)> {
    map(path)
        .iter()
        .map(|e| {
            let kind = if e["data"] == true {
                "data"
            } else if e["present"] == true {
                "zero"
            } else {
                "absent"
            };
            (
                e["start"].as_u64().unwrap() >> 10,
                e["length"].as_u64().unwrap() >> 10,
                kind,
                e.get("offset").is_some(),
            )
        })
        .collect()
}

/// Mirrors to READY, then cancels (a soft cancel: the target is left in sync).
fn mirror_and_cancel(h: &mut Harness, command: &str, args: Value) -> Vec<String> {
    let job = args["job-id"].as_str().unwrap().to_string();
    h.ok(command, args);
    h.settle();
    h.ok("block-job-cancel", json!({"device": job}));
    h.settle();
    // As the daemon before its next command: the finished job's filter node goes.
    h.ok("query-named-block-nodes", json!({}));
    h.take_events()
        .into_iter()
        .filter(|e| e.starts_with("BLOCK_JOB_READY"))
        .collect()
}

#[test]
fn mirror_unmap_and_zero_target_map_the_target_as_qsd_does() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let src = qcow2(dir.path(), "src.qcow2");
    let dsrc = qcow2(dir.path(), "dsrc.qcow2");
    for image in [&src, &dsrc] {
        write(image, "0xab", "0", "1M");
        // A zero cluster the source allocates, the rest unallocated.
        assert!(run("qemu-io", &["-f", "qcow2", "-c", "write -z 1M 64k", image]).0);
    }
    for t in ["t1", "t2", "t3"] {
        let path = qcow2(dir.path(), &format!("{t}.qcow2"));
        write(&path, "0x11", "0", "4M");
    }
    let t4 = qcow2(dir.path(), "t4.qcow2");
    let mut h = Harness::block_layer();
    add(&mut h, "src", &src);
    add(&mut h, "t4", &t4);
    h.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "dsrc", "discard": "unmap",
               "file": {"driver": "file", "filename": dsrc}}),
    );
    let drive = |job: &str, device: &str, target: &str, extra: Value| {
        with(
            json!({"job-id": job, "device": device, "target": p(target), "format": "qcow2",
                   "sync": "full"}),
            extra,
        )
    };
    let existing = |unmap: bool| json!({"mode": "existing", "unmap": unmap});
    let ready = |len: u64, job: &str| {
        vec![format!(
            r#"BLOCK_JOB_READY {{"type":"mirror","device":"{job}","len":{len},"offset":{len},"speed":0}}"#
        )]
    };
    // The target opened with the source's discard=unmap is zeroed up front: only what the
    // source allocates is counted (1 MiB of data, 64 KiB of zeroes).
    let counted = (1 << 20) + (64 << 10);
    let r = mirror_and_cancel(
        &mut h,
        "drive-mirror",
        drive("j1", "dsrc", "t1.qcow2", existing(true)),
    );
    assert_eq!(r, ready(counted, "j1"));
    let r = mirror_and_cancel(
        &mut h,
        "drive-mirror",
        drive("j2", "dsrc", "t2.qcow2", existing(false)),
    );
    assert_eq!(r, ready(counted, "j2"));
    let r = mirror_and_cancel(
        &mut h,
        "drive-mirror",
        drive("j3", "src", "t3.qcow2", existing(true)),
    );
    assert_eq!(r, ready(4 << 20, "j3"));
    let r = mirror_and_cancel(
        &mut h,
        "blockdev-mirror",
        json!({"job-id": "j4", "device": "src", "target": "t4", "sync": "full"}),
    );
    assert_eq!(r, ready(4 << 20, "j4"));
    let r = mirror_and_cancel(
        &mut h,
        "drive-mirror",
        drive("j5", "src", "t5.qcow2", json!({})),
    );
    assert_eq!(r, ready(counted, "j5"));
    h.bd.shutdown().unwrap();
    for t in ["t1", "t2", "t3", "t4", "t5"] {
        let path = p(&format!("{t}.qcow2"));
        assert_eq!(
            run("qemu-img", &["compare", &src, &path]),
            (true, "Images are identical.".to_string()),
            "{t}"
        );
        assert!(run("qemu-img", &["check", "-q", &path]).0, "{t}");
    }
    let data = (0, 1024, "data", true);
    // unmap=true with discard=unmap: the old data clusters are freed.
    assert_eq!(
        zero_map(&p("t1.qcow2")),
        vec![data, (1024, 3072, "zero", false)]
    );
    // unmap=false, or a target without discard=unmap: zeroes over the kept clusters.
    assert_eq!(
        zero_map(&p("t2.qcow2")),
        vec![data, (1024, 3072, "zero", true)]
    );
    assert_eq!(
        zero_map(&p("t3.qcow2")),
        vec![data, (1024, 3072, "zero", true)]
    );
    // blockdev-mirror zeroes its target (sync=full); a new image keeps what the source
    // does not allocate unallocated.
    assert_eq!(
        zero_map(&p("t4.qcow2")),
        vec![data, (1024, 3072, "zero", false)]
    );
    assert_eq!(
        zero_map(&p("t5.qcow2")),
        vec![
            data,
            (1024, 64, "zero", false),
            (1088, 3008, "absent", false)
        ]
    );
}
