//! The NBD client (`nbd::client`) against our server, `qemu-nbd`, qemu-storage-daemon's
//! export and `nbdkit memory`: the handshake, every command, many requests in flight, block
//! status in several contexts, read-only exports, a clean disconnect, and reconnection.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::client::{
    ClientError, Command, Connector, Negotiation, Outcome, Reconnecting, ServerAddr, ZeroFlags,
};
use nbd::{BlockStatus, Export, ListenAddr, NbdServer, ServerConfig, StatusExtent};

fn unix(path: &Path) -> ServerAddr {
    ServerAddr::Unix(path.to_path_buf())
}

/// Reports every 64 KiB block as "dirty" when its index is odd (a stand-in for a bitmap).
struct OddBlocks;

impl BlockStatus for OddBlocks {
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        let block = offset / 65536;
        let end = ((block + 1) * 65536).min(offset + len);
        Ok(vec![StatusExtent {
            length: end - offset,
            flags: (block % 2) as u32,
        }])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_flushes_trims_and_zeroes_through_our_server() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    server.export("disk", memory.clone(), true);
    let client = Connector::new(unix(&server.socket), "disk")
        .connect()
        .await
        .unwrap();
    assert_eq!(client.info().size, MIB as u64);
    assert!(!client.info().read_only());
    assert!(client.info().structured);

