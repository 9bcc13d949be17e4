//! `dispatch` answers like qemu-storage-daemon 10.0.2. Every expected message
//! below was checked against the real daemon (same input, same answer).

use qmp_api::*;
use serde_json::{Map, Value, json};

/// Records what the handlers received.
#[derive(Default)]
struct Recorder {
    speeds: Vec<(String, i64)>,
    transactions: Vec<TransactionArguments>,
}

impl Commands for Recorder {
    fn block_job_set_speed(&mut self, args: BlockJobSetSpeedArguments) -> Result<(), QmpError> {
        self.speeds.push((args.device, args.speed));
        Ok(())
    }

    fn transaction(&mut self, args: TransactionArguments) -> Result<(), QmpError> {
        self.transactions.push(args);
        Ok(())
    }

    fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>, QmpError> {
        Ok(Vec::new())
    }
}

fn args(value: Value) -> Option<Map<String, Value>> {
    match value {
        Value::Object(map) => Some(map),
        _ => panic!("test arguments must be an object"),
    }
}

fn error_of(name: &str, arguments: Value) -> QmpError {
    dispatch(&mut Recorder::default(), name, args(arguments)).expect_err("command must fail")
}

fn desc(name: &str, arguments: Value) -> String {
    error_of(name, arguments).desc
}

#[test]
fn command_with_valid_arguments_reaches_its_handler_and_returns_empty_object() {
    let mut handler = Recorder::default();
    let ret = dispatch(
        &mut handler,
        "block-job-set-speed",
        args(json!({"device": "j", "speed": 5})),
    );
    assert_eq!(ret, Ok(json!({})));
    assert_eq!(handler.speeds, [("j".to_string(), 5)]);
}

#[test]
fn command_with_returns_answers_its_serialised_value() {
    let ret = dispatch(&mut Recorder::default(), "query-block-jobs", None);
    assert_eq!(ret, Ok(json!([])));
}

#[test]
fn unknown_command_is_command_not_found() {
    let e = error_of("bogus-cmd", json!({}));
    assert_eq!(e.class, ErrorClass::CommandNotFound);
    assert_eq!(e.desc, "The command bogus-cmd has not been found");
}

#[test]
fn command_without_a_handler_is_command_not_found() {
    let e = error_of("block-job-finalize", json!({"id": "j"}));
    assert_eq!(e.class, ErrorClass::CommandNotFound);
    assert_eq!(e.desc, "The command block-job-finalize has not been found");
}

#[test]
fn missing_member_is_reported_by_name() {
    assert_eq!(
        desc("block-job-set-speed", json!({"speed": 1})),
        "Parameter 'device' is missing"
    );
}

#[test]
fn absent_arguments_are_an_empty_object() {
    let e = dispatch(&mut Recorder::default(), "block-job-set-speed", None).unwrap_err();
    assert_eq!(e.desc, "Parameter 'device' is missing");
}

#[test]
fn unknown_member_is_unexpected() {
    assert_eq!(
        desc(
            "block-job-set-speed",
            json!({"device": "x", "speed": 1, "bogus": 2})
        ),
        "Parameter 'bogus' is unexpected"
    );
}

#[test]
fn arguments_to_a_command_without_data_are_unexpected() {
    assert_eq!(
        desc("query-block-jobs", json!({"x": 1})),
        "Parameter 'x' is unexpected"
    );
}

#[test]
fn string_member_given_a_number_or_null_is_invalid_type() {
    let want = "Invalid parameter type for 'device', expected: string";
    assert_eq!(
        desc("block-job-set-speed", json!({"device": 1, "speed": 1})),
        want
    );
    assert_eq!(
        desc("block-job-set-speed", json!({"device": null, "speed": 1})),
        want
    );
}

#[test]
fn integer_member_rejects_strings_fractions_and_out_of_range_numbers() {
    let want = "Invalid parameter type for 'speed', expected: integer";
    for speed in [json!("a"), json!(1.5), json!(18446744073709551615u64)] {
        assert_eq!(
            desc(
                "block-job-set-speed",
                json!({"device": "x", "speed": speed})
            ),
            want
        );
    }
}

