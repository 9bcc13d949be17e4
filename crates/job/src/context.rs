//! What a running job's work sees: pause points, cancellation, rate limiting, progress, READY,
//! and the I/O error policy every block job shares.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use qmp_api::{
    BlockDeviceIoStatus, BlockErrorAction, BlockJobErrorData, BlockdevOnError, Event,
    IoOperationType,
};

use crate::BlockJobStatus;
use crate::driver::JobFailure;
use crate::registry::{Inner, JobKey};
use crate::state::{Activity, Job, WaitKind};

/// Handed to [`crate::JobDriver::run`]. Every await point it offers is also a pause point:
/// a pause, cancel or set-speed wakes a job sleeping in it at once.
pub struct JobContext {
    inner: Arc<Inner>,
    key: JobKey,
}

impl JobContext {
    pub(crate) fn new(inner: Arc<Inner>, key: JobKey) -> Self {
        JobContext { inner, key }
    }

    /// The job this context belongs to.
    pub fn key(&self) -> JobKey {
        self.key
    }

    fn with_job<R>(&self, default: R, f: impl FnOnce(&mut Job) -> R) -> R {
        let mut g = self.inner.lock();
        match g.jobs.get_mut(&self.key) {
            Some(job) => f(job),
            None => default,
        }
    }

    /// Whether the job is READY or STANDBY (it converged once).
    pub fn is_ready(&self) -> bool {
        self.with_job(false, |j| crate::tables::is_ready(j.status))
    }

    /// Force-cancelled: stop working and return.
    pub fn is_cancelled(&self) -> bool {
        self.with_job(true, |j| j.is_cancelled())
    }

    /// Any cancel, including a soft one (mirror in READY: finish without switching).
    pub fn cancel_requested(&self) -> bool {
        self.with_job(true, |j| j.cancel_requested())
    }

    /// `complete` was accepted (jobs that support it, once READY).
    pub fn should_complete(&self) -> bool {
        self.with_job(false, |j| j.complete_requested)
    }

    /// A pause is pending (or in force): a job with requests in flight lets them land and
    /// reaches a pause point before it starts more.
    pub fn pause_requested(&self) -> bool {
        self.with_job(false, |j| j.pause_count > 0)
    }

    /// The current rate limit in bytes per second (0 = none).
    pub fn speed(&self) -> u64 {
        self.with_job(0, |j| j.limit.speed())
    }

