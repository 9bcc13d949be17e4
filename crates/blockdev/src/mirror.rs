//! The mirror job (QEMU's `block/mirror.c`, `sync=full` to an existing node): copies the
//! source, goes READY, and waits for `complete` (finishes: COMPLETED) or a cancel (soft in
//! READY: COMPLETED without switching; forced: CANCELLED).

use std::io;
use std::sync::Arc;

use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobKey};
use qmp_api::{IoOperationType, JobType};

use crate::backup::COPY_CHUNK;
use crate::claims::NodeClaims;
use crate::node::{BlockIo, CopyBuffers, IoPool, WriteTracker, run_blocking};

/// A mirror job's driver.
pub struct MirrorJob {
    key: JobKey,
    source: Arc<dyn BlockIo>,
    target: Arc<dyn BlockIo>,
    pool: Arc<dyn IoPool>,
    buffers: Arc<CopyBuffers>,
    claims: NodeClaims,
    /// Writes to the source since the job started (none without a tracking graph).
    tracker: Option<Arc<dyn WriteTracker>>,
}

/// How often a READY mirror with write tracking looks for new writes.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl MirrorJob {
    pub(crate) fn new(
        key: JobKey,
        (source, target): (Arc<dyn BlockIo>, Arc<dyn BlockIo>),
        (pool, buffers): (Arc<dyn IoPool>, Arc<CopyBuffers>),
        claims: NodeClaims,
    ) -> Self {
        MirrorJob {
            key,
            source,
            target,
            pool,
            buffers,
            claims,
            tracker: None,
        }
    }

    /// Copies writes to the source made while the job runs.
    pub(crate) fn tracking(mut self, tracker: Option<Arc<dyn WriteTracker>>) -> Self {
        self.tracker = tracker;
        self
    }

    /// The initial copy; false if cancelled meanwhile.
    async fn copy_all(&mut self, ctx: &JobContext) -> Result<bool, JobFailure> {
        let len = self.source.size();
        ctx.set_progress_remaining(len);
        self.copy_ranges(ctx, &[(0, len)]).await
    }

    /// Copies what was written to the source since the last look; false if cancelled.
    async fn copy_new_writes(&mut self, ctx: &JobContext) -> Result<bool, JobFailure> {
        let Some(tracker) = &self.tracker else {
            return Ok(true);
        };
        let dirty = tracker.take_dirty();
        if dirty.is_empty() {
            return Ok(true);
        }
        ctx.progress_increase_remaining(dirty.iter().map(|r| r.1).sum());
        self.copy_ranges(ctx, &dirty).await
    }

    async fn copy_ranges(
        &mut self,
        ctx: &JobContext,
        ranges: &[(u64, u64)],
    ) -> Result<bool, JobFailure> {
        for &(start, len) in ranges {
            if !self.copy_range(ctx, start, start + len).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn copy_range(
        &mut self,
        ctx: &JobContext,
        start: u64,
        end: u64,
    ) -> Result<bool, JobFailure> {
        let mut offset = start;
        while offset < end {
            if ctx.is_cancelled() {
                return Ok(false);
            }
            let n = COPY_CHUNK.min(end - offset);
            let (source, target) = (self.source.clone(), self.target.clone());
            let buffers = self.buffers.clone();
            let result = run_blocking(self.pool.as_ref(), move || {
                let read = |e| (IoOperationType::Read, e);
                let write = |e| (IoOperationType::Write, e);
                let size =
                    usize::try_from(n).map_err(|_| read(io::Error::other("request too large")))?;
                let status = source.block_status(offset, n).map_err(read)?;
                if status.zero && status.len >= n {
                    return target.write_zeroes(offset, n).map_err(write);
                }
                let mut buf = buffers.take(size);
                let copied = source
                    .read_at(&mut buf[..size], offset)
                    .map_err(read)
                    .and_then(|()| target.write_at(&buf[..size], offset).map_err(write));
                buffers.give(buf);
                copied
            })
            .await
            .unwrap_or_else(|| Err((IoOperationType::Read, io::Error::other("I/O worker lost"))));
            if let Err((operation, error)) = result {
                ctx.retry_after_io_error(operation, &error).await?;
                continue;
            }
            ctx.progress_update(n);
            offset += n;
            ctx.rate_limit(n).await;
        }
        Ok(true)
    }

    async fn flush_target(&mut self) -> Result<bool, JobFailure> {
        let target = self.target.clone();
        match run_blocking(self.pool.as_ref(), move || target.flush()).await {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(JobFailure::from_io(&e)),
            None => Err(JobFailure::new("I/O worker lost")),
        }
    }

    async fn run_mirror(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        if !self.copy_all(ctx).await? || !self.copy_new_writes(ctx).await? {
            return Ok(());
        }
        if !self.flush_target().await? {
            return Ok(());
        }
        ctx.set_ready();
        // Converged: keep the target in sync until complete or cancel.
        while !ctx.should_complete() && !ctx.cancel_requested() {
            if self.tracker.is_some() {
                ctx.sleep(SYNC_INTERVAL).await;
            } else {
                ctx.idle().await;
            }
            if !self.copy_new_writes(ctx).await? {
                return Ok(());
            }
        }
        if ctx.is_cancelled() {
            return Ok(());
        }
        self.flush_target().await.map(|_| ())
    }
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> JobType {
        JobType::Mirror
    }

    fn supports_complete(&self) -> bool {
        true
    }

    fn soft_cancel_when_ready(&self) -> bool {
        true
    }

    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(self.run_mirror(ctx))
    }

    fn clean(&mut self) {
        if let Some(tracker) = self.tracker.take() {
            tracker.stop();
        }
        self.claims.release(self.key);
    }
}
