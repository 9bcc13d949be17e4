//! The registry of jobs: creation and start, the block layer's calls (drains, cancel,
//! discard) and the handle every other part holds. The state machine is in `state`, the
//! transaction protocol in `txn`, the monitor's verbs in `verbs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use qmp_api::{BlockDeviceIoStatus, BlockdevOnError, QmpError};

use crate::BlockJobStatus;
use crate::context::{JobContext, Wait};
use crate::driver::JobDriver;
use crate::event::EventSink;
use crate::ratelimit::RateLimit;
use crate::runtime::{Clock, Spawn};
use crate::state::{Activity, Job, State, generic};
use crate::txn::{JobTxn, Txn};

/// A job, as the block layer refers to it. Stale keys (job gone) are answered with
/// [`JobError::Gone`] or ignored, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey(pub(crate) u64);

/// How a QMP command names a job; decides the "not found" error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRef<'a> {
    /// `block-job-*` commands: `DeviceNotActive: Block job '<id>' not found`.
    BlockJob(&'a str),
    /// `job-*` commands: `GenericError: Job not found`.
    Job(&'a str),
}

impl<'a> JobRef<'a> {
    pub fn id(self) -> &'a str {
        match self {
            JobRef::BlockJob(id) | JobRef::Job(id) => id,
        }
    }
}

/// How to create a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// `None`: an internal job, invisible to QMP (no events, not listed, not found by id).
    pub id: Option<String>,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Initial rate limit in bytes per second, 0 for none. Negative: the job is created and
    /// dropped at once (`created`, `null`) with QEMU's error, as `blockdev-backup` does.
    pub speed: i64,
    /// A block job: found by `block-job-*`, listed by `query-block-jobs`, emits `BLOCK_JOB_*`.
    pub block_job: bool,
    /// What an I/O error reading the source does (`on-source-error`).
    pub on_source_error: BlockdevOnError,
    /// What an I/O error writing the target does (`on-target-error`).
    pub on_target_error: BlockdevOnError,
    /// A failure found once the job exists (QEMU's `block_job_create` failing after
    /// `job_create`, as a permission the job cannot take): the job is created and dropped at
    /// once (`created`, `null`) with this GenericError, before the speed is looked at.
    pub fails_when_created: Option<String>,
}

impl JobSpec {
    /// A block job with QMP's defaults (auto-finalize, auto-dismiss, no rate limit, errors
    /// reported).
    pub fn new(id: impl Into<String>) -> Self {
        JobSpec {
            id: Some(id.into()),
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            block_job: true,
            on_source_error: BlockdevOnError::Report,
            on_target_error: BlockdevOnError::Report,
            fails_when_created: None,
        }
    }

    /// An internal block job (no id).
    pub fn internal() -> Self {
        JobSpec {
            id: None,
            ..JobSpec::new("")
        }
    }

    pub fn auto_finalize(mut self, on: bool) -> Self {
        self.auto_finalize = on;
        self
    }

    pub fn auto_dismiss(mut self, on: bool) -> Self {
        self.auto_dismiss = on;
        self
    }

    pub fn speed(mut self, speed: i64) -> Self {
        self.speed = speed;
        self
    }

    /// The job fails as soon as it is created, with `error` (see
    /// [`JobSpec::fails_when_created`]).
    pub fn fail_when_created(mut self, error: impl Into<String>) -> Self {
        self.fails_when_created = Some(error.into());
        self
    }

    /// The I/O error policies (`on-source-error`, `on-target-error`; absent: `report`).
    pub fn on_error(
        mut self,
        source: Option<BlockdevOnError>,
        target: Option<BlockdevOnError>,
    ) -> Self {
        self.on_source_error = source.unwrap_or(BlockdevOnError::Report);
        self.on_target_error = target.unwrap_or(BlockdevOnError::Report);
        self
    }
}

/// Errors of the block layer's calls (never QMP errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("the job no longer exists")]
    Gone,
    #[error("the job is {0}, not created")]
    NotCreated(BlockJobStatus),
    #[error("the job is not paused")]
    NotPaused,
}

