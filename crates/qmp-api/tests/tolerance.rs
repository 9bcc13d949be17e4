//! QEMU's compatibility promise, both sides: a client reads replies and events from a
//! newer server tolerantly (new members, enum values, union branches and events give
//! no error), while a server reads command arguments strictly, as QEMU does.

use qapi_runtime::{Command, Enum};
use qmp_api::*;
use serde_json::json;

fn job_info(status: &str) -> serde_json::Value {
    json!({"id": "j", "type": "backup", "status": status,
           "current-progress": 1, "total-progress": 2})
}

#[test]
fn a_reply_member_the_schema_does_not_know_is_ignored() {
    let mut reply = job_info("running");
    reply["future-member"] = json!({"any": "thing"});
    let info: JobInfo = serde_json::from_value(reply).expect("tolerant read");
    assert_eq!(info.status, BlockJobStatus::Running);
}

#[test]
fn a_reply_enum_value_the_schema_does_not_know_is_unknown_value() {
    let info: JobInfo = serde_json::from_value(job_info("hibernating")).expect("tolerant read");
    assert_eq!(info.status, BlockJobStatus::UnknownValue);
    assert!(info.status.is_unknown());
    assert!(!BlockJobStatus::ALL.contains(&BlockJobStatus::UnknownValue));
}

#[test]
fn unknown_value_cannot_be_sent_or_parsed_from_its_placeholder_name() {
    assert!(serde_json::to_value(BlockJobStatus::UnknownValue).is_err());
    assert_eq!(BlockJobStatus::UnknownValue.as_str(), "(unknown)");
    assert!("(unknown)".parse::<BlockJobStatus>().is_err());
}

#[test]
fn a_reply_union_branch_the_schema_does_not_know_is_unknown_value() {
    let reply = json!([{"type": "teleport", "device": "j", "len": 1, "offset": 0,
                        "busy": false, "paused": false, "speed": 0, "io-status": "ok",
                        "ready": false, "status": "running", "auto-finalize": true,
                        "auto-dismiss": true, "teleport-distance": 7}]);
    let jobs = QueryBlockJobsArguments::read_returns(&reply).expect("tolerant read");
    assert_eq!(jobs[0].branch, BlockJobInfoBranch::UnknownValue);
    assert_eq!(jobs[0].branch.kind(), JobType::UnknownValue);
    assert_eq!(jobs[0].device, "j");
}

#[test]
fn an_event_the_schema_does_not_know_is_unknown_event_with_its_data() {
    let message = json!({"event": "TELEPORTED", "data": {"where": "mars"},
                         "timestamp": {"seconds": 1, "microseconds": 2}});
    let event = Event::from_wire(&message).expect("tolerant read");
    assert_eq!(
        event,
        Event::UnknownEvent(qapi_runtime::UnknownEvent {
            name: "TELEPORTED".into(),
            data: Some(json!({"where": "mars"})),
        })
    );
    assert_eq!(event.name(), "TELEPORTED");
    assert_eq!(
        event.to_wire(EventTimestamp::default())["data"],
        json!({"where": "mars"})
    );
}

#[test]
fn a_known_event_with_new_members_and_values_is_read() {
    let message = json!({"event": "JOB_STATUS_CHANGE",
                         "data": {"id": "j", "status": "hibernating", "reason": "new"}});
    assert_eq!(
        Event::from_wire(&message),
        Ok(Event::JobStatusChange(JobStatusChangeData::new(
            "j",
            BlockJobStatus::UnknownValue
        )))
    );
}

#[test]
fn tolerance_does_not_excuse_wrong_types_or_missing_members() {
    let mut reply = job_info("running");
    reply["current-progress"] = json!("many");
    let e = serde_json::from_value::<JobInfo>(reply).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Invalid parameter type for 'current-progress', expected: integer"
    );
    let message = json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "running"}});
    assert_eq!(
        Event::from_wire(&message).unwrap_err().desc,
        "Parameter 'data.id' is missing"
    );
}

#[test]
fn enums_only_sent_to_a_server_have_no_unknown_value() {
    assert_eq!(<MirrorSyncMode as Enum>::UNKNOWN, None);
    let e =
        qapi_runtime::input::from_value_tolerant::<MirrorSyncMode>(&json!("sideways")).unwrap_err();
    assert_eq!(e.desc, "Parameter 'null' does not accept value 'sideways'");
}

/// A server that accepts every command it is sent, to see what `dispatch` makes of arguments.
struct Accepting;

impl Commands for Accepting {
    fn block_job_finalize(&mut self, _: BlockJobFinalizeArguments) -> Result<(), QmpError> {
        Ok(())
    }
    fn block_job_change(&mut self, _: BlockJobChangeOptions) -> Result<(), QmpError> {
        Ok(())
    }
}

fn dispatch_error(name: &str, arguments: serde_json::Value) -> String {
    let arguments = arguments.as_object().cloned();
    dispatch(&mut Accepting, name, arguments).unwrap_err().desc
}

#[test]
fn a_server_refuses_argument_members_the_schema_does_not_know() {
    assert_eq!(
        dispatch_error("block-job-finalize", json!({"id": "j", "force": true})),
        "Parameter 'force' is unexpected"
    );
}

#[test]
fn a_server_refuses_enum_values_and_branches_the_schema_does_not_know() {
    // block-job-change's union is only ever sent to a server, but its discriminator's
    // enum (JobType) is also read from replies, so it has an UnknownValue: the union
    // still refuses it with QEMU's message.
    assert_eq!(
        dispatch_error("block-job-change", json!({"id": "j", "type": "teleport"})),
        "Parameter 'type' does not accept value 'teleport'"
    );
    assert_eq!(
        dispatch_error(
            "block-job-change",
            json!({"id": "j", "type": "mirror", "copy-mode": "sideways"})
        ),
        "Parameter 'copy-mode' does not accept value 'sideways'"
    );
}
