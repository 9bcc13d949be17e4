//! The `block-dirty-bitmap-*` commands and their transaction actions: checks, error texts (as
//! qemu-storage-daemon 10.0.2 words them), and aborts restoring state. The bitmaps are data in
//! the node layer (`block::DirtyBitmap` lists); the commands are the command layer's.

mod common;

use std::sync::{Arc, Mutex};

use block::{BitmapStore, BlockResult, DirtyBitmap};
use common::*;
use serde_json::{Value, json};

/// A format's bitmap store, standing in for qcow2: records what it is asked to remove.
#[derive(Default)]
struct FakeStore {
    log: Mutex<Vec<String>>,
}

impl BitmapStore for FakeStore {
    fn load_bitmaps(&self) -> BlockResult<Vec<DirtyBitmap>> {
        Ok(Vec::new())
    }
    fn can_store_new_bitmap(&self, _name: &str, _granularity: u64) -> BlockResult<()> {
        Ok(())
    }
    fn remove_persistent_bitmap(&self, name: &str) -> BlockResult<()> {
        self.log.lock().unwrap().push(format!("remove {name}"));
        Ok(())
    }
    fn store_bitmaps(&self, _bitmaps: &[DirtyBitmap]) -> BlockResult<()> {
        Ok(())
    }
}

/// Nodes `n` (no bitmap store) and `q` (a store, with persistent bitmaps `p`, read-only `ro`
/// and inconsistent `bad`, each with its first cluster dirty), 4 MiB each.
fn harness() -> (Harness, Arc<FakeStore>) {
    let h = Harness::new();
    h.graph.add("n", MemNode::new("n", 4 * MIB, 0));
    h.graph.add("q", MemNode::new("q", 4 * MIB, 0));
    let store = Arc::new(FakeStore::default());
    let mut loaded = Vec::new();
    for (name, ro, bad) in [
        ("p", false, false),
        ("ro", true, false),
        ("bad", false, true),
    ] {
        let mut b = DirtyBitmap::new(Some(name.into()), 65536, 4 * MIB).unwrap();
        b.set_persistent(true);
        b.set_readonly(ro);
        b.set_inconsistent(bad);
        b.set_dirty(0, 65536);
        loaded.push(b);
    }
    h.graph.with_store("q", store.clone(), loaded);
    (h, store)
}

fn add(h: &mut Harness, node: &str, name: &str, extra: Value) -> Result<Value, String> {
    let args = with(json!({"node": node, "name": name}), extra);
    h.cmd("block-dirty-bitmap-add", args).map_err(|e| e.desc)
}

fn cmd(h: &mut Harness, command: &str, node: &str, name: &str) -> Result<Value, String> {
    h.cmd(command, json!({"node": node, "name": name}))
        .map_err(|e| e.desc)
}

fn merge(h: &mut Harness, node: &str, target: &str, sources: Value) -> Result<Value, String> {
    h.cmd(
        "block-dirty-bitmap-merge",
        json!({"node": node, "target": target, "bitmaps": sources}),
    )
    .map_err(|e| e.desc)
}

fn bitmap<R>(h: &Harness, node: &str, name: &str, f: impl FnOnce(&mut DirtyBitmap) -> R) -> R {
    let list = h.graph.node_bitmaps(node);
    let mut list = list.bitmaps.lock().unwrap();
    f(list.iter_mut().find(|b| b.name() == Some(name)).unwrap())
}

fn count(h: &Harness, node: &str, name: &str) -> u64 {
    bitmap(h, node, name, |b| b.count())
}

fn dirty(h: &Harness, node: &str, name: &str, offset: u64, len: u64) {
    bitmap(h, node, name, |b| b.set_dirty(offset, len));
}

/// Every bitmap of `node`: name, granularity, count and flags, newest first.
fn describe(h: &Harness, node: &str) -> Vec<String> {
    let list = h.graph.node_bitmaps(node);
    let list = list.bitmaps.lock().unwrap();
    list.iter()
        .map(|b| {
            format!(
                "{} g={} count={} enabled={} busy={}",
                b.name().unwrap_or("-"),
                b.granularity(),
                b.count(),
                b.is_enabled(),
                b.is_busy()
            )
        })
        .collect()
}

