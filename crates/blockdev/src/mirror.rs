//! The mirror job (QEMU's `block/mirror.c`): a filter node above the source (`mirror_top`,
//! named by `filter-node-name`) records every write in the job's dirty bitmap; the job copies
//! dirty ranges to the target (all of them first for `sync=full`, the top layer's for `top`,
//! none for `none`) until the bitmap is clean, goes READY and keeps the target in sync. Guest
//! writes wake it; nothing polls. `copy-mode=write-blocking` (or `block-job-change` to it)
//! writes each guest write to the target too before it completes, so the job becomes
//! `actively-synced`. `complete` pivots: every parent of the source (or of `replaces`) moves
//! onto the target.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use block::{BlockOp, DirtyBitmap, OpBlocker, OpSet};
use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobKey, JobRegistry, JobSpec};
use qmp_api::{
    BlockdevMirrorArguments, DriveMirror, IoOperationType, JobType, MirrorCopyMode, MirrorSyncMode,
    NewImageMode, QmpError,
};

use crate::BlockState;
use crate::busy::MAIN_NODE;
use crate::claims::NodeClaims;
use crate::node::{
    BlockIo, ChainEditor, CopyBuffers, FilterWrites, IoFuture, IoPool, MirrorNodes,
    MirrorTargetImage, NodeBitmaps,
};
use crate::writeback::Writeback;

/// Copy operations a mirror keeps in flight at most (QEMU's `MAX_IN_FLIGHT`).
const MAX_IN_FLIGHT: usize = 16;
/// The largest copy operation (QEMU's `MAX_IO_BYTES`).
const MAX_IO_BYTES: u64 = 1 << 20;
/// `buf-size` by default (QEMU's `DEFAULT_MIRROR_BUF_SIZE`).
const DEFAULT_BUF_SIZE: u64 = 16 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ranges being written (a copy operation or an active guest write), so that the two never
/// interleave on the same granules.
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

impl RangeLocks {
    fn lock(&self, start: u64, end: u64) {
        let mut held = lock(&self.held);
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self
                .freed
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.push((start, end));
    }

    fn unlock(&self, start: u64, end: u64) {
        let mut held = lock(&self.held);
        if let Some(i) = held.iter().position(|&r| r == (start, end)) {
            held.swap_remove(i);
        }
        drop(held);
        self.freed.notify_all();
    }
}

