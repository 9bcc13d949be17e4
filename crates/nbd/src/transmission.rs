//! The transmission phase: requests in, replies out, one request at a time per connection.
//! Backend calls run on tokio's blocking pool. With structured replies negotiated, READ answers
//! with one data chunk, BLOCK_STATUS (`base:allocation`) with one extents chunk, and errors
//! come as error chunks; other successes stay simple replies, which the protocol allows.
//!
//! Checks, in QEMU's order: read-only export (`EPERM`), range past the end (`ENOSPC` for
//! WRITE/WRITE_ZEROES, `EINVAL` otherwise), flags the command does not take (`EINVAL`). A
//! request header with a bad magic, or a WRITE payload over 32 MiB, leaves the stream out of
//! sync: the connection is closed.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::exports::{Export, Extent};
use crate::handshake::Session;
use crate::wire::{self, Request};

/// What the server checks for each command before running it.
struct CommandRule {
    command: u16,
    /// Refused on read-only exports.
    modifies: bool,
    /// Whether offset and length name a range of the export.
    ranged: bool,
    /// Error for a range past the end of the export.
    past_end: u32,
    /// Flags the command accepts.
    flags: u16,
    /// Only served once `base:allocation` was selected.
    needs_base_allocation: bool,
}

const COMMANDS: &[CommandRule] = &[
    CommandRule {
        command: wire::CMD_READ,
        modifies: false,
        ranged: true,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
        needs_base_allocation: false,
    },
    CommandRule {
        command: wire::CMD_WRITE,
        modifies: true,
        ranged: true,
        past_end: wire::ENOSPC,
        flags: wire::CMD_FLAG_FUA,
        needs_base_allocation: false,
    },
    CommandRule {
        command: wire::CMD_FLUSH,
        modifies: false,
        ranged: false,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
        needs_base_allocation: false,
    },
    CommandRule {
        command: wire::CMD_TRIM,
        modifies: true,
        ranged: true,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
        needs_base_allocation: false,
    },
    CommandRule {
        command: wire::CMD_WRITE_ZEROES,
        modifies: true,
        ranged: true,
        past_end: wire::ENOSPC,
        flags: wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE,
        needs_base_allocation: false,
    },
    CommandRule {
        command: wire::CMD_BLOCK_STATUS,
        modifies: false,
        ranged: true,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA | wire::CMD_FLAG_REQ_ONE,
        needs_base_allocation: true,
    },
];

/// Most extents sent in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 65536;

/// Serves requests on `export` until the client disconnects (DISC or hang-up) or `stop`
/// resolves; a request already being executed is completed first.
pub(crate) async fn serve<S>(
    stream: &mut S,
    session: &Session,
    stop: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let export = &session.lease.entry().export;
    tokio::pin!(stop);
    loop {
        let mut header = [0u8; wire::REQUEST_LEN];
        tokio::select! {
            read = stream.read_exact(&mut header) => match read {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(error) => return Err(error),
            },
            () = &mut stop => return Ok(()),
        }
        let request = Request::decode(&header).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "request without the request magic",
            )
        })?;
        if request.command == wire::CMD_DISC {
            return Ok(());
        }
        let payload = if request.command == wire::CMD_WRITE {
            if request.length > wire::MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("write of {} bytes is larger than 32 MiB", request.length),
                ));
            }
            let mut payload = vec![0u8; request.length as usize];
            tokio::select! {
                read = stream.read_exact(&mut payload) => { read?; }
                () = &mut stop => return Ok(()),
            }
            payload
        } else {
            Vec::new()
        };

        let reply = execute(export, session, request, payload).await;
        tokio::select! {
            written = stream.write_all(&reply) => written?,
            () = &mut stop => return Ok(()),
        }
    }
}

/// Runs one request; returns the whole reply (header, then data for a successful READ).
async fn execute(
    export: &Export,
    session: &Session,
    request: Request,
    payload: Vec<u8>,
) -> Vec<u8> {
    let cookie = request.cookie;
    let failure = |error: u32| {
        if session.structured {
            // Error value, then an empty message.
            let mut payload = error.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u16.to_be_bytes());
            wire::chunk(wire::REPLY_TYPE_ERROR, cookie, &payload)
        } else {
            simple_reply(error, cookie)
        }
    };
    if let Err(error) = check(export, session, &request) {
        return failure(error);
    }
    let backend = Arc::clone(&export.backend);
    let fua = request.flags & wire::CMD_FLAG_FUA != 0;
    let offset = request.offset;
    let length = u64::from(request.length);

    match request.command {
        wire::CMD_READ => {
            if session.structured && length == 0 {
                return wire::chunk(wire::REPLY_TYPE_NONE, cookie, &[]);
            }
            let header_len = if session.structured {
                wire::CHUNK_HEADER_LEN + 8
            } else {
                wire::SIMPLE_REPLY_LEN
            };
            let mut reply = vec![0u8; header_len + request.length as usize];
            let result = blocking(move || {
                let read = backend.read_at(&mut reply[header_len..], offset);
                read.map(|()| reply)
            })
            .await;
            match result {
                Ok(mut reply) if session.structured => {
                    let payload_len = 8 + request.length;
                    wire::encode_chunk_header(
                        &mut reply,
                        wire::REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        payload_len,
                    );
                    reply[wire::CHUNK_HEADER_LEN..header_len]
                        .copy_from_slice(&offset.to_be_bytes());
                    reply
                }
                Ok(mut reply) => {
                    wire::encode_simple_reply(&mut reply, 0, cookie);
                    reply
                }
                Err(error) => failure(error),
            }
        }
        wire::CMD_BLOCK_STATUS => {
            let req_one = request.flags & wire::CMD_FLAG_REQ_ONE != 0;
            match blocking(move || backend.allocation(offset, length)).await {
                Ok(extents) => {
                    let payload = encode_extents(&extents, length, req_one);
                    wire::chunk(wire::REPLY_TYPE_BLOCK_STATUS, cookie, &payload)
                }
                Err(error) => failure(error),
            }
        }
        command => {
            let result = blocking(move || {
                match command {
                    wire::CMD_WRITE => backend.write_at(&payload, offset)?,
                    wire::CMD_TRIM => backend.trim(offset, length)?,
                    wire::CMD_WRITE_ZEROES => backend.write_zeroes(offset, length)?,
                    _ => {}
                }
                if command == wire::CMD_FLUSH || fua {
                    backend.flush()?;
                }
                Ok(())
            })
            .await;
            match result {
                Ok(()) => simple_reply(0, cookie),
                Err(error) => failure(error),
            }
        }
    }
}

fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut reply = vec![0u8; wire::SIMPLE_REPLY_LEN];
    wire::encode_simple_reply(&mut reply, error, cookie);
    reply
}

/// The payload of a `base:allocation` BLOCK_STATUS chunk: the backend's extents, cut to the
/// `length` asked for (one extent with REQ_ONE); all data if the backend reports nothing.
fn encode_extents(extents: &[Extent], length: u64, req_one: bool) -> Vec<u8> {
    let mut payload = wire::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    let mut covered = 0u64;
    for extent in extents.iter().take(MAX_EXTENTS) {
        // `length` comes from a 32-bit field, so every piece fits in 32 bits.
        let piece = extent.length.min(length - covered);
        if piece == 0 {
            continue;
        }
        let mut flags = 0;
        if extent.hole {
            flags |= wire::STATE_HOLE;
        }
        if extent.zero {
            flags |= wire::STATE_ZERO;
        }
        payload.extend_from_slice(&(piece as u32).to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
        covered += piece;
        if covered == length || req_one {
            break;
        }
    }
    if covered == 0 {
        payload.extend_from_slice(&(length as u32).to_be_bytes());
        payload.extend_from_slice(&0u32.to_be_bytes());
    }
    payload
}

/// The error value refusing `request`, if any.
fn check(export: &Export, session: &Session, request: &Request) -> Result<(), u32> {
    let rule = COMMANDS
        .iter()
        .find(|rule| rule.command == request.command)
        .filter(|rule| session.base_allocation || !rule.needs_base_allocation)
        .ok_or(wire::EINVAL)?;
    if request.command == wire::CMD_BLOCK_STATUS && request.length == 0 {
        return Err(wire::EINVAL);
    }
    if request.command == wire::CMD_READ && request.length > wire::MAX_PAYLOAD {
        return Err(wire::EINVAL);
    }
    if rule.modifies && !export.writable {
        return Err(wire::EPERM);
    }
    if rule.ranged {
        let size = export.backend.size();
        if request.offset > size || u64::from(request.length) > size - request.offset {
            return Err(rule.past_end);
        }
    }
    if request.flags & !rule.flags != 0 {
        return Err(wire::EINVAL);
    }
    Ok(())
}

/// Runs a backend call on the blocking pool; a panicking backend answers `EIO`.
async fn blocking<T, F>(call: F) -> Result<T, u32>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(wire::errno_of(&error)),
        Err(_) => Err(wire::EIO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(length: u64, hole: bool, zero: bool) -> Extent {
        Extent { length, hole, zero }
    }

    fn decode(payload: &[u8]) -> Vec<(u32, u32)> {
        assert_eq!(payload[0..4], wire::BASE_ALLOCATION_ID.to_be_bytes());
        payload[4..]
            .chunks_exact(8)
            .map(|pair| {
                let length = u32::from_be_bytes(pair[0..4].try_into().unwrap());
                let flags = u32::from_be_bytes(pair[4..8].try_into().unwrap());
                (length, flags)
            })
            .collect()
    }

    #[test]
    fn extents_are_cut_to_the_requested_length() {
        let extents = [extent(100, false, false), extent(100, true, true)];
        assert_eq!(
            decode(&encode_extents(&extents, 150, false)),
            vec![(100, 0), (50, 3)]
        );
    }

    #[test]
    fn req_one_sends_a_single_extent() {
        let extents = [extent(100, false, true), extent(100, true, true)];
        assert_eq!(decode(&encode_extents(&extents, 200, true)), vec![(100, 2)]);
    }

    #[test]
    fn no_extents_from_the_backend_report_data() {
        assert_eq!(
            decode(&encode_extents(&[extent(0, true, true)], 64, false)),
            vec![(64, 0)]
        );
    }
}
