//! The hard cases, against a scripted server on one end of a socket pair: events before
//! the greeting and between a request and its reply, replies out of order, unknown
//! events, replies that do not fit, EOF in the middle of a message, a server that never
//! answers.

use qmp_api::{
    BlockJobStatus, Event, JobPauseArguments, JobStatusChangeData, QueryJobsArguments,
    QueryVersionArguments,
};
use qmp_client::{Client, Error, RawEvent, TransportError};
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

/// The server's end: reads requests a line at a time, writes whatever the test says.
struct Script {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Script {
    async fn send(&mut self, text: &str) {
        self.writer
            .write_all(text.as_bytes())
            .await
            .expect("write to the client");
    }

    /// The next request; `None` at EOF.
    async fn request(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.expect("read");
        (n > 0).then(|| serde_json::from_str(&line).expect("a request is JSON"))
    }

    async fn expect_request(&mut self, command: &str) -> Value {
        let request = self.request().await.expect("a request");
        assert_eq!(request["execute"], command, "{request}");
        request
    }

    async fn reply(&mut self, request: &Value, body: Value) {
        let mut reply = body;
        reply["id"] = request["id"].clone();
        self.send(&format!("{reply}\r\n")).await;
    }

    /// Greeting and negotiation, as QEMU does them.
    async fn negotiate(&mut self) {
        self.send(&format!("{GREETING}\r\n")).await;
        let request = self.expect_request("qmp_capabilities").await;
        self.reply(&request, json!({"return": {}})).await;
    }
}

fn event(name: &str, data: Value) -> String {
    format!(
        "{}\r\n",
        json!({"timestamp": {"seconds": 1700000000, "microseconds": 42}, "event": name, "data": data})
    )
}

fn job_event(id: &str, status: &str) -> String {
    event("JOB_STATUS_CHANGE", json!({"id": id, "status": status}))
}

/// A connected pair: the client (after `server_start` has run on the server's end) and
/// the script to go on with.
async fn pair<F>(server_start: impl FnOnce(Script) -> F) -> (Client, Script)
where
    F: std::future::Future<Output = Script>,
{
    pair_with(Client::builder(), server_start).await
}

async fn pair_with<F>(
    connector: qmp_client::Connector,
    server_start: impl FnOnce(Script) -> F,
) -> (Client, Script)
where
    F: std::future::Future<Output = Script>,
{
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let (read, write) = theirs.into_split();
    let script = Script {
        reader: BufReader::new(read),
        writer: write,
    };
    let (client, script) = tokio::join!(connector.connect_stream(ours), server_start(script));
    (client.expect("connected"), script)
}

/// A stream the client cannot tell is a socket: read by its reader task, written by its
/// writer task (a tokio `UnixStream` is read by the calls themselves).
struct NotASocket(UnixStream);

impl tokio::io::AsyncRead for NotASocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NotASocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// [`pair`] over a [`NotASocket`].
async fn pair_over_stream() -> (Client, Script) {
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let (read, write) = theirs.into_split();
    let mut script = Script {
        reader: BufReader::new(read),
        writer: write,
    };
    let (client, ()) = tokio::join!(Client::connect_stream(NotASocket(ours)), script.negotiate());
    (client.expect("connected"), script)
}

/// Polls `call` once: it sends its request and, if no other call reads, becomes the
/// reading call.
async fn poll_once<F: Future>(call: Pin<&mut F>) {
    let mut call = Some(call);
    std::future::poll_fn(|cx| {
        if let Some(call) = call.take() {
            assert!(call.poll(cx).is_pending(), "no reply yet");
        }
        Poll::Ready(())
    })
    .await;
}

#[tokio::test]
async fn events_before_the_greeting_and_during_negotiation_are_kept() {
    let (client, _script) = pair(|mut s| async move {
        s.send(&job_event("early", "created")).await;
        s.send(&format!("{GREETING}\r\n")).await;
        let request = s.expect_request("qmp_capabilities").await;
        s.send(&job_event("early", "running")).await;
        s.reply(&request, json!({"return": {}})).await;
        s
    })
    .await;
    let early: Vec<_> = client
        .early_events::<Event>()
        .into_iter()
        .map(|e| e.expect("typed"))
        .collect();
    assert_eq!(early.len(), 2);
    assert_eq!(
        early[0].event,
        Event::JobStatusChange(JobStatusChangeData::new("early", BlockJobStatus::Created))
    );
    assert_eq!(early[0].timestamp.seconds, 1700000000);
    assert_eq!(
        early[1].event,
        Event::JobStatusChange(JobStatusChangeData::new("early", BlockJobStatus::Running))
    );
    assert_eq!(client.greeting().expect("a greeting").version.major, 10);
}

#[tokio::test]
async fn events_between_a_request_and_its_reply_and_after_it_go_to_every_stream() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut first = client.events::<Event>();
    let mut second = client.events::<RawEvent>();
    let server = tokio::spawn(async move {
        let request = s.expect_request("query-jobs").await;
        s.send(&job_event("j", "running")).await;
        s.reply(
            &request,
            json!({"return": [{"id": "j", "type": "backup", "status": "running",
                               "current-progress": 1, "total-progress": 2}]}),
        )
        .await;
        // After the reply, before any next request.
        s.send(&job_event("j", "paused")).await;
        s
    });
    let jobs = client.execute(QueryJobsArguments {}).await.expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].status, BlockJobStatus::Running);
    let _s = server.await.expect("server");
    for status in [BlockJobStatus::Running, BlockJobStatus::Paused] {
        let got = first.next().await.expect("an event").expect("typed");
        assert_eq!(
            got.event,
            Event::JobStatusChange(JobStatusChangeData::new("j", status))
        );
        let raw = second.next().await.expect("an event").expect("raw");
        assert_eq!(raw.event.name, "JOB_STATUS_CHANGE");
        assert_eq!(raw.event.data.expect("data")["status"], status.as_str());
    }
}

