//! Persistent dirty bitmaps interoperate with qemu-img / qemu-io in both directions.

mod common;
use common::*;
use qcow2::PersistentBitmap;

fn info_bitmaps(path: &std::path::Path) -> Vec<serde_json::Value> {
    let info = json("qemu-img", &["info", "--output=json", "-U", p(path)]);
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn set_bits(b: &PersistentBitmap) -> Vec<u64> {
    (0..b.bits.len() as u64 * 8)
        .filter(|&i| b.is_set(i))
        .collect()
}

#[test]
fn bitmaps_made_by_qemu_load_with_their_flags_and_bits() {
    let s = Scratch::new();
    let path = s.path("b.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "4M"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", p(&path), "tracking"],
    );
    run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            "131072",
            "--disable",
            p(&path),
            "frozen",
        ],
    );
    qemu_io(&path, "qcow2", &["write 0 4k", "write 1M 65537"]);
    let img = open_ro(&path);
    let bitmaps = img.bitmaps();
    assert_eq!(bitmaps.len(), 2);
    let t = &bitmaps[0];
    assert_eq!(
        (t.name.as_str(), t.granularity, t.enabled, t.in_use),
        ("tracking", 65536, true, false)
    );
    assert_eq!(set_bits(t), vec![0, 16, 17]);
    let f = &bitmaps[1];
    assert_eq!(
        (f.name.as_str(), f.granularity, f.enabled, f.in_use),
        ("frozen", 131072, false, false)
    );
    assert!(set_bits(f).is_empty());
}

#[test]
fn a_bitmap_enabled_by_qemu_img_tracks_later_writes() {
    let s = Scratch::new();
    let path = s.path("e.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "4M"]);
    run("qemu-img", &["bitmap", "--add", "--disable", p(&path), "b"]);
    qemu_io(&path, "qcow2", &["write 0 64k"]);
    run("qemu-img", &["bitmap", "--enable", p(&path), "b"]);
    qemu_io(&path, "qcow2", &["write 2M 64k"]);
    let bitmaps = open_ro(&path).bitmaps();
    assert!(bitmaps[0].enabled);
    assert_eq!(set_bits(&bitmaps[0]), vec![32]);
}

#[test]
fn stored_bitmaps_are_listed_by_qemu_img_and_copied_by_it_bit_for_bit() {
    let s = Scratch::new();
    let path = s.path("ours.qcow2");
    create_file(&path, 64 << 20, 65536, None);
    let img = open_rw(&path);
    let mut a = PersistentBitmap::new("a", 65536, true, 64 << 20);
    for i in [0, 1, 7, 8, 500, 1023] {
        a.set(i);
    }
    let mut b = PersistentBitmap::new("b", 512, false, 64 << 20);
    for i in (0..131072).step_by(3) {
        b.set(i);
    }
    img.store_bitmaps(&[a.clone(), b.clone()]).unwrap();
    img.close().unwrap();
    drop(img);
    assert_check_clean(&path);
    let listed = info_bitmaps(&path);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["name"], "a");
    assert_eq!(listed[0]["granularity"], 65536);
    assert_eq!(listed[0]["flags"], serde_json::json!(["auto"]));
    assert_eq!(listed[1]["name"], "b");
    assert_eq!(listed[1]["flags"], serde_json::json!([]));
    // QEMU parses our bits: its copy, read back by us, has the same bits.
    let copy = s.path("copy.qcow2");
    run(
        "qemu-img",
        &["convert", "--bitmaps", "-O", "qcow2", p(&path), p(&copy)],
    );
    let theirs = open_ro(&copy).bitmaps();
    assert_eq!(set_bits(&theirs[0]), set_bits(&a));
    assert_eq!(set_bits(&theirs[1]), set_bits(&b));
    assert_eq!(open_ro(&path).bitmaps(), vec![a, b]);
}

