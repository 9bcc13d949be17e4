//! `qcow2`: the qcow2 format (crate `qcow2`) over a `file` child node, with a backing node for
//! unallocated clusters, persistent dirty bitmaps ([`BitmapStore`]) and internal snapshots
//! ([`InternalSnapshots`]).
//!
//! The image's storage is the `file` child ([`ChildKind::Metadata`]: the qcow2 node takes write
//! and resize on its file and shares neither, so two qcow2 nodes on one file conflict as in
//! QEMU). Data reads and writes fire `read_aio`/`write_aio` on the file child first, so a
//! blkdebug file child can fail them (as well as on its own `pwritev`/`preadv`-style events).
//! Errors from the file child keep their errno.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::bitmap::DirtyBitmap;
use crate::driver::{
    BitmapStore, BlkdebugEvent, BlockDriver, BlockEvent, ChildKind, DriverInfo, InternalSnapshots,
    OpenContext,
};
use crate::error::{BlockError, BlockResult};
use crate::node::BlockNode;
use qmp_api::{
    BlockdevOptionsQcow2, ImageInfoSpecific, ImageInfoSpecificBranch, ImageInfoSpecificQCow2,
    ImageInfoSpecificQCow2Wrapper, Qcow2BitmapInfo, Qcow2BitmapInfoFlags, Qcow2CompressionType,
    SnapshotInfo,
};

/// Incompatible feature bit: the image was not closed cleanly (lazy refcounts).
const INCOMPAT_DIRTY: u64 = 1;
/// Incompatible feature bit: guest data lives in an external data file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Compatible feature bit: lazy refcounts.
const COMPAT_LAZY_REFCOUNTS: u64 = 1;

/// A qcow2 format node.
pub struct Qcow2Driver {
    /// The node's own name (QEMU names it in bitmap errors).
    node_name: String,
    file: Arc<BlockNode>,
    storage: Arc<dyn qcow2::Storage>,
    /// Replaced when the node is reopened read-only.
    image: RwLock<Arc<qcow2::Image>>,
    /// What unallocated clusters read from (kept to hand to a reopened image).
    backing: Mutex<Option<Arc<dyn qcow2::Backing>>>,
    read_only: AtomicBool,
    /// Guest data was written since open: enabled bitmaps' stored bits are stale.
    written: AtomicBool,
    /// The header's dirty bit as found at open (only a read-only open leaves it set).
    dirty_at_open: bool,
    lazy_refcounts: bool,
    /// The cache options, applied again to a reopened image.
    cache: CacheOptions,
}

/// QEMU's default `cache-clean-interval` on Linux, in seconds.
const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;
/// QEMU's default upper bound of the L2 cache.
const DEFAULT_L2_CACHE_MAX_SIZE: u64 = 32 << 20;
/// QEMU's smallest caches, in entries.
const MIN_L2_CACHE_SIZE: u64 = 2;
const MIN_REFCOUNT_CACHE_SIZE: u64 = 4;
/// QEMU's smallest cluster (and L2 cache entry).
const MIN_CLUSTER_SIZE: u64 = 512;

/// The qcow2 cache options once settled: bytes of L2 tables and of refcount blocks (`None`:
/// no size option given, the qcow2 crate's own sizes), and the clean interval in seconds.
#[derive(Debug, Clone, Copy)]
struct CacheOptions {
    sizes: Option<(u64, u64)>,
    clean_interval: u64,
}

