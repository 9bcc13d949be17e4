//! JSON → typed → JSON gives back the same JSON, construct by construct.

use qmp_api::*;
use serde_json::{Value, json};

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(value: Value) -> Value {
    let typed: T = serde_json::from_value(value).expect("valid input");
    serde_json::to_value(&typed).expect("serialisable")
}

#[test]
fn enum_round_trips_through_its_wire_name() {
    assert_eq!(
        round_trip::<BlockJobVerb>(json!("set-speed")),
        json!("set-speed")
    );
    assert_eq!(BlockJobVerb::SetSpeed.as_str(), "set-speed");
    assert_eq!(
        "finalize".parse::<BlockJobVerb>(),
        Ok(BlockJobVerb::Finalize)
    );
    assert_eq!(BlockJobStatus::ALL.len(), 11);
}

#[test]
fn struct_with_base_and_optionals_round_trips_and_omits_absent_members() {
    let v = json!({"job-id": "j", "device": "a", "sync": "full", "auto-finalize": false, "target": "t"});
    assert_eq!(round_trip::<BlockdevBackup>(v.clone()), v);
}

#[test]
fn union_round_trips_with_discriminator_and_branch_in_one_object() {
    let v =
        json!({"type": "blockdev-backup", "data": {"device": "a", "sync": "full", "target": "t"}});
    assert_eq!(round_trip::<TransactionAction>(v.clone()), v);
    let v = json!({"type": "abort", "data": {}});
    assert_eq!(round_trip::<TransactionAction>(v.clone()), v);
}

#[test]
fn deserialize_reports_errors_with_qemus_messages() {
    let e = serde_json::from_value::<BlockdevBackup>(json!({"device": "a", "sync": "full"}))
        .unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'target' is missing");
}

#[test]
fn event_wire_form_has_timestamp_event_and_data() {
    let event = Event::JobStatusChange(JobStatusChangeData {
        id: "j".into(),
        status: BlockJobStatus::Running,
    });
    let wire = event.to_wire(EventTimestamp {
        seconds: 1,
        microseconds: 2,
    });
    assert_eq!(
        wire,
        json!({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE",
               "data": {"id": "j", "status": "running"}})
    );
    assert_eq!(Event::from_wire(&wire), Ok(event));
}

#[test]
fn introspection_lists_commands_events_and_masked_types() {
    let schema = qmp_schema();
    let entries = schema.as_array().expect("a list");
    let finalize = entries
        .iter()
        .find(|e| e["name"] == "block-job-finalize")
        .expect("block-job-finalize listed");
    assert_eq!(finalize["meta-type"], "command");
    assert!(
        finalize["arg-type"]
            .as_str()
            .unwrap()
            .parse::<u32>()
            .is_ok()
    );
    assert!(
        entries
            .iter()
            .any(|e| e["meta-type"] == "builtin" && e["name"] == "str")
    );
}

#[test]
fn alternate_round_trips_by_json_type() {
    assert_eq!(round_trip::<BlockdevRef>(json!("node0")), json!("node0"));
    let v = json!({"driver": "file", "filename": "/tmp/a.qcow2"});
    assert_eq!(round_trip::<BlockdevRef>(v.clone()), v);
    assert_eq!(round_trip::<BlockdevRefOrNull>(json!(null)), json!(null));
}

#[test]
fn nested_union_in_alternate_in_union_round_trips() {
    let v = json!({"driver": "qcow2", "node-name": "a",
                   "file": {"driver": "file", "filename": "/tmp/a.qcow2"}});
    let typed: BlockdevOptions = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(typed.branch.kind(), BlockdevDriver::Qcow2);
    assert_eq!(serde_json::to_value(&typed).unwrap(), v);
}
