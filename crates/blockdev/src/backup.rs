//! The backup job (QEMU's `block/backup.c`): copies a source node to a target node, in large
//! requests run on an [`IoPool`], skipping what the source says need not be copied.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use block::{BeforeWrite, BlockError, BlockResult, NotifierHandle};
use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobKey, JobRegistry, strerror};
use qmp_api::{BitmapSyncMode, BlockErrorAction, IoOperationType, JobType};

use crate::bitmaps::JobBitmap;
use crate::claims::NodeClaims;
use crate::node::{BlockIo, CopyBuffers, IoPool};

/// Bytes per copy request (cluster aligned for every cluster size up to 1 MiB).
pub const COPY_CHUNK: u64 = 1 << 20;

/// Copy requests a backup without a speed limit keeps in flight.
pub const PARALLEL_REQUESTS: usize = 8;

/// The unit a backup tracks copies in (QEMU's copy-before-write cluster, at most 64 KiB).
const CBW_CLUSTER: u64 = 64 << 10;

/// What `compress`, `discard-source` and `x-perf` ask of a backup (QEMU's `BackupPerf` and
/// block-copy flags), checked by the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackupOptions {
    /// Write the target's clusters compressed.
    pub(crate) compress: bool,
    /// Discard each range of the source once copied (QEMU 9.1's `discard-source`).
    pub(crate) discard_source: bool,
    /// `x-perf.max-workers`: copy requests in flight at most.
    pub(crate) max_workers: usize,
    /// `x-perf.max-chunk`: the largest background copy request; 0: no limit.
    pub(crate) max_chunk: u64,
    /// The target's cluster size where compressed clusters are written.
    pub(crate) target_cluster: u64,
    /// `x-perf.use-copy-range`: data is copied by the kernel where it can be.
    pub(crate) use_copy_range: bool,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            compress: false,
            discard_source: false,
            max_workers: 64,
            max_chunk: 0,
            target_cluster: CBW_CLUSTER,
            use_copy_range: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Still holds data the target needs.
    ToCopy,
    /// Being copied (by the job or by a write's copy-before-write).
    Busy,
    /// Copied, or not part of the backup.
    Done,
}

/// Which clusters of the source a backup still has to copy, shared by the job's copy loop and
/// the copy-before-write hook: each cluster is copied exactly once, and before any write to it.
struct CopyMap {
    cluster: u64,
    size: u64,
    state: Mutex<Vec<Cluster>>,
    changed: Condvar,
}

