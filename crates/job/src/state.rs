//! The state machine of one job (QEMU's `job.c` without the transaction protocol): the one
//! function that moves a status ([`State::set_status`]), the one that checks a verb
//! ([`State::check_verb`]), pause points (park, enter, kick, pause, resume) and the job table
//! they act on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use qmp_api::{
    BlockDeviceIoStatus, BlockJobCancelledData, BlockJobCompletedData, BlockJobInfo,
    BlockJobInfoBranch, BlockJobInfoMirror, BlockJobReadyData, BlockdevOnError, ErrorClass, Event,
    JobInfo, JobStatusChangeData, JobType, QmpError,
};

use crate::driver::JobDriver;
use crate::event::EventSink;
use crate::ratelimit::RateLimit;
use crate::registry::{JobError, JobKey, JobRef};
use crate::runtime::Clock;
use crate::tables::{is_ready, transition_allowed, verb_allowed};
use crate::txn::Txn;
use crate::{BlockJobStatus, BlockJobVerb};

/// The message of a job that ended because it was cancelled (`strerror(ECANCELED)`).
pub const CANCELED_MESSAGE: &str = "Operation canceled";

/// The wait a job's work is in (one of [`crate::JobContext`]'s await points), which decides
/// what the job does when resumed from a pause taken inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitKind {
    /// A rate-limit delay: it goes on sleeping while the limiter asks for it.
    RateLimit,
    /// A sleep until this clock time: it goes on sleeping until then.
    Sleep(Duration),
    /// Idle until kicked (or cancelled, or completed): it goes on idling.
    Idle,
}

/// What a started job's task is doing, as far as the registry knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    NotStarted,
    /// Executing its work or waiting for its I/O (QEMU's `busy`).
    Busy,
    /// Waiting in a rate-limit delay (`timed`) or idle; wakes on cancel, pause, kick.
    Sleeping {
        timed: bool,
    },
    /// Stopped at a pause point; `resume_to` is the status it returns to.
    Parked {
        resume_to: BlockJobStatus,
    },
    /// Its work returned.
    Finished,
}

pub(crate) struct Job {
    pub(crate) id: Option<String>,
    pub(crate) job_type: JobType,
    pub(crate) block_job: bool,
    pub(crate) status: BlockJobStatus,
    pub(crate) txn: Option<u64>,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) can_complete: bool,
    pub(crate) soft_cancel_when_ready: bool,
    /// A mirror's `actively-synced`, kept by its driver.
    pub(crate) actively_synced: Option<Arc<std::sync::atomic::AtomicBool>>,
    pub(crate) pause_count: u32,
    pub(crate) user_paused: bool,
    pub(crate) started: bool,
    pub(crate) counted_done: bool,
    pub(crate) activity: Activity,
    /// The wait its work is in, if any.
    pub(crate) waiting: Option<WaitKind>,
    pub(crate) waker: Option<Waker>,
    pub(crate) kicked: bool,
    pub(crate) cancelled: bool,
    pub(crate) force_cancel: bool,
    pub(crate) complete_requested: bool,
    pub(crate) ret: Option<String>,
    pub(crate) progress_current: u64,
    pub(crate) progress_total: u64,
    pub(crate) limit: RateLimit,
    pub(crate) on_source_error: BlockdevOnError,
    pub(crate) on_target_error: BlockdevOnError,
    pub(crate) io_status: BlockDeviceIoStatus,
    pub(crate) driver: Option<Box<dyn JobDriver>>,
    pub(crate) conclude_waiters: Vec<Waker>,
}

