//! A full disk at any point: the image file lives on storage that refuses to grow past a
//! limit (as a full tmpfs refuses new pages), swept over every limit around what a workload
//! needs. Whatever write, flush or close fails, it fails with ENOSPC (never silently), and the
//! file left behind passes `qemu-img check` with no corruption (leaked clusters at most, as
//! QEMU's) and opens read-write again; when nothing failed, the data reads back. And a write
//! that succeeded has its metadata's space: the flush after it never runs out (before, the
//! writes of a backup succeeded and only the flush at quit failed).

mod common;

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};

use common::*;
use qcow2::{Image, Storage};

/// A file on a disk with room for `limit` bytes, counted in 4 KiB pages as tmpfs counts
/// them: a write needs a page for every page of its range not written before (holes too).
struct SmallDisk {
    file: std::fs::File,
    limit: u64,
    pages: Mutex<BTreeSet<u64>>,
    failures: Mutex<u32>,
}

const PAGE: u64 = 4096;

impl SmallDisk {
    fn new(file: std::fs::File, limit: u64) -> SmallDisk {
        let len = file.metadata().unwrap().len();
        SmallDisk {
            file,
            limit,
            pages: Mutex::new((0..len.div_ceil(PAGE)).collect()),
            failures: Mutex::new(0),
        }
    }
}

impl Storage for SmallDisk {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        Storage::read_at(&self.file, buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut pages = self.pages.lock().unwrap();
        let range = off / PAGE..(off + buf.len() as u64).div_ceil(PAGE);
        let new = range.clone().filter(|p| !pages.contains(p)).count() as u64;
        if (pages.len() as u64 + new) * PAGE > self.limit {
            *self.failures.lock().unwrap() += 1;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        pages.extend(range);
        Storage::write_at(&self.file, buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        Storage::flush(&self.file)
    }
    fn len(&self) -> io::Result<u64> {
        Storage::len(&self.file)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.pages
            .lock()
            .unwrap()
            .retain(|&p| p < len.div_ceil(PAGE));
        Storage::set_len(&self.file, len)
    }
}

/// 1.5 MiB of data in 64 KiB writes (crossing an L2 table's reach with 4 KiB clusters), on a
/// disk of `limit` bytes: returns whether everything succeeded.
fn workload(path: &std::path::Path, limit: u64) -> bool {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let disk = Arc::new(SmallDisk::new(file, limit));
    let image = Image::open(disk.clone(), false, None).unwrap();
    let check = |ok: &mut bool, r: qcow2::Result<()>| match r {
        Ok(()) => {}
        Err(qcow2::Error::Io(e)) if e.raw_os_error() == Some(libc::ENOSPC) => *ok = false,
        Err(e) => panic!("limit {limit}: an error other than ENOSPC: {e}"),
    };
    let mut ok = true;
    for i in 0..24u64 {
        check(
            &mut ok,
            image.write_at(&[(i + 1) as u8; 65536], i * 65536 * 2),
        );
    }
    check(&mut ok, image.write_zeroes(65536, 65536));
    // Space for the metadata a write needs is taken when the write is made (as QEMU does):
    // once every write succeeded, storing the metadata needs no new space.
    let writes_ok = ok;
    check(&mut ok, image.flush());
    check(&mut ok, image.close());
    assert!(
        !writes_ok || ok,
        "limit {limit}: every write succeeded, then the flush ran out of space"
    );
    assert_eq!(
        ok,
        *disk.failures.lock().unwrap() == 0,
        "limit {limit}: a failure went unreported"
    );
    ok
}

#[test]
fn enospc_at_any_point_fails_the_operation_and_leaves_no_corruption() {
    let s = Scratch::in_memory();
    let master = s.path("master.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&master),
            "4M",
        ],
    );
    let base = std::fs::metadata(&master).unwrap().len();
    let (mut failed, mut succeeded) = (0, 0);
    for limit in (base..base + 1700 * 1024).step_by(4096) {
        let path = s.path("t.qcow2");
        std::fs::copy(&master, &path).unwrap();
        let ok = workload(&path, limit);
        if ok {
            succeeded += 1
        } else {
            failed += 1
        }
        let (code, out) = run_status("qemu-img", &["check", p(&path)]);
        assert!(
            code == 0 || code == 3,
            "limit {limit}: qemu-img check exit {code}: {out}"
        );
        // Still usable: opens read-write, takes a write, stays consistent.
        let image = Image::open_file(&path, false).unwrap();
        image.write_at(&[0xee; 4096], 0).unwrap();
        image.close().unwrap();
        let (code, out) = run_status("qemu-img", &["check", p(&path)]);
        assert!(code == 0 || code == 3, "limit {limit} after reuse: {out}");
        if ok {
            let image = Image::open_file(&path, true).unwrap();
            let mut buf = vec![0u8; 65536];
            image.read_at(&mut buf, 23 * 65536 * 2).unwrap();
            assert!(buf.iter().all(|&b| b == 24), "limit {limit}: data lost");
        }
    }
    assert!(
        failed > 10 && succeeded > 0,
        "the sweep crosses the boundary: {failed} {succeeded}"
    );
}
