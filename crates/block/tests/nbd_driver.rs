//! The `nbd` driver against the ecosystem's servers (`qemu-nbd`, `nbdkit memory`): data both
//! ways, block status as QEMU's client reads it (`base:allocation`, `x-dirty-bitmap`), FLUSH,
//! TRIM, WRITE_ZEROES with FAST_ZERO, read-only exports, QEMU's error texts, `open-timeout`,
//! and reconnection within `reconnect-delay` after the server went away.

mod common;
use common::AddJson;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{BlockGraph, BlockNode};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// Runs a tool, failing the test (saying what to install) if it is missing or fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            let package = match program {
                "nbdkit" => "nbdkit",
                _ => "qemu-utils",
            };
            panic!("{program}: {e} (install it with `apt-get install {package}`)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server process started with `--fork`-style readiness (the command returns once the
/// socket listens), killed through its pid file when dropped.
struct Server {
    pid_file: PathBuf,
    socket: PathBuf,
}

impl Server {
    /// `qemu-nbd` serving `image` (format `format`) as export `name` on a unix socket in `dir`.
    fn qemu_nbd(dir: &Path, tag: &str, image: &Path, format: &str, extra: &[&str]) -> Server {
        let socket = dir.join(format!("{tag}.sock"));
        let pid_file = dir.join(format!("{tag}.pid"));
        let mut args = vec![
            "--fork".to_string(),
            format!("--pid-file={}", pid_file.display()),
            "-k".into(),
            socket.display().to_string(),
            "-f".into(),
            format.into(),
            "-x".into(),
            "disk".into(),
            "-t".into(),
            "-e".into(),
            "4".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(image.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("qemu-nbd", &args);
        Server { pid_file, socket }
    }

    /// `nbdkit memory SIZE` as the default export on a unix socket in `dir`.
    fn nbdkit_memory(dir: &Path, size: &str) -> Server {
        Server::nbdkit_memory_with(dir, size, &[])
    }

    /// `nbdkit memory SIZE` with filters (`--filter=...` and their parameters).
    fn nbdkit_memory_with(dir: &Path, size: &str, filters: &[&str]) -> Server {
        let socket = dir.join("nbdkit.sock");
        let pid_file = dir.join("nbdkit.pid");
        let mut args = vec![
            "-U",
            socket.to_str().unwrap(),
            "-P",
            pid_file.to_str().unwrap(),
        ];
        let (filter_flags, parameters): (Vec<&str>, Vec<&str>) =
            filters.iter().partition(|a| a.starts_with("--filter"));
        args.extend(filter_flags);
        args.extend(["memory", size]);
        args.extend(parameters);
        run("nbdkit", &args);
        Server { pid_file, socket }
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// Kills the server and waits until it is gone.
    fn kill(&self) {
        let Some(pid) = self.pid() else { return };
        // SAFETY: plain syscalls on a process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let start = Instant::now();
        while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.pid_file);
        let _ = std::fs::remove_file(&self.socket);
    }

    fn server(&self) -> Value {
        json!({"type": "unix", "path": self.socket.to_str().unwrap()})
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size],
    );
    path
}

fn qemu_io(image: &Path, format: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", format];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(image.to_str().unwrap());
    run("qemu-io", &args)
}

fn nbd_node(graph: &mut BlockGraph, name: &str, server: &Server, extra: Value) -> Arc<BlockNode> {
    let mut options = json!({"driver": "nbd", "node-name": name, "server": server.server(),
                             "export": "disk"});
    for (k, v) in extra.as_object().unwrap() {
        options[k] = v.clone();
    }
    graph.blockdev_add_json(&options).unwrap()
}

fn add_error(graph: &mut BlockGraph, options: Value) -> String {
    graph
        .blockdev_add_json(&options)
        .map(|_| ())
        .unwrap_err()
        .desc()
        .to_string()
}

#[test]
fn an_nbd_node_reads_and_writes_a_qemu_nbd_export() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "4M");
    qemu_io(&image, "qcow2", &["write -P 0x11 0 1M"]);
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &[]);
    let mut graph = BlockGraph::new();
    let node = nbd_node(&mut graph, "n", &server, json!({}));
    assert_eq!(node.size().unwrap(), 4 * MIB);
    let mut buf = vec![0u8; 2 * MIB as usize];
    node.read_at(MIB / 2, &mut buf).unwrap();
    assert!(buf[..MIB as usize / 2].iter().all(|&b| b == 0x11));
    assert!(buf[MIB as usize / 2..].iter().all(|&b| b == 0));
    node.write_at(3 * MIB, &[0x22; 65536]).unwrap();
    node.write_zeroes_at(0, 65536).unwrap();
    node.flush().unwrap();
    graph.close_all().unwrap();
    drop(server);
    qemu_io(
        &image,
        "qcow2",
        &[
            "read -P 0 0 64k",
            "read -P 0x11 64k 960k",
            "read -P 0x22 3M 64k",
        ],
    );
}

