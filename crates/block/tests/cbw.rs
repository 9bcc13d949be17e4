//! The `copy-before-write` filter and `snapshot-access` as `blockdev-add` nodes: old data
//! reaches the target before any write (through the filter or to its file directly), the
//! view reads the file as it was when the filter opened while writers keep writing, `bitmap`
//! limits the copy and the view, `on-cbw-error`, `cbw-timeout`, `min-cluster-size`, and
//! fleecing into an overlay of the live node (reads of the overlay never see later writes).

mod common;
use common::AddJson;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use block::{BlockGraph, BlockNode};
use serde_json::json;

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            let package = if program == "nbdkit" {
                "nbdkit"
            } else {
                "qemu-utils"
            };
            panic!("{program}: {e} (install it with `apt-get install {package}`)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 4 MiB qcow2 image whose every cluster `i` holds the byte `i` (so any mix-up shows).
fn source_image(dir: &Path) -> PathBuf {
    let path = dir.join("src.qcow2");
    let p = path.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "4M"]);
    let commands: Vec<String> = (0..4 * MIB / CLUSTER)
        .map(|i| format!("write -P {} {} 64k", i + 1, i * CLUSTER))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for c in &commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(p);
    run("qemu-io", &args);
    path
}

fn raw_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// The byte cluster `i` of the source held at the start.
fn original(offset: u64) -> u8 {
    (offset / CLUSTER + 1) as u8
}

fn add(graph: &mut BlockGraph, options: serde_json::Value) -> Arc<BlockNode> {
    graph.blockdev_add_json(&options).unwrap()
}

fn add_error(graph: &mut BlockGraph, options: serde_json::Value) -> String {
    graph
        .blockdev_add_json(&options)
        .map(|_| ())
        .unwrap_err()
        .desc()
        .to_string()
}

