//! Internal snapshots interoperate with qemu-img in both directions.

mod common;
use common::*;

#[test]
fn our_snapshots_are_listed_and_applied_by_qemu_img() {
    let s = Scratch::new();
    let path = s.path("snap.qcow2");
    create_file(&path, 4 << 20, 65536, None);
    let img = open_rw(&path);
    img.write_at(&[0x11; 2 << 20], 0).unwrap();
    let first = img.create_snapshot("before").unwrap();
    assert_eq!(first.id, "1");
    // Overwrite part of the shared data: copy-on-write of data clusters and of the L2 table.
    img.write_at(&[0x22; 100_000], 50_000).unwrap();
    img.write_at(&[0x33; 65536], 3 << 20).unwrap();
    let second = img.create_snapshot("after").unwrap();
    assert_eq!(second.id, "2");
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    let list = run("qemu-img", &["snapshot", "-l", p(&path)]);
    assert!(list.contains("before") && list.contains("after"), "{list}");

    run("qemu-img", &["snapshot", "-a", "before", p(&path)]);
    assert_check_clean(&path);
    qemu_io(&path, "qcow2", &["read -P 0x11 0 2M", "read -P 0 2M 2M"]);
    run("qemu-img", &["snapshot", "-a", "after", p(&path)]);
    qemu_io(
        &path,
        "qcow2",
        &[
            "read -P 0x11 0 50000",
            "read -P 0x22 50000 100000",
            "read -P 0x33 3M 64k",
        ],
    );
    assert_check_clean(&path);
}

#[test]
fn snapshot_contents_read_back_after_the_disk_changed() {
    let s = Scratch::new();
    let path = s.path("snap.qcow2");
    create_file(&path, 1 << 20, 4096, None);
    let img = open_rw(&path);
    img.write_at(&pattern(1 << 20, 1), 0).unwrap();
    img.create_snapshot("s").unwrap();
    img.write_at(&pattern(1 << 19, 2), 1000).unwrap();
    img.write_zeroes(600_000, 100_000).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    img.read_snapshot("s", &mut buf, 0).unwrap();
    assert_eq!(buf, pattern(1 << 20, 1));
    img.read_snapshot("1", &mut buf, 0).unwrap();
    assert_eq!(buf, pattern(1 << 20, 1));
    assert!(matches!(
        img.read_snapshot("nope", &mut buf, 0),
        Err(qcow2::Error::NotFound(_))
    ));
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
}

#[test]
fn qemu_img_snapshots_are_listed_with_their_fields_and_deleted_by_us() {
    let s = Scratch::new();
    let path = s.path("q.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "2M"]);
    qemu_io(&path, "qcow2", &["write -P 0x41 0 2M"]);
    run("qemu-img", &["snapshot", "-c", "one", p(&path)]);
    qemu_io(&path, "qcow2", &["write -P 0x42 0 1M"]);
    run("qemu-img", &["snapshot", "-c", "two", p(&path)]);
    qemu_io(&path, "qcow2", &["write -P 0x43 512k 1M"]);

    let img = open_rw(&path);
    let snaps = img.snapshots();
    assert_eq!(
        snaps
            .iter()
            .map(|s| (s.id.as_str(), s.name.as_str()))
            .collect::<Vec<_>>(),
        [("1", "one"), ("2", "two")]
    );
    let listed = json("qemu-img", &["info", "--output=json", "-U", p(&path)]);
    let theirs = listed["snapshots"].as_array().unwrap();
    for (ours, theirs) in snaps.iter().zip(theirs) {
        assert_eq!(theirs["id"], ours.id.as_str());
        assert_eq!(theirs["date-sec"], ours.date_sec);
        assert_eq!(theirs["date-nsec"], ours.date_nsec);
        assert_eq!(theirs["vm-state-size"], ours.vm_state_size);
        assert_eq!(theirs["vm-clock-nsec"], ours.vm_clock_nsec);
        assert_eq!(ours.disk_size, 2 << 20);
        assert_eq!(ours.icount, theirs["icount"].as_u64());
    }
    img.delete_snapshot("one").unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    let list = run("qemu-img", &["snapshot", "-l", p(&path)]);
    assert!(!list.contains("one") && list.contains("two"), "{list}");
    qemu_io(
        &path,
        "qcow2",
        &[
            "read -P 0x42 0 512k",
            "read -P 0x43 512k 1M",
            "read -P 0x41 1536k 512k",
        ],
    );

    let img = open_rw(&path);
    img.delete_snapshot("2").unwrap();
    img.close().unwrap();
    drop(img);
    let out = assert_check_clean(&path);
    assert!(!out.contains("leaked"), "{out}");
    assert!(
        run("qemu-img", &["snapshot", "-l", p(&path)])
            .trim()
            .is_empty()
    );
}

#[test]
fn snapshot_names_must_be_unique() {
    let s = Scratch::new();
    let path = s.path("u.qcow2");
    create_file(&path, 1 << 20, 65536, None);
    let img = open_rw(&path);
    img.create_snapshot("a").unwrap();
    assert!(matches!(
        img.create_snapshot("a"),
        Err(qcow2::Error::InvalidArgument(_))
    ));
}
