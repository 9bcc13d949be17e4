//! The backup job (QEMU's `block/backup.c`): copies a source node to a target node, in large
//! requests run on an [`IoPool`], skipping what the source says need not be copied.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use job::{
    BoxFuture, ErrorAction, IoOperation, JobContext, JobDriver, JobFailure, JobKey, JobRegistry,
    OnError,
};

use crate::claims::{DrainWait, NodeClaims, drain_jobs};
use qmp_api::BitmapSyncMode;

use crate::node::{BlockIo, IoPool, SyncBitmap, errno_text, run_blocking, yield_now};

/// Bytes per copy request (cluster aligned for every cluster size up to 1 MiB).
pub const COPY_CHUNK: u64 = 1 << 20;

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
pub type BackupBitmap = (Arc<dyn SyncBitmap>, BitmapSyncMode);

/// A backup job's driver.
pub struct BackupJob {
    source: Arc<dyn BlockIo>,
    target: Arc<dyn BlockIo>,
    sync: BackupSync,
    bitmap: Option<BackupBitmap>,
    on_source_error: OnError,
    on_target_error: OnError,
    pool: Arc<dyn IoPool>,
    claims: NodeClaims,
    key: Arc<OnceLock<JobKey>>,
    /// What is still to copy, `(offset, len)` in order.
    remaining: Vec<(u64, u64)>,
    /// A target node only this job holds (drive-backup), closed when the job ends.
    owned_target: Option<String>,
    /// The graph changes of QEMU's backup clean-up drain every node: other jobs pause and
    /// resume (three times during the clean-up, once more shortly after).
    cleanup_drains: Option<(JobRegistry, DrainWait)>,
    /// Set once the job's work has begun and its total progress is known.
    begun: Arc<AtomicBool>,
}

impl BackupJob {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        source: Arc<dyn BlockIo>,
        target: Arc<dyn BlockIo>,
        sync: BackupSync,
        bitmap: Option<BackupBitmap>,
        on_source_error: OnError,
        on_target_error: OnError,
        pool: Arc<dyn IoPool>,
        claims: NodeClaims,
        key: Arc<OnceLock<JobKey>>,
    ) -> Self {
        let remaining = match (sync, &bitmap) {
            (BackupSync::None, _) => Vec::new(),
            (BackupSync::Bitmap, Some((b, _))) => b.dirty_ranges(),
            _ => vec![(0, source.size())],
        };
        BackupJob {
            source,
            target,
            sync,
            bitmap,
            on_source_error,
            on_target_error,
            pool,
            claims,
            key,
            remaining,
            owned_target: None,
            cleanup_drains: None,
            begun: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The bytes the job will copy, known from its creation.
    pub(crate) fn total(&self) -> u64 {
        self.remaining.iter().map(|r| r.1).sum()
    }

    /// A flag set once the work has begun (its total progress is then known).
    pub(crate) fn begun(&self) -> Arc<AtomicBool> {
        self.begun.clone()
    }

    /// Drains like QEMU's clean-up (see [`BackupJob`]'s `cleanup_drains`).
    pub(crate) fn draining_on_cleanup(mut self, jobs: JobRegistry, wait: DrainWait) -> Self {
        self.cleanup_drains = Some((jobs, wait));
        self
    }

    /// The job holds the only reference to `node` (a target it opened).
    pub(crate) fn owning_target(mut self, node: Option<String>) -> Self {
        self.owned_target = node;
        self
    }

    async fn run_copy(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        if matches!(self.sync, BackupSync::None) {
            self.begun.store(true, Ordering::Release);
            while !ctx.is_cancelled() {
                ctx.idle().await;
            }
            return Ok(());
        }
        ctx.set_progress_remaining(self.remaining.iter().map(|r| r.1).sum());
        self.begun.store(true, Ordering::Release);
        let top = matches!(self.sync, BackupSync::Top);
        let mut next = 0;
        while let Some(&(offset, range_len)) = self.remaining.get(next) {
            if ctx.is_cancelled() {
                return Ok(());
            }
            let n = COPY_CHUNK.min(range_len);
            let (source, target) = (self.source.clone(), self.target.clone());
            let result = run_blocking(self.pool.as_ref(), move || {
                copy_range(source.as_ref(), target.as_ref(), top, offset, n)
            })
            .await
            .unwrap_or_else(|| Err((IoOperation::Read, io::Error::other("I/O worker lost"))));
            if let Err((operation, error)) = result {
                let policy = match operation {
                    IoOperation::Read => self.on_source_error,
                    IoOperation::Write => self.on_target_error,
                };
                let no_space = error.raw_os_error() == Some(28);
                match ctx.report_io_error(policy, operation, no_space) {
                    ErrorAction::Report => return Err(JobFailure::new(errno_text(&error))),
                    // QEMU retries the request (after the pause, for `stop`).
                    ErrorAction::Ignore | ErrorAction::Stop => {
                        yield_now().await;
                        ctx.pause_point().await;
                        continue;
                    }
                }
            }
            ctx.progress_update(n);
            if n == range_len {
                next += 1;
            } else if let Some(range) = self.remaining.get_mut(next) {
                *range = (offset + n, range_len - n);
            }
            ctx.rate_limit(n).await;
        }
        self.remaining.clear();
        if ctx.is_cancelled() {
            return Ok(());
        }
        let target = self.target.clone();
        match run_blocking(self.pool.as_ref(), move || target.flush()).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(JobFailure::new(errno_text(&e))),
            None => Err(JobFailure::new("I/O worker lost")),
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

/// Copies `[offset, offset + len)` as the source's block status says.
fn copy_range(
    source: &dyn BlockIo,
    target: &dyn BlockIo,
    top: bool,
    offset: u64,
    len: u64,
) -> Result<(), (IoOperation, io::Error)> {
    let read = |e| (IoOperation::Read, e);
    let write = |e| (IoOperation::Write, e);
    let end = offset + len;
    let mut pos = offset;
    let mut buf = Vec::new();
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
        } else {
            let size =
                usize::try_from(n).map_err(|_| read(io::Error::other("request too large")))?;
            buf.resize(size, 0);
            source.read_at(&mut buf, pos).map_err(read)?;
            target.write_at(&buf, pos).map_err(write)?;
        }
        pos += n;
    }
    Ok(())
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> &'static str {
        "backup"
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

    fn clean(&mut self) {
        if let Some(key) = self.key.get() {
            self.claims.release(*key);
        }
        if let Some((jobs, wait)) = self.cleanup_drains.take() {
            // Dropping the copy-before-write filter, detaching the job's nodes, unref'ing the
            // target: each a drain of every node in QEMU, seen by the jobs running now.
            let others = self.claims.all_jobs();
            if wait == DrainWait::UntilParked {
                // Waiting for another job to park must not block the thread that would run it
                // (a tokio worker's next task): drain from a thread of its own.
                let (j, o) = (jobs.clone(), others.clone());
                let drains = std::thread::spawn(move || {
                    for _ in 0..3 {
                        drain_jobs(&j, &o, wait);
                    }
                });
                let _ = drains.join();
                // The job's last reference goes a moment later (a bottom half in QEMU).
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    drain_jobs(&jobs, &others, wait);
                });
            } else {
                for _ in 0..3 {
                    drain_jobs(&jobs, &others, wait);
                }
            }
        }
        if let Some(node) = self.owned_target.take() {
            self.claims.retire(&node);
        }
    }
}
