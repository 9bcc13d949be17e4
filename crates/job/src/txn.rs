//! The job transaction protocol (QEMU's `job_completed`, `job_txn_apply`, `job_finalize_single`
//! and `job_completed_txn_abort`), in the three steps ARCHITECTURE.md names:
//!
//! 1. [`Inner::job_completed`]: a member's work returned; failed → abort (3), else WAITING,
//!    and once no member is unfinished, all PENDING and finalize (2) unless one is manual.
//! 2. [`Inner::finalize`]: `prepare` every member, then commit, clean and conclude each.
//! 3. [`Inner::abort`]: force-cancel the others, wait for all to stop, then abort, clean and
//!    conclude each.

use std::sync::Arc;

use qmp_api::{BlockJobPendingData, Event};

use crate::BlockJobStatus;
use crate::driver::{JobDriver, JobFailure};
use crate::registry::{Guard, Inner, JobKey};
use crate::state::{Activity, Job, State};
use crate::tables::is_completed;

/// The members of one job transaction and its progress through the protocol.
#[derive(Default)]
pub(crate) struct Txn {
    /// Insertion order; every walk goes newest first (`.rev()`).
    pub(crate) members: Vec<JobKey>,
    /// Members whose work has not finished yet (not W/D/X/E/N).
    pub(crate) unfinished: usize,
    /// Members with auto-finalize off.
    pub(crate) manual: usize,
    pub(crate) aborting: bool,
    pub(crate) finalizing: bool,
    /// An abort is concluding its stopped members while others are still held paused
    /// (see [`Inner::abort`]): other calls leave it to that one.
    pub(crate) concluding_some: bool,
    /// [`JobTxn`] handles alive.
    pub(crate) handles: usize,
}

impl State {
    fn members_newest_first(&self, txn: u64) -> Vec<JobKey> {
        self.txns
            .get(&txn)
            .map(|t| t.members.iter().rev().copied().collect())
            .unwrap_or_default()
    }

    /// Members not yet concluded, newest first.
    fn unconcluded_newest_first(&self, txn: u64) -> Vec<JobKey> {
        self.members_newest_first(txn)
            .into_iter()
            .filter(|m| self.jobs.get(m).is_some_and(|j| j.txn == Some(txn)))
            .collect()
    }

    /// Counts a member's work as finished, once.
    fn count_done(&mut self, key: JobKey) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        if job.counted_done {
            return;
        }
        job.counted_done = true;
        if let Some(txn) = job.txn.and_then(|t| self.txns.get_mut(&t)) {
            txn.unfinished = txn.unfinished.saturating_sub(1);
        }
    }

    /// A job removed before its transaction concluded (early failure) leaves it.
    pub(crate) fn leave_txn(&mut self, t: u64, key: JobKey, job: &Job) {
        if let Some(txn) = self.txns.get_mut(&t) {
            txn.members.retain(|k| *k != key);
            if !job.counted_done {
                txn.unfinished = txn.unfinished.saturating_sub(1);
            }
            if !job.auto_finalize {
                txn.manual = txn.manual.saturating_sub(1);
            }
            self.drop_txn_if_unused(t);
        }
    }

    /// Every member has concluded: the transaction is empty again.
    fn close_txn(&mut self, t: u64) {
        if let Some(txn) = self.txns.get_mut(&t) {
            txn.members.clear();
            txn.unfinished = 0;
            txn.manual = 0;
            txn.aborting = false;
            txn.finalizing = false;
        }
        self.drop_txn_if_unused(t);
    }

    pub(crate) fn drop_txn_if_unused(&mut self, t: u64) {
        if self
            .txns
            .get(&t)
            .is_some_and(|txn| txn.members.is_empty() && txn.handles == 0)
        {
            self.txns.remove(&t);
        }
    }
}

