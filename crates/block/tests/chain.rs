//! What stream and commit do to a backing chain, at the block layer: reopening read-write,
//! relinking a node's backing file with its header rewritten, dropping intermediate layers,
//! job filter nodes, and copy-on-read serialised against writes. Images come from qemu-img
//! and are judged by it (`qemu-img info`, `check`, `compare`).

mod common;
use common::AddJson;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use block::{BackingName, BlockGraph, BlockNode, FilterKind};
use serde_json::{Value, json};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (install qemu-utils)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// base.qcow2 <- mid.qcow2 <- top.qcow2, 4 MiB; layer i holds pattern 0x11*(i+1) at i MiB.
fn chain(dir: &tempfile::TempDir) -> [PathBuf; 3] {
    let names = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    let paths = names.map(|n| dir.path().join(n));
    for (i, path) in paths.iter().enumerate() {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if i > 0 {
            args.extend(["-b", p(&paths[i - 1]), "-F", "qcow2"]);
        }
        args.extend([p(path), "4M"]);
        run("qemu-img", &args);
        let cmd = format!("write -P {} {}M 1M", 0x11 * (i + 1), i);
        run("qemu-io", &["-f", "qcow2", "-c", &cmd, p(path)]);
    }
    paths
}

/// over.qcow2 above `top` (4 MiB, empty).
fn overlay(dir: &tempfile::TempDir, top: &Path) -> PathBuf {
    let over = dir.path().join("over.qcow2");
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(top),
        "-F",
        "qcow2",
        p(&over),
        "4M",
    ];
    run("qemu-img", &args);
    over
}

/// The chain of [`chain`] with `top` opened as node `top` (its chain from the headers).
fn opened_chain() -> (tempfile::TempDir, [PathBuf; 3], BlockGraph, Arc<BlockNode>) {
    let d = tempfile::tempdir().unwrap();
    let paths = chain(&d);
    let mut g = BlockGraph::new();
    let t = g.blockdev_add_json(&qcow2("top", &paths[2])).unwrap();
    (d, paths, g, t)
}

fn qcow2(name: &str, path: &Path) -> Value {
    json!({"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}})
}

fn info(path: &Path) -> Value {
    let out = run("qemu-img", &["info", "-U", "--output=json", p(path)]);
    serde_json::from_str(&out).unwrap()
}

fn check_clean(path: &Path) {
    run("qemu-img", &["check", "-U", p(path)]);
}

fn read(node: &BlockNode, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    node.read_at(offset, &mut buf).unwrap();
    buf
}

fn backing_of(node: &BlockNode) -> Option<Arc<BlockNode>> {
    node.child("backing")
}

#[test]
fn a_read_only_backing_node_reopens_read_write_and_back() {
    let (_d, [base, _, _], g, t) = opened_chain();
    let mid = backing_of(&t).unwrap();
    let b = backing_of(&mid).unwrap();
    assert!(b.is_read_only());
    assert_eq!(
        b.write_at(0, &[1; 512]).unwrap_err().errno(),
        Some(libc::EPERM)
    );
    b.reopen_read_write().unwrap();
    assert!(!b.is_read_only());
    let file = b.child("file").unwrap();
    assert!(!file.is_read_only(), "the inherited file child follows");
    b.write_at(0, &[0x77; 512]).unwrap();
    b.reopen_read_only().unwrap();
    assert!(b.is_read_only() && file.is_read_only());
    drop(g);
    check_clean(&base);
    run(
        "qemu-io",
        &["-r", "-U", "-c", "read -P 0x77 0 512", p(&base)],
    );
}

#[test]
fn reopening_read_write_keeps_the_image_locked_against_other_writers() {
    let (_d, [base, _, _], _g, t) = opened_chain();
    let b = backing_of(&backing_of(&t).unwrap()).unwrap();
    b.reopen_read_write().unwrap();
    // qemu-io without force-share cannot open the base for writing now.
    let out = Command::new("qemu-io")
        .args(["-c", "write 0 512", p(&base)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Failed to get"), "{text}");
}

#[test]
fn change_backing_relinks_a_node_rewrites_its_header_and_closes_the_dropped_layer() {
    let (_d, [base, _, top], mut g, t) = opened_chain();
    let m = backing_of(&t).unwrap();
    let b = backing_of(&m).unwrap();
    // What mid holds must be in top before mid can go (a stream copies it).
    let data = read(&m, 1 << 20, 1 << 20);
    t.write_at(1 << 20, &data).unwrap();
    g.change_backing(&t, Some(&b), &BackingName::default())
        .unwrap();
    assert!(Arc::ptr_eq(&backing_of(&t).unwrap(), &b));
    assert!(m.is_closed(), "the dropped layer is closed");
    assert!(g.find(m.name()).is_none());
    assert_eq!(read(&t, 1 << 20, 4), vec![0x22; 4]);
    drop(g);
    let i = info(&top);
    assert_eq!(i["backing-filename"], json!(p(&base)));
    assert_eq!(i["backing-filename-format"], json!("qcow2"));
    check_clean(&top);
}

#[test]
fn change_backing_to_none_leaves_no_backing_file_in_the_header() {
    let (_d, [_, _, top], mut g, t) = opened_chain();
    g.change_backing(&t, None, &BackingName::default()).unwrap();
    assert!(backing_of(&t).is_none());
    drop(g);
    assert!(info(&top).get("backing-filename").is_none());
}

#[test]
fn a_given_backing_file_name_and_masked_protocol_are_what_the_header_records() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("b.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "4M"]);
    let over = d.path().join("o.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&raw),
            "-F",
            "raw",
            p(&over),
            "4M",
        ],
    );
    let mut g = BlockGraph::new();
    let f = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": raw}))
        .unwrap();
    let o = g
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "o", "backing": "f",
            "file": {"driver": "file", "filename": over}}))
        .unwrap();
    let name = BackingName {
        file: Some("b.raw".into()),
        mask_protocol: false,
    };
    g.change_backing(&o, Some(&f), &name).unwrap();
    assert_eq!(info(&over)["backing-filename-format"], json!("file"));
    let masked = BackingName {
        file: None,
        mask_protocol: true,
    };
    g.change_backing(&o, Some(&f), &masked).unwrap();
    let i = info(&over);
    assert_eq!(i["backing-filename"], json!(p(&raw)));
    assert_eq!(i["backing-filename-format"], json!("raw"));
}

