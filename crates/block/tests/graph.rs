//! Node graph: blockdev-add/-del semantics, names, permissions, query output.

mod common;
use common::AddJson;

use block::{BlockGraph, Perm};
use serde_json::{Value, json};

fn image(dir: &tempfile::TempDir, name: &str, size: u64) -> String {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path.to_str().unwrap().to_string()
}

fn err(r: Result<impl Sized, block::BlockError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.desc().to_string(),
    }
}

#[test]
fn duplicate_node_name_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "file", "node-name": "f1", "filename": f}))
        .unwrap();
    assert_eq!(
        err(g.blockdev_add_json(&json!({"driver": "file", "node-name": "f1", "filename": f}))),
        "Duplicate nodes with node-name='f1'"
    );
}

#[test]
fn node_names_follow_qemu_rules() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    for (name, msg) in [
        ("1x", "Invalid node-name: '1x'"),
        ("#x", "Invalid node-name: '#x'"),
        ("", "Invalid node-name: ''"),
        (&"a".repeat(40), "Node name too long"),
    ] {
        let r = g.blockdev_add_json(&json!({"driver": "file", "node-name": name, "filename": f}));
        assert_eq!(err(r), msg);
    }
    assert!(
        g.blockdev_add_json(&json!({"driver": "file", "node-name": "a-b.c_d", "filename": f}))
            .is_ok()
    );
}

#[test]
fn root_node_needs_a_name() {
    let mut g = BlockGraph::new();
    assert_eq!(
        err(g.blockdev_add_json(&json!({"driver": "null-co"}))),
        "'node-name' must be specified for the root node"
    );
}

#[test]
fn unknown_driver_is_refused() {
    let mut g = BlockGraph::new();
    assert_eq!(
        err(g.blockdev_add_json(&json!({"driver": "nope", "node-name": "x"}))),
        "Parameter 'driver' does not accept value 'nope'"
    );
}

#[test]
fn missing_file_reports_strerror() {
    let mut g = BlockGraph::new();
    assert_eq!(
        err(g.blockdev_add_json(
            &json!({"driver": "file", "node-name": "x", "filename": "/nonexistent/m"})
        )),
        "Could not open '/nonexistent/m': No such file or directory"
    );
}

#[test]
fn unknown_child_reference_is_refused() {
    let mut g = BlockGraph::new();
    assert_eq!(
        err(g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r", "file": "nonexist"}))),
        "Cannot find device='nonexist' nor node-name='nonexist'"
    );
}

#[test]
fn unknown_option_is_refused_and_nothing_stays_open() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    let r = g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r", "bogus": 1,
        "file": {"driver": "file", "filename": f}}));
    assert_eq!(err(r), "Parameter 'bogus' is unexpected");
    assert_eq!(g.nodes().count(), 0);
}

#[test]
fn anonymous_children_get_block_names() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    let r = g
        .blockdev_add_json(
            &json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": f}}),
        )
        .unwrap();
    let child = r.child("file").unwrap();
    assert!(child.is_auto_named());
    let rest = child.name().strip_prefix("#block0").unwrap();
    assert!(rest.len() == 2 && rest.chars().all(|c| c.is_ascii_digit()));
}

#[test]
fn node_used_by_a_parent_cannot_be_deleted() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "file", "node-name": "f1", "filename": f}))
        .unwrap();
    g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r1", "file": "f1"}))
        .unwrap();
    assert_eq!(err(g.blockdev_del("f1")), "Block device f1 is in use");
    g.blockdev_del("r1").unwrap();
    g.blockdev_del("f1").unwrap();
    assert_eq!(g.nodes().count(), 0);
}

#[test]
fn inline_child_is_not_owned_by_the_monitor_and_goes_with_its_parent() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r1",
        "file": {"driver": "file", "node-name": "f1", "filename": f}}))
        .unwrap();
    assert_eq!(
        err(g.blockdev_del("f1")),
        "Node f1 is not owned by the monitor"
    );
    g.blockdev_del("r1").unwrap();
    assert!(g.find("f1").is_none());
}

#[test]
fn deleting_an_unknown_node_is_refused() {
    let mut g = BlockGraph::new();
    assert_eq!(
        err(g.blockdev_del("nothere")),
        "Failed to find node with node-name='nothere'"
    );
}

