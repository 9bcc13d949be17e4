//! As a downstream crate would: build a grouped `transaction` of two
//! `blockdev-backup` actions, serialise it, and read a recorded event stream
//! from qemu-storage-daemon into typed events.
//!
//! Run with `cargo run -p qmp-api --example transaction`.

use qmp_api::{
    ActionCompletionMode, BlockdevBackup, BlockdevBackupWrapper, Event, MirrorSyncMode,
    TransactionAction, TransactionActionBranch, TransactionArguments, TransactionProperties,
};
use std::path::Path;

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

    let recording = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/oracle/expected/s04_grouped_both_succeed_manual_finalize.json");
    let text =
        std::fs::read_to_string(&recording).map_err(|e| format!("{}: {e}", recording.display()))?;
    let recorded: serde_json::Value = serde_json::from_str(&text)?;
    let entries = recorded["entries"]
        .as_array()
        .ok_or("recording has no entries")?;
    for entry in entries.iter().filter(|e| e.get("event").is_some()) {
        let event = Event::from_wire(entry)?;
        match &event {
            Event::JobStatusChange(data) => {
                println!("{}: {} -> {}", event.name(), data.id, data.status)
            }
            other => println!("{}: {:?}", other.name(), other),
        }
    }
    Ok(())
}
