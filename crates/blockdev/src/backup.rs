//! The backup job (QEMU's `block/backup.c`): copies a source node to a target node, in large
//! requests run on an [`IoPool`], skipping what the source says need not be copied. It copies
//! through the block-copy state of a copy-before-write filter it puts over its source (named
//! by `filter-node-name`, else automatically) so that writes to the source meanwhile copy the
//! old data first: one implementation, `block::copy`, for backups and the filter driver.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use block::copy::{BlockCopy, CopyError, CopyIo, CopyOp, CopyOptions};
use block::{BlockError, BlockResult, Extent, NotifierHandle};
use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobKey, JobRegistry};
use qmp_api::{BitmapSyncMode, BlockErrorAction, IoOperationType, JobType, QmpError};

use crate::bitmaps::JobBitmap;
use crate::claims::NodeClaims;
use crate::node::{BlockIo, CopyBuffers, IoPool, NodeGraph};

/// Bytes per copy request (cluster aligned for every cluster size up to 1 MiB).
pub use block::copy::COPY_CHUNK;

/// Copy requests a backup without a speed limit keeps in flight.
pub const PARALLEL_REQUESTS: usize = 8;

/// The largest cluster a backup tracks copies in on a graph without filter nodes (QEMU's
/// copy-before-write cluster).
const HOOK_CLUSTER: u64 = 64 << 10;

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
            target_cluster: HOOK_CLUSTER,
            use_copy_range: false,
        }
    }
}

impl BackupOptions {
    /// What the block copy does besides copying.
    fn copy_options(&self) -> CopyOptions {
        CopyOptions {
            compress: self.compress.then_some(self.target_cluster),
            discard_source: self.discard_source,
            use_copy_range: self.use_copy_range,
        }
    }
}

/// A node's I/O as one end of a copy (graphs whose nodes are not block-crate nodes).
struct IoEnd(Arc<dyn BlockIo>);

fn block_error(e: io::Error) -> BlockError {
    BlockError::from(e)
}

impl CopyIo for IoEnd {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.0.read_at(buf, offset).map_err(block_error)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.0.write_at(buf, offset).map_err(block_error)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.0.write_zeroes(offset, len).map_err(block_error)
    }
    fn extent(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.0.block_status(offset, len).map_err(block_error)
    }
    fn write_compressed_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.0.write_compressed(buf, offset).map_err(block_error)
    }
    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.0.discard(offset, len).map_err(block_error)
    }
    fn block_node(&self) -> Option<Arc<block::BlockNode>> {
        self.0.block_node().cloned()
    }
}

/// How a copy failed, as the job reports it: the operation and its error.
type JobCopyError = (IoOperationType, io::Error);

fn job_error(e: CopyError) -> JobCopyError {
    let operation = match e.op {
        CopyOp::Read => IoOperationType::Read,
        CopyOp::Write => IoOperationType::Write,
    };
    let error = match e.error.errno() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(e.error.desc().to_string()),
    };
    (operation, error)
}

/// The copy-before-write a backup runs with, from its prepare to its clean-up (QEMU's backup
/// filter): the block-copy state the job copies through, carried by a copy-before-write
/// filter node over the source, or (graphs without filter nodes) by a hook on the source.
pub(crate) struct BackupCopy {
    copy: Arc<BlockCopy>,
    /// The filter node's name, removed at the clean-up.
    filter: Option<String>,
    /// The hook on the source, where there is no filter.
    hook: Option<NotifierHandle>,
}

