//! Their servers, our client: blockjobd's `nbd` nodes on exports of `qemu-nbd`,
//! qemu-storage-daemon and `nbdkit memory`, each as a backup target (push mode), a mirror
//! target and a backing file; a backup source (holes skipped); added by `blockdev-add` and on the command
//! line; and the faults: the server killed mid-backup (reconnected within `reconnect-delay`, or
//! the job failing cleanly after it, its `on-target-error` applying), the target checked with
//! `qemu-img check` and `compare`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp, qcow2_node};
use blockjobs_tests::servers::{
    ServerProcess, assert_consistent, assert_same_image, qcow2, qemu_io, tool, unlocked,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A 4 MiB source: data, an unallocated stretch, a zero cluster, more data.
fn source_image(dir: &Path) -> PathBuf {
    let path = qcow2(dir, "src.qcow2", "4M");
    qemu_io(
        path.to_str().unwrap(),
        "qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -z 2M 64k",
            "write -P 0x22 3M 512k",
        ],
    );
    path
}

/// blockjobd with `src` opened from `source`.
fn daemon_with_source(dir: &Path, source: &Path) -> (Daemon, Qmp) {
    let daemon = Daemon::spawn(&blockjobd(), dir);
    let mut qmp = daemon.connect();
    qmp.execute("blockdev-add", qcow2_node("src", source))
        .expect("blockdev-add src");
    (daemon, qmp)
}

fn nbd_node(qmp: &mut Qmp, name: &str, server: &ServerProcess, extra: Value) {
    let mut options = json!({"driver": "nbd", "node-name": name, "server": server.server()});
    if let Some(export) = &server.export {
        options["export"] = json!(export);
    }
    for (k, v) in extra.as_object().expect("an object") {
        options[k] = v.clone();
    }
    qmp.execute("blockdev-add", options)
        .unwrap_or_else(|e| panic!("blockdev-add {name}: {e}"));
}

/// Waits for job `id` to reach `null`; returns its BLOCK_JOB_COMPLETED data.
fn wait_completed(qmp: &mut Qmp, id: &str) -> Value {
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", WAIT, |d| d["device"] == id);
    qmp.wait_event("JOB_STATUS_CHANGE", WAIT, |d| {
        d["id"] == id && d["status"] == "null"
    });
    done["data"].clone()
}

fn backup(qmp: &mut Qmp, id: &str, target: &str, extra: Value) {
    let mut args = json!({"job-id": id, "device": "src", "target": target, "sync": "full"});
    for (k, v) in extra.as_object().expect("an object") {
        args[k] = v.clone();
    }
    qmp.execute("blockdev-backup", args)
        .unwrap_or_else(|e| panic!("blockdev-backup: {e}"));
}

