//! Metadata overlap protection (QEMU's `overlap-check`): on images damaged the ways a hostile
//! or broken file can be, a write that would land on the image's own metadata is refused, the
//! image is marked corrupt (once, with the listener told), no more I/O is accepted, and the
//! metadata stays byte for byte as it was. Each image is made by qemu-img/qemu-io and then
//! edited, as QEMU's iotest 060 does.

mod common;

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use qcow2::{Corruption, Error, Image, Metadata, OverlapChecks, Storage};

const CS: u64 = 65536;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Header fields: (L1 offset, refcount table offset, refcount table clusters).
fn layout(path: &Path) -> (u64, u64) {
    let h = std::fs::read(path).unwrap();
    (be64(&h, 40), be64(&h, 48))
}

fn poke(path: &Path, off: u64, value: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &value.to_be_bytes(), off).unwrap();
}

fn peek(path: &Path, off: u64) -> u64 {
    let f = File::open(path).unwrap();
    let mut b = [0u8; 8];
    Storage::read_at(&f, &mut b, off).unwrap();
    u64::from_be_bytes(b)
}

/// A 1 MiB image with 64 KiB of data at guest offset 0 (its L2 table at 0x40000).
fn image_with_data(s: &Scratch) -> std::path::PathBuf {
    let path = s.path("t.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&path), "1M"]);
    qemu_io(&path, "qcow2", &["write -P 0x22 0 64k"]);
    path
}

type Seen = Arc<Mutex<Vec<Corruption>>>;

fn open_rw(path: &Path) -> (Image, Seen) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let image = Image::open(Arc::new(file), false, None).unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    image.set_corruption_listener(Arc::new(move |c: &Corruption| {
        s.lock().unwrap().push(c.clone())
    }));
    (image, seen)
}

fn is_marked_corrupt(path: &Path) -> bool {
    peek(path, 72) & 2 != 0
}

/// The write fails naming the metadata, the listener hears of it once, the image is marked
/// corrupt and takes no more I/O, and opens read-only only.
fn assert_refused(
    path: &Path,
    image: &Image,
    seen: &Seen,
    result: qcow2::Result<()>,
    what: Metadata,
) {
    let message = format!(
        "Preventing invalid write on metadata (overlaps with {})",
        what.name()
    );
    match result {
        Err(Error::MetadataOverlap(m)) => assert_eq!(m, message),
        other => panic!("expected an overlap with {}, got {other:?}", what.name()),
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].message, message);
    }
    assert!(is_marked_corrupt(path));
    assert!(image.info().corrupt);
    let mut buf = [0u8; 512];
    assert!(matches!(image.read_at(&mut buf, 0), Err(Error::Corrupt)));
    assert!(matches!(image.write_at(&buf, 0), Err(Error::Corrupt)));
    image.flush().unwrap();
    image.close().unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1, "told once");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    assert!(matches!(
        Image::open(Arc::new(file), false, None),
        Err(Error::Corrupt)
    ));
    let ro = Image::open(Arc::new(File::open(path).unwrap()), true, None).unwrap();
    assert!(ro.info().corrupt);
}

#[test]
fn an_l2_entry_pointing_at_the_l1_table_cannot_overwrite_it() {
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (l1, _) = layout(&path);
    let l2 = peek(&path, l1) & 0x00ff_ffff_ffff_fe00;
    poke(&path, l2, l1 | 1 << 63);
    let before = std::fs::read(&path).unwrap();
    let (image, seen) = open_rw(&path);
    let r = image.write_at(&vec![0x5a; CS as usize], 0);
    assert_eq!(
        seen.lock()
            .unwrap()
            .first()
            .map(|c| (c.offset, c.size))
            .unwrap_or_default(),
        (Some(l1), Some(CS))
    );
    assert_refused(&path, &image, &seen, r, Metadata::ActiveL1);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        after[l1 as usize..(l1 + CS) as usize],
        before[l1 as usize..(l1 + CS) as usize]
    );
}

#[test]
fn an_l2_entry_pointing_at_the_refcount_table_cannot_overwrite_it() {
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (l1, rt) = layout(&path);
    let l2 = peek(&path, l1) & 0x00ff_ffff_ffff_fe00;
    poke(&path, l2, rt | 1 << 63);
    let before = std::fs::read(&path).unwrap();
    let (image, seen) = open_rw(&path);
    let r = image.write_at(&[7u8; 4096], 512);
    assert_refused(&path, &image, &seen, r, Metadata::RefcountTable);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        after[rt as usize..(rt + CS) as usize],
        before[rt as usize..(rt + CS) as usize]
    );
}

#[test]
fn a_zeroed_refcount_table_entry_cannot_put_a_refcount_block_on_the_header() {
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (_, rt) = layout(&path);
    poke(&path, rt, 0);
    let before = std::fs::read(&path).unwrap();
    let (image, seen) = open_rw(&path);
    let r = image.write_at(&[7u8; 4096], 256 << 10);
    // QEMU's words for this one (qemu-storage-daemon 10.0.2 sends the same event).
    let message = "Preventing invalid allocation of refcount block at offset 0";
    assert!(
        matches!(&r, Err(Error::MetadataOverlap(m)) if m == message),
        "{r:?}"
    );
    assert_eq!(
        seen.lock().unwrap()[0],
        Corruption {
            message: message.into(),
            offset: None,
            size: None
        }
    );
    assert!(is_marked_corrupt(&path));
    drop(image);
    let after = std::fs::read(&path).unwrap();
    // Only the corrupt bit changed in the header.
    let mut expected = before[..CS as usize].to_vec();
    expected[79] |= 2;
    assert_eq!(after[..CS as usize], expected[..]);
}