impl BackupCopy {
    /// Sets up the copy-before-write of a backup from node `source` to node `target` (QEMU's
    /// `bdrv_cbw_append` in `backup_job_create`): what `sync` copies, through a filter named
    /// `filter_node_name` (else automatically) where the graph has filter nodes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set_up(
        graph: &mut dyn NodeGraph,
        (source_name, source): (&str, &Arc<dyn BlockIo>),
        (target_name, target): (&str, &Arc<dyn BlockIo>),
        filter_node_name: Option<&str>,
        sync: BackupSync,
        ranges: &[(u64, u64)],
        buffers: &Arc<CopyBuffers>,
        options: &BackupOptions,
    ) -> Result<BackupCopy, QmpError> {
        let (copy, filter, hook) =
            match graph.add_backup_filter(source_name, target_name, filter_node_name)? {
                Some((name, copy)) => (copy, Some(name), None),
                None => {
                    let copy = Arc::new(BlockCopy::new(
                        Arc::new(IoEnd(source.clone())),
                        Arc::new(IoEnd(target.clone())),
                        source.size(),
                        fitting_cluster(ranges),
                        buffers.clone(),
                    ));
                    let hook = source.add_write_notifier(Arc::new(
                        block::copy::CopyBeforeWriteHook(copy.clone()),
                    ));
                    (copy, None, hook)
                }
            };
        // QEMU's backup_init_bcs_bitmap: a bitmap backup copies the bitmap's clusters only.
        if sync == BackupSync::Bitmap {
            copy.restrict_to(ranges);
        }
        copy.skip_unallocated(sync == BackupSync::Top);
        copy.set_options(options.copy_options());
        Ok(BackupCopy { copy, filter, hook })
    }

    /// The filter node's name, if the backup has one.
    pub(crate) fn filter(&self) -> Option<&str> {
        self.filter.as_deref()
    }

    /// The block-copy state.
    pub(crate) fn copy(&self) -> &Arc<BlockCopy> {
        &self.copy
    }

    /// Ends the copy-before-write at once; the filter node goes at the next command (a
    /// job's clean-up cannot reach the graph).
    fn release(&mut self, claims: &NodeClaims) {
        self.copy.stop();
        self.hook = None;
        if let Some(filter) = self.filter.take() {
            claims.retire(&filter);
        }
    }

    /// Undoes [`BackupCopy::set_up`] now (no job was made).
    pub(crate) fn discard(mut self, graph: &mut dyn NodeGraph) {
        self.copy.stop();
        self.hook = None;
        if let Some(filter) = self.filter.take() {
            graph.release_if_unused(&filter);
        }
    }
}

/// The largest power of two up to 64 KiB that every range boundary is a multiple of: where
/// the backup hooks its source itself, it copies exactly the ranges it was given.
fn fitting_cluster(ranges: &[(u64, u64)]) -> u64 {
    let mut cluster = HOOK_CLUSTER;
    for &(offset, len) in ranges {
        while cluster > 512 && (offset % cluster != 0 || len % cluster != 0) {
            cluster /= 2;
        }
    }
    cluster
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
    /// Its node claims, released at its clean-up.
    pub(crate) claims: NodeClaims,
    /// For the drains of its clean-up's graph changes.
    pub(crate) jobs: JobRegistry,
}

/// A backup job's driver.
pub struct BackupJob {
    key: JobKey,
    sync: BackupSync,
    bitmap: Option<BackupBitmap>,
    env: BackupEnv,
    /// What is still to copy, `(offset, len)` in order.
    remaining: Vec<(u64, u64)>,
    /// A target node only this job holds (drive-backup), closed when the job ends.
    owned_target: Option<String>,
    /// The block-copy state the job copies through.
    copy: Arc<BlockCopy>,
    /// The copy-before-write, from the job's prepare to its clean-up.
    cbw: Option<BackupCopy>,
    /// The target, flushed before the job succeeds.
    target: Arc<dyn BlockIo>,
    /// `x-perf` and the other options.
    options: BackupOptions,
}

impl BackupJob {
    pub(crate) fn new(
        key: JobKey,
        (source, target): (Arc<dyn BlockIo>, Arc<dyn BlockIo>),
        (sync, bitmap): (BackupSync, Option<BackupBitmap>),
        env: BackupEnv,
        (copy, cbw, options): (Arc<BlockCopy>, Option<BackupCopy>, BackupOptions),
    ) -> Self {
        let remaining = BackupJob::ranges(source.as_ref(), sync, bitmap.as_ref().map(|b| &b.0));
        BackupJob {
            key,
            copy,
            cbw,
            target,
            options,
            sync,
            bitmap,
            env,
            remaining,
            owned_target: None,
        }
    }

