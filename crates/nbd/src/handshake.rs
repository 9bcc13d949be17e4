//! The fixed newstyle handshake: greeting, client flags, then option haggling until the client
//! picks an export (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`), aborts or hangs up.
//!
//! Served options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT and
//! SET_META_CONTEXT (`base:allocation` and the export's own contexts, with QEMU's query forms:
//! no query lists every context, a query ending in `:` lists those it prefixes). STARTTLS gets
//! `NBD_REP_ERR_POLICY`, everything else (extended headers, …) `NBD_REP_ERR_UNSUP`. A client
//! that sends more than [`wire::MAX_OPTIONS`] options, or option data over 32 MiB, is
//! disconnected.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::exports::{ExportEntry, ExportLease, Registry};
use crate::wire;

/// What the client chose: an export, how replies are sent, and the metadata contexts selected
/// (ids in increasing order: 0 is `base:allocation`, `i + 1` the export's context `i`).
pub(crate) struct Session {
    pub lease: ExportLease,
    pub structured: bool,
    pub contexts: Vec<u32>,
}

/// The contexts of the last SET_META_CONTEXT, and the export they were chosen on.
struct Selection {
    export: String,
    ids: Vec<u32>,
}

/// Runs the handshake; `Some` session when the client entered transmission on an export,
/// `None` when it ended the session cleanly (ABORT, or hung up between options).
pub(crate) async fn negotiate<S>(stream: &mut S, registry: &Registry) -> io::Result<Option<Session>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&wire::NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;

    let client_flags = stream.read_u32().await?;
    if client_flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & wire::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut selection: Option<Selection> = None;
    let session = |lease: ExportLease, structured: bool, selection: Option<Selection>| {
        let contexts = match selection {
            Some(selection) if selection.export == lease.entry().export.name => selection.ids,
            _ => Vec::new(),
        };
        Some(Session {
            lease,
            structured,
            contexts,
        })
    };

    for _ in 0..wire::MAX_OPTIONS {
        let mut header = [0u8; 16];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(error) => return Err(error),
        }
        let (magic, rest) = header.split_at(8);
        if magic != wire::IHAVEOPT.to_be_bytes() {
            return Err(protocol_error("option request without IHAVEOPT".into()));
        }
        let option = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let length = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);

        if length > wire::MAX_OPTION_SKIP {
            return Err(protocol_error(format!(
                "option data of {length} bytes is larger than 32 MiB"
            )));
        }
        if length > wire::MAX_OPTION_DATA {
            discard(stream, length).await?;
            if option == wire::OPT_EXPORT_NAME {
                return Err(protocol_error("export name too long".into()));
            }
            let message = format!("option data of {length} bytes is too large");
            reply_error(stream, option, wire::REP_ERR_TOO_BIG, &message).await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;

        match option {
            wire::OPT_EXPORT_NAME => {
                let lease = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|name| registry.attach(name))
                    .ok_or_else(|| {
                        protocol_error("NBD_OPT_EXPORT_NAME of an unknown export".into())
                    })?;
                let entry = lease.entry();
                let mut answer = Vec::with_capacity(134);
                answer.extend_from_slice(&entry.export.backend.size().to_be_bytes());
                answer.extend_from_slice(&entry.transmission_flags(structured).to_be_bytes());
                if !no_zeroes {
                    answer.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&answer).await?;
                return Ok(session(lease, structured, selection));
            }
            wire::OPT_ABORT => {
                // The client may already be gone; the session ends either way.
                let _ = send(stream, wire::option_reply(option, wire::REP_ACK, &[])).await;
                return Ok(None);
            }
            wire::OPT_LIST => {
                if !data.is_empty() {
                    reply_error(
                        stream,
                        option,
                        wire::REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )
                    .await?;
                    continue;
                }
                let mut replies = Vec::new();
                for (name, description) in registry.list() {
                    let mut server = Vec::with_capacity(4 + name.len() + description.len());
                    server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    server.extend_from_slice(name.as_bytes());
                    server.extend_from_slice(description.as_bytes());
                    replies.extend(wire::option_reply(option, wire::REP_SERVER, &server));
                }
                replies.extend(wire::option_reply(option, wire::REP_ACK, &[]));
                send(stream, replies).await?;
            }
            wire::OPT_INFO | wire::OPT_GO => {
                let Some(request) = InfoRequest::parse(&data) else {
                    reply_error(
                        stream,
                        option,
                        wire::REP_ERR_INVALID,
                        "malformed info request",
                    )
                    .await?;
                    continue;
                };
                if option == wire::OPT_GO {
                    let Some(lease) = registry.attach(request.name) else {
                        reply_unknown(stream, option, request.name).await?;
                        continue;
                    };
                    let replies = info_replies(option, &request, lease.entry(), structured);
                    send(stream, replies).await?;
                    return Ok(session(lease, structured, selection));
                }
                match registry.find(request.name) {
                    Some(entry) => {
                        send(stream, info_replies(option, &request, &entry, structured)).await?
                    }
                    None => reply_unknown(stream, option, request.name).await?,
                }
            }
            wire::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    let message = "NBD_OPT_STRUCTURED_REPLY takes no data";
                    reply_error(stream, option, wire::REP_ERR_INVALID, message).await?;
                    continue;
                }
                if structured {
                    let message = "structured reply already negotiated";
                    reply_error(stream, option, wire::REP_ERR_INVALID, message).await?;
                    continue;
                }
                structured = true;
                send(stream, wire::option_reply(option, wire::REP_ACK, &[])).await?;
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                let set = option == wire::OPT_SET_META_CONTEXT;
                if set && !structured {
                    let message = "request option 'NBD_OPT_SET_META_CONTEXT' when structured \
                                   reply is not negotiated";
                    reply_error(stream, option, wire::REP_ERR_INVALID, message).await?;
                    continue;
                }
                if set {
                    // A SET replaces the previous selection, even when it fails.
                    selection = None;
                }
                let Some(request) = MetaRequest::parse(&data) else {
                    let message = "malformed meta context request";
                    reply_error(stream, option, wire::REP_ERR_INVALID, message).await?;
                    continue;
                };
                let Some(entry) = registry.find(request.export) else {
                    reply_unknown(stream, option, request.export).await?;
                    continue;
                };
                let ids = select_contexts(&entry, &request.queries, !set);
                let mut replies = Vec::new();
                for &id in &ids {
                    let mut context = id.to_be_bytes().to_vec();
                    context.extend_from_slice(context_name(&entry, id).as_bytes());
                    replies.extend(wire::option_reply(option, wire::REP_META_CONTEXT, &context));
                }
                replies.extend(wire::option_reply(option, wire::REP_ACK, &[]));
                send(stream, replies).await?;
                if set {
                    selection = Some(Selection {
                        export: request.export.to_owned(),
                        ids,
                    });
                }
            }
            wire::OPT_STARTTLS => {
                reply_error(stream, option, wire::REP_ERR_POLICY, "TLS not configured").await?;
            }
            _ => {
                let message = format!("Unsupported option {option}");
                reply_error(stream, option, wire::REP_ERR_UNSUP, &message).await?;
            }
        }
    }
    Err(protocol_error(format!(
        "more than {} options in one handshake",
        wire::MAX_OPTIONS
    )))
}

