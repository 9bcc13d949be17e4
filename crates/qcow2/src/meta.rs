//! Image metadata: L1/L2 tables, refcounts, cluster allocation and ordered write-back.
//!
//! Everything here runs under the image's metadata lock. Dirty tables stay in memory until
//! [`Meta::write_back`], which stores them in the order that keeps the image consistent at
//! every instant: refcount blocks, flush, L2 tables, flush, L1 entries, and only then the
//! refcount decrements of clusters whose last reference was dropped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::bitmap::BitmapEntry;
use crate::cache::TableCache;
use crate::header::{Header, INCOMPAT_CORRUPT};
use crate::overlap::{Corruption, CorruptionListener, Metadata, OverlapChecks, ranges_overlap};
use crate::snapshot::Snapshot;
use crate::storage::Storage;
use crate::{Error, Result, invalid};

pub(crate) const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
pub(crate) const COPIED: u64 = 1 << 63;
pub(crate) const COMPRESSED: u64 = 1 << 62;
pub(crate) const ZERO: u64 = 1;
/// How many in-use clusters past the end of the file one allocation scans before giving up.
const MAX_SCAN_BEYOND_END: u64 = 1 << 22;
/// Host offsets must fit the 56-bit offset fields.
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;

/// What one guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cluster {
    /// Not allocated here: read from the backing image, or zeros.
    Unallocated,
    /// Reads as zeros (v3 zero flag); `host` is a preallocated cluster or 0.
    Zero { host: u64 },
    /// Stored uncompressed at `host`; `copied` means refcount 1 (writable in place).
    Data { host: u64, copied: bool },
    /// Deflate-compressed, `size` bytes at `host`.
    Compressed { host: u64, size: u64 },
}

/// One contiguous piece of a guest range, as the read path will serve it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Extent {
    Data {
        host: u64,
        len: usize,
    },
    Zero {
        len: usize,
    },
    Backing {
        guest: u64,
        len: usize,
    },
    Compressed {
        host: u64,
        size: u64,
        skip: usize,
        len: usize,
    },
}

impl Extent {
    pub fn len(&self) -> usize {
        match *self {
            Extent::Data { len, .. }
            | Extent::Zero { len }
            | Extent::Backing { len, .. }
            | Extent::Compressed { len, .. } => len,
        }
    }
}

/// What the write path does next for a guest range.
pub(crate) enum WriteStep {
    /// Overwrite `len` bytes at `host` in place.
    InPlace { host: u64, len: usize },
    /// Write a fresh run of clusters at `host` for guest clusters `first..first + old.len()`,
    /// `len` bytes of the request in it; `old` says where the untouched parts come from.
    Allocate {
        host: u64,
        first: u64,
        old: Vec<Cluster>,
        len: usize,
    },
}

#[derive(Clone, Copy)]
enum TableKind {
    L2,
    Refblock,
}

pub(crate) struct Meta {
    pub storage: Arc<dyn Storage>,
    pub h: Header,
    pub l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    pub reftable: Vec<u64>,
    reftable_dirty: BTreeSet<usize>,
    pub(crate) l2_cache: TableCache,
    pub(crate) rb_cache: TableCache,
    /// The caches' clocks at the last clean of unused tables (L2, refcount).
    pub(crate) cleaned_at: (u64, u64),
    /// Clusters (offset, bytes) to decrement once the removal of their reference is stored.
    pub(crate) pending_frees: Vec<(u64, u64)>,
    pub(crate) free_hint: u64,
    pub(crate) run_hint: u64,
    /// Where the next compressed cluster may go in the host cluster compressed data last went
    /// to (QEMU's `free_byte_offset`); 0: none.
    compressed_free: u64,
    /// One past the highest cluster given a refcount since open.
    alloc_end: u64,
    in_write_back: bool,
    /// Readers between mapping a range (under the lock) and finishing its data I/O.
    pub readers: Arc<AtomicUsize>,
    pub snapshots: Vec<Snapshot>,
    pub snapshot_table_len: u64,
    pub bitmaps: Vec<BitmapEntry>,
    /// What every write is checked against before it is issued.
    pub overlap_checks: OverlapChecks,
    /// Told when the image is marked corrupt.
    pub corruption_listener: Option<CorruptionListener>,
    /// The image was marked corrupt in this session: it takes no more I/O (QEMU ejects it).
    pub broken: bool,
}