impl CacheOptions {
    /// QEMU's `read_cache_sizes` and the cache part of `qcow2_update_options_prepare`: the
    /// same defaults, the same arithmetic, the same errors in the same order.
    fn settle(o: &BlockdevOptionsQcow2, size: u64, cluster_size: u64) -> BlockResult<Self> {
        let non_negative = |name: &str, v: Option<i64>| -> BlockResult<Option<u64>> {
            v.map(|v| {
                u64::try_from(v).map_err(|_| {
                    BlockError::new(format!(
                        "Value '{v}' is out of range for parameter '{name}'"
                    ))
                })
            })
            .transpose()
        };
        let combined_set = non_negative("cache-size", o.cache_size)?;
        let l2_set = non_negative("l2-cache-size", o.l2_cache_size)?;
        let entry_set = non_negative("l2-cache-entry-size", o.l2_cache_entry_size)?;
        let refcount_set = non_negative("refcount-cache-size", o.refcount_cache_size)?;
        let cs = cluster_size;
        let max_l2_entries = size.div_ceil(cs);
        let max_l2_cache = max_l2_entries
            .saturating_mul(8)
            .div_ceil(cs)
            .saturating_mul(cs);
        let min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cs;
        let l2_max_setting = l2_set.unwrap_or(DEFAULT_L2_CACHE_MAX_SIZE);
        let mut refcount = refcount_set.unwrap_or(0);
        let mut entry = entry_set.unwrap_or(cs);
        let mut l2 = max_l2_cache.min(l2_max_setting);
        if let Some(combined) = combined_set {
            if l2_set.is_some() && refcount_set.is_some() {
                return Err(BlockError::new(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the \
                     same time",
                ));
            } else if l2_set.is_some() && l2_max_setting > combined {
                return Err(BlockError::new("l2-cache-size may not exceed cache-size"));
            } else if refcount > combined {
                return Err(BlockError::new(
                    "refcount-cache-size may not exceed cache-size",
                ));
            }
            if l2_set.is_some() {
                refcount = combined - l2;
            } else if refcount_set.is_some() {
                l2 = combined - refcount;
            } else if combined >= max_l2_cache.saturating_add(min_refcount_cache) {
                l2 = max_l2_cache;
                refcount = combined - l2;
            } else {
                refcount = combined.min(min_refcount_cache);
                l2 = combined - refcount;
            }
        }
        if l2 < max_l2_cache && entry_set.is_none() {
            entry = cs.min(4096);
        }
        if entry < MIN_CLUSTER_SIZE || entry > cs || !entry.is_power_of_two() {
            return Err(BlockError::new(format!(
                "L2 cache entry size must be a power of two between {MIN_CLUSTER_SIZE} and the \
                 cluster size ({cs})"
            )));
        }
        let l2_entries = (l2 / entry).max(MIN_L2_CACHE_SIZE);
        if l2_entries > i32::MAX as u64 {
            return Err(BlockError::new("L2 cache size too big"));
        }
        let refcount_blocks = (refcount / cs).max(MIN_REFCOUNT_CACHE_SIZE);
        if refcount_blocks > i32::MAX as u64 {
            return Err(BlockError::new("Refcount cache size too big"));
        }
        // An unsigned number in QEMU: a negative one wraps and is too big as well.
        let clean_interval = o
            .cache_clean_interval
            .map_or(DEFAULT_CACHE_CLEAN_INTERVAL, |v| v as u64);
        if clean_interval > u64::from(u32::MAX) {
            return Err(BlockError::new("Cache clean interval too big"));
        }
        // The caches here hold whole L2 tables: a smaller entry is QEMU's own choice when it
        // picks it, refused when asked for.
        if entry_set.is_some_and(|e| e != cs) {
            return Err(BlockError::new(format!(
                "Parameter 'l2-cache-entry-size' is not supported with a value other than the \
                 cluster size ({cs}) by this block layer"
            )));
        }
        let sized = combined_set.is_some() || l2_set.is_some() || refcount_set.is_some();
        Ok(CacheOptions {
            sizes: sized.then_some((l2_entries * entry, refcount_blocks * cs)),
            clean_interval,
        })
    }

    fn apply(&self, image: &Arc<qcow2::Image>) {
        if let Some((l2, refcount)) = self.sizes {
            image.set_cache_sizes(l2, refcount);
        }
        image.clean_caches_every(
            Some(std::time::Duration::from_secs(self.clean_interval)).filter(|d| !d.is_zero()),
        );
    }
}