#[tokio::test]
async fn replies_out_of_order_reach_their_own_callers() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let server = tokio::spawn(async move {
        let mut requests = Vec::new();
        for _ in 0..8 {
            requests.push(s.expect_request("job-pause").await);
        }
        // Answer newest first, each naming the job its request asked for.
        for request in requests.iter().rev() {
            let id = request["arguments"]["id"].as_str().expect("job id");
            s.reply(
                request,
                json!({"error": {"class": "GenericError", "desc": format!("Job '{id}' not found")}}),
            )
            .await;
        }
        s
    });
    let calls = (0..8).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let job = format!("job{i}");
            let error = client
                .execute(JobPauseArguments { id: job.clone() })
                .await
                .expect_err("the server refuses");
            (job, error)
        })
    });
    for call in calls.collect::<Vec<_>>() {
        let (job, error) = call.await.expect("task");
        let qmp = error.qmp().expect("a QMP error");
        assert_eq!(qmp.class, qmp_client::ErrorClass::GenericError);
        assert_eq!(qmp.desc, format!("Job '{job}' not found"));
    }
    server.await.expect("server");
}

#[tokio::test]
async fn an_unknown_event_is_the_unknown_variant_with_name_data_and_timestamp() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut events = client.events::<Event>();
    s.send(&event("NEW_IN_QEMU_12", json!({"what": [1, 2]})))
        .await;
    s.send(&job_event("j", "created")).await;
    let unknown = events.next().await.expect("an event").expect("tolerated");
    match unknown.event {
        Event::UnknownEvent(e) => {
            assert_eq!(e.name, "NEW_IN_QEMU_12");
            assert_eq!(e.data, Some(json!({"what": [1, 2]})));
        }
        other => panic!("expected UnknownEvent, got {other:?}"),
    }
    assert_eq!(unknown.timestamp.microseconds, 42);
    // The stream goes on.
    let next = events.next().await.expect("an event").expect("typed");
    assert_eq!(next.event.name(), "JOB_STATUS_CHANGE");
}

