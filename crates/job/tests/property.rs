//! Random transactions of up to three jobs under random outcomes and random interleavings of
//! verbs, drains, executor steps and clock ticks (a seeded PRNG, so every failure reproduces).
//! Checked: every emitted transition is in the table; each member gets commit xor abort exactly
//! once and clean exactly once; in a grouped transaction nobody commits if anybody aborted; no
//! member is PENDING while another still works; every job ends CONCLUDED or gone (NULL).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Harness, Step};
use job::tables::transition_allowed;
use job::{BlockJobStatus, JobFailure, JobKey, JobRef, JobSpec};
use qmp_api::Event;

/// xorshift64*: small, seedable, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Member {
    name: String,
    key: JobKey,
    drains: u32,
    started: bool,
}

const CASES: u64 = 4000;
const ACTIONS: usize = 40;

#[derive(Default, Debug)]
struct Coverage {
    grouped_committed: u64,
    grouped_aborted: u64,
    individual: u64,
    never_started: u64,
}

#[test]
fn random_transactions_keep_every_invariant() {
    let mut coverage = Coverage::default();
    for seed in 1..=CASES {
        run_case(seed, &mut coverage);
    }
    // The generator reaches every kind of outcome often.
    assert!(coverage.grouped_committed > 200, "{coverage:?}");
    assert!(coverage.grouped_aborted > 200, "{coverage:?}");
    assert!(coverage.individual > 200, "{coverage:?}");
    assert!(coverage.never_started > 200, "{coverage:?}");
}

fn is_working(s: BlockJobStatus) -> bool {
    use BlockJobStatus::*;
    matches!(s, Created | Running | Paused | Ready | Standby)
}

fn run_case(seed: u64, coverage: &mut Coverage) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut h = Harness::new();
    let n = 1 + rng.below(3) as usize;
    let grouped = n > 1 && rng.chance(70);
    let txn = grouped.then(|| h.reg.new_txn());
    let mut members: Vec<Member> = Vec::new();
    for i in 0..n {
        let name = format!("j{i}");
        let spec = JobSpec::new(name.clone())
            .auto_finalize(rng.chance(50))
            .auto_dismiss(rng.chance(50))
            .speed(if rng.chance(30) { 1000 } else { 0 });
        let key = h.create_with(spec, txn.as_ref(), rng.chance(30));
        if rng.chance(5) {
            h.fail_prepare(&name, "prepare refused");
        }
        let drains = u32::from(rng.chance(60));
        if drains > 0 {
            h.reg.pause(key).unwrap();
        }
        members.push(Member {
            name,
            key,
            drains,
            started: false,
        });
    }
    // Commit (start, reverse order) or roll back (force-cancel never-started jobs).
    if rng.chance(10) {
        for m in members.iter().rev() {
            let _ = h.reg.cancel_job(m.key, true);
        }
    } else {
        for m in members.iter_mut().rev() {
            h.reg.start(m.key).unwrap();
            m.started = true;
        }
    }
    for m in members.iter_mut().rev() {
        if m.drains > 0 && h.reg.status(m.key).is_some() && rng.chance(80) {
            h.reg.resume(m.key).unwrap();
            m.drains -= 1;
        }
    }
    drop(txn);

    for _ in 0..ACTIONS {
        let i = rng.below(n as u64) as usize;
        let name = members[i].name.clone();
        let key = members[i].key;
        let alive = h.reg.status(key).is_some();
        let target = if rng.chance(50) {
            JobRef::Job(&name)
        } else {
            JobRef::BlockJob(&name)
        };
        match rng.below(16) {
            0 | 1 if alive => {
                let result = if rng.chance(15) {
                    Err(JobFailure::new("Input/output error"))
                } else {
                    Ok(())
                };
                h.push(&name, Step::Finish(result));
            }
            2 if alive => h.push(&name, Step::Work(1 + rng.below(2000))),
            3 if alive => h.push(&name, Step::Ready),
            4 if alive => h.push(&name, Step::Block),
            5 if alive => h.open_gate(&name),
            6 if alive => h.push(&name, Step::IoError),
            7 if rng.chance(25) => {
                let _ = h.reg.cancel(target, rng.chance(50));
            }
            8 => {
                let _ = h.reg.pause_job(target);
            }
            9 => {
                let _ = h.reg.resume_job(target);
            }
            10 => {
                let speed = rng.below(3000) as i64 - 500;
                let _ = h.reg.set_speed(target, speed);
            }
            11 => {
                let _ = h.reg.complete(target);
                let _ = h.reg.finalize(target);
                let _ = h.reg.dismiss(target);
            }
            12 if alive => {
                if members[i].drains > 0 && rng.chance(60) {
                    h.reg.resume(key).unwrap();
                    members[i].drains -= 1;
                } else {
                    h.reg.pause(key).unwrap();
                    members[i].drains += 1;
                }
            }
            13 => {
                h.clock.advance(Duration::from_millis(rng.below(1500)));
            }
            _ => {
                for _ in 0..rng.below(4) {
                    h.exec.step();
                }
            }
        }
        check_no_pending_beside_working(&h, &members, grouped, seed);
    }

    drive_to_the_end(&mut h, &mut members, seed);
    let (committed, aborted) = check_history(&h, &members, grouped, seed);
    if grouped {
        coverage.grouped_committed += u64::from(committed);
        coverage.grouped_aborted += u64::from(aborted);
    } else {
        coverage.individual += 1;
    }
    coverage.never_started += members.iter().filter(|m| !m.started).count() as u64;
}

