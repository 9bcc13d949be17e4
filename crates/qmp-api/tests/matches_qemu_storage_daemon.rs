//! Every input error of `dispatch` is compared, live, with what the real
//! qemu-storage-daemon answers to the same command (class and text).
//! Fails, saying what to install, when `qemu-storage-daemon` is missing.

use qmp_api::{Commands, QmpError, dispatch};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Implements nothing: every case below must fail while reading arguments,
/// before any handler runs.
struct NoHandlers;
impl Commands for NoHandlers {}

/// Commands whose arguments are malformed, each in its own way.
fn cases() -> Vec<(&'static str, Value)> {
    let backup = |sync: Value| json!({"device": "n0", "target": "n1", "sync": sync});
    let action = |a: Value| json!({"actions": [a]});
    vec![
        ("bogus-cmd", json!({})),
        ("block-job-set-speed", json!({"speed": 1})),
        (
            "block-job-set-speed",
            json!({"device": "x", "speed": 1, "bogus": 2}),
        ),
        ("block-job-set-speed", json!({"device": 1, "speed": 1})),
        ("block-job-set-speed", json!({"device": null, "speed": 1})),
        ("block-job-set-speed", json!({"device": "x", "speed": "a"})),
        ("block-job-set-speed", json!({"device": "x", "speed": 1.5})),
        (
            "block-job-set-speed",
            json!({"device": "x", "speed": 18446744073709551615u64}),
        ),
        ("query-block-jobs", json!({"x": 1})),
        ("query-named-block-nodes", json!({"flat": "yes"})),
        ("query-named-block-nodes", json!({"flat": null})),
        ("blockdev-backup", backup(json!("bogus"))),
        ("blockdev-backup", backup(json!(1))),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "b", "granularity": -1}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "b", "granularity": 4294967296u64}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "b", "granularity": "x"}),
        ),
        (
            "transaction",
            action(json!({"type": "blockdev-backup", "data": {"target": "n1", "sync": "full"}})),
        ),
        (
            "transaction",
            action(
                json!({"type": "blockdev-backup", "data": {"device": 1, "target": "n1", "sync": "full"}}),
            ),
        ),
        (
            "transaction",
            json!({"actions": [{"type": "abort", "data": {}},
            {"type": "blockdev-backup", "data": {"device": "n0", "target": "n1", "sync": "bogus"}}]}),
        ),
        ("transaction", action(json!({"type": "bogus", "data": {}}))),
        ("transaction", action(json!({"type": 5, "data": {}}))),
        ("transaction", action(json!({"data": {}}))),
        ("transaction", action(json!({"type": "abort"}))),
        (
            "transaction",
            action(json!({"type": "abort", "data": {}, "x": 1})),
        ),
        (
            "transaction",
            action(json!({"type": "abort", "data": {"x": 1}})),
        ),
        ("transaction", action(json!(1))),
        ("transaction", json!({"actions": {}})),
        (
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "x"}}),
        ),
        (
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": 5}}),
        ),
        (
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "grouped", "y": 1}}),
        ),
        ("transaction", json!({"actions": [], "properties": []})),
        (
            "transaction",
            action(json!({"type": "block-dirty-bitmap-add",
            "data": {"node": "n0", "name": "b", "granularity": "x"}})),
        ),
        (
            "transaction",
            action(json!({"type": "block-dirty-bitmap-add",
            "data": {"node": "n0", "name": "b", "granularity": -5}})),
        ),
        (
            "transaction",
            action(json!({"type": "block-dirty-bitmap-add",
            "data": {"node": "n0", "name": "b", "persistent": "x"}})),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": 1}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": null}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file"}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q",
            "file": {"driver": "file", "filename": "/x", "bogus": 1}}),
        ),
        ("blockdev-add", json!({"node-name": "q"})),
        ("blockdev-add", json!({"driver": "bogus"})),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "q", "file": "n0", "cache": {"direct": "x"}}),
        ),
    ]
}

/// Objects with several unexpected members (QEMU names one of them, chosen
/// by its hash tables), generated by a fixed linear congruential sequence.
fn several_unexpected_members() -> Vec<(&'static str, Value)> {
    let mut state: u64 = 0x5eed;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz-_0123456789".chars().collect();
    let mut out = Vec::new();
    for round in 0..120 {
        let mut object = serde_json::Map::new();
        let extra = 1 + next(14);
        while (object.len() as u64) < extra {
            let len = 1 + next(10) as usize;
            let name: String = (0..len)
                .map(|_| alphabet[next(alphabet.len() as u64) as usize])
                .collect();
            if !["device", "speed", "type", "data"].contains(&name.as_str()) {
                object.insert(name, json!(1));
            }
        }
        if round % 2 == 0 {
            object.insert("device".into(), json!("x"));
            object.insert("speed".into(), json!(1));
            out.push(("block-job-set-speed", Value::Object(object)));
        } else {
            object.insert("type".into(), json!("abort"));
            object.insert("data".into(), json!({}));
            out.push(("transaction", json!({"actions": [Value::Object(object)]})));
        }
    }
    out
}

struct Daemon {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Daemon {
    fn start() -> Option<Daemon> {
        let mut child = Command::new("qemu-storage-daemon")
            .args(["--chardev", "stdio,id=m", "--monitor", "chardev=m"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let input = child.stdin.take()?;
        let output = BufReader::new(child.stdout.take()?);
        let mut daemon = Daemon {
            child,
            input,
            output,
        };
        daemon.reply_line(); // greeting
        daemon.execute("qmp_capabilities", json!({}));
        Some(daemon)
    }

    fn reply_line(&mut self) -> Value {
        loop {
            let mut line = String::new();
            assert!(
                self.output.read_line(&mut line).unwrap() > 0,
                "daemon closed its monitor"
            );
            let message: Value = serde_json::from_str(&line).unwrap();
            if message.get("event").is_none() {
                return message;
            }
        }
    }

    fn execute(&mut self, name: &str, arguments: Value) -> Value {
        let command = json!({"execute": name, "arguments": arguments});
        writeln!(self.input, "{command}").unwrap();
        self.reply_line()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = writeln!(self.input, "{}", json!({"execute": "quit"}));
        let _ = self.child.wait();
    }
}

#[test]
fn input_errors_match_qemu_storage_daemon_word_for_word() {
    let Some(mut daemon) = Daemon::start() else {
        panic!(
            "qemu-storage-daemon is needed for this comparison: install QEMU's tools \
             (Debian: apt-get install qemu-utils)"
        );
    };
    for (name, arguments) in cases().into_iter().chain(several_unexpected_members()) {
        let theirs = daemon.execute(name, arguments.clone());
        let ours: QmpError = dispatch(&mut NoHandlers, name, arguments.as_object().cloned())
            .expect_err("malformed arguments are rejected");
        assert_eq!(ours.to_json(), theirs["error"], "{name} {arguments}");
    }
}