#[test]
fn drop_intermediate_moves_the_overlay_onto_the_base_and_rewrites_a_read_only_overlay() {
    let d = tempfile::tempdir().unwrap();
    let [base, _, top] = chain(&d);
    let over = overlay(&d, &top);
    let mut g = BlockGraph::new();
    let mut opts = qcow2("over", &over);
    opts["read-only"] = json!(true);
    let o = g.blockdev_add_json(&opts).unwrap();
    let t = backing_of(&o).unwrap();
    let m = backing_of(&t).unwrap();
    let b = backing_of(&m).unwrap();
    // Commit mid into base first (what the job copies), then drop mid.
    let data = read(&m, 1 << 20, 1 << 20);
    b.reopen_read_write().unwrap();
    b.write_at(1 << 20, &data).unwrap();
    let name = BackingName {
        file: Some("base.qcow2".into()),
        mask_protocol: false,
    };
    g.drop_intermediate(&m, &b, &name).unwrap();
    assert!(Arc::ptr_eq(&backing_of(&t).unwrap(), &b));
    assert!(m.is_closed());
    assert!(
        o.is_read_only() && t.is_read_only(),
        "read-only again after the rewrite"
    );
    assert_eq!(read(&o, 1 << 20, 4), vec![0x22; 4]);
    drop(g);
    let i = info(&top);
    assert_eq!(i["backing-filename"], json!("base.qcow2"));
    check_clean(&top);
    check_clean(&base);
}

#[test]
fn drop_intermediate_refuses_a_base_outside_the_chain() {
    let (_d, [_, _, _], mut g, t) = opened_chain();
    let m = backing_of(&t).unwrap();
    assert!(
        g.drop_intermediate(&m, &t, &BackingName::default())
            .is_err()
    );
    assert!(Arc::ptr_eq(&backing_of(&t).unwrap(), &m));
}

#[test]
fn a_filter_sits_above_a_node_under_its_name_and_goes_away_leaving_the_parents_back() {
    let d = tempfile::tempdir().unwrap();
    let [_, _, top] = chain(&d);
    let over = overlay(&d, &top);
    let mut g = BlockGraph::new();
    let o = g.blockdev_add_json(&qcow2("over", &over)).unwrap();
    let t = backing_of(&o).unwrap();
    let f = g
        .insert_job_filter(&t, FilterKind::CommitTop, Some("ctop"))
        .unwrap();
    assert!(Arc::ptr_eq(&backing_of(&o).unwrap(), &f));
    assert!(g.find("ctop").is_some());
    // The overlay reads the same through the filter.
    assert_eq!(read(&o, 2 << 20, 4), vec![0x33; 4]);
    let listed = g.query_named_block_nodes(true);
    let entry = listed
        .iter()
        .find(|n| n.node_name.as_deref() == Some("ctop"))
        .unwrap();
    assert_eq!(entry.drv, "commit_top");
    assert_eq!(entry.file, p(&top));
    assert!(entry.ro);
    assert_eq!(
        g.insert_job_filter(&t, FilterKind::CommitTop, Some("over"))
            .unwrap_err()
            .desc(),
        "Duplicate nodes with node-name='over'"
    );
    g.remove_filter(&f).unwrap();
    assert!(Arc::ptr_eq(&backing_of(&o).unwrap(), &t));
    assert!(g.find("ctop").is_none());
    assert!(f.is_closed());
}

