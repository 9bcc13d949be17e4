//! The image: opening, creating, reading, writing, flushing and closing.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use crate::bitmap::{self, PersistentBitmap};
use crate::header::{AUTOCLEAR_BITMAPS, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAGIC};
use crate::meta::{Cluster, Extent, Meta, WriteStep, ZERO};
use crate::overlap::{CorruptionListener, OverlapChecks};
use crate::snapshot::{self, SnapshotInfo};
use crate::storage::{Backing, PageBuf, RawImage, Storage};
use crate::{Error, Result, invalid};

/// How deep a chain of backing files [`Image::open_file`] follows.
const MAX_BACKING_DEPTH: usize = 32;

/// Facts about an open image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// Backing file format as stored in the header extension.
    pub backing_format: Option<String>,
    /// The corrupt bit is set.
    pub corrupt: bool,
}

/// How a range of the guest disk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this image.
    Data,
    /// Reads as zeros, stored as such in this image.
    Zero,
    /// Not allocated in this image: reads from the backing image (or zeros without one).
    Unallocated,
}

/// An open qcow2 image. All methods take `&self`; data I/O of concurrent requests runs in
/// parallel, metadata updates are serialised by an internal lock.
pub struct Image {
    pub(crate) storage: Arc<dyn Storage>,
    meta: Mutex<Meta>,
    /// Shared by data writes, exclusive for snapshot and bitmap operations, resizes and
    /// close.
    pub(crate) ops: RwLock<()>,
    /// Guest cluster ranges being written, so two writes never allocate the same cluster.
    claims: Mutex<Vec<(u64, u64)>>,
    claims_free: Condvar,
    backing: RwLock<Option<Arc<dyn Backing>>>,
    read_only: bool,
    /// The virtual size (changed only by a resize, under `ops` held exclusively).
    pub(crate) size: AtomicU64,
    cluster_size: u64,
    pub(crate) written: AtomicBool,
    closed: AtomicBool,
}

struct Claim<'a> {
    image: &'a Image,
    range: (u64, u64),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut c = self.image.claims.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = c.iter().position(|r| *r == self.range) {
            c.swap_remove(i);
        }
        self.image.claims_free.notify_all();
    }
}

/// A read between mapping its range and finishing its data I/O (see `Meta::readers`).
struct Reading(Arc<AtomicUsize>);