#[test]
fn a_backup_pushes_to_qemu_nbd_qemu_storage_daemon_and_nbdkit_exports() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_image(dir.path());
    let src_name = unlocked(&source, "qcow2");
    let (_daemon, mut qmp) = daemon_with_source(dir.path(), &source);

    // qemu-nbd over a raw file.
    let raw = dir.path().join("target.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let qemu_nbd = ServerProcess::qemu_nbd(dir.path(), "qemu-nbd", &raw, "raw", &[]);
    nbd_node(&mut qmp, "t1", &qemu_nbd, json!({}));
    backup(&mut qmp, "j1", "t1", json!({}));
    let done = wait_completed(&mut qmp, "j1");
    assert!(done.get("error").is_none(), "{done}");
    qmp.execute("blockdev-del", json!({"node-name": "t1"}))
        .expect("blockdev-del t1");
    drop(qemu_nbd);
    assert_same_image(&src_name, raw.to_str().unwrap());

    // qemu-storage-daemon's writable export of a qcow2 image.
    let qsd_dir = dir.path().join("qsd");
    std::fs::create_dir_all(&qsd_dir).unwrap();
    let target = qcow2(&qsd_dir, "target.qcow2", "4M");
    let qsd = Daemon::spawn(Path::new("qemu-storage-daemon"), &qsd_dir);
    let mut qsd_qmp = qsd.connect();
    let qsd_socket = qsd_dir.join("nbd.sock");
    qsd_qmp
        .execute("blockdev-add", qcow2_node("t", &target))
        .expect("QSD blockdev-add");
    qsd_qmp
        .execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": qsd_socket.to_str().unwrap()}}}),
        )
        .expect("QSD nbd-server-start");
    qsd_qmp
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "t", "writable": true}),
        )
        .expect("QSD block-export-add");
    qmp.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "t2", "export": "t",
               "server": {"type": "unix", "path": qsd_socket.to_str().unwrap()}}),
    )
    .expect("blockdev-add t2");
    backup(&mut qmp, "j2", "t2", json!({}));
    let done = wait_completed(&mut qmp, "j2");
    assert!(done.get("error").is_none(), "{done}");
    qmp.execute("blockdev-del", json!({"node-name": "t2"}))
        .expect("blockdev-del t2");
    qsd_qmp.execute("quit", json!({})).expect("QSD quit");
    drop(qsd);
    tool("qemu-img", &["check", target.to_str().unwrap()]);
    assert_same_image(&src_name, target.to_str().unwrap());

    // nbdkit memory.
    let memory = ServerProcess::nbdkit(dir.path(), "nbdkit", &["memory", "4M"]);
    nbd_node(&mut qmp, "t3", &memory, json!({}));
    backup(&mut qmp, "j3", "t3", json!({}));
    let done = wait_completed(&mut qmp, "j3");
    assert!(done.get("error").is_none(), "{done}");
    assert_same_image(&src_name, &memory.uri());
}

/// qemu-storage-daemon exporting `image` (qcow2) as export `name` on `dir/nbd.sock`
/// (writable or not): the daemon, its QMP connection and the socket.
fn qsd_export(dir: &Path, image: &Path, name: &str, writable: bool) -> (Daemon, Qmp, PathBuf) {
    let qsd = Daemon::spawn(Path::new("qemu-storage-daemon"), dir);
    let mut qmp = qsd.connect();
    let socket = dir.join("nbd.sock");
    qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": name, "read-only": !writable,
               "file": {"driver": "file", "filename": image.to_str().unwrap()}}),
    )
    .expect("QSD blockdev-add");
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket.to_str().unwrap()}}}),
    )
    .expect("QSD nbd-server-start");
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": name, "writable": writable}),
    )
    .expect("QSD block-export-add");
    (qsd, qmp, socket)
}

/// A mirror from `src` to the nbd node `t` (already added), to READY and completed.
fn mirror_to_t(qmp: &mut Qmp) {
    qmp.execute(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "t", "sync": "full"}),
    )
    .expect("blockdev-mirror");
    qmp.wait_event("BLOCK_JOB_READY", WAIT, |d| d["device"] == "m");
    qmp.execute("block-job-complete", json!({"device": "m"}))
        .expect("block-job-complete");
    let done = wait_completed(qmp, "m");
    assert!(done.get("error").is_none(), "{done}");
    qmp.execute("blockdev-del", json!({"node-name": "t"}))
        .expect("blockdev-del t");
}