#[test]
fn an_nbd_node_shows_qemus_pseudo_file_name_and_format() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "1M");
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &[]);
    let mut graph = BlockGraph::new();
    nbd_node(&mut graph, "n", &server, json!({}));
    let info = &graph.query_named_block_nodes(true)[0];
    let expected = format!("nbd+unix:///disk?socket={}", server.socket.display());
    assert_eq!(info.file, expected);
    assert_eq!(info.drv, "nbd");
    assert_eq!(info.image.format, "nbd");
    assert_eq!(info.image.virtual_size, MIB as i64);
    assert_eq!(info.image.actual_size, None);
}

#[test]
fn block_status_follows_base_allocation_as_qemus_client_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "4M");
    qemu_io(&image, "qcow2", &["write -P 1 0 1M", "write -z 2M 1M"]);
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &["-r"]);
    let mut graph = BlockGraph::new();
    let node = nbd_node(&mut graph, "n", &server, json!({"read-only": true}));
    let data = node.extent(0, 4 * MIB).unwrap();
    assert_eq!((data.len, data.allocated, data.zero), (MIB, true, false));
    // qemu-nbd reports the unallocated megabyte and the zero cluster alike: hole, zero.
    let hole = node.extent(MIB, 3 * MIB).unwrap();
    assert_eq!((hole.len, hole.zero), (3 * MIB, true));
}

#[test]
fn x_dirty_bitmap_reports_dirty_ranges_as_not_data_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "4M");
    run(
        "qemu-img",
        &["bitmap", "--add", image.to_str().unwrap(), "b0"],
    );
    // Written through qemu-io, the bitmap records the write.
    qemu_io(&image, "qcow2", &["write -P 1 1M 128k"]);
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &["-r", "-B", "b0"]);
    let mut graph = BlockGraph::new();
    let node = nbd_node(
        &mut graph,
        "n",
        &server,
        json!({"read-only": true, "x-dirty-bitmap": "qemu:dirty-bitmap:b0"}),
    );
    let clean = node.extent(0, 4 * MIB).unwrap();
    assert_eq!((clean.len, clean.allocated, clean.zero), (MIB, true, false));
    let dirty = node.extent(MIB, 3 * MIB).unwrap();
    assert_eq!(
        (dirty.len, dirty.allocated, dirty.zero),
        (128 << 10, false, false)
    );
    let after = node.extent(MIB + (128 << 10), MIB).unwrap();
    assert!(after.allocated);
}

#[test]
fn a_read_only_export_needs_a_read_only_node_or_auto_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "1M");
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &["-r"]);
    let mut graph = BlockGraph::new();
    let options = json!({"driver": "nbd", "node-name": "n", "server": server.server(),
                         "export": "disk"});
    assert_eq!(
        add_error(&mut graph, options.clone()),
        "Could not open image: Permission denied"
    );
    let mut auto = options.clone();
    auto["auto-read-only"] = json!(true);
    let node = graph.blockdev_add_json(&auto).unwrap();
    assert!(node.is_read_only());
    assert_eq!(
        node.write_at(0, &[1; 512]).unwrap_err().errno(),
        Some(libc::EPERM)
    );
}

