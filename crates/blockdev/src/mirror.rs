//! The mirror job (QEMU's `block/mirror.c`, `sync=full` to an existing node): copies the
//! source, goes READY, and waits for `complete` (finishes: COMPLETED) or a cancel (soft in
//! READY: COMPLETED without switching; forced: CANCELLED).

use std::io;
use std::sync::{Arc, OnceLock};

use job::{
    BoxFuture, ErrorAction, IoOperation, JobContext, JobDriver, JobFailure, JobKey, OnError,
};

use crate::backup::COPY_CHUNK;
use crate::claims::NodeClaims;
use crate::node::{BlockIo, IoPool, WriteTracker, errno_text, run_blocking, yield_now};

/// A mirror job's driver.
pub struct MirrorJob {
    source: Arc<dyn BlockIo>,
    target: Arc<dyn BlockIo>,
    on_source_error: OnError,
    on_target_error: OnError,
    pool: Arc<dyn IoPool>,
    claims: NodeClaims,
    key: Arc<OnceLock<JobKey>>,
    /// Writes to the source since the job started (none without a tracking graph).
    tracker: Option<Arc<dyn WriteTracker>>,
}

/// How often a READY mirror with write tracking looks for new writes.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl MirrorJob {
    pub(crate) fn new(
        source: Arc<dyn BlockIo>,
        target: Arc<dyn BlockIo>,
        errors: (OnError, OnError),
        pool: Arc<dyn IoPool>,
        claims: NodeClaims,
        key: Arc<OnceLock<JobKey>>,
    ) -> Self {
        MirrorJob {
            source,
            target,
            on_source_error: errors.0,
            on_target_error: errors.1,
            pool,
            claims,
            key,
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
            let result = run_blocking(self.pool.as_ref(), move || {
                let size = usize::try_from(n)
                    .map_err(|_| (IoOperation::Read, io::Error::other("request too large")))?;
                let mut buf = vec![0; size];
                let status = source
                    .block_status(offset, n)
                    .map_err(|e| (IoOperation::Read, e))?;
                if status.zero && status.len >= n {
                    return target
                        .write_zeroes(offset, n)
                        .map_err(|e| (IoOperation::Write, e));
                }
                source
                    .read_at(&mut buf, offset)
                    .map_err(|e| (IoOperation::Read, e))?;
                target
                    .write_at(&buf, offset)
                    .map_err(|e| (IoOperation::Write, e))
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
                    ErrorAction::Ignore | ErrorAction::Stop => {
                        yield_now().await;
                        ctx.pause_point().await;
                        continue;
                    }
                }
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
            Some(Err(e)) => Err(JobFailure::new(errno_text(&e))),
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
    fn job_type(&self) -> &'static str {
        "mirror"
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
        if let Some(key) = self.key.get() {
            self.claims.release(*key);
        }
    }
}
