//! What the job core tells the monitor: status changes and the `BLOCK_JOB_*` events, through a
//! sink. The monitor maps these to the generated QMP events.

use crate::BlockJobStatus;

/// The progress fields shared by `BLOCK_JOB_COMPLETED`, `_CANCELLED` and `_READY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockJobProgress {
    /// The job type (`backup`, `mirror`, ...).
    pub job_type: &'static str,
    /// The job id (QMP calls it `device`).
    pub device: String,
    /// Total progress.
    pub len: u64,
    /// Current progress.
    pub offset: u64,
    /// Rate limit in bytes per second, 0 for none.
    pub speed: u64,
}

/// Read or write, for `BLOCK_JOB_ERROR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOperation {
    Read,
    Write,
}

impl IoOperation {
    /// The wire name (`IoOperationType`).
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// What a job did about an I/O error (`BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    Ignore,
    Report,
    Stop,
}

impl ErrorAction {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

/// One event, in the order QEMU emits them. Jobs without an id emit none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE {id, status}`: every real change of status.
    StatusChange { id: String, status: BlockJobStatus },
    /// `BLOCK_JOB_COMPLETED`: finished, successfully or (with `error`) not.
    Completed {
        progress: BlockJobProgress,
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`: finished after a (forced) cancel.
    Cancelled(BlockJobProgress),
    /// `BLOCK_JOB_READY`: the job converged and waits for complete or cancel.
    Ready(BlockJobProgress),
    /// `BLOCK_JOB_PENDING {type, id}`: waits for an explicit finalize.
    Pending { job_type: &'static str, id: String },
    /// `BLOCK_JOB_ERROR {device, operation, action}`.
    Error {
        device: String,
        operation: IoOperation,
        action: ErrorAction,
    },
}

/// Receives the events. Called with the job registry's lock held, so events arrive in order;
/// an implementation must not call back into the registry (queue the event and return).
pub trait EventSink: Send + Sync {
    fn emit(&self, event: JobEvent);
}

impl<F: Fn(JobEvent) + Send + Sync> EventSink for F {
    fn emit(&self, event: JobEvent) {
        self(event)
    }
}
