//! Images created and written by this crate are accepted by qemu-img and hold what we wrote.

mod common;
use common::*;
use qcow2::{Allocation, Image};

/// Apply the same writes to our image and to a raw reference file.
struct Twin {
    img: Image,
    reference: Vec<u8>,
}

impl Twin {
    fn write(&mut self, data: &[u8], off: u64) {
        self.img.write_at(data, off).unwrap();
        self.reference[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, off: u64, len: u64) {
        self.img.write_zeroes(off, len).unwrap();
        self.reference[off as usize..(off + len) as usize].fill(0);
    }
}

fn assert_same_as_reference(s: &Scratch, path: &std::path::Path, reference: &[u8]) {
    let raw = s.path("reference.raw");
    std::fs::write(&raw, reference).unwrap();
    let (code, out) = run_status(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(path), p(&raw)],
    );
    assert_eq!(code, 0, "qemu-img compare: {out}");
}

#[test]
fn created_image_is_accepted_by_qemu_img() {
    let s = Scratch::new();
    let path = s.path("new.qcow2");
    create_file(&path, 100 << 20, 65536, None);
    assert_check_clean(&path);
    let info = json("qemu-img", &["info", "--output=json", p(&path)]);
    assert_eq!(info["virtual-size"], 100 << 20);
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
}

#[test]
fn writes_of_every_shape_pass_check_and_compare_for_several_cluster_sizes() {
    let s = Scratch::new();
    for cs in [512u32, 4096, 65536, 2 << 20] {
        let path = s.path(&format!("w{cs}.qcow2"));
        let size = 8 << 20;
        create_file(&path, size, cs, None);
        let mut t = Twin {
            img: open_rw(&path),
            reference: vec![0; size as usize],
        };
        t.write(&pattern(1 << 20, 1), 0); // aligned
        t.write(&pattern(3000, 2), 5000); // inside one cluster, partial
        t.write(&pattern(200_000, 3), (2 << 20) + 777); // unaligned, several clusters
        t.write(&pattern(1 << 20, 4), 300_000); // overwrites allocated and fresh clusters
        t.write(&pattern(4096, 5), size - 4096); // the last bytes
        t.zero(100_000, 300_000);
        t.write(&pattern(10, 6), 150_000); // into a zeroed cluster
        t.img.close().unwrap();
        drop(t.img);
        assert_check_clean(&path);
        assert_same_as_reference(&s, &path, &t.reference);
        let img = open_ro(&path);
        assert_eq!(our_contents(&img), t.reference, "cluster size {cs}");
    }
}

#[test]
fn qemu_img_map_shows_what_we_wrote() {
    let s = Scratch::new();
    let path = s.path("map.qcow2");
    create_file(&path, 4 << 20, 65536, None);
    let img = open_rw(&path);
    img.write_at(&pattern(128 << 10, 1), 1 << 20).unwrap();
    img.close().unwrap();
    drop(img);
    let map = json("qemu-img", &["map", "--output=json", p(&path)]);
    let data: Vec<_> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(1 << 20, 128 << 10)]);
}

#[test]
fn partial_writes_copy_the_rest_of_the_cluster_from_the_backing_file() {
    let s = Scratch::new();
    let base = s.path("base.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&base), "4M"]);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 4M"]);
    let top = s.path("top.qcow2");
    create_file(&top, 4 << 20, 65536, Some(("base.qcow2", "qcow2")));
    let img = open_rw(&top);
    let mut reference = vec![0x5a; 4 << 20];
    let d = pattern(1000, 7);
    img.write_at(&d, 70_000).unwrap();
    reference[70_000..71_000].copy_from_slice(&d);
    img.write_zeroes(1 << 20, 1 << 20).unwrap();
    reference[1 << 20..2 << 20].fill(0);
    assert_eq!(
        img.block_status(1 << 20, 1 << 20).unwrap(),
        (Allocation::Zero, 1 << 20)
    );
    assert_eq!(
        img.block_status(0, 65536).unwrap(),
        (Allocation::Unallocated, 65536)
    );
    assert_eq!(
        img.block_status(65536, 65536).unwrap(),
        (Allocation::Data, 65536)
    );
    img.close().unwrap();
    drop(img);
    assert_check_clean(&top);
    assert_same_as_reference(&s, &top, &reference);
    let chain = json(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", p(&top)],
    );
    assert_eq!(chain.as_array().unwrap().len(), 2);
    assert_eq!(chain[0]["backing-filename"], "base.qcow2");
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
}