/// The options whose `true` asks for what this block layer does not do.
fn refuse_true(o: &BlockdevOptionsQcow2) -> BlockResult<()> {
    for (name, value) in [
        ("lazy-refcounts", o.lazy_refcounts),
        ("pass-discard-request", o.pass_discard_request),
        ("pass-discard-snapshot", o.pass_discard_snapshot),
        ("pass-discard-other", o.pass_discard_other),
        ("discard-no-unref", o.discard_no_unref),
    ] {
        if value == Some(true) {
            return Err(BlockError::new(format!(
                "Parameter '{name}' is not supported with value true by this block layer"
            )));
        }
    }
    Ok(())
}

/// `qcow2::Storage` over the `file` child node.
struct NodeStorage(Arc<BlockNode>);

fn to_io(e: BlockError) -> io::Error {
    match e.errno() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(e.desc().to_string()),
    }
}

impl qcow2::Storage for NodeStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_at(off, buf).map_err(to_io)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_at(off, buf).map_err(to_io)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(to_io)
    }
    fn len(&self) -> io::Result<u64> {
        // Unrounded: the image's end is where new clusters go.
        self.0.driver().size().map_err(to_io)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.truncate(len).map_err(to_io)
    }
}

/// `qcow2::Backing` over the backing node; fires `read_backing_aio` on the overlay's file.
struct NodeBacking {
    node: Arc<BlockNode>,
    overlay_file: Arc<BlockNode>,
}

impl qcow2::Backing for NodeBacking {
    fn size(&self) -> u64 {
        self.node.size().unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.overlay_file.debug_event(BlkdebugEvent::ReadBackingAio);
        self.node.read_at(off, buf).map_err(to_io)
    }
}

/// A qcow2 crate error as a block-layer error: storage errors keep their errno.
fn block_error(e: qcow2::Error) -> BlockError {
    match e {
        qcow2::Error::Io(io) => match io.raw_os_error() {
            Some(errno) => BlockError::from_errno(errno),
            None => BlockError::with_errno(io.to_string(), libc::EIO),
        },
        qcow2::Error::ReadOnly => BlockError::from_errno(libc::EPERM),
        qcow2::Error::InvalidArgument(m) => BlockError::with_errno(m, libc::EINVAL),
        qcow2::Error::NotFound(m) => BlockError::with_errno(m, libc::ENOENT),
        qcow2::Error::Unsupported(m) => BlockError::with_errno(m, libc::ENOTSUP),
        // QEMU ejects a node whose image it marked corrupt: its I/O fails with ENOMEDIUM.
        qcow2::Error::Corrupt => BlockError::from_errno(libc::ENOMEDIUM),
        // The refused write itself fails with EIO, as in QEMU.
        qcow2::Error::MetadataOverlap(_) => BlockError::from_errno(libc::EIO),
        e @ (qcow2::Error::Invalid(_) | qcow2::Error::Backing { .. }) => {
            BlockError::with_errno(e.to_string(), libc::EIO)
        }
    }
}

