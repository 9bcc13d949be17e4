//! Damaged images give errors, never panics (nor hangs).

mod common;
use common::*;
use qcow2::Image;

/// Exercise every entry point on the image at `path`; errors are fine, panics are not.
fn exercise(path: &std::path::Path) {
    if let Ok(img) = Image::open_file(path, true) {
        let n = img.size().min(256 << 10) as usize;
        let mut buf = vec![0u8; n];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.block_status(0, n as u64);
        for s in img.snapshots() {
            let m = s.disk_size.min(n as u64) as usize;
            let _ = img.read_snapshot(&s.id, &mut buf[..m], 0);
        }
        let _ = img.bitmaps();
    }
    if let Ok(img) = Image::open_file(path, false) {
        let size = img.size();
        if size >= 8192 {
            let _ = img.write_at(&[7; 1000], 3000);
            let _ = img.write_zeroes(0, 4096);
        }
        let _ = img.flush();
        if img.create_snapshot("fuzz").is_ok() {
            let _ = img.delete_snapshot("fuzz");
        }
        let _ = img.store_bitmaps(&img.bitmaps());
        let _ = img.close();
    }
}

/// A small image with data, compressed data, zero clusters, a snapshot and a bitmap.
fn sample(s: &Scratch) -> Vec<u8> {
    let raw = s.path("sample.raw");
    std::fs::write(&raw, pattern(64 << 10, 4)).unwrap();
    let path = s.path("sample.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            p(&raw),
            p(&path),
        ],
    );
    run("qemu-img", &["resize", p(&path), "256k"]);
    qemu_io(
        &path,
        "qcow2",
        &["write -P 0x61 100k 20k", "write -z 130k 4k"],
    );
    run("qemu-img", &["snapshot", "-c", "s1", p(&path)]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "4096", p(&path), "bm"],
    );
    qemu_io(&path, "qcow2", &["write -P 0x62 200k 10k"]);
    // The undamaged sample is fully usable.
    let img = open_ro(&path);
    assert_eq!(our_contents(&img), qemu_contents(&path, s));
    assert_eq!(img.snapshots().len(), 1);
    assert_eq!(img.bitmaps().len(), 1);
    drop(img);
    std::fs::read(&path).unwrap()
}

#[test]
fn truncated_images_give_errors() {
    let s = Scratch::in_memory();
    let good = sample(&s);
    let path = s.path("t.qcow2");
    for len in [
        0,
        3,
        4,
        71,
        72,
        103,
        104,
        111,
        300,
        511,
        513,
        1024,
        2047,
        good.len() / 2,
        good.len() - 1,
    ] {
        std::fs::write(&path, &good[..len]).unwrap();
        exercise(&path);
    }
    std::fs::write(&path, &good[..50]).unwrap();
    assert!(matches!(
        Image::open_file(&path, true),
        Err(qcow2::Error::Invalid(_))
    ));
}

#[test]
fn damaged_header_bytes_give_errors() {
    let s = Scratch::in_memory();
    let good = sample(&s);
    let path = s.path("h.qcow2");
    for i in 0..320 {
        for v in [0x00, 0xff, 0x13] {
            if good[i] == v {
                continue;
            }
            let mut bad = good.clone();
            bad[i] = v;
            std::fs::write(&path, &bad).unwrap();
            exercise(&path);
        }
    }
}

#[test]
fn damaged_tables_give_errors() {
    let s = Scratch::in_memory();
    let good = sample(&s);
    let path = s.path("m.qcow2");
    let words = good.len() / 8;
    // Metadata sits at the start (refcounts, L1, L2) and the end (snapshot, bitmap tables).
    let picks: Vec<usize> = (8..words.min(800))
        .chain(words.saturating_sub(400)..words)
        .collect();
    for (n, w) in picks.into_iter().enumerate() {
        let mut bad = good.clone();
        let v: u64 = match n % 4 {
            0 => u64::MAX,
            1 => 0x8000_0000_0000_0200,
            2 => 0x4000_0000_0001_0003,
            _ => 0x0000_0000_0000_0000,
        };
        bad[w * 8..w * 8 + 8].copy_from_slice(&v.to_be_bytes());
        std::fs::write(&path, &bad).unwrap();
        exercise(&path);
    }
}

#[test]
fn unknown_incompatible_features_are_refused_by_name() {
    let s = Scratch::new();
    let path = s.path("f.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[72] |= 0x80; // incompatible bit 63
    std::fs::write(&path, &bytes).unwrap();
    let err = Image::open_file(&path, true).err().unwrap();
    assert!(matches!(err, qcow2::Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("bit 63"), "{err}");
}

#[test]
fn external_data_files_extended_l2_and_zstd_are_refused_clearly() {
    let s = Scratch::new();
    let data_file = format!("data_file={}", p(&s.path("data.raw")));
    for (opts, what) in [
        (data_file.as_str(), "external data file"),
        ("extended_l2=on", "extended L2"),
        ("compression_type=zstd", "zstd"),
    ] {
        let path = s.path("x.qcow2");
        let _ = std::fs::remove_file(&path);
        let (code, out) = run_status(
            "qemu-img",
            &["create", "-f", "qcow2", "-o", opts, p(&path), "1M"],
        );
        if code != 0 {
            // This QEMU build lacks the feature (e.g. zstd); nothing to refuse.
            assert!(out.contains("zstd") || out.contains("not"), "{out}");
            continue;
        }
        let err = Image::open_file(&path, true).err().unwrap();
        assert!(matches!(err, qcow2::Error::Unsupported(_)), "{opts}: {err}");
        assert!(err.to_string().contains(what), "{opts}: {err}");
    }
}

#[test]
fn refcounts_claiming_every_cluster_make_allocation_fail_instead_of_hang() {
    let s = Scratch::in_memory();
    let path = s.path("full.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let mut bytes = std::fs::read(&path).unwrap();
    // Every refcount table entry points at one refcount block claiming every cluster used.
    for e in bytes[65536..131072].chunks_exact_mut(8) {
        e.copy_from_slice(&131072u64.to_be_bytes());
    }
    bytes[131072..196608].fill(0xff);
    std::fs::write(&path, &bytes).unwrap();
    let img = Image::open_file(&path, false).unwrap();
    let err = img.write_at(&[1; 4096], 0).unwrap_err();
    assert!(matches!(err, qcow2::Error::Invalid(_)), "{err}");
}
