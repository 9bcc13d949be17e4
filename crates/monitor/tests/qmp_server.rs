//! The QMP server end to end, through real sockets. Expected texts are what
//! qemu-storage-daemon 10.0.2 answers to the same input.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use monitor::{
    Bound, Broadcast, Endpoint, ErrorClass, MonitorServer, QmpBackend, QmpError, ServerConfig,
    ShutdownHandle, ShutdownReason,
};
use qmp_api::{BlockExportDeletedData, Event, JobStatusChangeData};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

/// Commands: `echo` returns its arguments, `emit` emits event `arguments.name` with
/// `arguments.data`, `emit-elsewhere` has another thread emit it and returns once that emit
/// call has returned (with `"poll": true`, waiting inside [`Broadcast::polling`], as a drain
/// waits for jobs; with `"observe": true`, then calling [`Broadcast::observed`], as a command
/// reading the job registry after a job changed), `boom` panics.
struct FakeBackend {
    events: Mutex<Option<Broadcast>>,
}

impl QmpBackend for FakeBackend {
    fn execute(
        &self,
        name: &str,
        arguments: Option<Map<String, Value>>,
    ) -> Result<Value, QmpError> {
        let arguments = arguments.unwrap_or_default();
        match name {
            "echo" => Ok(Value::Object(arguments)),
            "emit" => {
                let sink = self.events.lock().unwrap().clone().unwrap();
                let message = json!({"event": arguments["name"], "data": arguments["data"]});
                sink.emit(&Event::from_wire(&message)?);
                Ok(json!({}))
            }
            "emit-elsewhere" => {
                let sink = self.events.lock().unwrap().clone().unwrap();
                let message = json!({"event": arguments["name"], "data": arguments["data"]});
                let event = Event::from_wire(&message)?;
                let _polling =
                    (arguments.get("poll") == Some(&json!(true))).then(|| sink.polling());
                let (emitted, done) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    sink.emit(&event);
                    emitted.send(()).unwrap();
                });
                done.recv().unwrap();
                if arguments.get("observe") == Some(&json!(true)) {
                    self.events.lock().unwrap().as_ref().unwrap().observed();
                }
                Ok(json!({}))
            }
            "boom" => panic!("backend bug"),
            _ => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                format!("The command {name} has not been found"),
            )),
        }
    }

    fn has_command(&self, name: &str) -> bool {
        matches!(name, "echo" | "emit" | "emit-elsewhere" | "boom")
    }
}

struct Running {
    _dir: tempfile::TempDir,
    sockets: Vec<PathBuf>,
    tcp: Option<std::net::SocketAddr>,
    shutdown: ShutdownHandle,
    events: Broadcast,
    task: JoinHandle<ShutdownReason>,
}

async fn start_with(monitors: usize, tcp: bool, config: ServerConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend {
        events: Mutex::new(None),
    });
    let mut server = MonitorServer::new(backend.clone(), config);
    *backend.events.lock().unwrap() = Some(server.events());
    let mut sockets = Vec::new();
    for i in 0..monitors {
        let path = dir.path().join(format!("qmp{i}.sock"));
        server.listen(Endpoint::Unix(path.clone())).await.unwrap();
        sockets.push(path);
    }
    let tcp = if tcp {
        match server
            .listen(Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            })
            .await
            .unwrap()
        {
            Bound::Tcp(addr) => Some(addr),
            other => panic!("{other:?}"),
        }
    } else {
        None
    };
    let shutdown = server.shutdown_handle();
    let events = server.events();
    let task = tokio::spawn(server.run());
    Running {
        _dir: dir,
        sockets,
        tcp,
        shutdown,
        events,
        task,
    }
}

async fn start(monitors: usize) -> Running {
    start_with(monitors, false, ServerConfig::default()).await
}

impl Running {
    async fn stop(self) -> ShutdownReason {
        self.shutdown.request();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .unwrap()
    }
}

struct Client<S> {
    reader: BufReader<tokio::io::ReadHalf<S>>,
    writer: tokio::io::WriteHalf<S>,
}

