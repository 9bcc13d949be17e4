//! Commands over the block crate's graph with real image files, checked with qemu-img.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{Value, json};

fn raw_image(dir: &Path, name: &str, size: u64, fill: u8) -> String {
    let path = dir.join(name);
    std::fs::write(&path, vec![fill; size as usize]).unwrap();
    path.to_str().unwrap().to_string()
}

fn add_raw(h: &mut Harness, node: &str, filename: &str) {
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": node,
               "file": {"driver": "file", "filename": filename}}),
    );
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn bitmaps(h: &mut Harness) -> Value {
    let nodes = h.ok("query-named-block-nodes", json!({"flat": true}));
    let src = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "src")
        .unwrap()
        .clone();
    let list: Vec<Value> = src["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|b| {
            json!({"name": b["name"], "recording": b["recording"], "busy": b["busy"],
                   "granularity": b["granularity"], "count": b["count"]})
        })
        .collect();
    Value::Array(list)
}

#[test]
fn a_full_backup_between_raw_files_makes_identical_images() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0xab);
    let tgt = raw_image(dir.path(), "tgt.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    add_raw(&mut h, "tgt", &tgt);
    h.ok("blockdev-backup", backup("j1", "src", "tgt"));
    h.settle();
    let ev = h.take_events();
    assert_eq!(ev.last().map(String::as_str), Some("j1 null"));
    assert!(ev.iter().any(|e| e.starts_with("BLOCK_JOB_COMPLETED")));
    h.bd.shutdown().unwrap();
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", &src, &tgt]),
        (true, "Images are identical.".to_string())
    );
}

#[test]
fn a_backup_onto_a_failing_target_reports_the_error_and_completes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "b.raw", 4 * MIB, 1);
    let bad = raw_image(dir.path(), "tb.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "b", &src);
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "bad", "file": {"driver": "blkdebug",
               "inject-error": [{"event": "pwritev", "errno": 5}],
               "image": {"driver": "file", "filename": bad}}}),
    );
    h.ok("blockdev-backup", backup("jb", "b", "bad"));
    h.take_events();
    h.settle();
    assert_eq!(
        h.take_events(),
        s(&[
            r#"BLOCK_JOB_ERROR {"device":"jb","operation":"write","action":"report"}"#,
            "jb aborting",
            r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"jb","len":4194304,"offset":0,"speed":0,"error":"Input/output error"}"#,
            "jb concluded",
            "jb null",
        ])
    );
    // A failing target never touches the source.
    let source = std::fs::read(&src).unwrap();
    assert_eq!(source.len() as u64, 4 * MIB);
    assert!(source.iter().all(|&b| b == 1), "the source changed");
}

#[test]
fn a_grouped_pair_with_one_failing_target_cancels_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let a = raw_image(dir.path(), "a.raw", 4 * MIB, 1);
    let ta = raw_image(dir.path(), "ta.raw", 4 * MIB, 0);
    let b = raw_image(dir.path(), "b.raw", 4 * MIB, 2);
    let tb = raw_image(dir.path(), "tb.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "a", &a);
    add_raw(&mut h, "ta", &ta);
    add_raw(&mut h, "b", &b);
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tb", "file": {"driver": "blkdebug",
               "inject-error": [{"event": "pwritev", "errno": 5}],
               "image": {"driver": "file", "filename": tb}}}),
    );
    h.ok(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": with(backup("ja", "a", "ta"), json!({"speed": 1048576}))},
            {"type": "blockdev-backup", "data": backup("jb", "b", "tb")}],
            "properties": {"completion-mode": "grouped"}}),
    );
    assert_eq!(
        h.take_events(),
        s(&[
            "ja created",
            "jb created",
            "jb running",
            "jb paused",
            "ja running",
            "ja paused",
            "jb running",
            "ja running",
        ])
    );
    h.settle();
    let ev = h.take_events();
    let of = |id: &str| -> Vec<String> {
        ev.iter()
            .filter(|e| {
                e.starts_with(&format!("{id} ")) || e.contains(&format!("\"device\":\"{id}\""))
            })
            .cloned()
            .collect()
    };
    assert_eq!(
        of("jb"),
        s(&[
            r#"BLOCK_JOB_ERROR {"device":"jb","operation":"write","action":"report"}"#,
            "jb aborting",
            r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"jb","len":4194304,"offset":0,"speed":0,"error":"Input/output error"}"#,
            "jb concluded",
            "jb null",
        ])
    );
    let ja = of("ja");
    assert_eq!(ja[0], "ja aborting", "{ev:?}");
    // (len is 0 here: on the stepped executor ja is cancelled before its first poll, where a
    // backup sets its total.)
    assert!(
        ja[1].starts_with(r#"BLOCK_JOB_CANCELLED {"type":"backup","device":"ja""#),
        "{ev:?}"
    );
    assert_eq!(&ja[2..], &s(&["ja concluded", "ja null"])[..]);
}

