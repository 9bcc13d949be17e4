//! Job lifecycles and transactions, event by event, against SPEC.md §3–4 and the QSD transcripts
//! (scenario names in the test names' comments).

mod common;

use std::time::Duration;

use common::{Harness, Step, seq};
use job::{BlockJobStatus, JobError, JobFailure, JobRef, JobSpec};
use qmp_api::ErrorClass;
use qmp_api::{BlockDeviceIoStatus, BlockdevOnError};

const EIO: &str = "Input/output error";

fn eio() -> Result<(), JobFailure> {
    Err(JobFailure::new(EIO))
}

/// Hook calls without the `run` entries.
fn finalize_hooks(h: &Harness) -> Vec<String> {
    h.hooks()
        .into_iter()
        .filter(|x| !x.ends_with(" run"))
        .collect()
}

// ----- single jobs -----

#[test]
fn a_job_started_inside_a_drained_section_shows_running_paused_running() {
    // s01: blockdev-backup creates the job with its node drained, starts it, ends the drain.
    let mut h = Harness::new();
    let j = h.create(JobSpec::new("j1"), None);
    h.reg.pause(j).unwrap();
    h.reg.start(j).unwrap();
    h.reg.resume(j).unwrap();
    assert_eq!(
        h.events(),
        seq("j1 created, j1 running, j1 paused, j1 running")
    );
    h.run();
    assert_eq!(h.status("j1"), Some(BlockJobStatus::Running));
    assert_eq!(h.hooks(), seq("j1 run"));
}

#[test]
fn a_job_that_succeeds_auto_finalizes_and_disappears() {
    // s01 after the reply.
    let mut h = Harness::new();
    h.running(JobSpec::new("j1"));
    h.events();
    h.finish("j1", Ok(()));
    assert_eq!(
        h.events(),
        seq("j1 waiting, j1 pending, COMPLETED j1, j1 concluded, j1 null")
    );
    assert_eq!(finalize_hooks(&h), seq("j1 prepare, j1 commit, j1 clean"));
    assert!(h.reg.query_jobs().is_empty());
    assert!(h.reg.query_block_jobs().is_empty());
}

#[test]
fn a_job_that_fails_aborts_with_its_error_in_block_job_completed() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j1"));
    h.events();
    h.push("j1", Step::IoError);
    h.finish("j1", eio());
    assert_eq!(
        h.events(),
        seq(
            "ERROR j1 write report, j1 aborting, COMPLETED j1 error=Input/output error, \
             j1 concluded, j1 null"
        )
    );
    assert_eq!(finalize_hooks(&h), seq("j1 abort, j1 clean"));
}

#[test]
fn auto_finalize_off_parks_in_pending_until_finalize_and_auto_dismiss_off_until_dismiss() {
    // s02
    let mut h = Harness::new();
    h.running(JobSpec::new("j1").auto_finalize(false).auto_dismiss(false));
    h.events();
    h.push("j1", Step::Work(4 << 20));
    h.finish("j1", Ok(()));
    assert_eq!(h.events(), seq("j1 waiting, j1 pending, PENDING j1"));
    let jobs = h.reg.query_jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].status, BlockJobStatus::Pending);
    assert_eq!(
        (jobs[0].current_progress, jobs[0].total_progress),
        (4 << 20, 4 << 20)
    );
    let bj = &h.reg.query_block_jobs()[0];
    assert!(!bj.busy && !bj.paused && !bj.ready && !bj.auto_finalize && !bj.auto_dismiss);
    assert_eq!(
        (bj.len, bj.offset, bj.io_status),
        (4 << 20, 4 << 20, BlockDeviceIoStatus::Ok)
    );

    h.reg.finalize(JobRef::BlockJob("j1")).unwrap();
    assert_eq!(h.events(), seq("COMPLETED j1, j1 concluded"));
    assert_eq!(finalize_hooks(&h), seq("j1 prepare, j1 commit, j1 clean"));
    assert_eq!(h.reg.query_jobs()[0].status, BlockJobStatus::Concluded);

    h.reg.dismiss(JobRef::BlockJob("j1")).unwrap();
    assert_eq!(h.events(), seq("j1 null"));
    assert!(h.reg.query_jobs().is_empty());
}

#[test]
fn auto_dismiss_off_alone_concludes_and_a_dismissed_job_is_unknown() {
    // s03
    let mut h = Harness::new();
    h.running(JobSpec::new("j1").auto_dismiss(false));
    h.events();
    h.finish("j1", Ok(()));
    assert_eq!(
        h.events(),
        seq("j1 waiting, j1 pending, COMPLETED j1, j1 concluded")
    );
    h.reg.dismiss(JobRef::BlockJob("j1")).unwrap();
    assert_eq!(h.events(), seq("j1 null"));
    let e = h.reg.dismiss(JobRef::BlockJob("j1")).unwrap_err();
    assert_eq!(
        (e.class, e.desc.as_str()),
        (ErrorClass::DeviceNotActive, "Block job 'j1' not found")
    );
    let e = h.reg.dismiss(JobRef::Job("j1")).unwrap_err();
    assert_eq!(
        (e.class, e.desc.as_str()),
        (ErrorClass::GenericError, "Job not found")
    );
}