#[tokio::test]
async fn an_event_whose_data_does_not_fit_is_an_error_item_and_the_stream_goes_on() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut events = client.events::<Event>();
    s.send(&event("JOB_STATUS_CHANGE", json!({"id": "j"})))
        .await;
    s.send(&job_event("j", "created")).await;
    match events.next().await.expect("an item") {
        Err(Error::Mismatch { what, reason, .. }) => {
            assert_eq!(what, "event 'JOB_STATUS_CHANGE'");
            assert_eq!(reason, "Parameter 'data.status' is missing");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert!(events.next().await.expect("an item").is_ok());
}

#[tokio::test]
async fn a_reply_that_does_not_fit_the_type_is_a_mismatch_and_the_connection_lives_on() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let server = tokio::spawn(async move {
        let request = s.expect_request("query-version").await;
        s.reply(
            &request,
            json!({"return": {"qemu": {"major": "ten"}, "package": ""}}),
        )
        .await;
        let request = s.expect_request("query-version").await;
        // A newer server's extra member is fine (read tolerantly).
        s.reply(
            &request,
            json!({"return": {"qemu": {"major": 10, "minor": 1, "micro": 0}, "package": "", "new": 1}}),
        )
        .await;
        s
    });
    match client.execute(QueryVersionArguments {}).await {
        Err(Error::Mismatch {
            what,
            reason,
            value,
        }) => {
            assert_eq!(what, "reply to 'query-version'");
            assert_eq!(
                reason,
                "Invalid parameter type for 'qemu.major', expected: integer"
            );
            assert_eq!(value["qemu"]["major"], "ten");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let version = client
        .execute(QueryVersionArguments {})
        .await
        .expect("the connection lives on");
    assert_eq!(version.qemu.minor, 1);
    server.await.expect("server");
}

#[tokio::test]
async fn eof_in_the_middle_of_a_message_fails_every_waiting_call_and_ends_every_stream() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut events = client.events::<Event>();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.execute(QueryJobsArguments {}).await })
        })
        .collect();
    for _ in 0..3 {
        s.expect_request("query-jobs").await;
    }
    s.send(&job_event("j", "running")).await;
    s.send(r#"{"return": [{"id": "j", "ty"#).await;
    drop(s);
    let expected = TransportError::EofMidMessage {
        len: 27,
        excerpt: r#"{"return": [{"id": "j", "ty"#.to_string(),
    };
    for call in calls {
        match call.await.expect("task") {
            Err(Error::Transport(e)) => assert_eq!(e, expected),
            other => panic!("expected EOF mid-message, got {other:?}"),
        }
    }
    // The event read before the end is still delivered, then the stream ends.
    assert!(events.next().await.expect("the event").is_ok());
    assert!(events.next().await.is_none());
    // Later calls fail at once with the same reason.
    match client.execute(QueryJobsArguments {}).await {
        Err(Error::Transport(e)) => assert_eq!(e, expected),
        other => panic!("expected the same error, got {other:?}"),
    }
    assert!(client.events::<Event>().next().await.is_none());
    assert_eq!(client.closed(), Some(expected));
}

#[tokio::test]
async fn eof_between_messages_is_a_clean_disconnect() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.execute(QueryJobsArguments {}).await })
    };
    s.expect_request("query-jobs").await;
    drop(s);
    let error = call.await.expect("task").expect_err("no reply");
    assert!(error.is_disconnect());
    assert_eq!(error.to_string(), "the server closed the connection");
}

#[tokio::test]
async fn a_server_that_never_answers_lets_the_callers_timeout_fire_and_the_connection_stays_usable()
{
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let stuck = tokio::time::timeout(
        Duration::from_millis(100),
        client.execute(JobPauseArguments { id: "a".into() }),
    )
    .await;
    assert!(stuck.is_err(), "the caller's timeout fired");
    let first = s.expect_request("job-pause").await;
    let server = tokio::spawn(async move {
        let second = s.expect_request("job-pause").await;
        // The late reply to the abandoned call comes first: it must not be taken for
        // the second call's.
        s.reply(
            &first,
            json!({"error": {"class": "GenericError", "desc": "late"}}),
        )
        .await;
        s.reply(&second, json!({"return": {}})).await;
        s
    });
    client
        .execute(JobPauseArguments { id: "b".into() })
        .await
        .expect("the second call gets its own reply");
    assert!(client.closed().is_none());
    server.await.expect("server");
}

