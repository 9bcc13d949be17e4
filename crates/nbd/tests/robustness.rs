//! Hostile and broken clients: each gets an error or is disconnected, and none can crash the
//! server, make it allocate what a header claims, or stall other connections and exports.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd::client::{Connector, ServerAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A second, well-behaved client reading from `export` on `server` answers within 5 s.
async fn still_served(server: &UnixServer, export: &str) {
    let check = async {
        let client = Connector::new(ServerAddr::Unix(server.socket.clone()), export)
            .connect()
            .await
            .unwrap();
        let data = client.read(0, 4096).await.unwrap();
        client.disconnect().await;
        data
    };
    let data = tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .expect("another client is served meanwhile");
    assert_eq!(data.len(), 4096);
}

async fn served(writable: bool) -> (UnixServer, Arc<MemoryExport>) {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    server.export("disk", memory.clone(), writable);
    server.export("other", MemoryExport::filled(MIB, 0x22), false);
    (server, memory)
}

/// A request header with its own cookie.
fn request(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut bytes = 0x2560_9513u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes.extend_from_slice(&command.to_be_bytes());
    bytes.extend_from_slice(&cookie.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_option_claiming_4_gib_of_data_is_disconnected_without_reading_it() {
    let (server, _) = served(false).await;
    let mut client = RawClient::connect(&server.socket).await;
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_LIST.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    client.stream.write_all(&header).await.unwrap();
    assert!(client.is_closed_by_server().await);
    still_served(&server, "disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_are_refused_and_haggling_goes_on() {
    let (server, _) = served(false).await;
    let mut client = RawClient::connect(&server.socket).await;
    for option in [0, 4, 5, 11, 12, 0xffff_ffff] {
        let replies = client.option(option, b"junk").await;
        assert_eq!(replies.len(), 1, "option {option}");
        assert!(replies[0].0 & 0x8000_0000 != 0, "option {option}");
    }
    assert!(client.go("disk").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_option_loop_is_cut_off_and_stalls_nobody() {
    let (server, _) = served(false).await;
    let client = RawClient::connect(&server.socket).await;
    let (mut reader, mut writer) = client.stream.into_split();
    // Read replies as fast as they come, so the server is never blocked on us.
    let drain = tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink).await;
    });
    let flood = tokio::spawn(async move {
        let mut option = IHAVEOPT.to_be_bytes().to_vec();
        option.extend_from_slice(&OPT_LIST.to_be_bytes());
        option.extend_from_slice(&0u32.to_be_bytes());
        let batch: Vec<u8> = option.repeat(1024);
        // More than the 65536 options a handshake may take; the server hangs up first.
        for _ in 0..128 {
            if writer.write_all(&batch).await.is_err() {
                return true;
            }
        }
        false
    });
    still_served(&server, "other").await;
    let cut_off = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the server ends the loop")
        .unwrap();
    assert!(cut_off, "the server took 131072 options");
    drain.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_lengths_answer_einval_without_allocating_them() {
    let (server, _) = served(true).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();
    for command in [CMD_READ, CMD_BLOCK_STATUS, CMD_TRIM, 5] {
        assert_eq!(
            client.request(command, 0, 0, u32::MAX, &[]).await.0,
            EINVAL,
            "command {command}"
        );
    }
    assert_eq!(
        client
            .request(CMD_WRITE_ZEROES, 0, 0, u32::MAX, &[])
            .await
            .0,
        ENOSPC
    );
    assert_eq!(client.request(CMD_READ, 0, 0, 2, &[]).await.1, [0x11, 0x11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_claiming_4_gib_closes_the_connection_at_once() {
    let (server, memory) = served(true).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();
    client
        .stream
        .write_all(&request(CMD_WRITE, 0, 1, 0, u32::MAX))
        .await
        .unwrap();
    assert!(client.is_closed_by_server().await);
    assert!(memory.bytes().iter().all(|&b| b == 0x11));
    still_served(&server, "disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_end_and_with_offsets_near_u64_max_are_refused() {
    let (server, memory) = served(true).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();
    let end = MIB as u64;
    for (command, offset, length, error) in [
        (CMD_READ, end, 1, EINVAL),
        (CMD_READ, u64::MAX, 1, EINVAL),
        (CMD_WRITE_ZEROES, u64::MAX - 1, 2, ENOSPC),
        (CMD_TRIM, end - 1, 2, EINVAL),
        (CMD_BLOCK_STATUS, u64::MAX, 1, EINVAL),
        (5, end, 1, EINVAL),
    ] {
        assert_eq!(
            client.request(command, 0, offset, length, &[]).await.0,
            error,
            "command {command} at {offset}"
        );
    }
    assert!(memory.bytes().iter().all(|&b| b == 0x11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_write_leaves_no_data_and_frees_the_export() {
    let (server, memory) = served(true).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();
    let mut partial = request(CMD_WRITE, 0, 7, 0, 65536);
    partial.extend_from_slice(&[0x99; 30000]);
    client.stream.write_all(&partial).await.unwrap();
    drop(client);
    // Once the server has seen the hang-up the export has no client: a safe removal succeeds.
    let deletion = loop {
        match server.server.remove_export("disk", nbd::RemoveMode::Safe) {
            Ok(deletion) => break deletion,
            Err(nbd::ExportError::InUse { .. }) => tokio::task::yield_now().await,
            Err(other) => panic!("{other}"),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), deletion.wait())
        .await
        .expect("deleted");
    assert!(memory.bytes().iter().all(|&b| b == 0x11));
    still_served(&server, "other").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_replies_stalls_only_itself() {
    let (server, _) = served(false).await;
    server.export("big", MemoryExport::filled(64 * MIB, 0x33), false);
    let mut client = RawClient::connect(&server.socket).await;
    client.go("big").await.unwrap();
    // 256 MiB of reads requested, no reply read: the socket fills, the server's replies
    // wait, and it reads no further request past its limit in flight.
    let mut flood = Vec::new();
    for cookie in 0..256u64 {
        flood.extend(request(
            CMD_READ,
            0,
            cookie,
            (cookie % 64) * MIB as u64,
            MIB as u32,
        ));
    }
    let writer = tokio::spawn(async move {
        let _ = client.stream.write_all(&flood).await;
        client
    });
    still_served(&server, "disk").await;
    still_served(&server, "other").await;
    // Hard removal disconnects it although its replies are stuck.
    let deletion = server
        .server
        .remove_export("big", nbd::RemoveMode::Hard)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), deletion.wait())
        .await
        .expect("the stuck client is disconnected");
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_with_their_cookies() {
    let (server, _) = served(false).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();
    let mut pipeline = Vec::new();
    for cookie in 0..100u64 {
        pipeline.extend(request(CMD_READ, 0, cookie, cookie * 512, 512));
    }
    client.stream.write_all(&pipeline).await.unwrap();
    let mut cookies = Vec::new();
    for _ in 0..100 {
        assert_eq!(client.stream.read_u32().await.unwrap(), 0x6744_6698);
        assert_eq!(client.stream.read_u32().await.unwrap(), 0);
        cookies.push(client.stream.read_u64().await.unwrap());
        let mut data = [0u8; 512];
        client.stream.read_exact(&mut data).await.unwrap();
        assert_eq!(data, [0x11; 512]);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_magic_after_good_requests_closes_only_that_connection() {
    let (server, _) = served(true).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.go("disk").await.unwrap();
    let mut bytes = request(CMD_READ, 0, 1, 0, 512);
    bytes.extend_from_slice(&[0xde; 28]);
    client.stream.write_all(&bytes).await.unwrap();
    // The good request is answered, then the connection closes.
    assert_eq!(client.simple_reply_any(512).await, (0, 1));
    assert!(client.is_closed_by_server().await);
    still_served(&server, "disk").await;
}
