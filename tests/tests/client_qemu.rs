//! The client against QEMU itself and the guest agent, each through the API generated
//! from its own schema (GPL crates, used by tests only):
//!
//! - Debian 12's QEMU 7.2 system emulator (`qemu-system-x86_64 -machine none`), driven
//!   with `qemu-qmp-api`, generated from QEMU 9.1's schema: the versions differ, so
//!   replies carry less (or other) than the schema says, and the tolerance rules decide.
//!   `.ci/qemu-system-7.2` unpacks the emulator under `target/qemu-7.2/` (installing the
//!   package would replace the reference qemu-utils 10.0.2 with 7.2).
//! - The guest agent (`qemu-ga` from `qemu-guest-agent`) listening on a unix socket on
//!   this machine, driven with `qemu-ga-api`.

use blockjobs_tests::{repo_root, require_tool};
use qmp_client::{Client, Error, ErrorClass};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed and reaped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(server: &mut Server, socket: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    // The file appears at bind(), before listen(): wait for an accepted connection.
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{what}: no socket after 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Debian 12's QEMU 7.2, unpacked by `.ci/qemu-system-7.2`.
fn qemu_7_2() -> (PathBuf, PathBuf) {
    let root = repo_root().join("target/qemu-7.2");
    let binary = root.join("usr/bin/qemu-system-x86_64");
    assert!(
        binary.is_file(),
        "{} is missing: run `bash .ci/qemu-system-7.2` (.ci/run does; it needs apt-get)",
        binary.display()
    );
    (binary, root.join("usr/lib/x86_64-linux-gnu/qemu"))
}

fn start_qemu(dir: &Path) -> (Server, PathBuf) {
    let (binary, modules) = qemu_7_2();
    let socket = dir.join("qmp.sock");
    let child = Command::new(binary)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .env("QEMU_MODULE_DIR", modules)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let mut server = Server(child);
    wait_for_socket(&mut server, &socket, "qemu-system-x86_64");
    (server, socket)
}

#[test]
fn the_client_drives_qemu_7_2_with_the_api_of_qemu_9_1() {
    use qemu_qmp_api::{
        Event, JobStatus, QueryCommandsArguments, QueryMachinesArguments, QueryQmpSchemaArguments,
        QueryStatusArguments, QueryVersionArguments, ShutdownCause, TransactionArguments,
        YankArguments,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let (_server, socket) = start_qemu(dir.path());
    runtime().block_on(async {
        let client = Client::builder()
            .oob(true)
            .connect_unix(&socket)
            .await
            .expect("connect");
        let greeting = client.greeting().expect("a greeting").clone();
        assert_eq!((greeting.version.major, greeting.version.minor), (7, 2));
        assert!(client.oob_enabled());
        let mut events = client.events::<Event>();

        let version = client
            .execute(QueryVersionArguments {})
            .await
            .expect("query-version");
        assert_eq!(version.qemu.major, 7);
        client
            .execute(QueryStatusArguments {})
            .await
            .expect("query-status");
        let commands = client
            .execute(QueryCommandsArguments {})
            .await
            .expect("query-commands");
        assert!(commands.iter().any(|c| c.name == "blockdev-backup"));
        // 7.2's introspection, read with 9.1's types (tolerantly: members and enum
        // values 9.1 does not have would be ignored or UnknownValue).
        let schema = client
            .execute(QueryQmpSchemaArguments {})
            .await
            .expect("query-qmp-schema");
        assert!(schema.len() > 1000, "{}", schema.len());

        // A mandatory member 9.1 added (MachineInfo's `acpi`, since 8.0) is missing from
        // 7.2's reply: the reply does not fit, and says where; the connection lives on.
        match client.execute(QueryMachinesArguments::new()).await {
            Err(Error::Mismatch { what, reason, .. }) => {
                assert_eq!(what, "reply to 'query-machines'");
                assert!(reason.ends_with(".acpi' is missing"), "{reason}");
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }

        // exec-oob where allowed.
        client
            .execute_oob(YankArguments { instances: vec![] })
            .await
            .expect("yank out of band");
        let error = client
            .execute_value("no-such-command", Value::Null)
            .await
            .expect_err("unknown");
        assert_eq!(
            error.qmp().map(|e| e.class),
            Some(ErrorClass::CommandNotFound)
        );

        // The job helpers, generic over the API: a backup between two null-co nodes.
        for node in ["src", "dst"] {
            client
                .execute_value(
                    "blockdev-add",
                    json!({"driver": "null-co", "node-name": node, "size": 1 << 20}),
                )
                .await
                .expect("blockdev-add");
        }
        let transaction: TransactionArguments = serde_json::from_value(json!({"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "b0", "device": "src",
             "target": "dst", "sync": "full", "auto-dismiss": false}}]}))
        .expect("transaction arguments");
        let ((), jobs) = client.transaction(transaction).await.expect("transaction");
        assert_eq!(jobs, ["b0"]);
        let done = client
            .wait_job("b0", JobStatus::Concluded)
            .await
            .expect("concluded");
        assert_eq!(done.current, done.total);
        client
            .execute_value("job-dismiss", json!({"id": "b0"}))
            .await
            .expect("dismiss");

        // quit: QEMU 7.2 sends SHUTDOWN before its reply; both are read, in order.
        client.quit().await.expect("quit");
        let mut statuses = Vec::new();
        let mut shutdown = None;
        while let Some(event) = events.next().await {
            match event.expect("typed event").event {
                Event::JobStatusChange(change) => statuses.push(change.status),
                Event::Shutdown(data) => shutdown = Some(data.reason),
                _ => {}
            }
        }
        assert_eq!(statuses.first(), Some(&JobStatus::Created));
        assert_eq!(statuses.last(), Some(&JobStatus::Null));
        assert_eq!(shutdown, Some(ShutdownCause::HostQmpQuit));
        assert!(client.closed().is_some());
    });
}

