// The tests every demo crate runs on its own generated API, named `api` where this file
// is included (`tests/uses_the_api.rs` of each crate): what a downstream crate does
// with the types, whichever way they were generated.

use api::*;
use qapi_runtime::{Command, Enum};
use serde_json::{Value, json};

#[test]
fn a_command_with_inline_arguments_serialises_to_its_arguments_object() {
    let cancel = JobCancelArguments {
        id: "job0".into(),
        force: Some(true),
    };
    assert_eq!(JobCancelArguments::NAME, "job-cancel");
    assert_eq!(
        Value::Object(cancel.arguments().unwrap()),
        json!({"id": "job0", "force": true})
    );
    assert_eq!(
        Value::Object(JobCancelArguments::new("job0").arguments().unwrap()),
        json!({"id": "job0"})
    );
}

#[test]
fn a_command_with_a_union_as_arguments_writes_base_discriminator_and_branch_in_one_object() {
    let mut copy = CopyOptions::new("in.img", "out.img");
    copy.chunk = Some(SizeOrName::Preset(ChunkPreset::Large));
    let start = JobStartArguments(JobOptions::new("job0", JobOptionsBranch::Copy(copy)));
    assert_eq!(
        Value::Object(start.arguments().unwrap()),
        json!({"id": "job0", "kind": "copy", "source": "in.img", "target": "out.img",
               "chunk": "large"})
    );
}

#[test]
fn a_reply_is_read_as_the_commands_return_type_tolerantly() {
    let reply = json!([
        {"id": "job0", "kind": "copy", "state": "running", "progress-percent": 40},
        {"id": "job1", "kind": "wait", "state": "frozen", "owner": "someone"}
    ]);
    let jobs: Vec<JobInfo> = QueryJobsArguments::read_returns(&reply).unwrap();
    assert_eq!(jobs[0].progress_percent, Some(40));
    assert_eq!(jobs[1].state, JobState::UnknownValue);
    assert_eq!(QueryJobsArguments::PROPERTIES.name, "query-jobs");
    let () = JobCancelArguments::read_returns(&json!({})).unwrap();
}

#[test]
fn events_are_parsed_known_unknown_and_without_data() {
    let changed = Event::from_wire(&json!({
        "event": "JOB_STATE_CHANGED", "data": {"id": "job0", "state": "done"},
        "timestamp": {"seconds": 1, "microseconds": 0}
    }))
    .unwrap();
    assert_eq!(
        changed,
        Event::JobStateChanged(JobStateChangedData::new("job0", JobState::Done))
    );
    assert_eq!(
        Event::from_wire(&json!({"event": "HEARTBEAT"})).unwrap(),
        Event::Heartbeat
    );
    let unknown = Event::from_wire(&json!({"event": "JOB_MOVED", "data": {"to": "b"}})).unwrap();
    assert_eq!(unknown.name(), "JOB_MOVED");
    assert!(matches!(unknown, Event::UnknownEvent(_)));
}

#[test]
fn an_alternate_is_read_by_the_json_type_of_its_value() {
    let by_size: SizeOrName = serde_json::from_value(json!(4096)).unwrap();
    let by_name: SizeOrName = serde_json::from_value(json!("small")).unwrap();
    assert_eq!(by_size, SizeOrName::Size(4096));
    assert_eq!(by_name, SizeOrName::Preset(ChunkPreset::Small));
    assert_eq!(serde_json::to_value(&by_name).unwrap(), json!("small"));
}

/// A server that implements one command.
struct Service;

impl Commands for Service {
    fn job_cancel(&mut self, args: JobCancelArguments) -> qapi_runtime::Result<()> {
        match args.id.as_str() {
            "job0" => Ok(()),
            other => Err(qapi_runtime::QmpError::generic(format!(
                "Job '{other}' not found"
            ))),
        }
    }
}

#[test]
fn a_server_reads_arguments_strictly_with_qemus_messages() {
    let args = |v: Value| v.as_object().cloned();
    assert_eq!(
        dispatch(&mut Service, "job-cancel", args(json!({"id": "job0"}))),
        Ok(json!({}))
    );
    let e = dispatch(
        &mut Service,
        "job-cancel",
        args(json!({"id": "job0", "x": 1})),
    )
    .unwrap_err();
    assert_eq!(e.desc, "Parameter 'x' is unexpected");
    let e = dispatch(&mut Service, "query-jobs", None).unwrap_err();
    assert_eq!(e.class, qapi_runtime::ErrorClass::CommandNotFound);
    assert_eq!(<ChunkPreset as Enum>::UNKNOWN, None);
    assert_eq!(<JobKind as Enum>::UNKNOWN, Some(JobKind::UnknownValue));
}

#[test]
fn introspection_lists_the_commands_and_events() {
    let schema = qmp_schema();
    let names: Vec<&str> = schema
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for name in [
        "job-start",
        "job-cancel",
        "query-jobs",
        "JOB_STATE_CHANGED",
        "HEARTBEAT",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
}