#[test]
fn a_named_copy_on_read_filter_has_a_json_file_name_and_an_implicit_one_its_childs() {
    let (_d, [_, _, top], mut g, t) = opened_chain();
    let named = g
        .insert_job_filter(&t, FilterKind::CopyOnRead { bottom: None }, Some("cor"))
        .unwrap();
    let listed = g.query_named_block_nodes(false);
    let entry = listed
        .iter()
        .find(|n| n.node_name.as_deref() == Some("cor"))
        .unwrap();
    assert_eq!(
        entry.file,
        format!(
            "json:{{\"driver\": \"copy-on-read\", \"file\": {{\"driver\": \"qcow2\", \"file\": \
             {{\"driver\": \"file\", \"filename\": \"{}\"}}}}}}",
            p(&top)
        )
    );
    assert_eq!(entry.backing_file_depth, 3, "the filter counts as a layer");
    assert_eq!(
        entry.image.backing_image.as_ref().unwrap().filename,
        p(&top)
    );
    g.remove_filter(&named).unwrap();
    let implicit = g
        .insert_job_filter(&t, FilterKind::CopyOnRead { bottom: None }, None)
        .unwrap();
    assert!(implicit.name().starts_with("#block"));
    let listed = g.query_named_block_nodes(true);
    let entry = listed
        .iter()
        .find(|n| n.node_name.as_deref() == Some(implicit.name()))
        .unwrap();
    assert_eq!(entry.file, p(&top));
    assert_eq!(entry.drv, "copy-on-read");
}

#[test]
fn allocated_above_looks_down_to_the_bottom_layer_only() {
    let (_d, [_, _, _], _g, t) = opened_chain();
    let m = backing_of(&t).unwrap();
    let mb = 1u64 << 20;
    // base's data at 0: allocated above nothing but the whole chain.
    assert_eq!(t.allocated_above(None, 0, mb).unwrap(), (true, mb));
    assert_eq!(
        t.allocated_above(Some(m.name()), 0, mb).unwrap(),
        (false, mb)
    );
    assert_eq!(
        t.allocated_above(Some(m.name()), mb, mb).unwrap(),
        (true, mb)
    );
    assert_eq!(
        t.allocated_above(Some(t.name()), mb, mb).unwrap(),
        (false, mb)
    );
    assert_eq!(
        t.allocated_above(Some(t.name()), 2 * mb, mb).unwrap(),
        (true, mb)
    );
}

#[test]
fn copy_on_read_copies_what_the_chain_above_the_bottom_holds_and_keeps_written_data() {
    let (_d, [_, _, top], g, t) = opened_chain();
    let m = backing_of(&t).unwrap();
    let mb = 1u64 << 20;
    let mut buf = vec![0u8; 256 << 10];
    // Below the bottom (base's data with bottom = mid): not copied.
    assert_eq!(
        t.copy_on_read(0, mb, Some(m.name()), &mut buf).unwrap(),
        (mb, false)
    );
    assert!(!t.block_status(0, mb).unwrap().0);
    // A guest write lands in part of mid's range first: it stays.
    t.write_at(mb + 4096, &[0xee; 4096]).unwrap();
    let mut pos = mb;
    while pos < 2 * mb {
        let (n, _) = t
            .copy_on_read(pos, 2 * mb - pos, Some(m.name()), &mut buf)
            .unwrap();
        pos += n;
    }
    assert_eq!(t.block_status(mb, mb).unwrap(), (true, mb));
    assert_eq!(read(&t, mb, 4096), vec![0x22; 4096]);
    assert_eq!(read(&t, mb + 4096, 4096), vec![0xee; 4096]);
    assert_eq!(read(&t, mb + 8192, 4096), vec![0x22; 4096]);
    drop(g);
    check_clean(&top);
}

#[test]
fn copy_on_read_and_concurrent_writes_never_lose_a_write() {
    // Writers hammer random 4 KiB blocks of 16 MiB being copied up from the backing file in
    // 1 MiB steps; afterwards every block holds the last data written to it, or the backing
    // file's if it was never written. Without the copy holding its range, a copy reads the
    // backing data, a write lands, and the copy writes the old data over it.
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("b.qcow2");
    let top = d.path().join("t.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&base), "16M"],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 0 16M", p(&base)],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
            "16M",
        ],
    );
    let mut g = BlockGraph::new();
    let t = g.blockdev_add_json(&qcow2("top", &top)).unwrap();
    let blocks = 4096u64;
    let last: Arc<Vec<std::sync::Mutex<Option<u8>>>> =
        Arc::new((0..blocks).map(|_| std::sync::Mutex::new(None)).collect());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (t, last, done) = (t.clone(), last.clone(), done.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1);
                let mut i = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let block = x % blocks;
                    let byte = (i % 200) as u8 + 40 + w as u8;
                    i += 1;
                    // Record and write under the block's lock: "last" is the order the
                    // writes to a block reached the node in.
                    let mut slot = last[block as usize].lock().unwrap();
                    t.write_at(block * 4096, &[byte; 4096]).unwrap();
                    *slot = Some(byte);
                }
            })
        })
        .collect();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < 16 << 20 {
        let (n, _) = t.copy_on_read(pos, 1 << 20, None, &mut buf).unwrap();
        pos += n;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for block in 0..blocks {
        let want = last[block as usize].lock().unwrap().unwrap_or(0x22);
        assert_eq!(
            read(&t, block * 4096, 4096),
            vec![want; 4096],
            "block {block}"
        );
    }
    drop(g);
    check_clean(&top);
}
