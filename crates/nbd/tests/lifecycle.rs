//! Exports and the server over time: adding, removing (safe and hard) while clients are
//! connected, the deletion notification, connection limits and stopping.

mod common;

use std::time::Duration;

use common::*;
use nbd::{Export, ExportError, ListenAddr, NbdServer, RemoveMode, ServerConfig};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn duplicate_export_name_is_refused() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let again = server
        .server
        .add_export(Export::new("disk", MemoryExport::filled(MIB, 0)));
    assert_eq!(again, Err(ExportError::DuplicateName("disk".into())));
    assert_eq!(
        again.unwrap_err().to_string(),
        "NBD server already has export named 'disk'"
    );
}

#[tokio::test]
async fn removing_an_unknown_export_is_refused() {
    let server = UnixServer::start().await;
    let removal = server.server.remove_export("nope", RemoveMode::Hard);
    assert_eq!(removal.unwrap_err(), ExportError::NotFound("nope".into()));
}

#[tokio::test]
async fn removing_an_export_without_clients_completes_at_once() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let deletion = server
        .server
        .remove_export("disk", RemoveMode::Safe)
        .unwrap();
    assert!(deletion.is_complete());
    assert_eq!(deletion.wait().await, "disk");
    assert!(server.server.export_names().is_empty());
}

#[tokio::test]
async fn safe_removal_of_an_export_in_use_is_refused() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0x11), false);
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();
    assert_eq!(server.server.client_count("disk"), Some(1));

    let removal = server.server.remove_export("disk", RemoveMode::Safe);
    assert_eq!(
        removal.unwrap_err(),
        ExportError::InUse {
            name: "disk".into(),
            clients: 1
        }
    );
    assert_eq!(
        client.request(CMD_READ, 0, 0, 1, &[]).await,
        (0, vec![0x11])
    );
}

#[tokio::test]
async fn hard_removal_disconnects_clients_then_reports_deletion() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0x11), true);
    let mut first = RawClient::connect(&server.socket).await;
    first.go("disk").await.unwrap();
    let mut second = RawClient::connect(&server.socket).await;
    second.go("disk").await.unwrap();

    let deletion = server
        .server
        .remove_export("disk", RemoveMode::Hard)
        .unwrap();
    assert_eq!(deletion.wait().await, "disk");
    assert!(first.is_closed_by_server().await);
    assert!(second.is_closed_by_server().await);
}

#[tokio::test]
async fn hard_removal_racing_a_client_disconnect_completes() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();

    let deletion = server
        .server
        .remove_export("disk", RemoveMode::Hard)
        .unwrap();
    client.send_request(CMD_DISC, 0, 0, 0).await;
    deletion.wait().await;
    assert!(client.is_closed_by_server().await);
}

#[tokio::test]
async fn a_removed_export_is_unknown_to_new_clients_and_its_name_reusable() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    server
        .server
        .remove_export("disk", RemoveMode::Safe)
        .unwrap();

    let mut client = RawClient::connect(&server.socket).await;
    assert_eq!(client.go("disk").await, Err(REP_ERR_UNKNOWN));

    server.export("disk", MemoryExport::filled(2 * MIB, 0), false);
    assert_eq!(client.go("disk").await.unwrap().0, 2 * MIB as u64);
}

#[tokio::test]
async fn a_client_between_options_does_not_hold_an_export() {
    let server = UnixServer::start().await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let mut client = RawClient::connect(&server.socket).await;
    client.option(OPT_INFO, &info_request("disk", &[])).await;

    let deletion = server
        .server
        .remove_export("disk", RemoveMode::Safe)
        .unwrap();
    assert!(deletion.is_complete());
}

#[tokio::test]
async fn stop_disconnects_everyone_and_reports_every_export_deleted() {
    let server = UnixServer::start().await;
    server.export("a", MemoryExport::filled(MIB, 0), false);
    server.export("b", MemoryExport::filled(MIB, 0), true);
    let mut on_a = RawClient::connect(&server.socket).await;
    on_a.go("a").await.unwrap();
    let mut negotiating = RawClient::connect(&server.socket).await;

    let UnixServer {
        dir: _dir,
        socket,
        server,
    } = server;
    assert_eq!(server.stop().await, vec!["a".to_string(), "b".to_string()]);
    assert!(on_a.is_closed_by_server().await);
    assert!(negotiating.is_closed_by_server().await);
    assert!(!socket.exists(), "the socket file is removed");
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    // A server that went away without cleaning up leaves its socket file behind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let server = NbdServer::start(&ListenAddr::Unix(path.clone()), ServerConfig::default())
        .await
        .unwrap();
    server
        .add_export(Export::new("x", MemoryExport::filled(MIB, 0)))
        .unwrap();
    let mut client = RawClient::connect(&path).await;
    assert!(client.go("x").await.is_ok());
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_kept_and_start_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, b"data").unwrap();
    let started = NbdServer::start(&ListenAddr::Unix(path.clone()), ServerConfig::default()).await;
    assert!(started.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[tokio::test]
async fn max_connections_holds_further_clients_until_a_slot_frees() {
    let server = UnixServer::start_with(ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    })
    .await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let mut first = RawClient::connect(&server.socket).await;
    first.go("disk").await.unwrap();

    // The second client sits in the listen backlog: no greeting while the slot is taken.
    let mut second = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    let mut greeting = [0u8; 18];
    let early = tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut greeting));
    assert!(
        early.await.is_err(),
        "greeted while the only slot was taken"
    );

    first.send_request(CMD_DISC, 0, 0, 0).await;
    second.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
}
