//! qcow2 nodes on damaged images, as QEMU handles them: a write that would land on the
//! image's metadata is refused with EIO, `BLOCK_IMAGE_CORRUPTED` is reported once (QEMU's
//! fields and wording), the node takes no more I/O (ENOMEDIUM, as QEMU's ejected node), and
//! an image marked corrupt opens read-only only. `overlap-check` acts or is refused by name.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

mod common;
use common::AddJson;

use block::{BlockEvent, BlockGraph};
use serde_json::{Value, json};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 1 MiB image whose first L2 entry points at its L1 table (QEMU's iotest 060 case).
fn l2_entry_on_l1(dir: &Path) -> (PathBuf, u64) {
    let path = dir.join("t.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"],
    );
    run(
        "qemu-io",
        &["-c", "write -P 0x22 0 64k", path.to_str().unwrap()],
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&bytes, 40);
    let l2 = (be(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    bytes[l2..l2 + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    (path, l1)
}

fn opts(name: &str, path: &Path) -> Value {
    json!({"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}})
}

fn graph_with_events() -> (BlockGraph, Arc<Mutex<Vec<BlockEvent>>>) {
    let mut g = BlockGraph::new();
    let seen: Arc<Mutex<Vec<BlockEvent>>> = Arc::default();
    let s = seen.clone();
    g.set_event_sink(Arc::new(move |e| s.lock().unwrap().push(e)));
    (g, seen)
}

#[test]
fn a_write_onto_the_l1_table_fails_with_eio_and_reports_block_image_corrupted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, l1) = l2_entry_on_l1(dir.path());
    let (mut g, seen) = graph_with_events();
    let node = g.blockdev_add_json(&opts("tgt", &path)).unwrap();
    let e = node.write_at(0, &[0x5a; 65536]).unwrap_err();
    assert_eq!(
        (e.desc(), e.errno()),
        ("Input/output error", Some(libc::EIO))
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![BlockEvent::ImageCorrupted {
            node_name: "tgt".into(),
            msg: "Preventing invalid write on metadata (overlaps with active L1 table)".into(),
            offset: Some(l1),
            size: Some(65536),
            fatal: true,
        }]
    );
    // Ejected: no more reads or writes, and no second event.
    let mut buf = [0u8; 512];
    let e = node.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOMEDIUM));
    assert_eq!(
        node.write_at(0, &buf).unwrap_err().errno(),
        Some(libc::ENOMEDIUM)
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    g.close_all().unwrap();
    // Marked corrupt: read-write refused with QEMU's words, read-only fine.
    let e = g.blockdev_add_json(&opts("again", &path)).unwrap_err();
    assert_eq!(
        e.desc(),
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    let mut ro = opts("ro", &path);
    ro["read-only"] = json!(true);
    g.blockdev_add_json(&ro).unwrap();
}

#[test]
fn overlap_check_none_and_a_switched_off_check_act() {
    for option in [
        json!("none"),
        json!({"active-l1": false}),
        json!({"template": "constant", "active-l1": false}),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = l2_entry_on_l1(dir.path());
        let (mut g, seen) = graph_with_events();
        let mut o = opts("tgt", &path);
        o["overlap-check"] = option.clone();
        let node = g.blockdev_add_json(&o).unwrap();
        node.write_at(0, &[0x5a; 512]).unwrap();
        assert!(seen.lock().unwrap().is_empty(), "{option}");
    }
    for option in [
        json!("constant"),
        json!("all"),
        json!({"template": "none", "active-l1": true}),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = l2_entry_on_l1(dir.path());
        let (mut g, seen) = graph_with_events();
        let mut o = opts("tgt", &path);
        o["overlap-check"] = option.clone();
        let node = g.blockdev_add_json(&o).unwrap();
        assert!(node.write_at(0, &[0x5a; 512]).is_err(), "{option}");
        assert_eq!(seen.lock().unwrap().len(), 1, "{option}");
    }
}

#[test]
fn unknown_overlap_check_values_are_refused_by_name_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"],
    );
    let mut g = BlockGraph::new();
    for (option, error) in [
        (
            json!("bogus"),
            "Parameter 'overlap-check' does not accept value 'bogus'",
        ),
        (
            json!({"template": "none", "main-header": true, "bogus": 1}),
            "Parameter 'overlap-check.bogus' is unexpected",
        ),
        (
            json!({"main-header": "yes"}),
            "Invalid parameter type for 'overlap-check.main-header', expected: boolean",
        ),
    ] {
        let mut o = opts("n", &path);
        o["overlap-check"] = option;
        assert_eq!(g.blockdev_add_json(&o).unwrap_err().desc(), error);
    }
}