impl Job {
    /// Force-cancelled (QEMU's `job_is_cancelled`).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled && self.force_cancel
    }

    /// Any cancel requested, soft or forced.
    pub(crate) fn cancel_requested(&self) -> bool {
        self.cancelled
    }

    pub(crate) fn label(&self) -> &str {
        self.id.as_deref().unwrap_or("<internal>")
    }

    /// The id under which the job emits `BLOCK_JOB_*` events, if it does.
    pub(crate) fn block_events(&self) -> Option<&str> {
        if self.block_job {
            self.id.as_deref()
        } else {
            None
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn wire(value: u64) -> i64 {
        i64::try_from(value).unwrap_or(i64::MAX)
    }

    pub(crate) fn completed_event(&self, device: &str) -> Event {
        let mut data = BlockJobCompletedData::new(
            self.job_type,
            device.to_string(),
            Self::wire(self.progress_total),
            Self::wire(self.progress_current),
            Self::wire(self.limit.speed()),
        );
        data.error = self.ret.clone();
        Event::BlockJobCompleted(data)
    }

    pub(crate) fn cancelled_event(&self, device: &str) -> Event {
        Event::BlockJobCancelled(BlockJobCancelledData::new(
            self.job_type,
            device.to_string(),
            Self::wire(self.progress_total),
            Self::wire(self.progress_current),
            Self::wire(self.limit.speed()),
        ))
    }

    pub(crate) fn ready_event(&self, device: &str) -> Event {
        Event::BlockJobReady(BlockJobReadyData::new(
            self.job_type,
            device.to_string(),
            Self::wire(self.progress_total),
            Self::wire(self.progress_current),
            Self::wire(self.limit.speed()),
        ))
    }

    pub(crate) fn info(&self, id: &str) -> JobInfo {
        let mut info = JobInfo::new(
            id.to_string(),
            self.job_type,
            self.status,
            Self::wire(self.progress_current),
            Self::wire(self.progress_total),
        );
        info.error = self.ret.clone();
        info
    }

    pub(crate) fn block_info(&self, device: &str) -> BlockJobInfo {
        BlockJobInfo {
            device: device.to_string(),
            len: Self::wire(self.progress_total),
            offset: Self::wire(self.progress_current),
            busy: self.activity == Activity::Busy,
            paused: self.pause_count > 0,
            speed: Self::wire(self.limit.speed()),
            io_status: self.io_status,
            ready: is_ready(self.status),
            status: self.status,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            error: self.ret.clone(),
            branch: info_branch(
                self.job_type,
                self.actively_synced
                    .as_ref()
                    .is_some_and(|a| a.load(std::sync::atomic::Ordering::Acquire)),
            ),
        }
    }
}

/// The type-specific part of `query-block-jobs` (mirror's `actively-synced`).
fn info_branch(job_type: JobType, actively_synced: bool) -> BlockJobInfoBranch {
    match job_type {
        JobType::Mirror => BlockJobInfoBranch::Mirror(BlockJobInfoMirror { actively_synced }),
        JobType::Commit => BlockJobInfoBranch::Commit,
        JobType::Stream => BlockJobInfoBranch::Stream,
        JobType::Create => BlockJobInfoBranch::Create,
        JobType::Amend => BlockJobInfoBranch::Amend,
        JobType::SnapshotLoad => BlockJobInfoBranch::SnapshotLoad,
        JobType::SnapshotSave => BlockJobInfoBranch::SnapshotSave,
        JobType::SnapshotDelete => BlockJobInfoBranch::SnapshotDelete,
        JobType::Backup => BlockJobInfoBranch::Backup,
        // A job's type comes from its driver, which names one the schema has; the type
        // the schema does not know has its own branch.
        JobType::UnknownValue => BlockJobInfoBranch::UnknownValue,
    }
}

/// Every job and job transaction, behind the registry's one lock.
pub(crate) struct State {
    sink: Arc<dyn EventSink>,
    clock: Arc<dyn Clock>,
    pub(crate) jobs: BTreeMap<JobKey, Job>,
    pub(crate) ids: HashMap<String, JobKey>,
    pub(crate) txns: HashMap<u64, Txn>,
    /// Started jobs whose work has not returned: what a drain pauses.
    pub(crate) running: BTreeSet<JobKey>,
    pub(crate) next_job: u64,
    pub(crate) next_txn: u64,
}

pub(crate) fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::new(ErrorClass::GenericError, desc)
}

impl State {
    pub(crate) fn new(sink: Arc<dyn EventSink>, clock: Arc<dyn Clock>) -> Self {
        State {
            sink,
            clock,
            jobs: BTreeMap::new(),
            ids: HashMap::new(),
            txns: HashMap::new(),
            running: BTreeSet::new(),
            next_job: 0,
            next_txn: 0,
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        tracing::trace!(event = event.name(), "job event");
        self.sink.emit(event);
    }

    /// The sink's [`EventSink::observed`]: the registry's lock has just been taken.
    pub(crate) fn observed(&self) {
        self.sink.observed();
    }

    /// The sink's [`EventSink::polling`]: other threads' events pass while the caller waits.
    pub(crate) fn polling(&self) -> crate::event::Polling {
        self.sink.polling()
    }

    /// The one place a status changes: refuses (and reports) anything not in the table.
    pub(crate) fn set_status(&mut self, key: JobKey, to: BlockJobStatus) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        let from = job.status;
        if !transition_allowed(from, to) {
            tracing::error!(job = job.label(), %from, %to, "job state transition refused");
            debug_assert!(
                false,
                "job state transition {from} -> {to} is not in the table"
            );
            return;
        }
        job.status = to;
        tracing::debug!(job = job.label(), %from, %to, "job state transition");
        if from != to
            && let Some(id) = &job.id
        {
            let event = Event::JobStatusChange(JobStatusChangeData::new(id.clone(), to));
            self.emit(event);
        }
    }