    /// Parks the job here while it is paused (PAUSED, or STANDBY when READY).
    pub fn pause_point(&self) -> impl Future<Output = ()> + Send + '_ {
        Wait::new(self, Mode::PausePoint)
    }

    /// Accounts `bytes` of work against the speed limit, then sleeps until the limit allows
    /// more (QEMU's `block_job_ratelimit_sleep`): a wake-up before that (pause and resume, a
    /// drain, a kick) sleeps again for what is left, so the limit holds whatever wakes the
    /// job. Passes a pause point; returns early when cancelled.
    pub fn rate_limit(&self, bytes: u64) -> impl Future<Output = ()> + Send + '_ {
        let now = self.inner.clock.now();
        self.with_job((), |j| {
            j.limit.account(bytes, now);
        });
        Wait::new(self, Mode::RateLimit)
    }

    /// Sleeps for `duration` (woken early by cancel or a kick; a pause and resume meanwhile
    /// leaves it sleeping until then), then passes a pause point.
    pub fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send + '_ {
        let deadline = self.inner.clock.now().saturating_add(duration);
        Wait::new(self, Mode::Sleep(deadline))
    }

    /// Sleeps until kicked (a kick, complete or cancel), then passes a pause point (QEMU's
    /// `job_yield` in a driver's loop): a pause and resume meanwhile leaves it idling.
    /// Returns at once if a kick arrived while busy.
    pub fn idle(&self) -> impl Future<Output = ()> + Send + '_ {
        Wait::new(self, Mode::Idle)
    }

    /// Adds `done` to the current progress.
    pub fn progress_update(&self, done: u64) {
        self.with_job((), |j| {
            j.progress_current = j.progress_current.saturating_add(done);
            j.progress_total = j.progress_total.max(j.progress_current);
        })
    }

    /// Sets the total to current + `remaining`.
    pub fn set_progress_remaining(&self, remaining: u64) {
        self.with_job((), |j| {
            j.progress_total = j.progress_current.saturating_add(remaining)
        })
    }

    /// Adds `delta` to the total.
    pub fn progress_increase_remaining(&self, delta: u64) {
        self.with_job((), |j| {
            j.progress_total = j.progress_total.saturating_add(delta)
        })
    }

    /// (current, total) progress.
    pub fn progress(&self) -> (u64, u64) {
        self.with_job((0, 0), |j| (j.progress_current, j.progress_total))
    }

    /// RUNNING → READY with `BLOCK_JOB_READY` (mirror-like jobs, once converged). No-op in any
    /// other status.
    pub fn set_ready(&self) {
        let mut g = self.inner.lock();
        if g.jobs.get(&self.key).map(|j| j.status) != Some(BlockJobStatus::Running) {
            return;
        }
        g.set_status(self.key, BlockJobStatus::Ready);
        if let Some(job) = g.jobs.get(&self.key)
            && let Some(id) = job.block_events()
        {
            let event = job.ready_event(id);
            g.emit(event);
        }
    }

    /// An I/O error of the job's work, under the job's policy for `operation`
    /// (`on-source-error` for reads, `on-target-error` for writes; QEMU's
    /// `block_job_error_action`): emits `BLOCK_JOB_ERROR`; `stop` (and `enospc` on ENOSPC)
    /// also pauses the job as if the user had, with its I/O status set (resume clears it).
    /// Returns what to do.
    pub fn io_error(&self, operation: IoOperationType, error: &io::Error) -> BlockErrorAction {
        let no_space = error.raw_os_error() == Some(libc_enospc());
        let mut g = self.inner.lock();
        let Some(job) = g.jobs.get_mut(&self.key) else {
            return BlockErrorAction::Report;
        };
        let policy = match operation {
            IoOperationType::Read => job.on_source_error,
            IoOperationType::Write => job.on_target_error,
            // Drivers pass reads and writes only; an operation the schema does not know
            // (a type only a client reading a newer server's event sees) is reported.
            IoOperationType::UnknownValue => BlockdevOnError::Report,
        };
        let action = match policy {
            BlockdevOnError::Report | BlockdevOnError::Auto => BlockErrorAction::Report,
            BlockdevOnError::Ignore => BlockErrorAction::Ignore,
            BlockdevOnError::Stop => BlockErrorAction::Stop,
            BlockdevOnError::Enospc if no_space => BlockErrorAction::Stop,
            BlockdevOnError::Enospc => BlockErrorAction::Report,
        };
        if action == BlockErrorAction::Stop {
            if !job.user_paused {
                job.user_paused = true;
                job.pause_count += 1;
            }
            job.io_status = if no_space {
                BlockDeviceIoStatus::Nospace
            } else {
                BlockDeviceIoStatus::Failed
            };
        }
        if let Some(id) = job.block_events() {
            let event =
                Event::BlockJobError(BlockJobErrorData::new(id.to_string(), operation, action));
            g.emit(event);
        }
        action
    }

    /// [`Self::io_error`], then what the copy loops of backup and mirror do about it: `report`
    /// ends the job with the error's text; `ignore` and `stop` retry the request (`Ok`) after
    /// a pause point (where `stop` holds the job until resumed).
    pub async fn retry_after_io_error(
        &self,
        operation: IoOperationType,
        error: &io::Error,
    ) -> Result<(), JobFailure> {
        match self.io_error(operation, error) {
            // `io_error` decides report, ignore or stop; never an action the schema does not
            // know, which would be reported too.
            BlockErrorAction::Report | BlockErrorAction::UnknownValue => {
                Err(JobFailure::from_io(error))
            }
            BlockErrorAction::Ignore | BlockErrorAction::Stop => {
                // A request failing at once must not spin: give the executor a turn.
                YieldNow(false).await;
                self.pause_point().await;
                Ok(())
            }
        }
    }
}

/// ENOSPC on Linux (the only platform blockjobd runs on).
const fn libc_enospc() -> i32 {
    28
}

/// Gives the executor a turn once.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[derive(Clone, Copy)]
enum Mode {
    PausePoint,
    /// Sleep as long as the rate limiter says, asking it again after every wake-up.
    RateLimit,
    /// Sleep until the deadline (woken early by pause or cancel), then a pause point.
    Sleep(Duration),
    Idle,
    /// Only wait while parked (a freshly started job held by a drained section).
    Unparked,
}

enum Phase {
    Start,
    Sleeping,
    Parked,
}

/// The one future behind every await point of [`JobContext`].
pub(crate) struct Wait<'a> {
    ctx: &'a JobContext,
    mode: Mode,
    phase: Phase,
    timer: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<'a> Wait<'a> {
    fn new(ctx: &'a JobContext, mode: Mode) -> Self {
        Wait {
            ctx,
            mode,
            phase: Phase::Start,
            timer: None,
        }
    }

    pub(crate) fn unparked(ctx: &'a JobContext) -> Self {
        Wait::new(ctx, Mode::Unparked)
    }
}

impl Drop for Wait<'_> {
    /// A driver may drop a sleep (e.g. racing it against its own I/O): it is busy again.
    /// Dropping a wait that is parked is a driver bug; the job then stays PAUSED until resumed.
    fn drop(&mut self) {
        if matches!(self.phase, Phase::Sleeping) {
            let mut g = self.ctx.inner.lock();
            if let Some(job) = g.jobs.get_mut(&self.ctx.key)
                && matches!(job.activity, Activity::Sleeping { .. })
            {
                job.activity = Activity::Busy;
                job.waiting = None;
                job.waker = None;
            }
        }
    }
}

