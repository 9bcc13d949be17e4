//! NBD exports through `qmp_api::dispatch`, as qemu-storage-daemon answers them: real qcow2
//! images, clients are `qemu-io` over `nbd+unix://`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockdev::Blockdev;
use serde_json::{Value, json};
use tempfile::TempDir;

/// A daemon-like set-up: a multi-thread runtime, commands dispatched from the test thread.
struct Daemon {
    bd: Blockdev,
    events: Arc<Mutex<Vec<(String, Value)>>>,
    dir: TempDir,
    _guard: tokio::runtime::EnterGuard<'static>,
    rt: &'static tokio::runtime::Runtime,
}

impl Daemon {
    fn new() -> Daemon {
        let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        ));
        let guard = rt.enter();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let bd = Blockdev::for_tokio(Arc::new(move |e: qmp_api::Event| {
            sink.lock()
                .unwrap()
                .push((e.name().to_string(), e.data().unwrap_or(Value::Null)))
        }));
        Daemon {
            bd,
            events,
            dir: tempfile::tempdir().unwrap(),
            _guard: guard,
            rt,
        }
    }

    fn call(&mut self, name: &str, args: Value) -> Result<Value, String> {
        qmp_api::dispatch(&mut self.bd, name, args.as_object().cloned()).map_err(|e| e.desc)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path("nbd.sock")
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    /// A new qcow2 image of `size` bytes added as node `node`.
    fn add_qcow2(&mut self, node: &str, size: &str) {
        let file = self.path(&format!("{node}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", file.to_str().unwrap(), size]);
        let filename = file.to_str().unwrap().to_string();
        self.call(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node,
                   "file": {"driver": "file", "filename": filename}}),
        )
        .unwrap();
    }

    fn start_server(&mut self) {
        let path = self.socket().to_str().unwrap().to_string();
        self.call(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": path}}}),
        )
        .unwrap();
    }

    fn bitmap_count(&mut self, node: &str) -> i64 {
        let nodes = self
            .call("query-named-block-nodes", json!({"flat": true}))
            .unwrap();
        let node = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == node)
            .unwrap()
            .clone();
        node["dirty-bitmaps"][0]["count"].as_i64().unwrap()
    }

    fn events_named(&self, name: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Waits (bounded) until an event `name` with `data` has arrived.
    fn wait_event(&self, name: &str, data: Value) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.events_named(name).contains(&data) {
            assert!(std::time::Instant::now() < deadline, "no {name} {data}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.bd.shutdown();
        let _ = self.rt;
    }
}

fn qemu_img(args: &[&str]) {
    let status = Command::new("qemu-img").args(args).status().unwrap();
    assert!(status.success(), "qemu-img {args:?}");
}

/// Runs one `qemu-io` command on `uri` (raw over NBD); true if it succeeded.
fn qemu_io(uri: &str, command: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .unwrap();
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed")
}

/// Checks `len` bytes at `offset` of a qcow2 file hold `pattern`.
fn image_holds(file: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-r",
            "-c",
            &format!("read -P {pattern} {offset} {len}"),
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !stdout.contains("Pattern verification failed")
}

/// A `qemu-io` client kept connected: it has answered one read when this returns.
fn connected_client(uri: &str) -> Child {
    let mut child = Command::new("qemu-io")
        .args(["-r", "-f", "raw", uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"read 0 512\n").unwrap();
    stdin.flush().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().unwrap().unwrap();
        if line.contains("read 512/512") {
            break;
        }
    }
    child
}

#[test]
fn writes_over_nbd_dirty_the_bitmap_and_an_incremental_backup_copies_exactly_them() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "4M");
    d.add_qcow2("tgt", "4M");
    d.start_server();
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "name": "src", "writable": true}),
    )
    .unwrap();
    d.call(
        "transaction",
        json!({"actions": [{"type": "block-dirty-bitmap-add",
                            "data": {"node": "src", "name": "bm0"}}]}),
    )
    .unwrap();
    assert_eq!(d.bitmap_count("src"), 0);

    assert!(qemu_io(&d.uri("src"), "write -P 0x44 512k 64k"));
    assert!(qemu_io(&d.uri("src"), "write -P 0x55 2M 4k"));
    assert_eq!(d.bitmap_count("src"), 131072);

    d.call(
        "blockdev-backup",
        json!({"job-id": "j1", "device": "src", "target": "tgt",
               "sync": "incremental", "bitmap": "bm0"}),
    )
    .unwrap();
    d.wait_event("JOB_STATUS_CHANGE", json!({"id": "j1", "status": "null"}));
    assert_eq!(
        d.events_named("BLOCK_JOB_COMPLETED")[0]["len"],
        json!(131072)
    );
    assert_eq!(d.bitmap_count("src"), 0);

    d.call("block-export-del", json!({"id": "e0"})).unwrap();
    assert_eq!(
        d.events_named("BLOCK_EXPORT_DELETED"),
        vec![json!({"id": "e0"})],
        "an export without clients is deleted before the reply"
    );
    d.call("nbd-server-stop", json!({})).unwrap();
    d.call("blockdev-del", json!({"node-name": "tgt"})).unwrap();
    let tgt = d.path("tgt.qcow2");
    assert!(image_holds(&tgt, 0x44, 512 << 10, 64 << 10));
    assert!(image_holds(&tgt, 0x55, 2 << 20, 4 << 10));
    assert!(image_holds(&tgt, 0, 0, 512 << 10));
}

