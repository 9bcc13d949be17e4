//! Which jobs use which nodes: the "node is busy" check and drained sections (QEMU's op
//! blockers and `bdrv_drained_begin`/`_end`, reduced to what the block-job commands observe).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use job::{BlockJobStatus, JobKey, JobRegistry};

#[derive(Debug, Clone)]
struct Claim {
    job: JobKey,
    job_type: &'static str,
    node: String,
    /// The job blocks other users (a backup or mirror target).
    exclusive: bool,
}

/// The nodes each job uses. Cheap to clone (a shared handle).
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeClaims {
    claims: Arc<Mutex<Vec<Claim>>>,
    /// Nodes only a finished job held (a drive-backup target): to be closed.
    retired: Arc<Mutex<Vec<String>>>,
}

impl NodeClaims {
    fn lock(&self) -> MutexGuard<'_, Vec<Claim>> {
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `node` was held only by a job that has ended: close it at the next opportunity.
    pub(crate) fn retire(&self, node: &str) {
        self.retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(node.to_string());
    }

    /// The nodes retired since the last call.
    pub(crate) fn take_retired(&self) -> Vec<String> {
        std::mem::take(&mut *self.retired.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Records that `job` uses `node` (`exclusive`: nobody else may use it as a target).
    pub(crate) fn claim(&self, job: JobKey, job_type: &'static str, node: &str, exclusive: bool) {
        self.lock().push(Claim {
            job,
            job_type,
            node: node.to_string(),
            exclusive,
        });
    }

    /// Forgets every node of `job` (its clean-up).
    pub(crate) fn release(&self, job: JobKey) {
        self.lock().retain(|c| c.job != job);
    }

    /// `Node '<n>' is busy: block device is in use by block job: <type>` if a job holds `node`
    /// exclusively.
    pub(crate) fn check_free(&self, node: &str) -> Result<(), qmp_api::QmpError> {
        match self.lock().iter().find(|c| c.exclusive && c.node == node) {
            Some(c) => Err(qmp_api::QmpError::generic(format!(
                "Node '{node}' is busy: block device is in use by block job: {}",
                c.job_type
            ))),
            None => Ok(()),
        }
    }

    /// Jobs using `node`, oldest claim first, each once.
    pub(crate) fn jobs_using(&self, node: &str) -> Vec<JobKey> {
        let mut keys = Vec::new();
        for c in self.lock().iter().filter(|c| c.node == node) {
            if !keys.contains(&c.job) {
                keys.push(c.job);
            }
        }
        keys
    }

    /// Every job using some node, each once.
    pub(crate) fn all_jobs(&self) -> Vec<JobKey> {
        let mut keys = Vec::new();
        for c in self.lock().iter() {
            if !keys.contains(&c.job) {
                keys.push(c.job);
            }
        }
        keys
    }
}

/// Whether a drain waits for busy jobs to reach their pause point (QEMU's drain polls until
/// every job is quiescent). Only possible when jobs run on other threads than the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainWait {
    /// Pause what sleeps now; a busy job pauses at its next pause point, unwaited (tests on
    /// the manual executor).
    #[default]
    No,
    /// Wait (up to a bound) until each paused job has parked (the daemon on tokio).
    UntilParked,
}

/// How long a drain waits for one busy job at most.
const DRAIN_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until the job has parked, finished its work, or is gone.
fn wait_parked(jobs: &JobRegistry, key: JobKey, wait: DrainWait) {
    if wait == DrainWait::No {
        return;
    }
    let start = std::time::Instant::now();
    while matches!(
        jobs.status(key),
        Some(BlockJobStatus::Running | BlockJobStatus::Ready)
    ) && start.elapsed() < DRAIN_WAIT_LIMIT
    {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// A drained section: the jobs using the drained nodes are held paused until it ends.
#[derive(Debug)]
pub(crate) struct Drain {
    jobs: JobRegistry,
    held: Vec<JobKey>,
}

impl Drain {
    /// Begins a drained section of `node`.
    pub(crate) fn begin(
        jobs: &JobRegistry,
        claims: &NodeClaims,
        node: &str,
        wait: DrainWait,
    ) -> Drain {
        let mut drain = Drain {
            jobs: jobs.clone(),
            held: Vec::new(),
        };
        for key in claims.jobs_using(node) {
            if drain.hold_started(key) {
                wait_parked(jobs, key, wait);
            }
        }
        drain
    }

    /// Holds a job that may be running; true if it was paused.
    fn hold_started(&mut self, key: JobKey) -> bool {
        let started = !matches!(self.jobs.status(key), Some(BlockJobStatus::Created) | None);
        self.hold(key);
        started && self.held.last() == Some(&key)
    }

    /// Also holds `key` (a job created inside the section).
    pub(crate) fn hold(&mut self, key: JobKey) {
        if self.jobs.pause(key).is_ok() {
            self.held.push(key);
        }
    }

    /// The held jobs, handed over to be resumed later (see `BlockState::end_drain`); the
    /// section then ends with nothing left to resume.
    pub(crate) fn take_held(&mut self) -> Vec<JobKey> {
        std::mem::take(&mut self.held)
    }

    /// Ends the section: every held job that still exists may run again.
    pub(crate) fn end(&mut self) {
        for key in self.held.drain(..) {
            // A job that ended meanwhile is simply gone.
            let _ = self.jobs.resume(key);
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.end();
    }
}

/// `bdrv_drain_all()`: every job using a node pauses and resumes.
pub(crate) fn drain_all(jobs: &JobRegistry, claims: &NodeClaims, wait: DrainWait) {
    drain_jobs(jobs, &claims.all_jobs(), wait);
}

/// A drain of every node, as the jobs in `keys` see it.
pub(crate) fn drain_jobs(jobs: &JobRegistry, keys: &[JobKey], wait: DrainWait) {
    let held: Vec<JobKey> = keys
        .iter()
        .copied()
        .filter(|k| jobs.pause(*k).is_ok())
        .collect();
    for &key in &held {
        wait_parked(jobs, key, wait);
    }
    for key in held {
        let _ = jobs.resume(key);
    }
}