fn start_guest_agent(dir: &Path) -> (Server, PathBuf) {
    let program = require_tool("qemu-ga", "qemu-guest-agent");
    let socket = dir.join("qga.sock");
    // As a program on this machine rather than in a guest: a unix socket instead of the
    // virtio port, and its pid file and state in the test's directory.
    let child = Command::new(program)
        .args(["-m", "unix-listen", "-p"])
        .arg(&socket)
        .arg("-f")
        .arg(dir.join("qga.pid"))
        .arg("-t")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-ga");
    let mut server = Server(child);
    wait_for_socket(&mut server, &socket, "qemu-ga");
    (server, socket)
}

#[test]
fn the_client_drives_the_guest_agent_with_its_api() {
    use qemu_ga_api::{
        GuestExecArguments, GuestExecCaptureOutput, GuestExecStatusArguments,
        GuestGetHostNameArguments, GuestInfoArguments, GuestPingArguments, GuestSyncArguments,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let (_server, socket) = start_guest_agent(dir.path());
    runtime().block_on(async {
        // The agent sends no greeting and has no negotiation.
        let client = Client::builder()
            .guest_agent()
            .connect_unix(&socket)
            .await
            .expect("connect");
        assert!(client.greeting().is_none());
        let synced = client
            .execute(GuestSyncArguments { id: 4242 })
            .await
            .expect("guest-sync");
        assert_eq!(synced, 4242);
        let info = client
            .execute(GuestInfoArguments {})
            .await
            .expect("guest-info");
        assert!(info.version.starts_with("7.2"), "{}", info.version);
        assert!(
            info.supported_commands
                .iter()
                .any(|c| c.name == "guest-exec" && c.enabled)
        );
        client
            .execute(GuestPingArguments {})
            .await
            .expect("guest-ping");

        // Eight calls in flight: the agent answers in turn, each call gets its own.
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.execute(GuestSyncArguments { id: i }).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.expect("task").expect("guest-sync"), i as i64);
        }
        client
            .execute(GuestGetHostNameArguments {})
            .await
            .expect("guest-get-host-name");

        // Run a program through the agent and read its output.
        let mut exec = GuestExecArguments::new("/bin/echo");
        exec.arg = Some(vec!["hello from the agent".into()]);
        exec.capture_output = Some(GuestExecCaptureOutput::Flag(true));
        let started = client.execute(exec).await.expect("guest-exec");
        let status = loop {
            let status = client
                .execute(GuestExecStatusArguments { pid: started.pid })
                .await
                .expect("guest-exec-status");
            if status.exited {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(status.exitcode, Some(0));
        assert_eq!(
            status.out_data.as_deref(),
            Some("aGVsbG8gZnJvbSB0aGUgYWdlbnQK"),
            "base64 of 'hello from the agent\\n'"
        );

        let error = client
            .execute_value("no-such-command", Value::Null)
            .await
            .expect_err("unknown");
        assert_eq!(
            error.qmp().map(|e| e.class),
            Some(ErrorClass::CommandNotFound)
        );
    });
}