impl CopyMap {
    /// Clusters of a `size`-byte source; those meeting `ranges` are to copy.
    fn new(size: u64, ranges: &[(u64, u64)]) -> CopyMap {
        // The largest power of two up to 64 KiB that every range boundary is a multiple of.
        let mut cluster = CBW_CLUSTER;
        for &(offset, len) in ranges {
            while cluster > 512 && (offset % cluster != 0 || len % cluster != 0) {
                cluster /= 2;
            }
        }
        let count = usize::try_from(size.div_ceil(cluster)).unwrap_or(0);
        let mut state = vec![Cluster::Done; count];
        for &(offset, len) in ranges {
            let first = (offset / cluster) as usize;
            let last = ((offset + len).div_ceil(cluster) as usize).min(count);
            for c in state.iter_mut().take(last).skip(first) {
                *c = Cluster::ToCopy;
            }
        }
        CopyMap {
            cluster,
            size,
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Cluster>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no cluster meeting `[offset, offset + len)` is being copied, then claims
    /// those still to copy; returns their byte runs `(offset, len)`, to be copied and then
    /// given to [`CopyMap::finish`].
    fn claim(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = (offset + len).min(self.size);
        if offset >= end {
            return Vec::new();
        }
        let first = (offset / self.cluster) as usize;
        let mut state = self.lock();
        let last = (end.div_ceil(self.cluster) as usize).min(state.len());
        while state[first..last].contains(&Cluster::Busy) {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, c) in state.iter_mut().enumerate().take(last).skip(first) {
            if *c != Cluster::ToCopy {
                continue;
            }
            *c = Cluster::Busy;
            let start = i as u64 * self.cluster;
            let n = self.cluster.min(self.size - start);
            match runs.last_mut() {
                Some(run) if run.0 + run.1 == start => run.1 += n,
                _ => runs.push((start, n)),
            }
        }
        runs
    }

    /// Ends a claim: the runs are copied (`copied`) or still to copy.
    fn finish(&self, runs: &[(u64, u64)], copied: bool) {
        let mut state = self.lock();
        let mark = if copied {
            Cluster::Done
        } else {
            Cluster::ToCopy
        };
        for &(offset, len) in runs {
            let first = (offset / self.cluster) as usize;
            let last = ((offset + len).div_ceil(self.cluster) as usize).min(state.len());
            for c in state.iter_mut().take(last).skip(first) {
                *c = mark;
            }
        }
        drop(state);
        self.changed.notify_all();
    }
}

/// What a copy request needs: both nodes, the mode, the shared map, and where buffers come
/// from (the command layer's, shared by every job: a request holds one while it runs).
struct Copier {
    source: Arc<dyn BlockIo>,
    target: Arc<dyn BlockIo>,
    top: bool,
    map: CopyMap,
    buffers: Arc<CopyBuffers>,
    options: BackupOptions,
}

/// How a copy failed: the operation and its error.
type CopyError = (IoOperationType, io::Error);

impl Copier {
    /// Copies whatever of `[offset, offset + len)` is still to copy (cluster aligned).
    fn copy(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let runs = self.map.claim(offset, len);
        let mut result = Ok(());
        for &(start, n) in &runs {
            result = self.copy_run(start, n);
            if result.is_err() {
                break;
            }
        }
        self.map.finish(&runs, result.is_ok());
        if result.is_ok() && self.options.discard_source {
            // As QEMU's block-copy: once copied, the source's range goes (its failure is no
            // failure of the copy). After `finish`, so that the discard's own
            // copy-before-write finds the clusters copied.
            for &(start, n) in &runs {
                let _ = self.source.discard(start, n);
            }
        }
        result
    }

    fn copy_run(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let size = usize::try_from(len.min(COPY_CHUNK))
            .map_err(|_| (IoOperationType::Read, io::Error::other("request too large")))?;
        let cluster = usize::try_from(self.options.target_cluster).unwrap_or(usize::MAX);
        let mut buf = self
            .buffers
            .take(size.max(COPY_CHUNK as usize).max(cluster));
        let result = if self.options.compress {
            copy_compressed(
                self.source.as_ref(),
                self.target.as_ref(),
                self.top,
                (offset, len, self.options.target_cluster),
                &mut buf,
            )
        } else {
            copy_range(
                (self.source.as_ref(), self.target.as_ref()),
                (self.top, self.options.use_copy_range),
                offset,
                len,
                &mut buf,
            )
        };
        self.buffers.give(buf);
        result
    }
}

/// The backup's copy-before-write hook on its source.
struct CopyBeforeWrite(Arc<Copier>);

impl BeforeWrite for CopyBeforeWrite {
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        // QEMU's default on-cbw-error=break-guest-write: the write fails.
        self.0
            .copy(offset, len)
            .map_err(|(_, e)| BlockError::with_errno(strerror(&e), e.raw_os_error().unwrap_or(5)))
    }
}

/// What a backup copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupSync {
    /// Everything the source reads (zeroes as zero writes).
    Full,
    /// What the source's own layer allocates.
    Top,
    /// Nothing up front: the job waits to be cancelled (copy-before-write only).
    None,
    /// The dirty clusters of the job's bitmap (`incremental` is this with `on-success`).
    Bitmap,
}

/// The bitmap a backup freezes for its life, and what happens to it at the end.
pub(crate) type BackupBitmap = (JobBitmap, BitmapSyncMode);

/// What a backup job works with, besides its nodes and mode.
pub(crate) struct BackupEnv {
    /// Where its copy requests run.
    pub(crate) pool: Arc<dyn IoPool>,
    /// Where its buffers come from.
    pub(crate) buffers: Arc<CopyBuffers>,
    /// Its node claims, released at its clean-up.
    pub(crate) claims: NodeClaims,
    /// For the drains of its clean-up's graph changes.
    pub(crate) jobs: JobRegistry,
}

