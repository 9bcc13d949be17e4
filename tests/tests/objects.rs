//! Objects, chardevs and the command line's `--object`/`--export`, end to end and beside
//! qemu-storage-daemon 10.0.2: the same command line gives the same objects and the same
//! throttled export in both daemons; a chardev added at run time takes a client.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp};
use serde_json::{Value, json};

fn tool(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(qmp: &mut Qmp, command: &str, arguments: Value) -> Value {
    qmp.execute(command, arguments.clone())
        .unwrap_or_else(|e| panic!("{command} {arguments}: {e}"))
}

/// What one daemon answers to the command line below, and how long a 1 MiB write through the
/// throttled export took.
fn run_command_line(program: &Path) -> (Vec<Value>, Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("d.raw");
    let image = image.to_str().expect("UTF-8 path");
    tool("qemu-img", &["create", "-q", "-f", "raw", image, "4M"]);
    let nbd = dir.path().join("nbd.sock");
    let nbd = nbd.to_str().expect("UTF-8 path");
    let options: Vec<String> = [
        "--object",
        "throttle-group,id=tg0,limits.bps-total=1048576",
        "--object",
        r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": 0}"#,
        "--object",
        "secret,id=s0,data=c2VjcmV0,format=base64",
        "--blockdev",
        &format!("driver=file,node-name=f,filename={image}"),
        "--blockdev",
        "throttle,node-name=t,throttle-group=tg0,file=f",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={nbd}"),
        "--export",
        "nbd,id=e0,node-name=t,writable=on",
        "--export",
        r#"{"type": "nbd", "id": "e1", "node-name": "f", "name": "plain"}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = Daemon::spawn_with(program, dir.path(), &options);
    let mut qmp = daemon.connect();
    let mut answers = Vec::new();
    let names = |v: Value| {
        let mut list: Vec<Value> = v.as_array().cloned().unwrap_or_default();
        list.sort_by_key(|p| p["name"].as_str().map(str::to_string));
        Value::Array(list)
    };
    answers.push(names(ok(&mut qmp, "qom-list", json!({"path": "/objects"}))));
    for (path, property) in [
        ("/objects/tg0", "limits"),
        ("/objects/io0", "poll-max-ns"),
        ("/objects/s0", "format"),
        ("/objects/s0", "data"),
    ] {
        answers.push(ok(
            &mut qmp,
            "qom-get",
            json!({"path": path, "property": property}),
        ));
    }
    answers.push(
        qmp.execute("object-del", json!({"id": "tg0"}))
            .expect_err("the group is in use"),
    );
    // 1 MiB in 64 KiB writes through the throttled export: 0.1 MiB pass at once, the rest at
    // 1 MiB/s.
    let mut args = vec!["-f", "raw"];
    let cmds: Vec<String> = (0..16)
        .map(|i| format!("write -P 0x5a {} 64k", i * 65536))
        .collect();
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let url = format!("nbd+unix:///t?socket={nbd}");
    args.push(&url);
    let start = Instant::now();
    tool("qemu-io", &args);
    let throttled = start.elapsed();
    // The data is in the image, read through the unthrottled export.
    let plain = format!("nbd+unix:///plain?socket={nbd}");
    let read = tool(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &plain],
    );
    assert!(
        !String::from_utf8_lossy(&read.stdout).contains("fail"),
        "{}",
        String::from_utf8_lossy(&read.stdout)
    );
    ok(&mut qmp, "quit", json!({}));
    (answers, throttled)
}

#[test]
fn the_command_lines_objects_and_exports_act_as_in_qemu_storage_daemon() {
    let (ours, ours_time) = run_command_line(&blockjobd());
    let (theirs, theirs_time) = run_command_line(Path::new("qemu-storage-daemon"));
    assert_eq!(ours, theirs);
    for (who, t) in [
        ("blockjobd", ours_time),
        ("qemu-storage-daemon", theirs_time),
    ] {
        assert!(t >= Duration::from_millis(800), "{who}: 1 MiB in {t:?}");
    }
}

/// A chardev added at run time: its socket takes a client (`connected` follows it) and goes
/// away with the chardev.
fn chardev_client(program: &Path) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(program, dir.path());
    let mut qmp = daemon.connect();
    let path = dir.path().join("c1.sock");
    ok(
        &mut qmp,
        "chardev-add",
        json!({"id": "c1", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": path.to_str()}},
            "server": true, "wait": false}}}),
    );
    let connected = |qmp: &mut Qmp| {
        ok(
            qmp,
            "qom-get",
            json!({"path": "/chardevs/c1", "property": "connected"}),
        )
    };
    let mut seen = vec![connected(&mut qmp)];
    let client = UnixStream::connect(&path).expect("connect to the chardev");
    let deadline = Instant::now() + Duration::from_secs(10);
    while connected(&mut qmp) != json!(true) {
        assert!(Instant::now() < deadline, "never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    seen.push(json!(true));
    let mut infos = ok(&mut qmp, "query-chardev", json!({}));
    if let Some(list) = infos.as_array_mut() {
        list.retain(|c| c["label"] == "c1");
    }
    let dir_text = dir.path().display().to_string();
    seen.push(Value::String(infos.to_string().replace(&dir_text, "$TMP")));
    drop(client);
    while connected(&mut qmp) != json!(false) {
        assert!(Instant::now() < deadline, "never disconnected");
        std::thread::sleep(Duration::from_millis(10));
    }
    seen.push(json!(false));
    ok(&mut qmp, "chardev-remove", json!({"id": "c1"}));
    seen.push(json!(path.exists()));
    ok(&mut qmp, "quit", json!({}));
    seen
}

#[test]
fn a_chardev_added_at_run_time_takes_a_client_as_in_qemu_storage_daemon() {
    let ours = chardev_client(&blockjobd());
    let theirs = chardev_client(Path::new("qemu-storage-daemon"));
    assert_eq!(ours, theirs);
    assert_eq!(ours[0], json!(false));
}

/// The command names of a `query-commands` answer.
fn command_names(program: &Path) -> std::collections::BTreeSet<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(program, dir.path());
    let mut qmp = daemon.connect();
    let names = ok(&mut qmp, "query-commands", json!({}))
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    ok(&mut qmp, "quit", json!({}));
    names
}

