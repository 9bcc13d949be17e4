//! `replace_node` (QEMU's `bdrv_replace_node`): every parent of a node moves onto another,
//! with the same roles and permissions, or nothing moves.

mod common;
use common::AddJson;

use std::sync::Arc;

use block::{BlockBackend, BlockGraph, BlockNode, Parent, Perm, replace_node};
use serde_json::json;

fn raw_file(dir: &tempfile::TempDir, name: &str, fill: u8) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, vec![fill; 1 << 20]).unwrap();
    path.to_str().unwrap().to_string()
}

fn qcow2_overlay(dir: &tempfile::TempDir, name: &str) -> String {
    let path = dir.path().join(name);
    let path = path.to_str().unwrap().to_string();
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &path, "1M"])
        .status()
        .expect("qemu-img (Debian package qemu-utils) is needed for this test")
        .success();
    assert!(ok);
    path
}

fn file_node(g: &mut BlockGraph, name: &str, path: &str) -> Arc<BlockNode> {
    g.blockdev_add_json(&json!({"driver": "file", "node-name": name, "filename": path}))
        .unwrap()
}

fn read_first(node: &BlockNode) -> u8 {
    let mut b = [0u8; 512];
    node.read_at(0, &mut b).unwrap();
    b[0]
}

fn parent_names(node: &BlockNode) -> Vec<String> {
    node.parents()
        .iter()
        .map(|p| match p {
            Parent::Node { node, role } => format!("{}:{role}", node.name()),
            Parent::Backend(b) => b.holder().to_string(),
        })
        .collect()
}

#[test]
fn every_parent_moves_a_node_parent_through_its_driver_and_a_backend() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = BlockGraph::new();
    let a = file_node(&mut g, "a", &raw_file(&dir, "a.raw", 0xaa));
    let b = file_node(&mut g, "b", &raw_file(&dir, "b.raw", 0xbb));
    let top = g
        .blockdev_add_json(
            &json!({"driver": "qcow2", "node-name": "top", "backing": "a",
            "file": {"driver": "file", "filename": qcow2_overlay(&dir, "top.qcow2")}}),
        )
        .unwrap();
    let export = BlockBackend::new(&a, "export 'e0'", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    assert_eq!(parent_names(&a), ["export 'e0'", "top:backing"]);
    assert_eq!(read_first(&top), 0xaa);

    replace_node(&a, &b).unwrap();

    assert!(parent_names(&a).is_empty());
    assert!(!a.is_in_use());
    assert_eq!(parent_names(&b), ["export 'e0'", "top:backing"]);
    assert_eq!(top.child("backing").unwrap().name(), "b");
    assert_eq!(export.root().name(), "b");
    // The overlay's driver reads its unallocated clusters from the new backing node.
    assert_eq!(read_first(&top), 0xbb);
    drop(export);
    assert_eq!(parent_names(&b), ["top:backing"]);
}

#[test]
fn a_permission_conflict_on_the_new_node_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = BlockGraph::new();
    let a = file_node(&mut g, "a", &raw_file(&dir, "a.raw", 0xaa));
    let b = file_node(&mut g, "b", &raw_file(&dir, "b.raw", 0xbb));
    let writer = BlockBackend::new(&a, "export 'w'", Perm::WRITE, Perm::ALL).unwrap();
    let reader = BlockBackend::new(&a, "export 'r'", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    let _guard = b
        .take_perm(
            "backup job 'j'",
            "target",
            Perm::CONSISTENT_READ,
            !Perm::WRITE,
        )
        .unwrap();

    let e = replace_node(&a, &b).unwrap_err();

    assert_eq!(
        e.desc(),
        "Permission conflict on node 'b': permissions 'write' are both required by export 'w' \
         (uses node 'b' as 'root' child) and unshared by backup job 'j' (uses node 'b' as \
         'target' child)."
    );
    assert_eq!(writer.root().name(), "a");
    assert_eq!(reader.root().name(), "a");
    assert_eq!(parent_names(&a), ["export 'r'", "export 'w'"]);
    assert!(parent_names(&b).is_empty());
}

#[test]
fn a_writer_cannot_move_onto_a_read_only_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = BlockGraph::new();
    let a = file_node(&mut g, "a", &raw_file(&dir, "a.raw", 0xaa));
    let path = raw_file(&dir, "b.raw", 0xbb);
    let b = g
        .blockdev_add_json(
            &json!({"driver": "file", "node-name": "b", "filename": path, "read-only": true}),
        )
        .unwrap();
    let writer = BlockBackend::new(&a, "export 'w'", Perm::WRITE, Perm::ALL).unwrap();
    let e = replace_node(&a, &b).unwrap_err();
    assert_eq!(e.desc(), "Block node is read-only");
    assert_eq!(writer.root().name(), "a");
}

#[test]
fn a_parent_below_the_new_node_stays_so_no_loop_is_made() {
    // bdrv_append: the overlay takes the node's place, keeping the node as its backing.
    let dir = tempfile::tempdir().unwrap();
    let mut g = BlockGraph::new();
    let a = file_node(&mut g, "a", &raw_file(&dir, "a.raw", 0xaa));
    let export = BlockBackend::new(&a, "export 'e0'", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    let top = g
        .blockdev_add_json(
            &json!({"driver": "qcow2", "node-name": "top", "backing": "a",
            "file": {"driver": "file", "filename": qcow2_overlay(&dir, "top.qcow2")}}),
        )
        .unwrap();

    replace_node(&a, &top).unwrap();

    assert_eq!(top.child("backing").unwrap().name(), "a");
    assert_eq!(export.root().name(), "top");
    assert_eq!(parent_names(&a), ["top:backing"]);
}

#[test]
fn a_driver_that_cannot_follow_its_child_refuses_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = BlockGraph::new();
    let a = file_node(&mut g, "a", &raw_file(&dir, "a.raw", 0xaa));
    let b = file_node(&mut g, "b", &raw_file(&dir, "b.raw", 0xbb));
    let dbg = g
        .blockdev_add_json(&json!({"driver": "blkdebug", "node-name": "d", "image": "a"}))
        .unwrap();
    let e = replace_node(&a, &b).unwrap_err();
    assert_eq!(
        e.desc(),
        "Cannot change 'image' link from 'd' to 'b': the 'blkdebug' driver cannot change that \
         child"
    );
    assert_eq!(dbg.child("image").unwrap().name(), "a");
    assert_eq!(read_first(&dbg), 0xaa);
}

#[test]
fn a_raw_node_follows_its_file_child() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = BlockGraph::new();
    let a = file_node(&mut g, "a", &raw_file(&dir, "a.raw", 0xaa));
    let b = file_node(&mut g, "b", &raw_file(&dir, "b.raw", 0xbb));
    let raw = g
        .blockdev_add_json(&json!({"driver": "raw", "node-name": "r", "file": "a"}))
        .unwrap();
    replace_node(&a, &b).unwrap();
    assert_eq!(raw.child("file").unwrap().name(), "b");
    assert_eq!(read_first(&raw), 0xbb);
}
