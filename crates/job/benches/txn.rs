//! One grouped transaction of N no-op jobs, from creation to every job NULL: with auto-finalize,
//! and with manual finalize (one `finalize` call). Prints time per run and per job; the per-job
//! figure should stay flat as N grows (no quadratic member walks).
//!
//! `cargo bench -p job --bench txn`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use job::manual::{ManualClock, ManualExecutor};
use job::{BoxFuture, JobContext, JobDriver, JobFailure, JobRef, JobRegistry, JobSpec};
use qmp_api::{Event, JobType};

struct NoOp;

impl JobDriver for NoOp {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn run<'a>(&'a mut self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>> {
        Box::pin(async { Ok(()) })
    }
}

fn registry() -> (JobRegistry, ManualExecutor, Arc<AtomicUsize>) {
    let exec = ManualExecutor::new();
    let events = Arc::new(AtomicUsize::new(0));
    let counter = events.clone();
    let reg = JobRegistry::new(
        Arc::new(move |_e: Event| {
            counter.fetch_add(1, Ordering::Relaxed);
        }),
        Arc::new(exec.clone()),
        Arc::new(ManualClock::new()),
    );
    (reg, exec, events)
}

/// Returns the elapsed time and the number of events.
fn grouped(n: usize, manual_finalize: bool) -> (Duration, usize) {
    let (reg, exec, events) = registry();
    let ids: Vec<String> = (0..n).map(|i| format!("j{i}")).collect();
    let start = Instant::now();
    let txn = reg.new_txn();
    let keys: Vec<_> = ids
        .iter()
        .map(|id| {
            let spec = JobSpec::new(id.as_str()).auto_finalize(!manual_finalize);
            reg.create(spec, |_| Box::new(NoOp), Some(&txn))
                .expect("create")
        })
        .collect();
    for &k in keys.iter().rev() {
        reg.start(k).expect("start");
    }
    drop(txn);
    exec.run_until_stalled();
    if manual_finalize {
        reg.finalize(JobRef::Job(&ids[0])).expect("finalize");
    }
    let elapsed = start.elapsed();
    assert!(reg.query_jobs().is_empty(), "every job reached NULL");
    assert_eq!(exec.live_tasks(), 0);
    (elapsed, events.load(Ordering::Relaxed))
}

fn main() {
    println!(
        "{:<28} {:>9} {:>12} {:>10} {:>9}",
        "grouped transaction", "jobs", "total", "per job", "events"
    );
    for manual in [false, true] {
        let label = if manual {
            "manual finalize"
        } else {
            "auto-finalize"
        };
        for n in [1_000, 10_000, 100_000] {
            // Best of three.
            let (best, events) = (0..3)
                .map(|_| grouped(n, manual))
                .min_by_key(|(d, _)| *d)
                .expect("three runs");
            println!(
                "{label:<28} {n:>9} {:>10.2}ms {:>8.0}ns {events:>9}",
                best.as_secs_f64() * 1e3,
                best.as_nanos() as f64 / n as f64,
            );
        }
    }
}
