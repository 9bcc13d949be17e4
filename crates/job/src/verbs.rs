//! The verbs and queries the monitor calls (QEMU's `job-qmp.c` and the job part of
//! `blockdev.c`): each looks the job up the way its command family does, checks the verb
//! table, then acts.

use qmp_api::{BlockDeviceIoStatus, BlockJobInfo, JobInfo, QmpError};

use crate::BlockJobVerb;
use crate::registry::{JobKey, JobRef, JobRegistry};
use crate::state::{Activity, generic};

impl JobRegistry {
    /// `block-job-cancel` (`force` as given) / `job-cancel` (always `force = true`).
    pub fn cancel(&self, target: JobRef<'_>, force: bool) -> Result<(), QmpError> {
        let _span = tracing::info_span!("job_verb", verb = "cancel", id = target.id()).entered();
        let g = self.inner.lock();
        let key = g.lookup(target)?;
        if !force && g.jobs.get(&key).is_some_and(|j| j.user_paused) {
            return Err(generic(format!(
                "The block job for device '{}' is currently paused",
                target.id()
            )));
        }
        g.check_verb(key, BlockJobVerb::Cancel)?;
        drop(self.inner.job_cancel(g, key, force));
        Ok(())
    }

    /// `block-job-pause` / `job-pause`.
    pub fn pause_job(&self, target: JobRef<'_>) -> Result<(), QmpError> {
        let _span = tracing::info_span!("job_verb", verb = "pause", id = target.id()).entered();
        let mut g = self.inner.lock();
        let key = g.lookup(target)?;
        g.check_verb(key, BlockJobVerb::Pause)?;
        let Some(job) = g.jobs.get_mut(&key) else {
            return Err(generic("Job not found"));
        };
        if job.user_paused {
            return Err(generic("Job is already paused"));
        }
        job.user_paused = true;
        g.pause(key).map_err(|e| generic(e.to_string()))
    }

    /// `block-job-resume` / `job-resume`.
    pub fn resume_job(&self, target: JobRef<'_>) -> Result<(), QmpError> {
        let _span = tracing::info_span!("job_verb", verb = "resume", id = target.id()).entered();
        let mut g = self.inner.lock();
        let key = g.lookup(target)?;
        if g.jobs
            .get(&key)
            .is_none_or(|j| !j.user_paused || j.pause_count == 0)
        {
            return Err(generic("Can't resume a job that was not paused"));
        }
        g.check_verb(key, BlockJobVerb::Resume)?;
        if let Some(job) = g.jobs.get_mut(&key) {
            job.io_status = BlockDeviceIoStatus::Ok;
            job.user_paused = false;
        }
        g.resume(key).map_err(|e| generic(e.to_string()))
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, target: JobRef<'_>, speed: i64) -> Result<(), QmpError> {
        let _span =
            tracing::info_span!("job_verb", verb = "set-speed", id = target.id(), speed).entered();
        let mut g = self.inner.lock();
        let key = g.lookup(target)?;
        g.check_verb(key, BlockJobVerb::SetSpeed)?;
        let Ok(speed) = u64::try_from(speed) else {
            return Err(generic("Parameter 'speed' expects a non-negative value"));
        };
        let Some(job) = g.jobs.get_mut(&key) else {
            return Err(generic("Job not found"));
        };
        let old = job.limit.speed();
        job.limit.set_speed(speed);
        // A job sleeping off a delay the new speed shortens recomputes it now.
        if (speed == 0 || speed > old) && job.activity == (Activity::Sleeping { timed: true }) {
            g.kick(key);
        }
        Ok(())
    }

    /// `block-job-complete` / `job-complete`.
    pub fn complete(&self, target: JobRef<'_>) -> Result<(), QmpError> {
        let _span = tracing::info_span!("job_verb", verb = "complete", id = target.id()).entered();
        let mut g = self.inner.lock();
        let key = g.lookup(target)?;
        g.check_verb(key, BlockJobVerb::Complete)?;
        let Some(job) = g.jobs.get_mut(&key) else {
            return Err(generic("Job not found"));
        };
        if job.cancel_requested() || !job.can_complete {
            return Err(generic(format!(
                "The active block job '{}' cannot be completed",
                job.label()
            )));
        }
        job.complete_requested = true;
        g.kick(key);
        Ok(())
    }

    /// `block-job-finalize` / `job-finalize`: finalizes the whole transaction before returning.
    pub fn finalize(&self, target: JobRef<'_>) -> Result<(), QmpError> {
        let _span = tracing::info_span!("job_verb", verb = "finalize", id = target.id()).entered();
        let g = self.inner.lock();
        let key = g.lookup(target)?;
        g.check_verb(key, BlockJobVerb::Finalize)?;
        if let Some(t) = g.jobs.get(&key).and_then(|j| j.txn) {
            drop(self.inner.finalize(g, t));
        }
        Ok(())
    }

    /// `block-job-dismiss` / `job-dismiss`: CONCLUDED → NULL, the job is gone.
    pub fn dismiss(&self, target: JobRef<'_>) -> Result<(), QmpError> {
        let _span = tracing::info_span!("job_verb", verb = "dismiss", id = target.id()).entered();
        let mut g = self.inner.lock();
        let key = g.lookup(target)?;
        g.check_verb(key, BlockJobVerb::Dismiss)?;
        g.dismiss(key);
        Ok(())
    }

    /// Looks the job up and checks `verb` against the table; for verbs whose effect is the
    /// driver's (`change`).
    pub fn check_verb(&self, target: JobRef<'_>, verb: BlockJobVerb) -> Result<JobKey, QmpError> {
        let g = self.inner.lock();
        let key = g.lookup(target)?;
        g.check_verb(key, verb)?;
        Ok(key)
    }

    // ----- queries -----

    /// `query-jobs`: jobs with an id, newest first.
    pub fn query_jobs(&self) -> Vec<JobInfo> {
        let g = self.inner.lock();
        g.jobs
            .values()
            .rev()
            .filter_map(|j| g.job_info(j))
            .collect()
    }

    /// `query-block-jobs`: block jobs with an id, newest first.
    pub fn query_block_jobs(&self) -> Vec<BlockJobInfo> {
        let g = self.inner.lock();
        g.jobs
            .values()
            .rev()
            .filter(|j| j.block_job)
            .filter_map(|j| j.id.as_deref().map(|id| j.block_info(id)))
            .collect()
    }

    /// The block jobs with an id, newest first (QEMU's `block_job_next` order), with it.
    pub fn block_jobs(&self) -> Vec<(JobKey, String)> {
        let g = self.inner.lock();
        g.jobs
            .iter()
            .rev()
            .filter(|(_, j)| j.block_job)
            .filter_map(|(k, j)| j.id.clone().map(|id| (*k, id)))
            .collect()
    }

    /// One job's `query-block-jobs` entry (also for internal jobs, with an empty device).
    pub fn block_job_info(&self, key: JobKey) -> Option<BlockJobInfo> {
        let g = self.inner.lock();
        let job = g.jobs.get(&key)?;
        Some(job.block_info(job.id.as_deref().unwrap_or("")))
    }
}
