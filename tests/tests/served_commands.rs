//! What blockjobd advertises is what it serves: `query-commands` lists exactly the commands of
//! `query-qmp-schema`, and none of them answers `CommandNotFound`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockjobs_tests::blockjobd;
use serde_json::{Value, json};

struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("qmp.sock");
        let child = Command::new(blockjobd())
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                sock.display()
            ))
            .args(["--monitor", "chardev=m"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start blockjobd");
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("connect to blockjobd: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone stream"));
        let mut d = Daemon {
            child,
            _dir: dir,
            stream,
            reader,
        };
        let greeting = d.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        d.execute("qmp_capabilities", json!({}));
        d
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .expect("read from blockjobd");
        serde_json::from_str(&line).expect("a JSON line")
    }

    /// The reply to `name` (events are skipped).
    fn execute(&mut self, name: &str, arguments: Value) -> Value {
        let request = json!({"execute": name, "arguments": arguments});
        writeln!(self.stream, "{request}").expect("send");
        loop {
            let msg = self.read();
            if msg.get("return").is_some() || msg.get("error").is_some() {
                return msg;
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn query_commands_lists_exactly_the_commands_of_the_schema_and_each_is_served() {
    let mut d = Daemon::start();
    let listed: BTreeSet<String> = d.execute("query-commands", json!({}))["return"]
        .as_array()
        .expect("query-commands returns a list")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    let in_schema: BTreeSet<String> = d.execute("query-qmp-schema", json!({}))["return"]
        .as_array()
        .expect("query-qmp-schema returns a list")
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(listed, in_schema);
    // The monitor's own two: `quit` would stop the daemon, and a second `qmp_capabilities` is
    // refused with class CommandNotFound by design (QEMU's "negotiation is already complete").
    for name in in_schema
        .iter()
        .filter(|n| !matches!(n.as_str(), "quit" | "qmp_capabilities"))
    {
        let reply = d.execute(name, json!({}));
        assert_ne!(
            reply["error"]["class"], "CommandNotFound",
            "{name} is in the schema but not served: {reply}"
        );
    }
}