/// Opens the image in the `file` child. Of `BlockdevOptionsQcow2`: the cache options
/// (`cache-size`, `l2-cache-size`, `refcount-cache-size`, `l2-cache-entry-size`,
/// `cache-clean-interval`) are settled and checked as QEMU's `read_cache_sizes` does, with its
/// words, and bound the qcow2 crate's caches (see [`CacheOptions`]); `overlap-check` acts as in
/// QEMU (see [`overlap_checks`]). What this block layer does not do is refused naming the
/// option: lazy refcounts (`lazy-refcounts: true`; refcounts here are always written as they
/// change), passing discards down (`pass-discard-*: true`: freed clusters stay in the file),
/// `discard-no-unref: true` (a discard frees its clusters), an L2 cache entry other than a whole
/// table. Their `false` values act: that is what happens here. Encryption and external data
/// files are refused. `backing` is the graph's.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsQcow2,
) -> BlockResult<Box<dyn BlockDriver>> {
    let encrypt_format = options
        .encrypt
        .as_ref()
        .map(|e| e.branch.kind().as_str().to_string());
    let data_file = options.data_file.is_some();
    let overlap_checks = overlap_checks(options.overlap_check.as_ref());
    let read_only = ctx.read_only();
    let file = ctx.open_child("file", &options.file, ChildKind::Metadata)?;
    let mut header = [0u8; 88];
    file.read_at(0, &mut header)?;
    if header[..4] != *b"QFI\xfb" {
        return Err(BlockError::with_errno(
            "Image is not in qcow2 format",
            libc::EINVAL,
        ));
    }
    let be64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = be32(4);
    let crypt_method = be32(32);
    if crypt_method != 0 {
        return Err(BlockError::new(
            "Encrypted qcow2 images are not supported by this block layer",
        ));
    }
    if let Some(format) = encrypt_format {
        return Err(BlockError::new(format!(
            "No encryption in image header, but options specified format '{format}'"
        )));
    }
    let (incompatible, compatible) = if version >= 3 {
        (be64(72), be64(80))
    } else {
        (0, 0)
    };
    if data_file {
        let message = if incompatible & INCOMPAT_DATA_FILE != 0 {
            "qcow2 images with an external data file are not supported by this block layer"
        } else {
            "'data-file' can only be set for images with an external data file"
        };
        return Err(BlockError::new(message));
    }
    let storage: Arc<dyn qcow2::Storage> = Arc::new(NodeStorage(file.clone()));
    let image = qcow2::Image::open(storage.clone(), read_only, None).map_err(|e| {
        let desc = match &e {
            qcow2::Error::Corrupt => {
                return BlockError::with_errno(
                    "qcow2: Image is corrupt; cannot be opened read/write",
                    libc::EINVAL,
                );
            }
            qcow2::Error::Io(_) => block_error(e).desc().to_string(),
            _ => e.to_string(),
        };
        BlockError::new(format!("Could not open qcow2 image: {desc}"))
    })?;
    let info = image.info();
    let cache = CacheOptions::settle(options, info.size, info.cluster_size)?;
    if options.lazy_refcounts == Some(true) && info.version < 3 {
        return Err(BlockError::new(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
        ));
    }
    refuse_true(options)?;
    let image = Arc::new(image);
    cache.apply(&image);
    let node_name = ctx.ensure_name()?;
    image.set_overlap_checks(overlap_checks);
    let events = ctx.event_sink();
    let name = node_name.clone();
    image.set_corruption_listener(Arc::new(move |c: &qcow2::Corruption| {
        // QEMU's words on stderr, and BLOCK_IMAGE_CORRUPTED.
        eprintln!(
            "qcow2: Marking image as corrupt: {}; further corruption events will be suppressed",
            c.message
        );
        if let Some(events) = &events {
            events(BlockEvent::ImageCorrupted {
                node_name: name.clone(),
                msg: c.message.clone(),
                offset: c.offset,
                size: c.size,
                fatal: true,
            });
        }
    }));
    Ok(Box::new(Qcow2Driver {
        node_name,
        file,
        storage,
        image: RwLock::new(image),
        cache,
        backing: Mutex::new(None),
        read_only: AtomicBool::new(read_only),
        written: AtomicBool::new(false),
        dirty_at_open: read_only && incompatible & INCOMPAT_DIRTY != 0,
        lazy_refcounts: compatible & COMPAT_LAZY_REFCOUNTS != 0,
    }))
}