/// Guest writes through the filter, and the job's drained section around completion: while
/// closed, new writes wait (QEMU keeps the source drained from the last check to the pivot).
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl Gate {
    fn enter(&self) {
        let mut st = lock(&self.state);
        while st.0 {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.1 += 1;
    }

    fn leave(&self) {
        lock(&self.state).1 -= 1;
        self.changed.notify_all();
    }

    /// Closes the gate once no write is inside.
    fn close(&self) {
        let mut st = lock(&self.state);
        st.0 = true;
        while st.1 > 0 {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn open(&self) {
        lock(&self.state).0 = false;
        self.changed.notify_all();
    }
}

/// The mirror's dirty bitmap (the anonymous one) in `bitmaps`.
fn with_bitmap<T>(bitmaps: &dyn NodeBitmaps, f: impl FnOnce(&mut DirtyBitmap) -> T) -> Option<T> {
    let mut list = bitmaps.list();
    list.iter_mut().find(|b| b.name().is_none()).map(f)
}

/// QEMU's `replace_blocker`: from `block-job-complete` to the end of the job, every operation
/// on the node `replaces` names is blocked.
enum ReplaceBlocker {
    /// Not completed yet.
    Idle,
    /// Completed: the blocker on the replaced node (dropping it unblocks).
    Held { _blocker: OpBlocker },
    /// The job cleaned up: nothing is blocked any more.
    Ended,
}

/// What one mirror job, its filter and `block-job-change` share: made for the job (its key is
/// known before the filter goes into the graph) and dropped with the job and its filter.
pub(crate) struct MirrorShared {
    target: Arc<dyn BlockIo>,
    ranges: RangeLocks,
    gate: Gate,
    write_blocking: AtomicBool,
    actively_synced: Arc<AtomicBool>,
    /// The job, woken by guest writes.
    jobs: JobRegistry,
    key: JobKey,
    /// `replaces`, if given.
    replaces: Option<String>,
    replace_blocker: Mutex<ReplaceBlocker>,
}

impl MirrorShared {
    fn wake(&self) {
        self.jobs.kick(self.key);
    }

    /// QEMU's `mirror_complete` before the job is told to complete: blocks every operation on
    /// the node `replaces` names (`Node name '<name>' not found` if it is gone). Undone by
    /// [`MirrorShared::unblock_replaced`] if the complete fails after all.
    pub(crate) fn block_replaced(&self, env: &BlockState) -> Result<(), QmpError> {
        let Some(name) = &self.replaces else {
            return Ok(());
        };
        let blockers = env.graph.as_ref().and_then(|g| g.op_blockers(name));
        let Some(blockers) = blockers else {
            return Err(QmpError::generic(format!("Node name '{name}' not found")));
        };
        let mut state = lock(&self.replace_blocker);
        if matches!(*state, ReplaceBlocker::Idle) {
            *state = ReplaceBlocker::Held {
                _blocker: blockers
                    .block("block device is in use by block-job-complete", OpSet::ALL),
            };
        }
        Ok(())
    }

    /// Takes back [`MirrorShared::block_replaced`] (the job did not accept `complete`).
    pub(crate) fn unblock_replaced(&self) {
        let mut state = lock(&self.replace_blocker);
        if matches!(*state, ReplaceBlocker::Held { .. }) {
            *state = ReplaceBlocker::Idle;
        }
    }

    /// `block-job-change`: QEMU's `mirror_change`.
    pub(crate) fn change(&self, mode: MirrorCopyMode) -> Result<(), QmpError> {
        let current = if self.write_blocking.load(Ordering::Acquire) {
            MirrorCopyMode::WriteBlocking
        } else {
            MirrorCopyMode::Background
        };
        if current == mode {
            return Ok(());
        }
        if mode != MirrorCopyMode::WriteBlocking {
            return Err(QmpError::generic(format!(
                "Change to copy mode '{mode}' is not implemented"
            )));
        }
        if self
            .write_blocking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(QmpError::generic(format!(
                "Expected current copy mode 'background', got '{}'",
                MirrorCopyMode::WriteBlocking
            )));
        }
        // The job sets actively-synced once it next finds the bitmap clean.
        self.wake();
        Ok(())
    }
}

impl FilterWrites for MirrorShared {
    fn write(
        &self,
        bitmaps: &dyn NodeBitmaps,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        below: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        self.gate.enter();
        let g = with_bitmap(bitmaps, |b| b.granularity())
            .unwrap_or(512)
            .max(1);
        let (start, end) = (offset / g * g, (offset + len).div_ceil(g) * g);
        self.ranges.lock(start, end);
        let result = below();
        with_bitmap(bitmaps, |b| b.set_dirty(offset, len));
        if result.is_ok() && self.write_blocking.load(Ordering::Acquire) {
            let copied = match data {
                Some(buf) => self.target.write_at(buf, offset),
                None => self.target.write_zeroes(offset, len),
            };
            match copied {
                // Granules the write covers whole are now the same on both sides.
                Ok(()) => {
                    with_bitmap(bitmaps, |b| b.reset_dirty(offset, len));
                    self.jobs.progress_done_outside(self.key, len);
                }
                Err(_) => self.actively_synced.store(false, Ordering::Release),
            }
        }
        self.ranges.unlock(start, end);
        self.gate.leave();
        self.wake();
        result
    }
}

/// How a copy operation ended: the failing operation and its error.
type CopyResult = Result<(), (IoOperationType, io::Error)>;

/// A copy operation in flight.
struct CopyOp {
    offset: u64,
    len: u64,
    result: Arc<Mutex<Option<CopyResult>>>,
    done: IoFuture,
}

impl CopyOp {
    async fn wait(mut self) -> CopyResult {
        (&mut self.done).await;
        self.outcome()
    }

    /// The result of an operation whose request completed.
    fn outcome(&self) -> CopyResult {
        lock(&self.result)
            .take()
            .unwrap_or_else(|| Err((IoOperationType::Read, io::Error::other("I/O worker lost"))))
    }

    /// The first of `ops` to complete, removed from them (`None` if there are none).
    async fn first_done(ops: &mut Vec<CopyOp>) -> Option<(CopyOp, CopyResult)> {
        if ops.is_empty() {
            return None;
        }
        let i = crate::io_threads::first_done(ops, |op| &mut op.done).await;
        let op = ops.swap_remove(i);
        let result = op.outcome();
        Some((op, result))
    }
}

/// Copies `[offset, offset + len)` of `source` to `target` as the source reads.
/// Zero ranges become zero writes on the target, with QEMU's `MAY_UNMAP` when `unmap`.
/// Data writes to the target take `target_writes` one at a time: a file's buffered writes
/// are serialized by the kernel (its inode lock) anyway, and the I/O threads that wait here
/// sleep (or read) instead of spinning on that lock (see docs/decisions.md, "active commit
/// and mirror: writes one at a time, writeback during the copy").
fn copy_range(
    source: &dyn BlockIo,
    target: &dyn BlockIo,
    (offset, len, unmap): (u64, u64, bool),
    buf: &mut [u8],
    target_writes: &Mutex<()>,
) -> Result<(), (IoOperationType, io::Error)> {
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
        if extent.zero && unmap {
            target.write_zeroes_unmap(pos, n).map_err(write)?;
        } else if extent.zero {
            target.write_zeroes(pos, n).map_err(write)?;
        } else {
            let chunk = &mut buf[..n as usize];
            source.read_at(chunk, pos).map_err(read)?;
            let _one_at_a_time = lock(target_writes);
            target.write_at(chunk, pos).map_err(write)?;
        }
        pos += n;
    }
    Ok(())
}

/// Where the target's backing goes on completion (QEMU's `MIRROR_SOURCE_BACKING_CHAIN`).
#[derive(Debug, Clone)]
enum TargetBacking {
    /// Leave it (blockdev-mirror, drive-mirror with `mode=existing`).
    Leave,
    /// The node the target's image names as backing file (drive-mirror `absolute-paths`).
    Node(String),
}

/// What makes a mirror QEMU's active commit (`commit_active_start`): the target is the
/// source's base; only what the layers above it allocate is copied; a smaller base grows; a
/// base reopened read-write for the job is read-only again if the job aborts.
pub(crate) struct ActiveCommit {
    /// The base (the target).
    pub(crate) base: String,
    /// The lowest layer above the base (QEMU's `base_overlay`).
    pub(crate) base_overlay: String,
    /// The base was read-only before the job.
    pub(crate) base_read_only: bool,
    /// The layers between the source and the base: the job blocks them.
    pub(crate) intermediate: Vec<String>,
    pub(crate) editor: Arc<dyn ChainEditor>,
}

/// A mirror job's driver.
pub struct MirrorJob {
    key: JobKey,
    source: Arc<dyn BlockIo>,
    target: Arc<dyn BlockIo>,
    pool: Arc<dyn IoPool>,
    buffers: Arc<CopyBuffers>,
    /// Taken by each data write of a copy operation (see [`copy_range`]).
    target_writes: Arc<Mutex<()>>,
    claims: NodeClaims,
    shared: Arc<MirrorShared>,
    /// Where the dirty bitmap lives (the filter node's, or the source's without a filter).
    bitmaps: Arc<dyn NodeBitmaps>,
    nodes: Option<Arc<dyn MirrorNodes>>,
    sync: MirrorSyncMode,
    /// Zero writes may unmap (`unmap`; blockdev-mirror always).
    unmap: bool,
    /// `sync=full` makes every range of the target right, zeroes included (QEMU's
    /// `zero_target`); otherwise ranges no layer of the source allocates are left alone.
    zero_target: bool,
    granularity: u64,
    buf_size: u64,
    /// The node that the target replaces on completion.
    to_replace: String,
    target_backing: TargetBacking,
    /// The run ended converged with `complete`: the pivot is due.
    pivot: bool,
    /// A target only this job holds (drive-mirror), closed if the job does not pivot.
    owned_target: Option<String>,
    /// The job is an active commit.
    commit: Option<ActiveCommit>,
    /// The job ended in `abort`.
    aborted: bool,
}

impl MirrorJob {
    fn with_bitmap<T>(&self, f: impl FnOnce(&mut DirtyBitmap) -> T) -> Option<T> {
        with_bitmap(self.bitmaps.as_ref(), f)
    }

    fn dirty_count(&self) -> u64 {
        self.with_bitmap(|b| b.count()).unwrap_or(0)
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        self.with_bitmap(|b| b.set_dirty(offset, len));
    }

    /// The initial dirty bitmap: QEMU's `mirror_dirty_init`.
    async fn dirty_init(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        let size = self.source.size();
        // An active commit copies what the layers above the base allocate; `top` what the
        // source's own layer allocates (above its backing).
        let bottom = self.commit.as_ref().map(|c| c.base_overlay.clone());
        match self.sync {
            MirrorSyncMode::None => {}
            _ if bottom.is_some() || self.sync == MirrorSyncMode::Top => {
                let source = self.source.clone();
                let ranges = crate::node::run_blocking(self.pool.as_ref(), move || {
                    let mut ranges = Vec::new();
                    let mut pos = 0;
                    while pos < size {
                        let (allocated, n) = match &bottom {
                            Some(b) => source.allocated_above(Some(b), pos, size - pos)?,
                            None => {
                                let e = source.block_status(pos, size - pos)?;
                                (e.allocated, e.len)
                            }
                        };
                        let n = if n == 0 { size - pos } else { n };
                        if allocated {
                            ranges.push((pos, n));
                        }
                        pos += n;
                    }
                    Ok::<_, io::Error>(ranges)
                })
                .await
                .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")))
                .map_err(|e| JobFailure::from_io(&e))?;
                for (o, l) in ranges {
                    self.mark_dirty(o, l);
                }
            }
            // QEMU's `bdrv_can_write_zeroes_with_unmap`: a qcow2 target opened with
            // `discard=unmap` is zeroed up front instead.
            _ if self.zero_target
                && !(self.target.discard_unmaps() && self.target.format() == "qcow2") =>
            {
                self.with_bitmap(|b| b.set_all());
            }
            _ => {
                // With `zero_target`, the target is zeroed first (not counted as progress);
                // then, as without, what some layer of the source allocates is dirty (QEMU's
                // `bdrv_is_allocated_above` down the whole chain): the rest reads as zeroes
                // on the target.
                let source = self.source.clone();
                let zero = self.zero_target.then(|| (self.target.clone(), self.unmap));
                let ranges = crate::node::run_blocking(self.pool.as_ref(), move || {
                    if let Some((target, unmap)) = zero {
                        const STEP: u64 = 1 << 30;
                        let mut pos = 0;
                        while pos < size {
                            let n = (size - pos).min(STEP);
                            if unmap {
                                target.write_zeroes_unmap(pos, n)?;
                            } else {
                                target.write_zeroes(pos, n)?;
                            }
                            pos += n;
                        }
                    }
                    let mut ranges = Vec::new();
                    let mut pos = 0;
                    while pos < size {
                        let Some(status) = source.chain_status(pos, size - pos) else {
                            return Ok(vec![(0, size)]);
                        };
                        let status = status?;
                        let n = if status.len == 0 {
                            size - pos
                        } else {
                            status.len
                        };
                        if status.depth > 0 {
                            ranges.push((pos, n));
                        }
                        pos += n;
                    }
                    Ok::<_, io::Error>(ranges)
                })
                .await
                .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")))
                .map_err(|e| JobFailure::from_io(&e))?;
                for (o, l) in ranges {
                    self.mark_dirty(o, l);
                }
            }
        }
        ctx.set_progress_remaining(self.dirty_count());
        Ok(())
    }

    /// Takes the next dirty run from `cursor` (at most `max` bytes), clearing its bits.
    fn next_run(&self, cursor: &mut u64, max: u64) -> Option<(u64, u64)> {
        self.with_bitmap(|b| {
            let start = b.next_dirty(*cursor).or_else(|| b.next_dirty(0))?;
            let end = b
                .next_clean(start)
                .unwrap_or(b.size())
                .min(start + max)
                .min(b.size());
            b.reset_dirty(start, end - start);
            *cursor = end;
            Some((start, end - start))
        })?
    }

    fn submit(&self, offset: u64, len: u64) -> CopyOp {
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        let (source, target) = (self.source.clone(), self.target.clone());
        let (shared, buffers) = (self.shared.clone(), self.buffers.clone());
        let target_writes = self.target_writes.clone();
        let unmap = self.unmap;
        let done = self.pool.run(Box::new(move || {
            shared.ranges.lock(offset, offset + len);
            let mut buf = buffers.take(len as usize);
            let r = copy_range(
                source.as_ref(),
                target.as_ref(),
                (offset, len, unmap),
                &mut buf,
                &target_writes,
            );
            buffers.give(buf);
            shared.ranges.unlock(offset, offset + len);
            *lock(&slot) = Some(r);
        }));
        CopyOp {
            offset,
            len,
            result,
            done,
        }
    }

    async fn flush_target(&self) -> io::Result<()> {
        let target = self.target.clone();
        crate::node::run_blocking(self.pool.as_ref(), move || target.flush())
            .await
            .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")))
    }

    async fn close_gate(&self) {
        let shared = self.shared.clone();
        crate::node::run_blocking(self.pool.as_ref(), move || shared.gate.close()).await;
    }

    async fn run_mirror(&mut self, ctx: &JobContext) -> Result<(), JobFailure> {
        let size = self.source.size();
        if self.commit.is_some() {
            // An active commit grows a smaller base.
            if self.target.size() < size {
                let target = self.target.clone();
                crate::node::run_blocking(self.pool.as_ref(), move || target.truncate(size))
                    .await
                    .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")))
                    .map_err(|e| JobFailure::from_io(&e))?;
            }
        } else if size != self.target.size() {
            return Err(JobFailure::new(
                "Source and target image have different sizes",
            ));
        }
        self.dirty_init(ctx).await?;
        let max_io = (self.buf_size / MAX_IN_FLIGHT as u64)
            .max(MAX_IO_BYTES)
            .min(self.buf_size)
            .max(self.granularity);
        let mut cursor = 0;
        let mut in_flight: Vec<CopyOp> = Vec::new();
        let mut bytes_in_flight = 0;
        // Until READY, the target's flushes write back during the copy.
        let mut writeback = Writeback::new(self.target.clone(), self.pool.clone());
        loop {
            if in_flight.is_empty() {
                ctx.pause_point().await;
            }
            if ctx.is_cancelled() {
                break;
            }
            let cnt = self.dirty_count();
            ctx.set_progress_remaining(bytes_in_flight + cnt);
            let depth = if ctx.speed() == 0 { MAX_IN_FLIGHT } else { 1 };
            if cnt > 0 && in_flight.len() < depth && bytes_in_flight < self.buf_size {
                let room = (self.buf_size - bytes_in_flight).max(self.granularity);
                if let Some((offset, len)) = self.next_run(&mut cursor, max_io.min(room)) {
                    bytes_in_flight += len;
                    in_flight.push(self.submit(offset, len));
                    continue;
                }
            }
            // As QEMU's mirror, a slot freed by any operation is filled at once.
            if let Some((op, result)) = CopyOp::first_done(&mut in_flight).await {
                let (offset, len) = (op.offset, op.len);
                bytes_in_flight -= len;
                match result {
                    Ok(()) => {
                        ctx.progress_update(len);
                        if !ctx.is_ready() {
                            writeback.written(len);
                        }
                        ctx.rate_limit(len).await;
                    }
                    Err((operation, error)) => {
                        self.mark_dirty(offset, len);
                        // Let the others land before acting on the error.
                        while let Some(other) = in_flight.pop() {
                            bytes_in_flight -= other.len;
                            let (o, l) = (other.offset, other.len);
                            match other.wait().await {
                                Ok(()) => ctx.progress_update(l),
                                Err(_) => self.mark_dirty(o, l),
                            }
                        }
                        ctx.retry_after_io_error(operation, &error).await?;
                    }
                }
                continue;
            }
            // Nothing in flight, nothing dirty.
            if cnt > 0 {
                continue;
            }
            if !ctx.is_ready() {
                let flushed = match writeback.finish().await {
                    Ok(()) => self.flush_target().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = flushed {
                    ctx.retry_after_io_error(IoOperationType::Write, &e).await?;
                    continue;
                }
                ctx.set_ready();
            }
            if self.shared.write_blocking.load(Ordering::Acquire) {
                self.shared.actively_synced.store(true, Ordering::Release);
            }
            if ctx.should_complete() || ctx.cancel_requested() {
                self.close_gate().await;
                if self.dirty_count() > 0 {
                    self.shared.gate.open();
                    continue;
                }
                if let Err(e) = self.flush_target().await {
                    self.shared.gate.open();
                    ctx.retry_after_io_error(IoOperationType::Write, &e).await?;
                    continue;
                }
                // Converged, drained until the job's clean-up.
                self.pivot = ctx.should_complete() && !ctx.is_cancelled();
                return Ok(());
            }
            ctx.idle().await;
        }
        for op in in_flight {
            let _ = op.wait().await;
        }
        let _ = writeback.finish().await;
        Ok(())
    }
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> JobType {
        if self.commit.is_some() {
            JobType::Commit
        } else {
            JobType::Mirror
        }
    }

    fn supports_complete(&self) -> bool {
        true
    }

    fn soft_cancel_when_ready(&self) -> bool {
        true
    }

    fn actively_synced(&self) -> Option<Arc<AtomicBool>> {
        match self.commit {
            None => Some(self.shared.actively_synced.clone()),
            Some(_) => None,
        }
    }

    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(self.run_mirror(ctx))
    }

    /// QEMU's `mirror_exit_common` on success: the target's backing, then the pivot.
    fn prepare(&mut self) -> Result<(), JobFailure> {
        let Some(nodes) = &self.nodes else {
            return Ok(());
        };
        if let TargetBacking::Node(backing) = &self.target_backing
            && let Err(e) = nodes.set_target_backing(backing)
        {
            return Err(JobFailure::new(e));
        }
        if self.pivot {
            nodes.pivot(&self.to_replace).map_err(JobFailure::new)?;
            self.owned_target = None;
        }
        Ok(())
    }

    fn abort(&mut self) {
        self.aborted = true;
    }

    fn clean(&mut self) {
        if let Some(nodes) = self.nodes.take() {
            nodes.remove_filter();
            self.claims.retire(&nodes.filter_name());
        }
        // QEMU's `mirror_exit_common`: an aborted commit leaves its base read-only again
        // (completed or soft-cancelled, it stays read-write).
        if let Some(c) = &self.commit
            && self.aborted
            && c.base_read_only
            && let Err(e) = c.editor.set_read_only(&c.base, true)
        {
            tracing::warn!("commit: reopening {} read-only: {}", c.base, e.desc);
        }
        // The dirty bitmap goes with the job, and so does the blocker `complete` set.
        remove_dirty_bitmap(self.bitmaps.as_ref());
        *lock(&self.shared.replace_blocker) = ReplaceBlocker::Ended;
        self.shared.gate.open();
        self.claims.release(self.key);
        if let Some(node) = self.owned_target.take() {
            self.claims.retire(&node);
        }
    }
}

/// Removes the mirror's dirty bitmap from `bitmaps`.
fn remove_dirty_bitmap(bitmaps: &dyn NodeBitmaps) {
    let mut list = bitmaps.list();
    if let Some(i) = list.iter().position(|b| b.name().is_none()) {
        list.remove(i);
    }
}

/// The shared state of mirror job `key`, if it is a mirror still there.
pub(crate) fn shared(env: &mut BlockState, key: JobKey) -> Option<Arc<MirrorShared>> {
    env.mirrors.retain(|_, m| m.strong_count() > 0);
    env.mirrors.get(&key).and_then(std::sync::Weak::upgrade)
}

/// `block-job-complete` and `job-complete`: QEMU's `job_complete_locked` with the mirror's
/// part (`mirror_complete`): the node `replaces` names is blocked before the job may pivot.
pub(crate) fn complete(env: &mut BlockState, target: job::JobRef<'_>) -> Result<(), QmpError> {
    let key = env
        .jobs
        .check_verb(target, qmp_api::BlockJobVerb::Complete)?;
    let Some(shared) = shared(env, key) else {
        return env.jobs.complete(target);
    };
    shared.block_replaced(env)?;
    let result = env.jobs.complete(target);
    if result.is_err() {
        shared.unblock_replaced();
    }
    result
}

/// The options both mirror commands share, after their own preparation.
struct MirrorRequest {
    job_id: Option<String>,
    device: String,
    target: String,
    replaces: Option<String>,
    sync: MirrorSyncMode,
    speed: Option<i64>,
    granularity: Option<u32>,
    buf_size: Option<i64>,
    on_source_error: Option<qmp_api::BlockdevOnError>,
    on_target_error: Option<qmp_api::BlockdevOnError>,
    filter_node_name: Option<String>,
    copy_mode: Option<MirrorCopyMode>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    target_backing: TargetBacking,
    owned_target: Option<String>,
    /// `unmap` (drive-mirror's; blockdev-mirror's is always on).
    unmap: bool,
    /// QEMU's `zero_target`.
    zero_target: bool,
    commit: Option<ActiveCommit>,
}

/// `blockdev-mirror`.
pub(crate) fn blockdev_mirror(
    env: &mut BlockState,
    args: BlockdevMirrorArguments,
) -> Result<(), QmpError> {
    env.root_node(&args.device)?;
    env.lookup(&args.target)?;
    start(
        env,
        MirrorRequest {
            job_id: args.job_id,
            device: args.device,
            target: args.target,
            replaces: args.replaces,
            sync: args.sync,
            speed: args.speed,
            granularity: args.granularity,
            buf_size: args.buf_size,
            on_source_error: args.on_source_error,
            on_target_error: args.on_target_error,
            filter_node_name: args.filter_node_name,
            copy_mode: args.copy_mode,
            auto_finalize: args.auto_finalize,
            auto_dismiss: args.auto_dismiss,
            target_backing: TargetBacking::Leave,
            owned_target: None,
            unmap: true,
            zero_target: args.sync == MirrorSyncMode::Full,
            commit: None,
        },
    )
}

/// `drive-mirror`: QEMU's `qmp_drive_mirror`.
pub(crate) fn drive_mirror(env: &mut BlockState, args: DriveMirror) -> Result<(), QmpError> {
    let source = env.root_node(&args.device)?;
    env.check_op(&args.device, BlockOp::MirrorSource)?;
    let mode = args.mode.unwrap_or(NewImageMode::AbsolutePaths);
    let format = match (&args.format, mode) {
        (Some(f), _) => Some(f.clone()),
        (None, NewImageMode::Existing) => None,
        (None, _) => Some(source.format().to_string()),
    };
    let mut sync = args.sync;
    let mut backing_node = source.backing_node();
    let mut backing_image = source.backing_image();
    if backing_node.is_none() && sync == MirrorSyncMode::Top {
        sync = MirrorSyncMode::Full;
    }
    if sync == MirrorSyncMode::None {
        backing_node = Some(args.device.clone());
        backing_image = Some(source.image());
    }
    if args.replaces.is_some() && args.node_name.is_none() {
        return Err(QmpError::generic(
            "a node-name must be provided when replacing a named node of the graph",
        ));
    }
    let graph = env.graph_mut()?;
    if mode != NewImageMode::Existing {
        let image = crate::node::ImageRef {
            filename: args.target.clone(),
            format: format.clone().unwrap_or_default(),
        };
        let backing = if sync == MirrorSyncMode::Full || backing_node.is_none() {
            None
        } else {
            backing_image.as_ref()
        };
        graph.create_image(&image, source.size(), backing)?;
    }
    let (target, _) = graph.open_mirror_target(&MirrorTargetImage {
        filename: args.target.clone(),
        format,
        node_name: args.node_name.clone(),
        open_backing: mode == NewImageMode::Existing,
        // QEMU opens the target with the source's flags, `discard=unmap` among them.
        discard_unmap: source.discard_unmaps(),
    })?;
    let target_backing = match (mode, &backing_node) {
        (NewImageMode::AbsolutePaths, Some(b)) if sync != MirrorSyncMode::Full => {
            TargetBacking::Node(b.clone())
        }
        _ => TargetBacking::Leave,
    };
    let result = start(
        env,
        MirrorRequest {
            job_id: args.job_id,
            device: args.device,
            target: target.clone(),
            replaces: args.replaces,
            sync,
            speed: args.speed,
            granularity: args.granularity,
            buf_size: args.buf_size,
            on_source_error: args.on_source_error,
            on_target_error: args.on_target_error,
            filter_node_name: None,
            copy_mode: args.copy_mode,
            auto_finalize: args.auto_finalize,
            auto_dismiss: args.auto_dismiss,
            target_backing,
            owned_target: Some(target.clone()),
            unmap: args.unmap.unwrap_or(true),
            // A new image starts out reading zeroes (QEMU: `bdrv_has_zero_init`).
            zero_target: sync == MirrorSyncMode::Full && mode == NewImageMode::Existing,
            commit: None,
        },
    );
    if result.is_err()
        && let Ok(graph) = env.graph_mut()
    {
        graph.release_if_unused(&target);
    }
    result
}

/// An active commit of `top` into `base` (QEMU's `commit_active_start`; `block-commit` checked
/// its arguments and reopened the base read-write).
pub(crate) fn active_commit(
    env: &mut BlockState,
    args: &qmp_api::BlockCommitArguments,
    top: &str,
    commit: ActiveCommit,
) -> Result<(), QmpError> {
    let on_error = Some(args.on_error.unwrap_or(qmp_api::BlockdevOnError::Report));
    start(
        env,
        MirrorRequest {
            job_id: Some(args.job_id.clone().unwrap_or_default()),
            device: top.to_string(),
            target: commit.base.clone(),
            replaces: None,
            sync: MirrorSyncMode::Full,
            speed: args.speed,
            granularity: None,
            buf_size: None,
            on_source_error: on_error,
            on_target_error: on_error,
            filter_node_name: args.filter_node_name.clone(),
            copy_mode: None,
            auto_finalize: args.auto_finalize,
            auto_dismiss: args.auto_dismiss,
            target_backing: TargetBacking::Leave,
            owned_target: None,
            // QEMU's commit_active_start: unmap, no zero_target.
            unmap: true,
            zero_target: false,
            commit: Some(commit),
        },
    )
}

/// QEMU's `blockdev_mirror_common`, `mirror_start` and `mirror_start_job`, in their order.
fn start(env: &mut BlockState, r: MirrorRequest) -> Result<(), QmpError> {
    let source = env.lookup(&r.device)?;
    let target = env.lookup(&r.target)?;
    let granularity = u64::from(r.granularity.unwrap_or(0));
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err(QmpError::generic(
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ));
    }
    if granularity & granularity.wrapping_sub(1) != 0 {
        return Err(QmpError::generic(
            "Parameter 'granularity' expects a power of 2",
        ));
    }
    // An active commit's op blockers were checked by block-commit (QEMU's
    // `commit_active_start` checks none: the base is a backing node).
    if r.commit.is_none() {
        env.check_op(&r.device, BlockOp::MirrorSource)?;
        env.check_op(&r.target, BlockOp::MirrorTarget)?;
    }
    let mut sync = r.sync;
    if source.backing_node().is_none() && sync == MirrorSyncMode::Top {
        sync = MirrorSyncMode::Full;
    }
    let graph = env
        .graph
        .as_ref()
        .ok_or_else(|| QmpError::generic("No block layer is available"))?;
    if let Some(replaces) = &r.replaces {
        if graph.node(replaces).is_none() {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{replaces}'"
            )));
        }
        env.check_op(replaces, BlockOp::Replace)?;
        if !graph.can_replace(&r.device, replaces) {
            return Err(QmpError::generic(format!(
                "Cannot replace '{replaces}' by a node mirrored from '{}', because it cannot \
                 be guaranteed that doing so would not lead to an abrupt change of visible data",
                r.device
            )));
        }
        if graph.node(replaces).map(|n| n.size()) != Some(source.size()) {
            return Err(QmpError::generic(
                "cannot replace image with a mirror image of different size",
            ));
        }
    }
    if matches!(sync, MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap) {
        return Err(QmpError::generic(format!(
            "Sync mode '{sync}' not supported"
        )));
    }
    let granularity = if granularity == 0 {
        default_granularity(env, &r.target)
    } else {
        granularity
    };
    let buf_size = match r.buf_size.unwrap_or(0) {
        b if b < 0 => return Err(QmpError::generic("Invalid parameter 'buf-size'")),
        0 => DEFAULT_BUF_SIZE,
        b => (b as u64).div_ceil(granularity) * granularity,
    };
    if r.device == r.target {
        return Err(QmpError::generic("Can't mirror node into itself"));
    }
    let graph = env
        .graph
        .as_ref()
        .ok_or_else(|| QmpError::generic("No block layer"))?;
    if r.commit.is_none() && graph.in_chain(&r.device, &r.target) {
        return Err(QmpError::generic(
            "Cannot mirror to a filter on top of a node in the source's backing chain",
        ));
    }
    // The job's key first: its filter is made knowing the job it wakes.
    let key = env.jobs.reserve_key();
    let shared = Arc::new(MirrorShared {
        target: target.clone(),
        ranges: RangeLocks::default(),
        gate: Gate::default(),
        write_blocking: AtomicBool::new(r.copy_mode == Some(MirrorCopyMode::WriteBlocking)),
        actively_synced: Arc::new(AtomicBool::new(false)),
        jobs: env.jobs.clone(),
        key,
        replaces: r.replaces.clone(),
        replace_blocker: Mutex::new(ReplaceBlocker::Idle),
    });
    let nodes = env.graph_mut()?.insert_mirror_filter(
        &r.device,
        &r.target,
        r.filter_node_name.as_deref(),
        shared.clone(),
    )?;
    let bitmaps = match &nodes {
        Some(n) => Some(n.bitmaps()),
        None => env.graph.as_ref().and_then(|g| g.bitmaps(&r.device)),
    };
    let undo_filter = |env: &mut BlockState, nodes: &Option<Arc<dyn MirrorNodes>>| {
        if let Some(n) = nodes {
            n.remove_filter();
            if let Ok(g) = env.graph_mut() {
                g.release_if_unused(&n.filter_name());
            }
        }
    };
    let Some(bitmaps) = bitmaps else {
        undo_filter(env, &nodes);
        return Err(QmpError::generic("This block layer cannot track writes"));
    };
    let mut bitmap = match DirtyBitmap::new(None, granularity, source.size()) {
        Ok(b) => b,
        Err(e) => {
            undo_filter(env, &nodes);
            return Err(QmpError::generic(e.desc()));
        }
    };
    // With a filter, the filter marks it; without one, the source's writes do.
    bitmap.set_enabled(nodes.is_none());
    bitmaps.list().insert(0, bitmap);
    let spec = JobSpec::new(r.job_id.clone().unwrap_or_default())
        .auto_finalize(r.auto_finalize.unwrap_or(true))
        .auto_dismiss(r.auto_dismiss.unwrap_or(true))
        .speed(r.speed.unwrap_or(0))
        .on_error(r.on_source_error, r.on_target_error);
    let claims = env.claims.clone();
    let (pool, buffers) = (env.pool.clone(), env.buffers.clone());
    let (job_claims, job_shared, job_nodes) = (claims.clone(), shared.clone(), nodes.clone());
    let job_bitmaps = bitmaps.clone();
    let to_replace = r.replaces.clone().unwrap_or_else(|| r.device.clone());
    let (target_backing, owned_target) = (r.target_backing.clone(), r.owned_target.clone());
    let (job_type, intermediate) = match &r.commit {
        Some(c) => (JobType::Commit, c.intermediate.clone()),
        None => (JobType::Mirror, Vec::new()),
    };
    let is_mirror = r.commit.is_none();
    let commit = r.commit;
    let job = move |key| MirrorJob {
        key,
        source,
        target,
        pool,
        buffers,
        target_writes: Arc::default(),
        claims: job_claims,
        shared: job_shared,
        bitmaps: job_bitmaps,
        nodes: job_nodes,
        sync,
        unmap: r.unmap,
        zero_target: r.zero_target,
        granularity,
        buf_size,
        to_replace,
        target_backing,
        pivot: false,
        owned_target,
        commit,
        aborted: false,
    };
    let make = move |key| Box::new(job(key)) as Box<dyn JobDriver>;
    if let Err(e) = env.jobs.create_reserved(key, spec, make, None) {
        remove_dirty_bitmap(bitmaps.as_ref());
        undo_filter(env, &nodes);
        return Err(e);
    }
    // QEMU's mirror job (and active commit): created on its filter node, with the source,
    // the target and, committing, the layers between them added.
    if let Some(n) = &nodes {
        env.add_job_node(key, job_type, &n.filter_name(), MAIN_NODE, OpSet::JOB_MAIN);
    }
    env.add_job_node(key, job_type, &r.device, "source", OpSet::ALL);
    env.add_job_node(key, job_type, &r.target, "target", OpSet::ALL);
    for node in &intermediate {
        env.add_job_node(key, job_type, node, "intermediate node", OpSet::ALL);
    }
    if is_mirror {
        env.mirrors.insert(key, Arc::downgrade(&shared));
    }
    if let Err(e) = env.jobs.start(key) {
        tracing::warn!("mirror job could not start: {e}");
    }
    Ok(())
}

/// QEMU's `bdrv_get_default_bitmap_granularity` of the target.
fn default_granularity(env: &BlockState, target: &str) -> u64 {
    env.graph
        .as_ref()
        .and_then(|g| g.bitmaps(target))
        .map_or(65536, |b| b.default_granularity())
}
