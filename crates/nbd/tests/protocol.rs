//! The protocol at the byte level: option haggling, request checks and their error values,
//! and robustness against malformed or hostile clients.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd::ServerConfig;
use tokio::io::AsyncWriteExt;

async fn served(name: &str, writable: bool) -> (UnixServer, Arc<MemoryExport>) {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0x11);
    server.export(name, memory.clone(), writable);
    (server, memory)
}

async fn transmitting(server: &UnixServer, name: &str) -> RawClient {
    let mut client = RawClient::connect(&server.socket).await;
    client.go(name).await.unwrap();
    client
}

#[tokio::test]
async fn go_reports_size_and_read_only_flag() {
    let (server, _) = served("ro", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    let (size, flags) = client.go("ro").await.unwrap();
    assert_eq!(size, MIB as u64);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
}

#[tokio::test]
async fn go_on_a_writable_export_does_not_flag_it_read_only() {
    let (server, _) = served("rw", true).await;
    let mut client = RawClient::connect(&server.socket).await;
    let (_, flags) = client.go("rw").await.unwrap();
    assert_eq!(flags & FLAG_READ_ONLY, 0);
}

#[tokio::test]
async fn info_sends_export_and_block_size_then_stays_in_negotiation() {
    let (server, _) = served("disk", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    let replies = client.option(OPT_INFO, &info_request("disk", &[3])).await;
    let kinds: Vec<(u32, u16)> = replies
        .iter()
        .filter(|(reply, _)| *reply == REP_INFO)
        .map(|(reply, data)| (*reply, u16::from_be_bytes([data[0], data[1]])))
        .collect();
    assert_eq!(kinds, vec![(REP_INFO, 0), (REP_INFO, 3)]);
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    // Still haggling: GO works afterwards.
    assert!(client.go("disk").await.is_ok());
}

#[tokio::test]
async fn go_on_an_unknown_export_answers_err_unknown() {
    let (server, _) = served("disk", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    assert_eq!(client.go("other").await, Err(REP_ERR_UNKNOWN));
}

#[tokio::test]
async fn malformed_go_data_answers_err_invalid() {
    let (server, _) = served("disk", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    let replies = client.option(OPT_GO, &[0, 0, 0, 9, b'd']).await;
    assert_eq!(
        replies,
        vec![(REP_ERR_INVALID, b"malformed info request".to_vec())]
    );
}

/// A client in transmission with structured replies, and `base:allocation` if `meta`.
async fn structured(server: &UnixServer, name: &str, meta: bool) -> RawClient {
    let mut client = RawClient::connect(&server.socket).await;
    assert_eq!(
        client.option(OPT_STRUCTURED_REPLY, &[]).await,
        vec![(REP_ACK, vec![])]
    );
    if meta {
        let replies = client
            .option(
                OPT_SET_META_CONTEXT,
                &meta_request(name, &["base:allocation"]),
            )
            .await;
        assert_eq!(replies.len(), 2);
    }
    client.go(name).await.unwrap();
    client
}

#[tokio::test]
async fn structured_read_answers_one_final_data_chunk_with_its_offset() {
    let (server, _) = served("disk", false).await;
    let mut client = structured(&server, "disk", false).await;
    client.send_request(CMD_READ, 0, 512, 3).await;
    let (flags, kind, payload) = read_chunk(&mut client).await;
    assert_eq!((flags, kind), (1, 1));
    assert_eq!(payload, [&512u64.to_be_bytes()[..], &[0x11; 3]].concat());
}

#[tokio::test]
async fn structured_errors_are_error_chunks() {
    let (server, _) = served("disk", false).await;
    let mut client = structured(&server, "disk", false).await;
    client.send_request(CMD_READ, 0, MIB as u64, 1).await;
    let (flags, kind, payload) = read_chunk(&mut client).await;
    assert_eq!((flags, kind), (1, 0x8001));
    assert_eq!(payload, [&EINVAL.to_be_bytes()[..], &[0, 0]].concat());
}

#[tokio::test]
async fn set_meta_context_selects_base_allocation() {
    let (server, _) = served("disk", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.option(OPT_STRUCTURED_REPLY, &[]).await;
    let request = meta_request("disk", &["qemu:dirty-bitmap:x", "base:allocation"]);
    let replies = client.option(OPT_SET_META_CONTEXT, &request).await;
    assert_eq!(replies[0].0, REP_META_CONTEXT);
    assert_eq!(&replies[0].1[4..], b"base:allocation");
    assert_eq!(replies[1], (REP_ACK, vec![]));
}

#[tokio::test]
async fn list_meta_context_without_queries_lists_base_allocation() {
    let (server, _) = served("disk", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.option(OPT_STRUCTURED_REPLY, &[]).await;
    let replies = client
        .option(OPT_LIST_META_CONTEXT, &meta_request("disk", &[]))
        .await;
    assert_eq!(replies.len(), 2);
    assert_eq!(&replies[0].1[4..], b"base:allocation");
}

#[tokio::test]
async fn meta_contexts_need_structured_replies_first() {
    let (server, _) = served("disk", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    let request = meta_request("disk", &["base:allocation"]);
    let replies = client.option(OPT_SET_META_CONTEXT, &request).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, REP_ERR_INVALID);
}

#[tokio::test]
async fn block_status_reports_the_backend_extents() {
    let (server, memory) = served("disk", true).await;
    {
        use nbd::ExportBackend;
        memory.write_zeroes(8192, 8192).unwrap();
    }
    let mut client = structured(&server, "disk", true).await;
    client.send_request(CMD_BLOCK_STATUS, 0, 4096, 16384).await;
    let (flags, kind, payload) = read_chunk(&mut client).await;
    assert_eq!((flags, kind), (1, 5));
    let words: Vec<u32> = payload
        .chunks_exact(4)
        .map(|word| u32::from_be_bytes(word.try_into().unwrap()))
        .collect();
    // Context id, then (length, flags): data, zero hole, data.
    assert_eq!(words[1..], [4096, 0, 8192, 3, 4096, 0]);
}

#[tokio::test]
async fn block_status_without_base_allocation_answers_einval() {
    let (server, _) = served("disk", false).await;
    let mut client = transmitting(&server, "disk").await;
    assert_eq!(
        client.request(CMD_BLOCK_STATUS, 0, 0, 512, &[]).await.0,
        EINVAL
    );
}

#[tokio::test]
async fn list_names_every_export() {
    let (server, _) = served("a", false).await;
    server.export("b", MemoryExport::filled(MIB, 0), false);
    let mut client = RawClient::connect(&server.socket).await;
    let replies = client.option(OPT_LIST, &[]).await;
    let names: Vec<&[u8]> = replies[..2].iter().map(|(_, data)| &data[4..]).collect();
    assert_eq!(names, vec![&b"a"[..], &b"b"[..]]);
    assert_eq!(replies[2].0, REP_ACK);
}

#[tokio::test]
async fn oversized_option_data_is_skipped_and_answered_too_big() {
    let (server, _) = served("disk", false).await;
    let mut client = RawClient::connect(&server.socket).await;
    let replies = client.option(OPT_LIST, &vec![0u8; 100_000]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, REP_ERR_TOO_BIG);
    assert!(client.go("disk").await.is_ok());
}

#[tokio::test]
async fn export_name_option_enters_transmission() {
    let (server, _) = served("disk", true).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.send_option(OPT_EXPORT_NAME, b"disk").await;
    use tokio::io::AsyncReadExt;
    assert_eq!(client.stream.read_u64().await.unwrap(), MIB as u64);
    let _flags = client.stream.read_u16().await.unwrap();
    let (error, data) = client.request(CMD_READ, 0, 0, 4, &[]).await;
    assert_eq!((error, data), (0, vec![0x11; 4]));
}

#[tokio::test]
async fn export_name_option_for_an_unknown_export_closes_the_connection() {
    let (server, _) = served("disk", true).await;
    let mut client = RawClient::connect(&server.socket).await;
    client.send_option(OPT_EXPORT_NAME, b"nope").await;
    assert!(client.is_closed_by_server().await);
}

#[tokio::test]
async fn write_to_a_read_only_export_answers_eperm() {
    let (server, memory) = served("ro", false).await;
    let mut client = transmitting(&server, "ro").await;
    assert_eq!(
        client.request(CMD_WRITE, 0, 0, 4, &[1, 2, 3, 4]).await.0,
        EPERM
    );
    assert_eq!(
        client.request(CMD_WRITE_ZEROES, 0, 0, 4, &[]).await.0,
        EPERM
    );
    assert_eq!(client.request(CMD_TRIM, 0, 0, 4, &[]).await.0, EPERM);
    assert!(memory.bytes().iter().all(|&b| b == 0x11));
    // The connection stays usable.
    assert_eq!(
        client.request(CMD_READ, 0, 0, 2, &[]).await,
        (0, vec![0x11, 0x11])
    );
}

#[tokio::test]
async fn read_past_the_end_answers_einval() {
    let (server, _) = served("disk", false).await;
    let mut client = transmitting(&server, "disk").await;
    assert_eq!(
        client.request(CMD_READ, 0, MIB as u64 - 2, 4, &[]).await.0,
        EINVAL
    );
    assert_eq!(
        client.request(CMD_READ, 0, u64::MAX, 4, &[]).await.0,
        EINVAL
    );
}

#[tokio::test]
async fn write_past_the_end_answers_enospc_and_keeps_the_stream_in_sync() {
    let (server, memory) = served("disk", true).await;
    let mut client = transmitting(&server, "disk").await;
    assert_eq!(
        client
            .request(CMD_WRITE, 0, MIB as u64 - 2, 4, &[9; 4])
            .await
            .0,
        ENOSPC
    );
    assert_eq!(
        client
            .request(CMD_WRITE_ZEROES, 0, MIB as u64, 1, &[])
            .await
            .0,
        ENOSPC
    );
    assert!(memory.bytes().iter().all(|&b| b == 0x11));
    assert_eq!(client.request(CMD_WRITE, 0, 0, 2, &[7, 7]).await.0, 0);
    assert_eq!(&memory.bytes()[..3], &[7, 7, 0x11]);
}

#[tokio::test]
async fn unknown_command_and_unknown_flags_answer_einval() {
    let (server, _) = served("disk", true).await;
    let mut client = transmitting(&server, "disk").await;
    assert_eq!(client.request(42, 0, 0, 0, &[]).await.0, EINVAL);
    assert_eq!(client.request(CMD_READ, 1 << 3, 0, 4, &[]).await.0, EINVAL);
    assert_eq!(client.request(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);
}

#[tokio::test]
async fn read_over_32_mib_answers_einval() {
    let (server, _) = served("disk", false).await;
    let mut client = transmitting(&server, "disk").await;
    assert_eq!(
        client
            .request(CMD_READ, 0, 0, 32 * MIB as u32 + 1, &[])
            .await
            .0,
        EINVAL
    );
}

#[tokio::test]
async fn write_over_32_mib_closes_the_connection() {
    let (server, _) = served("disk", true).await;
    let mut client = transmitting(&server, "disk").await;
    client
        .send_request(CMD_WRITE, 0, 0, 32 * MIB as u32 + 1)
        .await;
    assert!(client.is_closed_by_server().await);
}

#[tokio::test]
async fn fua_write_is_flushed_before_the_reply() {
    let (server, memory) = served("disk", true).await;
    let mut client = transmitting(&server, "disk").await;
    assert_eq!(client.request(CMD_WRITE, 0, 0, 1, &[1]).await.0, 0);
    assert_eq!(memory.flushes(), 0);
    assert_eq!(client.request(CMD_WRITE, FLAG_FUA, 0, 1, &[2]).await.0, 0);
    assert_eq!(memory.flushes(), 1);
}

#[tokio::test]
async fn write_zeroes_zeroes_the_range() {
    let (server, memory) = served("disk", true).await;
    let mut client = transmitting(&server, "disk").await;
    assert_eq!(client.request(CMD_WRITE_ZEROES, 0, 8, 8, &[]).await.0, 0);
    let bytes = memory.bytes();
    assert_eq!(
        &bytes[6..18],
        &[0x11, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, 0x11]
    );
}

#[tokio::test]
async fn backend_failures_answer_eio() {
    let server = UnixServer::start().await;
    server.export("bad", Arc::new(FailingExport), true);
    let mut client = transmitting(&server, "bad").await;
    assert_eq!(client.request(CMD_READ, 0, 0, 512, &[]).await.0, EIO);
    assert_eq!(client.request(CMD_WRITE, 0, 0, 2, &[1, 2]).await.0, EIO);
    assert_eq!(client.request(CMD_FLUSH, 0, 0, 0, &[]).await.0, EIO);
}

#[tokio::test]
async fn disc_ends_the_session() {
    let (server, _) = served("disk", true).await;
    let mut client = transmitting(&server, "disk").await;
    client.send_request(CMD_DISC, 0, 0, 0).await;
    assert!(client.is_closed_by_server().await);
}

#[tokio::test]
async fn garbage_instead_of_client_flags_closes_only_that_connection() {
    let (server, _) = served("disk", false).await;
    let mut other = transmitting(&server, "disk").await;

    let mut stream = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: nbd\r\n\r\n")
        .await
        .unwrap();
    let mut bad = RawClient { stream };
    assert!(bad.is_closed_by_server().await);

    assert_eq!(
        other.request(CMD_READ, 0, 0, 2, &[]).await,
        (0, vec![0x11, 0x11])
    );
    let mut fresh = transmitting(&server, "disk").await;
    assert_eq!(
        fresh.request(CMD_READ, 0, 2, 2, &[]).await,
        (0, vec![0x11, 0x11])
    );
}

#[tokio::test]
async fn garbage_option_request_closes_only_that_connection() {
    let (server, _) = served("disk", false).await;
    let mut bad = RawClient::connect(&server.socket).await;
    bad.stream.write_all(&[0xa5; 64]).await.unwrap();
    assert!(bad.is_closed_by_server().await);
    let mut fresh = transmitting(&server, "disk").await;
    assert_eq!(fresh.request(CMD_READ, 0, 0, 1, &[]).await, (0, vec![0x11]));
}

#[tokio::test]
async fn garbage_request_closes_only_that_connection() {
    let (server, _) = served("disk", true).await;
    let mut other = transmitting(&server, "disk").await;
    let mut bad = transmitting(&server, "disk").await;
    bad.stream.write_all(&[0xff; 28]).await.unwrap();
    assert!(bad.is_closed_by_server().await);
    assert_eq!(other.request(CMD_WRITE, 0, 0, 1, &[5]).await.0, 0);
    assert_eq!(other.request(CMD_READ, 0, 0, 1, &[]).await, (0, vec![5]));
}

#[tokio::test]
async fn unknown_client_flags_close_the_connection() {
    let (server, _) = served("disk", false).await;
    let mut stream = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    let mut greeting = [0u8; 18];
    use tokio::io::AsyncReadExt;
    stream.read_exact(&mut greeting).await.unwrap();
    stream.write_u32(0x8000_0001).await.unwrap();
    assert!(RawClient { stream }.is_closed_by_server().await);
}

#[tokio::test]
async fn a_client_silent_past_the_handshake_timeout_is_disconnected() {
    let server = UnixServer::start_with(ServerConfig {
        max_connections: 0,
        handshake_timeout: Some(Duration::from_millis(50)),
    })
    .await;
    server.export("disk", MemoryExport::filled(MIB, 0), false);
    let mut idle = RawClient::connect(&server.socket).await;
    assert!(idle.is_closed_by_server().await);
}

#[tokio::test]
async fn a_writethrough_export_flushes_every_write_before_its_reply() {
    let server = UnixServer::start().await;
    let memory = MemoryExport::filled(MIB, 0);
    server
        .server
        .add_export(
            nbd::Export::new("wt", memory.clone())
                .writable(true)
                .writethrough(true),
        )
        .unwrap();
    let mut client = transmitting(&server, "wt").await;
    assert_eq!(client.request(CMD_WRITE, 0, 0, 1, &[1]).await.0, 0);
    assert_eq!(memory.flushes(), 1);
    assert_eq!(client.request(CMD_WRITE_ZEROES, 0, 0, 8, &[]).await.0, 0);
    assert_eq!(memory.flushes(), 2);
    // Reads do not flush.
    assert_eq!(client.request(CMD_READ, 0, 0, 1, &[]).await.0, 0);
    assert_eq!(memory.flushes(), 2);
}

#[tokio::test]
async fn flags_follow_qemu_multi_conn_only_with_more_than_one_connection_allowed() {
    let shared = UnixServer::start().await;
    shared.export("rw", MemoryExport::filled(MIB, 0), true);
    let (_, flags) = RawClient::connect(&shared.socket)
        .await
        .go("rw")
        .await
        .unwrap();
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN,
    // SEND_CACHE, SEND_FAST_ZERO (no DF: structured replies were not negotiated).
    assert_eq!(flags, 0b1101_0110_1101);
    let single = UnixServer::start_with(ServerConfig {
        max_connections: 1,
        handshake_timeout: None,
    })
    .await;
    single.export("rw", MemoryExport::filled(MIB, 0), true);
    let (_, flags) = RawClient::connect(&single.socket)
        .await
        .go("rw")
        .await
        .unwrap();
    assert_eq!(flags & (1 << 8), 0);
}
