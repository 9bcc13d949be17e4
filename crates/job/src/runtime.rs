//! How jobs are executed and how they tell time: the two seams that let the daemon run jobs on
//! tokio and the tests run them on a deterministic, stepped executor with a manual clock.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A job's task: drives its driver's `run` and reports the result to the registry.
pub type JobTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Starts job tasks. Any `Fn(JobTask)` closure is a `Spawn` (e.g. `|t| { tokio::spawn(t); }`).
pub trait Spawn: Send + Sync {
    fn spawn(&self, task: JobTask);

    /// Whether tasks run on other threads than the caller, so that a caller may block until a
    /// job reaches a pause point (a drain). A stepped executor runs nothing while its caller
    /// waits: false.
    fn runs_concurrently(&self) -> bool {
        false
    }
}

impl<F: Fn(JobTask) + Send + Sync> Spawn for F {
    fn spawn(&self, task: JobTask) {
        self(task)
    }
}

/// A monotonic clock for rate limiting and job sleeps.
pub trait Clock: Send + Sync {
    /// Time since the clock's origin.
    fn now(&self) -> Duration;
    /// Completes once `now() >= deadline`.
    fn sleep_until(&self, deadline: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

#[cfg(feature = "tokio")]
mod tokio_runtime {
    use super::*;

    /// Spawns job tasks with `tokio::spawn` (needs a runtime context).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct TokioSpawn;

    impl Spawn for TokioSpawn {
        fn spawn(&self, task: JobTask) {
            tokio::spawn(task);
        }

        fn runs_concurrently(&self) -> bool {
            true
        }
    }

    /// `tokio::time`, measured from the clock's creation.
    #[derive(Debug, Clone, Copy)]
    pub struct TokioClock {
        origin: tokio::time::Instant,
    }

    impl Default for TokioClock {
        fn default() -> Self {
            TokioClock {
                origin: tokio::time::Instant::now(),
            }
        }
    }

    impl Clock for TokioClock {
        fn now(&self) -> Duration {
            self.origin.elapsed()
        }

        fn sleep_until(&self, deadline: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
            Box::pin(tokio::time::sleep_until(self.origin + deadline))
        }
    }
}

#[cfg(feature = "tokio")]
pub use tokio_runtime::{TokioClock, TokioSpawn};