#[test]
fn every_qemu_storage_daemon_command_not_served_is_named_in_the_readme() {
    let ours = command_names(&blockjobd());
    let theirs = command_names(Path::new("qemu-storage-daemon"));
    assert_eq!(
        theirs.len(),
        76,
        "qemu-storage-daemon 10.0.2 serves 76 commands"
    );
    let extra: Vec<&String> = ours.difference(&theirs).collect();
    assert!(extra.is_empty(), "not QSD commands: {extra:?}");
    let readme =
        std::fs::read_to_string(blockjobs_tests::repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("### Commands not served")
        .nth(1)
        .and_then(|rest| rest.split("\n#").next())
        .expect("README section 'Commands not served'");
    let missing: Vec<&String> = theirs
        .difference(&ours)
        .filter(|name| !section.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "served by QSD, not by blockjobd, and not named in the README: {missing:?}"
    );
    // The section names no command that is served after all (it would be a stale excuse).
    let stale: Vec<&String> = ours
        .iter()
        .filter(|name| section.contains(&format!("\n- `{name}`")))
        .collect();
    assert!(
        stale.is_empty(),
        "served by blockjobd but named in the README as not served: {stale:?}"
    );
    assert!(
        ours.len() >= 72,
        "issue 14: at least 72 of QSD's 76 commands, served {}",
        ours.len()
    );
    println!(
        "blockjobd serves {} of qemu-storage-daemon's {} commands",
        ours.len(),
        theirs.len()
    );
}
