//! Block copy (QEMU's `block/block-copy.c`): the state shared by everything that copies a
//! source to a target cluster by cluster while the source keeps changing. A backup job copies
//! through it, and so does the copy-before-write filter ([`crate::drivers::cbw`]) before each
//! write to its source: each cluster is copied exactly once, and before anything overwrites
//! it. The same state answers for the point-in-time view (the source as it was when the copy
//! began) that `snapshot-access` and fleecing read: a cluster already copied is read from the
//! target; one not copied yet is read from the source while writes to it wait.
//!
//! ```text
//! cluster:  to copy ──claim──► busy ──copied──► copied     (a failed copy goes back to "to copy")
//!           skipped: outside the copy (a bitmap's clean part, or discarded from the view)
//! readers:  per cluster, reads of the view from the source under way; a copy-before-write
//!           waits for them after copying, before the write goes on
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::error::{BlockError, BlockResult};
use crate::io::PageBuf;
use crate::node::{BeforeWrite, BlockNode, Extent};

/// Bytes copied per request of a copy run (the buffer's size).
pub const COPY_CHUNK: u64 = 1 << 20;

/// QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`: the smallest unit a copy-before-write filter
/// copies.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;

/// One end of a copy: what the copy reads from the source and writes to the target. Every
/// block node is one; the command layer adapts its own node handles.
pub trait CopyIo: Send + Sync {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()>;
    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()>;
    /// The state of the range starting at `offset` (at most `len` bytes).
    fn extent(&self, offset: u64, len: u64) -> BlockResult<Extent>;
    /// Writes one cluster compressed (`offset` cluster aligned, `buf` a whole cluster or the
    /// disk's end). The default cannot.
    fn write_compressed_at(&self, _offset: u64, _buf: &[u8]) -> BlockResult<()> {
        Err(BlockError::from_errno(libc::ENOTSUP))
    }
    /// Discards `[offset, offset + len)` (a hint, as the node's `discard` option allows). The
    /// default does nothing.
    fn discard_at(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }
    /// The graph node this end is, plainly: a copy between two such nodes may be done by the
    /// kernel ([`BlockNode::copy_range_to`]). The default is none.
    fn block_node(&self) -> Option<Arc<BlockNode>> {
        None
    }
}

/// What a copy writes and does besides copying (QEMU's block-copy flags `compress` and
/// `discard-source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// Write whole target clusters of this size compressed (zeroes stay zero writes).
    pub compress: Option<u64>,
    /// Discard each range of the source once copied (its failure is no failure of the copy).
    pub discard_source: bool,
    /// Data is copied by the kernel where both ends allow it (`x-perf.use-copy-range`); any
    /// refusal or failure falls back to the copy through memory, as QEMU's block-copy does.
    pub use_copy_range: bool,
}

impl CopyIo for BlockNode {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        BlockNode::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        BlockNode::write_at(self, offset, buf)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        BlockNode::write_zeroes_at(self, offset, len)
    }
    fn extent(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        BlockNode::extent(self, offset, len)
    }
    fn write_compressed_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        BlockNode::write_compressed_at(self, offset, buf)
    }
    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        BlockNode::discard_at(self, offset, len)
    }
    fn block_node(&self) -> Option<Arc<BlockNode>> {
        self.arc()
    }
}

/// The page-aligned buffers copies read into, shared by every copy: a copy takes one while it
/// runs and gives it back, so buffers follow the copies in flight, not the jobs. At most
/// [`CopyBuffers::SPARE`] are kept for reuse.
#[derive(Default)]
pub struct CopyBuffers {
    spare: Mutex<Vec<PageBuf>>,
}

impl CopyBuffers {
    /// Buffers kept for the next copies.
    pub const SPARE: usize = 16;

    /// A buffer of at least `len` bytes (contents unspecified).
    pub fn take(&self, len: usize) -> PageBuf {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        match spare.iter().position(|b| b.len() >= len) {
            Some(i) => spare.swap_remove(i),
            None => PageBuf::zeroed(len),
        }
    }