    client.write(4096, &[0xab; 8192], false).await.unwrap();
    assert_eq!(client.read(4096, 8192).await.unwrap(), vec![0xab; 8192]);
    client.write(0, &[0xcd; 512], true).await.unwrap();
    assert_eq!(memory.flushes(), 1);
    client.flush().await.unwrap();
    assert_eq!(memory.flushes(), 2);
    client
        .write_zeroes(8192, 4096, ZeroFlags::default())
        .await
        .unwrap();
    client.trim(65536, 4096, false).await.unwrap();
    let bytes = memory.bytes();
    assert!(bytes[..512].iter().all(|&b| b == 0xcd));
    assert!(bytes[4096..8192].iter().all(|&b| b == 0xab));
    assert!(bytes[8192..12288].iter().all(|&b| b == 0));
    assert!(bytes[12288..16384].iter().all(|&b| b == 0x11));
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_are_matched_to_their_replies() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0);
    {
        use nbd::ExportBackend;
        let pattern: Vec<u8> = (0..MIB).map(|i| (i / 4096) as u8).collect();
        memory.write_at(&pattern, 0).unwrap();
    }
    server.export("disk", memory, false);
    let client = Arc::new(
        Connector::new(unix(&server.socket), "disk")
            .connect()
            .await
            .unwrap(),
    );
    let mut reads = tokio::task::JoinSet::new();
    for block in (0..256u64).rev() {
        let client = Arc::clone(&client);
        reads.spawn(async move { (block, client.read(block * 4096, 4096).await) });
    }
    let mut seen = 0;
    while let Some(done) = reads.join_next().await {
        let (block, data) = done.unwrap();
        assert_eq!(data.unwrap(), vec![block as u8; 4096], "block {block}");
        seen += 1;
    }
    assert_eq!(seen, 256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_export_is_honoured_before_anything_is_sent() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    server.export("ro", memory.clone(), false);
    let client = Connector::new(unix(&server.socket), "ro")
        .connect()
        .await
        .unwrap();
    assert!(client.info().read_only());
    for refused in [
        client.write(0, &[1], false).await,
        client.write_zeroes(0, 1, ZeroFlags::default()).await,
        client.trim(0, 1, false).await,
    ] {
        assert!(
            matches!(refused, Err(ClientError::InvalidRequest(ref m)) if m.contains("read-only")),
            "{refused:?}"
        );
    }
    assert!(memory.bytes().iter().all(|&b| b == 0x11));
    assert_eq!(client.read(0, 2).await.unwrap(), vec![0x11, 0x11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_answers_every_selected_context() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    {
        use nbd::ExportBackend;
        memory.write_zeroes(0, 65536).unwrap();
    }
    server
        .server
        .add_export(Export::new("disk", memory).meta_context("test:odd", Arc::new(OddBlocks)))
        .unwrap();
    let client = Connector::new(unix(&server.socket), "disk")
        .meta_context("base:allocation")
        .meta_context("test:odd")
        .connect()
        .await
        .unwrap();
    let base = client.info().context_id("base:allocation").unwrap();
    let odd = client.info().context_id("test:odd").unwrap();
    assert_eq!((base, odd), (0, 1));
    let status = client.block_status(0, 4 * 65536, false).await.unwrap();
    let extents = |id| -> Vec<(u64, u32)> {
        status
            .extents(id)
            .unwrap()
            .iter()
            .map(|e| (e.length, e.flags))
            .collect()
    };
    assert_eq!(extents(base), vec![(65536, 3), (3 * 65536, 0)]);
    assert_eq!(
        extents(odd),
        vec![(65536, 0), (65536, 1), (65536, 0), (65536, 1)]
    );
    let one = client.block_status(0, 4 * 65536, true).await.unwrap();
    assert_eq!(one.extents(odd).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_meta_context_follows_qemus_query_forms() {
    let server = UnixServer::start().await;
    server
        .server
        .add_export(
            Export::new("disk", MemoryExport::filled(MIB, 0))
                .meta_context("qemu:allocation-depth", Arc::new(OddBlocks))
                .meta_context("qemu:dirty-bitmap:a", Arc::new(OddBlocks))
                .meta_context("qemu:dirty-bitmap:b", Arc::new(OddBlocks)),
        )
        .unwrap();
    let mut negotiation = Negotiation::connect(&unix(&server.socket)).await.unwrap();
    let mut list = async |queries: &[&str]| {
        negotiation
            .list_meta_contexts("disk", queries)
            .await
            .unwrap()
    };
    assert_eq!(
        list(&[]).await,
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b"
        ]
    );
    assert_eq!(list(&["base:"]).await, ["base:allocation"]);
    assert_eq!(
        list(&["qemu:"]).await,
        [
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b"
        ]
    );
    assert_eq!(
        list(&["qemu:dirty-bitmap:"]).await,
        ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]
    );
    assert_eq!(
        list(&["qemu:dirty-bitmap:b", "nope:x", "qemu:dirty"]).await,
        ["qemu:dirty-bitmap:b"]
    );
    // SET takes exact names only: a namespace selects nothing.
    let selected = negotiation
        .set_meta_contexts("disk", &["qemu:", "qemu:dirty-bitmap:a"])
        .await
        .unwrap();
    assert_eq!(selected, ["qemu:dirty-bitmap:a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_export_or_context_is_refused_at_the_handshake() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let unknown = Connector::new(unix(&server.socket), "nope").connect().await;
    assert!(
        matches!(unknown, Err(ClientError::Refused { ref message, .. }) if message.contains("nope")),
        "{:?}",
        unknown.err()
    );
    let context = Connector::new(unix(&server.socket), "disk")
        .meta_context("qemu:dirty-bitmap:x")
        .connect()
        .await;
    assert!(
        matches!(context, Err(ClientError::NoSuchContext(ref name)) if name == "qemu:dirty-bitmap:x")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_disconnect_detaches_from_the_export() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let client = Connector::new(unix(&server.socket), "disk")
        .connect()
        .await
        .unwrap();
    assert_eq!(server.server.client_count("disk"), Some(1));
    client.disconnect().await;
    // The server closed its side (the client's reader saw the end), so the export is free.
    let deletion = server
        .server
        .remove_export("disk", nbd::RemoveMode::Safe)
        .unwrap();
    assert_eq!(deletion.wait().await, "disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_a_lost_connection_fail_as_retryable() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let client = Connector::new(unix(&server.socket), "disk")
        .connect()
        .await
        .unwrap();
    server.server.stop().await;
    let lost = client.read(0, 512).await.unwrap_err();
    assert!(lost.is_retryable(), "{lost:?}");
    assert!(!client.is_connected());
}

/// A server on `socket` exporting `memory` as "disk", writable.
async fn serve_at(socket: &Path, memory: Arc<MemoryExport>) -> NbdServer {
    let server = NbdServer::start(&ListenAddr::Unix(socket.into()), ServerConfig::default())
        .await
        .unwrap();
    server
        .add_export(Export::new("disk", memory).writable(true))
        .unwrap();
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_retries_on_a_restarted_server_within_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let memory = MemoryExport::filled(MIB, 0x22);
    let first = serve_at(&socket, memory.clone()).await;
    let client = Arc::new(
        Reconnecting::connect(
            Connector::new(unix(&socket), "disk"),
            Duration::from_secs(10),
        )
        .await
        .unwrap(),
    );
    let write = Command::Write {
        offset: 0,
        data: vec![0x33; 4096],
        fua: false,
    };
    assert_eq!(client.execute(&write).await.unwrap(), Outcome::Done);

    // The server goes away; a request made meanwhile waits for the next one.
    first.stop().await;
    let pending = {
        let client = Arc::clone(&client);
        tokio::spawn(async move {
            client
                .execute(&Command::Read {
                    offset: 0,
                    len: 8192,
                })
                .await
        })
    };
    let second = serve_at(&socket, memory.clone()).await;
    let data = match pending.await.unwrap().unwrap() {
        Outcome::Data(data) => data,
        other => panic!("{other:?}"),
    };
    assert_eq!(&data[..4096], &[0x33; 4096]);
    assert_eq!(&data[4096..], &[0x22; 4096]);
    client.disconnect().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_fails_with_the_loss_past_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let server = serve_at(&socket, MemoryExport::filled(MIB, 0)).await;
    let client = Reconnecting::connect(
        Connector::new(unix(&socket), "disk"),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    server.stop().await;
    let started = Instant::now();
    let failed = client.execute(&Command::Flush).await.unwrap_err();
    assert!(failed.is_retryable(), "{failed:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let io: io::Error = failed.into();
    assert_eq!(io.kind(), io::ErrorKind::Other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_is_not_retried_and_keeps_its_errno() {
    let server = UnixServer::start().await;
    server.export("bad", Arc::new(FailingExport), true);
    let client = Reconnecting::connect(
        Connector::new(unix(&server.socket), "bad"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let failed = client
        .execute(&Command::Read {
            offset: 0,
            len: 512,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(failed, ClientError::Server { errno: EIO, .. }),
        "{failed:?}"
    );
    let io: io::Error = failed.into();
    assert_eq!(io.raw_os_error(), None);
    assert!(io.to_string().contains("error 5"), "{io}");
}

// ---- other servers ----

/// A server process, killed when dropped.
struct ServerProcess {
    child: std::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program` (which must create `socket`) and waits for the socket.
fn spawn_server(
    program: &str,
    package: &str,
    args: &[&str],
    dir: tempfile::TempDir,
    socket: PathBuf,
) -> ServerProcess {
    let child = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                panic!("{program} is missing: install it with `apt-get install {package}`")
            }
            _ => panic!("{program}: {e}"),
        });
    let mut process = ServerProcess {
        child,
        socket,
        _dir: dir,
    };
    // The socket file appears at bind(), a moment before listen(): wait until it accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&process.socket).is_err() {
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!("{program} exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{program}: not listening after 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    process
}

fn qemu_img(args: &[&str]) {
    let output = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(output.status.success(), "{}", text(&output));
}

fn qemu_io(image: &str, commands: &[&str]) {
    let mut args = Vec::new();
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(image);
    let output = std::process::Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("qemu-io (apt-get install qemu-utils)");
    assert!(output.status.success(), "{}", text(&output));
}

/// A qcow2 overlay over a base (64 KiB of data in the base at 0, 64 KiB in the overlay at
/// 128 KiB, a zero cluster at 256 KiB), with persistent bitmap `b0` recording the overlay's
/// writes after its creation: 64 KiB at 128 KiB.
fn qcow2_chain(dir: &Path) -> String {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let (base, top) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", base, "1M"]);
    qemu_io(base, &["write -P 5 0 64k"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
    ]);
    qemu_img(&["bitmap", "--add", top, "b0"]);
    qemu_io(top, &["write -P 6 128k 64k", "write -z 256k 64k"]);
    top.to_string()
}

fn runs(extents: &[StatusExtent]) -> Vec<(u64, u32)> {
    extents.iter().map(|e| (e.length, e.flags)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_exports_read_with_allocation_depth_and_a_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2_chain(dir.path());
    let socket = dir.path().join("nbd.sock");
    let sock = socket.to_str().unwrap().to_string();
    let server = spawn_server(
        "qemu-nbd",
        "qemu-utils",
        &[
            "-k", &sock, "-f", "qcow2", "-r", "-A", "-B", "b0", "-x", "disk", "-t", &image,
        ],
        dir,
        socket,
    );
    let client = Connector::new(unix(&server.socket), "disk")
        .meta_context("base:allocation")
        .meta_context("qemu:allocation-depth")
        .meta_context("qemu:dirty-bitmap:b0")
        .connect()
        .await
        .unwrap();
    assert!(client.info().read_only());
    assert_eq!(client.read(0, 4).await.unwrap(), vec![5; 4]);
    assert_eq!(client.read(128 * 1024, 4).await.unwrap(), vec![6; 4]);
    let status = client.block_status(0, 1 << 20, false).await.unwrap();
    let id = |name| client.info().context_id(name).unwrap();
    assert_eq!(
        runs(status.extents(id("base:allocation")).unwrap()),
        vec![(64 << 10, 0), (64 << 10, 3), (64 << 10, 0), (832 << 10, 3)]
    );
    assert_eq!(
        runs(status.extents(id("qemu:allocation-depth")).unwrap()),
        vec![
            (64 << 10, 2),
            (64 << 10, 0),
            (64 << 10, 1),
            (64 << 10, 0),
            (64 << 10, 1),
            (704 << 10, 0)
        ]
    );
    assert_eq!(
        runs(status.extents(id("qemu:dirty-bitmap:b0")).unwrap()),
        vec![
            (128 << 10, 0),
            (64 << 10, 1),
            (64 << 10, 0),
            (64 << 10, 1),
            (704 << 10, 0)
        ]
    );
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_writable_export_takes_writes_zeroes_and_fast_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let image = image.to_str().unwrap().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &image, "1M"]);
    let socket = dir.path().join("nbd.sock");
    let sock = socket.to_str().unwrap().to_string();
    let server = spawn_server(
        "qemu-nbd",
        "qemu-utils",
        &["-k", &sock, "-f", "qcow2", "-x", "disk", "-t", &image],
        dir,
        socket,
    );
    let client = Connector::new(unix(&server.socket), "disk")
        .meta_context("base:allocation")
        .connect()
        .await
        .unwrap();
    assert!(client.info().can_fast_zero());
    client.write(0, &[7; 131072], true).await.unwrap();
    client
        .write_zeroes(65536, 65536, ZeroFlags::default())
        .await
        .unwrap();
    // A whole cluster can be zeroed fast in qcow2; the client passes the flag through.
    let fast = ZeroFlags {
        fast: true,
        ..ZeroFlags::default()
    };
    client.write_zeroes(0, 65536, fast).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.read(0, 131072).await.unwrap(), vec![0; 131072]);
    client.trim(0, 65536, false).await.unwrap();
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_storage_daemon_export_serves_reads_writes_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2_chain(dir.path());
    let socket = dir.path().join("nbd.sock");
    let sock = socket.to_str().unwrap().to_string();
    let blockdev = format!("driver=qcow2,node-name=top,file.driver=file,file.filename={image}");
    let server = spawn_server(
        "qemu-storage-daemon",
        "qemu-utils",
        &[
            "--blockdev",
            &blockdev,
            "--nbd-server",
            &format!("addr.type=unix,addr.path={sock}"),
            "--export",
            "type=nbd,id=e,node-name=top,name=disk,writable=on,bitmaps.0=b0",
        ],
        dir,
        socket,
    );
    let client = Arc::new(
        Connector::new(unix(&server.socket), "disk")
            .meta_context("base:allocation")
            .meta_context("qemu:dirty-bitmap:b0")
            .connect()
            .await
            .unwrap(),
    );
    assert!(client.info().can_multi_conn());
    let mut writes = tokio::task::JoinSet::new();
    for block in 8..16u64 {
        let client = Arc::clone(&client);
        writes.spawn(async move {
            client
                .write(block * 65536, &[block as u8; 65536], false)
                .await
        });
    }
    while let Some(done) = writes.join_next().await {
        done.unwrap().unwrap();
    }
    client.flush().await.unwrap();
    assert_eq!(client.read(9 * 65536, 3).await.unwrap(), vec![9; 3]);
    let status = client.block_status(0, 1 << 20, false).await.unwrap();
    let dirty = client.info().context_id("qemu:dirty-bitmap:b0").unwrap();
    // The bitmap is enabled: our writes show in it after the qemu-io ones.
    assert_eq!(
        runs(status.extents(dirty).unwrap()),
        vec![
            (128 << 10, 0),
            (64 << 10, 1),
            (64 << 10, 0),
            (64 << 10, 1),
            (192 << 10, 0),
            (512 << 10, 1)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_serves_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let sock = socket.to_str().unwrap().to_string();
    let server = spawn_server(
        "nbdkit",
        "nbdkit",
        &["-f", "-U", &sock, "memory", "1M"],
        dir,
        socket,
    );
    let client = Connector::new(unix(&server.socket), "")
        .meta_context("base:allocation")
        .connect()
        .await
        .unwrap();
    assert_eq!(client.info().size, 1 << 20);
    client.write(4096, &[9; 4096], true).await.unwrap();
    assert_eq!(client.read(4096, 4096).await.unwrap(), vec![9; 4096]);
    let status = client.block_status(0, 1 << 20, false).await.unwrap();
    let base = client.info().context_id("base:allocation").unwrap();
    let extents = runs(status.extents(base).unwrap());
    // nbdkit allocates in pages of its own size: the written one is data, the rest holes.
    assert_eq!(extents.len(), 2, "{extents:?}");
    assert!(extents[0].0 >= 8192 && extents[0].1 == 0, "{extents:?}");
    assert_eq!(extents[1].1, 3, "{extents:?}");
    let flags = ZeroFlags {
        fast: client.info().can_fast_zero(),
        ..ZeroFlags::default()
    };
    client.write_zeroes(4096, 4096, flags).await.unwrap();
    client.trim(0, 65536, false).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.read(4096, 4096).await.unwrap(), vec![0; 4096]);
    client.disconnect().await;
}
