//! Issue 10 item 7 end to end: a client that keeps reading receives every event of a grouped
//! transaction of 10,000 null-co backups (90,000 events) and is never dropped. (A client that
//! stops reading is bounded and dropped: `crates/monitor/tests/qmp_server.rs`.)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::Daemon;
use serde_json::{Value, json};

const JOBS: usize = 10_000;

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Client {
    fn next(&mut self) -> Value {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).expect("read");
        assert!(n > 0, "the daemon closed the connection");
        serde_json::from_str(&self.line).expect("a JSON line")
    }

    fn send(&mut self, message: Value) {
        let mut text = message.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).expect("write");
    }

    fn reply(&mut self) -> Value {
        loop {
            let msg = self.next();
            if msg.get("event").is_none() {
                assert!(msg.get("error").is_none(), "{msg}");
                return msg;
            }
        }
    }
}

#[test]
fn a_reading_client_receives_every_event_of_a_10000_job_transaction() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(&blockjobd(), dir.path());
    let stream = UnixStream::connect(&daemon.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut c = Client {
        reader: BufReader::with_capacity(1 << 16, stream.try_clone().expect("clone")),
        writer: stream,
        line: String::new(),
    };
    c.next();
    c.send(json!({"execute": "qmp_capabilities"}));
    c.reply();
    for batch in (0..JOBS).collect::<Vec<_>>().chunks(500) {
        for &i in batch {
            for name in [format!("s{i}"), format!("t{i}")] {
                c.send(json!({"execute": "blockdev-add", "arguments":
                    {"driver": "null-co", "node-name": name, "size": 1 << 20}}));
            }
        }
        for _ in 0..2 * batch.len() {
            c.reply();
        }
    }
    let actions: Vec<Value> = (0..JOBS)
        .map(|i| {
            json!({"type": "blockdev-backup", "data": {"job-id": format!("j{i}"),
                "device": format!("s{i}"), "target": format!("t{i}"), "sync": "full"}})
        })
        .collect();
    c.send(
        json!({"execute": "transaction", "arguments": {"actions": actions,
        "properties": {"completion-mode": "grouped"}}}),
    );
    // Per job: created, running, paused, running, waiting, pending, BLOCK_JOB_COMPLETED,
    // concluded, null; every one read, in each job's order.
    let order = [
        "created",
        "running",
        "paused",
        "running",
        "waiting",
        "pending",
        "COMPLETED",
        "concluded",
        "null",
    ];
    let mut seen = vec![0usize; JOBS];
    let mut events = 0;
    let mut gone = 0;
    let mut replied = false;
    while gone < JOBS || !replied {
        let msg = c.next();
        let Some(event) = msg["event"].as_str() else {
            assert!(msg.get("error").is_none(), "{msg}");
            replied = true;
            continue;
        };
        events += 1;
        let (id, what) = match event {
            "JOB_STATUS_CHANGE" => (&msg["data"]["id"], msg["data"]["status"].as_str()),
            "BLOCK_JOB_COMPLETED" => (&msg["data"]["device"], Some("COMPLETED")),
            other => panic!("unexpected {other}: {msg}"),
        };
        let i: usize = id.as_str().expect("an id")[1..].parse().expect("j<N>");
        assert_eq!(what, Some(order[seen[i]]), "job j{i}: {msg}");
        seen[i] += 1;
        if what == Some("null") {
            gone += 1;
        }
    }
    assert_eq!(events, JOBS * order.len());
    c.send(json!({"execute": "quit"}));
}