    /// What a backup of `source` copies, `(offset, len)` in order: nothing up front
    /// (`sync=none`), the bitmap's dirty ranges, or everything.
    pub(crate) fn ranges(
        source: &dyn BlockIo,
        sync: BackupSync,
        bitmap: Option<&JobBitmap>,
    ) -> Vec<(u64, u64)> {
        match (sync, bitmap) {
            (BackupSync::None, _) => Vec::new(),
            (BackupSync::Bitmap, Some(b)) => b.dirty_ranges(),
            _ => vec![(0, source.size())],
        }
    }

    /// The job's length: the bitmap's dirty ranges, or all of the source (with `sync=none`
    /// too: as in QEMU, any cluster may be copied before a write).
    pub(crate) fn total(source: &dyn BlockIo, sync: BackupSync, bitmap: Option<&JobBitmap>) -> u64 {
        match (sync, bitmap) {
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
        // Since the prepare, the target receives the source as it was then: a write to a
        // cluster not yet copied copies it first.
        if matches!(self.sync, BackupSync::None) {
            while !ctx.is_cancelled() {
                ctx.idle().await;
            }
            return Ok(());
        }
        ctx.set_progress_remaining(self.remaining.iter().map(|r| r.1).sum());
        // Requests started in order; up to `depth` in flight (one under a speed limit, so that
        // the limit and pause points act per request as before).
        // `x-perf.max-chunk` (at least a backup cluster, as checked) bounds the requests.
        let cluster = self.copy.cluster_size();
        let chunk = match self.options.max_chunk {
            0 => COPY_CHUNK,
            max => COPY_CHUNK.min(max / cluster * cluster).max(cluster),
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
                PARALLEL_REQUESTS.min(self.options.max_workers)
            } else {
                1
            };
            while in_flight.len() < depth && !ctx.is_cancelled() {
                let Some((offset, len)) = pending.pop_front() else {
                    break;
                };
                in_flight.push_back(CopyRequest::submit(
                    self.env.pool.as_ref(),
                    self.copy.clone(),
                    offset,
                    len,
                ));
            }
            // The first to finish, whichever it is (QEMU's task pool starts the next copy as
            // soon as any one ends): a slow request does not hold the others' places.
            let Some(request) = CopyRequest::first_done(&mut in_flight).await else {
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
            let target = self.target.clone();
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
type CopyResult = Result<(), JobCopyError>;

/// A copy request running on the I/O pool.
struct CopyRequest {
    offset: u64,
    len: u64,
    result: Arc<Mutex<Option<CopyResult>>>,
    /// `None` once it has finished.
    done: Option<crate::node::IoFuture>,
}

impl CopyRequest {
    /// Starts copying `[offset, offset + len)`.
    fn submit(pool: &dyn IoPool, copy: Arc<BlockCopy>, offset: u64, len: u64) -> CopyRequest {
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        let done = pool.run(Box::new(move || {
            let r = copy.copy(offset, len).map_err(job_error);
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        }));
        CopyRequest {
            offset,
            len,
            result,
            done: Some(done),
        }
    }

    /// Removes and returns the first request of `requests` to finish (`None` if empty).
    async fn first_done(requests: &mut VecDeque<CopyRequest>) -> Option<CopyRequest> {
        if requests.is_empty() {
            return None;
        }
        let index = std::future::poll_fn(|cx| {
            for (i, request) in requests.iter_mut().enumerate() {
                let finished = match request.done.as_mut() {
                    None => true,
                    Some(done) => done.as_mut().poll(cx).is_ready(),
                };
                if finished {
                    request.done = None;
                    return std::task::Poll::Ready(i);
                }
            }
            std::task::Poll::Pending
        })
        .await;
        requests.remove(index)
    }

    async fn wait(self) -> CopyResult {
        if let Some(done) = self.done {
            done.await;
        }
        self.result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| Err((IoOperationType::Read, io::Error::other("I/O worker lost"))))
    }
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
        // The copy-before-write goes with the job (its filter node at the next command).
        if let Some(cbw) = self.cbw.as_mut() {
            cbw.release(&self.env.claims);
        }
        self.env.claims.release(self.key);
        for _ in 0..3 {
            self.env.jobs.drain_all();
        }
        if let Some(node) = self.owned_target.take() {
            self.env.claims.retire(&node);
        }
    }
}