#[tokio::test]
async fn quit_succeeds_when_the_server_closes_instead_of_answering() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut events = client.events::<RawEvent>();
    let server = tokio::spawn(async move {
        s.expect_request("quit").await;
        s.send(&event(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        ))
        .await;
    });
    client.quit().await.expect("EOF after quit is success");
    server.await.expect("server");
    assert_eq!(
        events
            .next()
            .await
            .expect("SHUTDOWN")
            .expect("raw")
            .event
            .name,
        "SHUTDOWN"
    );
    assert!(events.next().await.is_none());
}

/// A command that allows `exec-oob` (like QEMU's `yank`), defined here since blockjobd's
/// schema has none.
#[derive(serde::Serialize)]
struct Yank {
    instances: Vec<Value>,
}

impl qmp_client::Command for Yank {
    const NAME: &'static str = "yank";
    type Returns = ();
    const ALLOW_OOB: bool = true;
}

#[tokio::test]
async fn exec_oob_is_sent_only_when_negotiated_and_allowed() {
    let (client, _s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let refused = client.execute_oob(Yank { instances: vec![] }).await;
    assert!(matches!(refused, Err(Error::Refused(_))), "{refused:?}");
    let refused = client.execute_oob(QueryJobsArguments {}).await;
    assert_eq!(
        refused.expect_err("not allowed").to_string(),
        "'query-jobs' does not allow out-of-band execution"
    );

    let (client, mut s) = pair_with(Client::builder().oob(true), |mut s| async move {
        s.send(&format!("{GREETING}\r\n")).await;
        let request = s.expect_request("qmp_capabilities").await;
        assert_eq!(request["arguments"], json!({"enable": ["oob"]}));
        s.reply(&request, json!({"return": {}})).await;
        s
    })
    .await;
    assert!(client.oob_enabled());
    let server = tokio::spawn(async move {
        let request = s.request().await.expect("a request");
        assert_eq!(request["exec-oob"], "yank");
        assert_eq!(request["arguments"], json!({"instances": []}));
        s.reply(&request, json!({"return": {}})).await;
    });
    client
        .execute_oob(Yank { instances: vec![] })
        .await
        .expect("sent out of band");
    server.await.expect("server");
}

#[tokio::test]
async fn a_message_that_is_not_json_closes_the_connection_with_a_protocol_error() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.execute(QueryJobsArguments {}).await })
    };
    s.expect_request("query-jobs").await;
    s.send("{\"return\": tru}\r\n").await;
    match call.await.expect("task") {
        Err(Error::Transport(TransportError::Protocol(text))) => {
            assert!(text.starts_with("not JSON"), "{text}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn many_tasks_share_one_connection() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let server = tokio::spawn(async move {
        while let Some(request) = s.request().await {
            let id = request["arguments"]["id"].clone();
            s.reply(
                &request,
                json!({"error": {"class": "DeviceNotFound", "desc": id}}),
            )
            .await;
        }
    });
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let e = client
                    .execute(JobPauseArguments { id: format!("{i}") })
                    .await
                    .expect_err("refused");
                assert_eq!(e.qmp().expect("QMP error").desc, format!("{i}"));
                assert_eq!(
                    e.qmp().expect("QMP error").class,
                    qmp_client::ErrorClass::DeviceNotFound
                );
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    client.close();
    server.await.expect("server");
}