#[test]
fn verbs_in_running_and_paused_are_refused_as_qsd_refuses_them() {
    // s09
    let mut h = Harness::new();
    h.running(
        JobSpec::new("j1")
            .speed(1 << 20)
            .auto_finalize(false)
            .auto_dismiss(false),
    );
    h.events();
    let b = JobRef::BlockJob("j1");
    let g = JobRef::Job("j1");
    let refused = |r: Result<(), qmp_api::QmpError>| r.unwrap_err().desc;
    let verb_err = |state: &str, verb: &str| {
        format!("Job 'j1' in state '{state}' cannot accept command verb '{verb}'")
    };
    assert_eq!(refused(h.reg.finalize(b)), verb_err("running", "finalize"));
    assert_eq!(refused(h.reg.finalize(g)), verb_err("running", "finalize"));
    assert_eq!(refused(h.reg.dismiss(b)), verb_err("running", "dismiss"));
    assert_eq!(refused(h.reg.complete(g)), verb_err("running", "complete"));
    let not_paused = "Can't resume a job that was not paused";
    assert_eq!(refused(h.reg.resume_job(b)), not_paused);
    assert_eq!(refused(h.reg.resume_job(g)), not_paused);

    h.reg.pause_job(b).unwrap();
    assert_eq!(h.events(), seq("j1 paused"));
    assert_eq!(refused(h.reg.pause_job(b)), "Job is already paused");
    assert_eq!(refused(h.reg.pause_job(g)), "Job is already paused");
    assert_eq!(
        refused(h.reg.cancel(b, false)),
        "The block job for device 'j1' is currently paused"
    );
    assert_eq!(refused(h.reg.finalize(b)), verb_err("paused", "finalize"));
    assert_eq!(refused(h.reg.dismiss(b)), verb_err("paused", "dismiss"));
    assert_eq!(refused(h.reg.complete(b)), verb_err("paused", "complete"));
    let bj = &h.reg.query_block_jobs()[0];
    assert!(bj.paused);
    assert_eq!((bj.status, bj.speed), (BlockJobStatus::Paused, 1 << 20));

    h.reg.resume_job(b).unwrap();
    assert_eq!(h.events(), seq("j1 running"));
    h.reg.set_speed(b, 0).unwrap();
    h.finish("j1", Ok(()));
    assert_eq!(h.events(), seq("j1 waiting, j1 pending, PENDING j1"));
    h.reg.finalize(b).unwrap();
    h.reg.dismiss(b).unwrap();
    assert_eq!(h.events(), seq("COMPLETED j1, j1 concluded, j1 null"));
}

#[test]
fn unknown_ids_are_device_not_active_for_block_job_commands_and_job_not_found_for_job_commands() {
    // s11
    let h = Harness::new();
    let b = JobRef::BlockJob("nope");
    let results = [
        h.reg.cancel(b, false),
        h.reg.pause_job(b),
        h.reg.resume_job(b),
        h.reg.complete(b),
        h.reg.set_speed(b, 0),
        h.reg.finalize(b),
        h.reg.dismiss(b),
        h.reg.check_verb(b, job::BlockJobVerb::Change).map(|_| ()),
    ];
    for r in results {
        let e = r.unwrap_err();
        assert_eq!(e.class, ErrorClass::DeviceNotActive);
        assert_eq!(e.desc, "Block job 'nope' not found");
    }
    let g = JobRef::Job("nope");
    let results = [
        h.reg.cancel(g, true),
        h.reg.pause_job(g),
        h.reg.resume_job(g),
        h.reg.complete(g),
        h.reg.finalize(g),
        h.reg.dismiss(g),
    ];
    for r in results {
        let e = r.unwrap_err();
        assert_eq!(
            (e.class, e.desc.as_str()),
            (ErrorClass::GenericError, "Job not found")
        );
    }
}

#[test]
fn job_ids_must_be_well_formed_and_unique() {
    // s11
    let mut h = Harness::new();
    for bad in ["1bad", "", "a b", "a/b", "é"] {
        let err = h
            .reg
            .create(JobSpec::new(bad), |_| Box::new(NoWork), None)
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::GenericError);
        assert_eq!(err.desc, format!("Invalid job ID '{bad}'"));
    }
    for good in ["a", "j1", "A-b.c_d9"] {
        assert!(job::id_wellformed(good), "{good}");
    }
    h.running(JobSpec::new("j1"));
    let err = h
        .reg
        .create(JobSpec::new("j1"), |_| Box::new(NoWork), None)
        .unwrap_err();
    assert_eq!(err.desc, "Job ID 'j1' already in use");
}

struct NoWork;

impl job::JobDriver for NoWork {
    fn job_type(&self) -> qmp_api::JobType {
        qmp_api::JobType::Backup
    }
    fn run<'a>(
        &'a mut self,
        _ctx: &'a job::JobContext,
    ) -> job::BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn force_cancel_of_a_user_paused_job_resumes_it_first() {
    // s11
    let mut h = Harness::new();
    h.running(JobSpec::new("j1").speed(1 << 20));
    h.reg.pause_job(JobRef::BlockJob("j1")).unwrap();
    h.events();
    h.reg.cancel(JobRef::BlockJob("j1"), true).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("j1 running, j1 aborting, CANCELLED j1, j1 concluded, j1 null")
    );
    assert_eq!(finalize_hooks(&h), seq("j1 abort, j1 clean"));
}

#[test]
fn cancel_of_a_running_job_concludes_it_with_operation_canceled() {
    // s21, s22
    let mut h = Harness::new();
    h.running(JobSpec::new("j2").auto_dismiss(false));
    h.events();
    h.reg.cancel(JobRef::Job("j2"), true).unwrap();
    assert!(h.events().is_empty(), "the job stops asynchronously");
    h.run();
    assert_eq!(h.events(), seq("j2 aborting, CANCELLED j2, j2 concluded"));
    let info = &h.reg.query_jobs()[0];
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    h.reg.dismiss(JobRef::Job("j2")).unwrap();
    assert_eq!(h.events(), seq("j2 null"));
}

#[test]
fn a_never_started_job_cancelled_by_a_transaction_rollback_emits_no_block_job_event() {
    // s12
    let mut h = Harness::new();
    let j = h.create(JobSpec::new("j1"), None);
    h.reg.pause(j).unwrap();
    h.reg.cancel_job(j, true).unwrap();
    assert_eq!(
        h.events(),
        seq("j1 created, j1 aborting, j1 concluded, j1 null")
    );
    assert_eq!(h.hooks(), seq("j1 abort, j1 clean"));
    assert_eq!(h.reg.resume(j), Err(JobError::Gone));
}