/// `overlap-check` (`Qcow2OverlapChecks`): a template, or `Qcow2OverlapCheckFlags` (a template,
/// `cached` unless given, with single checks switched on or off); absent: `cached`. The input
/// visitor has refused unknown values and members already, with QEMU's words.
fn overlap_checks(option: Option<&qmp_api::Qcow2OverlapChecks>) -> qcow2::OverlapChecks {
    use qcow2::{Metadata, OverlapChecks};
    use qmp_api::{Qcow2OverlapCheckMode as Mode, Qcow2OverlapChecks as Checks};
    let template = |mode: Mode| match mode {
        Mode::None => OverlapChecks::NONE,
        Mode::Constant => OverlapChecks::CONSTANT,
        Mode::Cached => OverlapChecks::CACHED,
        Mode::All => OverlapChecks::ALL,
    };
    match option {
        None => OverlapChecks::default(),
        Some(Checks::Mode(mode)) => template(*mode),
        Some(Checks::Flags(f)) => {
            let mut checks = f.template.map_or(OverlapChecks::default(), template);
            for (m, on) in [
                (Metadata::MainHeader, f.main_header),
                (Metadata::ActiveL1, f.active_l1),
                (Metadata::ActiveL2, f.active_l2),
                (Metadata::RefcountTable, f.refcount_table),
                (Metadata::RefcountBlock, f.refcount_block),
                (Metadata::SnapshotTable, f.snapshot_table),
                (Metadata::InactiveL1, f.inactive_l1),
                (Metadata::InactiveL2, f.inactive_l2),
                (Metadata::BitmapDirectory, f.bitmap_directory),
            ] {
                if let Some(on) = on {
                    checks = checks.with(m, on);
                }
            }
            checks
        }
    }
}

impl Qcow2Driver {
    /// The open image.
    fn image(&self) -> Arc<qcow2::Image> {
        self.image.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    fn format_specific(&self) -> ImageInfoSpecific {
        let info = self.image().info();
        let v3 = info.version >= 3;
        let bitmaps: Vec<Qcow2BitmapInfo> = self
            .image()
            .bitmaps()
            .iter()
            .map(|b| {
                let mut flags = Vec::new();
                // A read-write open marks every stored bitmap in use.
                if b.in_use || !self.read_only() {
                    flags.push(Qcow2BitmapInfoFlags::InUse);
                }
                if b.enabled {
                    flags.push(Qcow2BitmapInfoFlags::Auto);
                }
                Qcow2BitmapInfo {
                    name: b.name.clone(),
                    granularity: u32::try_from(b.granularity).unwrap_or(u32::MAX),
                    flags,
                }
            })
            .collect();
        let data = ImageInfoSpecificQCow2 {
            compat: if v3 { "1.1" } else { "0.10" }.to_string(),
            data_file: None,
            data_file_raw: None,
            extended_l2: v3.then_some(false),
            lazy_refcounts: v3.then_some(self.lazy_refcounts),
            corrupt: v3.then_some(info.corrupt),
            refcount_bits: i64::from(info.refcount_bits),
            encrypt: None,
            bitmaps: (v3 && !bitmaps.is_empty()).then_some(bitmaps),
            compression_type: Qcow2CompressionType::Zlib,
        };
        ImageInfoSpecific {
            branch: ImageInfoSpecificBranch::Qcow2(ImageInfoSpecificQCow2Wrapper { data }),
        }
    }

    /// The node's bitmap as the image stores it.
    fn to_persistent(&self, b: &DirtyBitmap, in_use: bool) -> qcow2::PersistentBitmap {
        let g = b.granularity();
        let mut p = qcow2::PersistentBitmap::new(
            b.name().unwrap_or_default(),
            g,
            b.is_enabled(),
            self.image().size(),
        );
        p.in_use = in_use;
        for (start, len) in b.dirty_ranges(0, b.size()) {
            let last = (start + len).div_ceil(g);
            for i in start / g..last {
                p.set(i);
            }
        }
        p
    }
}

/// A stored bitmap as a node bitmap (QEMU: in use when found → inconsistent).
fn from_persistent(
    p: &qcow2::PersistentBitmap,
    size: u64,
    read_only: bool,
) -> BlockResult<DirtyBitmap> {
    let mut b = DirtyBitmap::new(Some(p.name.clone()), p.granularity, size)?;
    b.set_persistent(true);
    b.set_enabled(p.enabled);
    b.set_readonly(read_only);
    if p.in_use {
        // Bits not to be trusted: QEMU loads such a bitmap inconsistent and not recording.
        b.set_inconsistent(true);
        b.set_enabled(false);
        return Ok(b);
    }
    let g = p.granularity;
    for (byte_index, &byte) in p.bits.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        let base = byte_index as u64 * 8;
        if byte == 0xff {
            b.set_dirty(base * g, 8 * g);
            continue;
        }
        for bit in 0..8u64 {
            if byte & (1 << bit) != 0 {
                b.set_dirty((base + bit) * g, g);
            }
        }
    }
    Ok(b)
}

