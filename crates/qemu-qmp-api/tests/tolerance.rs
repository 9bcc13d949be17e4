//! QEMU's compatibility promise, both sides, on QEMU's complete API: events and enum
//! values a newer QEMU adds are typed unknown values for a client; a server refuses
//! what its schema does not have.

use qemu_qmp_api::qapi_runtime::{QmpError, UnknownEvent};
use qemu_qmp_api::{Commands, Event, JobStatus, JobStatusChangeData, dispatch};
use serde_json::json;

#[test]
fn an_event_qemu_adds_later_is_unknown_event() {
    let message = json!({"event": "VCPU_TELEPORTED", "data": {"cpu": 3},
                         "timestamp": {"seconds": 1, "microseconds": 0}});
    assert_eq!(
        Event::from_wire(&message),
        Ok(Event::UnknownEvent(UnknownEvent {
            name: "VCPU_TELEPORTED".into(),
            data: Some(json!({"cpu": 3})),
        }))
    );
}

#[test]
fn an_enum_value_qemu_adds_later_in_event_data_is_unknown_value() {
    let message = json!({"event": "JOB_STATUS_CHANGE",
                         "data": {"id": "job0", "status": "hibernating"}});
    assert_eq!(
        Event::from_wire(&message),
        Ok(Event::JobStatusChange(JobStatusChangeData::new(
            "job0",
            JobStatus::UnknownValue
        )))
    );
}

struct Server;
impl Commands for Server {}

#[test]
fn a_server_refuses_enum_values_and_members_its_schema_does_not_have() {
    let refuse = |name: &str, arguments: serde_json::Value| -> QmpError {
        dispatch(&mut Server, name, arguments.as_object().cloned()).expect_err("refused")
    };
    let e = refuse(
        "blockdev-backup",
        json!({"device": "a", "target": "b", "sync": "sideways"}),
    );
    assert_eq!(e.desc, "Parameter 'sync' does not accept value 'sideways'");
    let e = refuse("query-version", json!({"verbose": true}));
    assert_eq!(e.desc, "Parameter 'verbose' is unexpected");
}