#[test]
fn a_negative_initial_speed_creates_and_drops_the_job_with_qemus_error() {
    // Recorded from QSD: blockdev-backup speed=-1.
    let h = Harness::new();
    let e = h
        .reg
        .create(JobSpec::new("j1").speed(-1), |_| Box::new(NoWork), None)
        .unwrap_err();
    assert_eq!(e.desc, "Parameter 'speed' expects a non-negative value");
    assert_eq!(h.events(), seq("j1 created, j1 null"));
    assert!(h.reg.key_of("j1").is_none());
}

#[test]
fn a_job_that_fails_to_be_set_up_goes_from_created_to_null() {
    let mut h = Harness::new();
    let j = h.create(JobSpec::new("j1"), None);
    h.reg.discard(j).unwrap();
    assert_eq!(h.events(), seq("j1 created, j1 null"));
    assert!(h.hooks().is_empty());
    assert!(h.reg.key_of("j1").is_none());
}

#[test]
fn internal_jobs_emit_nothing_and_are_not_listed() {
    let mut h = Harness::new();
    let k = h.running(JobSpec::internal());
    h.push("internal", Step::IoError);
    h.finish("internal", eio());
    assert!(h.events().is_empty());
    assert!(h.reg.query_jobs().is_empty());
    assert!(h.reg.status(k).is_none());
    assert_eq!(finalize_hooks(&h), seq("internal abort, internal clean"));
}

// ----- READY, STANDBY, complete -----

fn ready_mirror(h: &mut Harness, id: &str) {
    let k = h.create_mirror(JobSpec::new(id));
    h.reg.start(k).unwrap();
    h.push(id, Step::Work(4 << 20));
    h.push(id, Step::Ready);
    h.run();
}

#[test]
fn a_mirror_goes_ready_and_pauses_to_standby() {
    // s22
    let mut h = Harness::new();
    ready_mirror(&mut h, "jm");
    assert_eq!(
        h.events(),
        seq("jm created, jm running, jm ready, READY jm")
    );
    let bj = &h.reg.query_block_jobs()[0];
    assert!(bj.ready);
    h.reg.pause_job(JobRef::BlockJob("jm")).unwrap();
    assert_eq!(h.events(), seq("jm standby"));
    h.reg.resume_job(JobRef::BlockJob("jm")).unwrap();
    assert_eq!(h.events(), seq("jm ready"));
}

#[test]
fn soft_cancel_of_a_ready_mirror_completes_it_normally() {
    // s22
    let mut h = Harness::new();
    ready_mirror(&mut h, "jm");
    h.events();
    h.reg.cancel(JobRef::BlockJob("jm"), false).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("jm waiting, jm pending, COMPLETED jm, jm concluded, jm null")
    );
    assert_eq!(finalize_hooks(&h), seq("jm prepare, jm commit, jm clean"));
}

#[test]
fn forced_cancel_of_a_ready_mirror_is_cancelled() {
    // s22
    let mut h = Harness::new();
    ready_mirror(&mut h, "jm2");
    h.events();
    h.reg.cancel(JobRef::BlockJob("jm2"), true).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("jm2 aborting, CANCELLED jm2, jm2 concluded, jm2 null")
    );
}

#[test]
fn complete_of_a_ready_mirror_finishes_it() {
    let mut h = Harness::new();
    ready_mirror(&mut h, "jm");
    h.events();
    h.reg.complete(JobRef::Job("jm")).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("jm waiting, jm pending, COMPLETED jm, jm concluded, jm null")
    );
}

#[test]
fn complete_in_standby_is_accepted_and_takes_effect_after_resume() {
    let mut h = Harness::new();
    ready_mirror(&mut h, "jm");
    h.reg.pause_job(JobRef::Job("jm")).unwrap();
    h.events();
    h.reg.complete(JobRef::Job("jm")).unwrap();
    h.run();
    assert!(h.events().is_empty());
    h.reg.resume_job(JobRef::Job("jm")).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("jm ready, jm waiting, jm pending, COMPLETED jm, jm concluded, jm null")
    );
}

#[test]
fn complete_after_a_soft_cancel_is_refused() {
    let mut h = Harness::new();
    ready_mirror(&mut h, "jm");
    // The soft cancel is recorded; the job has not run since.
    h.reg.cancel(JobRef::BlockJob("jm"), false).unwrap();
    assert_eq!(h.status("jm"), Some(BlockJobStatus::Ready));
    let e = h.reg.complete(JobRef::Job("jm")).unwrap_err();
    assert_eq!(e.desc, "The active block job 'jm' cannot be completed");
}

#[test]
fn complete_of_a_ready_job_without_complete_support_is_refused() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j"));
    h.push("j", Step::Ready);
    h.run();
    assert_eq!(h.status("j"), Some(BlockJobStatus::Ready));
    let e = h.reg.complete(JobRef::BlockJob("j")).unwrap_err();
    assert_eq!(e.desc, "The active block job 'j' cannot be completed");
}

// ----- pause, rate limit, errors -----

#[test]
fn pause_of_a_job_sleeping_in_a_rate_limit_delay_pauses_it_at_once() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j").speed(1000));
    h.push("j", Step::Work(1000));
    h.run();
    assert_eq!(h.clock.next_deadline(), Some(Duration::from_secs(1)));
    h.events();
    h.reg.pause_job(JobRef::Job("j")).unwrap();
    assert_eq!(h.events(), seq("j paused"));
    // Time passing does not resume it.
    h.clock.advance(Duration::from_secs(5));
    h.run();
    assert_eq!(h.status("j"), Some(BlockJobStatus::Paused));
    h.reg.resume_job(JobRef::Job("j")).unwrap();
    assert_eq!(h.events(), seq("j running"));
}

