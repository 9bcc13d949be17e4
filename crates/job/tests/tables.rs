//! Both tables, cell by cell, against SPEC.md §1; and every verb in every state a job can be
//! seen in, answered as QEMU answers.

mod common;

use common::{Harness, Step};
use job::tables::{STATUS_ORDER, TRANSITIONS, VERB_ORDER, VERBS, transition_allowed, verb_allowed};
use job::{BlockJobStatus, BlockJobVerb, JobFailure, JobRef, JobSpec};

/// SPEC.md §1, verbatim.
const SPEC_TRANSITIONS: &str = "
U         .x.........
C         ..x.....x.x
R         ...xx.x.x..
P         ..x........
Y         .....xx.x..
S         ....x......
W         .......xx..
D         ........xx.
X         ........xx.
E         ..........x
N         ...........";

const SPEC_VERBS: &str = "
cancel    .xxxxxxx...
pause     .xxxxx.....
resume    .xxxxx.....
set-speed .xxxxx.....
complete  ....xx.....
finalize  .......x...
dismiss   .........x.
change    .xxxxx.....";

fn parse(table: &str) -> Vec<(String, Vec<bool>)> {
    table
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, cells) = l.split_at(10);
            (
                name.trim().to_string(),
                cells.chars().map(|c| c == 'x').collect(),
            )
        })
        .collect()
}

const LETTERS: &str = "UCRPYSWDXEN";

#[test]
fn transition_table_is_the_specs_table_cell_by_cell() {
    let spec = parse(SPEC_TRANSITIONS);
    assert_eq!(spec.len(), 11);
    for (row, (name, cells)) in spec.iter().enumerate() {
        assert_eq!(name.chars().next(), LETTERS.chars().nth(row));
        assert_eq!(cells.len(), 11);
        for (col, &allowed) in cells.iter().enumerate() {
            let (from, to) = (STATUS_ORDER[row], STATUS_ORDER[col]);
            assert_eq!(TRANSITIONS[row][col], allowed, "{from} -> {to}");
            assert_eq!(transition_allowed(from, to), allowed, "{from} -> {to}");
        }
    }
}

#[test]
fn verb_table_is_the_specs_table_cell_by_cell() {
    let spec = parse(SPEC_VERBS);
    assert_eq!(spec.len(), 8);
    for (row, (name, cells)) in spec.iter().enumerate() {
        let verb = VERB_ORDER[row];
        assert_eq!(name, verb.as_str());
        for (col, &allowed) in cells.iter().enumerate() {
            let status = STATUS_ORDER[col];
            assert_eq!(VERBS[row][col], allowed, "{verb} in {status}");
            assert_eq!(verb_allowed(verb, status), allowed, "{verb} in {status}");
        }
    }
}

#[test]
fn tables_cover_every_status_and_verb_of_the_schema() {
    let mut statuses = STATUS_ORDER.to_vec();
    statuses.sort();
    assert_eq!(statuses, BlockJobStatus::ALL.to_vec());
    let mut verbs = VERB_ORDER.to_vec();
    verbs.sort();
    let mut all = BlockJobVerb::ALL.to_vec();
    all.sort();
    assert_eq!(verbs, all);
}