#[test]
fn a_mirror_targets_qemu_nbd_qemu_storage_daemon_and_nbdkit_exports() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_image(dir.path());
    let src_name = unlocked(&source, "qcow2");

    // qemu-nbd: the pivot leaves `src` on the target; a fresh daemon for each target.
    {
        let (_daemon, mut qmp) = daemon_with_source(dir.path(), &source);
        let target = qcow2(dir.path(), "mirror.qcow2", "4M");
        let server = ServerProcess::qemu_nbd(dir.path(), "m", &target, "qcow2", &[]);
        nbd_node(&mut qmp, "t", &server, json!({}));
        mirror_to_t(&mut qmp);
        drop(server);
        assert_same_image(&src_name, target.to_str().unwrap());
    }
    // qemu-storage-daemon.
    {
        let qsd_dir = dir.path().join("qsd");
        std::fs::create_dir_all(&qsd_dir).unwrap();
        let target = qcow2(&qsd_dir, "mirror.qcow2", "4M");
        let (qsd, mut qsd_qmp, socket) = qsd_export(&qsd_dir, &target, "t", true);
        let (_daemon, mut qmp) = daemon_with_source(dir.path(), &source);
        qmp.execute(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "t", "export": "t",
                   "server": {"type": "unix", "path": socket.to_str().unwrap()}}),
        )
        .expect("blockdev-add t");
        mirror_to_t(&mut qmp);
        qsd_qmp.execute("quit", json!({})).expect("QSD quit");
        drop(qsd);
        tool("qemu-img", &["check", target.to_str().unwrap()]);
        assert_same_image(&src_name, target.to_str().unwrap());
    }
    // nbdkit memory.
    {
        let (_daemon, mut qmp) = daemon_with_source(dir.path(), &source);
        let memory = ServerProcess::nbdkit(dir.path(), "mem", &["memory", "4M"]);
        nbd_node(&mut qmp, "t", &memory, json!({}));
        mirror_to_t(&mut qmp);
        assert_same_image(&src_name, &memory.uri());
    }
}

#[test]
fn a_backup_from_an_nbd_source_copies_its_data_and_skips_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let remote = source_image(dir.path());
    let server = ServerProcess::qemu_nbd(dir.path(), "s", &remote, "qcow2", &["-r"]);
    let daemon = Daemon::spawn(&blockjobd(), dir.path());
    let mut qmp = daemon.connect();
    qmp.execute(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "src", "read-only": true, "export": "disk",
               "server": server.server()}),
    )
    .expect("blockdev-add nbd source");
    let target = qcow2(dir.path(), "copy.qcow2", "4M");
    qmp.execute("blockdev-add", qcow2_node("t", &target))
        .expect("blockdev-add target");
    backup(&mut qmp, "j", "t", json!({}));
    let done = wait_completed(&mut qmp, "j");
    assert!(done.get("error").is_none(), "{done}");
    qmp.execute("quit", json!({})).expect("quit");
    let mut daemon = daemon;
    assert!(daemon.wait_exit(WAIT));
    assert_same_image(remote.to_str().unwrap(), target.to_str().unwrap());
    // Only the data was written as data: the holes became zeroes, not zero-filled clusters.
    let map: Value = serde_json::from_str(&tool(
        "qemu-img",
        &["map", "--output=json", target.to_str().unwrap()],
    ))
    .expect("qemu-img map JSON");
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, (1 << 20) + (512 << 10), "{map}");
}

/// An overlay in blockjobd whose backing file is the nbd node `remote` on `server` (4 MiB of
/// 0x33), exported: reads through it, a write to the overlay, the node as QEMU lists it
/// (`filename`: its pseudo file name), and the allocation depth seen through the export.
fn overlay_over(dir: &Path, server: Value, export: Option<&str>, filename: &str) {
    let top = qcow2(dir, "top.qcow2", "4M");
    let daemon = Daemon::spawn(&blockjobd(), dir);
    let mut qmp = daemon.connect();
    let mut backing = json!({"driver": "nbd", "node-name": "remote", "server": server});
    if let Some(export) = export {
        backing["export"] = json!(export);
    }
    qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top",
               "file": {"driver": "file", "filename": top.to_str().unwrap()},
               "backing": backing}),
    )
    .expect("overlay over an NBD backing file");
    let socket = dir.join("ours.sock");
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket.to_str().unwrap()}}}),
    )
    .expect("nbd-server-start");
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "top", "node-name": "top", "writable": true,
               "allocation-depth": true}),
    )
    .expect("block-export-add");
    let uri = format!("nbd+unix:///top?socket={}", socket.display());
    qemu_io(&uri, "raw", &["write -P 0x44 1M 64k"]);
    qemu_io(
        &uri,
        "raw",
        &[
            "read -P 0x33 0 1M",
            "read -P 0x44 1M 64k",
            "read -P 0x33 1088k 2M",
        ],
    );
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .expect("query");
    let remote = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "remote")
        .expect("the backing node")
        .clone();
    assert_eq!(remote["drv"], "nbd");
    assert_eq!(remote["ro"], true);
    assert_eq!(remote["file"], json!(filename));
    // The overlay's allocation depth shows the backing file's data, too.
    let map = tool("nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    assert!(map.contains("backing depth 2"), "{map}");
    qmp.execute("quit", json!({})).expect("quit");
    let mut daemon = daemon;
    assert!(daemon.wait_exit(WAIT));
}