/// The name of context `id` of an export.
pub(crate) fn context_name(entry: &ExportEntry, id: u32) -> &str {
    match id {
        wire::BASE_ALLOCATION_ID => wire::BASE_ALLOCATION,
        _ => &entry.export.contexts[id as usize - 1].name,
    }
}

/// The ids of the contexts `queries` select, in increasing order. An exact name selects its
/// context; when listing, no query selects every context and a query ending in `:` (a
/// namespace like `qemu:`, or `qemu:dirty-bitmap:`) every context it prefixes.
fn select_contexts(entry: &ExportEntry, queries: &[&str], list: bool) -> Vec<u32> {
    let names = std::iter::once(wire::BASE_ALLOCATION).chain(
        entry
            .export
            .contexts
            .iter()
            .map(|context| context.name.as_str()),
    );
    names
        .enumerate()
        .filter(|(_, name)| {
            (list && queries.is_empty())
                || queries.iter().any(|query| {
                    query == name || (list && query.ends_with(':') && name.starts_with(query))
                })
        })
        // At most 1 + the export's contexts, which fit in memory and so in u32.
        .map(|(id, _)| id as u32)
        .collect()
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the information wanted.
struct InfoRequest<'a> {
    name: &'a str,
    wanted: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    fn parse(data: &'a [u8]) -> Option<InfoRequest<'a>> {
        let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        let name_end = 4usize.checked_add(name_len)?;
        let name = std::str::from_utf8(data.get(4..name_end)?).ok()?;
        let count = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
        let list = data.get(name_end + 2..)?;
        if list.len() != count * 2 {
            return None;
        }
        let wanted = list
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        Some(InfoRequest { name, wanted })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: an export name and
/// context queries.
struct MetaRequest<'a> {
    export: &'a str,
    queries: Vec<&'a str>,
}

impl<'a> MetaRequest<'a> {
    fn parse(data: &'a [u8]) -> Option<MetaRequest<'a>> {
        let (export, mut rest) = take_string(data)?;
        let count = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
        rest = &rest[4..];
        let mut queries = Vec::new();
        for _ in 0..count {
            let (query, after) = take_string(rest)?;
            queries.push(query);
            rest = after;
        }
        rest.is_empty().then_some(MetaRequest { export, queries })
    }
}

/// A UTF-8 string prefixed by its 32-bit length, and what follows it.
fn take_string(data: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    let text = std::str::from_utf8(data.get(4..end)?).ok()?;
    Some((text, &data[end..]))
}

/// The `NBD_REP_INFO` replies (export, block size, and name/description when asked), then ACK.
fn info_replies(
    option: u32,
    request: &InfoRequest<'_>,
    entry: &ExportEntry,
    structured: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&wire::INFO_EXPORT.to_be_bytes());
    export.extend_from_slice(&entry.export.backend.size().to_be_bytes());
    export.extend_from_slice(&entry.transmission_flags(structured).to_be_bytes());
    out.extend(wire::option_reply(option, wire::REP_INFO, &export));

    let mut block_size = Vec::with_capacity(14);
    block_size.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
    block_size.extend_from_slice(&wire::MIN_BLOCK.to_be_bytes());
    block_size.extend_from_slice(&wire::PREFERRED_BLOCK.to_be_bytes());
    block_size.extend_from_slice(&wire::MAX_PAYLOAD.to_be_bytes());
    out.extend(wire::option_reply(option, wire::REP_INFO, &block_size));

    let mut text_info = |kind: u16, text: &str| {
        let mut info = Vec::with_capacity(2 + text.len());
        info.extend_from_slice(&kind.to_be_bytes());
        info.extend_from_slice(text.as_bytes());
        out.extend(wire::option_reply(option, wire::REP_INFO, &info));
    };
    if request.wanted.contains(&wire::INFO_NAME) {
        text_info(wire::INFO_NAME, &entry.export.name);
    }
    if request.wanted.contains(&wire::INFO_DESCRIPTION) && !entry.export.description.is_empty() {
        text_info(wire::INFO_DESCRIPTION, &entry.export.description);
    }
    out.extend(wire::option_reply(option, wire::REP_ACK, &[]));
    out
}

async fn reply_unknown<S>(stream: &mut S, option: u32, name: &str) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let message = format!("export '{name}' not present");
    reply_error(stream, option, wire::REP_ERR_UNKNOWN, &message).await
}

async fn reply_error<S>(stream: &mut S, option: u32, error: u32, message: &str) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    send(
        stream,
        wire::option_reply(option, error, message.as_bytes()),
    )
    .await
}

