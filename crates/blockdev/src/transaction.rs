//! The transaction protocol (QEMU's `util/transactions.c` as `qmp_transaction` runs it), its one
//! home. A transaction is a list of [`Action`]s, each with `prepare`, `commit`, `abort` and
//! `clean`, run by [`run`] in this order:
//!
//! 1. each action's `prepare`, in list order; an action is registered before its `prepare`
//!    runs, so a failing action is aborted and cleaned like the ones before it, and the
//!    actions after it are never prepared;
//! 2. on the first error, every registered `abort`, newest first; otherwise every `commit`,
//!    newest first (so jobs start last-action-first);
//! 3. every `clean`, newest first, each action dropped right after its clean;
//! 4. the drained sections the actions handed over ([`Transaction::end_drain`]) end together,
//!    in clean order, under one job-registry lock: a job resumed by an early clean cannot run
//!    (and, say, fail) before the later ones are resumed, as in QEMU where they only run once
//!    the command returns.
//!
//! An empty list succeeds. The grouped job transaction of `completion-mode: grouped` is an
//! argument of the run, which its backup actions create their jobs in.

use job::{JobKey, JobTxn};
use qmp_api::QmpError;

use crate::BlockState;
use crate::claims::Drain;

/// One action of a transaction: what it acts on is the [`Transaction`].
pub trait Action {
    /// Does the work so that it can still be undone; may fail.
    fn prepare(&mut self, txn: &mut Transaction<'_>) -> Result<(), QmpError>;
    /// Makes it final (the whole transaction succeeded).
    fn commit(&mut self, _txn: &mut Transaction<'_>) {}
    /// Undoes `prepare` (also called when `prepare` itself failed halfway).
    fn abort(&mut self, _txn: &mut Transaction<'_>) {}
    /// Releases what prepare kept, after commit or abort, always.
    fn clean(&mut self, _txn: &mut Transaction<'_>) {}
}

/// What the actions of one running transaction share.
pub struct Transaction<'a> {
    /// The command layer's state.
    pub(crate) state: &'a mut BlockState,
    group: Option<&'a JobTxn>,
    ended_drains: Vec<JobKey>,
}

impl Transaction<'_> {
    /// The job transaction of `completion-mode: grouped`, which jobs are created in; `None`
    /// in individual mode (each job its own).
    pub fn group(&self) -> Option<&JobTxn> {
        self.group
    }

    /// Ends a drained section an action began: its jobs resume with the others' after the
    /// last clean (step 4).
    pub(crate) fn end_drain(&mut self, mut drain: Drain) {
        self.ended_drains.extend(drain.take_held());
    }
}

/// Runs `actions` as one transaction (see the module's steps); returns the first prepare
/// error. `group` is the grouped job transaction, if any.
pub fn run(
    state: &mut BlockState,
    mut actions: Vec<Box<dyn Action + '_>>,
    group: Option<&JobTxn>,
) -> Result<(), QmpError> {
    let mut txn = Transaction {
        state,
        group,
        ended_drains: Vec::new(),
    };
    let mut registered = 0;
    let mut failure = None;
    for action in actions.iter_mut() {
        registered += 1;
        if let Err(e) = action.prepare(&mut txn) {
            failure = Some(e);
            break;
        }
    }
    actions.truncate(registered);
    for action in actions.iter_mut().rev() {
        if failure.is_some() {
            action.abort(&mut txn);
        } else {
            action.commit(&mut txn);
        }
    }
    while let Some(mut action) = actions.pop() {
        action.clean(&mut txn);
    }
    let ended = std::mem::take(&mut txn.ended_drains);
    txn.state.jobs.end_drain(&ended);
    failure.map_or(Ok(()), Err)
}

/// `abort`: always fails.
pub(crate) struct AbortAction;

impl Action for AbortAction {
    fn prepare(&mut self, _txn: &mut Transaction<'_>) -> Result<(), QmpError> {
        Err(QmpError::generic("Transaction aborted using Abort action"))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    type Log = Rc<RefCell<Vec<String>>>;

    struct Logged {
        name: &'static str,
        fail: bool,
        log: Log,
    }

    impl Action for Logged {
        fn prepare(&mut self, _: &mut Transaction<'_>) -> Result<(), QmpError> {
            self.log.borrow_mut().push(format!("prepare {}", self.name));
            if self.fail {
                Err(QmpError::generic(format!("{} failed", self.name)))
            } else {
                Ok(())
            }
        }
        fn commit(&mut self, _: &mut Transaction<'_>) {
            self.log.borrow_mut().push(format!("commit {}", self.name));
        }
        fn abort(&mut self, _: &mut Transaction<'_>) {
            self.log.borrow_mut().push(format!("abort {}", self.name));
        }
        fn clean(&mut self, _: &mut Transaction<'_>) {
            self.log.borrow_mut().push(format!("clean {}", self.name));
        }
    }

    impl Drop for Logged {
        fn drop(&mut self) {
            self.log.borrow_mut().push(format!("drop {}", self.name));
        }
    }

    fn run_logged(spec: &[(&'static str, bool)]) -> (Result<(), QmpError>, Vec<String>) {
        let log: Log = Rc::default();
        let actions: Vec<Box<dyn Action>> = spec
            .iter()
            .map(|&(name, fail)| {
                Box::new(Logged {
                    name,
                    fail,
                    log: log.clone(),
                }) as Box<dyn Action>
            })
            .collect();
        let mut state = BlockState::for_tests();
        let result = run(&mut state, actions, None);
        let log = log.borrow().clone();
        (result, log)
    }

    #[test]
    fn success_commits_then_cleans_newest_first_dropping_each_action_after_its_clean() {
        let (result, log) = run_logged(&[("a", false), ("b", false)]);
        assert_eq!(result, Ok(()));
        assert_eq!(
            log,
            [
                "prepare a",
                "prepare b",
                "commit b",
                "commit a",
                "clean b",
                "drop b",
                "clean a",
                "drop a"
            ]
        );
    }

    #[test]
    fn a_failing_prepare_is_aborted_and_cleaned_with_the_earlier_actions_and_stops_the_rest() {
        let (result, log) = run_logged(&[("a", false), ("b", true), ("c", false)]);
        assert_eq!(result, Err(QmpError::generic("b failed")));
        assert_eq!(
            log,
            [
                "prepare a",
                "prepare b",
                "drop c",
                "abort b",
                "abort a",
                "clean b",
                "drop b",
                "clean a",
                "drop a"
            ]
        );
    }

    #[test]
    fn an_empty_transaction_succeeds() {
        let (result, log) = run_logged(&[]);
        assert_eq!(result, Ok(()));
        assert!(log.is_empty());
    }
}