impl BlockDriver for Qcow2Driver {
    fn size(&self) -> BlockResult<u64> {
        Ok(self.image().size())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.file.debug_event(BlkdebugEvent::ReadAio);
        self.image().read_at(buf, offset).map_err(block_error)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.file.debug_event(BlkdebugEvent::WriteAio);
        self.written.store(true, Ordering::Release);
        self.image().write_at(buf, offset).map_err(block_error)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.written.store(true, Ordering::Release);
        self.image().write_zeroes(offset, len).map_err(block_error)
    }

    fn write_zeroes_unmap_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.written.store(true, Ordering::Release);
        self.image()
            .write_zeroes_unmap(offset, len)
            .map_err(block_error)
    }

    fn supports_compressed_writes(&self) -> bool {
        true
    }

    fn write_compressed_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.file.debug_event(BlkdebugEvent::WriteAio);
        self.written.store(true, Ordering::Release);
        self.image()
            .write_compressed(buf, offset)
            .map_err(block_error)
    }

    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.written.store(true, Ordering::Release);
        self.image().discard(offset, len).map_err(block_error)
    }

    fn flush(&self) -> BlockResult<()> {
        self.image().flush().map_err(block_error)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        let size = self.image().size();
        if offset >= size || len == 0 {
            return Ok((false, len));
        }
        let (alloc, n) = self
            .image()
            .block_status(offset, len.min(size - offset))
            .map_err(block_error)?;
        Ok((alloc != qcow2::Allocation::Unallocated, n))
    }

    fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        let size = self.image().size();
        if offset >= size || len == 0 {
            return Ok((false, false, len));
        }
        let (alloc, n) = self
            .image()
            .block_status(offset, len.min(size - offset))
            .map_err(block_error)?;
        Ok((
            alloc != qcow2::Allocation::Unallocated,
            alloc == qcow2::Allocation::Zero,
            n,
        ))
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            filename: None,
            actual_size: None,
            cluster_size: Some(self.image().cluster_size()),
            dirty_flag: Some(self.dirty_at_open),
            format_specific: Some(self.format_specific()),
        }
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn metadata_caches(&self) -> Option<((usize, usize), (usize, usize))> {
        let image = self.image();
        let (cap_l2, cap_rb) = image.cache_capacity();
        let (l2, rb) = image.cached_tables();
        Some(((cap_l2, l2), (cap_rb, rb)))
    }

    fn backing_file(&self) -> Option<(String, Option<String>)> {
        self.image().backing_file()
    }

    fn set_backing(&self, backing: Option<Arc<BlockNode>>) {
        let backing = backing.map(|node| {
            Arc::new(NodeBacking {
                node,
                overlay_file: self.file.clone(),
            }) as Arc<dyn qcow2::Backing>
        });
        *self.backing.lock().unwrap_or_else(|e| e.into_inner()) = backing.clone();
        self.image().set_backing(backing);
    }

    fn reopen_read_only(&self) -> BlockResult<()> {
        let mut slot = self.image.write().unwrap_or_else(|e| e.into_inner());
        let backing = self
            .backing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Closing releases the in-use marks of the bitmaps just stored.
        slot.flush().map_err(block_error)?;
        slot.close().map_err(block_error)?;
        let reopened =
            Arc::new(qcow2::Image::open(self.storage.clone(), true, backing).map_err(block_error)?);
        self.cache.apply(&reopened);
        *slot = reopened;
        self.read_only.store(true, Ordering::Release);
        Ok(())
    }

    fn reopen_read_write(&self) -> BlockResult<()> {
        let mut slot = self.image.write().unwrap_or_else(|e| e.into_inner());
        let backing = self
            .backing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // A read-only image has nothing to write back; opening it read-write marks its stored
        // bitmaps in use, as QEMU's reopen does.
        let reopened =
            qcow2::Image::open(self.storage.clone(), false, backing).map_err(block_error)?;
        slot.close().map_err(block_error)?;
        *slot = Arc::new(reopened);
        self.read_only.store(false, Ordering::Release);
        Ok(())
    }

    fn inactivate(&self) -> BlockResult<()> {
        let mut slot = self.image.write().unwrap_or_else(|e| e.into_inner());
        let backing = self
            .backing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Closing writes the image out clean, as QEMU's qcow2_inactivate leaves it; reads go
        // on through a read-only view until the node is active again.
        slot.flush().map_err(block_error)?;
        slot.close().map_err(block_error)?;
        let reopened =
            qcow2::Image::open(self.storage.clone(), true, backing).map_err(block_error)?;
        *slot = Arc::new(reopened);
        Ok(())
    }

    fn activate(&self) -> BlockResult<()> {
        let mut slot = self.image.write().unwrap_or_else(|e| e.into_inner());
        let backing = self
            .backing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Everything is read again: another process may have written the image meanwhile.
        let read_only = self.read_only.load(Ordering::Acquire);
        let reopened =
            qcow2::Image::open(self.storage.clone(), read_only, backing).map_err(block_error)?;
        slot.close().map_err(block_error)?;
        *slot = Arc::new(reopened);
        Ok(())
    }

    fn change_backing_file(&self, backing: Option<(&str, &str)>) -> BlockResult<()> {
        self.image().set_backing_file(backing).map_err(block_error)
    }

    fn truncate(&self, size: u64) -> BlockResult<()> {
        self.written.store(true, Ordering::Release);
        self.image()
            .resize(size, qcow2::Preallocation::Off)
            .map_err(block_error)
    }

    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        Some(self)
    }

    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        Some(self)
    }

    fn close(&self) -> BlockResult<()> {
        let flushed = self.image().flush().map_err(block_error);
        let closed = self.image().close().map_err(block_error);
        flushed.and(closed)
    }
}