#[test]
fn a_rate_limited_job_waits_for_the_clock() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j").speed(1000));
    h.push("j", Step::Work(1000));
    h.push("j", Step::Finish(Ok(())));
    h.run();
    assert_eq!(h.status("j"), Some(BlockJobStatus::Running));
    h.clock.advance(Duration::from_millis(999));
    h.run();
    assert_eq!(h.status("j"), Some(BlockJobStatus::Running));
    h.clock.advance(Duration::from_millis(1));
    h.run();
    assert_eq!(h.status("j"), None);
}

#[test]
fn raising_the_speed_wakes_a_job_sleeping_in_a_rate_limit_delay() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j").speed(1000));
    h.push("j", Step::Work(1000));
    h.push("j", Step::Finish(Ok(())));
    h.run();
    h.reg.set_speed(JobRef::BlockJob("j"), 500).unwrap();
    h.run();
    assert_eq!(
        h.status("j"),
        Some(BlockJobStatus::Running),
        "slower: keeps sleeping"
    );
    h.reg.set_speed(JobRef::BlockJob("j"), 0).unwrap();
    h.run();
    assert_eq!(h.status("j"), None);
}

#[test]
fn negative_speed_is_refused_after_the_verb_check() {
    // s20
    let mut h = Harness::new();
    h.running(JobSpec::new("j"));
    let e = h.reg.set_speed(JobRef::BlockJob("j"), -1).unwrap_err();
    assert_eq!(e.desc, "Parameter 'speed' expects a non-negative value");
    h.reg.set_speed(JobRef::BlockJob("j"), 2 << 20).unwrap();
    assert_eq!(h.reg.query_block_jobs()[0].speed, 2 << 20);
}

#[test]
fn cancel_wakes_a_job_sleeping_in_a_rate_limit_delay() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j").speed(1000));
    h.push("j", Step::Work(1000));
    h.run();
    h.events();
    h.reg.cancel(JobRef::Job("j"), true).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("j aborting, CANCELLED j, j concluded, j null")
    );
    assert_eq!(h.clock.next_deadline(), None, "the delay timer is gone");
}

#[test]
fn an_io_error_with_policy_stop_pauses_the_job_until_resumed() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j").on_error(None, Some(BlockdevOnError::Stop)));
    h.events();
    h.push("j", Step::IoError);
    h.run();
    assert_eq!(h.events(), seq("ERROR j write stop, j paused"));
    let bj = &h.reg.query_block_jobs()[0];
    assert_eq!(
        (bj.io_status, bj.paused),
        (BlockDeviceIoStatus::Failed, true)
    );
    h.reg.resume_job(JobRef::BlockJob("j")).unwrap();
    assert_eq!(h.events(), seq("j running"));
    assert_eq!(
        h.reg.query_block_jobs()[0].io_status,
        BlockDeviceIoStatus::Ok
    );
}

#[test]
fn internal_pauses_nest_and_only_the_last_resume_restarts_the_job() {
    let mut h = Harness::new();
    let j = h.running(JobSpec::new("j"));
    h.events();
    h.reg.pause(j).unwrap();
    h.reg.pause(j).unwrap();
    assert_eq!(h.events(), seq("j paused"));
    h.reg.resume(j).unwrap();
    assert!(h.events().is_empty());
    h.reg.resume(j).unwrap();
    assert_eq!(h.events(), seq("j running"));
    assert_eq!(h.reg.resume(j), Err(JobError::NotPaused));
}

#[test]
fn a_user_pause_and_a_drain_both_hold_the_job() {
    let mut h = Harness::new();
    let j = h.running(JobSpec::new("j"));
    h.reg.pause_job(JobRef::Job("j")).unwrap();
    h.reg.pause(j).unwrap();
    h.events();
    h.reg.resume_job(JobRef::Job("j")).unwrap();
    assert!(h.events().is_empty(), "still drained");
    h.reg.resume(j).unwrap();
    assert_eq!(h.events(), seq("j running"));
}

// ----- transactions -----

/// s04's transaction: ja, jb created at prepare (drained), started at commit and released at
/// clean, both in reverse order.
fn grouped_pair(h: &mut Harness, spec_a: JobSpec, spec_b: JobSpec) {
    let txn = h.reg.new_txn();
    let ja = h.create(spec_a, Some(&txn));
    h.reg.pause(ja).unwrap();
    let jb = h.create(spec_b, Some(&txn));
    h.reg.pause(jb).unwrap();
    h.reg.start(jb).unwrap();
    h.reg.start(ja).unwrap();
    h.reg.resume(jb).unwrap();
    h.reg.resume(ja).unwrap();
    drop(txn);
    h.run();
}

#[test]
fn grouped_pair_with_manual_finalize_goes_pending_together_and_finalizes_through_one_id() {
    // s04
    let mut h = Harness::new();
    let manual = |id: &str| JobSpec::new(id).auto_finalize(false).auto_dismiss(false);
    grouped_pair(&mut h, manual("ja"), manual("jb"));
    assert_eq!(
        h.events(),
        seq(
            "ja created, jb created, jb running, jb paused, ja running, ja paused, \
             jb running, ja running"
        )
    );
    h.finish("ja", Ok(()));
    assert_eq!(h.events(), seq("ja waiting"));
    let ids: Vec<_> = h
        .reg
        .query_jobs()
        .into_iter()
        .map(|j| (j.id, j.status))
        .collect();
    assert_eq!(
        ids,
        [
            ("jb".to_string(), BlockJobStatus::Running),
            ("ja".to_string(), BlockJobStatus::Waiting)
        ]
    );
    assert_eq!(
        h.reg.finalize(JobRef::BlockJob("ja")).unwrap_err().desc,
        "Job 'ja' in state 'waiting' cannot accept command verb 'finalize'"
    );
    assert_eq!(
        h.reg.dismiss(JobRef::BlockJob("ja")).unwrap_err().desc,
        "Job 'ja' in state 'waiting' cannot accept command verb 'dismiss'"
    );
    h.finish("jb", Ok(()));
    assert_eq!(
        h.events(),
        seq("jb waiting, jb pending, PENDING jb, ja pending, PENDING ja")
    );
    h.hooks();
    h.reg.finalize(JobRef::BlockJob("ja")).unwrap();
    assert_eq!(
        h.events(),
        seq("COMPLETED jb, jb concluded, COMPLETED ja, ja concluded")
    );
    assert_eq!(
        h.hooks(),
        seq("jb prepare, ja prepare, jb commit, jb clean, ja commit, ja clean")
    );
    assert_eq!(
        h.reg.finalize(JobRef::BlockJob("jb")).unwrap_err().desc,
        "Job 'jb' in state 'concluded' cannot accept command verb 'finalize'"
    );
    h.reg.dismiss(JobRef::BlockJob("ja")).unwrap();
    h.reg.dismiss(JobRef::BlockJob("jb")).unwrap();
    assert_eq!(h.events(), seq("ja null, jb null"));
    assert!(h.reg.query_jobs().is_empty());
}