#[test]
fn an_overlay_reads_through_a_backing_file_served_by_qsd_qemu_nbd_and_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    // qemu-storage-daemon.
    let qsd_dir = dir.path().join("qsd");
    std::fs::create_dir_all(&qsd_dir).unwrap();
    let base = qcow2(&qsd_dir, "base.qcow2", "4M");
    qemu_io(base.to_str().unwrap(), "qcow2", &["write -P 0x33 0 4M"]);
    let (qsd, _qsd_qmp, socket) = qsd_export(&qsd_dir, &base, "base", false);
    let ours = dir.path().join("ours-qsd");
    std::fs::create_dir_all(&ours).unwrap();
    overlay_over(
        &ours,
        json!({"type": "unix", "path": socket.to_str().unwrap()}),
        Some("base"),
        &format!("nbd+unix:///base?socket={}", socket.display()),
    );
    drop(qsd);

    // qemu-nbd, read-only.
    let server = ServerProcess::qemu_nbd(dir.path(), "base", &base, "qcow2", &["-r"]);
    let ours = dir.path().join("ours-qemu-nbd");
    std::fs::create_dir_all(&ours).unwrap();
    overlay_over(&ours, server.server(), Some("disk"), &server.uri());
    drop(server);

    // nbdkit memory, filled first (its default export).
    let memory = ServerProcess::nbdkit(dir.path(), "mem", &["memory", "4M"]);
    qemu_io(&memory.uri(), "raw", &["write -P 0x33 0 4M"]);
    let ours = dir.path().join("ours-nbdkit");
    std::fs::create_dir_all(&ours).unwrap();
    // QEMU names a node on the default export `nbd+unix://?socket=PATH`.
    let filename = format!("nbd+unix://?socket={}", memory.socket.display());
    overlay_over(&ours, memory.server(), None, &filename);
}

#[test]
fn the_command_line_adds_an_nbd_node_in_keyval_form() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "1M");
    let server = ServerProcess::qemu_nbd(dir.path(), "s", &image, "qcow2", &[]);
    let qmp_socket = dir.path().join("qmp.sock");
    let mut child = std::process::Command::new(blockjobd())
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=n,server.type=unix,server.path={},export=disk,reconnect-delay=5",
            server.socket.display()
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            qmp_socket.display()
        ))
        .args(["--monitor", "chardev=m"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start blockjobd");
    let mut qmp = Qmp::connect(&qmp_socket);
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .expect("query");
    assert_eq!(nodes[0]["node-name"], "n", "{nodes}");
    assert_eq!(nodes[0]["drv"], "nbd");
    assert_eq!(nodes[0]["image"]["virtual-size"], 1 << 20);
    qmp.execute("quit", json!({})).expect("quit");
    let status = child.wait().expect("wait");
    assert!(status.success());
}

/// A speed-limited push of 16 MiB to qemu-nbd serving a target of `format` (a raw target
/// keeps every write the server acknowledged when the server is killed; a qcow2 one may lose
/// the unflushed ones): `(daemon, qmp, server, target, source)`.
fn slow_push(
    dir: &Path,
    format: &str,
    node_extra: Value,
    job_extra: Value,
) -> (Daemon, Qmp, ServerProcess, PathBuf, PathBuf) {
    let source = qcow2(dir, "src.qcow2", "16M");
    qemu_io(source.to_str().unwrap(), "qcow2", &["write -P 0x5c 0 16M"]);
    let (daemon, mut qmp) = daemon_with_source(dir, &source);
    let target = dir.join(format!("target.{format}"));
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            format,
            target.to_str().unwrap(),
            "16M",
        ],
    );
    let server = ServerProcess::qemu_nbd(dir, "t", &target, format, &[]);
    nbd_node(&mut qmp, "t", &server, node_extra);
    let mut extra = json!({"speed": 8 << 20});
    for (k, v) in job_extra.as_object().expect("an object") {
        extra[k] = v.clone();
    }
    backup(&mut qmp, "j", "t", extra);
    // Some data has gone over before the server goes.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let jobs = qmp.execute("query-block-jobs", json!({})).expect("query");
        if jobs[0]["offset"].as_u64().unwrap_or(0) >= 2 << 20 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    (daemon, qmp, server, target, source)
}

