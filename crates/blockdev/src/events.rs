//! The job core's events as the generated QMP events.

use std::str::FromStr;

use job::{BlockJobProgress, ErrorAction, IoOperation, JobEvent};
use qmp_api::{
    BlockErrorAction, BlockJobCancelledData, BlockJobCompletedData, BlockJobErrorData,
    BlockJobPendingData, BlockJobReadyData, Event, IoOperationType, JobStatusChangeData, JobType,
};

fn job_type(name: &str) -> JobType {
    // Every driver of ours names a QAPI job type; an unknown name would be a driver bug.
    JobType::from_str(name).unwrap_or(JobType::Backup)
}

fn wire_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn progress_fields(p: &BlockJobProgress) -> (JobType, String, i64, i64, i64) {
    (
        job_type(p.job_type),
        p.device.clone(),
        wire_int(p.len),
        wire_int(p.offset),
        wire_int(p.speed),
    )
}

/// The QMP event for a job event.
pub fn qmp_event(event: JobEvent) -> Event {
    match event {
        JobEvent::StatusChange { id, status } => {
            Event::JobStatusChange(JobStatusChangeData::new(id, status))
        }
        JobEvent::Completed { progress, error } => {
            let (t, device, len, offset, speed) = progress_fields(&progress);
            let mut data = BlockJobCompletedData::new(t, device, len, offset, speed);
            data.error = error;
            Event::BlockJobCompleted(data)
        }
        JobEvent::Cancelled(progress) => {
            let (t, device, len, offset, speed) = progress_fields(&progress);
            Event::BlockJobCancelled(BlockJobCancelledData::new(t, device, len, offset, speed))
        }
        JobEvent::Ready(progress) => {
            let (t, device, len, offset, speed) = progress_fields(&progress);
            Event::BlockJobReady(BlockJobReadyData::new(t, device, len, offset, speed))
        }
        JobEvent::Pending { job_type: t, id } => {
            Event::BlockJobPending(BlockJobPendingData::new(job_type(t), id))
        }
        JobEvent::Error {
            device,
            operation,
            action,
        } => Event::BlockJobError(BlockJobErrorData::new(
            device,
            match operation {
                IoOperation::Read => IoOperationType::Read,
                IoOperation::Write => IoOperationType::Write,
            },
            match action {
                ErrorAction::Ignore => BlockErrorAction::Ignore,
                ErrorAction::Report => BlockErrorAction::Report,
                ErrorAction::Stop => BlockErrorAction::Stop,
            },
        )),
    }
}
