//! Backing chains open one image after the other, bounded: a chain that loops (an image that
//! is its own backing file, or A → B → A) is refused naming the file, a chain deeper than
//! `MAX_BACKING_CHAIN` is refused, and the deepest accepted chain opens, reads and is queried
//! on a thread with a 2 MiB stack (the size of tokio's blocking threads, where I/O runs).
//! qemu-storage-daemon 10.0 spins forever on a looping read-only chain and qemu-io crashes on a
//! 1500-deep one: here both get an error.

use std::path::{Path, PathBuf};

mod common;
use common::AddJson;

use block::BlockGraph;
use block::graph::MAX_BACKING_CHAIN;
use serde_json::{Value, json};

/// A 1 MiB qcow2 image at `path` whose header names `backing` (qcow2).
fn image(path: &Path, backing: Option<&str>) {
    let file = std::fs::File::create(path).unwrap();
    qcow2::create(&file, 1 << 20, 65536, backing.map(|b| (b, "qcow2"))).unwrap();
}

fn opts(name: &str, path: &Path, read_only: bool) -> Value {
    json!({"driver": "qcow2", "node-name": name, "read-only": read_only,
        "file": {"driver": "file", "filename": path}})
}

/// `depth` images below `top.qcow2`: top → c{depth-1} → ... → c0; c0 holds 0x5a at 0.
fn chain(dir: &Path, depth: usize) -> PathBuf {
    let c0 = dir.join("c0.qcow2");
    image(&c0, None);
    let img = qcow2::Image::open_file(&c0, false).unwrap();
    img.write_at(&[0x5a; 512], 0).unwrap();
    img.close().unwrap();
    for i in 1..depth {
        image(
            &dir.join(format!("c{i}.qcow2")),
            Some(&format!("c{}.qcow2", i - 1)),
        );
    }
    let top = dir.join("top.qcow2");
    let below = if depth > 0 {
        Some(format!("c{}.qcow2", depth - 1))
    } else {
        None
    };
    image(&top, below.as_deref());
    top
}

#[test]
fn an_image_that_is_its_own_backing_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    image(&a, Some("a.qcow2"));
    let mut g = BlockGraph::new();
    for read_only in [true, false] {
        let e = g.blockdev_add_json(&opts("a", &a, read_only)).unwrap_err();
        assert_eq!(
            e.desc(),
            format!(
                "Could not open backing file: Backing file '{}' creates an infinite loop",
                a.display()
            ),
            "read-only: {read_only}"
        );
        assert_eq!(g.nodes().count(), 0, "nothing stays open");
    }
}

#[test]
fn a_chain_that_comes_back_to_its_top_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    image(&a, Some("b.qcow2"));
    image(&b, Some("a.qcow2"));
    let mut g = BlockGraph::new();
    let e = g.blockdev_add_json(&opts("a", &a, true)).unwrap_err();
    assert_eq!(
        e.desc(),
        format!(
            "Could not open backing file: Could not open backing file: Backing file '{}' \
             creates an infinite loop",
            a.display()
        )
    );
    assert_eq!(g.nodes().count(), 0);
}

#[test]
fn the_deepest_accepted_chain_opens_reads_and_is_queried_on_a_small_stack() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), MAX_BACKING_CHAIN);
    let worker = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let mut g = BlockGraph::new();
            let node = g.blockdev_add_json(&opts("top", &top, true)).unwrap();
            let mut buf = [0u8; 512];
            node.read_at(0, &mut buf).unwrap();
            assert_eq!(buf, [0x5a; 512]);
            let info = g.query_named_block_nodes(false);
            let top = info.iter().find(|n| n.node_name.as_deref() == Some("top"));
            assert_eq!(
                top.map(|n| n.backing_file_depth),
                Some(MAX_BACKING_CHAIN as i64)
            );
            g.close_all().unwrap();
        })
        .unwrap();
    worker.join().expect("no stack overflow");
}

#[test]
fn a_chain_one_deeper_is_refused_and_a_very_deep_one_does_not_crash() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), MAX_BACKING_CHAIN + 1);
    let mut g = BlockGraph::new();
    let e = g.blockdev_add_json(&opts("top", &top, true)).unwrap_err();
    assert!(
        e.desc().contains("Backing chain is too deep"),
        "{}",
        e.desc()
    );
    assert!(e.desc().contains("c0.qcow2"), "{}", e.desc());
    assert_eq!(g.nodes().count(), 0);
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), 2000);
    let worker = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let mut g = BlockGraph::new();
            let e = g.blockdev_add_json(&opts("top", &top, true)).unwrap_err();
            assert!(
                e.desc().contains("Backing chain is too deep"),
                "{}",
                e.desc()
            );
        })
        .unwrap();
    worker.join().expect("no stack overflow");
}

#[test]
fn backing_given_inline_is_bounded_and_loop_checked_too() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    image(&a, None);
    let mut g = BlockGraph::new();
    let mut o = opts("a", &a, true);
    o["backing"] = json!({"driver": "qcow2", "file": {"driver": "file", "filename": a}});
    let e = g.blockdev_add_json(&o).unwrap_err();
    assert!(
        e.desc().contains("creates an infinite loop"),
        "{}",
        e.desc()
    );
}