#[test]
fn blocked_node_is_busy_for_deletion() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "t"}))
        .unwrap();
    let blocker = n.block_ops(
        "block device is in use by block job: backup",
        block::OpSet::ALL,
    );
    assert_eq!(
        err(g.blockdev_del("t")),
        "Node 't' is busy: block device is in use by block job: backup"
    );
    drop(blocker);
    g.blockdev_del("t").unwrap();
}

#[test]
fn node_with_a_user_cannot_be_deleted() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "t"}))
        .unwrap();
    let grant = n
        .take_perm("backup job 'j1'", "target", Perm::WRITE, Perm::ALL)
        .unwrap();
    assert_eq!(err(g.blockdev_del("t")), "Block device t is in use");
    drop(grant);
    g.blockdev_del("t").unwrap();
}

#[test]
fn unshared_write_conflicts_with_a_second_writer() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "t"}))
        .unwrap();
    let _a = n
        .take_perm(
            "backup job 'j1'",
            "target",
            Perm::WRITE,
            Perm::CONSISTENT_READ,
        )
        .unwrap();
    let e = err(n.take_perm("backup job 'j2'", "target", Perm::WRITE, Perm::ALL));
    assert_eq!(
        e,
        "Permission conflict on node 't': permissions 'write' are both required by backup job \
         'j2' (uses node 't' as 'target' child) and unshared by backup job 'j1' (uses node 't' \
         as 'target' child)."
    );
}

#[test]
fn released_permission_can_be_taken_again() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "t"}))
        .unwrap();
    let a = n.take_perm("a", "target", Perm::WRITE, Perm::NONE).unwrap();
    drop(a);
    assert!(n.take_perm("b", "target", Perm::WRITE, Perm::NONE).is_ok());
}

#[test]
fn read_only_node_refuses_write_permission_and_writes() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "t", "read-only": true}))
        .unwrap();
    assert_eq!(
        err(n.take_perm("a", "target", Perm::WRITE, Perm::ALL)),
        "Block node is read-only"
    );
    assert_eq!(err(n.write_at(0, &[1])), "Operation not permitted");
}

#[test]
fn permissions_pass_through_raw_to_its_file() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    let r = g
        .blockdev_add_json(&json!({"driver": "raw", "node-name": "r",
            "file": {"driver": "file", "node-name": "f", "filename": f}}))
        .unwrap();
    let _w = r
        .take_perm("job", "target", Perm::WRITE, Perm::CONSISTENT_READ)
        .unwrap();
    let file = g.find("f").unwrap();
    assert_eq!(
        file.cumulative_perms(),
        (Perm::WRITE, Perm::CONSISTENT_READ)
    );
}

#[test]
fn query_lists_nodes_newest_first_children_before_parents_registered() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 4 << 20);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "null-co", "node-name": "n1"}))
        .unwrap();
    g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r1",
        "file": {"driver": "file", "node-name": "f1", "filename": f}}))
        .unwrap();
    let q = serde_json::to_value(g.query_named_block_nodes(true)).unwrap();
    let names: Vec<&str> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r1", "f1", "n1"]);
}

#[test]
fn query_shape_matches_qsd_for_raw_over_file() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 4 << 20);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r1",
        "file": {"driver": "file", "node-name": "f1", "filename": f}}))
        .unwrap();
    let q = serde_json::to_value(g.query_named_block_nodes(true)).unwrap();
    let r1 = &q[0];
    let mut keys: Vec<&str> = r1.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "active",
            "backing_file_depth",
            "bps",
            "bps_rd",
            "bps_wr",
            "cache",
            "detect_zeroes",
            "drv",
            "encrypted",
            "file",
            "image",
            "iops",
            "iops_rd",
            "iops_wr",
            "node-name",
            "ro",
            "write_threshold"
        ]
    );
    assert_eq!(r1["file"], json!(f));
    assert_eq!(r1["drv"], json!("raw"));
    assert_eq!(r1["image"]["format"], json!("raw"));
    assert_eq!(r1["image"]["virtual-size"], json!(4 << 20));
    assert_eq!(r1["image"]["dirty-flag"], json!(false));
    assert!(r1["image"].get("format-specific").is_none());
    assert_eq!(
        q[1]["image"]["format-specific"],
        json!({"type": "file", "data": {}})
    );
    assert_eq!(
        r1["cache"],
        json!({"writeback": true, "direct": false, "no-flush": false})
    );
}

