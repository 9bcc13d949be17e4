//! The transaction protocol (SPEC §5, QEMU's `util/transactions.c` with `qmp_transaction`'s
//! order): each action is registered before it prepares, so a failing action is aborted and
//! cleaned like the ones before it. First error: abort every registered action, newest first,
//! then clean them, newest first, and return that error. Success: commit newest first, then
//! clean newest first. Actions after the failing one are never prepared.
//!
//! The bitmap actions here and the daemon's actions in `blockdev` (backups, snapshots) all run
//! through [`run_transaction`].

use crate::BlockError;

/// One action of a transaction, in four phases. `C` is what the phases act on, `E` the error
/// a failing `prepare` returns.
pub trait TransactionAction<C: ?Sized, E = BlockError> {
    /// Does the work so that it can still be undone; may fail.
    fn prepare(&mut self, ctx: &mut C) -> Result<(), E>;
    /// Makes it final (the whole transaction succeeded).
    fn commit(&mut self, _ctx: &mut C) {}
    /// Undoes `prepare` (also called when `prepare` itself failed halfway).
    fn abort(&mut self, _ctx: &mut C) {}
    /// Releases what prepare kept, after commit or abort, always.
    fn clean(&mut self, _ctx: &mut C) {}
}

/// Runs `actions` as one transaction; returns the first prepare error. Each action is dropped
/// right after its `clean` (what it still holds, e.g. a drain, is released in clean order, as
/// QEMU frees each action in `tran_clean`); actions after a failing one are dropped unprepared.
pub fn run_transaction<'a, C: ?Sized, E>(
    ctx: &mut C,
    mut actions: Vec<Box<dyn TransactionAction<C, E> + 'a>>,
) -> Result<(), E> {
    let mut registered = 0;
    let mut failure = None;
    for action in actions.iter_mut() {
        registered += 1;
        if let Err(e) = action.prepare(ctx) {
            failure = Some(e);
            break;
        }
    }
    actions.truncate(registered);
    for action in actions.iter_mut().rev() {
        if failure.is_some() {
            action.abort(ctx);
        } else {
            action.commit(ctx);
        }
    }
    while let Some(mut action) = actions.pop() {
        action.clean(ctx);
    }
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Logged {
        name: &'static str,
        fail: bool,
    }

    impl TransactionAction<Vec<String>, String> for Logged {
        fn prepare(&mut self, log: &mut Vec<String>) -> Result<(), String> {
            log.push(format!("prepare {}", self.name));
            if self.fail {
                Err(format!("{} failed", self.name))
            } else {
                Ok(())
            }
        }
        fn commit(&mut self, log: &mut Vec<String>) {
            log.push(format!("commit {}", self.name));
        }
        fn abort(&mut self, log: &mut Vec<String>) {
            log.push(format!("abort {}", self.name));
        }
        fn clean(&mut self, log: &mut Vec<String>) {
            log.push(format!("clean {}", self.name));
        }
    }

    fn run(spec: &[(&'static str, bool)]) -> (Result<(), String>, Vec<String>) {
        let actions: Vec<Box<dyn TransactionAction<Vec<String>, String>>> = spec
            .iter()
            .map(|&(name, fail)| {
                Box::new(Logged { name, fail }) as Box<dyn TransactionAction<_, _>>
            })
            .collect();
        let mut log = Vec::new();
        let result = run_transaction(&mut log, actions);
        (result, log)
    }

    #[test]
    fn success_commits_then_cleans_newest_first() {
        let (result, log) = run(&[("a", false), ("b", false)]);
        assert_eq!(result, Ok(()));
        assert_eq!(
            log,
            [
                "prepare a",
                "prepare b",
                "commit b",
                "commit a",
                "clean b",
                "clean a"
            ]
        );
    }

    #[test]
    fn a_failing_prepare_is_aborted_and_cleaned_with_the_earlier_actions_and_stops_the_rest() {
        let (result, log) = run(&[("a", false), ("b", true), ("c", false)]);
        assert_eq!(result, Err("b failed".to_string()));
        assert_eq!(
            log,
            [
                "prepare a",
                "prepare b",
                "abort b",
                "abort a",
                "clean b",
                "clean a"
            ]
        );
    }

    /// Records its clean and its drop in a shared log.
    struct Held {
        name: &'static str,
        log: std::rc::Rc<std::cell::RefCell<Vec<String>>>,
    }

    impl TransactionAction<(), String> for Held {
        fn prepare(&mut self, _: &mut ()) -> Result<(), String> {
            Ok(())
        }
        fn clean(&mut self, _: &mut ()) {
            self.log.borrow_mut().push(format!("clean {}", self.name));
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            self.log.borrow_mut().push(format!("drop {}", self.name));
        }
    }

    #[test]
    fn each_action_is_released_right_after_its_clean() {
        let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let actions: Vec<Box<dyn TransactionAction<(), String>>> = ["a", "b"]
            .into_iter()
            .map(|name| {
                Box::new(Held {
                    name,
                    log: log.clone(),
                }) as Box<dyn TransactionAction<_, _>>
            })
            .collect();
        assert_eq!(run_transaction(&mut (), actions), Ok(()));
        assert_eq!(*log.borrow(), ["clean b", "drop b", "clean a", "drop a"]);
    }

    #[test]
    fn an_empty_transaction_succeeds() {
        let (result, log) = run(&[]);
        assert_eq!(result, Ok(()));
        assert!(log.is_empty());
    }
}