fn names(h: &Harness, node: &str) -> Vec<String> {
    let list = h.graph.node_bitmaps(node);
    let list = list.bitmaps.lock().unwrap();
    list.iter()
        .filter_map(|b| b.name().map(str::to_string))
        .collect()
}

#[test]
fn add_twice_is_refused() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b0", json!({})).unwrap();
    assert_eq!(
        add(&mut h, "n", "b0", json!({})),
        Err("Bitmap already exists: b0".into())
    );
}

#[test]
fn add_with_empty_name_is_refused() {
    let (mut h, _) = harness();
    assert_eq!(
        add(&mut h, "n", "", json!({})),
        Err("Bitmap name cannot be empty".into())
    );
}

#[test]
fn add_with_a_1024_byte_name_is_refused() {
    let (mut h, _) = harness();
    let long = "x".repeat(1024);
    assert_eq!(
        add(&mut h, "n", &long, json!({})),
        Err(format!("Bitmap name too long: {long}"))
    );
    assert!(add(&mut h, "n", &"x".repeat(1023), json!({})).is_ok());
}

#[test]
fn add_checks_granularity() {
    let (mut h, _) = harness();
    for bad in [0, 256, 1000] {
        assert_eq!(
            add(&mut h, "n", "g", json!({"granularity": bad})),
            Err("Granularity must be power of 2 and at least 512".into())
        );
    }
    add(&mut h, "n", "g512", json!({"granularity": 512})).unwrap();
    add(&mut h, "n", "g2g", json!({"granularity": 1u64 << 31})).unwrap();
}

#[test]
fn add_on_unknown_node_is_refused() {
    let (mut h, _) = harness();
    assert_eq!(
        add(&mut h, "nonode", "b", json!({})),
        Err("Cannot find device='nonode' nor node-name='nonode'".into())
    );
}

#[test]
fn persistent_bitmap_needs_a_format_that_stores_them() {
    let (mut h, _) = harness();
    assert_eq!(
        add(&mut h, "n", "p1", json!({"persistent": true})),
        Err("Can't store persistent bitmaps to n: Operation not supported".into())
    );
    add(&mut h, "q", "p1", json!({"persistent": true})).unwrap();
}

#[test]
fn default_granularity_is_the_nodes_and_a_new_bitmap_is_empty_and_recording() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b", json!({})).unwrap();
    assert_eq!(
        describe(&h, "n"),
        ["b g=65536 count=0 enabled=true busy=false"]
    );
}

#[test]
fn disabled_bitmap_does_not_record() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b", json!({"disabled": true})).unwrap();
    blockdev::BlockIo::write_at(h.graph.node("n").as_ref(), &[1; 512], 0).unwrap();
    assert_eq!(count(&h, "n", "b"), 0);
}

#[test]
fn commands_on_missing_bitmap_or_node_say_so() {
    let (mut h, _) = harness();
    let missing = Err("Dirty bitmap 'nob' not found".to_string());
    assert_eq!(
        cmd(&mut h, "block-dirty-bitmap-remove", "n", "nob"),
        missing
    );
    assert_eq!(
        cmd(&mut h, "block-dirty-bitmap-remove", "nonode", "nob"),
        Err("Node 'nonode' not found".into())
    );
    assert_eq!(cmd(&mut h, "block-dirty-bitmap-clear", "n", "nob"), missing);
    assert_eq!(
        cmd(&mut h, "block-dirty-bitmap-enable", "n", "nob"),
        missing
    );
    assert_eq!(merge(&mut h, "n", "nob", json!(["x"])), missing);
}

#[test]
fn enable_and_disable_are_idempotent() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b", json!({})).unwrap();
    for (command, enabled) in [
        ("block-dirty-bitmap-disable", false),
        ("block-dirty-bitmap-disable", false),
        ("block-dirty-bitmap-enable", true),
        ("block-dirty-bitmap-enable", true),
    ] {
        cmd(&mut h, command, "n", "b").unwrap();
        assert_eq!(bitmap(&h, "n", "b", |b| b.is_enabled()), enabled);
    }
}