#[test]
fn grouped_mixed_auto_finalize_waits_for_a_manual_finalize_which_may_name_the_auto_member() {
    // s08
    let mut h = Harness::new();
    grouped_pair(
        &mut h,
        JobSpec::new("ja").auto_finalize(false),
        JobSpec::new("jb"),
    );
    h.events();
    h.finish("ja", Ok(()));
    assert_eq!(h.events(), seq("ja waiting"));
    h.finish("jb", Ok(()));
    assert_eq!(
        h.events(),
        seq("jb waiting, jb pending, ja pending, PENDING ja")
    );
    h.reg.finalize(JobRef::Job("jb")).unwrap();
    assert_eq!(
        h.events(),
        seq("COMPLETED jb, jb concluded, jb null, COMPLETED ja, ja concluded, ja null")
    );
}

#[test]
fn grouped_auto_finalize_pair_concludes_when_the_last_member_finishes() {
    // s23 with auto-finalize
    let mut h = Harness::new();
    grouped_pair(&mut h, JobSpec::new("jd"), JobSpec::new("jb"));
    h.events();
    h.finish("jd", Ok(()));
    h.finish("jb", Ok(()));
    assert_eq!(
        h.events(),
        seq(
            "jd waiting, jb waiting, jb pending, jd pending, COMPLETED jb, jb concluded, \
             jb null, COMPLETED jd, jd concluded, jd null"
        )
    );
}

#[test]
fn individual_mode_failure_aborts_only_the_failing_job() {
    // s06: no shared transaction. Freeing jb (after its `null`) detaches it from its nodes, a
    // graph change: ja, sleeping, pauses and resumes.
    let mut h = Harness::new();
    let ja = h.create(JobSpec::new("ja"), None);
    let jb = h.create(JobSpec::new("jb"), None);
    h.reg.start(jb).unwrap();
    h.reg.start(ja).unwrap();
    h.run();
    h.events();
    h.push("jb", Step::IoError);
    h.finish("jb", eio());
    assert_eq!(
        h.events(),
        seq(
            "ERROR jb write report, jb aborting, COMPLETED jb error=Input/output error, \
             jb concluded, jb null, ja paused, ja running"
        )
    );
    assert_eq!(h.status("ja"), Some(BlockJobStatus::Running));
    h.finish("ja", Ok(()));
    assert_eq!(
        h.events(),
        seq("ja waiting, ja pending, COMPLETED ja, ja concluded, ja null")
    );
}

#[test]
fn grouped_failure_of_the_newest_member_cancels_the_other() {
    // SPEC §4.3, recorded from QSD: jb fails, ja is cancelled.
    let mut h = Harness::new();
    grouped_pair(&mut h, JobSpec::new("ja"), JobSpec::new("jb"));
    h.events();
    h.hooks();
    h.push("jb", Step::IoError);
    h.finish("jb", eio());
    assert_eq!(
        h.events(),
        seq("ERROR jb write report, jb aborting, ja aborting, \
             COMPLETED jb error=Input/output error, jb concluded, jb null, \
             CANCELLED ja, ja concluded, ja null")
    );
    assert_eq!(
        finalize_hooks(&h),
        seq("jb abort, jb clean, ja abort, ja clean")
    );
}

#[test]
fn grouped_failure_of_the_oldest_member_finalizes_newest_first() {
    // Recorded from QSD: ja (oldest) fails.
    let mut h = Harness::new();
    grouped_pair(&mut h, JobSpec::new("ja"), JobSpec::new("jb"));
    h.events();
    h.push("ja", Step::IoError);
    h.finish("ja", eio());
    assert_eq!(
        h.events(),
        seq(
            "ERROR ja write report, ja aborting, jb aborting, CANCELLED jb, jb concluded, \
             jb null, COMPLETED ja error=Input/output error, ja concluded, ja null"
        )
    );
}

fn grouped_triple(h: &mut Harness) {
    let txn = h.reg.new_txn();
    let keys: Vec<_> = ["ja", "jb", "jc"]
        .iter()
        .map(|id| {
            let k = h.create(JobSpec::new(*id), Some(&txn));
            h.reg.pause(k).unwrap();
            k
        })
        .collect();
    for &k in keys.iter().rev() {
        h.reg.start(k).unwrap();
    }
    for &k in keys.iter().rev() {
        h.reg.resume(k).unwrap();
    }
    h.run();
}

#[test]
fn grouped_failure_of_the_middle_of_three_waits_for_all_then_finalizes_newest_first() {
    // Recorded from QSD: jb fails; jc and ja stop, then jc, jb, ja conclude in list order.
    let mut h = Harness::new();
    grouped_triple(&mut h);
    h.events();
    h.push("jb", Step::IoError);
    h.finish("jb", eio());
    assert_eq!(
        h.events(),
        seq(
            "ERROR jb write report, jb aborting, jc aborting, ja aborting, \
             CANCELLED jc, jc concluded, jc null, \
             COMPLETED jb error=Input/output error, jb concluded, jb null, \
             CANCELLED ja, ja concluded, ja null"
        )
    );
}