fn rc_get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            u64::from((block[i / per] >> ((i % per) * bits)) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(crate::header::get_be32(block, 4 * i)),
        _ => crate::header::get_be64(block, 8 * i),
    }
}

pub(crate) fn rc_set(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = (i % per) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[i / per];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

impl Meta {
    pub fn new(storage: Arc<dyn Storage>, h: Header, l1: Vec<u64>, reftable: Vec<u64>) -> Meta {
        let cs = h.cluster_size() as usize;
        Meta {
            storage,
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            reftable_dirty: BTreeSet::new(),
            // `Image::set_cache_sizes` changes them.
            l2_cache: TableCache::new(crate::DEFAULT_L2_CACHE_BYTES as usize / cs),
            rb_cache: TableCache::new(crate::DEFAULT_REFCOUNT_CACHE_BYTES as usize / cs),
            cleaned_at: (0, 0),
            pending_frees: Vec::new(),
            free_hint: 0,
            run_hint: 0,
            compressed_free: 0,
            alloc_end: 0,
            in_write_back: false,
            readers: Arc::new(AtomicUsize::new(0)),
            snapshots: Vec::new(),
            snapshot_table_len: 0,
            bitmaps: Vec::new(),
            overlap_checks: OverlapChecks::default(),
            corruption_listener: None,
            broken: false,
            h,
        }
    }

    pub fn cs(&self) -> u64 {
        self.h.cluster_size()
    }
    fn l2_bits(&self) -> u32 {
        self.h.cluster_bits - 3
    }
    pub(crate) fn rb_bits(&self) -> u32 {
        self.h.cluster_bits + 3 - self.h.refcount_order
    }
    fn max_refcount(&self) -> u64 {
        if self.h.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.h.refcount_order)) - 1
        }
    }
    /// Longest run of clusters one allocation hands out.
    pub fn max_run(&self) -> u64 {
        ((1u64 << self.rb_bits()) / 2).max(1)
    }

    pub fn decode(&self, entry: u64) -> Result<Cluster> {
        let cs = self.cs();
        if entry & COMPRESSED != 0 {
            let shift = 62 - (self.h.cluster_bits - 8);
            let host = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & ((1u64 << (self.h.cluster_bits - 8)) - 1)) + 1;
            let size = sectors * 512 - (host & 511);
            return Ok(Cluster::Compressed { host, size });
        }
        let host = entry & L2_OFFSET_MASK;
        if !host.is_multiple_of(cs) {
            return invalid(format!(
                "L2 entry {entry:#x} points to an unaligned cluster"
            ));
        }
        if self.h.version >= 3 && entry & ZERO != 0 {
            return Ok(Cluster::Zero { host });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        Ok(Cluster::Data {
            host,
            copied: entry & COPIED != 0,
        })
    }

    fn cache(&mut self, k: TableKind) -> &mut TableCache {
        match k {
            TableKind::L2 => &mut self.l2_cache,
            TableKind::Refblock => &mut self.rb_cache,
        }
    }

    /// Make room in a cache (writing everything back if all of it is dirty).
    fn make_room(&mut self, k: TableKind) -> Result<()> {
        if self.cache(k).is_full() && !self.cache(k).evict_clean() && !self.in_write_back {
            self.write_back()?;
            self.cache(k).evict_clean();
        }
        Ok(())
    }

    /// Bring the table at `off` into its cache.
    fn load(&mut self, k: TableKind, off: u64) -> Result<()> {
        if self.cache(k).contains(off) {
            return Ok(());
        }
        if off == 0 || !off.is_multiple_of(self.cs()) || off >= MAX_HOST_OFFSET {
            return invalid(format!("metadata table at invalid offset {off:#x}"));
        }
        self.make_room(k)?;
        let mut data = vec![0u8; self.cs() as usize];
        self.storage.read_at(&mut data, off)?;
        self.cache(k).insert(off, data, false);
        Ok(())
    }

    /// Put a new table into a cache (dirty).
    fn insert_new(&mut self, k: TableKind, off: u64, data: Vec<u8>) -> Result<()> {
        self.make_room(k)?;
        self.cache(k).insert(off, data, true);
        Ok(())
    }

    pub fn l2_entry(&mut self, l2: u64, i: u64) -> Result<u64> {
        self.load(TableKind::L2, l2)?;
        let t = self
            .l2_cache
            .get(l2)
            .ok_or_else(|| Error::Invalid("L2 cache miss".into()))?;
        Ok(crate::header::get_be64(t, i as usize * 8))
    }

    pub fn set_l2_entry(&mut self, l2: u64, i: u64, v: u64) -> Result<()> {
        self.load(TableKind::L2, l2)?;
        let t = self
            .l2_cache
            .get_mut(l2)
            .ok_or_else(|| Error::Invalid("L2 cache miss".into()))?;
        let i = i as usize * 8;
        t[i..i + 8].copy_from_slice(&v.to_be_bytes());
        Ok(())
    }

    /// Map guest cluster `gc` through the L1 entry that covers it.
    pub fn lookup(&mut self, l1_entry: u64, gc: u64) -> Result<Cluster> {
        let l2 = l1_entry & L1_OFFSET_MASK;
        if l2 == 0 {
            return Ok(Cluster::Unallocated);
        }
        let e = self.l2_entry(l2, gc & ((1 << self.l2_bits()) - 1))?;
        self.decode(e)
    }

    /// Map guest cluster `gc` of the active image.
    pub fn map(&mut self, gc: u64) -> Result<Cluster> {
        let e = self
            .l1
            .get((gc >> self.l2_bits()) as usize)
            .copied()
            .unwrap_or(0);
        self.lookup(e, gc)
    }

    /// Split `[off, off + len)` into extents, through `l1` (a snapshot's) or the active L1.
    pub fn map_range(&mut self, l1: Option<&[u64]>, off: u64, len: usize) -> Result<Vec<Extent>> {
        let cs = self.cs();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        let end = off + len as u64;
        while pos < end {
            let gc = pos / cs;
            let within = pos % cs;
            let n = ((cs - within).min(end - pos)) as usize;
            let l1i = (gc >> self.l2_bits()) as usize;
            let l1e = match l1 {
                Some(t) => t.get(l1i).copied().unwrap_or(0),
                None => self.l1.get(l1i).copied().unwrap_or(0),
            };
            let next = match self.lookup(l1e, gc)? {
                Cluster::Unallocated => Extent::Backing { guest: pos, len: n },
                Cluster::Zero { .. } => Extent::Zero { len: n },
                Cluster::Data { host, .. } => Extent::Data {
                    host: host + within,
                    len: n,
                },
                Cluster::Compressed { host, size } => Extent::Compressed {
                    host,
                    size,
                    skip: within as usize,
                    len: n,
                },
            };
            match (out.last_mut(), next) {
                (Some(Extent::Data { host, len }), Extent::Data { host: h2, len: l2 })
                    if *host + *len as u64 == h2 =>
                {
                    *len += l2
                }
                (Some(Extent::Zero { len }), Extent::Zero { len: l2 }) => *len += l2,
                (Some(Extent::Backing { len, .. }), Extent::Backing { len: l2, .. }) => *len += l2,
                _ => out.push(next),
            }
            pos += n as u64;
        }
        Ok(out)
    }

    // ---- refcounts ----

    pub fn refcount(&mut self, idx: u64) -> Result<u64> {
        let bi = (idx >> self.rb_bits()) as usize;
        let Some(&e) = self.reftable.get(bi) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        self.load(TableKind::Refblock, off)?;
        let order = self.h.refcount_order;
        let i = (idx & ((1 << self.rb_bits()) - 1)) as usize;
        let b = self
            .rb_cache
            .get(off)
            .ok_or_else(|| Error::Invalid("refcount cache miss".into()))?;
        Ok(rc_get(b, order, i))
    }

    pub fn set_refcount(&mut self, idx: u64, v: u64) -> Result<()> {
        if v > self.max_refcount() {
            return invalid(format!("refcount of cluster {idx} overflows"));
        }
        let bi = idx >> self.rb_bits();
        self.ensure_refblock(bi)?;
        if v > 0 {
            self.alloc_end = self.alloc_end.max(idx + 1);
        }
        let off = self.reftable[bi as usize] & REFT_OFFSET_MASK;
        self.load(TableKind::Refblock, off)?;
        let order = self.h.refcount_order;
        let i = (idx & ((1 << self.rb_bits()) - 1)) as usize;
        let b = self
            .rb_cache
            .get_mut(off)
            .ok_or_else(|| Error::Invalid("refcount cache miss".into()))?;
        rc_set(b, order, i, v);
        Ok(())
    }

    /// Make sure refcount block `bi` exists. A missing block covers only free clusters, so a new
    /// one is placed on the first cluster it covers and counts itself.
    fn ensure_refblock(&mut self, bi: u64) -> Result<()> {
        if bi as usize >= self.reftable.len() {
            return self.grow_reftable(bi);
        }
        if self.reftable[bi as usize] & REFT_OFFSET_MASK != 0 {
            return Ok(());
        }
        let off = (bi << self.rb_bits()) * self.cs();
        if off >= MAX_HOST_OFFSET {
            return invalid("image file would exceed the maximum size");
        }
        if off == 0 {
            // A zeroed first refcount table entry (QEMU's words and checks).
            return Err(self.prevent("Preventing invalid allocation of refcount block at offset 0"));
        }
        let mut block = vec![0u8; self.cs() as usize];
        rc_set(&mut block, self.h.refcount_order, 0, 1);
        // Stored at once, like a new L2 table (see `l2_for_write`).
        self.checked_write(&[], &block, off)?;
        self.alloc_end = self.alloc_end.max((bi << self.rb_bits()) + 1);
        self.insert_new(TableKind::Refblock, off, block)?;
        self.reftable[bi as usize] = off;
        self.reftable_dirty.insert(bi as usize);
        Ok(())
    }

    /// Move the refcount table to a larger one covering block `bi`, placed (with block `bi`) in
    /// the free region that block covers, then switch the header to it.
    fn grow_reftable(&mut self, bi: u64) -> Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let new_len = (bi + 1)
            .max(self.reftable.len() as u64 * 2)
            .div_ceil(per_cluster)
            * per_cluster;
        let clusters = new_len / per_cluster;
        if clusters + 1 > (1 << self.rb_bits()) || new_len * 8 > 8 * 1024 * 1024 {
            return Err(Error::Unsupported(
                "refcount table would grow too large".into(),
            ));
        }
        let first = bi << self.rb_bits();
        let block_off = first * cs;
        let table_off = block_off + cs;
        if table_off + clusters * cs >= MAX_HOST_OFFSET {
            return invalid("image file would exceed the maximum size");
        }
        let mut block = vec![0u8; cs as usize];
        for i in 0..=clusters as usize {
            rc_set(&mut block, self.h.refcount_order, i, 1);
        }
        self.alloc_end = self.alloc_end.max(first + clusters + 1);
        let mut table = self.reftable.clone();
        table.resize(new_len as usize, 0);
        table[bi as usize] = block_off;
        // Blocks first, then the new table, then the header that points to it.
        self.write_dirty_refblocks()?;
        self.checked_write(&[], &block, block_off)?;
        self.make_room(TableKind::Refblock)?;
        self.rb_cache.insert(block_off, block, false);
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.checked_write(&[], &bytes, table_off)?;
        self.storage.flush()?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = table_off;
        self.h.refcount_table_clusters = clusters as u32;
        self.write_header()?;
        self.storage.flush()?;
        self.reftable = table;
        self.reftable_dirty.clear();
        self.pending_frees.push((old_off, old_clusters * cs));
        Ok(())
    }

    /// Allocate `n` contiguous free clusters (refcount 1); returns the host offset.
    ///
    /// Single clusters fill the lowest free cluster; runs are searched from the end of the last
    /// run, so sequential writes get contiguous clusters and a scan never revisits used space.
    pub fn alloc_run(&mut self, n: u64) -> Result<u64> {
        let rb_bits = self.rb_bits();
        // Past the end of the file only clusters allocated since open can be in use.
        let limit = self.storage.len()?.div_ceil(self.cs()).max(self.alloc_end);
        let mut beyond = 0u64;
        let mut c = if n == 1 {
            self.free_hint
        } else {
            self.run_hint.max(self.free_hint)
        };
        let mut start = c;
        let mut len = 0;
        let mut first_free = None;
        while len < n {
            if (c + 1) * self.cs() > MAX_HOST_OFFSET {
                return invalid("image file would exceed the maximum size");
            }
            self.ensure_refblock(c >> rb_bits)?;
            let rc = self.refcount(c)?;
            if rc != 0 && c >= limit.max(self.alloc_end) {
                // Leaked by a crash, or refcounts claiming the impossible: bound the scan.
                beyond += 1;
                if beyond > MAX_SCAN_BEYOND_END {
                    return invalid("refcounts claim too many clusters beyond the end of the file");
                }
            }
            if rc == 0 {
                if len == 0 {
                    start = c;
                }
                first_free.get_or_insert(c);
                len += 1;
            } else {
                len = 0;
            }
            c += 1;
        }
        for i in start..start + n {
            self.set_refcount(i, 1)?;
        }
        if n == 1 {
            self.free_hint = start + 1;
        } else {
            self.run_hint = start + n;
            if first_free == Some(start) && start == self.free_hint {
                self.free_hint = start + n;
            }
        }
        Ok(start * self.cs())
    }

    /// Drop one reference to every cluster in `[off, off + len)` once references are stored.
    pub fn queue_free(&mut self, off: u64, len: u64) {
        if len > 0 {
            self.pending_frees.push((off, len));
        }
    }

    /// Whether clusters are waiting to be freed.
    pub fn frees_pending(&self) -> bool {
        !self.pending_frees.is_empty()
    }

    /// Drop one reference to every cluster in `[off, off + len)` now.
    pub fn free_now(&mut self, off: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        let first = off / cs;
        let last = (off + len).div_ceil(cs);
        for c in first..last {
            let rc = self.refcount(c)?;
            if rc == 0 {
                return invalid(format!("freeing cluster {:#x} whose refcount is 0", c * cs));
            }
            self.set_refcount(c, rc - 1)?;
            if rc == 1 && self.compressed_free / cs == c {
                self.compressed_free = 0;
            }
            if rc == 1 {
                self.free_hint = self.free_hint.min(c);
                self.run_hint = self.run_hint.min(c);
                self.l2_cache.remove(c * cs);
            }
        }
        Ok(())
    }

    /// Add one reference to every cluster in `[off, off + len)`.
    pub fn take_ref(&mut self, off: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        for c in off / cs..(off + len).div_ceil(cs) {
            let rc = self.refcount(c)?;
            self.set_refcount(c, rc + 1)?;
        }
        Ok(())
    }

    /// Room for `len` bytes of compressed data (512-byte aligned, at most a cluster), packed
    /// after the previous compressed cluster where it fits, as QEMU's `qcow2_alloc_bytes`
    /// packs them: the host cluster gains one reference per compressed cluster in it.
    pub fn alloc_compressed(&mut self, len: u64) -> Result<u64> {
        let cs = self.cs();
        let free = self.compressed_free;
        if free != 0 && free % cs + len <= cs && self.refcount(free / cs)? > 0 {
            self.take_ref(free, 1)?;
            self.compressed_free = if (free + len).is_multiple_of(cs) {
                0
            } else {
                free + len
            };
            return Ok(free);
        }
        let host = self.alloc_run(len.div_ceil(cs))?;
        self.compressed_free = if len.is_multiple_of(cs) {
            0
        } else {
            host + len
        };
        Ok(host)
    }

    /// The L2 entry of a compressed cluster of `len` bytes at `host`.
    pub fn compressed_entry(&self, host: u64, len: u64) -> u64 {
        let shift = 62 - (self.h.cluster_bits - 8);
        let sectors = (host + len - 1) / 512 - host / 512;
        COMPRESSED | (sectors << shift) | host
    }

    /// The host clusters an L2 entry holds a reference to.
    pub fn host_range(&self, c: Cluster) -> Option<(u64, u64)> {
        match c {
            Cluster::Data { host, .. } => Some((host, self.cs())),
            Cluster::Zero { host } if host != 0 => Some((host, self.cs())),
            Cluster::Compressed { host, size } => Some((host, size)),
            _ => None,
        }
    }

    // ---- writes ----

    /// The active L2 table for L1 index `i`, allocated or copied so it is writable in place.
    pub fn l2_for_write(&mut self, i: usize) -> Result<u64> {
        if i >= self.l1.len() {
            return Err(Error::InvalidArgument(
                "write beyond the end of the image".into(),
            ));
        }
        let e = self.l1[i];
        let old = e & L1_OFFSET_MASK;
        if old != 0 && e & COPIED != 0 {
            return Ok(old);
        }
        let data = if old == 0 {
            vec![0u8; self.cs() as usize]
        } else {
            self.load(TableKind::L2, old)?;
            self.l2_cache
                .get(old)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| Error::Invalid("L2 cache miss".into()))?
        };
        let new = self.alloc_run(1)?;
        if new == 0 {
            return Err(self.prevent("Preventing invalid allocation of L2 table at offset 0"));
        }
        // Stored at once (as QEMU does): the cluster is the file's from now on, so a full
        // disk fails this request rather than a later write-back.
        if let Err(e) = self.checked_write(&[], &data, new) {
            self.free_now(new, self.cs())?;
            return Err(e);
        }
        self.insert_new(TableKind::L2, new, data)?;
        self.l1[i] = new | COPIED;
        self.l1_dirty.insert(i);
        if old != 0 {
            self.queue_free(old, self.cs());
        }
        Ok(new)
    }

    /// Set the L2 entry of active guest cluster `gc`.
    pub fn set_mapping(&mut self, gc: u64, entry: u64) -> Result<()> {
        let l2 = self.l2_for_write((gc >> self.l2_bits()) as usize)?;
        self.set_l2_entry(l2, gc & ((1 << self.l2_bits()) - 1), entry)
    }

    /// Adopts `l1` as the active L1 table, as stored (a grown table).
    pub(crate) fn replace_l1(&mut self, l1: Vec<u64>) {
        self.l1 = l1;
        self.l1_dirty.clear();
    }

    pub fn set_l1_entry(&mut self, i: usize, v: u64) {
        self.l1[i] = v;
        self.l1_dirty.insert(i);
    }

    /// Decide the next step of a write of `remaining` bytes at guest offset `pos`.
    pub fn plan_write(&mut self, pos: u64, remaining: u64) -> Result<WriteStep> {
        let cs = self.cs();
        let first = pos / cs;
        let within = pos % cs;
        let count = (within + remaining).div_ceil(cs);
        match self.map(first)? {
            Cluster::Data { host, copied: true } => {
                let mut n = 1;
                while n < count {
                    match self.map(first + n)? {
                        Cluster::Data {
                            host: h,
                            copied: true,
                        } if h == host + n * cs => n += 1,
                        _ => break,
                    }
                }
                let len = (n * cs - within).min(remaining) as usize;
                self.check_write(&[], host + within, len as u64)?;
                Ok(WriteStep::InPlace {
                    host: host + within,
                    len,
                })
            }
            c => {
                let mut old = vec![c];
                let max = count.min(self.max_run());
                while (old.len() as u64) < max {
                    match self.map(first + old.len() as u64)? {
                        Cluster::Data { copied: true, .. } => break,
                        c => old.push(c),
                    }
                }
                let n = old.len() as u64;
                let host = self.alloc_run(n)?;
                let len = (n * cs - within).min(remaining) as usize;
                if let Err(e) = self.check_write(&[], host, n * cs) {
                    self.queue_free(host, n * cs);
                    return Err(e);
                }
                Ok(WriteStep::Allocate {
                    host,
                    first,
                    old,
                    len,
                })
            }
        }
    }

    /// Point guest clusters `first..` at the freshly written run at `host`.
    pub fn install(&mut self, first: u64, host: u64, old: &[Cluster]) -> Result<()> {
        let cs = self.cs();
        for (i, c) in old.iter().enumerate() {
            self.set_mapping(first + i as u64, (host + i as u64 * cs) | COPIED)?;
            if let Some((h, len)) = self.host_range(*c) {
                self.queue_free(h, len);
            }
        }
        Ok(())
    }

    // ---- write-back ----

    pub(crate) fn write_dirty_refblocks(&mut self) -> Result<bool> {
        let dirty = self.rb_cache.dirty_offsets();
        for &off in &dirty {
            if let Some(d) = self.rb_cache.get(off).map(<[u8]>::to_vec) {
                self.checked_write(&[Metadata::RefcountBlock], &d, off)?;
            }
            self.rb_cache.mark_clean(off);
        }
        let rt = std::mem::take(&mut self.reftable_dirty);
        for (k, &i) in rt.iter().enumerate() {
            let off = self.h.refcount_table_offset + i as u64 * 8;
            let entry = self.reftable[i].to_be_bytes();
            if let Err(e) = self.checked_write(&[Metadata::RefcountTable], &entry, off) {
                // Still to store.
                self.reftable_dirty.extend(rt.iter().skip(k));
                return Err(e);
            }
        }
        Ok(!dirty.is_empty() || !rt.is_empty())
    }

    /// Dirty L2 or L1 entries: a write-back flushes the file at least once under the lock
    /// before storing them.
    pub fn tables_dirty(&self) -> bool {
        self.l2_cache.has_dirty() || !self.l1_dirty.is_empty()
    }

    /// Store all dirty metadata in crash-safe order (see the module doc).
    pub fn write_back(&mut self) -> Result<()> {
        self.in_write_back = true;
        let r = self.write_back_ordered();
        self.in_write_back = false;
        r
    }

    fn write_back_ordered(&mut self) -> Result<()> {
        let refs_written = self.write_dirty_refblocks()?;
        let tables_dirty = self.l2_cache.has_dirty() || !self.l1_dirty.is_empty();
        if tables_dirty {
            if refs_written {
                self.storage.flush()?;
            }
            for off in self.l2_cache.dirty_offsets() {
                if let Some(d) = self.l2_cache.get(off).map(<[u8]>::to_vec) {
                    self.checked_write(&[Metadata::ActiveL2], &d, off)?;
                }
                self.l2_cache.mark_clean(off);
            }
            if !self.l1_dirty.is_empty() {
                self.storage.flush()?;
                let dirty = std::mem::take(&mut self.l1_dirty);
                for (k, &i) in dirty.iter().enumerate() {
                    let off = self.h.l1_table_offset + i as u64 * 8;
                    let entry = self.l1[i].to_be_bytes();
                    if let Err(e) = self.checked_write(&[Metadata::ActiveL1], &entry, off) {
                        self.l1_dirty.extend(dirty.iter().skip(k));
                        return Err(e);
                    }
                }
            }
        }
        // A reader that mapped a guest range may still be reading a cluster freed here: keep
        // the frees for a write-back with no reader between mapping and reading.
        if !self.pending_frees.is_empty() && self.readers.load(Ordering::Acquire) == 0 {
            if tables_dirty {
                self.storage.flush()?;
            }
            let frees = std::mem::take(&mut self.pending_frees);
            for (off, len) in frees {
                self.free_now(off, len)?;
            }
            self.write_dirty_refblocks()?;
        }
        Ok(())
    }

    pub fn write_header(&mut self) -> Result<()> {
        let b = self.h.serialize()?;
        self.storage.write_at(&b, 0)?;
        Ok(())
    }

    /// The image is inconsistent (found on the write path): set the corrupt bit, tell the
    /// listener once, and take no more I/O (QEMU's `qcow2_signal_corruption`, fatal).
    pub fn signal_corruption(&mut self, message: String, offset: Option<u64>, size: Option<u64>) {
        if self.broken {
            return;
        }
        self.broken = true;
        self.h.incompatible |= INCOMPAT_CORRUPT;
        let _ = self.write_header().and_then(|_| Ok(self.storage.flush()?));
        if let Some(listener) = &self.corruption_listener {
            listener(&Corruption {
                message,
                offset,
                size,
            });
        }
    }

    /// The first kind of metadata (in QEMU's order) that `[offset, offset + size)` overlaps,
    /// among the checked kinds other than `ignore`.
    fn overlapping(&self, ignore: &[Metadata], offset: u64, size: u64) -> Result<Option<Metadata>> {
        let checks = self.overlap_checks;
        let on = |m: Metadata| checks.contains(m) && !ignore.contains(&m);
        if size == 0 {
            return Ok(None);
        }
        let cs = self.cs();
        if on(Metadata::MainHeader) && offset < cs {
            return Ok(Some(Metadata::MainHeader));
        }
        // Whole clusters, as QEMU compares them.
        let start = offset - offset % cs;
        let len = (offset % cs + size).div_ceil(cs).saturating_mul(cs);
        let hits = |at: u64, n: u64| ranges_overlap(start, len, at, n);
        if on(Metadata::ActiveL1)
            && !self.l1.is_empty()
            && hits(self.h.l1_table_offset, self.l1.len() as u64 * 8)
        {
            return Ok(Some(Metadata::ActiveL1));
        }
        if on(Metadata::RefcountTable)
            && hits(self.h.refcount_table_offset, self.reftable.len() as u64 * 8)
        {
            return Ok(Some(Metadata::RefcountTable));
        }
        if on(Metadata::SnapshotTable)
            && self.h.nb_snapshots > 0
            && hits(self.h.snapshots_offset, self.snapshot_table_len)
        {
            return Ok(Some(Metadata::SnapshotTable));
        }
        if on(Metadata::InactiveL1)
            && self
                .snapshots
                .iter()
                .any(|s| s.l1_size > 0 && hits(s.l1_table_offset, u64::from(s.l1_size) * 8))
        {
            return Ok(Some(Metadata::InactiveL1));
        }
        if on(Metadata::ActiveL2)
            && self
                .l1
                .iter()
                .any(|&e| e & L1_OFFSET_MASK != 0 && hits(e & L1_OFFSET_MASK, cs))
        {
            return Ok(Some(Metadata::ActiveL2));
        }
        if on(Metadata::RefcountBlock)
            && self
                .reftable
                .iter()
                .any(|&e| e & REFT_OFFSET_MASK != 0 && hits(e & REFT_OFFSET_MASK, cs))
        {
            return Ok(Some(Metadata::RefcountBlock));
        }
        if on(Metadata::InactiveL2) {
            for s in &self.snapshots {
                if s.l1_size == 0 {
                    continue;
                }
                for e in self.snapshot_l1(s)? {
                    if e & L1_OFFSET_MASK != 0 && hits(e & L1_OFFSET_MASK, cs) {
                        return Ok(Some(Metadata::InactiveL2));
                    }
                }
            }
        }
        if on(Metadata::BitmapDirectory)
            && let Some(ext) = self.h.bitmaps
            && hits(ext.directory_offset, ext.directory_size)
        {
            return Ok(Some(Metadata::BitmapDirectory));
        }
        Ok(None)
    }

    /// Refuse an allocation that the image's metadata makes invalid: the image is marked
    /// corrupt (told without an offset, as QEMU does) and the request fails.
    fn prevent(&mut self, message: &str) -> Error {
        self.signal_corruption(message.to_string(), None, None);
        Error::MetadataOverlap(message.to_string())
    }

    /// Refuse a write of `size` bytes at `offset` that would land on metadata other than
    /// `ignore` (the kinds being written): the image is marked corrupt and the write fails.
    pub fn check_write(&mut self, ignore: &[Metadata], offset: u64, size: u64) -> Result<()> {
        if self.broken {
            return Err(Error::Corrupt);
        }
        if let Some(m) = self.overlapping(ignore, offset, size)? {
            let message = format!(
                "Preventing invalid write on metadata (overlaps with {})",
                m.name()
            );
            self.signal_corruption(message.clone(), Some(offset), Some(size));
            return Err(Error::MetadataOverlap(message));
        }
        Ok(())
    }

    /// Write `buf` at `offset` once [`Meta::check_write`] allows it.
    pub fn checked_write(&mut self, ignore: &[Metadata], buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(ignore, offset, buf.len() as u64)?;
        self.storage.write_at(buf, offset)?;
        Ok(())
    }

    /// Write `data` into freshly allocated clusters; returns their offset.
    pub fn store_blob(&mut self, data: &[u8]) -> Result<u64> {
        let cs = self.cs();
        let n = (data.len() as u64).div_ceil(cs).max(1);
        let off = self.alloc_run(n)?;
        let mut buf = data.to_vec();
        buf.resize((n * cs) as usize, 0);
        self.checked_write(&[], &buf, off)?;
        Ok(off)
    }
}