#[test]
fn enum_member_with_unknown_value_names_only_the_member() {
    let arguments = json!({"actions": [
        {"type": "abort", "data": {}},
        {"type": "blockdev-backup", "data": {"device": "n0", "target": "n1", "sync": "bogus"}}
    ]});
    assert_eq!(
        desc("transaction", arguments),
        "Parameter 'sync' does not accept value 'bogus'"
    );
}

#[test]
fn enum_member_given_a_number_is_invalid_type_string() {
    assert_eq!(
        desc(
            "blockdev-backup",
            json!({"device": "n0", "target": "n1", "sync": 1})
        ),
        "Invalid parameter type for 'sync', expected: string"
    );
}

#[test]
fn nested_missing_member_has_its_full_path() {
    let arguments =
        json!({"actions": [{"type": "blockdev-backup", "data": {"target": "n1", "sync": "full"}}]});
    assert_eq!(
        desc("transaction", arguments),
        "Parameter 'actions[0].data.device' is missing"
    );
}

#[test]
fn nested_mistyped_member_has_its_full_path() {
    let arguments = json!({"actions": [{"type": "blockdev-backup", "data": {"device": 1, "target": "n1", "sync": "full"}}]});
    assert_eq!(
        desc("transaction", arguments),
        "Invalid parameter type for 'actions[0].data.device', expected: string"
    );
}

#[test]
fn union_discriminator_missing_mistyped_or_unknown() {
    assert_eq!(
        desc("transaction", json!({"actions": [{"data": {}}]})),
        "Parameter 'actions[0].type' is missing"
    );
    assert_eq!(
        desc("transaction", json!({"actions": [{"type": 5, "data": {}}]})),
        "Invalid parameter type for 'actions[0].type', expected: string"
    );
    assert_eq!(
        desc(
            "transaction",
            json!({"actions": [{"type": "bogus", "data": {}}]})
        ),
        "Parameter 'type' does not accept value 'bogus'"
    );
}

#[test]
fn union_branch_member_missing_or_unexpected() {
    assert_eq!(
        desc("transaction", json!({"actions": [{"type": "abort"}]})),
        "Parameter 'actions[0].data' is missing"
    );
    assert_eq!(
        desc(
            "transaction",
            json!({"actions": [{"type": "abort", "data": {}, "x": 1}]})
        ),
        "Parameter 'actions[0].x' is unexpected"
    );
    assert_eq!(
        desc(
            "transaction",
            json!({"actions": [{"type": "abort", "data": {"x": 1}}]})
        ),
        "Parameter 'actions[0].data.x' is unexpected"
    );
}

#[test]
fn array_and_object_shapes_are_checked() {
    assert_eq!(
        desc("transaction", json!({"actions": [1]})),
        "Invalid parameter type for 'actions[0]', expected: object"
    );
    assert_eq!(
        desc("transaction", json!({"actions": {}})),
        "Invalid parameter type for 'actions', expected: array"
    );
    assert_eq!(
        desc("transaction", json!({"actions": [], "properties": []})),
        "Invalid parameter type for 'properties', expected: object"
    );
}

#[test]
fn nested_struct_errors_use_dotted_paths() {
    assert_eq!(
        desc(
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "grouped", "y": 1}})
        ),
        "Parameter 'properties.y' is unexpected"
    );
    assert_eq!(
        desc(
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": 5}})
        ),
        "Invalid parameter type for 'properties.completion-mode', expected: string"
    );
    assert_eq!(
        desc(
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "x"}})
        ),
        "Parameter 'completion-mode' does not accept value 'x'"
    );
}