#[test]
fn busy_bitmap_refuses_every_command() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b", json!({})).unwrap();
    add(&mut h, "n", "other", json!({})).unwrap();
    bitmap(&h, "n", "b", |b| b.create_successor()).unwrap();
    let busy =
        Err("Bitmap 'b' is currently in use by another operation and cannot be used".to_string());
    for command in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        assert_eq!(cmd(&mut h, command, "n", "b"), busy, "{command}");
    }
    assert_eq!(merge(&mut h, "n", "b", json!(["other"])), busy);
    assert_eq!(merge(&mut h, "n", "other", json!(["b"])), busy);
}

#[test]
fn readonly_bitmap_can_be_toggled_and_merged_from_but_not_modified() {
    let (mut h, _) = harness();
    let ro = Err("Bitmap 'ro' is readonly and cannot be modified".to_string());
    assert_eq!(cmd(&mut h, "block-dirty-bitmap-clear", "q", "ro"), ro);
    assert_eq!(cmd(&mut h, "block-dirty-bitmap-remove", "q", "ro"), ro);
    assert_eq!(merge(&mut h, "q", "ro", json!(["p"])), ro);
    cmd(&mut h, "block-dirty-bitmap-disable", "q", "ro").unwrap();
    cmd(&mut h, "block-dirty-bitmap-enable", "q", "ro").unwrap();
    merge(&mut h, "q", "p", json!(["ro"])).unwrap();
}

#[test]
fn inconsistent_bitmap_can_only_be_removed() {
    let (mut h, _) = harness();
    let bad = Err("Bitmap 'bad' is inconsistent and cannot be used".to_string());
    assert_eq!(cmd(&mut h, "block-dirty-bitmap-clear", "q", "bad"), bad);
    assert_eq!(cmd(&mut h, "block-dirty-bitmap-enable", "q", "bad"), bad);
    assert_eq!(merge(&mut h, "q", "p", json!(["bad"])), bad);
    cmd(&mut h, "block-dirty-bitmap-remove", "q", "bad").unwrap();
}

#[test]
fn removing_a_persistent_bitmap_deletes_the_stored_copy() {
    let (mut h, store) = harness();
    cmd(&mut h, "block-dirty-bitmap-remove", "q", "p").unwrap();
    assert_eq!(*store.log.lock().unwrap(), ["remove p"]);
    assert_eq!(names(&h, "q"), ["ro", "bad"]);
}

#[test]
fn an_aborted_removal_keeps_the_bitmap_usable_and_stored() {
    let (mut h, store) = harness();
    let e = h.err(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-remove", "data": {"node": "q", "name": "p"}},
            {"type": "abort", "data": {}}]}),
    );
    assert_eq!(e, "GenericError: Transaction aborted using Abort action");
    assert_eq!(*store.log.lock().unwrap(), ["remove p"]);
    assert_eq!(names(&h, "q"), ["p", "ro", "bad"]);
    assert!(bitmap(&h, "q", "p", |b| !b.is_busy() && !b.skips_store()));
}

#[test]
fn clear_empties_the_bitmap() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b", json!({})).unwrap();
    dirty(&h, "n", "b", 0, MIB);
    cmd(&mut h, "block-dirty-bitmap-clear", "n", "b").unwrap();
    assert_eq!(count(&h, "n", "b"), 0);
}

#[test]
fn merge_accepts_local_and_external_sources_of_other_granularity() {
    let (mut h, _) = harness();
    add(&mut h, "n", "t", json!({"granularity": 512})).unwrap();
    add(&mut h, "n", "s", json!({})).unwrap();
    dirty(&h, "n", "s", 65536, 1);
    merge(&mut h, "n", "t", json!(["s", {"node": "q", "name": "p"}])).unwrap();
    assert_eq!(count(&h, "n", "t"), 2 * 65536);
}

#[test]
fn merge_from_unknown_external_node_names_it() {
    let (mut h, _) = harness();
    add(&mut h, "n", "t", json!({})).unwrap();
    assert_eq!(
        merge(&mut h, "n", "t", json!([{"node": "nonode", "name": "x"}])),
        Err("Node 'nonode' not found".into())
    );
}