#[test]
fn writes_to_an_image_made_by_qemu_img_keep_its_data() {
    let s = Scratch::new();
    let path = s.path("q.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "2M"]);
    qemu_io(&path, "qcow2", &["write -P 0x31 0 2M"]);
    let img = open_rw(&path);
    img.write_at(&[0x42; 100], 65500).unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    qemu_io(
        &path,
        "qcow2",
        &[
            "read -P 0x31 0 65500",
            "read -P 0x42 65500 100",
            "read -P 0x31 65600 1983552",
        ],
    );
}

#[test]
fn compressed_clusters_are_rewritten_uncompressed_on_write() {
    let s = Scratch::new();
    let src = s.path("src.raw");
    let mut reference = pattern(1 << 20, 2);
    std::fs::write(&src, &reference).unwrap();
    let path = s.path("c.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&src),
            p(&path),
        ],
    );
    let img = open_rw(&path);
    img.write_at(&[9; 10], 200_000).unwrap();
    reference[200_000..200_010].fill(9);
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    assert_same_as_reference(&s, &path, &reference);
}

#[test]
fn the_refcount_table_grows_when_the_image_outgrows_it() {
    let s = Scratch::new();
    let path = s.path("grow.qcow2");
    // 512-byte clusters, 16-bit refcounts: one table cluster covers only 64 MiB of file.
    create_file(&path, 96 << 20, 512, None);
    let img = open_rw(&path);
    let chunk = pattern(1 << 20, 3);
    for i in 0..80u64 {
        img.write_at(&chunk, i << 20).unwrap();
    }
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    qemu_io(&path, "qcow2", &["read -v 0 16"]);
    let img = open_ro(&path);
    let mut b = vec![0u8; 1 << 20];
    img.read_at(&mut b, 79 << 20).unwrap();
    assert_eq!(b, chunk);
}

#[test]
fn writes_from_several_threads_at_once_all_land() {
    let s = Scratch::new();
    let path = s.path("mt.qcow2");
    create_file(&path, 16 << 20, 65536, None);
    let img = open_rw(&path);
    std::thread::scope(|sc| {
        for t in 0..4u8 {
            let img = &img;
            sc.spawn(move || {
                // Interleaved, overlapping clusters: 48 KiB pieces straddle cluster borders.
                for i in 0..64u64 {
                    let off = (i * 4 + u64::from(t)) * 49152;
                    if off + 49152 <= 16 << 20 {
                        img.write_at(&vec![t + 1; 49152], off).unwrap();
                    }
                }
            });
        }
    });
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    let img = open_ro(&path);
    let data = our_contents(&img);
    for (i, piece) in data.chunks(49152).enumerate() {
        let t = (i % 4) as u8;
        if (i as u64 + 1) * 49152 <= 16 << 20 && i < 256 {
            assert!(piece.iter().all(|&b| b == t + 1), "piece {i}");
        }
    }
}

