//! `blockjobctl` against blockjobd: `--json` output, arguments refused by the server's
//! schema, QMP errors, exit codes, `backup` (plain lines off a terminal, live bars under a
//! pseudo-terminal, QEMU's error when the job fails), `watch` and the shell.

use blockjobs_tests::qmp::Daemon;
use blockjobs_tests::{blockjobctl, blockjobd};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};

struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(&blockjobd(), dir.path());
    Setup { _dir: dir, daemon }
}

impl Setup {
    fn ctl(&self) -> Command {
        let mut command = Command::new(blockjobctl());
        command.arg("--socket").arg(&self.daemon.socket);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.ctl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run blockjobctl")
    }

    /// Sets nodes up through QMP (with the test support's client).
    fn qmp(&self, command: &str, arguments: Value) {
        let mut qmp = self.daemon.connect();
        qmp.execute(command, arguments)
            .unwrap_or_else(|e| panic!("{command}: {e}"));
    }

    fn null_node(&self, name: &str, size: u64) {
        self.qmp(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": name, "size": size}),
        );
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn json_output_is_one_line_of_the_reply_for_scripts() {
    let s = setup();
    let out = s.run(&["--json", "query-version"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let reply: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(reply["qemu"]["major"], 10);

    let out = s.run(&["--json", "query-jobs"]);
    assert_eq!(text(&out.stdout), "[]\n");
    // Without --json: pretty-printed.
    let out = s.run(&["query-version"]);
    assert!(
        text(&out.stdout).starts_with("{\n  \"qemu\": {\n"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn arguments_are_checked_against_the_servers_schema_before_sending() {
    let s = setup();
    let out = s.run(&["job-pause", "idd=j0"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "blockjobctl: job-pause: 'idd' is not expected; the schema has: id\n"
    );
    let out = s.run(&[
        "blockdev-backup",
        "device=a",
        "target=b",
        "sync=sideways",
        "job-id=j",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "blockjobctl: blockdev-backup: 'sync' must be one of top, full, none, incremental, bitmap, not \"sideways\"\n"
    );
    let out = s.run(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "blockjobctl: 'no-such-command' is not a command of this server\n"
    );
}

#[test]
fn the_servers_error_is_printed_with_exit_code_1_and_a_lost_connection_is_3() {
    let s = setup();
    let out = s.run(&["job-pause", "id=nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("blockjobctl: GenericError: "),
        "{}",
        text(&out.stderr)
    );
    // JSON arguments work the same way.
    let out = s.run(&["job-pause", r#"{"id": "nope"}"#]);
    assert_eq!(out.status.code(), Some(1));

    let out = Command::new(blockjobctl())
        .args(["--socket", "/nonexistent/qmp.sock", "query-jobs"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn backup_off_a_terminal_prints_plain_progress_lines_and_succeeds() {
    let s = setup();
    s.null_node("src", 8 << 20);
    s.null_node("dst", 8 << 20);
    let out = s.run(&["backup", "src", "dst"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        !stdout.contains('\x1b'),
        "no terminal sequences: {stdout:?}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("backup-src concluded 8388608/8388608 100%")),
        "{stdout}"
    );
    assert_eq!(
        lines.last(),
        Some(&"backup 'backup-src' completed: 8388608 bytes")
    );

    // --json: one line with the job's end.
    s.null_node("dst2", 8 << 20);
    let out = s.run(&["--json", "backup", "src", "dst2", "--job-id", "b2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let end: Value = serde_json::from_str(&text(&out.stdout)).expect("JSON");
    assert_eq!(
        end,
        json!({"id": "b2", "status": "concluded", "current": 8388608, "total": 8388608, "error": null})
    );
}

#[test]
fn a_failing_backup_exits_1_with_qemus_error() {
    let s = setup();
    // The source reads as zeros, so the backup writes zeroes to the target: blkdebug fails
    // them with EIO (QEMU's `pwritev_zero` event).
    s.null_node("src", 4 << 20);
    s.qmp(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "bad", "file": {
            "driver": "blkdebug", "image": {"driver": "null-co", "size": 4 << 20},
            "inject-error": [{"event": "pwritev_zero", "errno": 5}]}}),
    );
    let out = s.run(&["backup", "src", "bad"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(
        text(&out.stderr),
        "blockjobctl: backup 'backup-src' failed: Input/output error\n"
    );
}

/// Runs `command` with stdout and stderr on a pseudo-terminal of 120 columns; returns
/// its exit status and everything it wrote there.
fn run_in_pty(command: &mut Command) -> (std::process::ExitStatus, String) {
    let mut master = 0;
    let mut slave = 0;
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the integers it is given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave)
        .spawn()
        .expect("spawn under the pty");
    // The parent's copies of the slave are gone once `command` is dropped.
    drop(std::mem::replace(command, Command::new("true")));
    let mut terminal = std::fs::File::from(master);
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match terminal.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => output.extend_from_slice(&buf[..n]),
            // Linux answers EIO once every slave descriptor is closed.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("read the pty: {e}"),
        }
    }
    let status = child.wait().expect("wait");
    (status, text(&output))
}

#[test]
fn backup_on_a_terminal_draws_a_live_progress_bar() {
    let s = setup();
    s.null_node("src", 4 << 20);
    s.null_node("dst", 4 << 20);
    // 4 MiB at 4 MiB/s: about a second, so several frames are drawn.
    let mut command = s.ctl();
    command.args(["backup", "src", "dst", "--speed", "4194304"]);
    let (status, screen) = run_in_pty(&mut command);
    assert!(status.success(), "{screen}");
    // Redrawn in place (cursor movement / line clearing), with a bar, percentage, bytes,
    // rate and ETA.
    assert!(screen.contains("\x1b["), "terminal sequences: {screen:?}");
    let frames: Vec<&str> = screen
        .split(['\r', '\n'])
        .filter(|f| f.contains("backup-src") && f.contains("ETA"))
        .collect();
    assert!(frames.len() >= 2, "several frames: {screen:?}");
    assert!(
        frames
            .iter()
            .any(|f| f.contains("running") && f.contains("MiB/4.00 MiB") && f.contains("/s ETA")),
        "{screen:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| f.contains("concluded [==============================] 100%")),
        "{screen:?}"
    );
    assert!(
        screen.contains("backup 'backup-src' completed: 4194304 bytes"),
        "{screen:?}"
    );
}

#[test]
fn watch_prints_events_and_job_lines_until_idle() {
    let s = setup();
    s.null_node("src", 2 << 20);
    s.null_node("dst", 2 << 20);
    // A job that runs about a second, started before the watch.
    s.qmp(
        "blockdev-backup",
        json!({"job-id": "w0", "device": "src", "target": "dst", "sync": "full", "speed": 2 << 20}),
    );
    let out = s.run(&["watch", "--interval", "20", "--until-idle"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.lines().any(|l| l.starts_with("w0 running ")),
        "{stdout}"
    );
    // `SECONDS.MICROSECONDS NAME {data}` lines, in the order the server sent them.
    let events: Vec<(String, Value)> = stdout
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            let (_, name, data) = (parts.next()?, parts.next()?, parts.next()?);
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
                .then(|| {
                    (
                        name.to_string(),
                        serde_json::from_str(data).expect("event data is JSON"),
                    )
                })
        })
        .collect();
    let w0: Vec<&str> = events
        .iter()
        .filter(|(name, data)| name == "JOB_STATUS_CHANGE" && data["id"] == "w0")
        .filter_map(|(_, data)| data["status"].as_str())
        .collect();
    assert!(w0.ends_with(&["concluded", "null"]), "{stdout}");
    assert!(
        events.contains(&(
            "BLOCK_JOB_COMPLETED".to_string(),
            json!({"type": "backup", "device": "w0", "len": 2097152, "offset": 2097152, "speed": 2097152})
        )),
        "{stdout}"
    );
}

#[test]
fn the_shell_reads_commands_and_reports_errors_without_leaving() {
    let s = setup();
    let home = tempfile::tempdir().expect("home");
    let mut child = s
        .ctl()
        .args(["--json", "shell"])
        .env("HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the shell");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"job-pause idd=j0\nquery-jobs\nquery-version\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("[]\n"), "{stdout}");
    assert!(stdout.contains(r#"{"qemu":{"#), "{stdout}");
    assert!(
        text(&out.stderr).contains("job-pause: 'idd' is not expected; the schema has: id"),
        "{}",
        text(&out.stderr)
    );
}