fn check_no_pending_beside_working(h: &Harness, members: &[Member], grouped: bool, seed: u64) {
    if !grouped {
        return;
    }
    let statuses: Vec<_> = members.iter().filter_map(|m| h.reg.status(m.key)).collect();
    let pending = statuses.contains(&BlockJobStatus::Pending);
    let working = statuses.iter().any(|s| is_working(*s));
    assert!(
        !(pending && working),
        "seed {seed}: PENDING beside a working member: {statuses:?}"
    );
}

/// Lifts every pause, lets every job finish, finalizes; each job must end CONCLUDED or gone.
fn drive_to_the_end(h: &mut Harness, members: &mut [Member], seed: u64) {
    for _round in 0..50 {
        let mut open = false;
        for m in members.iter_mut() {
            let Some(status) = h.reg.status(m.key) else {
                continue;
            };
            while m.drains > 0 {
                h.reg.resume(m.key).unwrap();
                m.drains -= 1;
            }
            let _ = h.reg.resume_job(JobRef::Job(&m.name));
            match status {
                BlockJobStatus::Concluded => {}
                BlockJobStatus::Pending => {
                    h.reg.finalize(JobRef::Job(&m.name)).unwrap();
                }
                BlockJobStatus::Created if !m.started => {
                    h.reg.start(m.key).unwrap();
                    m.started = true;
                    open = true;
                }
                _ => {
                    h.open_gate(&m.name);
                    h.push(&m.name, Step::Finish(Ok(())));
                    open = true;
                }
            }
        }
        h.run();
        while h.clock.advance_to_next_deadline() {
            h.run();
        }
        if !open
            && members
                .iter()
                .all(|m| matches!(h.reg.status(m.key), None | Some(BlockJobStatus::Concluded)))
        {
            return;
        }
    }
    let left: Vec<_> = members.iter().map(|m| h.reg.status(m.key)).collect();
    panic!("seed {seed}: jobs did not end: {left:?}");
}

/// Returns whether any member committed, and whether any aborted.
fn check_history(h: &Harness, members: &[Member], grouped: bool, seed: u64) -> (bool, bool) {
    // Every emitted transition is in the table, starting from UNDEFINED.
    let mut last: HashMap<String, BlockJobStatus> = HashMap::new();
    let mut finished_events: HashMap<String, usize> = HashMap::new();
    for e in h.raw_events() {
        match e {
            Event::JobStatusChange(d) => {
                let (id, status) = (d.id, d.status);
                let from = last.get(&id).copied().unwrap_or(BlockJobStatus::Undefined);
                assert!(
                    from != status && transition_allowed(from, status),
                    "seed {seed}: {id} {from} -> {status}"
                );
                last.insert(id, status);
            }
            Event::BlockJobCompleted(d) => {
                *finished_events.entry(d.device).or_default() += 1;
            }
            Event::BlockJobCancelled(d) => {
                *finished_events.entry(d.device).or_default() += 1;
            }
            _ => {}
        }
    }
    // Hooks: commit xor abort once, clean once; after run if any.
    let hooks = h.hooks();
    let mut any_abort = false;
    let mut any_commit = false;
    for m in members {
        let mine: Vec<&str> = hooks
            .iter()
            .filter_map(|x| x.strip_prefix(&format!("{} ", m.name)))
            .collect();
        let count = |what: &str| mine.iter().filter(|x| **x == what).count();
        let (commits, aborts) = (count("commit"), count("abort"));
        assert_eq!(
            commits + aborts,
            1,
            "seed {seed}: {} hooks {mine:?}",
            m.name
        );
        assert_eq!(count("clean"), 1, "seed {seed}: {} hooks {mine:?}", m.name);
        assert!(count("run") <= 1, "seed {seed}: {} hooks {mine:?}", m.name);
        any_abort |= aborts > 0;
        any_commit |= commits > 0;
        let end = last.get(&m.name).copied();
        assert!(
            matches!(
                end,
                Some(BlockJobStatus::Null) | Some(BlockJobStatus::Concluded)
            ),
            "seed {seed}: {} ended {end:?}",
            m.name
        );
        // One completion event per started job, none for a never-started one.
        let expected = usize::from(m.started);
        assert_eq!(
            finished_events.get(&m.name).copied().unwrap_or(0),
            expected,
            "seed {seed}: {} completion events",
            m.name
        );
    }
    if grouped {
        assert!(
            !(any_abort && any_commit),
            "seed {seed}: a grouped transaction both committed and aborted: {hooks:?}"
        );
    }
    (any_commit, any_abort)
}
