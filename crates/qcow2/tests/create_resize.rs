//! Images created with QEMU's creation options and resized, judged by qemu-img: `check` is
//! clean and `info` says what it says of the image `qemu-img create` makes with the same
//! options; the data reads back through qemu-io.

mod common;

use common::*;
use qcow2::{CreateOptions, Image, Preallocation};
use serde_json::Value;

fn ours(s: &Scratch, name: &str, options: &CreateOptions) -> std::path::PathBuf {
    let path = s.path(name);
    std::fs::File::create(&path).unwrap();
    qcow2::create_with(storage(&path, true), options).unwrap();
    path
}

/// The `info` facts that describe what the image is (not where its clusters lie).
fn facts(path: &std::path::Path) -> Value {
    let mut info = json("qemu-img", &["info", "--output=json", "-U", p(path)]);
    let keep = [
        "virtual-size",
        "cluster-size",
        "format",
        "backing-filename",
        "backing-filename-format",
        "format-specific",
    ];
    let map = info.as_object_mut().unwrap();
    map.retain(|k, _| keep.contains(&k.as_str()));
    info
}

fn qemu_created(s: &Scratch, name: &str, opts: &str, size: &str) -> std::path::PathBuf {
    let path = s.path(name);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, p(&path), size],
    );
    path
}

#[test]
fn created_images_match_qemu_img_create_option_for_option() {
    let s = Scratch::new();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            p(&s.path("base.qcow2")),
            "8M",
        ],
    );
    let cases: Vec<(CreateOptions, &str)> = vec![
        (
            CreateOptions {
                size: 8 << 20,
                ..CreateOptions::default()
            },
            "compat=1.1",
        ),
        (
            CreateOptions {
                size: 8 << 20,
                cluster_size: 4096,
                refcount_bits: 64,
                lazy_refcounts: true,
                ..CreateOptions::default()
            },
            "cluster_size=4096,refcount_bits=64,lazy_refcounts=on",
        ),
        (
            CreateOptions {
                size: 8 << 20,
                refcount_bits: 1,
                cluster_size: 512,
                ..CreateOptions::default()
            },
            "refcount_bits=1,cluster_size=512",
        ),
        (
            CreateOptions {
                size: 8 << 20,
                backing: Some(("base.qcow2".into(), Some("qcow2".into()))),
                ..CreateOptions::default()
            },
            "backing_file=base.qcow2,backing_fmt=qcow2",
        ),
        (
            CreateOptions {
                size: 8 << 20,
                version: 2,
                ..CreateOptions::default()
            },
            "compat=0.10",
        ),
        (
            CreateOptions {
                size: 8 << 20,
                preallocation: Preallocation::Metadata,
                ..CreateOptions::default()
            },
            "preallocation=metadata",
        ),
        (
            CreateOptions {
                size: 3 << 20,
                cluster_size: 2 << 20,
                preallocation: Preallocation::Full,
                ..CreateOptions::default()
            },
            "cluster_size=2M,preallocation=full",
        ),
        (
            CreateOptions {
                size: 8 << 20,
                preallocation: Preallocation::Falloc,
                ..CreateOptions::default()
            },
            "preallocation=falloc",
        ),
    ];
    for (i, (options, qemu_opts)) in cases.iter().enumerate() {
        let a = ours(&s, &format!("ours{i}.qcow2"), options);
        let size = options.size.to_string();
        let b = qemu_created(&s, &format!("qemu{i}.qcow2"), qemu_opts, &size);
        assert_check_clean(&a);
        assert_eq!(facts(&a), facts(&b), "{qemu_opts}");
        let (code, out) = run_status("qemu-img", &["compare", "-U", p(&a), p(&b)]);
        assert_eq!(code, 0, "{qemu_opts}: {out}");
        if options.preallocation != Preallocation::Off {
            // Every cluster is allocated, as in QEMU's.
            let map = json("qemu-img", &["map", "--output=json", "-U", p(&a)]);
            let unallocated: Vec<&Value> = map
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["data"] != true)
                .collect();
            assert!(unallocated.is_empty(), "{qemu_opts}: {map}");
        }
    }
}

#[test]
fn a_grown_image_keeps_its_data_and_reads_zeros_after_the_old_end() {
    let s = Scratch::new();
    let path = ours(
        &s,
        "g.qcow2",
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..CreateOptions::default()
        },
    );
    qemu_io(&path, "qcow2", &["write -P 0x5a 0 1M"]);
    {
        let img = open_rw(&path);
        // 1 MiB at 4 KiB clusters fits one L1 entry; 64 MiB needs more: the L1 table moves.
        img.resize(64 << 20, Preallocation::Off).unwrap();
        img.write_at(&[0x77; 4096], 60 << 20).unwrap();
        img.close().unwrap();
    }
    assert_check_clean(&path);
    qemu_io(
        &path,
        "qcow2",
        &[
            "read -P 0x5a 0 1M",
            "read -P 0 1M 59M",
            "read -P 0x77 60M 4k",
        ],
    );
    let info = json("qemu-img", &["info", "--output=json", p(&path)]);
    assert_eq!(info["virtual-size"], 64 << 20);
}

#[test]
fn a_shrunk_image_frees_the_clusters_past_its_new_end() {
    let s = Scratch::new();
    let path = s.path("s.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "4M"]);
    qemu_io(&path, "qcow2", &["write -P 0x11 0 4M"]);
    {
        let img = open_rw(&path);
        assert_eq!(
            img.resize(1 << 20, Preallocation::Metadata)
                .unwrap_err()
                .to_string(),
            "invalid argument: Preallocation can't be used for shrinking an image"
        );
        img.resize(1 << 20, Preallocation::Off).unwrap();
        img.close().unwrap();
    }
    // No leak: the freed clusters are free.
    let check = assert_check_clean(&path);
    assert!(check.contains("No errors"), "{check}");
    qemu_io(&path, "qcow2", &["read -P 0x11 0 1M"]);
    {
        // Grown again, the area reads as zeros (not as the old data).
        let img = open_rw(&path);
        img.resize(4 << 20, Preallocation::Off).unwrap();
        let mut buf = vec![1u8; 4096];
        img.read_at(&mut buf, 2 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        img.close().unwrap();
    }
    assert_check_clean(&path);
}

#[test]
fn a_resize_to_an_unaligned_size_is_refused() {
    let s = Scratch::new();
    let path = ours(&s, "u.qcow2", &CreateOptions::default());
    let img: Image = open_rw(&path);
    assert_eq!(
        img.resize(1000, Preallocation::Off)
            .unwrap_err()
            .to_string(),
        "invalid argument: The new size must be a multiple of 512"
    );
}
