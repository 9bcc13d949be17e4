//! job: the block-job state machine and job transactions, with no knowledge of block devices or
//! of the QMP wire format. Its vocabulary is the generated API's (`BlockJobStatus`,
//! `BlockJobVerb`, `JobInfo`, `BlockJobInfo`, `BlockdevOnError`, `qmp_api::Event`).
//!
//! * [`tables`]: the transition table and the verb table, as data.
//! * `state`: one job's state machine (the function that moves a status, the one that checks
//!   a verb, pause points).
//! * `txn`: the transaction protocol (wait for every member, then prepare, commit or abort,
//!   clean, conclude; or abort everything when one member fails).
//! * `verbs`: what the monitor calls (`cancel`, `pause_job`, `resume_job`, `set_speed`,
//!   `complete`, `finalize`, `dismiss`, the queries).
//! * [`JobRegistry`]: creation, start, drains and the block layer's other calls.
//! * [`JobDriver`]: what a kind of job (backup, mirror) implements; its work gets a
//!   [`JobContext`] (pause points, cancellation, rate limiting, progress, READY, the I/O
//!   error policy).
//! * [`EventSink`]: where events go, in QEMU's order.
//! * [`Spawn`] and [`Clock`]: the executor and the time source; [`manual`] has deterministic
//!   ones for tests, the `tokio` feature real ones.

mod context;
mod driver;
mod event;
pub mod manual;
mod ratelimit;
mod registry;
mod runtime;
mod state;
pub mod tables;
mod txn;
mod verbs;

pub use qmp_api::{BlockJobStatus, BlockJobVerb};

pub use context::JobContext;
pub use driver::{BoxFuture, JobDriver, JobFailure, strerror};
pub use event::{EventSink, Polling};
pub use registry::{Concluded, JobError, JobKey, JobRef, JobRegistry, JobSpec, id_wellformed};
pub use runtime::{Clock, JobTask, Spawn};
#[cfg(feature = "tokio")]
pub use runtime::{TokioClock, TokioSpawn};
pub use state::CANCELED_MESSAGE;
pub use txn::JobTxn;