/// src (qcow2 with the pattern), tmp (raw file), the filter `cbw` over src copying to tmp with
/// `extra` options, and `access` over it.
fn fleecing_graph(
    dir: &Path,
    extra: serde_json::Value,
) -> (BlockGraph, Arc<BlockNode>, Arc<BlockNode>, Arc<BlockNode>) {
    let src = source_image(dir);
    let tmp = raw_file(dir, "tmp.raw", 4 * MIB);
    let mut graph = BlockGraph::new();
    let source = add(
        &mut graph,
        json!({"driver": "qcow2", "node-name": "src",
               "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
    );
    add(
        &mut graph,
        json!({"driver": "file", "node-name": "tmp", "filename": tmp.to_str().unwrap()}),
    );
    let mut options = json!({"driver": "copy-before-write", "node-name": "cbw",
                             "file": "src", "target": "tmp"});
    for (k, v) in extra.as_object().unwrap() {
        options[k] = v.clone();
    }
    let cbw = add(&mut graph, options);
    let access = add(
        &mut graph,
        json!({"driver": "snapshot-access", "node-name": "access", "file": "cbw"}),
    );
    (graph, source, cbw, access)
}

fn check_view(access: &BlockNode, offset: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    access.read_at(offset, &mut buf).unwrap();
    for (i, &b) in buf.iter().enumerate() {
        let at = offset + i as u64;
        assert_eq!(b, original(at), "view byte at {at}");
    }
}

#[test]
fn writes_through_the_filter_or_to_its_file_copy_the_old_data_first() {
    let dir = tempfile::tempdir().unwrap();
    let (_graph, source, cbw, access) = fleecing_graph(dir.path(), json!({}));
    cbw.write_at(100, &[0xee; 4096]).unwrap();
    // A write straight to the file node is copied first all the same.
    source.write_at(2 * MIB, &[0xdd; 512]).unwrap();
    source.write_zeroes_at(3 * MIB, CLUSTER).unwrap();
    let mut now = [0u8; 512];
    source.read_at(2 * MIB, &mut now).unwrap();
    assert_eq!(now, [0xdd; 512]);
    check_view(&access, 0, 4 * MIB);
    // The filter reads its file as it is now.
    cbw.read_at(100, &mut now).unwrap();
    assert_eq!(now, [0xee; 512]);
}

#[test]
fn the_view_never_changes_while_writers_keep_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (_graph, source, _cbw, access) = fleecing_graph(dir.path(), json!({}));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (source, stop) = (source.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut at = w * 7 * 4096;
                while !stop.load(Ordering::Relaxed) {
                    source
                        .write_at(at % (4 * MIB - 8192), &[0xf0; 8192])
                        .unwrap();
                    at += 13 * 4096 + w * 512;
                }
            })
        })
        .collect();
    for _ in 0..3 {
        for chunk in 0..16 {
            check_view(&access, chunk * 256 * 1024, 256 * 1024);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    check_view(&access, 0, 4 * MIB);
}

#[test]
fn a_bitmap_limits_what_is_copied_and_what_the_view_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_image(dir.path());
    let tmp = raw_file(dir.path(), "tmp.raw", 4 * MIB);
    let mut graph = BlockGraph::new();
    let source = add(
        &mut graph,
        json!({"driver": "qcow2", "node-name": "src",
               "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
    );
    add(
        &mut graph,
        json!({"driver": "file", "node-name": "tmp", "filename": tmp.to_str().unwrap()}),
    );
    let missing = json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                         "target": "tmp", "bitmap": {"node": "nope", "name": "b0"}});
    assert_eq!(add_error(&mut graph, missing), "Node 'nope' not found");
    let unknown = json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                         "target": "tmp", "bitmap": {"node": "src", "name": "zz"}});
    assert_eq!(
        add_error(&mut graph, unknown),
        "Dirty bitmap 'zz' not found"
    );
    // A bitmap recording a write to the second cluster.
    source
        .bitmaps()
        .push(block::DirtyBitmap::new(Some("b0".into()), CLUSTER, 4 * MIB).unwrap());
    source
        .write_at(CLUSTER + 10, &[original(CLUSTER); 10])
        .unwrap();
    add(
        &mut graph,
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
               "target": "tmp", "bitmap": {"node": "src", "name": "b0"}}),
    );
    let access = add(
        &mut graph,
        json!({"driver": "snapshot-access", "node-name": "access", "file": "cbw"}),
    );
    source
        .write_at(0, &vec![0xaa; 2 * CLUSTER as usize])
        .unwrap();
    check_view(&access, CLUSTER, CLUSTER);
    let mut buf = [0u8; 512];
    let outside = access.read_at(0, &mut buf).unwrap_err();
    assert_eq!(outside.errno(), Some(libc::EACCES));
    let status = access.extent(0, MIB);
    assert_eq!(status.unwrap_err().errno(), Some(libc::EACCES));
    // Only the bitmap's cluster reached the target.
    let copied = std::fs::read(&tmp).unwrap();
    assert!(copied[..CLUSTER as usize].iter().all(|&b| b == 0));
    assert!(
        copied[CLUSTER as usize..2 * CLUSTER as usize]
            .iter()
            .all(|&b| b == original(CLUSTER))
    );
}