#[test]
fn the_blocking_client_has_the_same_surface() {
    use std::io::{BufRead, BufReader, Write};
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
    let server = std::thread::spawn(move || {
        let mut writer = theirs.try_clone().expect("clone");
        let mut reader = BufReader::new(theirs);
        let mut line = String::new();
        let mut next = |reader: &mut BufReader<_>| -> Value {
            line.clear();
            reader.read_line(&mut line).expect("read");
            serde_json::from_str(&line).expect("json")
        };
        writer
            .write_all(format!("{}{GREETING}\r\n", job_event("j", "created")).as_bytes())
            .expect("write");
        let request = next(&mut reader);
        writer
            .write_all(format!("{}\r\n", json!({"return": {}, "id": request["id"]})).as_bytes())
            .expect("write");
        let request = next(&mut reader);
        assert_eq!(request["execute"], "query-jobs");
        writer
            .write_all(
                format!(
                    "{}{}\r\n",
                    job_event("j", "running"),
                    json!({"return": [], "id": request["id"]})
                )
                .as_bytes(),
            )
            .expect("write");
        // Never answers the third request.
        next(&mut reader);
        writer
    });
    let mut client = qmp_client::blocking::Client::connect_stream(ours).expect("connect");
    assert_eq!(client.early_events::<Event>().len(), 1);
    let mut events = client.events::<Event>();
    assert!(
        client
            .execute(QueryJobsArguments {})
            .expect("jobs")
            .is_empty()
    );
    let event = events.next().expect("an event").expect("typed");
    assert_eq!(
        event.event,
        Event::JobStatusChange(JobStatusChangeData::new("j", BlockJobStatus::Running))
    );
    client.set_timeout(Some(Duration::from_millis(100)));
    let e = client
        .execute(QueryJobsArguments {})
        .expect_err("no answer");
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    let writer = server.join().expect("server");
    drop(writer);
    client.set_timeout(None);
    let e = client.execute(QueryJobsArguments {}).expect_err("closed");
    assert!(e.is_disconnect(), "{e:?}");
    assert!(events.next().is_none());
}

#[tokio::test]
async fn requests_stay_whole_and_in_order_when_the_socket_is_full() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, write) = stream.into_split();
        let mut s = Script {
            reader: BufReader::new(read),
            writer: write,
        };
        s.negotiate().await;
        s
    });
    let client = Client::connect_unix(&path).await.expect("connect");
    let mut s = server.await.expect("server");
    // 64 requests of 64 KiB each: far more than the socket buffer holds while the server
    // reads nothing, so most go through the writer task's queue.
    let big = "x".repeat(64 * 1024);
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            let arguments = json!({"n": i, "pad": big});
            tokio::spawn(async move { client.execute_value("echo", arguments).await })
        })
        .collect();
    tokio::task::yield_now().await;
    let mut seen = Vec::new();
    for _ in 0..64 {
        let request = s.expect_request("echo").await;
        assert_eq!(
            request["arguments"]["pad"].as_str().map(str::len),
            Some(64 * 1024)
        );
        seen.push(request["id"].as_u64().expect("id"));
        let n = request["arguments"]["n"].clone();
        s.reply(&request, json!({"return": n})).await;
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(
        seen, sorted,
        "on one thread, requests leave in the order of their ids"
    );
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.expect("task").expect("reply"), json!(i));
    }
}

#[tokio::test]
async fn a_stream_that_is_not_a_socket_gets_events_and_replies_out_of_order_and_eof_mid_message() {
    let (client, mut s) = pair_over_stream().await;
    let mut events = client.events::<RawEvent>();
    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.execute(JobPauseArguments { id: "a".into() }).await })
    };
    let second = {
        let client = client.clone();
        tokio::spawn(async move { client.execute(QueryJobsArguments {}).await })
    };
    let a = s.expect_request("job-pause").await;
    let jobs = s.expect_request("query-jobs").await;
    s.send(&job_event("j", "running")).await;
    s.reply(&jobs, json!({"return": []})).await;
    s.reply(&a, json!({"return": {}})).await;
    assert!(second.await.expect("task").expect("jobs").is_empty());
    first.await.expect("task").expect("paused");
    assert_eq!(
        events.next().await.expect("event").expect("raw").event.name,
        "JOB_STATUS_CHANGE"
    );
    let third = {
        let client = client.clone();
        tokio::spawn(async move { client.execute(QueryJobsArguments {}).await })
    };
    s.expect_request("query-jobs").await;
    s.send(r#"{"return": ["#).await;
    drop(s);
    match third.await.expect("task") {
        Err(Error::Transport(TransportError::EofMidMessage { len: 12, .. })) => {}
        other => panic!("expected EOF mid-message, got {other:?}"),
    }
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn the_reading_call_routes_an_event_and_another_calls_reply_before_its_own() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut events = client.events::<RawEvent>();
    let (second_done, second_seen) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let first = s.expect_request("job-pause").await;
        let second = s.expect_request("query-jobs").await;
        s.send(&job_event("j", "running")).await;
        s.reply(&second, json!({"return": []})).await;
        // The first call's reply only once the second call has its own: the second's
        // was read by the first call (the only one reading) and handed over.
        second_seen.await.expect("the second call finishes");
        s.reply(&first, json!({"return": {}})).await;
        s
    });
    // Polled in this order: the first call reads, the second waits for it.
    let (first, second) = tokio::join!(
        client.execute(JobPauseArguments { id: "a".into() }),
        async {
            let jobs = client.execute(QueryJobsArguments {}).await;
            let _ = second_done.send(());
            jobs
        }
    );
    first.expect("paused");
    assert!(second.expect("jobs").is_empty());
    let event = events.next().await.expect("event").expect("raw");
    assert_eq!(event.event.data.expect("data")["status"], "running");
    let _s = server.await.expect("server");
}