/// A backup job's driver.
pub struct BackupJob {
    key: JobKey,
    source: Arc<dyn BlockIo>,
    sync: BackupSync,
    bitmap: Option<BackupBitmap>,
    env: BackupEnv,
    /// What is still to copy, `(offset, len)` in order.
    remaining: Vec<(u64, u64)>,
    /// A target node only this job holds (drive-backup), closed when the job ends.
    owned_target: Option<String>,
    /// Shared with the copy-before-write hook.
    copier: Arc<Copier>,
    /// The copy-before-write hook on the source, from the job's start to its clean-up.
    cbw: Option<NotifierHandle>,
}

impl BackupJob {
    pub(crate) fn new(
        key: JobKey,
        (source, target): (Arc<dyn BlockIo>, Arc<dyn BlockIo>),
        sync: BackupSync,
        bitmap: Option<BackupBitmap>,
        env: BackupEnv,
        options: BackupOptions,
    ) -> Self {
        let remaining = match (sync, &bitmap) {
            (BackupSync::None, _) => Vec::new(),
            (BackupSync::Bitmap, Some((b, _))) => b.dirty_ranges(),
            _ => vec![(0, source.size())],
        };
        // sync=none copies (before writes) whatever a write is about to change.
        let everything = [(0, source.size())];
        let to_copy = match sync {
            BackupSync::None => &everything[..],
            _ => &remaining[..],
        };
        let copier = Arc::new(Copier {
            source: source.clone(),
            target,
            top: matches!(sync, BackupSync::Top),
            map: CopyMap::new(source.size(), to_copy),
            buffers: env.buffers.clone(),
            options,
        });
        BackupJob {
            key,
            copier,
            cbw: None,
            source,
            sync,
            bitmap,
            env,
            remaining,
            owned_target: None,
        }
    }

    /// The bytes a backup of `source` copies: all of it, or the bitmap's dirty ranges.
    pub(crate) fn total(source: &dyn BlockIo, sync: BackupSync, bitmap: Option<&JobBitmap>) -> u64 {
        match (sync, bitmap) {
            (BackupSync::None, _) => 0,
            (BackupSync::Bitmap, Some(b)) => b.dirty_ranges().iter().map(|r| r.1).sum(),
            _ => source.size(),
        }
    }

    /// The job holds the only reference to `node` (a target it opened).
    pub(crate) fn owning_target(mut self, node: Option<String>) -> Self {
        self.owned_target = node;
        self
    }

    async fn run_copy(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        // From now on the target receives the source as it is now: a write to a cluster not
        // yet copied copies it first.
        self.cbw = self
            .source
            .add_write_notifier(Arc::new(CopyBeforeWrite(self.copier.clone())));
        if matches!(self.sync, BackupSync::None) {
            while !ctx.is_cancelled() {
                ctx.idle().await;
            }
            return Ok(());
        }
        ctx.set_progress_remaining(self.remaining.iter().map(|r| r.1).sum());
        // Requests in order; up to `depth` in flight (one under a speed limit, so that the
        // limit and pause points act per request as before).
        // `x-perf.max-chunk` (at least a backup cluster, as checked) bounds the requests.
        let chunk = match self.copier.options.max_chunk {
            0 => COPY_CHUNK,
            max => COPY_CHUNK
                .min(max / CBW_CLUSTER * CBW_CLUSTER)
                .max(CBW_CLUSTER),
        };
        let mut pending: VecDeque<(u64, u64)> = self
            .remaining
            .iter()
            .flat_map(|&(offset, len)| {
                (0..len.div_ceil(chunk)).map(move |i| {
                    let start = offset + i * chunk;
                    (start, chunk.min(offset + len - start))
                })
            })
            .collect();
        let mut in_flight: VecDeque<CopyRequest> = VecDeque::new();
        loop {
            let depth = if ctx.speed() == 0 {
                PARALLEL_REQUESTS.min(self.copier.options.max_workers)
            } else {
                1
            };
            while in_flight.len() < depth && !ctx.is_cancelled() {
                let Some((offset, len)) = pending.pop_front() else {
                    break;
                };
                in_flight.push_back(CopyRequest::submit(
                    self.env.pool.as_ref(),
                    self.copier.clone(),
                    offset,
                    len,
                ));
            }
            let Some(request) = in_flight.pop_front() else {
                break;
            };
            let (offset, len) = (request.offset, request.len);
            if let Err((operation, error)) = request.wait().await {
                // Let the others land, then retry or fail with this request first.
                let mut failed = vec![(offset, len)];
                for other in std::mem::take(&mut in_flight) {
                    let (o, l) = (other.offset, other.len);
                    match other.wait().await {
                        Ok(()) => ctx.progress_update(l),
                        Err(_) => failed.push((o, l)),
                    }
                }
                for range in failed.into_iter().rev() {
                    pending.push_front(range);
                }
                self.remaining = pending.iter().copied().collect();
                // QEMU retries the request (after the pause, for `stop`).
                ctx.retry_after_io_error(operation, &error).await?;
                continue;
            }
            ctx.progress_update(len);
            if in_flight.is_empty() && ctx.is_cancelled() {
                break;
            }
            ctx.rate_limit(len).await;
        }
        // Wait for what is still in flight (a cancel stops new requests only).
        for request in std::mem::take(&mut in_flight) {
            let _ = request.wait().await;
        }
        self.remaining = pending.into_iter().collect();
        if ctx.is_cancelled() {
            return Ok(());
        }
        self.flush_target(ctx).await?;
        self.remaining.clear();
        Ok(())
    }

