//! Pull-mode incremental backup, the client side: read the extents a metadata context marks
//! (a `qemu:dirty-bitmap:NAME` of a fleecing export) and write them to another export at the
//! same offsets, many requests in flight; what reads as zeroes is written as WRITE_ZEROES.
//! This is what a backup server does with QEMU's fleecing export (QEMU's own recipe is
//! `qemu-img map` of an `x-dirty-bitmap` view, then a copy per extent).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::task::JoinSet;

use super::{ClientError, Connector, NbdClient, ServerAddr, ZeroFlags};
use crate::wire;

/// Bytes per request of a pull.
const CHUNK: u32 = 4 << 20;
/// Requests in flight.
const IN_FLIGHT: usize = 16;
/// Largest range asked for in one BLOCK_STATUS.
const STATUS_SPAN: u64 = 1 << 30;

/// What a pull copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullReport {
    /// Dirty extents found.
    pub extents: u64,
    /// Bytes copied (data and zeroes).
    pub bytes: u64,
    /// Of those, bytes written as zeroes.
    pub zero_bytes: u64,
}

/// The ranges `(offset, len)` whose `context` flags have bit 0 set (dirty), in order, merged.
pub async fn marked_extents(
    client: &NbdClient,
    context: &str,
) -> Result<Vec<(u64, u64)>, ClientError> {
    let id = client
        .info()
        .context_id(context)
        .ok_or_else(|| ClientError::NoSuchContext(context.to_string()))?;
    let size = client.info().size;
    let mut marked: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(STATUS_SPAN) as u32;
        let reply = client.block_status(offset, len, false).await?;
        let extents = reply
            .extents(id)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| ClientError::Protocol(format!("no extents of {context}")))?;
        for extent in extents {
            let length = extent.length.min(size - offset);
            if length == 0 {
                break;
            }
            if extent.flags & wire::STATE_DIRTY != 0 {
                match marked.last_mut() {
                    Some(last) if last.0 + last.1 == offset => last.1 += length,
                    _ => marked.push((offset, length)),
                }
            }
            offset += length;
        }
    }
    Ok(marked)
}

/// Copies the extents `context` marks from export `from` to export `to` (same size, writable),
/// then flushes `to`.
pub async fn pull(
    from: &Connector,
    context: &str,
    to: &Connector,
) -> Result<PullReport, ClientError> {
    let source = Arc::new(from.clone().meta_context(context).connect().await?);
    let target = Arc::new(to.connect().await?);
    if source.info().size != target.info().size {
        return Err(ClientError::InvalidRequest(format!(
            "the exports differ in size ({} and {} bytes)",
            source.info().size,
            target.info().size
        )));
    }
    let extents = marked_extents(&source, context).await?;
    let mut report = PullReport {
        extents: extents.len() as u64,
        ..PullReport::default()
    };
    // The chunks, then IN_FLIGHT workers, each copying the next chunk through the buffer it
    // keeps (QEMU's block-copy runs a pool of tasks the same way); the first failure stops
    // them taking more.
    let mut chunks = Vec::new();
    for (start, len) in extents {
        let mut offset = start;
        while offset < start + len {
            let n = (start + len - offset).min(u64::from(CHUNK)) as u32;
            chunks.push((offset, n));
            offset += u64::from(n);
        }
    }
    let chunks = Arc::new(chunks);
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for _ in 0..IN_FLIGHT.min(chunks.len()) {
        let (source, target) = (source.clone(), target.clone());
        let (chunks, next, failed) = (chunks.clone(), next.clone(), failed.clone());
        workers.spawn(async move {
            let mut copied = PullReport::default();
            let mut buffer = Vec::new();
            while !failed.load(Ordering::Relaxed)
                && let Some(&(offset, len)) = chunks.get(next.fetch_add(1, Ordering::Relaxed))
            {
                buffer.resize(len as usize, 0);
                match copy_chunk(&source, &target, offset, buffer).await {
                    Ok((back, zero)) => {
                        buffer = back;
                        copied.bytes += u64::from(len);
                        if zero {
                            copied.zero_bytes += u64::from(len);
                        }
                    }
                    Err(error) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(error);
                    }
                }
            }
            Ok(copied)
        });
    }
    let mut failure = None;
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(Ok(copied)) => {
                report.bytes += copied.bytes;
                report.zero_bytes += copied.zero_bytes;
            }
            Ok(Err(error)) => {
                failure.get_or_insert(error);
            }
            Err(error) => {
                failure.get_or_insert(ClientError::Protocol(format!(
                    "a copy task failed: {error}"
                )));
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    if target.info().can_flush() {
        target.flush().await?;
    }
    for client in [source, target] {
        if let Ok(client) = Arc::try_unwrap(client) {
            client.disconnect().await;
        }
    }
    Ok(report)
}

/// Copies `buf.len()` bytes at `offset` through `buf`; gives the buffer back, and whether the
/// bytes were zeroes.
async fn copy_chunk(
    from: &NbdClient,
    to: &NbdClient,
    offset: u64,
    buf: Vec<u8>,
) -> Result<(Vec<u8>, bool), ClientError> {
    let data = from.read_buf(offset, buf).await?;
    if data.iter().all(|&b| b == 0) && to.info().can_zero() {
        to.write_zeroes(offset, data.len() as u32, ZeroFlags::default())
            .await?;
        return Ok((data, true));
    }
    to.write(offset, &data, false).await?;
    Ok((data, false))
}

/// Reads an NBD URI as QEMU and libnbd write them: `nbd+unix:///EXPORT?socket=PATH` or
/// `nbd://HOST[:PORT][/EXPORT]` (port 10809 by default). Returns the address and the export.
pub fn parse_uri(uri: &str) -> Result<(ServerAddr, String), String> {
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path, query) = rest
            .split_once('?')
            .ok_or_else(|| format!("{uri}: a unix URI needs ?socket=PATH"))?;
        let export = path.strip_prefix('/').unwrap_or(path).to_string();
        let socket = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("socket="))
            .ok_or_else(|| format!("{uri}: a unix URI needs ?socket=PATH"))?;
        return Ok((ServerAddr::Unix(socket.into()), export));
    }
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
                host.trim_start_matches('[').trim_end_matches(']'),
                port.parse::<u16>()
                    .map_err(|_| format!("{uri}: bad port '{port}'"))?,
            ),
            _ => (authority, 10809),
        };
        if host.is_empty() {
            return Err(format!("{uri}: no host"));
        }
        return Ok((
            ServerAddr::Tcp {
                host: host.to_string(),
                port,
            },
            export.to_string(),
        ));
    }
    Err(format!(
        "{uri}: not an NBD URI (nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_read_as_qemu_writes_them() {
        assert_eq!(
            parse_uri("nbd+unix:///fleece?socket=/tmp/a.sock"),
            Ok((ServerAddr::Unix("/tmp/a.sock".into()), "fleece".into()))
        );
        assert_eq!(
            parse_uri("nbd://127.0.0.1:10810/inc"),
            Ok((
                ServerAddr::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10810
                },
                "inc".into()
            ))
        );
        assert_eq!(
            parse_uri("nbd://localhost"),
            Ok((
                ServerAddr::Tcp {
                    host: "localhost".into(),
                    port: 10809
                },
                String::new()
            ))
        );
        assert!(parse_uri("nbd+unix:///x").is_err());
        assert!(parse_uri("http://x").is_err());
    }
}