#[test]
fn a_failing_copy_fails_the_write_or_breaks_the_view_as_on_cbw_error_says() {
    for mode in ["break-guest-write", "break-snapshot"] {
        let dir = tempfile::tempdir().unwrap();
        let src = source_image(dir.path());
        let tmp = raw_file(dir.path(), "tmp.raw", 4 * MIB);
        let mut graph = BlockGraph::new();
        let source = add(
            &mut graph,
            json!({"driver": "qcow2", "node-name": "src",
                   "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
        );
        add(
            &mut graph,
            json!({"driver": "blkdebug", "node-name": "bad",
                   "inject-error": [{"event": "pwritev", "errno": 5}],
                   "image": {"driver": "file", "filename": tmp.to_str().unwrap()}}),
        );
        add(
            &mut graph,
            json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                   "target": "bad", "on-cbw-error": mode}),
        );
        let access = add(
            &mut graph,
            json!({"driver": "snapshot-access", "node-name": "access", "file": "cbw"}),
        );
        let written = source.write_at(0, &[0x99; 512]);
        let mut now = [0u8; 512];
        source.read_at(0, &mut now).unwrap();
        let mut view = [0u8; 512];
        let read = access.read_at(4 * CLUSTER, &mut view);
        if mode == "break-guest-write" {
            assert_eq!(written.unwrap_err().errno(), Some(libc::EIO));
            assert_eq!(now, [original(0); 512], "nothing was written");
            read.unwrap();
        } else {
            written.unwrap();
            assert_eq!(now, [0x99; 512]);
            assert_eq!(
                read.unwrap_err().errno(),
                Some(libc::EIO),
                "the view is broken"
            );
        }
    }
}

#[test]
fn a_copy_slower_than_cbw_timeout_fails_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_image(dir.path());
    let socket = dir.path().join("slow.sock");
    let pid_file = dir.path().join("slow.pid");
    // A target whose every write takes 3 seconds.
    run(
        "nbdkit",
        &[
            "-U",
            socket.to_str().unwrap(),
            "-P",
            pid_file.to_str().unwrap(),
            "--filter=delay",
            "memory",
            "4M",
            "wdelay=3",
        ],
    );
    let mut graph = BlockGraph::new();
    let source = add(
        &mut graph,
        json!({"driver": "qcow2", "node-name": "src",
               "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
    );
    add(
        &mut graph,
        json!({"driver": "nbd", "node-name": "slow",
               "server": {"type": "unix", "path": socket.to_str().unwrap()}}),
    );
    add(
        &mut graph,
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
               "target": "slow", "cbw-timeout": 1}),
    );
    let started = std::time::Instant::now();
    let error = source.write_at(0, &[1; 512]).unwrap_err();
    assert_eq!(error.errno(), Some(libc::ETIMEDOUT));
    assert!(started.elapsed() < Duration::from_millis(2500));
    graph.close_all().unwrap();
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: a process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

#[test]
fn min_cluster_size_sets_the_unit_copied() {
    let dir = tempfile::tempdir().unwrap();
    let (mut graph, source, _cbw, _access) =
        fleecing_graph(dir.path(), json!({"min-cluster-size": MIB}));
    source.write_at(10, &[0xab; 10]).unwrap();
    let copied = std::fs::read(dir.path().join("tmp.raw")).unwrap();
    for (i, &b) in copied[..MIB as usize].iter().enumerate() {
        assert_eq!(b, original(i as u64), "byte {i} of the first MiB");
    }
    assert!(copied[MIB as usize..].iter().all(|&b| b == 0));
    let bad = json!({"driver": "copy-before-write", "node-name": "c2", "file": "src",
                     "target": "tmp", "min-cluster-size": 3000});
    assert_eq!(
        add_error(&mut graph, bad),
        "Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
    );
}