    /// The one place a verb is checked against the table: `Job '<id>' in state '<status>'
    /// cannot accept command verb '<verb>'`.
    pub(crate) fn check_verb(&self, key: JobKey, verb: BlockJobVerb) -> Result<(), QmpError> {
        let Some(job) = self.jobs.get(&key) else {
            return Err(generic("Job not found"));
        };
        let allowed = verb_allowed(verb, job.status);
        tracing::debug!(job = job.label(), status = %job.status, %verb, allowed, "job verb");
        if allowed {
            Ok(())
        } else {
            Err(generic(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                job.label(),
                job.status,
                verb
            )))
        }
    }

    /// A job by the name a command gives, with the not-found error of that command family.
    pub(crate) fn lookup(&self, target: JobRef<'_>) -> Result<JobKey, QmpError> {
        let found = self.ids.get(target.id()).copied().filter(|k| match target {
            JobRef::BlockJob(_) => self.jobs.get(k).is_some_and(|j| j.block_job),
            JobRef::Job(_) => true,
        });
        found.ok_or_else(|| match target {
            JobRef::BlockJob(id) => QmpError::new(
                ErrorClass::DeviceNotActive,
                format!("Block job '{id}' not found"),
            ),
            JobRef::Job(_) => generic("Job not found"),
        })
    }

    pub(crate) fn job(&self, key: JobKey) -> Result<&Job, JobError> {
        self.jobs.get(&key).ok_or(JobError::Gone)
    }

    pub(crate) fn job_mut(&mut self, key: JobKey) -> Result<&mut Job, JobError> {
        self.jobs.get_mut(&key).ok_or(JobError::Gone)
    }

    /// Stops a sleeping or running job at its pause point now (PAUSED or STANDBY).
    pub(crate) fn park(&mut self, key: JobKey) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        let resume_to = job.status;
        let to = match resume_to {
            BlockJobStatus::Running => BlockJobStatus::Paused,
            BlockJobStatus::Ready => BlockJobStatus::Standby,
            _ => return,
        };
        job.activity = Activity::Parked { resume_to };
        self.set_status(key, to);
    }

    /// QEMU's `job_pause_point`: parks the job if it should pause. Returns whether it parked.
    pub(crate) fn reach_pause_point(&mut self, key: JobKey) -> bool {
        let Some(job) = self.jobs.get_mut(&key) else {
            return false;
        };
        job.activity = Activity::Busy;
        if job.pause_count == 0 || job.is_cancelled() {
            return false;
        }
        self.park(key);
        matches!(
            self.jobs.get(&key).map(|j| j.activity),
            Some(Activity::Parked { .. })
        )
    }

    /// QEMU's `job_enter`: wakes a sleeping job; a parked one returns to its status at once,
    /// and to the wait it paused in if that goes on (QEMU re-enters the job's coroutine
    /// synchronously, which finds its delay not over and sleeps again before `job_enter`
    /// returns): a rate-limit delay or a sleep not yet over, an idle wait not kicked.
    pub(crate) fn enter(&mut self, key: JobKey) {
        let now = self.clock.now();
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        match job.activity {
            Activity::Parked { resume_to } => {
                let waits_on = if job.is_cancelled() {
                    None
                } else {
                    match job.waiting {
                        Some(WaitKind::RateLimit) => job.limit.delay(now).map(|_| true),
                        Some(WaitKind::Sleep(deadline)) => (deadline > now).then_some(true),
                        Some(WaitKind::Idle) => (!job.kicked).then_some(false),
                        None => None,
                    }
                };
                job.activity = match waits_on {
                    Some(timed) => Activity::Sleeping { timed },
                    None => Activity::Busy,
                };
                job.wake();
                self.set_status(key, resume_to);
            }
            Activity::Sleeping { .. } => {
                job.activity = Activity::Busy;
                job.wake();
            }
            Activity::Busy => job.kicked = true,
            Activity::NotStarted | Activity::Finished => {}
        }
    }

    /// Wakes a sleeping job; a busy or parked one finds the kick when it next waits (a parked
    /// one stays parked).
    pub(crate) fn kick(&mut self, key: JobKey) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        match job.activity {
            Activity::Sleeping { .. } => {
                job.activity = Activity::Busy;
                job.wake();
            }
            Activity::Busy | Activity::Parked { .. } => job.kicked = true,
            Activity::NotStarted | Activity::Finished => {}
        }
    }

    /// QEMU's `job_pause`: one more pause; a sleeping job parks at once, a busy one at its next
    /// pause point.
    pub(crate) fn pause(&mut self, key: JobKey) -> Result<(), JobError> {
        let job = self.job_mut(key)?;
        job.pause_count += 1;
        if matches!(job.activity, Activity::Sleeping { .. }) && !job.is_cancelled() {
            self.park(key);
        }
        Ok(())
    }

    /// QEMU's `job_resume`: one pause less; a parked job with none left runs again now.
    pub(crate) fn resume(&mut self, key: JobKey) -> Result<(), JobError> {
        let job = self.job_mut(key)?;
        if job.pause_count == 0 {
            return Err(JobError::NotPaused);
        }
        job.pause_count -= 1;
        if job.pause_count == 0 && matches!(job.activity, Activity::Parked { .. }) {
            self.enter(key);
        }
        Ok(())
    }

    /// A drain of every node, begun and ended at once (QEMU's `bdrv_drain_all`, and the drain
    /// of a graph change under `bdrv_graph_wrlock`): every running job pauses, then every one
    /// resumes. QEMU waits for each job to reach its pause point (its in-flight request
    /// completes, then it parks): here a sleeping job parks at once, and for a busy one that
    /// nothing else holds the wait is elided, since the drain ends before anything could
    /// observe it stopped: its `paused` and `running` are recorded now and its request goes
    /// on. A parked job stays parked; a cancelled one does not pause.
    pub(crate) fn drain_running(&mut self) {
        let running: Vec<JobKey> = self.running.iter().copied().collect();
        let mut held: Vec<(JobKey, Option<BlockJobStatus>)> = Vec::new();
        for key in running {
            let Some(job) = self.jobs.get(&key) else {
                continue;
            };
            let (activity, status) = (job.activity, job.status);
            let unheld = job.pause_count == 0 && !job.is_cancelled();
            match activity {
                Activity::Sleeping { .. } if self.pause(key).is_ok() => held.push((key, None)),
                Activity::Busy if unheld => {
                    let paused = match status {
                        BlockJobStatus::Running => BlockJobStatus::Paused,
                        BlockJobStatus::Ready => BlockJobStatus::Standby,
                        _ => continue,
                    };
                    self.set_status(key, paused);
                    held.push((key, Some(status)));
                }
                _ => {}
            }
        }
        for (key, status) in held {
            match status {
                None => {
                    let _ = self.resume(key);
                }
                Some(status) => self.set_status(key, status),
            }
        }
    }

    /// QEMU's `job_cancel_async`: records the request; a user pause is lifted.
    pub(crate) fn cancel_async(&mut self, key: JobKey, force: bool) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        let force = force || !job.soft_cancel_when_ready || !is_ready(job.status);
        if job.user_paused {
            job.user_paused = false;
            job.pause_count = job.pause_count.saturating_sub(1);
        }
        if force || job.activity != Activity::Finished {
            job.cancelled = true;
            job.force_cancel |= force;
        }
    }

    /// A failed or force-cancelled job goes ABORTING (again: X→X is silent).
    pub(crate) fn update_rc(&mut self, key: JobKey) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        if job.ret.is_none() && job.is_cancelled() {
            job.ret = Some(CANCELED_MESSAGE.to_string());
        }
        if job.ret.is_some() {
            self.set_status(key, BlockJobStatus::Aborting);
        }
    }

    pub(crate) fn wake_conclude_waiters(&mut self, key: JobKey) {
        if let Some(job) = self.jobs.get_mut(&key) {
            for w in job.conclude_waiters.drain(..) {
                w.wake();
            }
        }
    }

    /// The job's work returned (or it never started and never will): it is no longer
    /// running.
    pub(crate) fn work_done(&mut self, key: JobKey) {
        self.running.remove(&key);
        if let Some(job) = self.jobs.get_mut(&key) {
            job.activity = Activity::Finished;
        }
    }

    /// → NULL and gone (QEMU's `job_do_dismiss` and the job's last unref). A job still in a
    /// transaction (early failure) leaves it. Freeing a block job that ran detaches it from
    /// its nodes, a graph change that drains the running jobs.
    pub(crate) fn dismiss(&mut self, key: JobKey) {
        self.set_status(key, BlockJobStatus::Null);
        self.wake_conclude_waiters(key);
        self.running.remove(&key);
        let Some(job) = self.jobs.remove(&key) else {
            return;
        };
        if let Some(id) = &job.id {
            self.ids.remove(id);
        }
        if let Some(t) = job.txn {
            self.leave_txn(t, key, &job);
        }
        if job.block_job && job.started {
            self.drain_running();
        }
    }

    pub(crate) fn job_info(&self, job: &Job) -> Option<JobInfo> {
        job.id.as_deref().map(|id| job.info(id))
    }
}