impl Reading {
    /// Count a reader; called with the metadata lock held, before mapping.
    fn start(readers: &Arc<AtomicUsize>) -> Reading {
        readers.fetch_add(1, Ordering::AcqRel);
        Reading(readers.clone())
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn read_header(st: &dyn Storage) -> Result<Header> {
    let len = st.len()?;
    let mut probe = [0u8; 24];
    st.read_at(&mut probe, 0)?;
    let bits = u32::from_be_bytes([probe[20], probe[21], probe[22], probe[23]]).clamp(9, 21);
    let n = (1u64 << bits).min(len).max(72) as usize;
    let mut buf = vec![0u8; n];
    st.read_at(&mut buf, 0)?;
    buf.truncate(len.min(n as u64) as usize);
    Header::parse(&buf)
}

fn read_u64s(st: &dyn Storage, off: u64, n: usize) -> Result<Vec<u64>> {
    let mut b = vec![0u8; n * 8];
    st.read_at(&mut b, off)?;
    Ok(b.chunks_exact(8)
        .map(|c| crate::header::get_be64(c, 0))
        .collect())
}

/// Create an empty version 3 image of `size` bytes (rounded up to a multiple of 512, as QEMU
/// does) on `storage` (which is truncated), with `cluster_size` (a power of two from 512 to
/// 2 MiB) and optionally a backing file `(name, format)` recorded in the header.
pub fn create(
    storage: &dyn Storage,
    size: u64,
    cluster_size: u32,
    backing: Option<(&str, &str)>,
) -> Result<()> {
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::InvalidArgument(
            "cluster size must be a power of two from 512 to 2M".into(),
        ));
    }
    let cs = u64::from(cluster_size);
    let bits = cluster_size.trailing_zeros();
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::InvalidArgument("image size too large".into()))?;
    let l1_size = size.div_ceil(cs).div_ceil(cs / 8);
    if l1_size > crate::header::MAX_L1_ENTRIES || size > 1 << 62 {
        return Err(Error::InvalidArgument(
            "image size too large for the cluster size".into(),
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    // Layout: header, refcount table, refcount block, L1 table.
    let rb_entries = cs * 8 / 16;
    if 3 + l1_clusters > rb_entries {
        return Err(Error::InvalidArgument(
            "image size too large for the cluster size".into(),
        ));
    }
    if let Some((name, fmt)) = backing
        && (name.is_empty() || name.len() > 1023 || fmt.is_empty() || fmt.len() > 16)
    {
        return Err(Error::InvalidArgument(
            "backing file name or format invalid".into(),
        ));
    }
    let h = Header {
        version: 3,
        cluster_bits: bits,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: if l1_size > 0 { 3 * cs } else { 0 },
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: 4,
        backing_file: backing.map(|b| b.0.to_string()),
        backing_format: backing.map(|b| b.1.to_string()),
        bitmaps: None,
        unknown_extensions: Vec::new(),
        unknown_fields: Vec::new(),
    };
    let total = 3 + if l1_size > 0 { l1_clusters } else { 0 };
    let mut img = vec![0u8; (total * cs) as usize];
    let hb = h.serialize()?;
    img[..hb.len()].copy_from_slice(&hb);
    img[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    for c in 0..total as usize {
        let at = 2 * cs as usize + 2 * c;
        img[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    storage.set_len(0)?;
    storage.write_at(&img, 0)?;
    storage.flush()?;
    Ok(())
}

impl Image {
    /// Open the image on `storage`. Unallocated clusters read from `backing` if given (the
    /// caller opens the chain; see [`Image::backing_file`]), else as zeros.
    pub fn open(
        storage: Arc<dyn Storage>,
        read_only: bool,
        backing: Option<Arc<dyn Backing>>,
    ) -> Result<Image> {
        let mut h = read_header(&*storage)?;
        if !read_only {
            if h.version < 3 {
                return Err(Error::Unsupported(
                    "writing version 2 images (open read-only, or upgrade with 'qemu-img amend -o compat=v3')"
                        .into(),
                ));
            }
            if h.incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(Error::Corrupt);
            }
        }
        let cs = h.cluster_size();
        let l1 = read_u64s(&*storage, h.l1_table_offset, h.l1_size as usize)?;
        let reftable = read_u64s(
            &*storage,
            h.refcount_table_offset,
            (u64::from(h.refcount_table_clusters) * cs / 8) as usize,
        )?;
        let (snapshots, snapshot_table_len) = if h.nb_snapshots > 0 {
            snapshot::read_table(&*storage, &h)?
        } else {
            (Vec::new(), 0)
        };
        let consistent_bitmaps = h.autoclear & AUTOCLEAR_BITMAPS != 0;
        let bitmaps = match (&h.bitmaps, consistent_bitmaps) {
            (Some(ext), true) => bitmap::load(&*storage, &h, ext)?,
            _ => Vec::new(),
        };
        let mut rewrite = false;
        if !read_only {
            // Bitmaps written by a program unaware of them are stale: drop the extension.
            if h.bitmaps.is_some() && !consistent_bitmaps {
                h.bitmaps = None;
                rewrite = true;
            }
            // Unknown autoclear features become invalid as soon as we write.
            if h.autoclear & !AUTOCLEAR_BITMAPS != 0 {
                h.autoclear &= AUTOCLEAR_BITMAPS;
                rewrite = true;
            }
        }
        let size = h.size;
        let mut meta = Meta::new(storage.clone(), h, l1, reftable);
        meta.snapshots = snapshots;
        meta.snapshot_table_len = snapshot_table_len;
        meta.bitmaps = bitmaps;
        if rewrite {
            meta.write_header()?;
            storage.flush()?;
        }
        // A dirty image (lazy refcounts, not closed cleanly) gets its refcounts rebuilt.
        if !read_only && meta.h.incompatible & INCOMPAT_DIRTY != 0 {
            meta.rebuild_refcounts()?;
        }
        if !read_only {
            meta.mark_bitmaps_in_use()?;
        }
        Ok(Image {
            storage,
            meta: Mutex::new(meta),
            ops: RwLock::new(()),
            claims: Mutex::new(Vec::new()),
            claims_free: Condvar::new(),
            backing: RwLock::new(backing),
            read_only,
            size: AtomicU64::new(size),
            cluster_size: cs,
            written: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// Open an image file and its backing chain as QEMU resolves it: a relative backing name
    /// is relative to the image's directory; the format comes from the header extension, or is
    /// probed (qcow2 or raw). Backing files are opened read-only.
    pub fn open_file(path: impl AsRef<Path>, read_only: bool) -> Result<Image> {
        Self::open_file_at_depth(path.as_ref(), read_only, 0)
    }

    fn open_file_at_depth(path: &Path, read_only: bool, depth: usize) -> Result<Image> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let storage: Arc<dyn Storage> = Arc::new(file);
        let h = read_header(&*storage)?;
        let backing = match &h.backing_file {
            None => None,
            Some(name) => Some(open_backing(
                path,
                name,
                h.backing_format.as_deref(),
                depth,
            )?),
        };
        Image::open(storage, read_only, backing)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument("image is closed".into()));
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        self.check_open()?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.lock().h.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Error::Corrupt);
        }
        Ok(())
    }

    fn check_range(&self, off: u64, len: u64, size: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "request at {off} of {len} bytes is beyond the disk size {size}"
            ))),
        }
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Header facts.
    pub fn info(&self) -> ImageInfo {
        let m = self.lock();
        ImageInfo {
            version: m.h.version,
            size: m.h.size,
            cluster_size: m.cs(),
            refcount_bits: 1 << m.h.refcount_order,
            backing_file: m.h.backing_file.clone(),
            backing_format: m.h.backing_format.clone(),
            corrupt: m.h.incompatible & INCOMPAT_CORRUPT != 0,
        }
    }

    /// The backing file `(name, format)` recorded in the header, for the caller to open.
    pub fn backing_file(&self) -> Option<(String, Option<String>)> {
        let m = self.lock();
        m.h.backing_file
            .clone()
            .map(|f| (f, m.h.backing_format.clone()))
    }

    /// Which metadata every write is checked against (QEMU's `overlap-check`; by default
    /// [`OverlapChecks::CACHED`]).
    pub fn set_overlap_checks(&self, checks: OverlapChecks) {
        self.lock().overlap_checks = checks;
    }

    /// Bounds the metadata caches: `l2_bytes` of L2 tables and `refcount_bytes` of refcount
    /// blocks, in whole tables of one cluster each (at least 4 tables each). QEMU's
    /// `l2-cache-size` and `refcount-cache-size` once its `read_cache_sizes` has settled them.
    pub fn set_cache_sizes(&self, l2_bytes: u64, refcount_bytes: u64) {
        let tables = |bytes: u64| usize::try_from(bytes / self.cluster_size).unwrap_or(usize::MAX);
        let mut m = self.lock();
        m.l2_cache.set_capacity(tables(l2_bytes));
        m.rb_cache.set_capacity(tables(refcount_bytes));
    }

    /// `(L2 tables, refcount blocks)` the caches may hold.
    pub fn cache_capacity(&self) -> (usize, usize) {
        let m = self.lock();
        (m.l2_cache.capacity(), m.rb_cache.capacity())
    }

    /// `(L2 tables, refcount blocks)` the caches hold now.
    pub fn cached_tables(&self) -> (usize, usize) {
        let m = self.lock();
        (m.l2_cache.len(), m.rb_cache.len())
    }

    /// QEMU's cache-clean timer callback: drops every clean cached table not used since the
    /// previous call. See [`Image::clean_caches_every`].
    pub fn clean_unused_tables(&self) {
        let mut m = self.lock();
        let (l2_since, rb_since) = m.cleaned_at;
        let l2 = m.l2_cache.clean_unused(l2_since);
        let rb = m.rb_cache.clean_unused(rb_since);
        m.cleaned_at = (l2, rb);
    }

    /// QEMU's `cache-clean-interval`: every `interval` (none: never), the tables not used
    /// since the last pass are dropped ([`Image::clean_unused_tables`]), on a thread shared by
    /// every image, for as long as the image lives.
    pub fn clean_caches_every(self: &Arc<Self>, interval: Option<std::time::Duration>) {
        crate::cleaner::register(Arc::downgrade(self), interval);
    }

    /// Whether the image was marked corrupt while open: it takes no more I/O (QEMU ejects
    /// such a node).
    pub fn is_broken(&self) -> bool {
        self.lock().broken
    }

    /// Who is told when the image is marked corrupt (once per open).
    pub fn set_corruption_listener(&self, listener: CorruptionListener) {
        self.lock().corruption_listener = Some(listener);
    }

    /// Replace the image that unallocated clusters read from (the header is not changed).
    pub fn set_backing(&self, backing: Option<Arc<dyn Backing>>) {
        *self.backing.write().unwrap_or_else(|e| e.into_inner()) = backing;
    }

    /// Record a new backing file `(name, format)` in the header, or none (as block-stream and
    /// block-commit do when they finish). The image read through is set by
    /// [`Image::set_backing`].
    pub fn set_backing_file(&self, backing: Option<(&str, &str)>) -> Result<()> {
        if backing.is_some_and(|(_, fmt)| fmt.is_empty()) {
            return Err(Error::InvalidArgument(
                "backing file name or format invalid".into(),
            ));
        }
        self.set_backing_header(backing.map(|b| b.0), backing.map(|b| b.1))
    }

    /// Writes the header's backing file name and format (a name without a format, as
    /// `qemu-img create -b` without `-F` leaves it, is possible here).
    pub(crate) fn set_backing_header(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        self.check_writable()?;
        if name.is_some_and(|n| n.is_empty() || n.len() > 1023)
            || format.is_some_and(|f| f.len() > 16)
        {
            return Err(Error::InvalidArgument(
                "backing file name or format invalid".into(),
            ));
        }
        let _ops = self.ops.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        let old = (m.h.backing_file.take(), m.h.backing_format.take());
        m.h.backing_file = name.map(str::to_string);
        m.h.backing_format = format.map(str::to_string);
        if let Err(e) = m.h.serialize() {
            (m.h.backing_file, m.h.backing_format) = old;
            return Err(e);
        }
        m.write_header()?;
        self.storage.flush()?;
        Ok(())
    }

    /// Read `buf.len()` bytes of the disk at `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_open()?;
        self.check_range(off, buf.len() as u64, self.size())?;
        // Held to the end of the data I/O: `close` and the other exclusive operations wait
        // for every read in flight (no reader outlives them).
        let _ops = self.ops.read().unwrap_or_else(|e| e.into_inner());
        let (extents, _reading) = {
            let mut m = self.lock();
            if m.broken {
                return Err(Error::Corrupt);
            }
            let reading = Reading::start(&m.readers);
            (m.map_range(None, off, buf.len())?, reading)
        };
        self.read_extents(&extents, buf)
    }

    fn read_extents(&self, extents: &[Extent], buf: &mut [u8]) -> Result<()> {
        let mut pos = 0;
        for e in extents {
            let out = &mut buf[pos..pos + e.len()];
            match *e {
                Extent::Data { host, .. } => self.storage.read_at(out, host)?,
                Extent::Zero { .. } => out.fill(0),
                Extent::Backing { guest, .. } => self.read_backing(out, guest)?,
                Extent::Compressed {
                    host, size, skip, ..
                } => {
                    let c = self.decompress(host, size)?;
                    out.copy_from_slice(&c[skip..skip + out.len()]);
                }
            }
            pos += e.len();
        }
        Ok(())
    }

    fn read_backing(&self, out: &mut [u8], guest: u64) -> Result<()> {
        let backing = self
            .backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match backing {
            Some(b) => {
                let bsize = b.size();
                let n = bsize.saturating_sub(guest).min(out.len() as u64) as usize;
                if n > 0 {
                    b.read_at(&mut out[..n], guest)?;
                }
                out[n..].fill(0);
            }
            None => out.fill(0),
        }
        Ok(())
    }

    fn decompress(&self, host: u64, size: u64) -> Result<Vec<u8>> {
        use miniz_oxide::inflate::TINFLStatus;
        use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
        if size > 2 * self.cluster_size + 512 {
            return invalid("compressed cluster too large");
        }
        let mut input = PageBuf::zeroed(size as usize);
        self.storage.read_at(&mut input, host)?;
        let mut out = vec![0u8; self.cluster_size as usize];
        let mut d = DecompressorOxide::new();
        let (status, _, produced) = decompress(
            &mut d,
            &input,
            &mut out,
            0,
            inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
        );
        match status {
            TINFLStatus::Done | TINFLStatus::HasMoreOutput if produced == out.len() => Ok(out),
            _ => invalid(format!(
                "compressed cluster at {host:#x} does not inflate to a cluster"
            )),
        }
    }

    /// The contents of part of a guest cluster as mapped by `old` (for copy-on-write).
    fn read_old(&self, old: Cluster, guest: u64, out: &mut [u8]) -> Result<()> {
        let within = (guest % self.cluster_size) as usize;
        match old {
            Cluster::Unallocated => {
                let n = self.size().saturating_sub(guest).min(out.len() as u64) as usize;
                self.read_backing(&mut out[..n], guest)?;
                out[n..].fill(0);
            }
            Cluster::Zero { .. } => out.fill(0),
            Cluster::Data { host, .. } => self.storage.read_at(out, host + within as u64)?,
            Cluster::Compressed { host, size } => {
                let c = self.decompress(host, size)?;
                out.copy_from_slice(&c[within..within + out.len()]);
            }
        }
        Ok(())
    }

    fn claim(&self, first: u64, end: u64) -> Claim<'_> {
        let mut c = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        while c.iter().any(|&(a, b)| a < end && first < b) {
            c = self.claims_free.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.push((first, end));
        Claim {
            image: self,
            range: (first, end),
        }
    }

    /// Write `buf` to the disk at `off`.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let _ops = self.ops.read().unwrap_or_else(|e| e.into_inner());
        self.written.store(true, Ordering::Release);
        let cs = self.cluster_size;
        let _claim = self.claim(off / cs, (off + buf.len() as u64).div_ceil(cs));
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let step = self.lock().plan_write(pos, (buf.len() - done) as u64);
            match step {
                Err(e) => return Err(self.fail(e)),
                Ok(WriteStep::InPlace { host, len }) => {
                    self.storage.write_at(&buf[done..done + len], host)?;
                    done += len;
                }
                Ok(WriteStep::Allocate {
                    host,
                    first,
                    old,
                    len,
                }) => {
                    let data = &buf[done..done + len];
                    if let Err(e) = self.write_run(host, first, &old, pos, data) {
                        self.lock().queue_free(host, old.len() as u64 * cs);
                        return Err(e);
                    }
                    // (The guard must be gone before `fail` locks again.)
                    let installed = self.lock().install(first, host, &old);
                    installed.map_err(|e| self.fail(e))?;
                    done += len;
                }
            }
        }
        Ok(())
    }

    /// Write one guest cluster compressed (QEMU's `qcow2_co_pwritev_compressed_part`): `off`
    /// is cluster aligned and `buf` a whole cluster, or the rest of the disk in its last
    /// cluster. Deflated as QEMU's default `zlib` compression type stores it (raw deflate with
    /// a 4 KiB window, which QEMU's inflate requires); data that does not shrink below a
    /// cluster is written uncompressed, as QEMU does.
    pub fn write_compressed(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64, self.size())?;
        let cs = self.cluster_size;
        if !off.is_multiple_of(cs)
            || (buf.len() as u64 != cs && off + buf.len() as u64 != self.size())
            || buf.len() as u64 > cs
        {
            return Err(Error::InvalidArgument(
                "compressed writes must be of whole clusters".into(),
            ));
        }
        let mut cluster = PageBuf::zeroed(cs as usize);
        cluster[..buf.len()].copy_from_slice(buf);
        let Some(mut data) = deflate(&cluster, cs as usize - 1) else {
            return self.write_at(buf, off);
        };
        // Sector aligned, so that packed clusters never share a sector's write.
        data.resize(data.len().next_multiple_of(512), 0);
        let len = data.len() as u64;
        let _ops = self.ops.read().unwrap_or_else(|e| e.into_inner());
        self.written.store(true, Ordering::Release);
        let gc = off / cs;
        let _claim = self.claim(gc, gc + 1);
        let host = self
            .lock()
            .alloc_compressed(len)
            .map_err(|e| self.fail(e))?;
        if let Err(e) = self.storage.write_at(&data, host) {
            self.lock().queue_free(host, len);
            return Err(e.into());
        }
        let mut m = self.lock();
        let old = m.map(gc).map_err(|e| self.fail_locked(&mut m, e))?;
        let entry = m.compressed_entry(host, len);
        m.set_mapping(gc, entry)
            .map_err(|e| self.fail_locked(&mut m, e))?;
        if let Some((h, l)) = m.host_range(old) {
            m.queue_free(h, l);
        }
        Ok(())
    }

    /// Write a fresh run: the request's bytes plus the untouched parts of its first and last
    /// cluster, in one storage write.
    fn write_run(
        &self,
        host: u64,
        first: u64,
        old: &[Cluster],
        pos: u64,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.cluster_size;
        let run = old.len() as u64 * cs;
        let head = (pos - first * cs) as usize;
        let tail = head + data.len();
        if head == 0 && tail as u64 == run {
            self.storage.write_at(data, host)?;
            return Ok(());
        }
        let mut b = PageBuf::zeroed(run as usize);
        if head > 0 {
            self.read_old(old[0], first * cs, &mut b[..head])?;
        }
        b[head..tail].copy_from_slice(data);
        if (tail as u64) < run {
            let last = old.len() - 1;
            self.read_old(old[last], first * cs + tail as u64, &mut b[tail..])?;
        }
        self.storage.write_at(&b, host)?;
        Ok(())
    }

    /// Mark the image corrupt if `e` says its metadata is inconsistent.
    fn fail(&self, e: Error) -> Error {
        self.fail_locked(&mut self.lock(), e)
    }

    /// Make `[off, off + len)` read as zeros, as QEMU's write-zeroes without `MAY_UNMAP`:
    /// whole clusters of a version 3 image get the zero flag and keep their data clusters
    /// (compressed ones excepted); partial clusters are written.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.zero_or_discard(off, len, Clear::Zero { unmap: false })
    }

    /// Make `[off, off + len)` read as zeros, as QEMU's write-zeroes with `MAY_UNMAP`: whole
    /// clusters also lose their data clusters.
    pub fn write_zeroes_unmap(&self, off: u64, len: u64) -> Result<()> {
        self.zero_or_discard(off, len, Clear::Zero { unmap: true })
    }

    /// Discard `[off, off + len)`: whole clusters lose their data clusters and read as zeros;
    /// partial clusters are left as they are.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.zero_or_discard(off, len, Clear::Discard)
    }

    fn zero_or_discard(&self, off: u64, len: u64, how: Clear) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len, self.size())?;
        let zero_partial = how != Clear::Discard;
        let cs = self.cluster_size;
        let end = off + len;
        // Whole clusters; the last cluster counts as whole if the disk ends in it.
        let first = off.div_ceil(cs);
        let last = if end == self.size() {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first >= last {
            if zero_partial && len > 0 {
                // Within one cluster (a head and a tail in two clusters are two parts).
                let split = ((off / cs + 1) * cs).min(end);
                self.zero_part(off, split - off, how)?;
                if split < end {
                    self.zero_part(split, end - split, how)?;
                }
            }
            return Ok(());
        }
        if zero_partial {
            if off < first * cs {
                self.zero_part(off, first * cs - off, how)?;
            }
            if last * cs < end {
                self.zero_part(last * cs, end - last * cs, how)?;
            }
        }
        let has_backing = self
            .backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let (has_backing, v3) = {
            let m = self.lock();
            (has_backing || m.h.backing_file.is_some(), m.h.version >= 3)
        };
        if zero_partial && !v3 && has_backing {
            // Version 2 cannot mark zeroes over a backing file: they are written (QEMU
            // falls back to that too).
            const CHUNK: u64 = 1 << 20;
            let zeros = PageBuf::zeroed(CHUNK.min((last - first) * cs) as usize);
            let (mut pos, stop) = (first * cs, (last * cs).min(self.size()));
            while pos < stop {
                let n = (stop - pos).min(CHUNK);
                self.write_at(&zeros[..n as usize], pos)?;
                pos += n;
            }
            return Ok(());
        }
        let _ops = self.ops.read().unwrap_or_else(|e| e.into_inner());
        self.written.store(true, Ordering::Release);
        let _claim = self.claim(first, last);
        let mut m = self.lock();
        for gc in first..last {
            let old = m.map(gc).map_err(|e| self.fail_locked(&mut m, e))?;
            let Some((entry, free)) = cleared(old, how, v3, has_backing) else {
                continue;
            };
            m.set_mapping(gc, entry)?;
            if free && let Some((h, l)) = m.host_range(old) {
                m.queue_free(h, l);
            }
        }
        Ok(())
    }

    /// Zeroes `[off, off + len)` inside one cluster as QEMU's `qcow2_co_pwrite_zeroes` does:
    /// a cluster that already reads as zeroes (a zero cluster, or unallocated with no
    /// backing file) becomes a zero cluster as a whole; any other has the zeroes written.
    fn zero_part(&self, off: u64, len: u64, how: Clear) -> Result<()> {
        let cs = self.cluster_size;
        let gc = off / cs;
        let has_backing = self
            .backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        {
            let _ops = self.ops.read().unwrap_or_else(|e| e.into_inner());
            let _claim = self.claim(gc, gc + 1);
            let mut m = self.lock();
            let has_backing = has_backing || m.h.backing_file.is_some();
            if m.h.version >= 3 {
                let old = m.map(gc).map_err(|e| self.fail_locked(&mut m, e))?;
                let reads_zero = match old {
                    Cluster::Zero { .. } => true,
                    Cluster::Unallocated => !has_backing,
                    _ => false,
                };
                if reads_zero {
                    if let Some((entry, free)) = cleared(old, how, true, has_backing) {
                        self.written.store(true, Ordering::Release);
                        m.set_mapping(gc, entry)?;
                        if free && let Some((h, l)) = m.host_range(old) {
                            m.queue_free(h, l);
                        }
                    }
                    return Ok(());
                }
            }
        }
        self.write_at(&PageBuf::zeroed(len as usize), off)
    }

    fn fail_locked(&self, m: &mut Meta, e: Error) -> Error {
        if let Error::Invalid(why) = &e {
            m.signal_corruption(why.clone(), None, None);
        }
        e
    }

    /// How `[off, off + len)` starts: its allocation and the length of the run that shares it.
    pub fn block_status(&self, off: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check_open()?;
        self.check_range(off, len, self.size())?;
        let cs = self.cluster_size;
        let mut m = self.lock();
        let kind = |c: Cluster| match c {
            Cluster::Unallocated => Allocation::Unallocated,
            Cluster::Zero { .. } => Allocation::Zero,
            _ => Allocation::Data,
        };
        let a = kind(m.map(off / cs)?);
        let mut n = (cs - off % cs).min(len);
        while n < len && kind(m.map((off + n) / cs)?) == a {
            n = (n + cs).min(len);
        }
        Ok((a, n))
    }

    /// Store cached metadata and make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        // Nothing more is written to an image marked corrupt while open (QEMU ejects it).
        let tables_dirty = {
            let m = self.lock();
            if self.read_only || m.broken {
                return Ok(());
            }
            m.tables_dirty()
        };
        // The write-back's ordering flushes run under the metadata lock, and the first of them
        // writes back every data cluster written since the last flush: an allocating write
        // would wait for all of it (QEMU's `qcow2_write_caches` stalls the same way). Written
        // back here first, without the lock, those flushes only have what came meanwhile.
        // An extra flush, never a missing one: the order of what becomes durable is unchanged.
        if tables_dirty {
            self.storage.flush()?;
        }
        self.lock().write_back()?;
        // The final flush needs no metadata lock: other requests go on meanwhile.
        self.storage.flush()?;
        Ok(())
    }

    /// Flush, release the bitmaps' in-use marks where their bits are still right, and close.
    /// Further calls fail. Call [`Image::store_bitmaps`] first to persist bitmaps.
    pub fn close(&self) -> Result<()> {
        let _ops = self.ops.write().unwrap_or_else(|e| e.into_inner());
        if self.closed.swap(true, Ordering::AcqRel) || self.read_only {
            return Ok(());
        }
        // Reads hold `ops` shared to the end of their data I/O, so none is in flight here and
        // the write-back applies every free kept back for readers.
        let mut m = self.lock();
        if m.broken {
            return Ok(());
        }
        m.write_back()?;
        debug_assert!(!m.frees_pending(), "no reader in flight at close");
        self.storage.flush()?;
        m.release_bitmaps(self.written.load(Ordering::Acquire))?;
        self.storage.flush()?;
        Ok(())
    }

    // ---- snapshots ----

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.lock()
            .snapshots
            .iter()
            .map(|s| s.info.clone())
            .collect()
    }

    /// Create an internal snapshot of the current disk contents named `name`.
    pub fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        self.check_writable()?;
        let _ops = self.ops.write().unwrap_or_else(|e| e.into_inner());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut m = self.lock();
        let r = m.create_snapshot(name, (now.as_secs() as u32, now.subsec_nanos()));
        r.map_err(|e| self.fail_locked(&mut m, e))
    }

    /// Delete the snapshot with this id (or, failing that, this name), freeing its clusters.
    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.check_writable()?;
        let _ops = self.ops.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        let r = m.delete_snapshot(id_or_name);
        r.map_err(|e| self.fail_locked(&mut m, e))
    }

    /// Read the disk as it was when snapshot `id_or_name` was taken.
    pub fn read_snapshot(&self, id_or_name: &str, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_open()?;
        let _ops = self.ops.read().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        let i = snapshot::find(&m.snapshots, id_or_name)?;
        let s = m.snapshots[i].clone();
        self.check_range(off, buf.len() as u64, s.info.disk_size)?;
        let l1 = m.snapshot_l1(&s)?;
        let _reading = Reading::start(&m.readers);
        let extents = m.map_range(Some(&l1), off, buf.len())?;
        drop(m);
        self.read_extents(&extents, buf)
    }

    // ---- bitmaps ----

    /// The persistent bitmaps stored in the image (as loaded at open or last stored).
    /// Bitmaps with extra data this crate does not know are kept in the image but not listed.
    pub fn bitmaps(&self) -> Vec<PersistentBitmap> {
        self.lock()
            .bitmaps
            .iter()
            .filter(|e| !e.foreign)
            .map(|e| e.bitmap.clone())
            .collect()
    }

    /// Replace all persistent bitmaps with `bitmaps` (an empty slice removes them all).
    pub fn store_bitmaps(&self, bitmaps: &[PersistentBitmap]) -> Result<()> {
        self.check_writable()?;
        let _ops = self.ops.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        let r = m.store_bitmaps(bitmaps);
        r.map_err(|e| self.fail_locked(&mut m, e))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Backing for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        Image::read_at(self, buf, off).map_err(|e| match e {
            Error::Io(e) => e,
            e => std::io::Error::other(e.to_string()),
        })
    }
}

fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    depth: usize,
) -> Result<Arc<dyn Backing>> {
    let fail = |p: &Path, reason: String| Error::Backing {
        path: p.display().to_string(),
        reason,
    };
    let mut path = PathBuf::from(name);
    if path.is_relative() {
        let dir = image
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        path = dir.join(path);
    }
    if depth + 1 >= MAX_BACKING_DEPTH {
        return Err(fail(&path, "backing chain too deep".into()));
    }
    let file = File::open(&path).map_err(|e| fail(&path, e.to_string()))?;
    let format = match format {
        Some(f) => f.to_string(),
        None => {
            let mut magic = [0u8; 4];
            Storage::read_at(&file, &mut magic, 0).map_err(|e| fail(&path, e.to_string()))?;
            if u32::from_be_bytes(magic) == MAGIC {
                "qcow2".into()
            } else {
                "raw".into()
            }
        }
    };
    match format.as_str() {
        "qcow2" => {
            let img = Image::open_file_at_depth(&path, true, depth + 1)
                .map_err(|e| fail(&path, e.to_string()))?;
            Ok(Arc::new(img))
        }
        "raw" => Ok(Arc::new(RawImage::new(Arc::new(file))?)),
        f => Err(fail(&path, format!("unsupported backing format '{f}'"))),
    }
}