#[test]
fn query_shape_matches_qsd_for_null_co() {
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "null-co", "node-name": "n1"}))
        .unwrap();
    g.blockdev_add_json(
        &json!({"driver": "null-co", "node-name": "n2", "size": 1000, "read-zeroes": true}),
    )
    .unwrap();
    let q = serde_json::to_value(g.query_named_block_nodes(true)).unwrap();
    let n1 = &q[1];
    assert_eq!(
        n1["image"],
        json!({"filename": "null-co://", "format": "null-co", "actual-size": 0,
               "virtual-size": 1073741824u64})
    );
    assert_eq!(q[0]["image"]["virtual-size"], json!(1024));
    assert_eq!(
        q[0]["file"],
        json!(r#"json:{"read-zeroes": true, "driver": "null-co", "size": 1000}"#)
    );
}

#[test]
fn raw_offset_and_size_window_the_file() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    std::fs::write(&f, vec![7u8; 1 << 20]).unwrap();
    let mut g = BlockGraph::new();
    let r = g
        .blockdev_add_json(
            &json!({"driver": "raw", "node-name": "r", "offset": 512, "size": 4096,
            "file": {"driver": "file", "filename": f}}),
        )
        .unwrap();
    assert_eq!(r.size().unwrap(), 4096);
    r.write_at(0, &[1u8; 512]).unwrap();
    let bytes = std::fs::read(&f).unwrap();
    assert_eq!(&bytes[..512], &[7u8; 512][..]);
    assert_eq!(&bytes[512..1024], &[1u8; 512][..]);
    assert_eq!(
        r.write_at(4096, &[0]).unwrap_err().errno(),
        Some(libc::EINVAL)
    );
}

#[test]
fn raw_window_beyond_the_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 4096);
    let mut g = BlockGraph::new();
    let r = g.blockdev_add_json(
        &json!({"driver": "raw", "node-name": "r", "offset": 512, "size": 4096,
            "file": {"driver": "file", "filename": f}}),
    );
    assert_eq!(
        err(r),
        "The sum of offset (512) and size (4096) has to be smaller or equal to the  actual size \
         of the containing file (4096)"
    );
}

#[test]
fn null_co_reads_zeros_and_drops_writes() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "n", "size": 4096}))
        .unwrap();
    n.write_at(0, &[9u8; 512]).unwrap();
    let mut buf = [1u8; 512];
    n.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 512]);
}

#[test]
fn file_reads_and_writes_positionally() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 1 << 20);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let big = vec![0x5au8; 512 * 1024];
    n.write_at(4096, &big).unwrap();
    let mut back = vec![0u8; big.len()];
    n.read_at(4096, &mut back).unwrap();
    assert_eq!(back, big);
    n.flush().unwrap();
    let mut tail = [1u8; 16];
    n.read_at((1 << 20) - 8, &mut tail).unwrap();
    assert_eq!(&tail[8..], &[0u8; 8]);
}

#[test]
fn writes_through_a_node_mark_its_recording_bitmaps() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "n", "size": 1 << 20}))
        .unwrap();
    n.bitmaps().insert(
        0,
        block::DirtyBitmap::new(Some("b".into()), 65536, 1 << 20).unwrap(),
    );
    n.write_at(70000, &[1u8; 10]).unwrap();
    let q: Value = serde_json::to_value(g.query_named_block_nodes(true)).unwrap();
    assert_eq!(q[0]["dirty-bitmaps"][0]["count"], json!(65536));
}

#[test]
fn missing_mandatory_options_are_named() {
    let mut g = BlockGraph::new();
    assert_eq!(
        err(g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r"}))),
        "Parameter 'file' is missing"
    );
    assert_eq!(
        err(g.blockdev_add_json(&json!({"driver": "file", "node-name": "f"}))),
        "Parameter 'filename' is missing"
    );
}

#[test]
fn option_of_wrong_type_is_refused() {
    let mut g = BlockGraph::new();
    assert_eq!(
        err(g.blockdev_add_json(&json!({"driver": "null-co", "node-name": "n", "size": "x"}))),
        "Invalid parameter type for 'size', expected: integer"
    );
}

#[test]
fn raw_offset_beyond_the_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 4096);
    let mut g = BlockGraph::new();
    let r = g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r", "offset": 8192,
            "file": {"driver": "file", "filename": f}}));
    assert_eq!(
        err(r),
        "Offset (8192) cannot be greater than size of the containing file (4096)"
    );
}

