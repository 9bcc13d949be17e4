//! What a running job's work sees: pause points, cancellation, rate limiting, progress, READY.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::event::{ErrorAction, IoOperation};
use crate::registry::{Activity, Inner, JobKey, OnError};

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

    fn with_job<R>(&self, default: R, f: impl FnOnce(&mut crate::registry::Job) -> R) -> R {
        let mut g = self.inner.lock();
        match g.jobs.get_mut(&self.key) {
            Some(job) => f(job),
            None => default,
        }
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

    /// The current rate limit in bytes per second (0 = none).
    pub fn speed(&self) -> u64 {
        self.with_job(0, |j| j.limit.speed())
    }

    /// Parks the job here while it is paused (PAUSED, or STANDBY when READY).
    pub fn pause_point(&self) -> impl Future<Output = ()> + Send + '_ {
        Wait::new(self, Mode::PausePoint)
    }

    /// Accounts `bytes` of work against the speed limit and sleeps as long as it says, then
    /// passes a pause point. Returns early when cancelled.
    pub fn rate_limit(&self, bytes: u64) -> impl Future<Output = ()> + Send + '_ {
        let now = self.inner.clock.now();
        let deadline = self.with_job(None, |j| j.limit.account(bytes, now));
        Wait::new(self, Mode::Sleep(deadline))
    }

    /// Sleeps for `duration` (woken early by cancel or pause), then passes a pause point.
    pub fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send + '_ {
        let deadline = self.inner.clock.now().saturating_add(duration);
        Wait::new(self, Mode::Sleep(Some(deadline)))
    }

    /// Sleeps until something happens (kick, complete, cancel, pause/resume), then passes a
    /// pause point (QEMU's `job_yield`). Returns at once if a kick arrived while busy.
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
        self.inner.set_ready(self.key)
    }

    /// An I/O error under `on_error`: emits `BLOCK_JOB_ERROR`; `stop` also pauses the job as
    /// if the user had (resume clears the I/O status). Returns what to do.
    pub fn report_io_error(
        &self,
        on_error: OnError,
        operation: IoOperation,
        no_space: bool,
    ) -> ErrorAction {
        self.inner
            .report_io_error(self.key, on_error, operation, no_space)
    }
}

enum Mode {
    PausePoint,
    /// Sleep until the deadline (if any), then a pause point.
    Sleep(Option<Duration>),
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
                job.waker = None;
            }
        }
    }
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let ctx: &JobContext = this.ctx;
        let key = ctx.key;
        let inner = &ctx.inner;
        let mut g = inner.lock();
        loop {
            let Some(job) = g.jobs.get_mut(&key) else {
                return Poll::Ready(());
            };
            match this.phase {
                Phase::Start => {
                    let deadline = match this.mode {
                        Mode::Unparked => {
                            this.phase = Phase::Parked;
                            continue;
                        }
                        Mode::PausePoint => None,
                        Mode::Sleep(deadline) => {
                            if job.is_cancelled() {
                                return Poll::Ready(());
                            }
                            deadline.filter(|d| *d > inner.clock.now())
                        }
                        Mode::Idle => {
                            if job.is_cancelled() {
                                return Poll::Ready(());
                            }
                            if std::mem::take(&mut job.kicked) {
                                None
                            } else {
                                Some(Duration::MAX)
                            }
                        }
                    };
                    let Some(deadline) = deadline.filter(|_| job.pause_count == 0) else {
                        // No sleep: straight to the pause point.
                        if g.reach_pause_point(key) {
                            if let Some(job) = g.jobs.get_mut(&key) {
                                job.waker = Some(cx.waker().clone());
                            }
                            this.phase = Phase::Parked;
                            return Poll::Pending;
                        }
                        return Poll::Ready(());
                    };
                    let timed = deadline != Duration::MAX;
                    job.activity = Activity::Sleeping { timed };
                    job.kicked = false;
                    this.timer = timed.then(|| inner.clock.sleep_until(deadline));
                    this.phase = Phase::Sleeping;
                }
                Phase::Sleeping => match job.activity {
                    Activity::Sleeping { .. } => {
                        let fired = this
                            .timer
                            .as_mut()
                            .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                        if !fired {
                            job.waker = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                        this.timer = None;
                        if g.reach_pause_point(key) {
                            if let Some(job) = g.jobs.get_mut(&key) {
                                job.waker = Some(cx.waker().clone());
                            }
                            this.phase = Phase::Parked;
                            return Poll::Pending;
                        }
                        return Poll::Ready(());
                    }
                    Activity::Parked { .. } => {
                        this.timer = None;
                        this.phase = Phase::Parked;
                    }
                    _ => {
                        // Woken by the registry (cancel, kick, set-speed).
                        this.timer = None;
                        if g.reach_pause_point(key) {
                            if let Some(job) = g.jobs.get_mut(&key) {
                                job.waker = Some(cx.waker().clone());
                            }
                            this.phase = Phase::Parked;
                            return Poll::Pending;
                        }
                        return Poll::Ready(());
                    }
                },
                Phase::Parked => {
                    if matches!(job.activity, Activity::Parked { .. }) {
                        job.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    return Poll::Ready(());
                }
            }
        }
    }
}