#[test]
fn a_failed_member_stays_aborting_until_a_slow_member_stops() {
    let mut h = Harness::new();
    grouped_pair(&mut h, JobSpec::new("ja"), JobSpec::new("jb"));
    h.push("ja", Step::Block);
    h.run();
    h.events();
    h.finish("jb", eio());
    assert_eq!(h.events(), seq("jb aborting"));
    assert_eq!(h.status("jb"), Some(BlockJobStatus::Aborting));
    h.open_gate("ja");
    h.run();
    assert_eq!(
        h.events(),
        seq(
            "ja aborting, COMPLETED jb error=Input/output error, jb concluded, jb null, \
             CANCELLED ja, ja concluded, ja null"
        )
    );
}

#[test]
fn cancel_in_pending_aborts_the_whole_transaction_before_returning() {
    // Recorded from QSD (job-cancel of jb while both PENDING).
    let mut h = Harness::new();
    let manual = |id: &str| JobSpec::new(id).auto_finalize(false);
    grouped_pair(&mut h, manual("ja"), manual("jb"));
    h.finish("jb", Ok(()));
    h.finish("ja", Ok(()));
    h.events();
    h.hooks();
    h.reg.cancel(JobRef::Job("jb"), true).unwrap();
    assert_eq!(
        h.events(),
        seq("jb aborting, CANCELLED jb, jb concluded, jb null, \
             ja aborting, CANCELLED ja, ja concluded, ja null")
    );
    assert_eq!(h.hooks(), seq("jb abort, jb clean, ja abort, ja clean"));
}

#[test]
fn cancel_in_waiting_stops_the_running_members_then_aborts_everything() {
    // Recorded from QSD (job-cancel of ja in WAITING while jb runs).
    let mut h = Harness::new();
    grouped_pair(
        &mut h,
        JobSpec::new("ja").auto_finalize(false),
        JobSpec::new("jb"),
    );
    h.finish("ja", Ok(()));
    h.events();
    h.reg.cancel(JobRef::Job("ja"), true).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("jb aborting, CANCELLED jb, jb concluded, jb null, \
             ja aborting, CANCELLED ja, ja concluded, ja null")
    );
}

#[test]
fn a_prepare_failure_aborts_the_transaction_and_no_member_commits() {
    let mut h = Harness::new();
    let manual = |id: &str| JobSpec::new(id).auto_finalize(false);
    grouped_pair(&mut h, manual("ja"), manual("jb"));
    h.fail_prepare("ja", "prepare refused");
    h.finish("ja", Ok(()));
    h.finish("jb", Ok(()));
    h.events();
    h.hooks();
    h.reg.finalize(JobRef::Job("jb")).unwrap();
    assert_eq!(
        h.hooks(),
        seq("jb prepare, ja prepare, jb abort, jb clean, ja abort, ja clean")
    );
    assert_eq!(
        h.events(),
        seq(
            "ja aborting, jb aborting, CANCELLED jb, jb concluded, jb null, \
             COMPLETED ja error=prepare refused, ja concluded, ja null"
        )
    );
}

#[test]
fn rollback_of_a_grouped_transaction_with_two_unstarted_jobs_concludes_both() {
    // QSD 10.0.2 hangs here; we conclude both at once.
    let mut h = Harness::new();
    let txn = h.reg.new_txn();
    let ja = h.create(JobSpec::new("ja"), Some(&txn));
    h.reg.pause(ja).unwrap();
    let jb = h.create(JobSpec::new("jb"), Some(&txn));
    h.reg.pause(jb).unwrap();
    h.events();
    // Action aborts in reverse order.
    h.reg.cancel_job(jb, true).unwrap();
    assert_eq!(h.reg.cancel_job(ja, true), Err(JobError::Gone));
    drop(txn);
    assert_eq!(
        h.events(),
        seq("jb aborting, ja aborting, jb concluded, jb null, ja concluded, ja null")
    );
    assert_eq!(h.hooks(), seq("jb abort, jb clean, ja abort, ja clean"));
}

#[test]
fn finalize_of_a_transaction_returns_with_every_member_concluded() {
    let mut h = Harness::new();
    let txn = h.reg.new_txn();
    for id in ["a", "b", "c"] {
        let k = h.create(
            JobSpec::new(id).auto_finalize(false).auto_dismiss(false),
            Some(&txn),
        );
        h.reg.start(k).unwrap();
    }
    h.run();
    for id in ["a", "b", "c"] {
        h.finish(id, Ok(()));
    }
    h.reg.finalize(JobRef::Job("b")).unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(h.status(id), Some(BlockJobStatus::Concluded));
    }
}

#[test]
fn concluded_future_completes_when_the_job_concludes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut h = Harness::new();
    let k = h.running(JobSpec::new("j").auto_dismiss(false));
    let done = Arc::new(AtomicBool::new(false));
    let fut = h.reg.concluded(k);
    let flag = done.clone();
    job::Spawn::spawn(
        &h.exec,
        Box::pin(async move {
            fut.await;
            flag.store(true, Ordering::SeqCst);
        }),
    );
    h.run();
    assert!(!done.load(Ordering::SeqCst));
    h.finish("j", Ok(()));
    assert!(done.load(Ordering::SeqCst));
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn jobs_run_on_tokio() {
    use std::sync::Arc;
    let reg = job::JobRegistry::new(
        Arc::new(|_e: qmp_api::Event| {}),
        Arc::new(job::TokioSpawn),
        Arc::new(job::TokioClock::default()),
    );
    let k = reg
        .create(
            JobSpec::new("j").auto_dismiss(false),
            |_| Box::new(NoWork),
            None,
        )
        .unwrap();
    reg.start(k).unwrap();
    reg.concluded(k).await;
    assert_eq!(reg.status(k), Some(BlockJobStatus::Concluded));
}