#[test]
fn failed_merge_leaves_target_unchanged() {
    let (mut h, _) = harness();
    add(&mut h, "n", "t", json!({})).unwrap();
    add(&mut h, "n", "s", json!({})).unwrap();
    dirty(&h, "n", "s", 0, 1);
    assert_eq!(
        merge(&mut h, "n", "t", json!(["s", "nob"])),
        Err("Dirty bitmap 'nob' not found".into())
    );
    assert_eq!(count(&h, "n", "t"), 0);
}

#[test]
fn merge_into_itself_is_allowed() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b", json!({})).unwrap();
    dirty(&h, "n", "b", 0, 1);
    merge(&mut h, "n", "b", json!(["b"])).unwrap();
    assert_eq!(count(&h, "n", "b"), 65536);
}

#[test]
fn aborted_transaction_leaves_every_bitmap_as_it_was() {
    let (mut h, _) = harness();
    for (name, extra) in [
        ("c", json!({})),
        ("e", json!({"disabled": true})),
        ("d", json!({})),
        ("m", json!({})),
        ("r", json!({})),
    ] {
        add(&mut h, "n", name, extra).unwrap();
    }
    dirty(&h, "n", "c", 0, 1);
    dirty(&h, "n", "d", 65536, 1);
    let before = describe(&h, "n");
    let e = h.err(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "new"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "c"}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": "n", "name": "e"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "n", "name": "d"}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": "n", "target": "m", "bitmaps": ["d"]}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": "n", "name": "r"}},
            {"type": "abort", "data": {}}]}),
    );
    assert_eq!(e, "GenericError: Transaction aborted using Abort action");
    assert_eq!(describe(&h, "n"), before);
}

#[test]
fn committed_transaction_applies_every_action() {
    let (mut h, _) = harness();
    add(&mut h, "n", "c", json!({})).unwrap();
    add(&mut h, "n", "r", json!({})).unwrap();
    dirty(&h, "n", "c", 0, 1);
    h.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "new"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "c"}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": "n", "name": "r"}}]}),
    );
    assert_eq!(count(&h, "n", "new"), 0);
    assert_eq!(count(&h, "n", "c"), 0);
    assert_eq!(
        cmd(&mut h, "block-dirty-bitmap-clear", "n", "r"),
        Err("Dirty bitmap 'r' not found".into())
    );
}

#[test]
fn bitmap_removed_in_pending_transaction_is_busy() {
    let (mut h, _) = harness();
    add(&mut h, "n", "r", json!({})).unwrap();
    let e = h.err(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-remove", "data": {"node": "n", "name": "r"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "n", "name": "r"}}]}),
    );
    assert_eq!(
        e,
        "GenericError: Bitmap 'r' is currently in use by another operation and cannot be used"
    );
    cmd(&mut h, "block-dirty-bitmap-clear", "n", "r").unwrap();
}

#[test]
fn failing_add_in_transaction_does_not_delete_the_existing_bitmap() {
    let (mut h, _) = harness();
    add(&mut h, "n", "b", json!({})).unwrap();
    let e = h.err(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "b"}},
            {"type": "abort", "data": {}}]}),
    );
    assert_eq!(e, "GenericError: Bitmap already exists: b");
    assert_eq!(names(&h, "n"), ["b"]);
}

#[test]
fn a_frozen_bitmap_is_listed_after_its_anonymous_successor_by_the_node_layer() {
    let mut h = Harness::block_layer();
    h.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n", "size": 4 * MIB}),
    );
    add(&mut h, "n", "b", json!({})).unwrap();
    // A backup with the bitmap freezes it; its write tracking goes to the successor.
    h.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "t", "size": 4 * MIB}),
    );
    h.ok(
        "blockdev-backup",
        json!({"job-id": "j", "device": "n", "target": "t", "sync": "bitmap",
               "bitmap": "b", "bitmap-mode": "on-success", "speed": 1}),
    );
    let q = h.ok("query-named-block-nodes", json!({"flat": true}));
    let n = q
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n")
        .unwrap();
    assert_eq!(
        n["dirty-bitmaps"],
        json!([{"recording": true, "persistent": false, "busy": false, "granularity": 65536, "count": 0},
               {"name": "b", "recording": true, "persistent": false, "busy": true, "granularity": 65536, "count": 0}])
    );
}
