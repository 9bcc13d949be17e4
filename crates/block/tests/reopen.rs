//! `blockdev-reopen` and active/inactive nodes beyond what the oracle scenarios
//! (`b13_reopen`, `b14_set_active`) can record: what qemu-storage-daemon does not survive (an
//! empty list), what this block layer refuses by name where QEMU would act, and what an
//! inactive node does with writes.

mod common;
use common::AddJson;

use std::sync::Arc;

use block::{BlockGraph, BlockNode};
use qmp_api::BlockdevOptions;
use serde_json::{Value, json};

fn qcow2_image(dir: &tempfile::TempDir, name: &str) -> String {
    let path = dir.path().join(name).to_str().unwrap().to_string();
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &path, "1M"])
        .status()
        .expect("qemu-img (Debian package qemu-utils) is needed for this test")
        .success();
    assert!(ok);
    path
}

fn options(v: Value) -> BlockdevOptions {
    qmp_api::input::from_value(&v).unwrap()
}

fn reopen(g: &mut BlockGraph, list: Value) -> Result<(), String> {
    let list: Vec<BlockdevOptions> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| options(v.clone()))
        .collect();
    g.reopen(&list).map_err(|e| e.desc().to_string())
}

/// A qcow2 node `q` over the file node `qf` it opened itself.
fn setup(dir: &tempfile::TempDir) -> (BlockGraph, Arc<BlockNode>, Value) {
    let mut g = BlockGraph::new();
    let file =
        json!({"driver": "file", "node-name": "qf", "filename": qcow2_image(dir, "q.qcow2")});
    let q = g
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "q", "file": file}))
        .unwrap();
    (g, q, file)
}

#[test]
fn an_empty_list_reopens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, q, _) = setup(&dir);
    reopen(&mut g, json!([])).unwrap();
    assert!(!q.is_read_only());
}

#[test]
fn changes_qemu_makes_but_this_layer_cannot_are_refused_by_name_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, q, _) = setup(&dir);
    let other = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "of",
                                   "filename": qcow2_image(&dir, "o.qcow2")}))
        .unwrap();
    let refusals = [
        (json!({"lazy-refcounts": true}), "lazy-refcounts"),
        (json!({"discard": "unmap"}), "discard"),
        (json!({"detect-zeroes": "on"}), "detect-zeroes"),
        (json!({"cache": {"direct": true}}), "cache.direct"),
        (json!({"overlap-check": "all"}), "overlap-check"),
    ];
    for (extra, name) in refusals {
        let mut entry =
            json!({"driver": "qcow2", "node-name": "q", "file": "qf", "read-only": true});
        for (k, v) in extra.as_object().unwrap() {
            entry[k] = v.clone();
        }
        let e = reopen(&mut g, json!([entry])).unwrap_err();
        assert_eq!(
            e,
            format!("Changing option '{name}' in a reopen is not supported by this block layer")
        );
        assert!(!q.is_read_only(), "{name}: nothing may change");
    }
    // The tuning knobs the qcow2 driver accepts at open with no effect may change.
    reopen(
        &mut g,
        json!([{"driver": "qcow2", "node-name": "q", "file": "qf", "cache-clean-interval": 10}]),
    )
    .unwrap();
    let e = reopen(
        &mut g,
        json!([{"driver": "qcow2", "node-name": "q", "file": "of"}]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Changing the 'file' child of a 'qcow2' node is not supported by this block layer"
    );
    assert!(Arc::ptr_eq(
        &q.child("file").unwrap(),
        &g.find("qf").unwrap()
    ));
    assert!(!other.is_in_use());
}

#[test]
fn a_raw_node_follows_its_new_file_and_closes_the_one_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    std::fs::write(&a, vec![0xaa; 65536]).unwrap();
    std::fs::write(&b, vec![0xbb; 65536]).unwrap();
    let mut g = BlockGraph::new();
    let r = g
        .blockdev_add_json(&json!({"driver": "raw", "node-name": "r",
            "file": {"driver": "file", "node-name": "af", "filename": a.to_str().unwrap()}}))
        .unwrap();
    g.blockdev_add_json(
        &json!({"driver": "file", "node-name": "bf", "filename": b.to_str().unwrap()}),
    )
    .unwrap();
    reopen(
        &mut g,
        json!([{"driver": "raw", "node-name": "r", "file": "bf"}]),
    )
    .unwrap();
    let mut buf = [0u8; 512];
    r.read_at(0, &mut buf).unwrap();
    assert_eq!(buf[0], 0xbb);
    assert!(g.find("af").is_none(), "the file r opened itself is closed");
    let e = reopen(
        &mut g,
        json!([{"driver": "raw", "node-name": "r", "file": "bf", "offset": 512}]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Changing option 'offset' in a reopen is not supported by this block layer"
    );
}

#[test]
fn an_inactive_node_takes_no_write_and_its_read_only_flag_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, q, _) = setup(&dir);
    g.set_node_active(&q, false).unwrap();
    assert!(!q.is_active());
    assert!(
        !g.find("qf").unwrap().is_active(),
        "the child only q used follows"
    );
    assert_eq!(
        q.write_at(0, &[1u8; 512]).unwrap_err().errno(),
        Some(libc::EPERM)
    );
    let e = reopen(
        &mut g,
        json!([{"driver": "qcow2", "node-name": "q", "file": "qf", "read-only": true}]),
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Switching read-only of the inactive node 'q' is not supported by this block layer"
    );
    g.set_all_active(true).unwrap();
    q.write_at(0, &[1u8; 512]).unwrap();
    let mut buf = [0u8; 512];
    q.read_at(0, &mut buf).unwrap();
    assert_eq!(buf[0], 1);
}