#[test]
fn reads_and_writes_beyond_the_disk_are_refused() {
    let s = Scratch::new();
    let path = s.path("small.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let img = open_rw(&path);
    assert!(matches!(
        img.write_at(&[1; 2], (1 << 20) - 1),
        Err(qcow2::Error::InvalidArgument(_))
    ));
    let mut b = [0u8; 1];
    assert!(matches!(
        img.read_at(&mut b, 1 << 20),
        Err(qcow2::Error::InvalidArgument(_))
    ));
}

#[test]
fn read_only_images_refuse_writes() {
    let s = Scratch::new();
    let path = s.path("ro.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let img = open_ro(&path);
    assert!(matches!(img.write_at(&[1], 0), Err(qcow2::Error::ReadOnly)));
}

#[test]
fn corrupt_images_open_read_only_but_refuse_writing() {
    let s = Scratch::new();
    let path = s.path("corrupt.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[79] |= 2; // incompatible feature bit 1: corrupt
    std::fs::write(&path, bytes).unwrap();
    assert!(open_ro(&path).info().corrupt);
    assert!(matches!(
        Image::open_file(&path, false),
        Err(qcow2::Error::Corrupt)
    ));
}

#[test]
fn discard_frees_whole_clusters_only() {
    let s = Scratch::new();
    let path = s.path("d.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let img = open_rw(&path);
    img.write_at(&[7; 1 << 20], 0).unwrap();
    img.discard(1000, 200_000).unwrap();
    img.flush().unwrap();
    assert_eq!(img.block_status(0, 65536).unwrap().0, Allocation::Data);
    // As QEMU's (non-full) discard: a data cluster becomes a zero cluster.
    assert_eq!(
        img.block_status(65536, 131072).unwrap(),
        (Allocation::Zero, 131072)
    );
    assert_eq!(img.block_status(196608, 65536).unwrap().0, Allocation::Data);
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
}

/// `(start, length, zero, has a host offset)` of each qemu-img map entry.
fn zero_map(path: &std::path::Path) -> Vec<(u64, u64, bool, bool)> {
    let map = json("qemu-img", &["map", "--output=json", p(path)]);
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["zero"] == true,
                e.get("offset").is_some(),
            )
        })
        .collect()
}

#[test]
fn zeroes_keep_their_data_clusters_unless_unmapping_as_qemu_maps_them() {
    let s = Scratch::new();
    let path = s.path("z.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let img = open_rw(&path);
    img.write_at(&[7; 1 << 20], 0).unwrap();
    img.write_zeroes_unmap(0, 128 << 10).unwrap();
    img.write_zeroes(128 << 10, 128 << 10).unwrap();
    // Unallocated clusters become zero clusters either way (QEMU sets the zero flag).
    img.discard(512 << 10, 512 << 10).unwrap();
    img.write_zeroes(512 << 10, 128 << 10).unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    // What `qemu-io -c 'write -z -u 0 128k' -c 'write -z 128k 128k'` makes of the same image
    // (opened with discard=unmap): unmapped zeroes have no host offset, kept ones do.
    assert_eq!(
        zero_map(&path),
        vec![
            (0, 128 << 10, true, false),
            (128 << 10, 128 << 10, true, true),
            (256 << 10, 256 << 10, false, true),
            (512 << 10, 512 << 10, true, false),
        ]
    );
}

#[test]
fn odd_disk_sizes_are_rounded_to_sectors_and_written_to_the_last_byte() {
    let s = Scratch::new();
    for asked in [0u64, 1, 511, 65535, 65537, (1 << 30) + 12345] {
        let path = s.path(&format!("odd{asked}.qcow2"));
        create_file(&path, asked, 65536, None);
        let size = asked.next_multiple_of(512);
        let img = open_rw(&path);
        assert_eq!(img.size(), size);
        if size > 0 {
            img.write_at(&[0xee], size - 1).unwrap();
            img.write_zeroes(0, (size - 1).min(70_000)).unwrap();
        }
        img.close().unwrap();
        drop(img);
        assert_check_clean(&path);
        let info = json("qemu-img", &["info", "--output=json", p(&path)]);
        assert_eq!(info["virtual-size"], size);
        if size > 0 {
            qemu_io(&path, "qcow2", &[&format!("read -P 0xee {} 1", size - 1)]);
        }
    }
}

#[test]
fn far_apart_writes_in_a_huge_image_use_separate_l2_tables() {
    let s = Scratch::new();
    let path = s.path("huge.qcow2");
    create_file(&path, 2 << 40, 65536, None);
    let img = open_rw(&path);
    for (i, off) in [0u64, 1 << 39, (1 << 40) + 65536 * 3, (2 << 40) - 4096]
        .into_iter()
        .enumerate()
    {
        img.write_at(&[i as u8 + 1; 4096], off).unwrap();
    }
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    qemu_io(
        &path,
        "qcow2",
        &[
            "read -P 1 0 4k",
            "read -P 2 512G 4k",
            "read -P 3 1099511824384 4k",
            "read -P 4 2199023251456 4k",
        ],
    );
}

#[test]
fn images_are_shareable_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Image>();
}

#[test]
fn a_dirty_image_from_lazy_refcounts_gets_its_refcounts_rebuilt() {
    let s = Scratch::new();
    let path = s.path("lazy.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p(&path),
            "4M",
        ],
    );
    run("qemu-img", &["snapshot", "-c", "snap", p(&path)]);
    // qemu-io dies without updating the refcounts of what it wrote.
    let _ = run_status(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x12 0 1M",
            "-c",
            "write -P 0x13 2M 64k",
            "-c",
            "sigraise 9",
            p(&path),
        ],
    );
    assert!(open_ro(&path).info().version == 3);
    let (code, _) = run_status("qemu-img", &["check", p(&path)]);
    assert_eq!(code, 2, "the dirty image has refcount errors");
    let img = open_rw(&path);
    img.write_at(&[0x14; 4096], 3 << 20).unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    let info = json("qemu-img", &["info", "--output=json", p(&path)]);
    assert_eq!(info["dirty-flag"], false);
    qemu_io(
        &path,
        "qcow2",
        &[
            "read -P 0x12 0 1M",
            "read -P 0x13 2M 64k",
            "read -P 0x14 3M 4k",
        ],
    );
}