/// What one poll step decided.
enum Step {
    Again,
    Pending,
    Ready,
}

impl Wait<'_> {
    /// Passes the pause point: parks (pending) if a pause is held, else done.
    fn pause_point(&mut self, g: &mut crate::registry::Guard<'_>, cx: &Context<'_>) -> Step {
        let key = self.ctx.key;
        if g.reach_pause_point(key) {
            if let Some(job) = g.jobs.get_mut(&key) {
                job.waker = Some(cx.waker().clone());
            }
            self.phase = Phase::Parked;
            return Step::Pending;
        }
        Step::Ready
    }

    fn step(&mut self, g: &mut crate::registry::Guard<'_>, cx: &mut Context<'_>) -> Step {
        let ctx: &JobContext = self.ctx;
        let key = ctx.key;
        let inner = &ctx.inner;
        let now = inner.clock.now();
        let Some(job) = g.jobs.get_mut(&key) else {
            return Step::Ready;
        };
        match self.phase {
            Phase::Start => {
                job.waiting = match self.mode {
                    Mode::RateLimit => Some(WaitKind::RateLimit),
                    Mode::Sleep(deadline) => Some(WaitKind::Sleep(deadline)),
                    Mode::Idle => Some(WaitKind::Idle),
                    Mode::PausePoint | Mode::Unparked => None,
                };
                let deadline = match self.mode {
                    Mode::Unparked => {
                        self.phase = Phase::Parked;
                        return Step::Again;
                    }
                    Mode::PausePoint => None,
                    Mode::RateLimit => {
                        if job.is_cancelled() {
                            return Step::Ready;
                        }
                        job.limit.delay(now)
                    }
                    Mode::Sleep(deadline) => {
                        if job.is_cancelled() {
                            return Step::Ready;
                        }
                        Some(deadline).filter(|d| *d > now)
                    }
                    Mode::Idle => {
                        if job.is_cancelled() {
                            return Step::Ready;
                        }
                        if std::mem::take(&mut job.kicked) {
                            None
                        } else {
                            Some(Duration::MAX)
                        }
                    }
                };
                let Some(deadline) = deadline.filter(|_| job.pause_count == 0) else {
                    // No sleep (or a pause is held): straight to the pause point.
                    return self.pause_point(g, cx);
                };
                let timed = deadline != Duration::MAX;
                job.activity = Activity::Sleeping { timed };
                job.kicked = false;
                self.timer = timed.then(|| inner.clock.sleep_until(deadline));
                self.phase = Phase::Sleeping;
                Step::Again
            }
            Phase::Sleeping => match job.activity {
                Activity::Sleeping { .. } => {
                    let fired = self
                        .timer
                        .as_mut()
                        .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                    if !fired {
                        job.waker = Some(cx.waker().clone());
                        return Step::Pending;
                    }
                    self.timer = None;
                    job.activity = Activity::Busy;
                    self.woken()
                }
                Activity::Parked { .. } => {
                    self.timer = None;
                    self.phase = Phase::Parked;
                    Step::Again
                }
                _ => {
                    // Woken by the registry (cancel, kick, set-speed).
                    self.timer = None;
                    self.woken()
                }
            },
            Phase::Parked => match job.activity {
                Activity::Parked { .. } => {
                    job.waker = Some(cx.waker().clone());
                    Step::Pending
                }
                // Resumed into the wait it paused in (see `State::enter`): wait on.
                Activity::Sleeping { .. } => {
                    self.phase = Phase::Start;
                    Step::Again
                }
                _ => self.woken(),
            },
        }
    }

    /// After a sleep or a pause: a rate-limit delay is asked again (only the clock ends it);
    /// every other wait passes its pause point.
    fn woken(&mut self) -> Step {
        match self.mode {
            Mode::RateLimit => {
                self.phase = Phase::Start;
                Step::Again
            }
            _ if matches!(self.phase, Phase::Parked) => Step::Ready,
            _ => {
                self.phase = Phase::Start;
                self.mode = Mode::PausePoint;
                Step::Again
            }
        }
    }
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let inner = this.ctx.inner.clone();
        let mut g = inner.lock();
        loop {
            match this.step(&mut g, cx) {
                Step::Again => continue,
                Step::Ready => {
                    if let Some(job) = g.jobs.get_mut(&this.ctx.key) {
                        job.waiting = None;
                    }
                    return Poll::Ready(());
                }
                Step::Pending => {
                    // The job stopped being busy: a drain may be waiting for that.
                    inner.notify_quiescent();
                    return Poll::Pending;
                }
            }
        }
    }
}