#[test]
fn a_push_survives_the_server_going_away_within_the_reconnect_delay() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, server, target, source) =
        slow_push(dir.path(), "raw", json!({"reconnect-delay": 30}), json!({}));
    server.kill();
    std::thread::sleep(Duration::from_millis(500));
    let server = ServerProcess::qemu_nbd(dir.path(), "t", &target, "raw", &[]);
    qmp.execute("block-job-set-speed", json!({"device": "j", "speed": 0}))
        .expect("set-speed");
    let done = wait_completed(&mut qmp, "j");
    assert!(done.get("error").is_none(), "{done}");
    qmp.execute("blockdev-del", json!({"node-name": "t"}))
        .expect("blockdev-del");
    drop(server);
    assert_same_image(&unlocked(&source, "qcow2"), target.to_str().unwrap());
}

#[test]
fn past_the_reconnect_delay_the_job_fails_cleanly_with_eio() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, server, target, _source) = slow_push(
        dir.path(),
        "qcow2",
        json!({"reconnect-delay": 1}),
        json!({}),
    );
    server.kill();
    let done = wait_completed(&mut qmp, "j");
    assert_eq!(done["error"], "Input/output error", "{done}");
    // The node stays (its requests fail until the server is back); deleting it is clean.
    qmp.execute("blockdev-del", json!({"node-name": "t"}))
        .expect("blockdev-del");
    // What reached the target is a consistent image.
    assert_consistent(&target);
}

#[test]
fn on_target_error_stop_pauses_a_push_until_the_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, mut qmp, server, target, source) = slow_push(
        dir.path(),
        "raw",
        json!({"reconnect-delay": 1}),
        json!({"on-target-error": "stop"}),
    );
    server.kill();
    let error = qmp.wait_event("BLOCK_JOB_ERROR", WAIT, |d| d["device"] == "j");
    assert_eq!(error["data"]["operation"], "write", "{error}");
    assert_eq!(error["data"]["action"], "stop", "{error}");
    let jobs = qmp.execute("query-block-jobs", json!({})).expect("query");
    assert_eq!(jobs[0]["status"], "paused", "{jobs}");
    assert_eq!(jobs[0]["io-status"], "failed", "{jobs}");
    let server = ServerProcess::qemu_nbd(dir.path(), "t", &target, "raw", &[]);
    qmp.execute("block-job-set-speed", json!({"device": "j", "speed": 0}))
        .expect("set-speed");
    qmp.execute("block-job-resume", json!({"device": "j"}))
        .expect("resume");
    let done = wait_completed(&mut qmp, "j");
    assert!(done.get("error").is_none(), "{done}");
    qmp.execute("blockdev-del", json!({"node-name": "t"}))
        .expect("blockdev-del");
    drop(server);
    assert_same_image(&unlocked(&source, "qcow2"), target.to_str().unwrap());
}
