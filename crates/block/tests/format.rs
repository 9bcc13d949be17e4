//! Plugging a format driver over a `file` child: permissions it takes on its file (QSD's
//! conflict text), and backing files opened after their overlay (QSD's registration order and
//! query fields).

use std::sync::{Arc, Mutex};

use block::{
    BlockDriver, BlockGraph, BlockNode, BlockResult, ChildKind, DriverInfo, DriverSpec, OpenContext,
};
use serde_json::json;

/// A stand-in for qcow2: data lives in its `file`; the header's backing name comes from the
/// test-only option `x-backing`; unwritten data would come from the backing node.
struct CowFormat {
    file: Arc<BlockNode>,
    header_backing: Option<String>,
    backing: Mutex<Option<Arc<BlockNode>>>,
}

impl BlockDriver for CowFormat {
    fn size(&self) -> BlockResult<u64> {
        self.file.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        match self.backing.lock().unwrap().as_ref() {
            Some(b) => b.read_at(offset, buf),
            None => self.file.read_at(offset, buf),
        }
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.file.write_at(offset, buf)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn info(&self) -> DriverInfo {
        DriverInfo {
            cluster_size: Some(65536),
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }
    fn supports_backing(&self) -> bool {
        true
    }
    fn backing_file(&self) -> Option<(String, Option<String>)> {
        self.header_backing
            .clone()
            .map(|n| (n, Some("cowfmt".to_string())))
    }
    fn set_backing(&self, backing: Option<Arc<BlockNode>>) {
        *self.backing.lock().unwrap() = backing;
    }
}

fn open_cow(ctx: &mut OpenContext<'_>) -> BlockResult<Box<dyn BlockDriver>> {
    let header_backing = ctx.opt_str("x-backing")?;
    let file = ctx
        .open_child("file", ChildKind::Metadata, true)?
        .expect("required");
    Ok(Box::new(CowFormat {
        file,
        header_backing,
        backing: Mutex::new(None),
    }))
}

fn graph() -> BlockGraph {
    let mut g = BlockGraph::new();
    g.register_driver(DriverSpec {
        name: "cowfmt",
        is_protocol: false,
        open: open_cow,
    });
    g
}

fn file(dir: &tempfile::TempDir, name: &str) -> String {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn second_writable_format_on_one_file_conflicts_with_qsd_text() {
    let d = tempfile::tempdir().unwrap();
    let f = file(&d, "x.img");
    let mut g = graph();
    g.blockdev_add(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    g.blockdev_add(&json!({"driver": "cowfmt", "node-name": "q1", "file": "f"}))
        .unwrap();
    let e = g
        .blockdev_add(&json!({"driver": "cowfmt", "node-name": "q2", "file": "f"}))
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
    let f = file(&d, "x.img");
    let mut g = graph();
    g.blockdev_add(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    g.blockdev_add(&json!({"driver": "cowfmt", "node-name": "q1", "file": "f"}))
        .unwrap();
    let e = g
        .blockdev_add(
            &json!({"driver": "cowfmt", "node-name": "q3", "read-only": true, "file": "f"}),
        )
        .unwrap_err();
    assert!(e.desc().contains("unshared by node 'q3'"), "{}", e.desc());
}

#[test]
fn failed_open_releases_permissions_on_the_referenced_file() {
    let d = tempfile::tempdir().unwrap();
    let f = file(&d, "x.img");
    let mut g = graph();
    g.blockdev_add(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let r = g.blockdev_add(&json!({"driver": "cowfmt", "node-name": "1bad", "file": "f"}));
    assert!(r.is_err());
    g.blockdev_del("f").unwrap();
}

#[test]
fn backing_from_the_header_opens_after_its_overlay() {
    let d = tempfile::tempdir().unwrap();
    file(&d, "base.img");
    let top = file(&d, "top.img");
    let mut g = graph();
    g.blockdev_add(
        &json!({"driver": "cowfmt", "node-name": "top", "x-backing": "base.img",
        "file": {"driver": "file", "filename": top}}),
    )
    .unwrap();
    let names: Vec<String> = g.nodes().map(|n| n.name().to_string()).collect();
    // Newest first: base, base's file, top, top's file (QSD: #block267, #block162, top,
    // #block009): the overlay registers before its backing, each file before its format.
    assert_eq!(names[2], "top");
    let base = g.find(&names[0]).unwrap();
    assert_eq!(base.driver_name(), "cowfmt");
    assert!(base.is_read_only());
    assert_eq!(g.find(&names[1]).unwrap().driver_name(), "file");
}

#[test]
fn query_reports_backing_like_qsd() {
    let d = tempfile::tempdir().unwrap();
    let base = file(&d, "base.img");
    let top = file(&d, "top.img");
    let mut g = graph();
    g.blockdev_add(
        &json!({"driver": "cowfmt", "node-name": "top", "x-backing": "base.img",
        "file": {"driver": "file", "filename": top}}),
    )
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
        assert_eq!(t["image"]["backing-filename"], json!("base.img"));
        assert_eq!(t["image"]["full-backing-filename"], json!(base));
        assert_eq!(t["image"]["backing-filename-format"], json!("cowfmt"));
        assert_eq!(t["image"].get("backing-image").is_some(), !flat);
    }
}

#[test]
fn deleting_the_overlay_closes_its_anonymous_backing_chain() {
    let d = tempfile::tempdir().unwrap();
    file(&d, "base.img");
    let top = file(&d, "top.img");
    let mut g = graph();
    g.blockdev_add(
        &json!({"driver": "cowfmt", "node-name": "top", "x-backing": "base.img",
        "file": {"driver": "file", "filename": top}}),
    )
    .unwrap();
    g.blockdev_del("top").unwrap();
    assert_eq!(g.nodes().count(), 0);
}

#[test]
fn backing_null_opens_no_backing() {
    let d = tempfile::tempdir().unwrap();
    file(&d, "base.img");
    let top = file(&d, "top.img");
    let mut g = graph();
    let t = g
        .blockdev_add(
            &json!({"driver": "cowfmt", "node-name": "top", "x-backing": "base.img",
            "backing": null, "file": {"driver": "file", "filename": top}}),
        )
        .unwrap();
    assert!(t.child("backing").is_none());
    assert_eq!(g.nodes().count(), 2);
}

#[test]
fn set_backing_attaches_an_existing_node_and_reads_through_it() {
    let d = tempfile::tempdir().unwrap();
    let base = file(&d, "base.img");
    std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
    let top = file(&d, "top.img");
    let mut g = graph();
    let b = g
        .blockdev_add(&json!({"driver": "file", "node-name": "base", "filename": base}))
        .unwrap();
    let t = g
        .blockdev_add(&json!({"driver": "cowfmt", "node-name": "top",
            "file": {"driver": "file", "filename": top}}))
        .unwrap();
    g.set_backing(&t, Some(b)).unwrap();
    let mut buf = [0u8; 4];
    t.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0x42; 4]);
    assert_eq!(
        g.blockdev_del("base").unwrap_err().desc(),
        "Block device base is in use"
    );
    g.set_backing(&t, None).unwrap();
    g.blockdev_del("base").unwrap();
}

#[test]
fn missing_backing_file_fails_the_open() {
    let d = tempfile::tempdir().unwrap();
    let top = file(&d, "top.img");
    let mut g = graph();
    let e = g
        .blockdev_add(
            &json!({"driver": "cowfmt", "node-name": "top", "x-backing": "nope.img",
            "file": {"driver": "file", "filename": top}}),
        )
        .unwrap_err();
    assert!(
        e.desc()
            .starts_with("Could not open backing file: Could not open '"),
        "{}",
        e.desc()
    );
    assert_eq!(g.nodes().count(), 0);
}