#[test]
fn a_transaction_hitting_abort_rolls_every_bitmap_action_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    h.ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b1"}),
    );
    h.ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b2", "disabled": true}),
    );
    h.ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b3", "granularity": 131072}),
    );
    let before = bitmaps(&mut h);
    assert_eq!(
        h.err(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b1"}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": "src", "target": "b2",
                  "bitmaps": ["b1", {"node": "src", "name": "b3"}]}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b1"}},
                {"type": "x-block-dirty-bitmap-enable", "data": {"node": "src", "name": "b2"}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b3"}},
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b4"}},
                {"type": "abort", "data": {}}]}),
        ),
        "GenericError: Transaction aborted using Abort action"
    );
    assert_eq!(bitmaps(&mut h), before);
    h.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b1"}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": "src", "name": "b2"}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "src", "target": "b3", "bitmaps": ["b1"]}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b1"}}]}),
    );
    let mut names: Vec<Value> = bitmaps(&mut h)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| json!([b["name"], b["recording"]]))
        .collect();
    names.sort_by_key(|n| n[0].as_str().map(String::from));
    assert_eq!(names, [json!(["b2", true]), json!(["b3", true])]);
}

#[test]
fn a_transaction_with_abort_tears_down_the_backup_job_without_block_job_events() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0);
    let tgt = raw_image(dir.path(), "tgt.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    add_raw(&mut h, "tgt", &tgt);
    assert_eq!(
        h.err(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm1"}},
                {"type": "blockdev-backup", "data": backup("j1", "src", "tgt")},
                {"type": "abort", "data": {}}]}),
        ),
        "GenericError: Transaction aborted using Abort action"
    );
    assert_eq!(
        h.take_events(),
        s(&["j1 created", "j1 aborting", "j1 concluded", "j1 null"])
    );
    assert_eq!(bitmaps(&mut h), json!([]));
    assert_eq!(h.ok("query-jobs", json!({})), json!([]));
    // The target was released: a new backup may use it.
    h.ok("blockdev-backup", backup("j2", "src", "tgt"));
}

#[test]
fn grouped_mode_is_refused_for_every_non_backup_action_naming_the_first() {
    let mut h = Harness::block_layer();
    for (kind, data) in [
        ("abort", json!({})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": "bm1"}),
        ),
        (
            "block-dirty-bitmap-clear",
            json!({"node": "src", "name": "bm0"}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "src", "name": "bm0"}),
        ),
        (
            "blockdev-snapshot",
            json!({"node": "src", "overlay": "tgt"}),
        ),
        (
            "blockdev-snapshot-internal-sync",
            json!({"device": "src", "name": "s"}),
        ),
    ] {
        assert_eq!(
            h.err(
                "transaction",
                json!({"actions": [{"type": "blockdev-backup", "data": backup("j1", "src", "tgt")},
                                   {"type": kind, "data": data}],
                       "properties": {"completion-mode": "grouped"}}),
            ),
            format!(
                "GenericError: Action '{kind}' does not support transaction property completion-mode = grouped"
            )
        );
    }
    assert_eq!(h.take_events(), Vec::<String>::new());
}

