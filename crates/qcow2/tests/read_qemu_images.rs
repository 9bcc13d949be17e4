//! Images made by qemu-img / qemu-io read back byte for byte as QEMU reads them.

mod common;
use common::*;

fn make_and_fill(s: &Scratch, name: &str, opts: &str) -> std::path::PathBuf {
    let path = s.path(name);
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", opts, p(&path), "4M"],
    );
    qemu_io(
        &path,
        "qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 100k 3k",
            "write -P 0x33 1M 512k",
            "write -P 0x44 4190208 4096",
        ],
    );
    path
}

#[test]
fn version3_images_read_like_qemu_for_every_cluster_size() {
    let s = Scratch::new();
    for cs in ["512", "4k", "64k", "2M"] {
        let path = make_and_fill(
            &s,
            &format!("v3-{cs}.qcow2"),
            &format!("compat=1.1,cluster_size={cs}"),
        );
        let img = open_ro(&path);
        assert_eq!(
            our_contents(&img),
            qemu_contents(&path, &s),
            "cluster size {cs}"
        );
    }
}

#[test]
fn version2_images_read_like_qemu() {
    let s = Scratch::new();
    let path = make_and_fill(&s, "v2.qcow2", "compat=0.10,cluster_size=4k");
    let img = open_ro(&path);
    assert_eq!(img.info().version, 2);
    assert_eq!(our_contents(&img), qemu_contents(&path, &s));
}

#[test]
fn version2_images_cannot_be_opened_for_writing() {
    let s = Scratch::new();
    let path = make_and_fill(&s, "v2.qcow2", "compat=0.10");
    let err = qcow2::Image::open_file(&path, false).err().unwrap();
    assert!(matches!(err, qcow2::Error::Unsupported(_)), "{err}");
}

#[test]
fn refcount_widths_other_than_16_bits_read_like_qemu() {
    let s = Scratch::new();
    for bits in ["1", "8", "64"] {
        let path = make_and_fill(
            &s,
            &format!("rc{bits}.qcow2"),
            &format!("refcount_bits={bits}"),
        );
        let img = open_ro(&path);
        assert_eq!(img.info().refcount_bits, bits.parse::<u32>().unwrap());
        assert_eq!(our_contents(&img), qemu_contents(&path, &s));
    }
}

#[test]
fn zero_clusters_read_as_zeros() {
    let s = Scratch::new();
    let path = s.path("z.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "1M"]);
    qemu_io(
        &path,
        "qcow2",
        &[
            "write -P 0x55 0 1M",
            "write -z 64k 128k",
            "write -z -u 512k 64k",
        ],
    );
    let img = open_ro(&path);
    let data = our_contents(&img);
    assert_eq!(data, qemu_contents(&path, &s));
    assert!(data[64 << 10..192 << 10].iter().all(|&b| b == 0));
    assert_eq!(
        img.block_status(64 << 10, 128 << 10).unwrap(),
        (qcow2::Allocation::Zero, 128 << 10)
    );
}

#[test]
fn compressed_clusters_read_like_qemu() {
    let s = Scratch::new();
    let src = s.path("src.raw");
    let mut data = pattern(3 << 20, 9);
    data[1 << 20..2 << 20].fill(0);
    data[(2 << 20) + 5000..(2 << 20) + 9000].fill(0xab);
    std::fs::write(&src, &data).unwrap();
    for cs in ["4k", "64k"] {
        let path = s.path(&format!("c-{cs}.qcow2"));
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
                &format!("cluster_size={cs}"),
                p(&src),
                p(&path),
            ],
        );
        let img = open_ro(&path);
        assert_eq!(our_contents(&img), data, "cluster size {cs}");
    }
}

#[test]
fn unallocated_clusters_fall_through_a_backing_chain() {
    let s = Scratch::new();
    let base = s.path("base.raw");
    std::fs::write(&base, pattern(2 << 20, 3)).unwrap();
    let mid = s.path("mid.qcow2");
    let top = s.path("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            p(&mid),
        ],
    );
    qemu_io(
        &mid,
        "qcow2",
        &["write -P 0x66 64k 64k", "write -z 512k 64k"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&mid),
            "-F",
            "qcow2",
            p(&top),
            "3M",
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x77 100k 8k", "write -P 0x78 2560k 4k"],
    );
    let img = open_ro(&top);
    assert_eq!(img.size(), 3 << 20);
    assert_eq!(our_contents(&img), qemu_contents(&top, &s));
}

#[test]
fn backing_format_is_probed_when_the_header_does_not_name_it() {
    let s = Scratch::new();
    let base = s.path("base.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&base), "1M"]);
    qemu_io(&base, "qcow2", &["write -P 0x21 0 1M"]);
    let top = s.path("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    // Turn the backing format extension into an unknown one: no format recorded.
    let mut bytes = std::fs::read(&top).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&top, bytes).unwrap();
    let img = open_ro(&top);
    assert_eq!(img.backing_file().unwrap().1, None);
    assert!(our_contents(&img).iter().all(|&b| b == 0x21));
}

#[test]
fn a_missing_backing_file_is_a_clear_error() {
    let s = Scratch::new();
    let top = s.path("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nothere.qcow2",
            "-F",
            "qcow2",
            p(&top),
            "1M",
        ],
    );
    let err = qcow2::Image::open_file(&top, true).err().unwrap();
    assert!(matches!(err, qcow2::Error::Backing { .. }), "{err}");
    assert!(err.to_string().contains("nothere.qcow2"));
}

#[test]
fn unknown_header_fields_are_kept_when_the_header_is_rewritten() {
    let s = Scratch::new();
    let path = s.path("long.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    // Grow the header to 120 bytes with a field we do not know, moving the extensions along.
    let mut bytes = std::fs::read(&path).unwrap();
    let tail = bytes[112..4096].to_vec();
    bytes[100..104].copy_from_slice(&120u32.to_be_bytes());
    bytes[112..120].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x2a]);
    bytes[120..4096].copy_from_slice(&tail[..4096 - 120]);
    std::fs::write(&path, &bytes).unwrap();
    let img = open_rw(&path);
    img.create_snapshot("rewrites the header").unwrap();
    img.close().unwrap();
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[100..104], &120u32.to_be_bytes());
    assert_eq!(bytes[119], 0x2a);
    assert_check_clean(&path);
}
