//! A format driver over a `file` child (qcow2, images made by qemu-img): permissions it takes
//! on its file (QSD's conflict text), and backing files opened after their overlay (QSD's
//! registration order and query fields).

mod common;
use common::AddJson;

use block::BlockGraph;
use serde_json::json;

fn graph() -> BlockGraph {
    BlockGraph::new()
}

/// A 1 MiB qcow2 image `name` (with `backing`, a qcow2 file name as stored in the header),
/// made by qemu-img; returns its path.
fn image(dir: &tempfile::TempDir, name: &str, backing: Option<&str>) -> String {
    let p = dir.path().join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-u", "-b", b, "-F", "qcow2"]);
    }
    let path = p.to_str().unwrap().to_string();
    args.extend([path.as_str(), "1M"]);
    let out = std::process::Command::new("qemu-img")
        .args(&args)
        .output()
        .expect("qemu-img is needed: install qemu-utils");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A 1 MiB raw file.
fn file(dir: &tempfile::TempDir, name: &str) -> String {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn second_writable_format_on_one_file_conflicts_with_qsd_text() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "x.qcow2", None);
    let mut g = graph();
    g.blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    g.blockdev_add_json(&json!({"driver": "qcow2", "node-name": "q1", "file": "f"}))
        .unwrap();
    let e = g
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "q2", "file": "f"}))
        .unwrap_err();
    assert_eq!(
        e.desc(),
        "Permission conflict on node 'f': permissions 'write, resize' are both required by node \
         'q1' (uses node 'f' as 'file' child) and unshared by node 'q2' (uses node 'f' as 'file' \
         child)."
    );
    assert!(g.find("q2").is_none());
}

#[test]
fn read_only_format_also_refuses_to_share_write() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "x.qcow2", None);
    let mut g = graph();
    g.blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    g.blockdev_add_json(&json!({"driver": "qcow2", "node-name": "q1", "file": "f"}))
        .unwrap();
    let e = g
        .blockdev_add_json(
            &json!({"driver": "qcow2", "node-name": "q3", "read-only": true, "file": "f"}),
        )
        .unwrap_err();
    assert!(e.desc().contains("unshared by node 'q3'"), "{}", e.desc());
}

#[test]
fn failed_open_releases_permissions_on_the_referenced_file() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "x.qcow2", None);
    let mut g = graph();
    g.blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let r = g.blockdev_add_json(&json!({"driver": "qcow2", "node-name": "1bad", "file": "f"}));
    assert!(r.is_err());
    g.blockdev_del("f").unwrap();
}

#[test]
fn backing_from_the_header_opens_after_its_overlay() {
    let d = tempfile::tempdir().unwrap();
    image(&d, "base.qcow2", None);
    let top = image(&d, "top.qcow2", Some("base.qcow2"));
    let mut g = graph();
    g.blockdev_add_json(&json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": top}}))
        .unwrap();
    let names: Vec<String> = g.nodes().map(|n| n.name().to_string()).collect();
    // Newest first: base, base's file, top, top's file (QSD: #block267, #block162, top,
    // #block009): the overlay registers before its backing, each file before its format.
    assert_eq!(names[2], "top");
    let base = g.find(&names[0]).unwrap();
    assert_eq!(base.driver_name(), "qcow2");
    assert!(base.is_read_only());
    assert_eq!(g.find(&names[1]).unwrap().driver_name(), "file");
}

#[test]
fn query_reports_backing_like_qsd() {
    let d = tempfile::tempdir().unwrap();
    let base = image(&d, "base.qcow2", None);
    let top = image(&d, "top.qcow2", Some("base.qcow2"));
    let mut g = graph();
    g.blockdev_add_json(&json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": top}}))
        .unwrap();
    for flat in [true, false] {
        let q = serde_json::to_value(g.query_named_block_nodes(flat)).unwrap();
        let t = q
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "top")
            .unwrap();
        assert_eq!(t["backing_file"], json!(base));
        assert_eq!(t["backing_file_depth"], json!(if flat { 0 } else { 1 }));
        assert_eq!(t["image"]["backing-filename"], json!("base.qcow2"));
        assert_eq!(t["image"]["full-backing-filename"], json!(base));
        assert_eq!(t["image"]["backing-filename-format"], json!("qcow2"));
        assert_eq!(t["image"].get("backing-image").is_some(), !flat);
    }
}

#[test]
fn deleting_the_overlay_closes_its_anonymous_backing_chain() {
    let d = tempfile::tempdir().unwrap();
    image(&d, "base.qcow2", None);
    let top = image(&d, "top.qcow2", Some("base.qcow2"));
    let mut g = graph();
    g.blockdev_add_json(&json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": top}}))
        .unwrap();
    g.blockdev_del("top").unwrap();
    assert_eq!(g.nodes().count(), 0);
}

#[test]
fn backing_null_opens_no_backing() {
    let d = tempfile::tempdir().unwrap();
    image(&d, "base.qcow2", None);
    let top = image(&d, "top.qcow2", Some("base.qcow2"));
    let mut g = graph();
    let t = g
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "top",
            "backing": null, "file": {"driver": "file", "filename": top}}))
        .unwrap();
    assert!(t.child("backing").is_none());
    assert_eq!(g.nodes().count(), 2);
}