#[test]
fn an_incremental_backup_copies_the_dirty_clusters_and_leaves_the_bitmap_empty() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0x11);
    let mid = raw_image(dir.path(), "mid.raw", 4 * MIB, 0);
    let out = raw_image(dir.path(), "out.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    add_raw(&mut h, "mid", &mid);
    add_raw(&mut h, "out", &out);
    h.ok(
        "transaction",
        json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "mid", "name": "bm0"}}]}),
    );
    // A full backup into `mid` dirties all of `mid`'s bitmap.
    h.ok("blockdev-backup", backup("j0", "src", "mid"));
    h.settle();
    h.take_events();
    let count = |h: &mut Harness| {
        let nodes = h.ok("query-named-block-nodes", json!({"flat": true}));
        let mid = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "mid")
            .unwrap()
            .clone();
        mid["dirty-bitmaps"].clone()
    };
    assert_eq!(count(&mut h)[0]["count"], 4194304);
    h.ok(
        "blockdev-backup",
        json!({"job-id": "j1", "device": "mid", "target": "out", "sync": "incremental", "bitmap": "bm0"}),
    );
    let during = count(&mut h);
    let busy: Vec<(Value, Value)> = during
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].clone(), b["busy"].clone()))
        .collect();
    assert!(busy.contains(&(json!("bm0"), json!(true))), "{during}");
    assert_eq!(busy.len(), 2, "the anonymous successor is listed: {during}");
    h.settle();
    let ev = h.take_events();
    assert!(
        ev.contains(&r#"BLOCK_JOB_COMPLETED {"type":"backup","device":"j1","len":4194304,"offset":4194304,"speed":0}"#.to_string()),
        "{ev:?}"
    );
    let after = count(&mut h);
    assert_eq!(
        (
            after[0]["name"].clone(),
            after[0]["count"].clone(),
            after[0]["busy"].clone()
        ),
        (json!("bm0"), json!(0), json!(false))
    );
    assert_eq!(after.as_array().unwrap().len(), 1);
    h.bd.shutdown().unwrap();
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", &src, &out]),
        (true, "Images are identical.".to_string())
    );
}

#[test]
fn a_failed_incremental_backup_merges_the_new_writes_back_and_keeps_the_dirty_bits() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0x11);
    let mid = raw_image(dir.path(), "mid.raw", 4 * MIB, 0);
    let bad = raw_image(dir.path(), "bad.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    add_raw(&mut h, "mid", &mid);
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "bad", "file": {"driver": "blkdebug",
               "inject-error": [{"event": "pwritev", "errno": 5}],
               "image": {"driver": "file", "filename": bad}}}),
    );
    h.ok(
        "block-dirty-bitmap-add",
        json!({"node": "mid", "name": "bm0"}),
    );
    h.ok("blockdev-backup", backup("j0", "src", "mid"));
    h.settle();
    h.ok(
        "blockdev-backup",
        json!({"job-id": "j1", "device": "mid", "target": "bad", "sync": "incremental", "bitmap": "bm0"}),
    );
    h.settle();
    let nodes = h.ok("query-named-block-nodes", json!({"flat": true}));
    let mid = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "mid")
        .unwrap()
        .clone();
    let b = &mid["dirty-bitmaps"];
    assert_eq!(b.as_array().unwrap().len(), 1, "{b}");
    assert_eq!(
        (b[0]["count"].clone(), b[0]["busy"].clone()),
        (json!(4194304), json!(false))
    );
}

#[test]
fn drive_backup_creates_the_target_image_in_the_sources_format_and_fills_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0x5a);
    let target = dir.path().join("db.raw").to_str().unwrap().to_string();
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    h.ok(
        "drive-backup",
        json!({"job-id": "jd", "device": "src", "target": target, "sync": "full"}),
    );
    assert_eq!(
        h.take_events(),
        s(&["jd created", "jd running", "jd paused", "jd running"])
    );
    let during = h.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(
        during.as_array().unwrap().len(),
        5,
        "the backup's filter, src, the target and their files: {during}"
    );
    assert_eq!(during[0]["drv"], "copy-before-write", "{during}");
    h.settle();
    assert_eq!(h.take_events().last().map(String::as_str), Some("jd null"));
    // The target node ends with its job.
    let after = h.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(after.as_array().unwrap().len(), 2, "{after}");
    h.bd.shutdown().unwrap();
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", &src, &target]),
        (true, "Images are identical.".to_string())
    );
}

#[test]
fn drive_backup_in_mode_existing_opens_the_file_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", MIB, 0x5a);
    let missing = dir.path().join("none.raw").to_str().unwrap().to_string();
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    let e = h.err(
        "drive-backup",
        json!({"job-id": "jd", "device": "src", "target": missing, "sync": "full", "mode": "existing"}),
    );
    assert!(e.starts_with("GenericError: "), "{e}");
    assert!(!Path::new(&missing).exists());
    assert_eq!(h.take_events(), Vec::<String>::new());
}

#[test]
fn a_snapshot_onto_a_raw_overlay_is_refused_and_the_new_node_goes_away_but_the_file_stays() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", MIB, 0x5a);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "top", "file": "src"}),
    );
    // raw cannot have a backing file: the overlay is refused after its file was created.
    let ovl = dir.path().join("ovl.raw").to_str().unwrap().to_string();
    assert_eq!(
        h.err(
            "blockdev-snapshot-sync",
            json!({"node-name": "src", "snapshot-file": ovl, "snapshot-node-name": "ovl", "format": "raw"})
        ),
        "GenericError: The overlay does not support backing images"
    );
    assert!(Path::new(&ovl).exists());
    let nodes = h.ok("query-named-block-nodes", json!({"flat": true}));
    assert!(
        !nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "ovl"),
        "{nodes}"
    );
}