impl BitmapStore for Qcow2Driver {
    fn load_bitmaps(&self) -> BlockResult<Vec<DirtyBitmap>> {
        let size = self.image().size().div_ceil(512) * 512;
        // The node's list is newest first; QEMU loads in directory order, each prepended.
        let mut out = Vec::new();
        for p in self.image().bitmaps().iter().rev() {
            out.push(from_persistent(p, size, self.read_only())?);
        }
        Ok(out)
    }

    fn can_store_new_bitmap(&self, name: &str, granularity: u64) -> BlockResult<()> {
        let info = self.image().info();
        let fail = |why: &str| {
            Err(BlockError::new(format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                self.node_name
            )))
        };
        if info.version < 3 {
            return fail("Cannot store dirty bitmaps in qcow2 v2 files");
        }
        if granularity > 1 << 31 {
            return fail("Granularity exceeds maximum (2147483648 bytes)");
        }
        if granularity < 512 {
            return fail("Granularity is under minimum (512 bytes)");
        }
        let stored = self.image().bitmaps();
        if stored.iter().any(|b| b.name == name) {
            return fail("Bitmap with the same name is already stored");
        }
        if stored.len() >= 65535 {
            return fail("Maximum number of persistent bitmaps is already reached");
        }
        Ok(())
    }

    fn remove_persistent_bitmap(&self, name: &str) -> BlockResult<()> {
        let stored = self.image().bitmaps();
        if !stored.iter().any(|b| b.name == name) {
            // A persistent bitmap not stored yet: nothing on disk.
            return Ok(());
        }
        let kept: Vec<qcow2::PersistentBitmap> = stored
            .into_iter()
            .filter(|b| b.name != name)
            .map(|mut b| {
                // Still tracked in memory while the image is open: stored bits are stale.
                b.in_use = b.in_use || !self.read_only();
                b
            })
            .collect();
        self.image().store_bitmaps(&kept).map_err(block_error)
    }

    fn store_bitmaps(&self, bitmaps: &[DirtyBitmap]) -> BlockResult<()> {
        // Nothing more is written to an image marked corrupt while open.
        if self.read_only() || self.image().info().corrupt {
            return Ok(());
        }
        let writable = |b: &&DirtyBitmap| !b.is_inconsistent() && !b.is_readonly();
        let stored = self.image().bitmaps();
        let mut out = Vec::new();
        // Stored bitmaps keep their place; the node's copy replaces a consistent one.
        for s in &stored {
            match bitmaps
                .iter()
                .filter(writable)
                .find(|b| b.name() == Some(s.name.as_str()))
            {
                Some(b) => out.push(self.to_persistent(b, false)),
                None => out.push(s.clone()),
            }
        }
        for b in bitmaps.iter().filter(writable) {
            let Some(name) = b.name() else { continue };
            if !stored.iter().any(|s| s.name == name) {
                out.push(self.to_persistent(b, false));
            }
        }
        // Nothing written and the bits unchanged: the stored copies are right, and closing
        // the image clears their in-use marks without rewriting them (the file does not grow).
        if out == stored && !self.written.load(Ordering::Acquire) {
            return Ok(());
        }
        self.image().store_bitmaps(&out).map_err(block_error)
    }
}