#[test]
fn optional_boolean_given_null_is_invalid_type() {
    assert_eq!(
        desc(
            "blockdev-backup",
            json!({"device": "n0", "target": "n1", "sync": "full", "auto-finalize": null})
        ),
        "Invalid parameter type for 'auto-finalize', expected: boolean"
    );
}

#[test]
fn transaction_arguments_are_typed() {
    let mut handler = Recorder::default();
    let arguments = json!({
        "actions": [{"type": "blockdev-backup", "data": {"device": "a", "target": "ta", "sync": "full"}}],
        "properties": {"completion-mode": "grouped"}
    });
    dispatch(&mut handler, "transaction", args(arguments)).unwrap();
    let t = &handler.transactions[0];
    assert_eq!(
        t.properties.as_ref().unwrap().completion_mode,
        Some(ActionCompletionMode::Grouped)
    );
    match &t.actions[0].branch {
        TransactionActionBranch::BlockdevBackup(w) => {
            assert_eq!(w.data.device, "a");
            assert_eq!(w.data.sync, MirrorSyncMode::Full);
        }
        other => panic!("wrong branch {other:?}"),
    }
}

#[test]
fn alternate_matching_no_branch_names_the_member_and_the_alternate() {
    let want = "Invalid parameter type for 'file', expected: BlockdevRef";
    for file in [json!(1), json!(null)] {
        let arguments = json!({"driver": "qcow2", "node-name": "q", "file": file});
        assert_eq!(desc("blockdev-add", arguments), want);
    }
}

#[test]
fn alternate_object_branch_reports_nested_paths() {
    let arguments = json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file"}});
    assert_eq!(
        desc("blockdev-add", arguments),
        "Parameter 'file.filename' is missing"
    );
    let arguments = json!({"driver": "qcow2", "node-name": "q",
                           "file": {"driver": "file", "filename": "/x", "bogus": 1}});
    assert_eq!(
        desc("blockdev-add", arguments),
        "Parameter 'file.bogus' is unexpected"
    );
}

#[test]
fn boxed_union_discriminator_missing_or_unknown() {
    assert_eq!(
        desc("blockdev-add", json!({"node-name": "q"})),
        "Parameter 'driver' is missing"
    );
    assert_eq!(
        desc("blockdev-add", json!({"driver": "bogus"})),
        "Parameter 'driver' does not accept value 'bogus'"
    );
}

#[test]
fn nested_struct_member_type_error_has_dotted_path() {
    let arguments =
        json!({"driver": "raw", "node-name": "q", "file": "n0", "cache": {"direct": "x"}});
    assert_eq!(
        desc("blockdev-add", arguments),
        "Invalid parameter type for 'cache.direct', expected: boolean"
    );
}

#[test]
fn uint32_member_out_of_range_or_negative_expects_uint32_t() {
    for granularity in [json!(-1), json!(4294967296u64)] {
        let arguments = json!({"node": "n0", "name": "b", "granularity": granularity});
        assert_eq!(
            desc("block-dirty-bitmap-add", arguments),
            "Parameter 'granularity' expects uint32_t"
        );
    }
}

#[test]
fn uint32_member_given_a_string_expects_uint64_with_full_path() {
    let arguments = json!({"node": "n0", "name": "b", "granularity": "x"});
    assert_eq!(
        desc("block-dirty-bitmap-add", arguments),
        "Parameter 'granularity' expects uint64"
    );
    let arguments = json!({"actions": [{"type": "block-dirty-bitmap-add",
                                        "data": {"node": "n0", "name": "b", "granularity": "x"}}]});
    assert_eq!(
        desc("transaction", arguments),
        "Parameter 'actions[0].data.granularity' expects uint64"
    );
}

#[test]
fn uint32_member_in_a_transaction_names_only_the_member_when_out_of_range() {
    let arguments = json!({"actions": [{"type": "block-dirty-bitmap-add",
                                        "data": {"node": "n0", "name": "b", "granularity": -5}}]});
    assert_eq!(
        desc("transaction", arguments),
        "Parameter 'granularity' expects uint32_t"
    );
}
