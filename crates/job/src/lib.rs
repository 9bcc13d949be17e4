//! job: the block-job state machine and job transactions, with no knowledge of block devices or
//! of the QMP wire format.
//!
//! * [`tables`]: the transition table and the verb table, as data.
//! * [`JobRegistry`]: creates jobs in [`JobTxn`]s, starts them, applies the QMP verbs
//!   (`cancel`, `pause_job`, `resume_job`, `set_speed`, `complete`, `finalize`, `dismiss`),
//!   answers `query-jobs`/`query-block-jobs`, and runs the transaction protocol.
//! * [`JobDriver`]: what a kind of job (backup, mirror) implements; its work gets a
//!   [`JobContext`] (pause points, cancellation, rate limiting, progress, READY).
//! * [`EventSink`]: where [`JobEvent`]s go, in QEMU's order.
//! * [`Spawn`] and [`Clock`]: the executor and the time source; [`manual`] has deterministic
//!   ones for tests, the `tokio` feature real ones.

mod context;
mod driver;
mod event;
pub mod manual;
mod ratelimit;
mod registry;
mod runtime;
pub mod tables;

pub use qmp_api::{BlockJobStatus, BlockJobVerb};

pub use context::JobContext;
pub use driver::{BoxFuture, JobDriver, JobFailure};
pub use event::{BlockJobProgress, ErrorAction, EventSink, IoOperation, JobEvent};
pub use registry::{
    BlockJobInfo, CANCELED_MESSAGE, Concluded, IoStatus, JobError, JobInfo, JobKey, JobRef,
    JobRegistry, JobSpec, JobTxn, OnError, id_wellformed,
};
pub use runtime::{Clock, JobTask, Spawn};
#[cfg(feature = "tokio")]
pub use runtime::{TokioClock, TokioSpawn};
