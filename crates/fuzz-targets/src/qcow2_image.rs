//! qcow2 images as a hostile file would present them, in the spirit of QEMU's
//! `tests/image-fuzzer`: the input is a whole image (the corpus holds real images made by
//! `qemu-img`, with snapshots, bitmaps, compressed clusters and a backing file name; the
//! fuzzer mutates header fields, extensions and table entries), held in memory. It is opened
//! read-only and read through, then opened read-write and written (data, zeroes, discards,
//! a flush and a close).
//!
//! Invariants besides "no panic": memory stays bounded (the storage refuses to grow past
//! [`MAX_FILE`]); with every overlap check on (`all`), no write of the read-write phase lands
//! on a cluster that only the image's snapshots or its header's tables own (snapshot table,
//! snapshot L1 tables, L2 tables no active L1 entry names), as an independent walk of the
//! input finds them; and the replay test (`tests/replay.rs`) runs `qemu-img check` on every
//! image written from the corpus: one that was consistent stays so (leaks allowed).

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use qcow2::{Image, Storage};

/// The largest file the in-memory storage holds; writes past it fail with ENOSPC.
pub const MAX_FILE: u64 = 32 << 20;
/// The part of the disk read and written (images may claim exabytes).
const MAX_GUEST: u64 = 4 << 20;

/// An image file in memory that records where it is written.
#[derive(Default)]
pub struct MemoryFile {
    bytes: Mutex<Vec<u8>>,
    writes: Mutex<Vec<(u64, u64)>>,
}

impl MemoryFile {
    /// A file holding `bytes`.
    pub fn new(bytes: &[u8]) -> MemoryFile {
        MemoryFile {
            bytes: Mutex::new(bytes.to_vec()),
            writes: Mutex::default(),
        }
    }

    /// The file's bytes now.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every write so far, `(offset, len)`.
    pub fn writes(&self) -> Vec<(u64, u64)> {
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl Storage for MemoryFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let f = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let len = f.len() as u64;
        let start = off.min(len) as usize;
        let end = off.saturating_add(buf.len() as u64).min(len) as usize;
        let n = end - start;
        buf[..n].copy_from_slice(&f[start..end]);
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = off.checked_add(buf.len() as u64).ok_or_else(no_space)?;
        if end > MAX_FILE {
            return Err(no_space());
        }
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((off, buf.len() as u64));
        let mut f = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        if f.len() < end as usize {
            f.resize(end as usize, 0);
        }
        f[off as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self
            .bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MAX_FILE {
            return Err(no_space());
        }
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resize(len as usize, 0);
        Ok(())
    }
}

/// What [`exercise`] did to an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not opened read-write (refused, as invalid, unsupported or marked corrupt).
    Refused,
    /// Opened read-write and written; `errors` operations failed.
    Written {
        /// How many writes, flushes or the close failed.
        errors: usize,
    },
}

/// Opens `file` read-only and reads it, then read-write and writes it.
pub fn exercise(file: &Arc<MemoryFile>) -> Outcome {
    let storage: Arc<dyn Storage> = file.clone();
    if let Ok(image) = Image::open(storage.clone(), true, None) {
        let size = image.size().min(MAX_GUEST);
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = image.read_at(&mut buf[..n], off);
            let _ = image.block_status(off, n as u64);
            off += n as u64;
        }
        for s in image.snapshots() {
            let n = s.disk_size.min(4096) as usize;
            let _ = image.read_snapshot(&s.id, &mut buf[..n], 0);
        }
        let _ = image.bitmaps();
        let _ = image.close();
    }
    let Ok(image) = Image::open(storage, false, None) else {
        return Outcome::Refused;
    };
    image.set_overlap_checks(qcow2::OverlapChecks::ALL);
    let size = image.size().min(MAX_GUEST);
    let cs = image.cluster_size();
    let mut errors = 0;
    let mut count = |r: qcow2::Result<()>| errors += usize::from(r.is_err());
    let pattern = vec![0x5au8; (3 * cs) as usize];
    for &(off, len) in &[
        (0, cs),
        (cs / 2, cs),
        (size / 2, 3 * cs),
        (size.saturating_sub(cs), cs),
    ] {
        let len = len.min(size.saturating_sub(off));
        count(image.write_at(&pattern[..len as usize], off));
    }
    count(image.write_zeroes(cs, 2 * cs.min(size.saturating_sub(cs) / 2)));
    count(image.discard(size / 4, cs.min(size / 4)));
    count(image.flush());
    count(image.close());
    Outcome::Written { errors }
}