#[test]
fn a_client_reads_what_the_node_holds() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    d.start_server();
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src", "writable": true}),
    )
    .unwrap();
    assert!(qemu_io(&d.uri("src"), "write -P 0x66 64k 4k"));
    assert!(qemu_io(&d.uri("src"), "read -P 0x66 64k 4k"));
    assert!(qemu_io(&d.uri("src"), "read -P 0 0 64k"));
}

#[test]
fn a_read_only_export_refuses_writes() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    d.start_server();
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src"}),
    )
    .unwrap();
    assert!(!qemu_io(&d.uri("src"), "write -P 0x66 0 4k"));
}

#[test]
fn server_commands_answer_with_qemu_errors() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    assert_eq!(
        d.call("nbd-server-stop", json!({})),
        Err("NBD server not running".into())
    );
    assert_eq!(
        d.call(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "src"})
        ),
        Err("NBD server not running".into())
    );
    d.start_server();
    assert_eq!(
        d.call(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/tmp/other.sock"}}})
        ),
        Err("NBD server already running".into())
    );
}

#[test]
fn a_socket_that_cannot_be_bound_is_reported_with_its_path() {
    let mut d = Daemon::new();
    assert_eq!(
        d.call(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/nonexistent/dir/s.sock"}}})
        ),
        Err("Failed to bind socket to /nonexistent/dir/s.sock: No such file or directory".into())
    );
}

#[test]
fn export_add_answers_with_qemu_errors() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    d.start_server();
    let add = |d: &mut Daemon, args: Value| d.call("block-export-add", args);
    assert_eq!(
        add(
            &mut d,
            json!({"type": "nbd", "id": "e0", "node-name": "nope"})
        ),
        Err("Cannot find device='' nor node-name='nope'".into())
    );
    assert_eq!(
        add(
            &mut d,
            json!({"type": "nbd", "id": "1bad", "node-name": "src"})
        ),
        Err("Invalid block export id".into())
    );
    assert_eq!(
        add(
            &mut d,
            json!({"type": "nbd", "id": "e0", "node-name": "src", "iothread": "io0"})
        ),
        Err("iothread \"io0\" not found".into())
    );
    add(
        &mut d,
        json!({"type": "nbd", "id": "e0", "node-name": "src", "writable": true}),
    )
    .unwrap();
    assert_eq!(
        add(
            &mut d,
            json!({"type": "nbd", "id": "e0", "node-name": "src"})
        ),
        Err("Block export id 'e0' is already in use".into())
    );
    assert_eq!(
        add(
            &mut d,
            json!({"type": "nbd", "id": "e1", "node-name": "src"})
        ),
        Err("NBD server already has export named 'src'".into())
    );
}

#[test]
fn a_read_only_node_cannot_be_exported_writable() {
    let mut d = Daemon::new();
    let file = d.path("ro.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", file.to_str().unwrap(), "1M"]);
    d.call(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ro", "read-only": true,
               "file": {"driver": "file", "filename": file.to_str().unwrap()}}),
    )
    .unwrap();
    d.start_server();
    assert_eq!(
        d.call(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "ro", "writable": true})
        ),
        Err("Cannot export read-only node as writable".into())
    );
}

#[test]
fn an_exported_node_cannot_be_deleted() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    d.start_server();
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src"}),
    )
    .unwrap();
    assert_eq!(
        d.call("blockdev-del", json!({"node-name": "src"})),
        Err("Node src is in use".into())
    );
    d.call("block-export-del", json!({"id": "e0"})).unwrap();
    d.call("blockdev-del", json!({"node-name": "src"})).unwrap();
}