/// A fresh harness with job `j` in `status` (user-paused for PAUSED/STANDBY).
fn job_in(status: BlockJobStatus) -> Harness {
    use BlockJobStatus::*;
    let mut h = Harness::new();
    match status {
        Created => {
            h.create(JobSpec::new("j"), None);
        }
        Running => {
            h.running(JobSpec::new("j"));
        }
        Paused => {
            h.running(JobSpec::new("j"));
            h.reg.pause_job(JobRef::Job("j")).unwrap();
        }
        Ready | Standby => {
            let k = h.create_mirror(JobSpec::new("j"));
            h.reg.start(k).unwrap();
            h.push("j", Step::Ready);
            h.run();
            if status == Standby {
                h.reg.pause_job(JobRef::Job("j")).unwrap();
            }
        }
        Waiting | Aborting => {
            let txn = h.reg.new_txn();
            let j = h.create(JobSpec::new("j"), Some(&txn));
            let other = h.create(JobSpec::new("other"), Some(&txn));
            h.reg.start(j).unwrap();
            h.reg.start(other).unwrap();
            h.push("other", Step::Block);
            h.run();
            if status == Waiting {
                h.finish("j", Ok(()));
            } else {
                h.finish("j", Err(JobFailure::new("Input/output error")));
            }
        }
        Pending => {
            h.running(JobSpec::new("j").auto_finalize(false));
            h.finish("j", Ok(()));
        }
        Concluded => {
            h.running(JobSpec::new("j").auto_dismiss(false));
            h.finish("j", Ok(()));
        }
        Undefined | Null | UnknownValue => unreachable!("not observable"),
    }
    assert_eq!(h.status("j"), Some(status), "setup");
    h
}

fn apply(h: &Harness, verb: BlockJobVerb) -> Result<(), String> {
    let t = JobRef::Job("j");
    let r = match verb {
        BlockJobVerb::Cancel => h.reg.cancel(t, true),
        BlockJobVerb::Pause => h.reg.pause_job(t),
        BlockJobVerb::Resume => h.reg.resume_job(t),
        BlockJobVerb::SetSpeed => h.reg.set_speed(t, 0),
        BlockJobVerb::Complete => h.reg.complete(t),
        BlockJobVerb::Finalize => h.reg.finalize(t),
        BlockJobVerb::Dismiss => h.reg.dismiss(t),
        BlockJobVerb::Change => h.reg.check_verb(t, BlockJobVerb::Change).map(|_| ()),
    };
    r.map_err(|e| {
        assert_eq!(e.class, qmp_api::ErrorClass::GenericError);
        e.desc
    })
}

#[test]
fn every_verb_in_every_observable_state_is_accepted_or_refused_as_the_tables_say() {
    use BlockJobStatus::*;
    const NOT_PAUSED: &str = "Can't resume a job that was not paused";
    for &status in &[
        Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded,
    ] {
        for &verb in BlockJobVerb::ALL {
            let h = job_in(status);
            let got = apply(&h, verb);
            let table_error =
                format!("Job 'j' in state '{status}' cannot accept command verb '{verb}'");
            let user_paused = matches!(status, Paused | Standby);
            let expected: Result<(), String> = match verb {
                // Checked before the verb table.
                BlockJobVerb::Resume if !user_paused => Err(NOT_PAUSED.into()),
                _ if !verb_allowed(verb, status) => Err(table_error),
                BlockJobVerb::Pause if user_paused => Err("Job is already paused".into()),
                _ => Ok(()),
            };
            assert_eq!(got, expected, "{verb} in {status}");
        }
    }
}

#[test]
fn resume_of_a_user_paused_job_that_finished_meanwhile_is_refused_by_the_verb_table() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j").auto_finalize(false));
    // Busy in I/O (no pause point): the pause is recorded, the work ends before honouring it.
    h.push("j", Step::Block);
    h.run();
    h.reg.pause_job(JobRef::Job("j")).unwrap();
    h.push("j", Step::Finish(Ok(())));
    h.open_gate("j");
    h.run();
    assert_eq!(h.status("j"), Some(BlockJobStatus::Pending));
    assert_eq!(
        h.reg.resume_job(JobRef::Job("j")).unwrap_err().desc,
        "Job 'j' in state 'pending' cannot accept command verb 'resume'"
    );
}

#[test]
fn block_job_commands_use_the_same_verb_table_message() {
    let mut h = Harness::new();
    h.running(JobSpec::new("j"));
    let e = h.reg.finalize(JobRef::BlockJob("j")).unwrap_err();
    assert_eq!(e.class, qmp_api::ErrorClass::GenericError);
    assert_eq!(
        e.desc,
        "Job 'j' in state 'running' cannot accept command verb 'finalize'"
    );
}