    /// Flushes the target before the job can succeed: metadata the target still holds in
    /// memory (a qcow2 image's L2 tables and refcounts) is stored now, so an error storing it
    /// (a full disk, EIO) fails the job under its target error policy instead of surfacing at
    /// quit with the job reported done. QSD does not flush here (checked with strace); its
    /// qcow2 stores new tables when it allocates them, as ours does too, but a later error
    /// writing them back is lost to the job. Storing metadata needs flushes of its own (for
    /// crash-safe ordering), so the data becomes durable here too.
    async fn flush_target(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        loop {
            let result = Arc::new(Mutex::new(None));
            let slot = result.clone();
            let target = self.copier.target.clone();
            self.env
                .pool
                .run(Box::new(move || {
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(target.flush());
                }))
                .await;
            let outcome = result
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")));
            let Err(error) = outcome else {
                return Ok(());
            };
            match ctx.io_error(IoOperationType::Write, &error) {
                // (`UnknownValue` is for replies read from a newer QEMU; never an action here.)
                BlockErrorAction::Report | BlockErrorAction::UnknownValue => {
                    return Err(JobFailure::from_io(&error));
                }
                // Nothing to copy again: the job carries on to its end.
                BlockErrorAction::Ignore => return Ok(()),
                // The job is paused (as if by the user): flushed again once resumed, as a
                // failed copy request is retried.
                BlockErrorAction::Stop => {
                    ctx.pause_point().await;
                    if ctx.is_cancelled() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// QEMU's `backup_cleanup_sync_bitmap`: on success (or always, unless never) the
    /// successor becomes the bitmap; otherwise it is merged back. A failed `always` job
    /// leaves what it did not copy dirty.
    fn settle_bitmap(&mut self, success: bool) {
        let Some((bitmap, mode)) = &self.bitmap else {
            return;
        };
        let take_successor =
            (success || *mode == BitmapSyncMode::Always) && *mode != BitmapSyncMode::Never;
        if take_successor {
            bitmap.abdicate();
            if !success {
                for &(offset, len) in &self.remaining {
                    bitmap.mark_dirty(offset, len);
                }
            }
        } else {
            bitmap.reclaim();
        }
    }
}

/// How a copy request ended.
type CopyResult = Result<(), CopyError>;

/// A copy request running on the I/O pool.
struct CopyRequest {
    offset: u64,
    len: u64,
    result: Arc<Mutex<Option<CopyResult>>>,
    done: crate::node::IoFuture,
}

impl CopyRequest {
    /// Starts copying `[offset, offset + len)`.
    fn submit(pool: &dyn IoPool, copier: Arc<Copier>, offset: u64, len: u64) -> CopyRequest {
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        let done = pool.run(Box::new(move || {
            let r = copier.copy(offset, len);
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        }));
        CopyRequest {
            offset,
            len,
            result,
            done,
        }
    }

    async fn wait(self) -> CopyResult {
        self.done.await;
        self.result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| Err((IoOperationType::Read, io::Error::other("I/O worker lost"))))
    }
}

/// Copies `[offset, offset + len)` as the source's block status says, through `buf` (data
/// by the kernel first with `use-copy-range`, as QEMU's block-copy tries it).
fn copy_range(
    (source, target): (&dyn BlockIo, &dyn BlockIo),
    (top, use_copy_range): (bool, bool),
    offset: u64,
    len: u64,
    buf: &mut [u8],
) -> CopyResult {
    let read = |e| (IoOperationType::Read, e);
    let write = |e| (IoOperationType::Write, e);
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let extent = source.block_status(pos, end - pos).map_err(read)?;
        let n = match extent.len {
            0 => end - pos,
            l => l.min(end - pos),
        };
        if top && !extent.allocated {
            // Comes from the backing chain: not part of a `top` backup.
        } else if extent.zero {
            target.write_zeroes(pos, n).map_err(write)?;
        } else if use_copy_range && source.copy_range_to(target, pos, n).unwrap_or(false) {
            // Copied by the kernel (any failure falls back to the copy through memory, as
            // QEMU's block-copy does).
        } else {
            let mut done = 0;
            while done < n {
                let step = (n - done).min(buf.len() as u64);
                let chunk = &mut buf[..step as usize];
                source.read_at(chunk, pos + done).map_err(read)?;
                target.write_at(chunk, pos + done).map_err(write)?;
                done += step;
            }
        }
        pos += n;
    }
    Ok(())
}

/// Copies `[offset, offset + len)` writing whole target clusters of `cluster` bytes
/// compressed (zeroes stay zero writes, as QEMU's block-copy). A piece not aligned to a
/// target cluster (a copy-before-write inside a cluster larger than 64 KiB) is written plain.
fn copy_compressed(
    source: &dyn BlockIo,
    target: &dyn BlockIo,
    top: bool,
    (offset, len, cluster): (u64, u64, u64),
    buf: &mut [u8],
) -> CopyResult {
    let read = |e| (IoOperationType::Read, e);
    let write = |e| (IoOperationType::Write, e);
    let end = offset + len;
    let disk = source.size();
    let mut pos = offset;
    while pos < end {
        let n = (cluster - pos % cluster).min(end - pos);
        let extent = source.block_status(pos, n).map_err(read)?;
        let whole = extent.len == 0 || extent.len >= n;
        if top && !extent.allocated && whole {
            // Comes from the backing chain: not part of a `top` backup.
        } else if extent.zero && whole {
            target.write_zeroes(pos, n).map_err(write)?;
        } else {
            let chunk = &mut buf[..n as usize];
            source.read_at(chunk, pos).map_err(read)?;
            if pos.is_multiple_of(cluster) && (n == cluster || pos + n == disk) {
                target.write_compressed(chunk, pos).map_err(write)?;
            } else {
                target.write_at(chunk, pos).map_err(write)?;
            }
        }
        pos += n;
    }
    Ok(())
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(self.run_copy(ctx))
    }

    fn commit(&mut self) {
        self.settle_bitmap(true);
    }

    fn abort(&mut self) {
        self.settle_bitmap(false);
    }

    /// QEMU's backup clean-up changes the graph three times (the copy-before-write filter is
    /// dropped, the job's nodes are detached, the target is unref'd), each a drain of every
    /// node that the jobs running now see (the job's free after its `null` is a fourth, the
    /// job core's).
    fn clean(&mut self) {
        // The copy-before-write hook goes with the job.
        self.cbw = None;
        self.env.claims.release(self.key);
        for _ in 0..3 {
            self.env.jobs.drain_all();
        }
        if let Some(node) = self.owned_target.take() {
            self.env.claims.retire(&node);
        }
    }
}
