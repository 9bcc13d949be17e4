//! As a downstream crate would: build a grouped `transaction` of two
//! `blockdev-backup` actions, serialise it, and read the events
//! qemu-storage-daemon 10.0.2 sent for it (recorded, oracle scenario s04)
//! into typed events.
//!
//! Run with `cargo run -p qmp-api --example transaction`.

use qmp_api::{
    ActionCompletionMode, BlockdevBackup, BlockdevBackupWrapper, Event, MirrorSyncMode,
    TransactionAction, TransactionActionBranch, TransactionArguments, TransactionProperties,
};

/// The events of the recording, one message a line (timestamps left out).
const RECORDED_EVENTS: &str = r#"
{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "ja"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "jb"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "jb"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "paused", "id": "jb"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "ja"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "paused", "id": "ja"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "jb"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "ja"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "ja"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "jb"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "jb"}}
{"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "jb"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "ja"}}
{"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "ja"}}
{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "jb", "len": 4194304, "offset": 4194304, "speed": 4194304, "type": "backup"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "jb"}}
{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "ja", "len": 1048576, "offset": 1048576, "speed": 0, "type": "backup"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "ja"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "ja"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "jb"}}
"#;

fn backup(job: &str, device: &str, target: &str) -> TransactionAction {
    let mut data = BlockdevBackup::new(device, MirrorSyncMode::Full, target);
    data.job_id = Some(job.to_string());
    data.auto_finalize = Some(false);
    data.auto_dismiss = Some(false);
    TransactionAction::new(TransactionActionBranch::BlockdevBackup(
        BlockdevBackupWrapper { data },
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let transaction = TransactionArguments {
        actions: vec![backup("ja", "a", "ta"), backup("jb", "b", "tb")],
        properties: Some(TransactionProperties {
            completion_mode: Some(ActionCompletionMode::Grouped),
        }),
    };
    let command = serde_json::json!({ "execute": "transaction", "arguments": transaction });
    println!("{}", serde_json::to_string_pretty(&command)?);

    for line in RECORDED_EVENTS.lines().filter(|l| !l.is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line)?;
        let event = Event::from_wire(&entry)?;
        match &event {
            Event::JobStatusChange(data) => {
                println!("{}: {} -> {}", event.name(), data.id, data.status)
            }
            other => println!("{}: {:?}", other.name(), other),
        }
    }
    Ok(())
}