#[test]
fn a_ready_mirror_copies_later_writes_to_the_source_before_completing() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0x11);
    let m1 = raw_image(dir.path(), "m1.raw", 4 * MIB, 0);
    let mut graph = block::BlockGraph::new();
    let mut add = |name: &str, file: &str| {
        graph
            .blockdev_add(&options(json!({"driver": "raw", "node-name": name,
                                  "file": {"driver": "file", "filename": file}})))
            .unwrap()
    };
    let source = add("src", &src);
    add("m1", &m1);
    // A guest's view of the source (as an export's): a parent that the mirror's filter and
    // then the pivot move.
    let guest = block::BlockBackend::new(
        &source,
        "export 'e0'",
        block::Perm::CONSISTENT_READ | block::Perm::WRITE,
        block::Perm::ALL,
    )
    .unwrap();
    let mut h = Harness::over(
        Box::new(blockdev::BlockLayer::new(graph)),
        MemGraph::default(),
    );
    h.ok(
        "blockdev-mirror",
        json!({"job-id": "jm", "device": "src", "target": "m1", "sync": "full"}),
    );
    h.step();
    assert!(h.take_events().contains(&"jm ready".to_string()));
    // A guest write after READY goes through the filter, which records it.
    assert_eq!(guest.root().driver_name(), "mirror_top");
    guest.root().write_at(MIB, &vec![0x99; 65536]).unwrap();
    h.advance(std::time::Duration::from_millis(150));
    h.ok("block-job-complete", json!({"device": "jm"}));
    h.advance(std::time::Duration::from_millis(150));
    let ev = h.take_events();
    assert!(
        ev.contains(&r#"BLOCK_JOB_COMPLETED {"type":"mirror","device":"jm","len":4259840,"offset":4259840,"speed":0}"#.to_string()),
        "{ev:?}"
    );
    // The pivot moved the guest onto the target.
    assert_eq!(guest.root().name(), "m1");
    drop(guest);
    h.bd.shutdown().unwrap();
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "raw", &src, &m1]),
        (true, "Images are identical.".to_string())
    );
}

#[test]
fn a_backups_filter_node_shows_under_filter_node_name_while_the_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_image(dir.path(), "src.raw", 4 * MIB, 0x5a);
    let tgt = raw_image(dir.path(), "tgt.raw", 4 * MIB, 0);
    let mut h = Harness::block_layer();
    add_raw(&mut h, "src", &src);
    add_raw(&mut h, "tgt", &tgt);
    let backup = |name: &str| {
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "none",
               "filter-node-name": name})
    };
    assert_eq!(
        h.err("blockdev-backup", backup("1bad")),
        "GenericError: Could not create node: Invalid node-name: '1bad'"
    );
    assert_eq!(
        h.err("blockdev-backup", backup("src")),
        "GenericError: Could not create node: Duplicate nodes with node-name='src'"
    );
    h.ok("blockdev-backup", backup("fl"));
    let during = h.ok("query-named-block-nodes", json!({"flat": true}));
    let fl = during
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fl")
        .unwrap_or_else(|| panic!("no fl in {during}"));
    assert_eq!(
        (&fl["drv"], &fl["file"]),
        (&json!("copy-before-write"), &json!(src))
    );
    assert_eq!(
        h.err("blockdev-del", json!({"node-name": "fl"})),
        "GenericError: Node 'fl' is busy: block device is in use by block job: backup"
    );
    assert_eq!(
        h.err("blockdev-del", json!({"node-name": "src"})),
        "GenericError: Block device src is in use"
    );
    h.ok("block-job-cancel", json!({"device": "j"}));
    h.settle();
    let after = h.ok("query-named-block-nodes", json!({"flat": true}));
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node-name"] != "fl"),
        "{after}"
    );
    h.ok("blockdev-del", json!({"node-name": "src"}));
}

#[test]
fn a_graph_without_filter_nodes_refuses_filter_node_name() {
    let h_graph = MemGraph::default();
    h_graph.add("src", MemNode::new("src", MIB, 1));
    h_graph.add("tgt", MemNode::new("tgt", MIB, 0));
    let mut h = Harness::over(Box::new(h_graph.clone()), h_graph);
    assert_eq!(
        h.err(
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "filter-node-name": "fl"})
        ),
        "GenericError: This block layer does not support filter nodes (filter-node-name)"
    );
}