#[test]
fn open_errors_read_like_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "1M");
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &[]);
    let mut graph = BlockGraph::new();
    let missing = dir.path().join("missing.sock");
    let cases = [
        (
            json!({"server": {"type": "unix", "path": missing.to_str().unwrap()}}),
            format!(
                "Failed to connect to '{}': No such file or directory",
                missing.display()
            ),
        ),
        (
            json!({"server": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
            "Failed to connect to '127.0.0.1:1': Connection refused".to_string(),
        ),
        (
            json!({"server": {"type": "inet", "host": "127.0.0.1", "port": "nbdxx"}}),
            "address resolution failed for 127.0.0.1:nbdxx: Servname not supported for \
             ai_socktype"
                .to_string(),
        ),
        (
            json!({"server": server.server(), "export": "nope"}),
            "Requested export not available".to_string(),
        ),
        (
            json!({"server": server.server(), "export": "disk",
                   "x-dirty-bitmap": "qemu:dirty-bitmap:zz"}),
            "Could not open image: Invalid argument".to_string(),
        ),
        (
            json!({"server": server.server(), "export": "x".repeat(5000)}),
            "export name too long to send to server".to_string(),
        ),
        (
            json!({"server": server.server(), "export": "disk", "tls-creds": "t0"}),
            "No TLS credentials with id 't0'".to_string(),
        ),
        (
            json!({"server": server.server(), "export": "disk", "tls-hostname": "h"}),
            "Parameter 'tls-hostname' needs TLS, which this daemon does not have".to_string(),
        ),
        (
            json!({"server": {"type": "inet", "host": "::1", "port": "1", "ipv6": true}}),
            "Parameter 'server.ipv6' is not supported by this daemon's NBD client".to_string(),
        ),
    ];
    for (extra, expected) in cases {
        let mut options = json!({"driver": "nbd", "node-name": "n"});
        for (k, v) in extra.as_object().unwrap() {
            options[k] = v.clone();
        }
        assert_eq!(add_error(&mut graph, options), expected);
    }
    assert!(graph.nodes().next().is_none());
}

#[test]
fn open_timeout_waits_for_a_server_that_comes_up_later() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "1M");
    let socket = dir.path().join("late.sock");
    let options = json!({"driver": "nbd", "node-name": "n", "export": "disk", "open-timeout": 10,
                         "server": {"type": "unix", "path": socket.to_str().unwrap()}});
    let opener = std::thread::spawn(move || {
        let mut graph = BlockGraph::new();
        let opened = graph.blockdev_add_json(&options).map(|n| n.size().unwrap());
        let _ = graph.close_all();
        opened
    });
    std::thread::sleep(Duration::from_millis(300));
    let _server = Server::qemu_nbd(dir.path(), "late", &image, "qcow2", &[]);
    assert_eq!(opener.join().unwrap().unwrap(), MIB);

    // Without a timeout, one attempt.
    let mut graph = BlockGraph::new();
    let gone = dir.path().join("gone.sock");
    let started = Instant::now();
    let error = add_error(
        &mut graph,
        json!({"driver": "nbd", "node-name": "m",
               "server": {"type": "unix", "path": gone.to_str().unwrap()}}),
    );
    assert!(error.starts_with("Failed to connect"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn nbdkit_memory_takes_zeroes_fast_zeroes_and_trims() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit_memory(dir.path(), "4M");
    let mut graph = BlockGraph::new();
    let node = graph
        .blockdev_add_json(
            &json!({"driver": "nbd", "node-name": "n", "discard": "unmap",
                                   "server": server.server()}),
        )
        .unwrap();
    node.write_at(0, &vec![0x55; 2 * MIB as usize]).unwrap();
    node.write_zeroes_at(0, 65536).unwrap();
    // nbdkit's memory plugin zeroes fast (it offers FAST_ZERO).
    node.write_zeroes_fast_at(65536, 65536).unwrap();
    node.discard_at(MIB, MIB).unwrap();
    let mut buf = vec![0xffu8; 2 * MIB as usize];
    node.read_at(0, &mut buf).unwrap();
    assert!(buf[..131072].iter().all(|&b| b == 0));
    assert!(buf[131072..MIB as usize].iter().all(|&b| b == 0x55));
    // The memory plugin frees trimmed pages: they read as zeroes.
    assert!(buf[MIB as usize..].iter().all(|&b| b == 0));
    let trimmed = node.extent(MIB, MIB).unwrap();
    assert!(trimmed.zero, "{trimmed:?}");
}

#[test]
fn fast_zero_fails_with_enotsup_where_the_server_cannot_zero_fast() {
    for mode in ["none", "slow"] {
        let dir = tempfile::tempdir().unwrap();
        // `none`: FAST_ZERO is not offered (refused before sending); `slow`: offered, and
        // every fast zero is answered ENOTSUP.
        let filter = format!("fastzeromode={mode}");
        let server = Server::nbdkit_memory_with(dir.path(), "1M", &["--filter=nozero", &filter]);
        let mut graph = BlockGraph::new();
        let node = graph
            .blockdev_add_json(&json!({"driver": "nbd", "node-name": "n",
                                       "server": server.server()}))
            .unwrap();
        node.write_at(0, &[9; 65536]).unwrap();
        let error = node.write_zeroes_fast_at(0, 65536).unwrap_err();
        assert_eq!(error.errno(), Some(libc::ENOTSUP), "{mode}: {error:?}");
        let mut buf = [0u8; 512];
        node.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [9; 512], "{mode}: nothing was zeroed");
        // The plain way still works.
        node.write_zeroes_at(0, 65536).unwrap();
        node.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 512]);
    }
}

