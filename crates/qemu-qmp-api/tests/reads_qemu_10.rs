//! QEMU 9.1's API (this crate) driving a newer QEMU, live: qemu-storage-daemon 10.0
//! answers and sends members this schema does not know (`BlockDeviceInfo.active`, new
//! introspection entries), and the client, generic over `Command`, reads them all.

use qemu_qmp_api::qapi_runtime::{Command, QmpError};
use qemu_qmp_api::{
    BlockJobSetSpeedArguments, BlockdevAddArguments, BlockdevBackup, BlockdevBackupArguments,
    Event, JobStatus, MirrorSyncMode, QmpCapabilitiesArguments, QueryCommandsArguments,
    QueryNamedBlockNodesArguments, QueryQmpSchemaArguments, QueryVersionArguments, qapi_runtime,
};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

/// A QMP client over qemu-storage-daemon's stdio monitor, generic over any command.
struct Client {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    /// Events received so far, as sent.
    events: Vec<Value>,
}

impl Client {
    fn start() -> Client {
        let mut child = std::process::Command::new("qemu-storage-daemon")
            .args(["--chardev", "stdio,id=m", "--monitor", "chardev=m"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon runs (install qemu-utils; .ci/run does)");
        let input = child.stdin.take().expect("stdin");
        let output = BufReader::new(child.stdout.take().expect("stdout"));
        let mut client = Client {
            child,
            input,
            output,
            events: Vec::new(),
        };
        let greeting = client.message();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        client
            .execute(QmpCapabilitiesArguments::new())
            .expect("capabilities negotiated");
        client
    }

    fn message(&mut self) -> Value {
        let mut line = String::new();
        let read = self.output.read_line(&mut line).expect("reads the monitor");
        assert!(read > 0, "qemu-storage-daemon closed its monitor");
        serde_json::from_str(&line).expect("QMP sends JSON")
    }

    /// Sends `command`, keeps the events that come before its reply, reads the reply.
    fn execute<C: Command>(&mut self, command: C) -> Result<C::Returns, QmpError> {
        let request = json!({"execute": C::NAME, "arguments": command.arguments()?});
        writeln!(self.input, "{request}").expect("writes the monitor");
        loop {
            let message = self.message();
            if message.get("event").is_some() {
                self.events.push(message);
            } else if let Some(error) = message.get("error") {
                return Err(serde_json::from_value(error.clone()).expect("a QMP error"));
            } else {
                return C::read_returns(&message["return"]);
            }
        }
    }

    /// Reads until event `name` has been received (the daemon sends it without being asked).
    fn wait_for_event(&mut self, name: &str) {
        while !self.events.iter().any(|e| e["event"] == name) {
            let message = self.message();
            assert!(message.get("event").is_some(), "unexpected {message}");
            self.events.push(message);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.input, "{}", json!({"execute": "quit"}));
        let _ = self.child.wait();
    }
}

fn null_node(name: &str) -> BlockdevAddArguments {
    let options = json!({"driver": "null-co", "node-name": name, "size": 1048576});
    BlockdevAddArguments(serde_json::from_value(options).expect("typed options"))
}

#[test]
fn a_client_of_qemu_9_1s_api_reads_qemu_10s_replies_and_events() {
    let mut qemu = Client::start();
    let version = qemu
        .execute(QueryVersionArguments {})
        .expect("query-version");
    assert_eq!(
        version.qemu.major, 10,
        "qemu-storage-daemon 10.x is installed"
    );

    qemu.execute(null_node("src")).expect("blockdev-add");
    qemu.execute(null_node("dst")).expect("blockdev-add");

    // QEMU 10 reports members 9.1 does not know: read without error, left out.
    let nodes = qemu
        .execute(QueryNamedBlockNodesArguments::new())
        .expect("query-named-block-nodes");
    assert_eq!(nodes.len(), 2);
    let raw = serde_json::to_value(&nodes[0]).expect("serialises");
    assert!(
        raw.get("active").is_none(),
        "QEMU 10's `active` is not in 9.1's schema"
    );
    assert_eq!(nodes[0].drv, "null-co");

    let mut backup = BlockdevBackup::new("src", MirrorSyncMode::Full, "dst");
    backup.job_id = Some("job0".into());
    qemu.execute(BlockdevBackupArguments(backup))
        .expect("blockdev-backup");
    qemu.wait_for_event("BLOCK_JOB_COMPLETED");
    let events: Vec<Event> = qemu
        .events
        .iter()
        .map(|e| Event::from_wire(e).expect("every event reads"))
        .collect();
    let statuses: Vec<JobStatus> = events
        .iter()
        .filter_map(|e| match e {
            Event::JobStatusChange(change) => Some(change.status),
            _ => None,
        })
        .collect();
    assert_eq!(statuses.first(), Some(&JobStatus::Created));
    assert!(statuses.contains(&JobStatus::Concluded), "{statuses:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::BlockJobCompleted(c) if c.device == "job0")),
        "{events:?}"
    );

    // QEMU 10's whole introspection, read into 9.1's types.
    let schema = qemu
        .execute(QueryQmpSchemaArguments {})
        .expect("query-qmp-schema");
    assert!(schema.iter().any(|info| info.name == "blockdev-backup"));
    let commands = qemu
        .execute(QueryCommandsArguments {})
        .expect("query-commands");
    assert!(commands.iter().any(|c| c.name == "query-version"));

    // The strict side is QEMU's own: it refuses what its schema does not have.
    let error = qemu
        .execute(BlockJobSetSpeedArguments::new("job0", -1))
        .expect_err("no such job any more");
    assert_eq!(error.class, qapi_runtime::ErrorClass::DeviceNotActive);
}