    /// Returns a buffer for reuse (dropped if enough are kept).
    pub fn give(&self, buf: PageBuf) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < Self::SPARE {
            spare.push(buf);
        }
    }

    /// Buffers kept now.
    pub fn spare(&self) -> usize {
        self.spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Which end a failed copy failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOp {
    Read,
    Write,
}

/// A failed copy: the operation and its error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyError {
    pub op: CopyOp,
    pub error: BlockError,
}

/// What a copy-before-write does when its copy fails (QEMU's `on-cbw-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCopyError {
    /// The write fails: the target stays a valid copy.
    #[default]
    FailWrite,
    /// The write goes on; the point-in-time view is broken and every later read of it fails.
    BreakSnapshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Holds data the target still needs.
    ToCopy,
    /// Being copied (by a job or by a copy-before-write).
    Busy,
    /// On the target.
    Copied,
    /// Not part of the copy: neither copied nor readable through the view.
    Skipped,
}

struct Map {
    clusters: Vec<Cluster>,
    /// Clusters a copy-before-write copied (QEMU's `done_bitmap`), one bit each.
    copied_before_write: Vec<u64>,
    /// Reads of the view from the source under way: the cluster ranges `(first, end)` each
    /// holds (few at a time, and only while fleecing).
    readers: Vec<(usize, usize)>,
}

impl Map {
    /// Whether a read under way holds a cluster of `first..end`.
    fn read_meets(&self, first: usize, end: usize) -> bool {
        self.readers.iter().any(|&(f, e)| f < end && first < e)
    }
}

/// The shared state of a copy from a source to a target (see the module documentation).
pub struct BlockCopy {
    source: Arc<dyn CopyIo>,
    target: Arc<dyn CopyIo>,
    cluster: u64,
    size: u64,
    /// Ranges the source's own layer does not allocate are not copied (a `top` backup).
    skip_unallocated: AtomicBool,
    map: Mutex<Map>,
    changed: Condvar,
    buffers: Arc<CopyBuffers>,
    on_error: OnCopyError,
    /// How long a copy-before-write may take (`cbw-timeout`); `None`: no limit.
    timeout: Option<Duration>,
    /// Copy-before-write happens only while this is set.
    active: AtomicBool,
    /// The error that broke the view (`break-snapshot`).
    broken: Mutex<Option<BlockError>>,
    /// Compressed writes and discards of the source (a backup's `compress`, `discard-source`).
    options: Mutex<CopyOptions>,
}

/// A range of the view, locked for reading: it reads from the target (copied) or from the
/// source (not copied yet: writes to it wait until this drops).
pub struct SnapshotRead<'a> {
    copy: &'a BlockCopy,
    /// The range reads from the target.
    pub from_target: bool,
    /// Bytes from the asked offset this covers.
    pub len: u64,
    /// Clusters whose reader count this holds.
    held: Option<(usize, usize)>,
}

impl Drop for SnapshotRead<'_> {
    fn drop(&mut self) {
        if let Some((first, last)) = self.held {
            self.copy.release_readers(first, last);
        }
    }
}

/// Reads of the target under way while they may look through it to the source (fleecing:
/// the target's backing chain holds the source). Held while the read runs.
pub struct FenceGuard {
    copy: Arc<BlockCopy>,
    held: Option<(usize, usize)>,
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        if let Some((first, last)) = self.held {
            self.copy.release_readers(first, last);
        }
    }
}

fn relock<'a, T>(
    guard: Result<MutexGuard<'a, T>, PoisonError<MutexGuard<'a, T>>>,
) -> MutexGuard<'a, T> {
    guard.unwrap_or_else(PoisonError::into_inner)
}