impl Inner {
    /// Runs one driver hook without the lock held (hooks may drain, i.e. pause other jobs).
    fn call_hook<'a, R>(
        &'a self,
        mut g: Guard<'a>,
        key: JobKey,
        hook: impl FnOnce(&mut dyn JobDriver) -> R,
    ) -> (Guard<'a>, Option<R>) {
        let Some(mut driver) = g.jobs.get_mut(&key).and_then(|j| j.driver.take()) else {
            return (g, None);
        };
        drop(g);
        let r = hook(driver.as_mut());
        let mut g = self.lock();
        if let Some(job) = g.jobs.get_mut(&key) {
            job.driver = Some(driver);
        }
        (g, Some(r))
    }

    /// The job's task ends: its work returned `result`.
    pub(crate) fn job_finished(
        &self,
        key: JobKey,
        driver: Box<dyn JobDriver>,
        result: Result<(), JobFailure>,
    ) {
        let mut g = self.lock();
        let Some(job) = g.jobs.get_mut(&key) else {
            return;
        };
        job.driver = Some(driver);
        job.waker = None;
        if let Err(failure) = result
            && job.ret.is_none()
        {
            job.ret = Some(failure.message().to_string());
        }
        tracing::debug!(
            job = job.label(),
            error = job.ret.as_deref(),
            "job work returned"
        );
        if is_completed(job.status) {
            g.work_done(key);
            self.notify_quiescent();
            return;
        }
        drop(self.job_completed(g, key));
    }

    /// Step 1, QEMU's `job_completed`: ABORTING and transaction abort, or WAITING and, with
    /// every member done, PENDING and maybe finalize.
    pub(crate) fn job_completed<'a>(&'a self, mut g: Guard<'a>, key: JobKey) -> Guard<'a> {
        let Some(job) = g.jobs.get(&key) else {
            return g;
        };
        let parked = job.activity;
        g.work_done(key);
        self.notify_quiescent();
        if let Activity::Parked { resume_to } = parked {
            // Only if a driver returned from under a pause point it dropped.
            g.set_status(key, resume_to);
        }
        let Some(job) = g.jobs.get(&key) else {
            return g;
        };
        let aborting = job
            .txn
            .and_then(|t| g.txns.get(&t))
            .is_some_and(|t| t.aborting);
        if aborting && let Some(job) = g.jobs.get_mut(&key) {
            job.cancelled = true;
            job.force_cancel = true;
        }
        g.update_rc(key);
        g.count_done(key);
        let failed = g.jobs.get(&key).is_some_and(|j| j.ret.is_some());
        if failed {
            return self.abort(g, key);
        }
        g.set_status(key, BlockJobStatus::Waiting);
        let Some(t) = g.jobs.get(&key).and_then(|j| j.txn) else {
            return g;
        };
        let Some(txn) = g.txns.get(&t) else {
            return g;
        };
        if txn.unfinished > 0 {
            return g;
        }
        let manual = txn.manual;
        for m in g.members_newest_first(t) {
            g.set_status(m, BlockJobStatus::Pending);
            if let Some(job) = g.jobs.get(&m)
                && !job.auto_finalize
                && let Some(id) = job.block_events()
            {
                let event =
                    Event::BlockJobPending(BlockJobPendingData::new(job.job_type, id.to_string()));
                g.emit(event);
            }
        }
        if manual == 0 {
            g = self.finalize(g, t);
        }
        g
    }

    /// Step 2: `prepare` every member (a failure aborts the transaction); then commit, clean
    /// and conclude each, newest first.
    pub(crate) fn finalize<'a>(&'a self, mut g: Guard<'a>, t: u64) -> Guard<'a> {
        let Some(txn) = g.txns.get_mut(&t) else {
            return g;
        };
        if txn.finalizing || txn.aborting {
            return g;
        }
        txn.finalizing = true;
        let members = g.members_newest_first(t);
        tracing::debug!(members = members.len(), "job transaction finalize");
        for &m in &members {
            if g.jobs.get(&m).is_none_or(|j| j.ret.is_some()) {
                continue;
            }
            let (g2, r) = self.call_hook(g, m, |d| d.prepare());
            g = g2;
            if let Some(Err(failure)) = r {
                if let Some(job) = g.jobs.get_mut(&m) {
                    job.ret = Some(failure.message().to_string());
                }
                g.update_rc(m);
                if let Some(txn) = g.txns.get_mut(&t) {
                    txn.finalizing = false;
                }
                return self.abort(g, m);
            }
        }
        for m in members {
            g = self.conclude(g, m);
        }
        g.close_txn(t);
        g
    }

    /// Step 3, QEMU's `job_completed_txn_abort`: the first failing member force-cancels the
    /// others; once all have stopped, each is aborted, cleaned and concluded, newest first.
    pub(crate) fn abort<'a>(&'a self, mut g: Guard<'a>, key: JobKey) -> Guard<'a> {
        let Some(t) = g.jobs.get(&key).and_then(|j| j.txn) else {
            return g;
        };
        let Some(txn) = g.txns.get_mut(&t) else {
            return g;
        };
        if txn.finalizing && !txn.aborting {
            // A cancel that raced with a running finalize: the member's own finalization
            // sees the cancel and aborts it.
            return g;
        }
        if !txn.aborting {
            txn.aborting = true;
            tracing::debug!(failed = ?key, "job transaction abort");
            for m in g.members_newest_first(t) {
                if m == key {
                    continue;
                }
                g.cancel_async(m, true);
                let Some(job) = g.jobs.get(&m) else { continue };
                if !job.started && job.status == BlockJobStatus::Created {
                    g.work_done(m);
                    g.update_rc(m);
                    g.count_done(m);
                } else if !is_completed(job.status) && !held_parked(job) {
                    g.enter(m);
                }
            }
        }
        let Some(txn) = g.txns.get_mut(&t) else {
            return g;
        };
        if !txn.aborting || txn.finalizing {
            return g;
        }
        if txn.unfinished > 0 {
            if txn.concluding_some {
                return g;
            }
            // The others conclude the abort when the last of them stops. Members held
            // paused by a drain (daemon shutdown) were not entered: QEMU's abort reaches
            // them one at a time (`job_finish_sync`), newest first, after concluding the
            // stopped members before them, and only then does each leave its pause.
            g = self.conclude_up_to_held(g, t);
            let Some(txn) = g.txns.get_mut(&t) else {
                return g;
            };
            if txn.finalizing || txn.unfinished > 0 {
                return g;
            }
        }
        let Some(txn) = g.txns.get_mut(&t) else {
            return g;
        };
        txn.finalizing = true;
        for m in g.unconcluded_newest_first(t) {
            g = self.conclude(g, m);
        }
        g.close_txn(t);
        g
    }

    /// The part of an abort that waits on members held paused: if every member still to
    /// stop is held (none is on its way), concludes the stopped members newest first up to
    /// the first held one, and enters that one.
    fn conclude_up_to_held<'a>(&'a self, mut g: Guard<'a>, t: u64) -> Guard<'a> {
        loop {
            let members = g.unconcluded_newest_first(t);
            let on_its_way = members.iter().any(|m| {
                g.jobs
                    .get(m)
                    .is_some_and(|j| j.activity != Activity::Finished && !held_parked(j))
            });
            let unfinished = g.txns.get(&t).map_or(0, |txn| txn.unfinished);
            let Some(&newest) = members.first() else {
                return g;
            };
            if on_its_way || unfinished == 0 {
                return g;
            }
            if g.jobs.get(&newest).is_some_and(held_parked) {
                g.enter(newest);
                return g;
            }
            if let Some(txn) = g.txns.get_mut(&t) {
                txn.concluding_some = true;
            }
            g = self.conclude(g, newest);
            if let Some(txn) = g.txns.get_mut(&t) {
                txn.concluding_some = false;
            }
            if g.unconcluded_newest_first(t).first() == Some(&newest) {
                // Not taken out of the transaction: do not loop on it.
                return g;
            }
        }
    }

    /// QEMU's `job_finalize_single`: commit xor abort, clean, the completion event, CONCLUDED,
    /// and NULL when auto-dismiss or never started.
    fn conclude<'a>(&'a self, mut g: Guard<'a>, key: JobKey) -> Guard<'a> {
        if !g.jobs.contains_key(&key) {
            return g;
        }
        g.update_rc(key);
        let ok = g.jobs.get(&key).is_some_and(|j| j.ret.is_none());
        let (g2, _) = self.call_hook(g, key, |d| if ok { d.commit() } else { d.abort() });
        let (g3, _) = self.call_hook(g2, key, |d| d.clean());
        g = g3;
        let Some(job) = g.jobs.get_mut(&key) else {
            return g;
        };
        job.txn = None;
        let started = job.started;
        let dismiss = job.auto_dismiss || !started;
        let event = match job.block_events() {
            Some(id) if started => Some(if job.is_cancelled() {
                job.cancelled_event(id)
            } else {
                job.completed_event(id)
            }),
            _ => None,
        };
        if let Some(event) = event {
            g.emit(event);
        }
        g.set_status(key, BlockJobStatus::Concluded);
        g.wake_conclude_waiters(key);
        if dismiss {
            g.dismiss(key);
        }
        self.notify_quiescent();
        g
    }

    /// QEMU's `job_cancel`.
    pub(crate) fn job_cancel<'a>(
        &'a self,
        mut g: Guard<'a>,
        key: JobKey,
        force: bool,
    ) -> Guard<'a> {
        let Some(job) = g.jobs.get(&key) else {
            return g;
        };
        if job.status == BlockJobStatus::Concluded {
            g.dismiss(key);
            self.notify_quiescent();
            return g;
        }
        if is_completed(job.status) && !job.started {
            return g;
        }
        g.cancel_async(key, force);
        let Some(job) = g.jobs.get(&key) else {
            return g;
        };
        if !job.started {
            self.job_completed(g, key)
        } else if job.activity == Activity::Finished {
            if job.is_cancelled() {
                self.abort(g, key)
            } else {
                g
            }
        } else {
            g.enter(key);
            g
        }
    }
}

/// A cancelled member parked at a pause point that a drain still holds (QEMU: paused, not
/// re-entered by `job_cancel_async`).
fn held_parked(job: &Job) -> bool {
    matches!(job.activity, Activity::Parked { .. }) && job.pause_count > 0
}

/// A job transaction: jobs created in it succeed or fail together. Cloning the handle keeps
/// the same transaction; it is freed when no handle and no member remain.
pub struct JobTxn {
    pub(crate) inner: Arc<Inner>,
    pub(crate) key: u64,
}

impl Clone for JobTxn {
    fn clone(&self) -> Self {
        if let Some(txn) = self.inner.lock().txns.get_mut(&self.key) {
            txn.handles += 1;
        }
        JobTxn {
            inner: self.inner.clone(),
            key: self.key,
        }
    }
}

impl Drop for JobTxn {
    fn drop(&mut self) {
        let mut g = self.inner.lock();
        if let Some(txn) = g.txns.get_mut(&self.key) {
            txn.handles = txn.handles.saturating_sub(1);
        }
        g.drop_txn_if_unused(self.key);
    }
}

impl std::fmt::Debug for JobTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTxn").field("key", &self.key).finish()
    }
}