impl<S: AsyncRead + AsyncWrite> Client<S> {
    fn new(stream: S) -> Self {
        let (r, w) = tokio::io::split(stream);
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// The next line, raw, CRLF included.
    async fn raw_line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await
            .expect("a line within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed");
        line
    }

    async fn recv(&mut self) -> Value {
        let line = self.raw_line().await;
        assert!(line.ends_with("\r\n"), "{line:?}");
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn call(&mut self, request: Value) -> Value {
        self.send(request.to_string().as_bytes()).await;
        self.recv().await
    }

    async fn negotiate(&mut self) {
        assert_eq!(
            self.call(json!({"execute": "qmp_capabilities"})).await,
            json!({"return": {}})
        );
    }

    /// True when the server closed the connection (EOF or reset).
    async fn closed(&mut self) -> bool {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => false,
        }
    }
}

async fn connect(path: &PathBuf) -> Client<UnixStream> {
    let mut client = Client::new(UnixStream::connect(path).await.unwrap());
    let greeting = client.recv().await;
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    client
}

async fn connected(path: &PathBuf) -> Client<UnixStream> {
    let mut client = connect(path).await;
    client.negotiate().await;
    client
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn error_id(class: &str, desc: &str, id: Value) -> Value {
    json!({"error": {"class": class, "desc": desc}, "id": id})
}

#[tokio::test]
async fn the_greeting_comes_first_in_qemus_bytes() {
    let server = start(1).await;
    let mut client = Client::new(UnixStream::connect(&server.sockets[0]).await.unwrap());
    assert_eq!(
        client.raw_line().await,
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
         \"package\": \"blockjobd 0.1.0\"}, \"capabilities\": [\"oob\"]}}\r\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn commands_before_negotiation_are_refused() {
    let server = start(1).await;
    let mut client = connect(&server.sockets[0]).await;
    for command in ["echo", "quit", "no-such-command"] {
        assert_eq!(
            client.call(json!({"execute": command, "id": 1})).await,
            error_id(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                json!(1)
            )
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_second_negotiation_is_refused() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    assert_eq!(
        client
            .call(json!({"execute": "qmp_capabilities", "id": 4}))
            .await,
        error_id(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
            json!(4)
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn qmp_capabilities_checks_its_arguments_like_qemu() {
    let server = start(1).await;
    let mut client = connect(&server.sockets[0]).await;
    let cases = [
        (
            json!({"enable": "oob"}),
            "Invalid parameter type for 'enable', expected: array",
        ),
        (
            json!({"enable": [1]}),
            "Invalid parameter type for 'enable[0]', expected: string",
        ),
        (
            json!({"enable": ["foo"]}),
            "Parameter 'null' does not accept value 'foo'",
        ),
        (json!({"x": 1}), "Parameter 'x' is unexpected"),
    ];
    for (arguments, desc) in cases {
        assert_eq!(
            client
                .call(json!({"execute": "qmp_capabilities", "arguments": arguments}))
                .await,
            error("GenericError", desc)
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_id_is_echoed_whatever_its_json_type() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    for id in [
        json!(1),
        json!("x"),
        json!(null),
        json!([1, 2.5, null, true]),
        json!({"a": {"b": []}}),
        json!(18446744073709551615u64),
        json!(-7),
    ] {
        assert_eq!(
            client.call(json!({"execute": "echo", "id": id})).await,
            json!({"return": {}, "id": id})
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_qemus_errors() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    let cases: &[(&[u8], Value)] = &[
        (
            b"[1]",
            error("GenericError", "QMP input must be a JSON object"),
        ),
        (
            b"\"x\"\n",
            error("GenericError", "QMP input must be a JSON object"),
        ),
        (
            br#"{"execute": 1, "id": 5}"#,
            error_id(
                "GenericError",
                "QMP input member 'execute' must be a string",
                json!(5),
            ),
        ),
        (
            br#"{"execute": "echo", "arguments": [], "id": 6}"#,
            error_id(
                "GenericError",
                "QMP input member 'arguments' must be an object",
                json!(6),
            ),
        ),
        (
            br#"{"execute": "echo", "foo": 1, "id": 7}"#,
            error_id(
                "GenericError",
                "QMP input member 'foo' is unexpected",
                json!(7),
            ),
        ),
        (
            br#"{"id": 8}"#,
            error_id("GenericError", "QMP input lacks member 'execute'", json!(8)),
        ),
        (
            br#"{"execute": "nope", "id": 9}"#,
            error_id(
                "CommandNotFound",
                "The command nope has not been found",
                json!(9),
            ),
        ),
        (
            br#"{"execute": "echo", "execute": "echo"}"#,
            error("GenericError", "JSON parse error, duplicate key"),
        ),
        (
            br#"{"execute": }"#,
            error("GenericError", "JSON parse error, expecting value"),
        ),
        (
            b"{\"execute\": \"echo\", \"id\": \"\xc3\x28\"}",
            error(
                "GenericError",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
        ),
        (b"@\n", error("GenericError", "JSON parse error, stray '@'")),
    ];
    for (input, reply) in cases {
        client.send(input).await;
        let input = String::from_utf8_lossy(input);
        assert_eq!(&client.recv().await, reply, "input {input}");
    }
    server.stop().await;
}

#[tokio::test]
async fn exec_oob_is_unexpected_unless_oob_was_enabled() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    assert_eq!(
        client.call(json!({"exec-oob": "echo", "id": 10})).await,
        error_id(
            "GenericError",
            "QMP input member 'exec-oob' is unexpected",
            json!(10)
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn with_oob_enabled_no_command_runs_out_of_band() {
    let server = start(1).await;
    let mut client = connect(&server.sockets[0]).await;
    assert_eq!(
        client
            .call(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}))
            .await,
        json!({"return": {}})
    );
    assert_eq!(
        client.call(json!({"exec-oob": "echo", "id": 3})).await,
        error_id(
            "GenericError",
            "The command echo does not support OOB",
            json!(3)
        )
    );
    assert_eq!(
        client.call(json!({"exec-oob": "nope", "id": 3})).await,
        error_id(
            "CommandNotFound",
            "The command nope has not been found",
            json!(3)
        )
    );
    client
        .send(br#"{"execute": "echo", "exec-oob": "echo", "id": 4}"#)
        .await;
    assert_eq!(
        client.recv().await,
        error_id(
            "GenericError",
            "QMP input member 'execute' clashes with 'exec-oob'",
            json!(4)
        )
    );
    server.stop().await;
}

#[tokio::test]
async fn an_object_split_over_many_writes_runs_once() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    let request = br#"{"execute": "echo", "arguments": {"a": [1, {"b": "c"}]}, "id": "split"}"#;
    for byte in request.iter() {
        client.send(std::slice::from_ref(byte)).await;
        client.writer.flush().await.unwrap();
    }
    assert_eq!(
        client.recv().await,
        json!({"return": {"a": [1, {"b": "c"}]}, "id": "split"})
    );
    server.stop().await;
}

#[tokio::test]
async fn many_requests_in_one_write_are_answered_in_order() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    let mut batch = String::new();
    for i in 0..50 {
        if i % 7 == 3 {
            batch.push_str(&format!(r#"{{"execute": "nope", "id": {i}}}"#));
        } else {
            batch.push_str(&format!(r#"{{"execute": "echo", "id": {i}}}"#));
        }
    }
    client.send(batch.as_bytes()).await;
    for i in 0..50 {
        let reply = client.recv().await;
        assert_eq!(reply["id"], json!(i), "{reply}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_bad_message_gets_one_error_and_the_connection_stays_usable() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    client
        .send(b"{\"execute\": \"echo\", \"id\": 01}\n{\"execute\": \"echo\", \"id\": \"after\"}")
        .await;
    assert_eq!(
        client.recv().await,
        error("GenericError", "JSON parse error, stray '01'")
    );
    assert_eq!(client.recv().await, json!({"return": {}, "id": "after"}));
    server.stop().await;
}

#[tokio::test]
async fn nesting_beyond_1024_is_one_error() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    let deep = format!(
        "{{\"execute\": \"echo\", \"id\": {}{}}}{{\"execute\": \"echo\", \"id\": 2}}",
        "[".repeat(1024),
        "]".repeat(1024)
    );
    client.send(deep.as_bytes()).await;
    assert_eq!(
        client.recv().await,
        error("GenericError", "JSON nesting depth limit exceeded")
    );
    assert_eq!(client.recv().await, json!({"return": {}, "id": 2}));
    server.stop().await;
}

#[tokio::test]
async fn events_reach_every_negotiated_client_only() {
    let server = start(3).await;
    let mut a = connected(&server.sockets[0]).await;
    let mut b = connected(&server.sockets[1]).await;
    let mut unnegotiated = connect(&server.sockets[2]).await;
    assert_eq!(server.events.subscribers(), 2);
    let reply = a
        .call(
            json!({"execute": "emit", "arguments": {"name": "JOB_STATUS_CHANGE",
                      "data": {"status": "created", "id": "j"}}}),
        )
        .await;
    // The event is emitted while the command runs: it precedes the reply.
    assert_eq!(reply["event"], "JOB_STATUS_CHANGE");
    assert_eq!(a.recv().await, json!({"return": {}}));
    let event = b.recv().await;
    assert_eq!(event["data"], json!({"status": "created", "id": "j"}));
    assert!(event["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(event["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    // The unnegotiated client sees only its own replies.
    assert_eq!(
        unnegotiated
            .call(json!({"execute": "qmp_capabilities"}))
            .await,
        json!({"return": {}})
    );
    server.stop().await;
}

#[tokio::test]
async fn another_threads_event_during_a_command_follows_its_reply() {
    let server = start(2).await;
    let mut a = connected(&server.sockets[0]).await;
    let mut b = connected(&server.sockets[1]).await;
    let reply = a
        .call(json!({"execute": "emit-elsewhere", "id": 1, "arguments": {
            "name": "BLOCK_JOB_PENDING", "data": {"type": "commit", "id": "j"}}}))
        .await;
    // QEMU: a job's coroutine runs only once the command has returned.
    assert_eq!(reply, json!({"return": {}, "id": 1}));
    assert_eq!(a.recv().await["event"], "BLOCK_JOB_PENDING");
    assert_eq!(b.recv().await["event"], "BLOCK_JOB_PENDING");
    // Once the reply is out, nothing is held.
    server
        .events
        .emit(&Event::JobStatusChange(JobStatusChangeData::new(
            "j".to_string(),
            qmp_api::BlockJobStatus::Null,
        )));
    assert_eq!(a.recv().await["event"], "JOB_STATUS_CHANGE");
    server.stop().await;
}

#[tokio::test]
async fn another_threads_event_while_a_command_polls_precedes_its_reply() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    let first = client
        .call(json!({"execute": "emit-elsewhere", "id": 2, "arguments": {
            "name": "BLOCK_JOB_PENDING", "data": {"type": "commit", "id": "j"},
            "poll": true}}))
        .await;
    // QEMU's AIO_WAIT_WHILE lets the coroutine run, and emit, before the reply.
    assert_eq!(first["event"], "BLOCK_JOB_PENDING");
    assert_eq!(client.recv().await, json!({"return": {}, "id": 2}));
    server.stop().await;
}

#[tokio::test]
async fn another_threads_event_a_command_then_observes_precedes_its_reply() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    let first = client
        .call(json!({"execute": "emit-elsewhere", "id": 3, "arguments": {
            "name": "BLOCK_JOB_PENDING", "data": {"type": "commit", "id": "j"},
            "observe": true}}))
        .await;
    // The reply may show the state the event announces: the event comes first.
    assert_eq!(first["event"], "BLOCK_JOB_PENDING");
    assert_eq!(client.recv().await, json!({"return": {}, "id": 3}));
    server.stop().await;
}

#[tokio::test]
async fn an_event_line_is_in_qemus_member_order() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    server
        .events
        .emit(&Event::JobStatusChange(JobStatusChangeData::new(
            "j".to_string(),
            qmp_api::BlockJobStatus::Null,
        )));
    let line = client.raw_line().await;
    let prefix = "{\"timestamp\": {\"seconds\": ";
    assert!(line.starts_with(prefix), "{line}");
    assert!(
        line.ends_with(
            "}, \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"null\", \"id\": \"j\"}}\r\n"
        ),
        "{line}"
    );
    server.stop().await;
}

#[tokio::test]
async fn garbage_on_one_monitor_never_disturbs_another() {
    let server = start(2).await;
    let mut victim = connected(&server.sockets[0]).await;
    let mut vandal = connected(&server.sockets[1]).await;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..200 {
        let mut garbage = Vec::new();
        for _ in 0..512 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            garbage.push(seed as u8);
        }
        vandal.send(&garbage).await;
        assert_eq!(
            victim.call(json!({"execute": "echo", "id": round})).await,
            json!({"return": {}, "id": round})
        );
    }
    // The vandal's connection still works after a reset byte.
    vandal
        .send(b"\x1b\n{\"execute\": \"echo\", \"id\": \"ok\"}")
        .await;
    loop {
        let reply = vandal.recv().await;
        if reply.get("id") == Some(&json!("ok")) {
            assert_eq!(reply, json!({"return": {}, "id": "ok"}));
            break;
        }
        assert!(reply.get("error").is_some(), "{reply}");
    }
    server.stop().await;
}

/// An event whose line is about `pad` bytes long.
fn padded_event(n: usize, pad: usize) -> Event {
    Event::BlockExportDeleted(BlockExportDeletedData {
        id: format!("{n:06}{}", "x".repeat(pad)),
    })
}

#[tokio::test]
async fn a_client_that_stops_reading_is_bounded_in_bytes_then_disconnected_and_others_keep_receiving()
 {
    const LIMIT: usize = 1 << 20;
    let log = LogCapture::default();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .finish(),
    );
    let config = ServerConfig {
        client_output_limit: LIMIT,
        ..ServerConfig::default()
    };
    let server = start_with(2, false, config).await;
    let mut reader = connected(&server.sockets[0]).await;
    let mut stopped = connected(&server.sockets[1]).await;
    // 64 MiB of events, 64 KiB each: far more than the limit and the sockets' buffers.
    let mut most_pending = 0;
    for i in 0..1024 {
        server.events.emit(&padded_event(i, 64 << 10));
        most_pending = most_pending.max(server.events.most_pending());
        let event = reader.recv().await;
        assert!(
            event["data"]["id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{i:06}"))
        );
    }
    // What the server kept for the client that stopped reading never exceeded its limit,
    // and it was dropped from the broadcast.
    assert!(most_pending <= LIMIT, "{most_pending} bytes pending");
    assert_eq!(server.events.subscribers(), 1);
    // Whatever was delivered before the cut, the connection ends.
    let mut lines = 0;
    while !stopped.closed().await {
        lines += 1;
    }
    assert!(lines < 1024);
    let log = log.text();
    assert!(
        log.contains("QMP client stopped reading") && log.contains("disconnecting"),
        "{log}"
    );
    server.stop().await;
}

/// Log output, kept for the test to read.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}

#[tokio::test]
async fn a_client_that_keeps_reading_gets_every_event_of_a_burst_larger_than_its_socket() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    // 100,000 events (about 10 MB) emitted at once, as a 10,000-job transaction does.
    let emitter = {
        let events = server.events.clone();
        std::thread::spawn(move || {
            for i in 0..100_000 {
                events.emit(&padded_event(i, 32));
            }
        })
    };
    for i in 0..100_000 {
        let event = client.recv().await;
        assert!(
            event["data"]["id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{i:06}"))
        );
    }
    emitter.join().unwrap();
    assert_eq!(server.events.subscribers(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_second_client_waits_until_the_first_leaves() {
    let server = start(1).await;
    let first = connected(&server.sockets[0]).await;
    let mut second = Client::new(UnixStream::connect(&server.sockets[0]).await.unwrap());
    second
        .send(b"{\"execute\": \"qmp_capabilities\", \"id\": \"second\"}")
        .await;
    let early = tokio::time::timeout(Duration::from_millis(200), second.reader.fill_buf()).await;
    assert!(
        early.is_err(),
        "second client served while the first is connected"
    );
    drop(first);
    assert!(second.recv().await.get("QMP").is_some());
    assert_eq!(second.recv().await, json!({"return": {}, "id": "second"}));
    server.stop().await;
}

#[tokio::test]
async fn quit_replies_then_the_server_stops() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    assert_eq!(
        client.call(json!({"execute": "quit", "id": "q"})).await,
        json!({"return": {}, "id": "q"})
    );
    assert!(client.closed().await);
    let reason = tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, ShutdownReason::Quit);
    assert!(!server.sockets[0].exists(), "socket file removed");
}

#[tokio::test]
async fn quit_rejects_arguments() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    assert_eq!(
        client
            .call(json!({"execute": "quit", "arguments": {"x": 1}}))
            .await,
        error("GenericError", "Parameter 'x' is unexpected")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_shutdown_request_stops_the_server() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    assert_eq!(server.stop().await, ShutdownReason::Requested);
    assert!(client.closed().await);
}

#[tokio::test]
async fn a_backend_panic_is_an_error_reply() {
    let server = start(1).await;
    let mut client = connected(&server.sockets[0]).await;
    assert_eq!(
        client.call(json!({"execute": "boom", "id": 1})).await,
        error_id(
            "GenericError",
            "internal error while executing 'boom'",
            json!(1)
        )
    );
    assert_eq!(
        client.call(json!({"execute": "echo", "id": 2})).await,
        json!({"return": {}, "id": 2})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_tcp_monitor_speaks_qmp() {
    let server = start_with(0, true, ServerConfig::default()).await;
    let addr = server.tcp.unwrap();
    let mut client = Client::new(TcpStream::connect(addr).await.unwrap());
    assert!(client.recv().await.get("QMP").is_some());
    client.negotiate().await;
    assert_eq!(
        client.call(json!({"execute": "echo", "id": "tcp"})).await,
        json!({"return": {}, "id": "tcp"})
    );
    server.stop().await;
}

#[tokio::test]
async fn replies_to_commands_sent_before_eof_are_delivered() {
    let server = start(1).await;
    let mut client = connect(&server.sockets[0]).await;
    client
        .send(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"echo\", \"id\": 1}")
        .await;
    client.writer.shutdown().await.unwrap();
    assert_eq!(client.recv().await, json!({"return": {}}));
    assert_eq!(client.recv().await, json!({"return": {}, "id": 1}));
    server.stop().await;
}

/// A backend that needs the runtime: `execute` blocks on an async computation.
struct AsyncBackend;

impl QmpBackend for AsyncBackend {
    fn execute(
        &self,
        _name: &str,
        _arguments: Option<Map<String, Value>>,
    ) -> Result<Value, QmpError> {
        let handle = tokio::runtime::Handle::current();
        let value = handle.block_on(async { tokio::task::spawn(async { 42 }).await.unwrap() });
        Ok(json!(value))
    }

    fn has_command(&self, name: &str) -> bool {
        name == "answer"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_inside_the_servers_tokio_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let mut server = MonitorServer::new(Arc::new(AsyncBackend), ServerConfig::default());
    server.listen(Endpoint::Unix(path.clone())).await.unwrap();
    let shutdown = server.shutdown_handle();
    let task = tokio::spawn(server.run());
    let mut client = connected(&path).await;
    assert_eq!(
        client.call(json!({"execute": "answer"})).await,
        json!({"return": 42})
    );
    shutdown.request();
    task.await.unwrap();
}
