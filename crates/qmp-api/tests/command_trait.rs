//! Every command's argument type implements `qapi_runtime::Command`: a client generic
//! over any generated API sends it and reads back the typed return.

use qapi_runtime::{Command, QmpError};
use qmp_api::*;
use serde_json::{Value, json};

/// What a client does with a command, against a server behind `dispatch`: serialise the
/// arguments, run the command, read the typed return. Generic over `Command`: it names
/// no type of this API.
fn execute<C: Command>(server: &mut impl Commands, command: C) -> Result<C::Returns, QmpError> {
    let arguments = command.arguments()?;
    let reply = dispatch(server, C::NAME, Some(arguments))?;
    C::read_returns(&reply)
}

/// A server with one job that can be finalized and listed.
#[derive(Default)]
struct OneJob {
    finalized: Vec<String>,
}

impl Commands for OneJob {
    fn block_job_finalize(&mut self, args: BlockJobFinalizeArguments) -> Result<(), QmpError> {
        self.finalized.push(args.id);
        Ok(())
    }
    fn query_jobs(&mut self) -> Result<Vec<JobInfo>, QmpError> {
        Ok(vec![JobInfo::new(
            "j",
            JobType::Backup,
            BlockJobStatus::Pending,
            1,
            1,
        )])
    }
}

#[test]
fn a_command_with_arguments_and_no_returns_gives_unit() {
    let mut server = OneJob::default();
    let () = execute(&mut server, BlockJobFinalizeArguments { id: "j".into() }).unwrap();
    assert_eq!(server.finalized, ["j"]);
}

#[test]
fn a_command_without_data_has_an_empty_argument_type_and_a_typed_return() {
    let jobs: Vec<JobInfo> = execute(&mut OneJob::default(), QueryJobsArguments {}).unwrap();
    assert_eq!(jobs[0].status, BlockJobStatus::Pending);
    assert_eq!(
        QueryJobsArguments {}.arguments().unwrap(),
        serde_json::Map::new()
    );
}

#[test]
fn a_command_the_server_lacks_is_command_not_found() {
    let e = execute(&mut OneJob::default(), BlockJobCancelArguments::new("j")).unwrap_err();
    assert_eq!(e.class, ErrorClass::CommandNotFound);
}

#[test]
fn argument_types_know_their_command_and_its_properties() {
    assert_eq!(BlockJobFinalizeArguments::NAME, "block-job-finalize");
    assert_eq!(
        BlockJobFinalizeArguments::PROPERTIES,
        qapi_runtime::CommandProperties {
            name: "block-job-finalize",
            success_response: true,
            allow_oob: false,
            allow_preconfig: true,
            deprecated: false,
        }
    );
    assert_eq!(
        command_properties("block-job-finalize"),
        Some(&BlockJobFinalizeArguments::PROPERTIES)
    );
    for properties in COMMANDS {
        assert!(command_properties(properties.name).is_some());
    }
}

#[test]
fn a_command_with_named_data_wraps_its_type() {
    let options: BlockdevOptions =
        serde_json::from_value(json!({"driver": "null-co", "node-name": "n0"})).unwrap();
    let args = BlockdevAddArguments::from(options);
    assert_eq!(
        Value::Object(args.arguments().unwrap()),
        json!({"driver": "null-co", "node-name": "n0"})
    );
    assert_eq!(BlockdevAddArguments::NAME, "blockdev-add");
}

#[test]
fn the_event_enum_implements_the_runtime_event_trait() {
    fn names<E: qapi_runtime::Event>(messages: &[Value]) -> Vec<String> {
        messages
            .iter()
            .map(|m| E::from_wire(m).unwrap().name().to_string())
            .collect()
    }
    let messages = [
        json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"}}),
        json!({"event": "SOMETHING_NEW"}),
    ];
    assert_eq!(
        names::<Event>(&messages),
        ["JOB_STATUS_CHANGE", "SOMETHING_NEW"]
    );
    let event = Event::from_wire(&messages[0]).unwrap();
    assert_eq!(event.data(), Some(json!({"id": "j", "status": "running"})));
}
