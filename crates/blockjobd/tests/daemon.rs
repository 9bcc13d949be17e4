//! The blockjobd binary: command line, startup, QMP on its sockets, and shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_blockjobd");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Wait for a file the daemon creates once its startup is complete.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        assert!(qmp.recv().get("QMP").is_some());
        assert_eq!(
            qmp.call(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        qmp
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn call(&mut self, request: Value) -> Value {
        self.writer
            .write_all(request.to_string().as_bytes())
            .unwrap();
        self.recv()
    }
}

fn oracle_args(socket: &Path, pidfile: &Path) -> Vec<String> {
    vec![
        "--chardev".into(),
        format!("socket,id=m,path={},server=on,wait=off", socket.display()),
        "--monitor".into(),
        "chardev=m".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
    ]
}

fn start(dir: &Path) -> (Child, PathBuf, PathBuf) {
    let socket = dir.join("qmp.sock");
    let pidfile = dir.join("pid");
    let child = Command::new(BIN)
        .args(oracle_args(&socket, &pidfile))
        .current_dir(dir)
        .spawn()
        .unwrap();
    wait_for(&pidfile);
    (child, socket, pidfile)
}

#[test]
fn without_arguments_it_serves_blockjobd_sock_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("blockjobd.sock"), "{first}");
    let mut rest = String::new();
    stdout.read_line(&mut rest).unwrap();
    assert!(
        rest.contains("socat - UNIX-CONNECT:./blockjobd.sock"),
        "{rest}"
    );
    let mut qmp = Qmp::connect(&dir.path().join("blockjobd.sock"));
    assert_eq!(qmp.call(json!({"execute": "quit"})), json!({"return": {}}));
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn quit_exits_zero_and_removes_socket_and_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, socket, pidfile) = start(dir.path());
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, child.id());
    let mut qmp = Qmp::connect(&socket);
    assert_eq!(
        qmp.call(json!({"execute": "quit", "id": 1})),
        json!({"return": {}, "id": 1})
    );
    assert_eq!(wait_exit(&mut child), 0);
    assert!(!socket.exists());
    assert!(!pidfile.exists());
}

fn signal_exits_zero(signal: i32) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, socket, _) = start(dir.path());
    let mut qmp = Qmp::connect(&socket);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    assert_eq!(wait_exit(&mut child), 0);
    let mut rest = Vec::new();
    let _ = qmp.reader.read_to_end(&mut rest);
    assert!(!socket.exists());
}

#[test]
fn sigterm_exits_zero() {
    signal_exits_zero(libc::SIGTERM);
}

#[test]
fn sigint_exits_zero() {
    signal_exits_zero(libc::SIGINT);
}

#[test]
fn startup_blockdevs_are_added_through_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("pid");
    let mut args = oracle_args(&socket, &pidfile);
    args.extend([
        "--blockdev".to_string(),
        "driver=null-co,node-name=a".to_string(),
    ]);
    let mut child = Command::new(BIN).args(&args).spawn().unwrap();
    wait_for(&pidfile);
    let mut qmp = Qmp::connect(&socket);
    assert_eq!(
        qmp.call(json!({"execute": "blockdev-add",
                        "arguments": {"driver": "null-co", "node-name": "a"}})),
        json!({"error": {"class": "GenericError",
                         "desc": "Duplicate nodes with node-name='a'"}})
    );
    qmp.call(json!({"execute": "quit"}));
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn a_failing_blockdev_exits_one_with_qsds_message() {
    let output = run(&[
        "--blockdev",
        "driver=null-co,node-name=a",
        "--blockdev",
        "driver=null-co,node-name=a",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "blockjobd: --blockdev driver=null-co,node-name=a: Duplicate nodes with node-name='a'\n"
    );
}

#[test]
fn an_unknown_option_exits_one() {
    let output = run(&["--foo"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output), "blockjobd: unrecognized option '--foo'\n");
}

#[test]
fn a_monitor_on_an_undefined_chardev_exits_one() {
    let output = run(&["--monitor", "chardev=nope"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "blockjobd: --monitor chardev=nope: chardev \"nope\" not found\n"
    );
}

#[test]
fn help_and_version_exit_zero() {
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--blockdev"));
    let version = run(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("blockjobd version "));
}

#[test]
fn daemonize_returns_once_the_socket_listens() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("pid");
    let mut args = oracle_args(&socket, &pidfile);
    args.push("--daemonize".into());
    let status = Command::new(BIN).args(&args).status().unwrap();
    assert_eq!(status.code(), Some(0));
    // The parent returned: startup is complete, the socket listens.
    assert!(socket.exists());
    let mut qmp = Qmp::connect(&socket);
    assert_eq!(qmp.call(json!({"execute": "quit"})), json!({"return": {}}));
    let mut rest = Vec::new();
    let _ = qmp.reader.read_to_end(&mut rest);
    wait_gone(&pidfile);
}

fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never went away",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_stdio_monitor_speaks_qmp_on_stdin_and_stdout() {
    let mut child = Command::new(BIN)
        .args(["--chardev", "stdio,id=s", "--monitor", "s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\": "), "{line}");
    stdin
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"quit\"}\n")
        .unwrap();
    for _ in 0..2 {
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"return\": {}}\r\n");
    }
    assert_eq!(wait_exit(&mut child), 0);
}