#[test]
fn zeroed_refcounts_cannot_hand_out_the_l1_table_as_a_data_cluster() {
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (_, rt) = layout(&path);
    let rb = peek(&path, rt);
    // Refcounts of header, reftable, refblock kept; L1, L2 and data zeroed.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 6], rb + 6).unwrap();
    let (image, seen) = open_rw(&path);
    let r = image.write_at(&[7u8; 4096], 512 << 10);
    assert_refused(&path, &image, &seen, r, Metadata::ActiveL1);
}

#[test]
fn a_refcount_table_entry_pointing_at_an_l2_table_is_caught() {
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (l1, rt) = layout(&path);
    // The refcount table's first entry points at the L2 table.
    let l2 = peek(&path, l1) & 0x00ff_ffff_ffff_fe00;
    poke(&path, rt, l2);
    let (image, seen) = open_rw(&path);
    let r = image.write_at(&[7u8; 4096], 512 << 10);
    assert!(
        r.is_err(),
        "a write through refcounts read from an L2 table"
    );
    assert!(is_marked_corrupt(&path), "{:?}", seen.lock().unwrap());
}

#[test]
fn overlap_checks_none_lets_qemus_unchecked_behaviour_through() {
    // With checks off the write lands where the damaged L2 entry says (QEMU's `none`):
    // the option acts.
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (l1, _) = layout(&path);
    let l2 = peek(&path, l1) & 0x00ff_ffff_ffff_fe00;
    poke(&path, l2, l1 | 1 << 63);
    let (image, seen) = open_rw(&path);
    image.set_overlap_checks(OverlapChecks::NONE);
    image.write_at(&[0x5a; 512], 0).unwrap();
    image.close().unwrap();
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(peek(&path, l1), 0x5a5a_5a5a_5a5a_5a5a);
}

#[test]
fn a_check_switched_off_on_top_of_a_template_no_longer_fires() {
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (l1, _) = layout(&path);
    let l2 = peek(&path, l1) & 0x00ff_ffff_ffff_fe00;
    poke(&path, l2, l1 | 1 << 63);
    let (image, seen) = open_rw(&path);
    image.set_overlap_checks(OverlapChecks::CACHED.with(Metadata::ActiveL1, false));
    image.write_at(&[0x5a; 512], 0).unwrap();
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn clean_images_are_written_without_a_false_alarm_under_every_template() {
    for checks in [
        OverlapChecks::CONSTANT,
        OverlapChecks::CACHED,
        OverlapChecks::ALL,
    ] {
        let s = Scratch::new();
        let path = image_with_data(&s);
        run("qemu-img", &["snapshot", "-c", "snap", p(&path)]);
        run("qemu-img", &["bitmap", "--add", p(&path), "b0"]);
        let (image, seen) = open_rw(&path);
        image.set_overlap_checks(checks);
        for i in 0..16u64 {
            image.write_at(&[i as u8; 12345], i * 60_000).unwrap();
        }
        image.write_zeroes(0, 128 << 10).unwrap();
        image.close().unwrap();
        assert!(seen.lock().unwrap().is_empty());
        assert_check_clean(&path);
    }
}

#[test]
fn an_l1_table_offset_near_2_pow_64_is_refused_at_open_instead_of_wrapping_onto_the_header() {
    for off in [0xffff_ffff_ffff_0000u64, 0x7fff_ffff_ffff_0000, 1 << 56] {
        let s = Scratch::new();
        let path = image_with_data(&s);
        poke(&path, 40, off);
        let before = std::fs::read(&path).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        match Image::open(Arc::new(file), false, None) {
            Err(Error::Invalid(m)) => assert_eq!(m, "Active L1 table offset invalid"),
            Err(e) => panic!("{off:#x}: {e}"),
            Ok(_) => panic!("{off:#x}: opened"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}

#[test]
fn a_refcount_table_offset_near_2_pow_64_is_refused_at_open() {
    let s = Scratch::new();
    let path = image_with_data(&s);
    poke(&path, 48, 0xffff_ffff_ffff_0000);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert!(matches!(
        Image::open(Arc::new(file), false, None),
        Err(Error::Invalid(m)) if m == "Reference count table offset invalid"
    ));
}

#[test]
fn a_refcount_block_beyond_the_end_of_the_file_cannot_hand_out_the_header() {
    // The block reads as zeros: every cluster looks free, the header first.
    let s = Scratch::new();
    let path = image_with_data(&s);
    let (_, rt) = layout(&path);
    poke(&path, rt, 16 << 20);
    let before = std::fs::read(&path).unwrap();
    let (image, seen) = open_rw(&path);
    let r = image.write_at(&[7u8; 4096], 512 << 10);
    assert_refused(&path, &image, &seen, r, Metadata::MainHeader);
    let after = std::fs::read(&path).unwrap();
    let mut expected = before[..CS as usize].to_vec();
    expected[79] |= 2;
    assert_eq!(after[..CS as usize], expected[..]);
}