impl BlockCopy {
    /// A copy of `size` bytes from `source` to `target` in clusters of `cluster` bytes (a
    /// power of two), every cluster still to copy.
    pub fn new(
        source: Arc<dyn CopyIo>,
        target: Arc<dyn CopyIo>,
        size: u64,
        cluster: u64,
        buffers: Arc<CopyBuffers>,
    ) -> BlockCopy {
        let count = usize::try_from(size.div_ceil(cluster.max(1))).unwrap_or(0);
        BlockCopy {
            source,
            target,
            cluster: cluster.max(1),
            size,
            skip_unallocated: AtomicBool::new(false),
            map: Mutex::new(Map {
                clusters: vec![Cluster::ToCopy; count],
                copied_before_write: vec![0; count.div_ceil(64)],
                readers: Vec::new(),
            }),
            changed: Condvar::new(),
            buffers,
            on_error: OnCopyError::default(),
            timeout: None,
            active: AtomicBool::new(true),
            broken: Mutex::new(None),
            options: Mutex::new(CopyOptions::default()),
        }
    }

    /// Sets what copies from now on write and do besides copying.
    pub fn set_options(&self, options: CopyOptions) {
        *relock(self.options.lock()) = options;
    }

    fn options(&self) -> CopyOptions {
        *relock(self.options.lock())
    }

    /// What a failed copy-before-write does.
    pub fn on_error(mut self, on_error: OnCopyError) -> BlockCopy {
        self.on_error = on_error;
        self
    }

    /// How long a copy-before-write may take before it counts as failed.
    pub fn timeout(mut self, timeout: Option<Duration>) -> BlockCopy {
        self.timeout = timeout;
        self
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The size of the copy.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> MutexGuard<'_, Map> {
        relock(self.map.lock())
    }