async fn send<S>(stream: &mut S, bytes: Vec<u8>) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Reads and drops `length` bytes of option data too large to keep.
async fn discard<S>(stream: &mut S, length: u32) -> io::Result<()>
where
    S: AsyncRead + Unpin,
{
    let copied =
        tokio::io::copy(&mut stream.take(u64::from(length)), &mut tokio::io::sink()).await?;
    if copied < u64::from(length) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &str, wanted: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
        for info in wanted {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_request_carries_name_and_wanted_information() {
        let data = info_data("disk", &[wire::INFO_BLOCK_SIZE, wire::INFO_NAME]);
        let request = InfoRequest::parse(&data).unwrap();
        assert_eq!(request.name, "disk");
        assert_eq!(request.wanted, vec![wire::INFO_BLOCK_SIZE, wire::INFO_NAME]);
    }

    #[test]
    fn info_request_with_a_name_past_the_data_is_malformed() {
        let mut data = info_data("disk", &[]);
        data[3] = 200;
        assert!(InfoRequest::parse(&data).is_none());
    }

    #[test]
    fn meta_context_request_carries_export_and_queries() {
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&2u32.to_be_bytes());
        for text in ["base:allocation", "qemu:dirty-bitmap:x"] {
            data.extend_from_slice(&(text.len() as u32).to_be_bytes());
            data.extend_from_slice(text.as_bytes());
        }
        let request = MetaRequest::parse(&data).unwrap();
        assert_eq!(request.export, "disk");
        assert_eq!(
            request.queries,
            vec!["base:allocation", "qemu:dirty-bitmap:x"]
        );
        data.push(0);
        assert!(MetaRequest::parse(&data).is_none());
    }

    #[test]
    fn meta_context_request_claiming_more_queries_than_sent_is_malformed() {
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaRequest::parse(&data).is_none());
    }

    #[test]
    fn info_request_with_a_wrong_count_is_malformed() {
        let mut data = info_data("disk", &[wire::INFO_NAME]);
        data.push(0);
        assert!(InfoRequest::parse(&data).is_none());
        assert!(InfoRequest::parse(&[0, 0]).is_none());
    }
}