#[tokio::test]
async fn a_reading_call_dropped_in_the_middle_of_a_message_loses_nothing() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut events = client.events::<RawEvent>();
    let whole = job_event("j", "running");
    let (head, tail) = whole.split_at(whole.len() / 2);

    // Alone: the call reads half an event, gives up; the background reader goes on.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        client.execute(JobPauseArguments { id: "a".into() }),
    );
    let script = async {
        s.expect_request("job-pause").await;
        s.send(head).await;
    };
    let (gave_up, ()) = tokio::join!(gave_up, script);
    assert!(gave_up.is_err(), "the caller's timeout fired");
    s.send(tail).await;
    let event = events.next().await.expect("event").expect("raw");
    assert_eq!(event.event.data.expect("data")["status"], "running");

    // With another call waiting: that call reads on from the middle.
    let gave_up = Arc::new(tokio::sync::Notify::new());
    let first = {
        let gave_up = gave_up.clone();
        let call = tokio::time::timeout(
            Duration::from_millis(200),
            client.execute(JobPauseArguments { id: "b".into() }),
        );
        async move {
            let result = call.await;
            gave_up.notify_one();
            result
        }
    };
    let second = client.execute(QueryJobsArguments {});
    let script = async {
        let late = s.expect_request("job-pause").await;
        let jobs = s.expect_request("query-jobs").await;
        s.send(head).await;
        gave_up.notified().await;
        s.send(tail).await;
        s.reply(&late, json!({"return": {}})).await;
        s.reply(&jobs, json!({"return": []})).await;
    };
    let (first, second, ()) = tokio::join!(first, second, script);
    assert!(first.is_err(), "the caller's timeout fired");
    assert!(second.expect("the second call's own reply").is_empty());
    let event = events.next().await.expect("event").expect("raw");
    assert_eq!(event.event.data.expect("data")["status"], "running");
    assert!(client.closed().is_none());
}

#[tokio::test]
async fn a_reading_call_that_is_not_polled_does_not_hold_up_the_others() {
    let (client, mut s) = pair(|mut s| async move {
        s.negotiate().await;
        s
    })
    .await;
    let mut events = client.events::<RawEvent>();
    // Sent and reading, then kept without being polled (as in a `select!` whose task
    // went on to await something else).
    let mut kept = std::pin::pin!(client.execute(JobPauseArguments { id: "a".into() }));
    poll_once(kept.as_mut()).await;
    let server = tokio::spawn(async move {
        let first = s.expect_request("job-pause").await;
        let second = s.expect_request("query-jobs").await;
        s.send(&job_event("j", "running")).await;
        s.reply(&second, json!({"return": []})).await;
        s.reply(&first, json!({"return": {}})).await;
        s
    });
    // Another call of the same task, and an event, while the kept call is not polled.
    let other = tokio::time::timeout(
        Duration::from_secs(10),
        client.execute(QueryJobsArguments {}),
    )
    .await
    .expect("the other call is not held up by the kept one");
    assert!(other.expect("jobs").is_empty());
    let event = events.next().await.expect("event").expect("raw");
    assert_eq!(event.event.name, "JOB_STATUS_CHANGE");
    // The kept call finds its reply when it is polled again.
    kept.await.expect("its own reply");
    let _s = server.await.expect("server");
}