#[test]
fn a_qcow2_overlay_reads_through_a_backing_file_over_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let base = qcow2(dir.path(), "base.qcow2", "2M");
    qemu_io(&base, "qcow2", &["write -P 0x33 0 2M"]);
    let server = Server::qemu_nbd(dir.path(), "q", &base, "qcow2", &["-r"]);
    let top = qcow2(dir.path(), "top.qcow2", "2M");
    let mut graph = BlockGraph::new();
    let node = graph
        .blockdev_add_json(&json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top.to_str().unwrap()},
            "backing": {"driver": "nbd", "server": server.server(), "export": "disk"}}))
        .unwrap();
    node.write_at(MIB, &[0x44; 4096]).unwrap();
    let mut buf = vec![0u8; 8192];
    node.read_at(MIB, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &[0x44; 4096]);
    assert_eq!(&buf[4096..], &[0x33; 4096]);
    let status = node.chain_status(0, 2 * MIB).unwrap();
    assert_eq!((status.data, status.depth), (true, 2));
    let backing = node.child("backing").unwrap();
    assert_eq!(backing.driver_name(), "nbd");
    assert!(backing.is_read_only());
}

#[test]
fn requests_in_flight_survive_a_server_restart_within_the_reconnect_delay() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "4M");
    qemu_io(&image, "qcow2", &["write -P 0x66 0 4M"]);
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &[]);
    let mut graph = BlockGraph::new();
    let node = nbd_node(&mut graph, "n", &server, json!({"reconnect-delay": 10}));
    server.kill();
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; MIB as usize];
                node.read_at(i * MIB, &mut buf).map(|()| buf)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let _second = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &[]);
    for reader in readers {
        let buf = reader.join().unwrap().unwrap();
        assert!(buf.iter().all(|&b| b == 0x66));
    }
    node.write_at(0, &[0x77; 512]).unwrap();
}

#[test]
fn past_the_reconnect_delay_requests_fail_with_eio_until_the_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "1M");
    let server = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &[]);
    let mut graph = BlockGraph::new();
    let node = nbd_node(&mut graph, "n", &server, json!({"reconnect-delay": 1}));
    server.kill();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let error = node.read_at(0, &mut buf).unwrap_err();
    assert_eq!(error.errno(), Some(libc::EIO));
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Past the delay, a request fails at once.
    let again = Instant::now();
    assert_eq!(
        node.read_at(0, &mut buf).unwrap_err().errno(),
        Some(libc::EIO)
    );
    assert!(again.elapsed() < Duration::from_millis(900));
    let _second = Server::qemu_nbd(dir.path(), "q", &image, "qcow2", &[]);
    node.read_at(0, &mut buf).unwrap();
}