#[test]
fn the_backing_file_can_be_changed_and_removed() {
    let s = Scratch::new();
    let a = s.path("a.raw");
    std::fs::write(&a, vec![0xaa; 1 << 20]).unwrap();
    let b = s.path("b.raw");
    std::fs::write(&b, vec![0xbb; 1 << 20]).unwrap();
    let top = s.path("top.qcow2");
    create_file(&top, 1 << 20, 65536, Some(("a.raw", "raw")));
    let img = open_rw(&top);
    img.write_at(&[1; 4096], 0).unwrap();
    img.set_backing_file(Some(("b.raw", "raw"))).unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&top);
    qemu_io(
        &top,
        "qcow2",
        &[
            "read -P 1 0 4k",
            "read -P 0xaa 4k 60k", // copied from the old backing file with the first write
            "read -P 0xbb 64k 960k",
        ],
    );

    let img = open_rw(&top);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 128 << 10).unwrap();
    assert_eq!(buf, vec![0xbb; 4096]);
    img.set_backing_file(None).unwrap();
    img.set_backing(None);
    img.read_at(&mut buf, 128 << 10).unwrap();
    assert_eq!(buf, vec![0; 4096]);
    img.close().unwrap();
    drop(img);
    assert_check_clean(&top);
    let info = json("qemu-img", &["info", "--output=json", p(&top)]);
    assert!(info.get("backing-filename").is_none(), "{info}");
}

#[test]
fn reads_during_writes_see_old_or_new_bytes_only() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Scratch::new();
    let path = s.path("rw.qcow2");
    let size: u64 = 8 << 20;
    create_file(&path, size, 65536, None);
    let img = open_rw(&path);
    let piece = 49152u64;
    let pieces = size / piece;
    // Piece i is written with byte (i % 200) + 1 only; before that it reads as zeros.
    let expected = |i: u64| (i % 200) as u8 + 1;
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let img = &img;
                sc.spawn(move || {
                    for i in (t..pieces).step_by(2) {
                        img.write_at(&vec![expected(i); piece as usize], i * piece)
                            .unwrap();
                    }
                })
            })
            .collect();
        for r in 0..2u64 {
            let (img, done) = (&img, &done);
            sc.spawn(move || {
                let mut buf = vec![0u8; 200_000];
                let mut off = r * 77_777;
                while !done.load(Ordering::Acquire) {
                    let len = (buf.len() as u64).min(size - off);
                    img.read_at(&mut buf[..len as usize], off).unwrap();
                    for (k, &b) in buf[..len as usize].iter().enumerate() {
                        let i = (off + k as u64) / piece;
                        assert!(
                            b == 0 || b == expected(i),
                            "byte {} reads {b}",
                            off + k as u64
                        );
                    }
                    off = (off + 1_234_567) % (size - 1);
                }
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
    });
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
}

/// Cluster contents that deflate well (repeating text with a counter).
fn compressible(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(format!("cluster {seed} line {i} of text\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Bytes that do not deflate (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn compressed_clusters_are_packed_read_back_and_accepted_by_qemu_img() {
    let s = Scratch::new();
    for cs in [4096u32, 65536] {
        let path = s.path(&format!("c{cs}.qcow2"));
        // The last cluster is partial: the disk ends 1024 bytes into it.
        let size = 16 * u64::from(cs) + 1024;
        create_file(&path, size, cs, None);
        let img = open_rw(&path);
        let c = u64::from(cs);
        let mut reference = vec![0u8; size as usize];
        let mut put = |img: &Image, data: Vec<u8>, off: u64| {
            img.write_compressed(&data, off).unwrap();
            reference[off as usize..off as usize + data.len()].copy_from_slice(&data);
        };
        for i in 0..8 {
            put(&img, compressible(cs as usize, i as u8), i * c);
        }
        // Does not shrink: written uncompressed, as QEMU does.
        put(&img, noise(cs as usize), 9 * c);
        // Overwrites a compressed cluster with another one.
        put(&img, compressible(cs as usize, 42), 2 * c);
        put(&img, compressible(1024, 7), 16 * c);
        // A plain write into a compressed cluster rewrites it uncompressed.
        img.write_at(&pattern(100, 3), 3 * c + 10).unwrap();
        reference[3 * cs as usize + 10..3 * cs as usize + 110].copy_from_slice(&pattern(100, 3));
        assert!(img.write_compressed(&pattern(10, 1), 5 * c + 1).is_err());
        assert_eq!(
            our_contents(&img),
            reference,
            "cluster size {cs}, before close"
        );
        img.close().unwrap();
        drop(img);
        assert_check_clean(&path);
        assert_same_as_reference(&s, &path, &reference);
        let img = open_ro(&path);
        assert_eq!(our_contents(&img), reference, "cluster size {cs}, reopened");
        let map = json("qemu-img", &["map", "--output=json", p(&path)]);
        let compressed: Vec<_> = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["compressed"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect();
        // Clusters 0-1, 2 (rewritten), 4-7 and the partial last one; 3 was rewritten
        // uncompressed, 9 never compressed.
        let want = vec![(0, 3 * c), (4 * c, 4 * c), (16 * c, 1024)];
        assert_eq!(compressed, want, "cluster size {cs}: {map}");
        // Packed: the file is far smaller than the 11 clusters written would take.
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len < 10 * c, "cluster size {cs}: file of {len} bytes");
    }
}