#[test]
fn set_backing_attaches_an_existing_node_and_reads_through_it() {
    let d = tempfile::tempdir().unwrap();
    let base = file(&d, "base.img");
    std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
    let top = image(&d, "top.qcow2", None);
    let mut g = graph();
    let b = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "base", "filename": base}))
        .unwrap();
    let t = g
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top}}))
        .unwrap();
    g.set_backing(&t, Some(b.clone())).unwrap();
    let mut buf = [0u8; 4];
    t.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0x42; 4]);
    // QEMU's backing blocker: deletion is refused before the in-use check.
    assert_eq!(
        g.blockdev_del("base").unwrap_err().desc(),
        "Node 'base' is busy: node is used as backing hd of 'top'"
    );
    g.set_backing(&t, None).unwrap();
    assert_eq!(
        b.check_op(block::BlockOp::Resize)
            .map_err(|e| e.desc().to_string()),
        Ok(())
    );
    g.blockdev_del("base").unwrap();
}

#[test]
fn a_backing_node_is_blocked_for_all_but_commit_stream_and_backup_while_attached() {
    let d = tempfile::tempdir().unwrap();
    let base = image(&d, "base.qcow2", None);
    let top = image(&d, "top.qcow2", None);
    let mut g = graph();
    let b = g
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "base",
            "file": {"driver": "file", "filename": base}}))
        .unwrap();
    g.blockdev_add_json(
        &json!({"driver": "qcow2", "node-name": "top", "backing": "base",
            "file": {"driver": "file", "filename": top}}),
    )
    .unwrap();
    let busy = "Node 'base' is busy: node is used as backing hd of 'top'";
    for op in [
        block::BlockOp::Resize,
        block::BlockOp::Change,
        block::BlockOp::ExternalSnapshot,
    ] {
        assert_eq!(b.check_op(op).unwrap_err().desc(), busy);
    }
    for op in [
        block::BlockOp::Stream,
        block::BlockOp::CommitTarget,
        block::BlockOp::BackupSource,
    ] {
        assert!(b.check_op(op).is_ok());
    }
    // Deleting the parent removes its blocker.
    g.blockdev_del("top").unwrap();
    assert!(b.check_op(block::BlockOp::Resize).is_ok());
}

#[test]
fn missing_backing_file_fails_the_open() {
    let d = tempfile::tempdir().unwrap();
    let top = image(&d, "top.qcow2", Some("nope.qcow2"));
    let mut g = graph();
    let e = g
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top}}))
        .unwrap_err();
    assert!(
        e.desc()
            .starts_with("Could not open backing file: Could not open '"),
        "{}",
        e.desc()
    );
    assert_eq!(g.nodes().count(), 0);
}