pub(crate) type Guard<'a> = MutexGuard<'a, State>;

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Notified whenever a job stops being busy (parks, sleeps, finishes, goes): what a
    /// drain waiting for quiescence sleeps on.
    quiescent: Condvar,
    /// Threads waiting on `quiescent` (notifying nobody costs nothing then).
    waiters: AtomicUsize,
    spawn: Arc<dyn Spawn>,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Inner {
    pub(crate) fn lock(&self) -> Guard<'_> {
        let g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        g.observed();
        g
    }

    pub(crate) fn notify_quiescent(&self) {
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.quiescent.notify_all();
        }
    }

    /// Waits on `quiescent` once (the caller loops on its condition). Every blocking wait of
    /// the job core goes through here: it is QEMU's `AIO_WAIT_WHILE`, during which the jobs'
    /// coroutines run, so their events pass meanwhile ([`EventSink::polling`]) even when a
    /// command waits.
    fn wait_change<'a>(&'a self, g: Guard<'a>, limit: Option<Duration>) -> Guard<'a> {
        let _polling = g.polling();
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let g = match limit {
            None => self
                .quiescent
                .wait(g)
                .unwrap_or_else(PoisonError::into_inner),
            Some(limit) => {
                self.quiescent
                    .wait_timeout(g, limit)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        self.waiters.fetch_sub(1, Ordering::AcqRel);
        g
    }

    /// Blocks until none of `keys` is busy (each parked, sleeping, finished or gone): QEMU's
    /// drain poll, woken by the jobs' state changes. Only when jobs run on other threads
    /// than the caller; on a stepped executor nothing could change while this waits.
    fn wait_quiescent<'a>(&'a self, mut g: Guard<'a>, keys: &[JobKey]) -> Guard<'a> {
        if !self.spawn.runs_concurrently() {
            return g;
        }
        let busy = |g: &State| {
            keys.iter().any(|k| {
                g.jobs
                    .get(k)
                    .is_some_and(|j| j.activity == Activity::Busy && !j.is_cancelled())
            })
        };
        while busy(&g) {
            g = self.wait_change(g, None);
        }
        g
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// All jobs of the daemon. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct JobRegistry {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRegistry").finish_non_exhaustive()
    }
}

impl JobRegistry {
    /// Events go to `sink`, job tasks to `spawn`, rate limiting asks `clock`.
    pub fn new(sink: Arc<dyn EventSink>, spawn: Arc<dyn Spawn>, clock: Arc<dyn Clock>) -> Self {
        JobRegistry {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(sink, clock.clone())),
                quiescent: Condvar::new(),
                waiters: AtomicUsize::new(0),
                spawn,
                clock,
            }),
        }
    }

    /// A new, empty transaction (for a grouped `transaction` command).
    pub fn new_txn(&self) -> JobTxn {
        let mut g = self.inner.lock();
        let key = g.next_txn;
        g.next_txn += 1;
        g.txns.insert(
            key,
            Txn {
                handles: 1,
                ..Txn::default()
            },
        );
        JobTxn {
            inner: self.inner.clone(),
            key,
        }
    }

    /// Creates a job (CREATED) in `txn`, or in a transaction of its own; `driver` makes the
    /// job's driver, told its key. The id is checked first: `Invalid job ID '<id>'`, `Job ID
    /// '<id>' already in use` (no driver is made then); then the speed (a negative one gives
    /// `created`, `null` and `Parameter 'speed' expects a non-negative value`).
    pub fn create(
        &self,
        spec: JobSpec,
        driver: impl FnOnce(JobKey) -> Box<dyn JobDriver>,
        txn: Option<&JobTxn>,
    ) -> Result<JobKey, QmpError> {
        self.create_as(None, spec, driver, txn)
    }

    /// A key no job has yet, for what a job is built with before the job exists (a mirror's
    /// filter node goes into the graph before `block_job_create`, as in QEMU, and is made
    /// knowing its job). [`JobRegistry::create_reserved`] creates the job under it; a key
    /// never used for a job names none (verbs on it find no job).
    pub fn reserve_key(&self) -> JobKey {
        let mut g = self.inner.lock();
        let key = JobKey(g.next_job);
        g.next_job += 1;
        key
    }

    /// [`JobRegistry::create`] under a key from [`JobRegistry::reserve_key`].
    pub fn create_reserved(
        &self,
        key: JobKey,
        spec: JobSpec,
        driver: impl FnOnce(JobKey) -> Box<dyn JobDriver>,
        txn: Option<&JobTxn>,
    ) -> Result<JobKey, QmpError> {
        self.create_as(Some(key), spec, driver, txn)
    }

    fn create_as(
        &self,
        reserved: Option<JobKey>,
        spec: JobSpec,
        driver: impl FnOnce(JobKey) -> Box<dyn JobDriver>,
        txn: Option<&JobTxn>,
    ) -> Result<JobKey, QmpError> {
        let mut g = self.inner.lock();
        if let Some(key) = reserved
            && g.jobs.contains_key(&key)
        {
            return Err(generic("Job key already in use"));
        }
        if let Some(id) = &spec.id {
            if !id_wellformed(id) {
                return Err(generic(format!("Invalid job ID '{id}'")));
            }
            if g.ids.contains_key(id) {
                return Err(generic(format!("Job ID '{id}' already in use")));
            }
        }
        let t = match txn {
            Some(txn) if Arc::ptr_eq(&txn.inner, &self.inner) && g.txns.contains_key(&txn.key) => {
                txn.key
            }
            _ => {
                let t = g.next_txn;
                g.next_txn += 1;
                g.txns.insert(t, Txn::default());
                t
            }
        };
        let key = reserved.unwrap_or_else(|| {
            let key = JobKey(g.next_job);
            g.next_job += 1;
            key
        });
        let driver = driver(key);
        let mut limit = RateLimit::default();
        limit.set_speed(u64::try_from(spec.speed).unwrap_or(0));
        let job = Job {
            id: spec.id.clone(),
            job_type: driver.job_type(),
            block_job: spec.block_job,
            status: BlockJobStatus::Undefined,
            txn: Some(t),
            auto_finalize: spec.auto_finalize,
            auto_dismiss: spec.auto_dismiss,
            can_complete: driver.supports_complete(),
            soft_cancel_when_ready: driver.soft_cancel_when_ready(),
            actively_synced: driver.actively_synced(),
            pause_count: 1,
            user_paused: false,
            started: false,
            counted_done: false,
            activity: Activity::NotStarted,
            waiting: None,
            waker: None,
            kicked: false,
            cancelled: false,
            force_cancel: false,
            complete_requested: false,
            ret: None,
            progress_current: 0,
            progress_total: 0,
            limit,
            on_source_error: spec.on_source_error,
            on_target_error: spec.on_target_error,
            io_status: BlockDeviceIoStatus::Ok,
            driver: Some(driver),
            conclude_waiters: Vec::new(),
        };
        g.jobs.insert(key, job);
        if let Some(id) = spec.id {
            g.ids.insert(id, key);
        }
        if let Some(txn) = g.txns.get_mut(&t) {
            txn.members.push(key);
            txn.unfinished += 1;
            if !spec.auto_finalize {
                txn.manual += 1;
            }
        }
        g.set_status(key, BlockJobStatus::Created);
        if let Some(error) = spec.fails_when_created {
            g.dismiss(key);
            return Err(generic(error));
        }
        if spec.speed < 0 {
            g.dismiss(key);
            return Err(generic("Parameter 'speed' expects a non-negative value"));
        }
        Ok(key)
    }

    /// Starts a CREATED job: RUNNING, and at once PAUSED if something (a drained section)
    /// holds a pause on it. Its work runs on the spawner.
    pub fn start(&self, key: JobKey) -> Result<(), JobError> {
        let mut g = self.inner.lock();
        let job = g.job_mut(key)?;
        if job.status != BlockJobStatus::Created || job.started {
            return Err(JobError::NotCreated(job.status));
        }
        let Some(driver) = job.driver.take() else {
            return Err(JobError::Gone);
        };
        job.started = true;
        job.pause_count = job.pause_count.saturating_sub(1);
        job.activity = Activity::Busy;
        let parked = job.pause_count > 0;
        g.running.insert(key);
        g.set_status(key, BlockJobStatus::Running);
        if parked {
            g.park(key);
        }
        drop(g);
        let ctx = JobContext::new(self.inner.clone(), key);
        let inner = self.inner.clone();
        self.inner.spawn.spawn(Box::pin(async move {
            let mut driver = driver;
            Wait::unparked(&ctx).await;
            let result = if ctx.is_cancelled() {
                Ok(())
            } else {
                driver.run(&ctx).await
            };
            inner.job_finished(key, driver, result);
        }));
        Ok(())
    }

    // ----- drains (QEMU's bdrv_drained_begin/_end, bdrv_drain_all, graph changes) -----

    /// Begins a drained section over `keys` (QEMU's `bdrv_drained_begin` of the nodes those
    /// jobs use): each is paused; a sleeping job parks at once, a busy one at its next pause
    /// point, which this waits for (woken by the job's state change). Returns the keys held,
    /// in order, for [`Self::end_drain`].
    pub fn begin_drain(&self, keys: &[JobKey]) -> Vec<JobKey> {
        let mut g = self.inner.lock();
        let held: Vec<JobKey> = keys
            .iter()
            .copied()
            .filter(|k| g.pause(*k).is_ok())
            .collect();
        drop(self.inner.wait_quiescent(g, &held));
        held
    }

    /// Ends drained sections: each key loses one pause, in order, under one lock (none of
    /// the resumed jobs can emit anything before all of them are resumed: in QEMU, jobs
    /// resumed while a command runs only get to run once it returns). Keys of jobs that are
    /// gone or not paused are skipped.
    pub fn end_drain(&self, keys: &[JobKey]) {
        let mut g = self.inner.lock();
        for &key in keys {
            let _ = g.resume(key);
        }
    }

    /// A drain of every node begun and ended at once: QEMU's `bdrv_drain_all()` (a
    /// `transaction` begins with one) and the drain of every change of the block graph (a
    /// backup's clean-up makes three, a block job's free one). Every running job pauses and
    /// resumes (`paused`, `running`), synchronously, under one lock; see
    /// the job core's `State::drain_running` for what busy jobs do.
    pub fn drain_all(&self) {
        self.inner.lock().drain_running();
    }

    /// An internal pause (QEMU's `job_pause`), without waiting.
    pub fn pause(&self, key: JobKey) -> Result<(), JobError> {
        self.inner.lock().pause(key)
    }

    /// Ends an internal pause; a job parked with no pause left returns to RUNNING/READY now.
    pub fn resume(&self, key: JobKey) -> Result<(), JobError> {
        self.inner.lock().resume(key)
    }

    // ----- ending jobs -----

    /// Cancels without QMP's checks (QEMU's `job_cancel`), e.g. a transaction action's abort.
    /// A job that never started concludes before this returns.
    pub fn cancel_job(&self, key: JobKey, force: bool) -> Result<(), JobError> {
        let g = self.inner.lock();
        g.job(key)?;
        drop(self.inner.job_cancel(g, key, force));
        Ok(())
    }

    /// Force-cancels every job, newest first (daemon shutdown, QEMU's `job_cancel_sync_all`):
    /// concluded jobs are dismissed, finished ones abort their transaction, running ones are
    /// woken to stop. Returns the keys, for [`Self::wait_concluded`].
    pub fn cancel_all(&self) -> Vec<JobKey> {
        let keys: Vec<JobKey> = self.inner.lock().jobs.keys().rev().copied().collect();
        for &key in &keys {
            let g = self.inner.lock();
            if g.jobs.contains_key(&key) {
                drop(self.inner.job_cancel(g, key, true));
            }
        }
        keys
    }

    /// Daemon shutdown as qemu-storage-daemon does it (`bdrv_drain_all_begin`, then
    /// `job_cancel_sync_all`): every job is paused, oldest first, and stays paused (each
    /// running job says `paused`); then the newest job is force-cancelled and waited for until
    /// it has concluded (woken by its state changes), then the newest again (a concluded job's
    /// cancel dismisses it), until none is left. A cancelled job leaves its pause at once
    /// (`running`, `aborting`, ...). Returns whether every job ended within `limit`; a job
    /// that did not is left as it is. Never call it from a thread that runs the jobs.
    pub fn cancel_all_sync(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let all: Vec<JobKey> = self.inner.lock().jobs.keys().copied().collect();
        // Never ended: the daemon is going away.
        let _drained = self.begin_drain(&all);
        let mut left_alone: Vec<JobKey> = Vec::new();
        loop {
            let newest = {
                let g = self.inner.lock();
                g.jobs
                    .keys()
                    .rev()
                    .find(|k| !left_alone.contains(k))
                    .copied()
            };
            let Some(key) = newest else {
                return left_alone.is_empty();
            };
            let was_concluded = self.status(key) == Some(BlockJobStatus::Concluded);
            let _ = self.cancel_job(key, true);
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let concluded = self.wait_concluded(&[key], left);
            // A job that stays (not concluded in time, or concluded and not dismissed by
            // its cancel) is left alone, so that this ends.
            if !concluded || (was_concluded && self.status(key).is_some()) {
                left_alone.push(key);
            }
        }
    }

    /// Blocks until each of `keys` is CONCLUDED or gone, or `limit` has passed; returns
    /// whether all were. Woken by the jobs' state changes. Never call it from a thread that
    /// runs the jobs.
    pub fn wait_concluded(&self, keys: &[JobKey], limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut g = self.inner.lock();
        loop {
            // On a stepped executor nothing changes while this waits: report what is.
            let limit_reached = !self.inner.spawn.runs_concurrently();
            let open = keys.iter().any(|k| {
                g.jobs
                    .get(k)
                    .is_some_and(|j| j.status != BlockJobStatus::Concluded)
            });
            if !open {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || limit_reached {
                return false;
            }
            g = self.inner.wait_change(g, Some(left));
        }
    }

    /// Drops a CREATED job that could not be set up (QEMU's `job_early_fail`): → NULL.
    pub fn discard(&self, key: JobKey) -> Result<(), JobError> {
        let mut g = self.inner.lock();
        let status = g.job(key)?.status;
        if status != BlockJobStatus::Created {
            return Err(JobError::NotCreated(status));
        }
        g.dismiss(key);
        Ok(())
    }

    /// Wakes a job sleeping in [`JobContext::idle`] or a rate-limit delay (not a paused one).
    pub fn kick(&self, key: JobKey) {
        self.inner.lock().kick(key);
    }

    /// Work done outside the job's own loop (a mirror's active writes, QEMU's
    /// `job_progress_increase_remaining` and `job_progress_update` together): adds `done` to
    /// both the current progress and the total. A stale key is ignored.
    pub fn progress_done_outside(&self, key: JobKey, done: u64) {
        if let Some(j) = self.inner.lock().jobs.get_mut(&key) {
            j.progress_current = j.progress_current.saturating_add(done);
            j.progress_total = j.progress_total.saturating_add(done);
        }
    }

    /// Sets a job's total progress before its work starts, when its creator already knows it
    /// (QEMU's backup sets its length at creation, so a job cancelled before it ever ran still
    /// reports it in `BLOCK_JOB_CANCELLED`). A stale key is ignored.
    pub fn set_progress_total(&self, key: JobKey, total: u64) {
        if let Some(j) = self.inner.lock().jobs.get_mut(&key) {
            j.progress_total = j.progress_current.max(total);
        }
    }

    /// The job's status, `None` once it is gone.
    pub fn status(&self, key: JobKey) -> Option<BlockJobStatus> {
        self.inner.lock().jobs.get(&key).map(|j| j.status)
    }

    /// The key of a job by id (any kind of job).
    pub fn key_of(&self, id: &str) -> Option<JobKey> {
        self.inner.lock().ids.get(id).copied()
    }

    /// Completes once the job is CONCLUDED or gone.
    pub fn concluded(&self, key: JobKey) -> Concluded {
        Concluded {
            inner: self.inner.clone(),
            key,
        }
    }
}

