//! The `transaction` protocol as data (QEMU's `util/transactions.c` plus `qmp_transaction`):
//! each action is registered *before* it prepares, so a failing action is aborted and cleaned
//! like the others. First error: abort every registered action (newest first), then clean them
//! (newest first). Success: commit (newest first), then clean (newest first).

use qmp_api::QmpError;

/// One action of a transaction, with its four phases. `E` is what the phases act on.
pub trait Action<E> {
    /// Validates and applies what can be undone; may fail.
    fn prepare(&mut self, env: &mut E) -> Result<(), QmpError>;
    /// The whole transaction succeeded.
    fn commit(&mut self, _env: &mut E) {}
    /// Some action failed (possibly this one, halfway through its prepare).
    fn abort(&mut self, _env: &mut E) {}
    /// After commit or abort, always.
    fn clean(&mut self, _env: &mut E) {}
}

/// A transaction being run: the actions registered so far.
pub struct Transaction<E> {
    actions: Vec<Box<dyn Action<E>>>,
}

impl<E> Default for Transaction<E> {
    fn default() -> Self {
        Transaction {
            actions: Vec::new(),
        }
    }
}

impl<E> Transaction<E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs every action's prepare in order, then commits or aborts the lot.
    pub fn run(
        mut self,
        env: &mut E,
        actions: impl IntoIterator<Item = Box<dyn Action<E>>>,
    ) -> Result<(), QmpError> {
        for action in actions {
            self.actions.push(action);
            let Some(registered) = self.actions.last_mut() else {
                continue;
            };
            if let Err(error) = registered.prepare(env) {
                self.abort(env);
                return Err(error);
            }
        }
        self.commit(env);
        Ok(())
    }

    fn commit(&mut self, env: &mut E) {
        for action in self.actions.iter_mut().rev() {
            action.commit(env);
        }
        self.clean(env);
    }

    fn abort(&mut self, env: &mut E) {
        for action in self.actions.iter_mut().rev() {
            action.abort(env);
        }
        self.clean(env);
    }

    fn clean(&mut self, env: &mut E) {
        for mut action in self.actions.drain(..).rev() {
            action.clean(env);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Logged {
        name: &'static str,
        fail: bool,
    }

    impl Action<Vec<String>> for Logged {
        fn prepare(&mut self, log: &mut Vec<String>) -> Result<(), QmpError> {
            log.push(format!("prepare {}", self.name));
            if self.fail {
                Err(QmpError::generic(format!("{} failed", self.name)))
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

    fn actions(spec: &[(&'static str, bool)]) -> Vec<Box<dyn Action<Vec<String>>>> {
        spec.iter()
            .map(|&(name, fail)| Box::new(Logged { name, fail }) as Box<dyn Action<_>>)
            .collect()
    }

    #[test]
    fn success_commits_then_cleans_newest_first() {
        let mut log = Vec::new();
        let r = Transaction::new().run(&mut log, actions(&[("a", false), ("b", false)]));
        assert_eq!(r, Ok(()));
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
        let mut log = Vec::new();
        let r = Transaction::new().run(
            &mut log,
            actions(&[("a", false), ("b", true), ("c", false)]),
        );
        assert_eq!(r, Err(QmpError::generic("b failed")));
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

    #[test]
    fn an_empty_transaction_succeeds() {
        let mut log = Vec::new();
        assert_eq!(Transaction::new().run(&mut log, actions(&[])), Ok(()));
        assert!(log.is_empty());
    }
}
