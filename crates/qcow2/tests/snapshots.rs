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

/// A file whose writes stop reaching it after the first `limit` (a crash at that point).
struct CrashingFile {
    file: std::fs::File,
    writes: std::sync::atomic::AtomicUsize,
    limit: std::sync::atomic::AtomicUsize,
}

impl qcow2::Storage for CrashingFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        qcow2::Storage::read_at(&self.file, buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let n = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n >= self.limit.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("simulated crash"));
        }
        qcow2::Storage::write_at(&self.file, buf, off)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        qcow2::Storage::len(&self.file)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.writes.load(std::sync::atomic::Ordering::SeqCst)
            >= self.limit.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::other("simulated crash"));
        }
        qcow2::Storage::set_len(&self.file, len)
    }
}

/// Open `path` on a [`CrashingFile`], take snapshot "second" letting only `limit` of its
/// writes through, and drop the image; returns how many writes the snapshot attempted and
/// whether it succeeded.
fn snapshot_with_crash_after(path: &std::path::Path, limit: usize) -> (usize, bool) {
    use std::sync::atomic::Ordering::SeqCst;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let st = std::sync::Arc::new(CrashingFile {
        file,
        writes: std::sync::atomic::AtomicUsize::new(0),
        limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
    });
    let img = qcow2::Image::open(st.clone(), false, None).unwrap();
    let before = st.writes.load(SeqCst);
    st.limit.store(before.saturating_add(limit), SeqCst);
    let ok = img.create_snapshot("second").is_ok();
    let done = st.writes.load(SeqCst) - before;
    drop(img);
    (done, ok)
}

#[test]
fn a_crash_at_any_write_of_snapshot_creation_leaves_a_consistent_image() {
    let s = Scratch::new();
    let template = s.path("template.qcow2");
    // Several L2 tables, an existing snapshot (shared clusters, a snapshot table to replace)
    // and clusters written since (COPIED set on some, clear on others).
    create_file(&template, 4 << 20, 4096, None);
    let img = open_rw(&template);
    img.write_at(&pattern(4 << 20, 1), 0).unwrap();
    img.create_snapshot("first").unwrap();
    img.write_at(&pattern(300_000, 2), 1_000_000).unwrap();
    img.write_at(&pattern(5000, 3), 3 << 20).unwrap();
    let data = our_contents(&img);
    let mut first = vec![0u8; 4 << 20];
    img.read_snapshot("first", &mut first, 0).unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&template);
    let writes_from_open = {
        let probe = s.path("probe.qcow2");
        std::fs::copy(&template, &probe).unwrap();
        let (n, ok) = snapshot_with_crash_after(&probe, usize::MAX);
        assert!(ok);
        assert_check_clean(&probe);
        n
    };
    assert!(writes_from_open > 0);
    for limit in 0..=writes_from_open + 1 {
        let path = s.path(&format!("crash{limit}.qcow2"));
        std::fs::copy(&template, &path).unwrap();
        let (_, ok) = snapshot_with_crash_after(&path, limit);
        assert_eq!(ok, limit >= writes_from_open, "crash after {limit} writes");
        let (code, out) = run_status("qemu-img", &["check", p(&path)]);
        assert!(
            code == 0 || code == 3,
            "crash after {limit} writes: qemu-img check:\n{out}"
        );
        let img = open_rw(&path);
        let names: Vec<String> = img.snapshots().into_iter().map(|i| i.name).collect();
        assert!(
            names == ["first"] || names == ["first", "second"],
            "crash after {limit} writes: snapshots {names:?}"
        );
        assert_eq!(our_contents(&img), data, "crash after {limit} writes");
        let mut buf = vec![0u8; 4 << 20];
        img.read_snapshot("first", &mut buf, 0).unwrap();
        assert_eq!(buf, first, "crash after {limit} writes");
        if names.len() == 2 {
            img.read_snapshot("second", &mut buf, 0).unwrap();
            assert_eq!(buf, data, "crash after {limit} writes");
        }
        img.close().unwrap();
    }
}

#[test]
fn a_snapshot_keeps_persistent_bitmaps_referenced() {
    let s = Scratch::new();
    let path = s.path("bm.qcow2");
    create_file(&path, 4 << 20, 65536, None);
    qemu_io(&path, "qcow2", &["write -P 7 0 1M"]);
    run("qemu-img", &["bitmap", "--add", p(&path), "tracking"]);
    let img = open_rw(&path);
    img.write_at(&[9; 70_000], 2 << 20).unwrap();
    img.create_snapshot("s").unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    let info = json("qemu-img", &["info", "--output=json", p(&path)]);
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "tracking", "{info}");
    qemu_io(&path, "qcow2", &["read -P 7 0 1M", "read -P 9 2M 70000"]);
}