impl Meta {
    /// Refcount block `off` as stored (through the cache).
    pub(crate) fn refblock_bytes(&mut self, off: u64) -> Result<Vec<u8>> {
        self.load(TableKind::Refblock, off)?;
        self.rb_cache
            .get(off)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Invalid("refcount cache miss".into()))
    }

    /// One past the highest cluster that the file, this session's allocations or any refcount
    /// claim: clusters from here on are free and unreferenced.
    pub(crate) fn referenced_end(&mut self) -> Result<u64> {
        let mut end = self.storage.len()?.div_ceil(self.cs()).max(self.alloc_end);
        let per = 1u64 << self.rb_bits();
        for bi in (0..self.reftable.len()).rev() {
            let off = self.reftable[bi] & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let block = self.refblock_bytes(off)?;
            if let Some(i) = (0..per as usize)
                .rev()
                .find(|&i| rc_get(&block, self.h.refcount_order, i) != 0)
            {
                end = end.max(bi as u64 * per + i as u64 + 1);
                break;
            }
        }
        Ok(end)
    }

    /// Adopt metadata the header was just switched to (stored and flushed): `l1` and
    /// `reftable` as now on disk, clusters `end..` free.
    pub(crate) fn adopt_switched(&mut self, l1: Vec<u64>, reftable: Vec<u64>, end: u64) {
        self.l1 = l1;
        self.l1_dirty.clear();
        self.reftable = reftable;
        self.reftable_dirty.clear();
        self.rb_cache.clear();
        self.free_hint = 0;
        self.run_hint = 0;
        self.alloc_end = self.alloc_end.max(end);
    }

    pub(crate) fn refcount_get(&self, block: &[u8], i: usize) -> u64 {
        rc_get(block, self.h.refcount_order, i)
    }

    pub(crate) fn refcount_limit(&self) -> u64 {
        self.max_refcount()
    }
}
