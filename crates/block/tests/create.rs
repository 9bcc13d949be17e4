//! Image creation (`blockdev-create`'s drivers): files with each preallocation mode and under
//! another process's lock, and the qcow2 options this layer refuses, named, before anything
//! is written.

mod common;

use std::os::unix::fs::MetadataExt;

use block::Perm;
use block::create::{create_file, qcow2_options};
use common::AddJson;
use qmp_api::{BlockdevCreateOptionsFile, BlockdevCreateOptionsQcow2, PreallocMode};
use serde_json::json;

fn file_options(
    path: &std::path::Path,
    size: u64,
    prealloc: PreallocMode,
) -> BlockdevCreateOptionsFile {
    let mut o = BlockdevCreateOptionsFile::new(path.to_str().unwrap(), size);
    o.preallocation = Some(prealloc);
    o
}

#[test]
fn a_file_is_created_emptied_and_preallocated_as_asked() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("f");
    std::fs::write(&path, vec![0xaa; 8192]).unwrap();
    create_file(&file_options(&path, 1 << 20, PreallocMode::Off)).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.len(), 1 << 20);
    // Emptied first: the old bytes are gone.
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    for mode in [PreallocMode::Falloc, PreallocMode::Full] {
        create_file(&file_options(&path, 1 << 20, mode)).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 1 << 20, "{mode}");
        assert!(m.blocks() * 512 >= 1 << 20, "{mode}: {} blocks", m.blocks());
    }
    let e = create_file(&file_options(&path, 1 << 20, PreallocMode::Metadata)).unwrap_err();
    assert_eq!(e.desc(), "Unsupported preallocation mode: metadata");
}

#[test]
fn a_file_another_user_writes_is_not_created_over() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("held");
    std::fs::write(&path, vec![0x11; 4096]).unwrap();
    // Another open of the file (its own image locks) that does not share writing.
    let mut g = block::BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "h", "filename": path}))
        .unwrap();
    let grant = n
        .take_perm("another user", "root", Perm::WRITE, Perm::CONSISTENT_READ)
        .unwrap();
    let e = create_file(&file_options(&path, 1 << 20, PreallocMode::Off)).unwrap_err();
    assert_eq!(
        e.desc(),
        format!(
            "Failed to get \"write\" lock\nIs another process using the image [{}]?",
            path.display()
        )
    );
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x11; 4096]);
    drop(grant);
    create_file(&file_options(&path, 1 << 20, PreallocMode::Off)).unwrap();
}

fn qcow2(extra: serde_json::Value) -> BlockdevCreateOptionsQcow2 {
    let mut o = json!({"file": "f", "size": 1048576});
    for (k, v) in extra.as_object().unwrap() {
        o[k] = v.clone();
    }
    qmp_api::input::from_value(&o).unwrap()
}

#[test]
fn qcow2_options_this_layer_lacks_are_refused_by_name_after_qemus_own_checks() {
    let refused = [
        (
            json!({"data-file": "d"}),
            "Parameter 'data-file' is not supported by this block layer",
        ),
        (
            json!({"encrypt": {"format": "luks", "key-secret": "s"}}),
            "Parameter 'encrypt' is not supported by this block layer",
        ),
        (
            json!({"extended-l2": true}),
            "Parameter 'extended-l2' is not supported with value true by this block layer",
        ),
        (
            json!({"compression-type": "zstd"}),
            "Parameter 'compression-type' is not supported with value zstd by this block layer",
        ),
        (
            json!({"version": "v2", "preallocation": "metadata"}),
            "Parameter 'preallocation' is not supported with version v2 by this block layer",
        ),
    ];
    for (extra, text) in refused {
        let e = qcow2_options(&qcow2(extra.clone())).unwrap_err();
        assert_eq!(e.desc(), text, "{extra}");
    }
    // QEMU's own checks come first.
    let e = qcow2_options(&qcow2(json!({"extended-l2": true, "cluster-size": 4096}))).unwrap_err();
    assert_eq!(
        e.desc(),
        "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
    );
    // What is accepted acts.
    let o = qcow2_options(&qcow2(
        json!({"extended-l2": false, "compression-type": "zlib",
        "lazy-refcounts": true, "refcount-bits": 8, "backing-file": "b", "backing-fmt": "raw"}),
    ))
    .unwrap();
    assert!(o.lazy_refcounts);
    assert_eq!(o.refcount_bits, 8);
    assert_eq!(o.backing, Some(("b".to_string(), Some("raw".to_string()))));
}