/// Exercises `data` as an image file.
pub fn run(data: &[u8]) {
    if data.len() as u64 > MAX_FILE {
        return;
    }
    let file = Arc::new(MemoryFile::new(data));
    let protected = snapshot_only_clusters(data);
    exercise(&file);
    if protected.is_empty() {
        return;
    }
    for (off, len) in file.writes() {
        if let Some(c) = protected
            .iter()
            .find(|&&(c, cs)| off < c + cs && c < off + len)
        {
            panic!(
                "a write at {off:#x} (+{len}) landed on snapshot metadata at {:#x}",
                c.0
            );
        }
    }
}

fn be64(b: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn be32(b: &[u8], at: u64) -> Option<u32> {
    let at = usize::try_from(at).ok()?;
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Clusters `(offset, cluster size)` of the input that only its snapshots own: the snapshot
/// table, the snapshots' L1 tables and their L2 tables that no active L1 entry names. Walked
/// here from the bytes, independently of the qcow2 crate; empty when the walk finds nothing
/// sensible.
fn snapshot_only_clusters(b: &[u8]) -> Vec<(u64, u64)> {
    const MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let walk = || -> Option<Vec<(u64, u64)>> {
        if be32(b, 0)? != 0x5146_49fb {
            return None;
        }
        let bits = be32(b, 20)?;
        if !(9..=21).contains(&bits) {
            return None;
        }
        let cs = 1u64 << bits;
        let (l1_size, l1_off) = (be32(b, 36)?, be64(b, 40)?);
        let (nb_snapshots, snapshots_off) = (be32(b, 60)?, be64(b, 64)?);
        let active: Vec<u64> = (0..u64::from(l1_size).min(1 << 16))
            .filter_map(|i| be64(b, l1_off.checked_add(i * 8)?))
            .map(|e| e & MASK)
            .filter(|&e| e != 0)
            .collect();
        let mut out = Vec::new();
        let mut pos = snapshots_off;
        for _ in 0..nb_snapshots.min(64) {
            let (sl1_off, sl1_size) = (be64(b, pos)?, be32(b, pos + 8)?);
            let (id_len, name_len) = (
                u64::from(be32(b, pos + 12)? >> 16),
                u64::from(be32(b, pos + 12)? & 0xffff),
            );
            let extra = u64::from(be32(b, pos + 36)?);
            out.push(pos / cs * cs);
            // An empty L1 table occupies nothing (QEMU's checks skip it too).
            if sl1_off != 0 && sl1_size > 0 && sl1_off != l1_off {
                for i in 0..u64::from(sl1_size).min(1 << 16) {
                    let l2 = be64(b, sl1_off.checked_add(i * 8)?)? & MASK;
                    if l2 != 0 && !active.contains(&l2) {
                        out.push(l2);
                    }
                }
                out.push(sl1_off / cs * cs);
            }
            pos = pos.checked_add((40 + extra + id_len + name_len).div_ceil(8) * 8)?;
        }
        // Clusters the active tables or the refcount structures also use are not the
        // snapshots' alone (their writes are legitimate).
        let (rt_off, rt_clusters) = (be64(b, 48)?, u64::from(be32(b, 56)?).min(16));
        let refcounts: Vec<u64> = (0..rt_clusters * cs / 8)
            .filter_map(|i| be64(b, rt_off.checked_add(i * 8)?))
            .map(|e| e & !0x1ff)
            .filter(|&e| e != 0)
            .collect();
        let in_reftable = |c: u64| c >= rt_off && c < rt_off.saturating_add(rt_clusters * cs);
        out.retain(|&c| {
            c != 0
                && c != l1_off / cs * cs
                && !active.contains(&c)
                && !refcounts.contains(&c)
                && !in_reftable(c)
        });
        out.sort_unstable();
        out.dedup();
        Some(out.into_iter().map(|c| (c, cs)).collect())
    };
    walk().unwrap_or_default()
}