/// `data` deflated (raw deflate, 4 KiB window, default level: QEMU's `qcow2_zlib_compress`),
/// or `None` if that takes more than `limit` bytes.
fn deflate(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
    let mut out = Vec::with_capacity(limit);
    match c.compress_vec(data, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) if out.len() <= limit => Some(out),
        _ => None,
    }
}

/// What a range of whole clusters is cleared by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clear {
    /// Write zeroes; `unmap`: QEMU's `BDRV_REQ_MAY_UNMAP`.
    Zero { unmap: bool },
    /// Discard (QEMU's `qcow2_co_pdiscard`, not a full discard).
    Discard,
}

/// The new L2 entry of a cluster mapped as `old`, cleared by `how`, and whether `old`'s host
/// clusters lose their reference; `None`: nothing changes. QEMU's `zero_in_l2_slice` and
/// `discard_in_l2_slice`: a version 3 image marks zeroes with the zero flag (keeping the data
/// cluster unless unmapping, never a compressed one); a discard drops the data and leaves the
/// zero flag where something was allocated or a backing file would show through. Version 2
/// has no zero flag: clusters are unallocated (reading as zeros without a backing file).
fn cleared(old: Cluster, how: Clear, v3: bool, has_backing: bool) -> Option<(u64, bool)> {
    use crate::meta::COPIED;
    if !v3 {
        return match old {
            Cluster::Unallocated => None,
            _ => Some((if has_backing { ZERO } else { 0 }, true)),
        };
    }
    let allocated = !matches!(old, Cluster::Unallocated | Cluster::Zero { host: 0 });
    match (how, old) {
        (_, Cluster::Zero { host: 0 }) => None,
        (Clear::Discard, Cluster::Unallocated) if !has_backing => None,
        (Clear::Discard, _)
        | (Clear::Zero { unmap: true }, _)
        | (_, Cluster::Compressed { .. }) => Some((ZERO, allocated)),
        (Clear::Zero { unmap: false }, Cluster::Zero { .. }) => None,
        (Clear::Zero { unmap: false }, Cluster::Data { host, copied }) => {
            Some((host | ZERO | if copied { COPIED } else { 0 }, false))
        }
        (Clear::Zero { unmap: false }, Cluster::Unallocated) => Some((ZERO, false)),
    }
}