    /// The clusters meeting `[offset, offset + len)` (clipped to the size): `(first, end)`.
    fn clusters_of(&self, offset: u64, len: u64) -> (usize, usize) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return (0, 0);
        }
        (
            (offset / self.cluster) as usize,
            end.div_ceil(self.cluster) as usize,
        )
    }

    /// Copies only the clusters meeting `ranges`; the others are left out (QEMU initialises
    /// its copy bitmap from a backup's or a filter's bitmap this way). Call before copying.
    pub fn restrict_to(&self, ranges: &[(u64, u64)]) {
        let mut map = self.lock();
        let count = map.clusters.len();
        let mut wanted = vec![false; count];
        for &(offset, len) in ranges {
            let (first, end) = self.clusters_of(offset, len);
            wanted[first..end.min(count)].fill(true);
        }
        for (c, wanted) in map.clusters.iter_mut().zip(wanted) {
            if !wanted && *c == Cluster::ToCopy {
                *c = Cluster::Skipped;
            }
        }
    }

    /// Leaves out ranges the source's own layer does not allocate (a `top` backup): they are
    /// neither copied by the job nor before writes.
    pub fn skip_unallocated(&self, skip: bool) {
        self.skip_unallocated.store(skip, Ordering::Relaxed);
    }

    /// Stops copying before writes (the backup that made this ended); copies under way finish.
    pub fn stop(&self) {
        self.active.store(false, Ordering::Release);
    }

    /// Whether copies happen before writes.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Bytes still to copy.
    pub fn remaining(&self) -> u64 {
        let map = self.lock();
        map.clusters
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c, Cluster::ToCopy | Cluster::Busy))
            .map(|(i, _)| self.cluster.min(self.size - i as u64 * self.cluster))
            .sum()
    }

    /// Waits until no cluster meeting `[offset, offset + len)` is being copied, then claims
    /// those still to copy; returns their byte runs, to be copied and then given to
    /// [`BlockCopy::finish`].
    fn claim(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let (first, end) = self.clusters_of(offset, len);
        if first >= end {
            return Vec::new();
        }
        let mut map = self.lock();
        while map.clusters[first..end].contains(&Cluster::Busy) {
            map = relock(self.changed.wait(map));
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in first..end {
            if map.clusters[i] != Cluster::ToCopy {
                continue;
            }
            map.clusters[i] = Cluster::Busy;
            let start = i as u64 * self.cluster;
            let n = self.cluster.min(self.size - start);
            match runs.last_mut() {
                Some(run) if run.0 + run.1 == start => run.1 += n,
                _ => runs.push((start, n)),
            }
        }
        runs
    }

    /// Ends a claim: the runs are copied (`by_write`: by a copy-before-write), or (on
    /// failure) still to copy.
    fn finish(&self, runs: &[(u64, u64)], copied: bool, by_write: bool) {
        let mark = if copied {
            Cluster::Copied
        } else {
            Cluster::ToCopy
        };
        let mut map = self.lock();
        for &(offset, len) in runs {
            let (first, end) = self.clusters_of(offset, len);
            map.clusters[first..end].fill(mark);
            if copied && by_write {
                for i in first..end {
                    map.copied_before_write[i / 64] |= 1 << (i % 64);
                }
            }
        }
        drop(map);
        self.changed.notify_all();
    }

    /// Copies whatever of `[offset, offset + len)` is still to copy (whole clusters), waiting
    /// for copies of the same clusters under way.
    pub fn copy(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.copy_for(offset, len, false)
    }

    fn copy_for(&self, offset: u64, len: u64, by_write: bool) -> Result<(), CopyError> {
        let runs = self.claim(offset, len);
        let mut result = Ok(());
        for &(start, n) in &runs {
            result = self.copy_run(start, n);
            if result.is_err() {
                break;
            }
        }
        self.finish(&runs, result.is_ok(), by_write);
        if result.is_ok() && self.options().discard_source {
            // As QEMU's block-copy: once copied, the source's range goes (its failure is no
            // failure of the copy). After `finish`, so that the discard's own
            // copy-before-write finds the clusters copied.
            for &(start, n) in &runs {
                let _ = self.source.discard_at(start, n);
            }
        }
        result
    }

    /// The copy's three bitmaps as QEMU's filter keeps them on its node (and
    /// `query-named-block-nodes` shows them, anonymous), newest first: the view's accessible
    /// part, what copy-before-writes copied, what is still to copy; in bytes.
    pub fn bitmap_counts(&self) -> [u64; 3] {
        let map = self.lock();
        let count = |f: &dyn Fn(usize, Cluster) -> bool| -> u64 {
            map.clusters
                .iter()
                .enumerate()
                .filter(|&(i, &c)| f(i, c))
                .count() as u64
                * self.cluster
        };
        let access = count(&|_, c| c != Cluster::Skipped);
        let done = count(&|i, _| map.copied_before_write[i / 64] & (1 << (i % 64)) != 0);
        let to_copy = count(&|_, c| matches!(c, Cluster::ToCopy | Cluster::Busy));
        [access, done, to_copy]
    }

    fn copy_run(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let size = len.min(COPY_CHUNK) as usize;
        let compress = self.options().compress;
        let cluster = compress.map_or(0, |c| usize::try_from(c).unwrap_or(usize::MAX));
        let mut buf = self
            .buffers
            .take(size.max(COPY_CHUNK as usize).max(cluster));
        let result = match compress {
            Some(cluster) => self.copy_compressed(offset, len, cluster, &mut buf),
            None => self.copy_range(offset, len, &mut buf),
        };
        self.buffers.give(buf);
        result
    }

    /// Copies `[offset, offset + len)` writing whole target clusters of `cluster` bytes
    /// compressed (zeroes stay zero writes, as QEMU's block-copy). A piece not aligned to a
    /// target cluster (a copy-before-write inside a cluster larger than the copy's) is
    /// written plain.
    fn copy_compressed(
        &self,
        offset: u64,
        len: u64,
        cluster: u64,
        buf: &mut [u8],
    ) -> Result<(), CopyError> {
        let read = |error| CopyError {
            op: CopyOp::Read,
            error,
        };
        let write = |error| CopyError {
            op: CopyOp::Write,
            error,
        };
        let skip_unallocated = self.skip_unallocated.load(Ordering::Relaxed);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (cluster - pos % cluster).min(end - pos);
            let extent = self.source.extent(pos, n).map_err(read)?;
            let whole = extent.len == 0 || extent.len >= n;
            if skip_unallocated && !extent.allocated && whole {
                // Comes from the backing chain: not part of a `top` copy.
            } else if extent.zero && whole {
                self.target.write_zeroes_at(pos, n).map_err(write)?;
            } else {
                let chunk = &mut buf[..n as usize];
                self.source.read_at(pos, chunk).map_err(read)?;
                if pos.is_multiple_of(cluster) && (n == cluster || pos + n == self.size) {
                    self.target.write_compressed_at(pos, chunk).map_err(write)?;
                } else {
                    self.target.write_at(pos, chunk).map_err(write)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Copies `[offset, offset + len)` as the source's block status says, through `buf`:
    /// zeroes as zero writes, unallocated ranges left out when skipping them.
    fn copy_range(&self, offset: u64, len: u64, buf: &mut [u8]) -> Result<(), CopyError> {
        let read = |error| CopyError {
            op: CopyOp::Read,
            error,
        };
        let write = |error| CopyError {
            op: CopyOp::Write,
            error,
        };
        let skip_unallocated = self.skip_unallocated.load(Ordering::Relaxed);
        let kernel = if self.options().use_copy_range {
            self.source.block_node().zip(self.target.block_node())
        } else {
            None
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let extent = self.source.extent(pos, end - pos).map_err(read)?;
            let n = match extent.len {
                0 => end - pos,
                l => l.min(end - pos),
            };
            if skip_unallocated && !extent.allocated {
                // Comes from the backing chain: not part of a `top` copy.
            } else if extent.zero {
                self.target.write_zeroes_at(pos, n).map_err(write)?;
            } else if let Some((source, target)) = &kernel
                && source.copy_range_to(target, pos, n).unwrap_or(false)
            {
                // Copied by the kernel (any failure falls back to the copy through memory).
            } else {
                let mut done = 0;
                while done < n {
                    let step = (n - done).min(buf.len() as u64);
                    let chunk = &mut buf[..step as usize];
                    self.source.read_at(pos + done, chunk).map_err(read)?;
                    self.target.write_at(pos + done, chunk).map_err(write)?;
                    done += step;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// The copy-before-write of `[offset, offset + len)` (QEMU's `cbw_do_copy_before_write`):
    /// copies what is still to copy, then waits until no read of the view from the source
    /// meets the range, so the write that follows cannot change what such a read returns. A
    /// failed copy fails the write, or breaks the view (`break-snapshot`).
    pub fn before_write(self: &Arc<Self>, offset: u64, len: u64) -> BlockResult<()> {
        if !self.is_active() || relock(self.broken.lock()).is_some() {
            return Ok(());
        }
        let first = offset / self.cluster * self.cluster;
        let end = offset.saturating_add(len).div_ceil(self.cluster) * self.cluster;
        let copied = match self.timeout {
            None => self.copy_for(first, end - first, true).map_err(|e| e.error),
            Some(limit) => self.copy_within(first, end - first, limit),
        };
        if let Err(error) = copied {
            match self.on_error {
                OnCopyError::FailWrite => return Err(error),
                OnCopyError::BreakSnapshot => {
                    tracing::warn!("copy-before-write failed, the snapshot is broken: {error}");
                    relock(self.broken.lock()).get_or_insert(error);
                }
            }
        }
        let (first, end) = self.clusters_of(first, end - first);
        let mut map = self.lock();
        while map.read_meets(first, end) {
            map = relock(self.changed.wait(map));
        }
        Ok(())
    }

    /// [`BlockCopy::copy`] on a thread of its own, given up after `limit` (the copy goes on in
    /// the background, as QEMU's timed-out block-copy does).
    fn copy_within(self: &Arc<Self>, offset: u64, len: u64, limit: Duration) -> BlockResult<()> {
        let (done, result) = mpsc::sync_channel(1);
        let copy = self.clone();
        std::thread::Builder::new()
            .name("copy-before-write".into())
            .spawn(move || {
                let _ = done.send(copy.copy_for(offset, len, true));
            })
            .map_err(|e| BlockError::with_errno(e.to_string(), libc::EAGAIN))?;
        match result.recv_timeout(limit) {
            Ok(copied) => copied.map_err(|e| e.error),
            Err(_) => Err(BlockError::from_errno(libc::ETIMEDOUT)),
        }
    }

    fn release_readers(&self, first: usize, end: usize) {
        let mut map = self.lock();
        if let Some(i) = map.readers.iter().position(|&r| r == (first, end)) {
            map.readers.swap_remove(i);
        }
        drop(map);
        self.changed.notify_all();
    }

    /// Locks the start of `[offset, offset + len)` of the view for reading (QEMU's
    /// `cbw_snapshot_read_lock`): the run of clusters that are all copied (read the target) or
    /// all not copied yet (read the source; writes wait until the lock drops). Fails with the
    /// error that broke the view, or `EACCES` for a range outside the copy.
    pub fn snapshot_read(&self, offset: u64, len: u64) -> BlockResult<SnapshotRead<'_>> {
        if let Some(error) = relock(self.broken.lock()).clone() {
            return Err(error);
        }
        let (first, end) = self.clusters_of(offset, len);
        if first >= end {
            return Ok(SnapshotRead {
                copy: self,
                from_target: false,
                len,
                held: None,
            });
        }
        let mut map = self.lock();
        if map.clusters[first..end].contains(&Cluster::Skipped) {
            return Err(BlockError::from_errno(libc::EACCES));
        }
        let from_target = map.clusters[first] == Cluster::Copied;
        let run_end = (first..end)
            .find(|&i| (map.clusters[i] == Cluster::Copied) != from_target)
            .unwrap_or(end);
        let bytes = (run_end as u64 * self.cluster).min(offset + len) - offset;
        let held = if from_target {
            None
        } else {
            map.readers.push((first, run_end));
            Some((first, run_end))
        };
        Ok(SnapshotRead {
            copy: self,
            from_target,
            len: bytes,
            held,
        })
    }

    /// Drops `[offset, offset + len)` from the view (QEMU's `cbw_co_pdiscard_snapshot`): the
    /// whole clusters inside it are neither copied any more nor readable. Returns that
    /// cluster-aligned range (for the caller to discard on the target), if any.
    pub fn snapshot_discard(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let start = offset.div_ceil(self.cluster) * self.cluster;
        let end = offset.saturating_add(len).min(self.size) / self.cluster * self.cluster;
        if end <= start {
            return None;
        }
        let (first, last) = self.clusters_of(start, end - start);
        let mut map = self.lock();
        while map.clusters[first..last].contains(&Cluster::Busy) {
            map = relock(self.changed.wait(map));
        }
        map.clusters[first..last].fill(Cluster::Skipped);
        Some((start, end - start))
    }

    /// Holds the not-yet-copied clusters of `[offset, offset + len)` for a read of the target
    /// that may look through to the source (fleecing: QEMU serialises such reads with the
    /// copies): a copy-before-write of those clusters waits until the guard drops.
    pub fn fence_read(self: &Arc<Self>, offset: u64, len: u64) -> FenceGuard {
        let (first, end) = self.clusters_of(offset, len);
        let mut map = self.lock();
        let mut held = None;
        let pending = |c: &Cluster| matches!(c, Cluster::ToCopy | Cluster::Busy);
        if first < end && map.clusters[first..end].iter().any(pending) {
            map.readers.push((first, end));
            held = Some((first, end));
        }
        FenceGuard {
            copy: self.clone(),
            held,
        }
    }
}

/// The copy-before-write hook on a source node: before every write, [`BlockCopy::before_write`].
pub struct CopyBeforeWriteHook(pub Arc<BlockCopy>);

impl BeforeWrite for CopyBeforeWriteHook {
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.0.before_write(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory as a copy end.
    struct Memory(Mutex<Vec<u8>>);

    impl CopyIo for Memory {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
            let data = self.0.lock().unwrap();
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
            let mut data = self.0.lock().unwrap();
            data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
            self.write_at(offset, &vec![0; len as usize])
        }
        fn extent(&self, _offset: u64, len: u64) -> BlockResult<Extent> {
            Ok(Extent {
                len,
                allocated: true,
                zero: false,
            })
        }
    }

    fn memory(size: usize, fill: u8) -> Arc<Memory> {
        Arc::new(Memory(Mutex::new(vec![fill; size])))
    }

    fn copy(source: &Arc<Memory>, target: &Arc<Memory>) -> Arc<BlockCopy> {
        Arc::new(BlockCopy::new(
            source.clone(),
            target.clone(),
            1 << 20,
            65536,
            Arc::default(),
        ))
    }

    #[test]
    fn a_cluster_is_copied_once_and_the_view_then_reads_the_target() {
        let (source, target) = (memory(1 << 20, 1), memory(1 << 20, 0));
        let copy = copy(&source, &target);
        copy.before_write(100, 10).unwrap();
        source.write_at(100, &[9; 10]).unwrap();
        copy.before_write(0, 65536).unwrap();
        assert_eq!(target.0.lock().unwrap()[..65536], [1; 65536]);
        let read = copy.snapshot_read(0, 1 << 20).unwrap();
        assert!(read.from_target);
        assert_eq!(read.len, 65536);
        drop(read);
        let rest = copy.snapshot_read(65536, 1 << 20).unwrap();
        assert!(!rest.from_target);
        assert_eq!(rest.len, (1 << 20) - 65536);
        assert_eq!(copy.remaining(), (1 << 20) - 65536);
    }

    #[test]
    fn a_write_waits_for_reads_of_the_view_from_the_source() {
        let (source, target) = (memory(1 << 20, 1), memory(1 << 20, 0));
        let copy = copy(&source, &target);
        let read = copy.snapshot_read(0, 4096).unwrap();
        assert!(!read.from_target);
        let (tx, rx) = mpsc::channel();
        let writer = {
            let copy = copy.clone();
            std::thread::spawn(move || {
                copy.before_write(0, 512).unwrap();
                tx.send(()).unwrap();
            })
        };
        // The copy happens, but the write may not go on while the read holds the cluster.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(read);
        rx.recv().unwrap();
        writer.join().unwrap();
        assert_eq!(target.0.lock().unwrap()[..512], [1; 512]);
    }

    #[test]
    fn ranges_outside_the_copy_are_neither_copied_nor_readable() {
        let (source, target) = (memory(1 << 20, 1), memory(1 << 20, 0));
        let copy = copy(&source, &target);
        copy.restrict_to(&[(65536, 4096)]);
        copy.before_write(0, 1 << 20).unwrap();
        let data = target.0.lock().unwrap().clone();
        assert_eq!(data[..65536], [0; 65536]);
        assert_eq!(data[65536..131072], [1; 65536]);
        assert_eq!(
            copy.snapshot_read(0, 512).err().and_then(|e| e.errno()),
            Some(libc::EACCES)
        );
        assert!(copy.snapshot_read(65536, 65536).unwrap().from_target);
    }

    #[test]
    fn discarding_from_the_view_drops_whole_clusters_only() {
        let (source, target) = (memory(1 << 20, 1), memory(1 << 20, 0));
        let copy = copy(&source, &target);
        assert_eq!(copy.snapshot_discard(1000, 65536), None);
        assert_eq!(copy.snapshot_discard(1000, 200_000), Some((65536, 131072)));
        assert!(copy.snapshot_read(65536, 512).is_err());
        assert!(copy.snapshot_read(0, 512).is_ok());
        assert_eq!(copy.remaining(), (1 << 20) - 131072);
    }

    #[test]
    fn a_fenced_read_of_the_target_holds_back_writes_to_clusters_not_yet_copied() {
        let (source, target) = (memory(1 << 20, 1), memory(1 << 20, 0));
        let copy = copy(&source, &target);
        copy.before_write(0, 512).unwrap();
        // An already copied cluster needs no fence; a cluster not copied yet does.
        let copied = copy.fence_read(0, 512);
        assert!(copied.held.is_none());
        let fence = copy.fence_read(65536, 4096);
        let (tx, rx) = mpsc::channel();
        let writer = {
            let copy = copy.clone();
            std::thread::spawn(move || {
                copy.before_write(65536, 512).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(fence);
        rx.recv().unwrap();
        writer.join().unwrap();
    }

    #[test]
    fn a_stopped_copy_no_longer_copies_before_writes() {
        let (source, target) = (memory(1 << 20, 1), memory(1 << 20, 0));
        let copy = copy(&source, &target);
        copy.stop();
        copy.before_write(0, 512).unwrap();
        assert_eq!(target.0.lock().unwrap()[..512], [0; 512]);
    }
}
