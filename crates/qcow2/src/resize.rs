//! Changing an image's size (QEMU's `qcow2_co_truncate`), with preallocation of the new area,
//! and creating an image with QEMU's creation options (`qcow2_co_create`: a minimal image,
//! then a resize to the wanted size, then the backing file).

use std::sync::atomic::Ordering;

use crate::header::{Header, MAX_L1_ENTRIES};
use crate::image::Image;
use crate::meta::{COPIED, Cluster, Meta};
use crate::storage::Storage;
use crate::{Error, Result};

/// How the area a resize adds is allocated (QEMU's `PreallocMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing is allocated: the new area reads from the backing file, or as zeros.
    #[default]
    Off,
    /// L2 tables and data clusters are allocated; the file grows sparsely.
    Metadata,
    /// As `Metadata`, and the file's new space is reserved (`posix_fallocate`).
    Falloc,
    /// As `Metadata`, and zeros are written to the new data clusters.
    Full,
}

/// Compatible feature bit: lazy refcounts.
const COMPAT_LAZY_REFCOUNTS: u64 = 1;

/// How to create an image (the qcow2 creation options this crate implements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// A power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// A power of two from 1 to 64 (only 16 with version 2).
    pub refcount_bits: u32,
    /// Sets the lazy-refcounts compatible bit (version 3 only).
    pub lazy_refcounts: bool,
    /// The backing file's name and, if given, its format.
    pub backing: Option<(String, Option<String>)>,
    /// How the image's clusters are allocated.
    pub preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            backing: None,
            preallocation: Preallocation::Off,
        }
    }
}

fn invalid_arg<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::InvalidArgument(msg.into()))
}