#[test]
fn raw_size_must_be_sector_aligned() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 4096);
    let mut g = BlockGraph::new();
    let r = g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r", "size": 1000,
            "file": {"driver": "file", "filename": f}}));
    assert_eq!(err(r), "Specified size is not multiple of 512");
}

#[test]
fn query_order_and_names_for_blkdebug_match_qsd() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 4096);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(
        &json!({"driver": "raw", "node-name": "r", "file": {"driver": "blkdebug",
        "inject-error": [{"event": "pwritev", "errno": 5}],
        "image": {"driver": "file", "filename": f}}}),
    )
    .unwrap();
    g.blockdev_add_json(&json!({"driver": "blkdebug", "node-name": "d2",
        "image": {"driver": "file", "filename": f}}))
        .unwrap();
    let q = serde_json::to_value(g.query_named_block_nodes(true)).unwrap();
    let rows: Vec<(&str, &str)> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["drv"].as_str().unwrap(), n["file"].as_str().unwrap()))
        .collect();
    // QSD: #block214 file, d2 blkdebug, r raw, #block153 file, #block010 blkdebug.
    let drvs: Vec<&str> = rows.iter().map(|r| r.0).collect();
    assert_eq!(drvs, ["file", "blkdebug", "raw", "file", "blkdebug"]);
    assert_eq!(rows[1].1, format!("blkdebug::{f}"));
    assert_eq!(
        rows[4].1,
        format!(
            r#"json:{{"image": {{"driver": "file", "filename": "{f}"}}, "driver": "blkdebug", "inject-error.0.errno": 5, "inject-error.0.event": "pwritev"}}"#
        )
    );
    assert_eq!(
        rows[2].1,
        format!(
            r#"json:{{"driver": "raw", "file": {{"image": {{"driver": "file", "filename": "{f}"}}, "driver": "blkdebug", "inject-error.0.errno": 5, "inject-error.0.event": "pwritev"}}}}"#
        )
    );
    assert!(q[4]["image"].get("actual-size").is_none());
    assert!(q[2]["image"].get("actual-size").is_none());
    assert!(g.nodes().nth(4).unwrap().name().starts_with("#block0"));
    assert!(g.nodes().nth(3).unwrap().name().starts_with("#block1"));
}

#[test]
fn format_child_gets_its_generated_name_before_the_parent() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d, "a.raw", 4096);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r",
        "file": {"driver": "raw", "file": {"driver": "file", "filename": f}}}))
        .unwrap();
    let names: Vec<String> = g.nodes().map(|n| n.name().to_string()).collect();
    assert_eq!(names[0], "r");
    assert!(names[1].starts_with("#block1"), "{names:?}");
    assert!(names[2].starts_with("#block0"), "{names:?}");
}

#[test]
fn duplicate_name_of_a_format_is_reported_after_its_file_opens() {
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "null-co", "node-name": "x"}))
        .unwrap();
    let r = g.blockdev_add_json(&json!({"driver": "raw", "node-name": "x",
        "file": {"driver": "file", "filename": "/nonexistent/f"}}));
    assert_eq!(
        err(r),
        "Could not open '/nonexistent/f': No such file or directory"
    );
    let r = g.blockdev_add_json(&json!({"driver": "raw", "node-name": "x",
        "file": {"driver": "null-co"}}));
    assert_eq!(err(r), "Duplicate nodes with node-name='x'");
    assert_eq!(g.nodes().count(), 1);
}

#[test]
fn request_beyond_2_pow_63_fails_with_eio() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "null-co", "node-name": "n"}))
        .unwrap();
    let mut buf = [0u8; 512];
    assert_eq!(
        n.read_at(u64::MAX - 10, &mut buf).unwrap_err().errno(),
        Some(libc::EIO)
    );
    assert_eq!(
        n.write_at(i64::MAX as u64, &buf).unwrap_err().errno(),
        Some(libc::EIO)
    );
}