/// Polls a future once, then drops it (a driver racing a sleep against its own I/O).
struct PollOnce<F>(Option<std::pin::Pin<Box<F>>>);

impl<F: std::future::Future> std::future::Future for PollOnce<F> {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if let Some(mut f) = self.0.take() {
            let _ = f.as_mut().poll(cx);
        }
        std::task::Poll::Ready(())
    }
}

type Gate = std::sync::Arc<std::sync::Mutex<(bool, Option<std::task::Waker>)>>;

struct GateWait(Gate);

impl std::future::Future for GateWait {
    type Output = ();
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let mut g = self.0.lock().unwrap();
        if g.0 {
            std::task::Poll::Ready(())
        } else {
            g.1 = Some(cx.waker().clone());
            std::task::Poll::Pending
        }
    }
}

struct DropsItsSleep {
    gate: Gate,
}

impl job::JobDriver for DropsItsSleep {
    fn job_type(&self) -> qmp_api::JobType {
        qmp_api::JobType::Backup
    }
    fn run<'a>(
        &'a mut self,
        ctx: &'a job::JobContext,
    ) -> job::BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(async move {
            PollOnce(Some(Box::pin(ctx.sleep(Duration::from_secs(1))))).await;
            // Busy in its own I/O, then a pause point.
            GateWait(self.gate.clone()).await;
            ctx.pause_point().await;
            Ok(())
        })
    }
}

#[test]
fn a_job_that_drops_a_sleep_is_busy_again_and_pauses_at_its_next_pause_point() {
    let h = Harness::new();
    let gate: Gate = Default::default();
    let k = h
        .reg
        .create(
            JobSpec::new("j"),
            |_| Box::new(DropsItsSleep { gate: gate.clone() }),
            None,
        )
        .unwrap();
    h.reg.start(k).unwrap();
    h.run();
    assert_eq!(
        h.clock.next_deadline(),
        None,
        "the dropped sleep left no timer"
    );
    h.events();
    h.reg.pause_job(JobRef::Job("j")).unwrap();
    assert!(
        h.events().is_empty(),
        "busy: the pause waits for a pause point"
    );
    {
        let mut g = gate.lock().unwrap();
        g.0 = true;
        if let Some(w) = g.1.take() {
            w.wake();
        }
    }
    h.run();
    assert_eq!(h.events(), seq("j paused"));
    h.reg.resume_job(JobRef::Job("j")).unwrap();
    h.run();
    assert_eq!(
        h.events(),
        seq("j running, j waiting, j pending, COMPLETED j, j concluded, j null")
    );
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Rollback,
    FailRunning,
    CancelRunning,
    CancelPaused,
    CancelWaiting,
    CancelPending,
    FailPrepare,
}

#[test]
fn grouped_pairs_and_triples_abort_every_member_whichever_fails_or_is_cancelled_at_any_stage() {
    use Stage::*;
    for n in [2, 3] {
        for culprit in 0..n {
            for stage in [
                Rollback,
                FailRunning,
                CancelRunning,
                CancelPaused,
                CancelWaiting,
                CancelPending,
                FailPrepare,
            ] {
                let ctx = format!("{n} jobs, j{culprit} at {stage:?}");
                let mut h = Harness::new();
                let txn = h.reg.new_txn();
                let ids: Vec<String> = (0..n).map(|i| format!("j{i}")).collect();
                let keys: Vec<_> = ids
                    .iter()
                    .map(|id| h.create(JobSpec::new(id.as_str()).auto_finalize(false), Some(&txn)))
                    .collect();
                let culprit_id = ids[culprit].as_str();
                if let Rollback = stage {
                    h.reg.cancel_job(keys[culprit], true).unwrap();
                } else {
                    for &k in keys.iter().rev() {
                        h.reg.start(k).unwrap();
                    }
                    h.run();
                }
                match stage {
                    Rollback => {}
                    FailRunning => h.finish(culprit_id, eio()),
                    CancelRunning => h.reg.cancel(JobRef::Job(culprit_id), true).unwrap(),
                    CancelPaused => {
                        h.reg.pause_job(JobRef::BlockJob(culprit_id)).unwrap();
                        h.reg.cancel(JobRef::BlockJob(culprit_id), true).unwrap();
                    }
                    CancelWaiting => {
                        h.finish(culprit_id, Ok(()));
                        assert_eq!(h.status(culprit_id), Some(BlockJobStatus::Waiting));
                        h.reg.cancel(JobRef::Job(culprit_id), true).unwrap();
                    }
                    CancelPending | FailPrepare => {
                        if let FailPrepare = stage {
                            h.fail_prepare(culprit_id, "prepare refused");
                        }
                        for id in &ids {
                            h.finish(id, Ok(()));
                        }
                        assert_eq!(h.status(culprit_id), Some(BlockJobStatus::Pending));
                        if let FailPrepare = stage {
                            h.reg
                                .finalize(JobRef::Job(&ids[(culprit + 1) % n]))
                                .unwrap();
                        } else {
                            h.reg.cancel(JobRef::Job(culprit_id), true).unwrap();
                        }
                    }
                }
                h.run();
                let events = h.events();
                let hooks = finalize_hooks(&h);
                for (i, id) in ids.iter().enumerate() {
                    assert_eq!(h.status(id), None, "{ctx}: {id} gone");
                    let mine = |what: &str| {
                        hooks
                            .iter()
                            .filter(|x| **x == format!("{id} {what}"))
                            .count()
                    };
                    assert_eq!(mine("commit"), 0, "{ctx}: {hooks:?}");
                    assert_eq!((mine("abort"), mine("clean")), (1, 1), "{ctx}: {hooks:?}");
                    let finished: Vec<&String> = events
                        .iter()
                        .filter(|e| {
                            e.starts_with(&format!("COMPLETED {id}"))
                                || *e == &format!("CANCELLED {id}")
                        })
                        .collect();
                    let expected = match stage {
                        Rollback => vec![],
                        FailRunning if i == culprit => {
                            vec![format!("COMPLETED {id} error=Input/output error")]
                        }
                        FailPrepare if i == culprit => {
                            vec![format!("COMPLETED {id} error=prepare refused")]
                        }
                        _ => vec![format!("CANCELLED {id}")],
                    };
                    let finished: Vec<String> = finished.into_iter().cloned().collect();
                    assert_eq!(finished, expected, "{ctx}: {events:?}");
                    assert!(
                        events.contains(&format!("{id} aborting")),
                        "{ctx}: {events:?}"
                    );
                }
                // Members conclude newest first: the oldest is the last to go.
                assert_eq!(
                    events.last().map(String::as_str),
                    Some("j0 null"),
                    "{ctx}: {events:?}"
                );
            }
        }
    }
}

