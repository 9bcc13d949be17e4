//! Snapshot commands and actions against the s16, s18, s27 and b06 transcripts (in-memory graph).

mod common;

use common::*;
use serde_json::json;

fn with_top() -> Harness {
    let h = Harness::with_src_tgt();
    h.graph
        .parents
        .lock()
        .unwrap()
        .insert("src".into(), vec!["top".into()]);
    h
}

fn snapshot_sync(file: &str, node: &str) -> serde_json::Value {
    json!({"node-name": "src", "snapshot-file": file, "snapshot-node-name": node, "format": "qcow2"})
}

#[test]
fn snapshot_sync_creates_the_overlay_over_the_old_image_and_puts_it_in_its_place() {
    let mut h = with_top();
    h.ok(
        "blockdev-snapshot-sync",
        snapshot_sync("/t/ovl.qcow2", "ovl"),
    );
    let created = h.graph.created.lock().unwrap().clone();
    assert_eq!(created.len(), 1);
    let (image, size, backing) = &created[0];
    assert_eq!(
        (image.filename.as_str(), image.format.as_str(), *size),
        ("/t/ovl.qcow2", "qcow2", 4 * MIB)
    );
    assert_eq!(backing.as_ref().unwrap().filename, "/mem/src.qcow2");
    assert_eq!(
        h.graph.parents.lock().unwrap()["ovl"],
        vec!["top".to_string()]
    );
    assert_eq!(h.graph.backing.lock().unwrap()["ovl"], "src");
    assert_eq!(*h.graph.read_only.lock().unwrap(), vec!["src".to_string()]);
}

#[test]
fn an_overlay_nothing_uses_disappears_after_the_snapshot_but_the_old_node_is_read_only() {
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-snapshot-sync",
        snapshot_sync("/t/ovl.qcow2", "ovl"),
    );
    assert!(h.graph.nodes.lock().unwrap().get("ovl").is_none());
    assert_eq!(*h.graph.read_only.lock().unwrap(), vec!["src".to_string()]);
    assert_eq!(h.graph.created.lock().unwrap().len(), 1);
}

#[test]
fn snapshot_sync_argument_errors_come_in_qemus_order() {
    let mut h = with_top();
    assert_eq!(
        h.err(
            "blockdev-snapshot-sync",
            json!({"node-name": "src", "snapshot-file": "/t/o.qcow2"})
        ),
        "GenericError: New overlay node-name missing"
    );
    assert_eq!(
        h.err("blockdev-snapshot-sync", snapshot_sync("/t/o.qcow2", "tgt")),
        "GenericError: New overlay node-name already in use"
    );
    assert_eq!(
        h.err(
            "blockdev-snapshot-sync",
            json!({"node-name": "nosuch", "snapshot-file": "/t/o.qcow2", "snapshot-node-name": "o"})
        ),
        "GenericError: Cannot find device='' nor node-name='nosuch'"
    );
    assert_eq!(
        h.err(
            "blockdev-snapshot-sync",
            json!({"snapshot-file": "/t/o.qcow2", "snapshot-node-name": "o"})
        ),
        "GenericError: Cannot find device='' nor node-name=''"
    );
    assert!(h.graph.created.lock().unwrap().is_empty());
}

#[test]
fn an_aborted_snapshot_sync_leaves_the_file_but_not_the_graph_change() {
    let mut h = with_top();
    assert_eq!(
        h.err(
            "transaction",
            json!({"actions": [{"type": "blockdev-snapshot-sync", "data": snapshot_sync("/t/ovl2.qcow2", "ovl2")},
                               {"type": "abort", "data": {}}]})
        ),
        "GenericError: Transaction aborted using Abort action"
    );
    assert_eq!(h.graph.created.lock().unwrap().len(), 1);
    assert!(h.graph.nodes.lock().unwrap().get("ovl2").is_none());
    assert_eq!(
        h.graph.parents.lock().unwrap()["src"],
        vec!["top".to_string()]
    );
    assert!(h.graph.read_only.lock().unwrap().is_empty());
}

#[test]
fn blockdev_snapshot_of_a_node_onto_itself_would_create_a_cycle() {
    let mut h = Harness::with_src_tgt();
    assert_eq!(
        h.err(
            "blockdev-snapshot",
            json!({"node": "src", "overlay": "nosuch"})
        ),
        "GenericError: Cannot find device='nosuch' nor node-name='nosuch'"
    );
    assert_eq!(
        h.err(
            "blockdev-snapshot",
            json!({"node": "src", "overlay": "src"})
        ),
        "GenericError: Making 'src' a backing child of 'src' would create a cycle"
    );
}

#[test]
fn blockdev_snapshot_with_an_existing_overlay_inserts_it() {
    let mut h = with_top();
    h.ok(
        "blockdev-snapshot",
        json!({"node": "src", "overlay": "tgt"}),
    );
    assert_eq!(h.graph.backing.lock().unwrap()["tgt"], "src");
    assert!(h.graph.nodes.lock().unwrap().contains_key("tgt"));
}

#[test]
fn internal_snapshot_errors_and_rollback() {
    let mut h = Harness::with_src_tgt();
    let raw = MemNode::new("r", MIB, 0);
    let raw = Arc::new(MemNode {
        image: blockdev::ImageRef {
            filename: "/mem/r.raw".into(),
            format: "raw".into(),
        },
        ..Arc::into_inner(raw).unwrap()
    });
    h.graph.add("r", raw);
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
            "blockdev-snapshot-internal-sync",
            json!({"device": "r", "name": "s"})
        ),
        "GenericError: Block format 'raw' used by device 'r' does not support internal snapshots"
    );
    assert_eq!(
        h.err(
            "blockdev-snapshot-internal-sync",
            json!({"device": "nosuch", "name": "s"})
        ),
        "GenericError: Cannot find device='nosuch' nor node-name='nosuch'"
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
    assert_eq!(
        h.graph.snapshots.lock().unwrap()["src"],
        vec!["snap0".to_string(), "snap2".to_string()]
    );
}

use std::sync::Arc;
