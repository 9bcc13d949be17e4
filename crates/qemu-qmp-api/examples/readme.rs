use qemu_qmp_api::qapi_runtime::{Command, QmpError};
use qemu_qmp_api::{BlockJobInfo, Event, QueryBlockJobsArguments};
use serde_json::json;

fn main() -> Result<(), QmpError> {
    // What a client sends: {"execute": "query-block-jobs", "arguments": {}}.
    let arguments = QueryBlockJobsArguments {}.arguments()?;
    let request = json!({"execute": QueryBlockJobsArguments::NAME, "arguments": arguments});
    // QEMU's reply, read as the command's return type (tolerant of newer QEMUs).
    let jobs: Vec<BlockJobInfo> = QueryBlockJobsArguments::read_returns(&json!([]))?;
    // An event; one a newer QEMU added reads as Event::UnknownEvent.
    let event = Event::from_wire(
        &json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}),
    )?;
    println!("{request}: {} jobs; {} received", jobs.len(), event.name());
    Ok(())
}