/// The future of [`JobRegistry::concluded`].
pub struct Concluded {
    inner: Arc<Inner>,
    key: JobKey,
}

impl Future for Concluded {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.inner.lock();
        match g.jobs.get_mut(&self.key) {
            None => Poll::Ready(()),
            Some(job) if job.status == BlockJobStatus::Concluded => Poll::Ready(()),
            Some(job) => {
                if !job.conclude_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    job.conclude_waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{BoxFuture, JobFailure};
    use crate::manual::{ManualClock, ManualExecutor};
    use qmp_api::{Event, JobStatusChangeData, JobType};

    struct Idle;

    impl JobDriver for Idle {
        fn job_type(&self) -> JobType {
            JobType::Backup
        }
        fn run<'a>(&'a mut self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn idle(_: JobKey) -> Box<dyn JobDriver> {
        Box::new(Idle)
    }

    fn registry(events: Arc<Mutex<Vec<Event>>>) -> JobRegistry {
        JobRegistry::new(
            Arc::new(move |e: Event| events.lock().unwrap().push(e)),
            Arc::new(ManualExecutor::new()),
            Arc::new(ManualClock::new()),
        )
    }

    #[test]
    fn a_transition_outside_the_table_is_refused_and_emits_nothing() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let reg = registry(events.clone());
        let key = reg.create(JobSpec::new("j"), idle, None).unwrap();
        events.lock().unwrap().clear();
        let inner = reg.inner.clone();
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            inner.lock().set_status(key, BlockJobStatus::Concluded)
        }));
        // Debug builds stop at the assertion; release builds refuse silently.
        assert_eq!(attempt.is_err(), cfg!(debug_assertions));
        assert_eq!(reg.status(key), Some(BlockJobStatus::Created));
        assert!(events.lock().unwrap().is_empty());
    }

    #[test]
    fn a_status_set_to_itself_emits_no_event() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let reg = registry(events.clone());
        // ABORTING -> ABORTING is in the table, and silent.
        let txn = reg.new_txn();
        let a = reg.create(JobSpec::new("a"), idle, Some(&txn)).unwrap();
        let _b = reg.create(JobSpec::new("b"), idle, Some(&txn)).unwrap();
        events.lock().unwrap().clear();
        reg.start(a).unwrap();
        {
            let mut g = reg.inner.lock();
            g.set_status(a, BlockJobStatus::Aborting);
            g.set_status(a, BlockJobStatus::Aborting);
        }
        let changes: Vec<_> = events.lock().unwrap().drain(..).collect();
        let change =
            |status| Event::JobStatusChange(JobStatusChangeData::new("a".to_string(), status));
        assert_eq!(
            changes,
            [
                change(BlockJobStatus::Running),
                change(BlockJobStatus::Aborting)
            ]
        );
    }

    #[test]
    fn the_driver_is_told_its_key_at_creation_and_not_made_for_a_refused_id() {
        let reg = registry(Arc::new(Mutex::new(Vec::new())));
        let told = Arc::new(Mutex::new(None));
        let seen = told.clone();
        let key = reg
            .create(
                JobSpec::new("j"),
                move |k| {
                    *seen.lock().unwrap() = Some(k);
                    Box::new(Idle)
                },
                None,
            )
            .unwrap();
        assert_eq!(*told.lock().unwrap(), Some(key));
        let made = Arc::new(Mutex::new(false));
        let flag = made.clone();
        let refused = reg.create(
            JobSpec::new("j"),
            move |_| {
                *flag.lock().unwrap() = true;
                Box::new(Idle)
            },
            None,
        );
        assert!(refused.is_err());
        assert!(!*made.lock().unwrap());
    }

    #[test]
    fn registry_handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<JobRegistry>();
        send_sync::<JobTxn>();
        send_sync::<JobContext>();
        send_sync::<Concluded>();
    }

    #[test]
    fn a_reserved_key_names_no_job_until_the_job_is_created_under_it() {
        let reg = registry(Arc::new(Mutex::new(Vec::new())));
        let reserved = reg.reserve_key();
        // Another job created meanwhile gets a key of its own.
        let other = reg.create(JobSpec::new("other"), idle, None).unwrap();
        assert_ne!(other, reserved);
        assert_eq!(reg.status(reserved), None);
        // A kick on it is harmless.
        reg.kick(reserved);
        let key = reg
            .create_reserved(reserved, JobSpec::new("j"), idle, None)
            .unwrap();
        assert_eq!(key, reserved);
        assert_eq!(reg.status(key), Some(BlockJobStatus::Created));
        // A key is one job's.
        assert!(
            reg.create_reserved(reserved, JobSpec::new("k"), idle, None)
                .is_err()
        );
    }
}