/// Creates an image on `storage` as `options` say: its first three clusters are overwritten
/// (header, refcount table, refcount block) and the image grows from there; bytes past them
/// are left as they are, free by the refcounts (as QEMU's `qcow2_co_create` leaves them).
/// The caller checks the options' combinations in QEMU's order; this refuses what the
/// format cannot hold.
pub fn create_with(storage: std::sync::Arc<dyn Storage>, options: &CreateOptions) -> Result<()> {
    let cs = options.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return invalid_arg("Cluster size must be a power of two between 512 and 2048k");
    }
    let rb = options.refcount_bits;
    if rb == 0 || rb > 64 || !rb.is_power_of_two() {
        return invalid_arg("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if let Some((name, fmt)) = &options.backing
        && (name.is_empty()
            || name.len() > 1023
            || fmt.as_ref().is_some_and(|f| f.is_empty() || f.len() > 16))
    {
        return invalid_arg("backing file name or format invalid");
    }
    // A minimal image: header, refcount table, one refcount block counting those three.
    let h = Header {
        version: options.version,
        cluster_bits: cs.trailing_zeros(),
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: if options.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order: rb.trailing_zeros(),
        backing_file: None,
        backing_format: None,
        bitmaps: None,
        unknown_extensions: Vec::new(),
        unknown_fields: Vec::new(),
    };
    let mut img = vec![0u8; 3 * cs as usize];
    let hb = h.serialize()?;
    img[..hb.len()].copy_from_slice(&hb);
    img[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        crate::meta::rc_set(&mut block, h.refcount_order, c, 1);
    }
    img[2 * cs as usize..].copy_from_slice(&block);
    // The header cluster zeroed, the refcount table and block, durable, then the header that
    // points at them: a crash in between leaves a file with no qcow2 header (an unfinished
    // creation nothing refers to; an older image in the file is gone, not half-overwritten),
    // never a header pointing past the end of the file. QEMU's `qcow2_co_create` writes the
    // header first, so a crash between its two writes leaves a corrupt image. The first write
    // still covers the header cluster, as QEMU's (what a write threshold on the file reports).
    storage.write_at(&vec![0u8; cs as usize], 0)?;
    storage.write_at(&img[cs as usize..], cs)?;
    storage.flush()?;
    storage.write_at(&img[..cs as usize], 0)?;
    storage.flush()?;
    if options.version < 3 {
        // This crate writes version 3 only: a version 2 image gets its size (and backing
        // file) straight in the header, with an L1 table laid out after it.
        return grow_v2(&*storage, h, options);
    }
    let image = Image::open(storage, false, None)?;
    image.resize(options.size, options.preallocation)?;
    if let Some((name, fmt)) = &options.backing {
        image.set_backing_header(Some(name), fmt.as_deref())?;
    }
    image.close()
}

/// Version 2: L1 table (zeroed) after the refcount block, then the header with the size and
/// backing file. Preallocation needs the write path, which version 2 does not have here.
fn grow_v2(storage: &dyn Storage, mut h: Header, options: &CreateOptions) -> Result<()> {
    if options.preallocation != Preallocation::Off {
        return Err(Error::Unsupported(
            "preallocation of a version 2 image".into(),
        ));
    }
    let cs = options.cluster_size;
    let l1 = l1_entries(options.size, cs);
    if l1 > MAX_L1_ENTRIES {
        return invalid_arg("Image size is too large for this cluster size");
    }
    let l1_clusters = (l1 * 8).div_ceil(cs);
    let entries = cs * 8 / 16;
    if 3 + l1_clusters > entries {
        return invalid_arg("Image size is too large for this cluster size");
    }
    h.size = options.size;
    h.l1_size = l1 as u32;
    h.l1_table_offset = if l1 > 0 { 3 * cs } else { 0 };
    if let Some((name, fmt)) = &options.backing {
        h.backing_file = Some(name.clone());
        h.backing_format = fmt.clone();
    }
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 + l1_clusters as usize {
        crate::meta::rc_set(&mut block, h.refcount_order, c, 1);
    }
    storage.write_at(&block, 2 * cs)?;
    storage.write_at(&vec![0u8; (l1_clusters * cs) as usize], 3 * cs)?;
    storage.flush()?;
    let mut hb = h.serialize()?;
    hb.resize(cs as usize, 0);
    storage.write_at(&hb, 0)?;
    storage.flush()?;
    Ok(())
}

/// L1 entries for a disk of `size` bytes.
fn l1_entries(size: u64, cs: u64) -> u64 {
    size.div_ceil(cs).div_ceil(cs / 8)
}

impl Meta {
    /// Makes the L1 table `n` entries long (QEMU's `qcow2_grow_l1_table` with an exact size):
    /// a new table in fresh clusters, stored with its refcounts before the header points to
    /// it; the old table's clusters are freed after.
    fn grow_l1(&mut self, n: u64) -> Result<()> {
        if n <= self.l1.len() as u64 {
            return Ok(());
        }
        if n > MAX_L1_ENTRIES {
            return Err(Error::InvalidArgument(
                "Failed to grow the L1 table: File too large".into(),
            ));
        }
        let cs = self.cs();
        self.write_back()?;
        let clusters = (n * 8).div_ceil(cs);
        let off = self.alloc_run(clusters)?;
        let mut table = self.l1.clone();
        table.resize(n as usize, 0);
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((clusters * cs) as usize, 0);
        self.write_dirty_refblocks()?;
        self.storage.flush()?;
        self.storage.write_at(&bytes, off)?;
        self.storage.flush()?;
        let (old_off, old_len) = (self.h.l1_table_offset, u64::from(self.h.l1_size));
        self.h.l1_table_offset = off;
        self.h.l1_size = n as u32;
        self.write_header()?;
        self.storage.flush()?;
        self.replace_l1(table);
        if old_len > 0 {
            self.free_now(old_off, (old_len * 8).div_ceil(cs) * cs)?;
            self.write_dirty_refblocks()?;
        }
        Ok(())
    }

    /// Drops the mapping of guest clusters `first..last` (they become unallocated), freeing
    /// what they held once the change is stored.
    fn unmap(&mut self, first: u64, last: u64) -> Result<()> {
        let l2_bits = self.h.cluster_bits - 3;
        for gc in first..last {
            let i = (gc >> l2_bits) as usize;
            if self
                .l1
                .get(i)
                .is_none_or(|e| e & crate::meta::L1_OFFSET_MASK == 0)
            {
                continue;
            }
            let old = self.map(gc)?;
            if old == Cluster::Unallocated {
                continue;
            }
            self.set_mapping(gc, 0)?;
            if let Some((h, l)) = self.host_range(old) {
                self.queue_free(h, l);
            }
        }
        Ok(())
    }

    /// Allocates every unallocated guest cluster in `first..last` (L2 tables included):
    /// contiguous runs of data clusters, mapped as written. Returns the host ranges
    /// allocated, for the caller to reserve or zero.
    fn preallocate(&mut self, first: u64, last: u64) -> Result<Vec<(u64, u64)>> {
        let cs = self.cs();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut gc = first;
        while gc < last {
            if !matches!(
                self.map(gc)?,
                Cluster::Unallocated | Cluster::Zero { host: 0 }
            ) {
                gc += 1;
                continue;
            }
            let mut n = 1;
            while gc + n < last
                && n < self.max_run()
                && matches!(
                    self.map(gc + n)?,
                    Cluster::Unallocated | Cluster::Zero { host: 0 }
                )
            {
                n += 1;
            }
            // L2 tables first, so the data run stays contiguous.
            let l2_bits = self.h.cluster_bits - 3;
            for i in (gc >> l2_bits)..=((gc + n - 1) >> l2_bits) {
                self.l2_for_write(i as usize)?;
            }
            let host = self.alloc_run(n)?;
            for k in 0..n {
                self.set_mapping(gc + k, (host + k * cs) | COPIED)?;
            }
            match ranges.last_mut() {
                Some((h, l)) if *h + *l == host => *l += n * cs,
                _ => ranges.push((host, n * cs)),
            }
            gc += n;
        }
        Ok(ranges)
    }
}

impl Image {
    /// Changes the virtual size to `size` (QEMU's `qcow2_co_truncate`): growing makes the L1
    /// table longer and allocates the new area as `prealloc` says; shrinking (without
    /// preallocation) unmaps and frees the clusters past the new end.
    pub fn resize(&self, size: u64, prealloc: Preallocation) -> Result<()> {
        self.check_writable()?;
        if !size.is_multiple_of(512) {
            return invalid_arg("The new size must be a multiple of 512");
        }
        let _ops = self.ops.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        if m.h.version < 3 && m.h.nb_snapshots > 0 {
            return Err(Error::Unsupported(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        let cs = m.cs();
        let old = m.h.size;
        let l1 = l1_entries(size, cs);
        if size < old {
            if prealloc != Preallocation::Off {
                return invalid_arg("Preallocation can't be used for shrinking an image");
            }
            let first = size.div_ceil(cs);
            let last = old.div_ceil(cs);
            m.unmap(first, last)?;
            // L2 tables wholly past the end go too (the L1 table keeps its length).
            for i in l1 as usize..m.l1.len() {
                let e = m.l1[i];
                let off = e & crate::meta::L1_OFFSET_MASK;
                if off != 0 {
                    m.set_l1_entry(i, 0);
                    m.queue_free(off, cs);
                }
            }
            m.write_back()?;
        } else {
            m.grow_l1(l1)?;
        }
        m.write_back()?;
        m.h.size = size;
        m.write_header()?;
        self.storage.flush()?;
        self.size.store(size, Ordering::Release);
        if size > old && prealloc != Preallocation::Off {
            let ranges = m.preallocate(old / cs, size.div_ceil(cs))?;
            // The data clusters exist in the file before the tables that map them are
            // stored.
            let end = ranges.iter().map(|(h, l)| h + l).max().unwrap_or(0);
            if end > self.storage.len()? {
                self.storage.set_len(end)?;
            }
            for &(host, len) in &ranges {
                match prealloc {
                    Preallocation::Full => write_zeros(&*self.storage, host, len)?,
                    Preallocation::Falloc => self.storage.reserve(host, len)?,
                    _ => {}
                }
            }
            self.storage.flush()?;
            m.write_back()?;
            self.storage.flush()?;
        }
        self.written.store(true, Ordering::Release);
        Ok(())
    }
}

fn write_zeros(storage: &dyn Storage, mut off: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let end = off + len;
    while off < end {
        let n = (end - off).min(CHUNK);
        storage.write_at(&zeros[..n as usize], off)?;
        off += n;
    }
    Ok(())
}