#[test]
fn bitmaps_are_marked_in_use_while_the_image_is_open_for_writing() {
    let s = Scratch::new();
    let path = s.path("u.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "4M"]);
    run("qemu-img", &["bitmap", "--add", p(&path), "live"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--disable", p(&path), "cold"],
    );
    let img = open_rw(&path);
    assert!(
        info_bitmaps(&path)
            .iter()
            .all(|b| b["flags"].as_array().unwrap().contains(&"in-use".into()))
    );
    img.write_at(&[1; 512], 0).unwrap();
    img.close().unwrap();
    drop(img);
    // Written without storing: the enabled bitmap's bits are stale, the disabled one's are not.
    let listed = info_bitmaps(&path);
    assert!(
        listed[0]["flags"]
            .as_array()
            .unwrap()
            .contains(&"in-use".into()),
        "{listed:?}"
    );
    assert_eq!(listed[1]["flags"], serde_json::json!([]));
}

#[test]
fn bitmaps_opened_and_closed_without_writes_stay_consistent() {
    let s = Scratch::new();
    let path = s.path("c.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "4M"]);
    run("qemu-img", &["bitmap", "--add", p(&path), "b"]);
    let img = open_rw(&path);
    img.close().unwrap();
    drop(img);
    assert_eq!(info_bitmaps(&path)[0]["flags"], serde_json::json!(["auto"]));
    assert_check_clean(&path);
}

#[test]
fn bitmaps_without_the_autoclear_bit_are_ignored_and_dropped() {
    let s = Scratch::new();
    let path = s.path("a.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", p(&path), "4M"]);
    run("qemu-img", &["bitmap", "--add", p(&path), "b"]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[95] &= !1; // autoclear bit 0: bitmaps extension consistent
    std::fs::write(&path, bytes).unwrap();
    assert!(open_ro(&path).bitmaps().is_empty());
    let img = open_rw(&path);
    img.close().unwrap();
    drop(img);
    assert!(info_bitmaps(&path).is_empty());
    let (code, out) = run_status("qemu-img", &["check", p(&path)]);
    assert!(code == 0 || code == 3, "only leaks allowed: {out}");
}

#[test]
fn storing_no_bitmaps_removes_them_and_frees_their_clusters() {
    let s = Scratch::new();
    let path = s.path("r.qcow2");
    create_file(&path, 4 << 20, 65536, None);
    let img = open_rw(&path);
    let mut b = PersistentBitmap::new("x", 65536, true, 4 << 20);
    b.set(3);
    img.store_bitmaps(&[b]).unwrap();
    img.store_bitmaps(&[]).unwrap();
    img.close().unwrap();
    drop(img);
    assert!(info_bitmaps(&path).is_empty());
    let out = assert_check_clean(&path);
    assert!(!out.contains("leaked"), "{out}");
}

#[test]
fn bitmaps_of_the_wrong_size_are_refused() {
    let s = Scratch::new();
    let path = s.path("w.qcow2");
    create_file(&path, 4 << 20, 65536, None);
    let img = open_rw(&path);
    let b = PersistentBitmap::new("x", 65536, true, 8 << 20);
    assert!(matches!(
        img.store_bitmaps(&[b]),
        Err(qcow2::Error::InvalidArgument(_))
    ));
}

#[test]
fn bits_past_the_end_of_the_disk_are_stored_as_zeros() {
    let s = Scratch::new();
    let path = s.path("tail.qcow2");
    // 3 bits of 64 KiB granularity: the byte's 5 upper bits lie past the disk.
    create_file(&path, 3 * 65536, 65536, None);
    let img = open_rw(&path);
    let mut b = PersistentBitmap::new("t", 65536, true, 3 * 65536);
    b.bits[0] = 0xff;
    img.store_bitmaps(&[b]).unwrap();
    img.close().unwrap();
    drop(img);
    assert_eq!(open_ro(&path).bitmaps()[0].bits, vec![0x07]);
    assert_check_clean(&path);
}

#[test]
fn bitmaps_with_unknown_extra_data_are_kept_but_not_used() {
    let s = Scratch::new();
    let path = s.path("extra.qcow2");
    create_file(&path, 4 << 20, 65536, None);
    let img = open_rw(&path);
    let mut b = PersistentBitmap::new("strange", 65536, true, 4 << 20);
    b.set(1);
    img.store_bitmaps(&[b]).unwrap();
    img.close().unwrap();
    drop(img);
    // Give the directory entry 8 bytes of extra data without the extra_data_compatible flag.
    let mut bytes = std::fs::read(&path).unwrap();
    let hdr = 0x2385_2875u32.to_be_bytes();
    let at = bytes[..4096].windows(4).position(|w| w == hdr).unwrap();
    let dir_size_at = at + 8 + 8;
    let dir_off = u64::from_be_bytes(bytes[at + 8 + 16..at + 8 + 24].try_into().unwrap()) as usize;
    let entry = bytes[dir_off..dir_off + 32].to_vec();
    let name_len = u16::from_be_bytes([entry[18], entry[19]]) as usize;
    let mut new_entry = entry[..24].to_vec();
    new_entry[20..24].copy_from_slice(&8u32.to_be_bytes());
    new_entry.extend_from_slice(&[0xee; 8]);
    new_entry.extend_from_slice(&bytes[dir_off + 24..dir_off + 24 + name_len]);
    new_entry.resize(new_entry.len().div_ceil(8) * 8, 0);
    bytes[dir_off..dir_off + new_entry.len()].copy_from_slice(&new_entry);
    bytes[dir_size_at..dir_size_at + 8].copy_from_slice(&(new_entry.len() as u64).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let img = open_rw(&path);
    assert!(img.bitmaps().is_empty());
    img.store_bitmaps(&[PersistentBitmap::new("mine", 65536, false, 4 << 20)])
        .unwrap();
    img.close().unwrap();
    drop(img);
    // QEMU itself refuses such images, so look for ourselves: both bitmaps are stored.
    let bytes = std::fs::read(&path).unwrap();
    let at = bytes[..4096].windows(4).position(|w| w == hdr).unwrap();
    assert_eq!(
        u32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
        2
    );
    let names: Vec<_> = open_ro(&path)
        .bitmaps()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["mine"]);
}