#[test]
fn snapshot_access_over_a_node_without_a_view_fails_its_reads_with_enotsup() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_image(dir.path());
    let mut graph = BlockGraph::new();
    add(
        &mut graph,
        json!({"driver": "qcow2", "node-name": "src",
               "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
    );
    let access = add(
        &mut graph,
        json!({"driver": "snapshot-access", "node-name": "a", "file": "src"}),
    );
    let mut buf = [0u8; 512];
    assert_eq!(
        access.read_at(0, &mut buf).unwrap_err().errno(),
        Some(libc::ENOTSUP)
    );
}

#[test]
fn the_filter_and_the_view_show_qemus_names_and_internal_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, source, _cbw, _access) = fleecing_graph(dir.path(), json!({}));
    source.write_at(0, &[1; 512]).unwrap();
    let nodes = graph.query_named_block_nodes(true);
    let by_name = |n: &str| {
        nodes
            .iter()
            .find(|i| i.node_name.as_deref() == Some(n))
            .unwrap()
    };
    let src_file = by_name("src").file.clone();
    let cbw = by_name("cbw");
    assert_eq!(
        (cbw.drv.as_str(), &cbw.file),
        ("copy-before-write", &src_file)
    );
    assert_eq!(cbw.image.cluster_size, Some(65536));
    let bitmaps: Vec<(Option<String>, i64)> = cbw
        .dirty_bitmaps
        .as_ref()
        .unwrap()
        .iter()
        .map(|b| (b.name.clone(), b.count))
        .collect();
    let size = 4 * MIB as i64;
    let cluster = CLUSTER as i64;
    assert_eq!(
        bitmaps,
        vec![(None, size), (None, cluster), (None, size - cluster)],
        "accessible, copied before writes, still to copy"
    );
    let access = by_name("access");
    assert_eq!(
        (access.drv.as_str(), &access.file),
        ("snapshot-access", &src_file)
    );
}

#[test]
fn fleecing_reads_of_an_overlay_of_the_live_node_never_see_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_image(dir.path());
    let tmp = dir.path().join("fleece.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", tmp.to_str().unwrap(), "4M"],
    );
    let mut graph = BlockGraph::new();
    let source = add(
        &mut graph,
        json!({"driver": "qcow2", "node-name": "src",
               "file": {"driver": "file", "filename": src.to_str().unwrap()}}),
    );
    let overlay = add(
        &mut graph,
        json!({"driver": "qcow2", "node-name": "tmp", "backing": "src",
               "file": {"driver": "file", "filename": tmp.to_str().unwrap()}}),
    );
    add(
        &mut graph,
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
               "target": "tmp"}),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (source, stop) = (source.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut at = w * 3 * 4096;
                while !stop.load(Ordering::Relaxed) {
                    source
                        .write_at(at % (4 * MIB - 4096), &[0xf1; 4096])
                        .unwrap();
                    at += 11 * 4096;
                }
            })
        })
        .collect();
    for _ in 0..3 {
        check_view(&overlay, 0, 4 * MIB);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    check_view(&overlay, 0, 4 * MIB);
}

#[test]
fn a_fleecing_read_under_way_holds_back_the_write_that_would_change_it() {
    // The source is slow to read (1 s per read), so that a read of the overlay that looked
    // through to the source is still under way when a copy-before-write has copied the
    // cluster: the write must wait for that read, or the read returns the new data.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("slow.sock");
    let pid_file = dir.path().join("slow.pid");
    run(
        "nbdkit",
        &[
            "-U",
            socket.to_str().unwrap(),
            "-P",
            pid_file.to_str().unwrap(),
            "--filter=delay",
            "memory",
            "1M",
            "rdelay=1",
        ],
    );
    let tmp = dir.path().join("fleece.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", tmp.to_str().unwrap(), "1M"],
    );
    let mut graph = BlockGraph::new();
    let source = add(
        &mut graph,
        json!({"driver": "nbd", "node-name": "src",
               "server": {"type": "unix", "path": socket.to_str().unwrap()}}),
    );
    source.write_at(0, &[0x5a; 4096]).unwrap();
    let overlay = add(
        &mut graph,
        json!({"driver": "qcow2", "node-name": "tmp", "backing": "src",
               "file": {"driver": "file", "filename": tmp.to_str().unwrap()}}),
    );
    add(
        &mut graph,
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
               "target": "tmp"}),
    );
    let writer = {
        let source = source.clone();
        std::thread::spawn(move || source.write_at(0, &[0xa5; 4096]))
    };
    // The writer's copy is reading the source now; start a read of the overlay meanwhile.
    std::thread::sleep(Duration::from_millis(400));
    let mut buf = [0u8; 4096];
    overlay.read_at(0, &mut buf).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(buf, [0x5a; 4096], "the fleecing read saw the later write");
    graph.close_all().unwrap();
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: a process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}