#[test]
fn cancel_all_ends_every_job_whatever_its_state() {
    let mut h = Harness::new();
    h.running(JobSpec::new("running"));
    h.running(JobSpec::new("pending").auto_finalize(false));
    h.finish("pending", Ok(()));
    h.running(JobSpec::new("concluded").auto_dismiss(false));
    h.finish("concluded", Ok(()));
    h.running(JobSpec::new("paused"));
    h.reg.pause_job(JobRef::Job("paused")).unwrap();
    h.create(JobSpec::new("created"), None);
    let keys = h.reg.cancel_all();
    assert_eq!(keys.len(), 5);
    h.run();
    assert!(h.reg.query_jobs().is_empty());
    for k in keys {
        assert_eq!(h.reg.status(k), None);
    }
}

#[test]
fn a_total_set_at_creation_is_reported_when_the_job_is_cancelled_before_its_work_ran() {
    // b01: a grouped sibling fails at once and force-cancels this job before its work set the
    // total; QSD still reports the backup's length in BLOCK_JOB_CANCELLED.
    let mut h = Harness::new();
    let j = h.create(JobSpec::new("j1"), None);
    h.reg.set_progress_total(j, 4 << 20);
    h.reg.start(j).unwrap();
    h.events();
    h.reg.cancel(JobRef::Job("j1"), true).unwrap();
    h.run();
    let cancelled: Vec<_> = h
        .raw_events()
        .into_iter()
        .filter_map(|e| match e {
            qmp_api::Event::BlockJobCancelled(p) => Some((p.len, p.offset)),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, vec![(4 << 20, 0)]);
}

/// A driver that works until its gate opens.
struct WaitsForGate(Gate);

impl job::JobDriver for WaitsForGate {
    fn job_type(&self) -> qmp_api::JobType {
        qmp_api::JobType::Backup
    }
    fn run<'a>(
        &'a mut self,
        _ctx: &'a job::JobContext,
    ) -> job::BoxFuture<'a, Result<(), JobFailure>> {
        let gate = self.0.clone();
        Box::pin(async move {
            GateWait(gate).await;
            Ok(())
        })
    }
}

/// Records each event with whether a polling wait was open when it was emitted; tells
/// `opened` when one opens.
struct PollingSink {
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Mutex<Vec<(String, bool)>>,
    opened: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
}

struct Open(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl job::EventSink for PollingSink {
    fn emit(&self, event: qmp_api::Event) {
        let open = self.open.load(std::sync::atomic::Ordering::SeqCst);
        let wire = event.to_wire(qmp_api::EventTimestamp::now());
        let status = wire["data"]["status"].as_str().unwrap_or("").to_string();
        let name = format!("{} {status}", wire["event"].as_str().unwrap());
        self.seen
            .lock()
            .unwrap()
            .push((name.trim().to_string(), open));
    }

    fn polling(&self) -> job::Polling {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.opened.lock().unwrap().send(());
        job::Polling::new(Open(self.open.clone()))
    }
}

#[cfg(feature = "tokio")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_wait_for_jobs_lets_their_events_pass() {
    use std::sync::Arc;
    let (opened, polled) = std::sync::mpsc::channel();
    let sink = Arc::new(PollingSink {
        open: Default::default(),
        seen: Default::default(),
        opened: std::sync::Mutex::new(opened),
    });
    let reg = job::JobRegistry::new(
        sink.clone(),
        Arc::new(job::TokioSpawn),
        Arc::new(job::TokioClock::default()),
    );
    let gate: Gate = Default::default();
    let driver = WaitsForGate(gate.clone());
    let k = reg
        .create(
            JobSpec::new("j").auto_dismiss(false),
            |_| Box::new(driver),
            None,
        )
        .unwrap();
    reg.start(k).unwrap();
    // The waiter is a thread of its own (the monitor's dispatcher); the job ends only once
    // it waits.
    let waiter = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.wait_concluded(&[k], Duration::from_secs(30)))
    };
    tokio::task::spawn_blocking(move || {
        polled
            .recv_timeout(Duration::from_secs(30))
            .expect("the wait opens a polling guard")
    })
    .await
    .unwrap();
    let waker = {
        let mut g = gate.lock().unwrap();
        g.0 = true;
        g.1.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
    let concluded = tokio::task::spawn_blocking(move || waiter.join().unwrap())
        .await
        .unwrap();
    assert!(concluded);
    let seen = sink.seen.lock().unwrap().clone();
    let while_waiting: Vec<&str> = seen
        .iter()
        .filter(|(_, open)| *open)
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        while_waiting,
        [
            "JOB_STATUS_CHANGE waiting",
            "JOB_STATUS_CHANGE pending",
            "BLOCK_JOB_COMPLETED",
            "JOB_STATUS_CHANGE concluded"
        ],
        "{seen:?}"
    );
    assert!(!sink.open.load(std::sync::atomic::Ordering::SeqCst));
}
