//! The transmission phase: requests in, simple replies out, one request at a time per
//! connection. Backend calls run on tokio's blocking pool.
//!
//! Checks, in QEMU's order: read-only export (`EPERM`), range past the end (`ENOSPC` for
//! WRITE/WRITE_ZEROES, `EINVAL` otherwise), flags the command does not take (`EINVAL`). A
//! request header with a bad magic, or a WRITE payload over 32 MiB, leaves the stream out of
//! sync: the connection is closed.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::exports::Export;
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
}

const COMMANDS: &[CommandRule] = &[
    CommandRule {
        command: wire::CMD_READ,
        modifies: false,
        ranged: true,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
    },
    CommandRule {
        command: wire::CMD_WRITE,
        modifies: true,
        ranged: true,
        past_end: wire::ENOSPC,
        flags: wire::CMD_FLAG_FUA,
    },
    CommandRule {
        command: wire::CMD_FLUSH,
        modifies: false,
        ranged: false,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
    },
    CommandRule {
        command: wire::CMD_TRIM,
        modifies: true,
        ranged: true,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
    },
    CommandRule {
        command: wire::CMD_WRITE_ZEROES,
        modifies: true,
        ranged: true,
        past_end: wire::ENOSPC,
        flags: wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE,
    },
];

/// Serves requests on `export` until the client disconnects (DISC or hang-up) or `stop`
/// resolves; a request already being executed is completed first.
pub(crate) async fn serve<S>(
    stream: &mut S,
    export: &Export,
    stop: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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

        let reply = execute(export, request, payload).await;
        tokio::select! {
            written = stream.write_all(&reply) => written?,
            () = &mut stop => return Ok(()),
        }
    }
}

/// Runs one request; returns the whole reply (header, then data for a successful READ).
async fn execute(export: &Export, request: Request, payload: Vec<u8>) -> Vec<u8> {
    let error_reply = |error: u32| {
        let mut reply = vec![0u8; wire::SIMPLE_REPLY_LEN];
        wire::encode_simple_reply(&mut reply, error, request.cookie);
        reply
    };
    if let Err(error) = check(export, &request) {
        return error_reply(error);
    }
    let backend = Arc::clone(&export.backend);
    let fua = request.flags & wire::CMD_FLAG_FUA != 0;
    let offset = request.offset;
    let length = u64::from(request.length);

    if request.command == wire::CMD_READ {
        let mut reply = vec![0u8; wire::SIMPLE_REPLY_LEN + request.length as usize];
        let result = blocking(move || {
            let read = backend.read_at(&mut reply[wire::SIMPLE_REPLY_LEN..], offset);
            read.map(|()| reply)
        })
        .await;
        return match result {
            Ok(mut reply) => {
                wire::encode_simple_reply(&mut reply, 0, request.cookie);
                reply
            }
            Err(error) => error_reply(error),
        };
    }

    let command = request.command;
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
    error_reply(result.err().unwrap_or(0))
}

/// The error value refusing `request`, if any.
fn check(export: &Export, request: &Request) -> Result<(), u32> {
    let rule = COMMANDS
        .iter()
        .find(|rule| rule.command == request.command)
        .ok_or(wire::EINVAL)?;
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