impl InternalSnapshots for Qcow2Driver {
    fn list(&self) -> Vec<SnapshotInfo> {
        self.image().snapshots().iter().map(summary).collect()
    }

    fn create(&self, name: &str) -> BlockResult<SnapshotInfo> {
        self.image().flush().map_err(block_error)?;
        let s = self.image().create_snapshot(name).map_err(block_error)?;
        self.image().flush().map_err(block_error)?;
        Ok(summary(&s))
    }

    fn delete(&self, id_or_name: &str) -> BlockResult<SnapshotInfo> {
        let list = self.image().snapshots();
        let found = list
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| list.iter().find(|s| s.name == id_or_name))
            .cloned();
        let Some(s) = found else {
            return Err(BlockError::with_errno(
                format!("Can't find snapshot '{id_or_name}'"),
                libc::ENOENT,
            ));
        };
        self.image().delete_snapshot(&s.id).map_err(block_error)?;
        self.image().flush().map_err(block_error)?;
        Ok(summary(&s))
    }
}

/// A snapshot table entry as QMP's `SnapshotInfo`.
fn summary(s: &qcow2::SnapshotInfo) -> SnapshotInfo {
    let wire = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    SnapshotInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        vm_state_size: wire(s.vm_state_size),
        date_sec: i64::from(s.date_sec),
        date_nsec: i64::from(s.date_nsec),
        vm_clock_sec: wire(s.vm_clock_nsec / 1_000_000_000),
        vm_clock_nsec: wire(s.vm_clock_nsec % 1_000_000_000),
        icount: s.icount.map(wire),
    }
}

/// Writes a new qcow2 image onto the node `file` (see [`crate::create::create_qcow2`]).
pub(crate) fn create_on(file: &Arc<BlockNode>, options: &qcow2::CreateOptions) -> BlockResult<()> {
    let storage: Arc<dyn qcow2::Storage> = Arc::new(NodeStorage(file.clone()));
    qcow2::create_with(storage, options).map_err(block_error)?;
    file.flush()
}
