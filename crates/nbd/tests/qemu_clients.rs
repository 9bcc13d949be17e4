//! The server as QEMU's own NBD client tools (qemu-io, qemu-img, qemu-nbd) see it.

mod common;

use common::*;
use nbd::{BoundAddr, Export, ListenAddr, NbdServer, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_lands_in_the_export() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(4 * MIB, 0x11);
    server.export("src", memory.clone(), true);

    let uri = server.uri("src");
    let output = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 512k 64k", &uri],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));

    let bytes = memory.bytes();
    assert!(bytes[512 * 1024..576 * 1024].iter().all(|&b| b == 0x44));
    assert!(bytes[..512 * 1024].iter().all(|&b| b == 0x11));
    assert!(bytes[576 * 1024..].iter().all(|&b| b == 0x11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_read_only_connection_reads_the_pattern() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    server.export("src", memory.clone(), false);

    let uri = server.uri("src");
    let good = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x11 0 1M", &uri],
    )
    .await;
    assert!(good.status.success(), "{}", text(&good));
    assert!(!text(&good).contains("Pattern verification failed"));

    let bad = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x22 0 4k", &uri],
    )
    .await;
    assert!(
        text(&bad).contains("Pattern verification failed"),
        "{}",
        text(&bad)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_zeroes_and_discard_reach_the_export() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    server.export("src", memory.clone(), true);

    let uri = server.uri("src");
    let output = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -z 64k 64k",
            "-c",
            "discard 256k 64k",
            "-c",
            "flush",
            &uri,
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    let bytes = memory.bytes();
    assert!(bytes[64 * 1024..128 * 1024].iter().all(|&b| b == 0));
    assert!(bytes[..64 * 1024].iter().all(|&b| b == 0x11));
    assert!(memory.flushes() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_reports_the_export_size() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(3 * MIB, 0), false);

    let output = run("qemu-img", &["info", "--output=json", &server.uri("disk")]).await;
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("\"virtual-size\": 3145728"),
        "{}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_copies_every_byte() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(2 * MIB, 0);
    {
        use nbd::ExportBackend;
        let pattern: Vec<u8> = (0..2 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        memory.write_at(&pattern, 0).unwrap();
    }
    server.export("disk", memory.clone(), false);

    let out = server.dir.path().join("out.raw");
    let output = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri("disk"),
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(std::fs::read(&out).unwrap(), memory.bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_list_shows_every_export_with_its_description() {
    let server = UnixServer::start().await;
    server
        .server
        .add_export(Export::new("first", MemoryExport::filled(MIB, 0)).description("the first"))
        .unwrap();
    server.export("second", MemoryExport::filled(2 * MIB, 0), true);

    let socket = server.socket.to_str().unwrap().to_owned();
    let output = run("qemu-nbd", &["--list", "-k", &socket]).await;
    let listing = text(&output);
    assert!(output.status.success(), "{listing}");
    assert!(listing.contains("exports available: 2"), "{listing}");
    assert!(listing.contains("export: 'first'"), "{listing}");
    assert!(listing.contains("description: the first"), "{listing}");
    assert!(listing.contains("export: 'second'"), "{listing}");
    assert!(listing.contains("size:  2097152"), "{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_qemu_io_writes() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    server.export("ro", memory.clone(), false);

    let uri = server.uri("ro");
    let output = run("qemu-io", &["-f", "raw", "-c", "write -P 0x44 0 4k", &uri]).await;
    // QEMU's client sees the read-only flag and refuses a read-write open.
    assert!(!output.status.success());
    assert!(
        text(&output).contains("Permission denied"),
        "{}",
        text(&output)
    );
    assert!(memory.bytes().iter().all(|&b| b == 0x11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_name_is_refused_to_qemu_img() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);

    let output = run("qemu-img", &["info", &server.uri("nope")]).await;
    assert!(!output.status.success());
    assert!(text(&output).contains("nope"), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_on_an_ephemeral_port_serves_qemu_io() {
    let server = NbdServer::start(
        &ListenAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        },
        ServerConfig::default(),
    )
    .await
    .unwrap();
    let memory = MemoryExport::filled(MIB, 0);
    server
        .add_export(Export::new("net", memory.clone()).writable(true))
        .unwrap();
    let BoundAddr::Tcp(addr) = server.local_addr().clone() else {
        panic!("a TCP address");
    };
    assert_ne!(addr.port(), 0);

    let uri = format!("nbd://127.0.0.1:{}/net", addr.port());
    let output = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 4k 4k",
            "-c",
            "read -P 0x5a 4k 4k",
            &uri,
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains("failed"), "{}", text(&output));
    assert!(memory.bytes()[4096..8192].iter().all(|&b| b == 0x5a));
    assert_eq!(server.stop().await, vec!["net".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_sees_zero_holes_through_base_allocation() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    {
        use nbd::ExportBackend;
        memory.write_zeroes(256 * 1024, 256 * 1024).unwrap();
    }
    server.export("disk", memory, false);

    let output = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &server.uri("disk")],
    )
    .await;
    let map = text(&output);
    assert!(output.status.success(), "{map}");
    assert!(
        map.contains(r#""start": 262144, "length": 262144, "depth": 0, "present": true, "zero": true, "data": false"#),
        "{map}"
    );
    assert!(map.contains(r#""start": 0, "length": 262144, "depth": 0, "present": true, "zero": false, "data": true"#), "{map}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_removal_disconnects_a_connected_qemu_io() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0x11), true);
    let mut qemu_io = tokio::process::Command::new("qemu-io")
        .args(["-f", "raw", &server.uri("disk")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = qemu_io.stdin.take().unwrap();
    let mut stdout = BufReader::new(qemu_io.stdout.take().unwrap()).lines();

    // A completed read proves the client is in transmission.
    stdin.write_all(b"read -P 0x11 0 4k\n").await.unwrap();
    while let Some(line) = stdout.next_line().await.unwrap() {
        if line.contains("read 4096/4096 bytes") {
            break;
        }
    }
    assert_eq!(server.server.client_count("disk"), Some(1));
    assert!(
        server
            .server
            .remove_export("disk", nbd::RemoveMode::Safe)
            .is_err()
    );

    let deletion = server
        .server
        .remove_export("disk", nbd::RemoveMode::Hard)
        .unwrap();
    assert_eq!(deletion.wait().await, "disk");

    // The disconnected client's next request fails.
    stdin.write_all(b"read 0 4k\n").await.unwrap();
    let mut failed = false;
    while let Some(line) = stdout.next_line().await.unwrap() {
        assert!(!line.contains("read 4096/4096"), "{line}");
        if line.contains("read failed") {
            failed = true;
            break;
        }
    }
    assert!(failed);
    stdin.write_all(b"quit\n").await.unwrap();
    qemu_io.wait().await.unwrap();
}