#[test]
fn deleting_an_unknown_export_is_refused() {
    let mut d = Daemon::new();
    assert_eq!(
        d.call("block-export-del", json!({"id": "e0"})),
        Err("Export 'e0' is not found".into())
    );
}

#[test]
fn safe_delete_refuses_an_export_with_clients_and_hard_delete_reports_it_once_they_are_gone() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    d.start_server();
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src"}),
    )
    .unwrap();
    let mut client = connected_client(&d.uri("src"));
    assert_eq!(
        d.call("block-export-del", json!({"id": "e0"})),
        Err("export 'e0' still in use".into())
    );
    d.call("block-export-del", json!({"id": "e0", "mode": "hard"}))
        .unwrap();
    d.wait_event("BLOCK_EXPORT_DELETED", json!({"id": "e0"}));
    assert_eq!(
        d.call("block-export-del", json!({"id": "e0"})),
        Err("Export 'e0' is not found".into())
    );
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn stopping_the_server_deletes_every_export() {
    let mut d = Daemon::new();
    d.add_qcow2("a", "1M");
    d.add_qcow2("b", "1M");
    d.start_server();
    for (id, node) in [("e0", "a"), ("e1", "b")] {
        d.call(
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node}),
        )
        .unwrap();
    }
    d.call("nbd-server-stop", json!({})).unwrap();
    let mut deleted = d.events_named("BLOCK_EXPORT_DELETED");
    deleted.sort_by_key(|v| v["id"].as_str().unwrap().to_string());
    assert_eq!(deleted, vec![json!({"id": "e0"}), json!({"id": "e1"})]);
    assert!(!qemu_io(&d.uri("a"), "read 0 512"));
    d.start_server();
}

#[test]
fn shutdown_stops_the_server() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    d.start_server();
    d.call(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "src"}),
    )
    .unwrap();
    d.bd.shutdown().unwrap();
    assert_eq!(
        d.events_named("BLOCK_EXPORT_DELETED"),
        vec![json!({"id": "e0"})]
    );
    assert!(!qemu_io(&d.uri("src"), "read 0 512"));
}

#[test]
fn a_tcp_server_needs_a_numeric_port() {
    let mut d = Daemon::new();
    assert_eq!(
        d.call(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "notaport"}}})
        ),
        Err(
            "address resolution failed for 127.0.0.1:notaport: Servname not supported for \
             ai_socktype"
                .into()
        )
    );
    d.call(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}),
    )
    .unwrap();
    d.call("nbd-server-stop", json!({})).unwrap();
}

#[test]
fn exported_bitmaps_are_checked_like_qemu_and_busy_until_the_export_is_gone() {
    let mut d = Daemon::new();
    d.add_qcow2("src", "1M");
    d.start_server();
    d.call(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0"}),
    )
    .unwrap();
    let export = |bitmaps: Value| {
        json!({"type": "nbd", "id": "e0", "node-name": "src", "bitmaps": bitmaps,
               "allocation-depth": true})
    };
    assert_eq!(
        d.call("block-export-add", export(json!(["nope"]))),
        Err("Bitmap 'nope' is not found".into())
    );
    assert_eq!(
        d.call(
            "block-export-add",
            export(json!([{"node": "nope", "name": "b0"}]))
        ),
        Err("Node 'nope' not found".into())
    );
    // An enabled bitmap of a writable node would change under a read-only export's client.
    assert_eq!(
        d.call("block-export-add", export(json!(["b0"]))),
        Err("Enabled bitmap 'b0' incompatible with readonly export".into())
    );
    d.call(
        "block-dirty-bitmap-disable",
        json!({"node": "src", "name": "b0"}),
    )
    .unwrap();
    d.call("block-export-add", export(json!(["b0"]))).unwrap();
    let busy =
        Err("Bitmap 'b0' is currently in use by another operation and cannot be used".into());
    assert_eq!(
        d.call(
            "block-dirty-bitmap-remove",
            json!({"node": "src", "name": "b0"})
        ),
        busy
    );
    d.call("block-export-del", json!({"id": "e0"})).unwrap();
    d.wait_event("BLOCK_EXPORT_DELETED", json!({"id": "e0"}));
    d.call(
        "block-dirty-bitmap-remove",
        json!({"node": "src", "name": "b0"}),
    )
    .unwrap();
}
