//! The interface a kind of job (backup, mirror, ...) implements: its work and the hooks the
//! transaction protocol calls when it finishes.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;

use qmp_api::JobType;

use crate::JobContext;

/// A boxed, sendable future borrowing for `'a`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a job's work or its `prepare` failed; `message` is what QMP shows
/// (`BLOCK_JOB_COMPLETED.error`, `query-jobs` `error`), e.g. `Input/output error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    message: String,
}

impl JobFailure {
    pub fn new(message: impl Into<String>) -> Self {
        JobFailure {
            message: message.into(),
        }
    }

    /// The failure of an I/O error, worded as QEMU words errno (`Input/output error`).
    pub fn from_io(error: &io::Error) -> Self {
        JobFailure::new(strerror(error))
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// An I/O error's text as QEMU prints it (`strerror`): `Input/output error`, without Rust's
/// ` (os error N)` suffix.
pub fn strerror(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(cut) if error.raw_os_error().is_some() => text[..cut].to_string(),
        _ => text,
    }
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobFailure {}

/// The job-specific part of a job. `run` is the work; the other hooks run synchronously, without
/// the registry lock held (they may pause or resume other jobs, e.g. to drain nodes), in the
/// order: `prepare` (all members), then per member `commit` xor `abort`, then `clean`. Each
/// member gets exactly one of `commit`/`abort` and exactly one `clean`, even if it never ran.
pub trait JobDriver: Send + 'static {
    /// The job type (`backup`, `mirror`, ...).
    fn job_type(&self) -> JobType;

    /// Whether `complete` is accepted once the job is READY (mirror-like jobs). The driver sees
    /// the request through [`JobContext::should_complete`].
    fn supports_complete(&self) -> bool {
        false
    }

    /// Whether a non-forced cancel in READY/STANDBY is soft ("complete without switching": the
    /// job keeps running and finishes normally, see [`JobContext::cancel_requested`]). Otherwise
    /// every cancel is forced (backup).
    fn soft_cancel_when_ready(&self) -> bool {
        false
    }

    /// A mirror's `actively-synced` flag (`query-block-jobs`), which the driver keeps; `None`
    /// for jobs without one (reported false).
    fn actively_synced(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        None
    }

    /// The work. Call [`JobContext::pause_point`] / [`JobContext::rate_limit`] regularly and
    /// return soon after [`JobContext::is_cancelled`] turns true (the result of a force-cancelled
    /// job is ignored: it ends cancelled).
    fn run<'a>(&'a mut self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobFailure>>;

    /// Last check before the transaction commits; a failure aborts the whole transaction.
    fn prepare(&mut self) -> Result<(), JobFailure> {
        Ok(())
    }

    /// The transaction succeeded.
    fn commit(&mut self) {}

    /// The job or its transaction failed or was cancelled.
    fn abort(&mut self) {}

    /// After `commit` or `abort`, always.
    fn clean(&mut self) {}
}
