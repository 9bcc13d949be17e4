//! Transmission, client side: requests are written whole under a lock, a reader task routes
//! every reply (simple, or structured chunks until the one flagged done) to its request by
//! cookie. When the connection ends, every request still waiting fails with
//! [`ClientError::Disconnected`], and so does every later one.
//!
//! The reader reads reply headers through a small buffer and READ data straight into the
//! request's buffer, which the caller may supply ([`NbdClient::read_buf`]) and reuse: a READ
//! reply costs one system call in the steady state (the data and, behind it, the next
//! header(s) in one `readv`), not one per header field, and no buffer is allocated or zeroed
//! per request. QEMU's client likewise reads a reply's header, then the payload into the
//! request's own I/O vector (`nbd_co_receive_offset_data_payload`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{ClientError, Command, ExportInfo, Outcome, ReadSide, Stream, WriteSide, ZeroFlags};
use crate::exports::StatusExtent;
use crate::wire;

/// The extents a BLOCK_STATUS returned, per selected context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockStatusReply {
    /// (context id, extents from the requested offset), in the order the chunks came.
    pub contexts: Vec<(u32, Vec<StatusExtent>)>,
}

impl BlockStatusReply {
    /// The extents of context `id`, if the server sent them.
    pub fn extents(&self, id: u32) -> Option<&[StatusExtent]> {
        self.contexts
            .iter()
            .find(|(context, _)| *context == id)
            .map(|(_, extents)| extents.as_slice())
    }
}

/// A connection in transmission on one export.
pub struct NbdClient {
    info: ExportInfo,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    writer: tokio::sync::Mutex<WriteSide>,
    state: Mutex<State>,
    next_cookie: AtomicU64,
}

/// Requests waiting for replies, and whether the connection still stands.
struct State {
    /// Why the connection ended (`None` while it stands).
    closed: Option<String>,
    waiting: HashMap<u64, InFlight>,
}

/// A request sent, waiting for (the rest of) its reply.
struct InFlight {
    command: u16,
    offset: u64,
    /// READ: the data, filled as chunks arrive.
    data: Vec<u8>,
    status: BlockStatusReply,
    /// The first error chunk.
    error: Option<(u32, String)>,
    reply: oneshot::Sender<Result<Outcome, ClientError>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Largest chunk payload accepted: a READ's data plus its offset, or a BLOCK_STATUS of the
/// most extents a server may send.
const MAX_CHUNK: u32 = wire::MAX_PAYLOAD + 8;

impl NbdClient {
    /// Takes over a stream that finished the handshake.
    pub(super) fn start(stream: Stream, info: ExportInfo) -> NbdClient {
        let (reader, writer) = stream.into_split();
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(writer),
            state: Mutex::new(State {
                closed: None,
                waiting: HashMap::new(),
            }),
            next_cookie: AtomicU64::new(1),
        });
        let replies = Replies {
            socket: reader,
            buffer: vec![0u8; REPLY_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        };
        let task = tokio::spawn(read_replies(replies, Arc::clone(&shared)));
        NbdClient {
            info,
            shared,
            reader: Mutex::new(Some(task)),
        }
    }

    /// The export, as the server described it at GO.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Whether the connection still stands.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.state).closed.is_none()
    }

    /// READ of `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.checked_len(len as usize)?;
        self.check_range(offset, len)?;
        self.read_buf(offset, vec![0u8; len as usize]).await
    }

    /// READ of `buf.len()` bytes at `offset` into `buf`, which is given back filled: a caller
    /// reading again and again reuses one buffer instead of having one allocated (and zeroed)
    /// per READ. The reply's data is read from the socket straight into it. On an error the
    /// buffer is dropped.
    pub async fn read_buf(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let len = self.checked_len(buf.len())?;
        self.check_range(offset, len)?;
        match self
            .submit(wire::CMD_READ, 0, offset, len, &[], buf)
            .await?
        {
            Outcome::Data(data) => Ok(data),
            _ => Err(ClientError::Protocol("a READ without data".into())),
        }
    }

    /// WRITE of `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let len = self.checked_len(data.len())?;
        self.check_range(offset, len)?;
        self.check_writable()?;
        let flags = self.fua_flag(fua)?;
        self.submit(wire::CMD_WRITE, flags, offset, len, data, Vec::new())
            .await
            .map(|_| ())
    }

    /// FLUSH: every write answered so far is durable.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.execute(&Command::Flush).await.map(|_| ())
    }

    /// TRIM of `len` bytes at `offset`.
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError> {
        self.execute(&Command::Trim { offset, len, fua })
            .await
            .map(|_| ())
    }

    /// WRITE_ZEROES of `len` bytes at `offset`.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    ) -> Result<(), ClientError> {
        self.execute(&Command::WriteZeroes { offset, len, flags })
            .await
            .map(|_| ())
    }

    /// BLOCK_STATUS of `len` bytes at `offset` in every selected context (one extent each
    /// with `req_one`).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        req_one: bool,
    ) -> Result<BlockStatusReply, ClientError> {
        match self
            .execute(&Command::BlockStatus {
                offset,
                len,
                req_one,
            })
            .await?
        {
            Outcome::Status(status) => Ok(status),
            _ => Err(ClientError::Protocol(
                "a BLOCK_STATUS without extents".into(),
            )),
        }
    }

    /// Sends `command` and waits for its reply.
    pub async fn execute(&self, command: &Command) -> Result<Outcome, ClientError> {
        match command {
            Command::Read { offset, len } => self.read(*offset, *len).await.map(Outcome::Data),
            Command::Write { offset, data, fua } => self
                .write(*offset, data, *fua)
                .await
                .map(|()| Outcome::Done),
            Command::Flush => {
                self.offered(wire::FLAG_SEND_FLUSH, "FLUSH")?;
                self.submit(wire::CMD_FLUSH, 0, 0, 0, &[], Vec::new()).await
            }
            Command::Trim { offset, len, fua } => {
                self.check_writable()?;
                self.offered(wire::FLAG_SEND_TRIM, "TRIM")?;
                self.check_range(*offset, *len)?;
                let flags = self.fua_flag(*fua)?;
                self.submit(wire::CMD_TRIM, flags, *offset, *len, &[], Vec::new())
                    .await
            }
            Command::WriteZeroes { offset, len, flags } => {
                self.check_writable()?;
                self.offered(wire::FLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES")?;
                self.check_range(*offset, *len)?;
                let mut bits = self.fua_flag(flags.fua)?;
                if flags.no_hole {
                    bits |= wire::CMD_FLAG_NO_HOLE;
                }
                if flags.fast {
                    self.offered(wire::FLAG_SEND_FAST_ZERO, "fast zeroing")?;
                    bits |= wire::CMD_FLAG_FAST_ZERO;
                }
                self.submit(wire::CMD_WRITE_ZEROES, bits, *offset, *len, &[], Vec::new())
                    .await
            }
            Command::Cache { offset, len } => {
                self.offered(wire::FLAG_SEND_CACHE, "CACHE")?;
                self.check_range(*offset, *len)?;
                self.submit(wire::CMD_CACHE, 0, *offset, *len, &[], Vec::new())
                    .await
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                if self.info.contexts.is_empty() {
                    return Err(ClientError::InvalidRequest(
                        "no metadata context was selected".into(),
                    ));
                }
                if *len == 0 {
                    return Err(ClientError::InvalidRequest(
                        "BLOCK_STATUS of 0 bytes".into(),
                    ));
                }
                self.check_range(*offset, *len)?;
                let flags = if *req_one { wire::CMD_FLAG_REQ_ONE } else { 0 };
                self.submit(
                    wire::CMD_BLOCK_STATUS,
                    flags,
                    *offset,
                    *len,
                    &[],
                    Vec::new(),
                )
                .await
            }
        }
    }

    fn checked_len(&self, len: usize) -> Result<u32, ClientError> {
        u32::try_from(len)
            .ok()
            .filter(|&len| len <= self.info.max_payload())
            .ok_or_else(|| {
                ClientError::InvalidRequest(format!(
                    "{len} bytes is more than the server's maximum of {}",
                    self.info.max_payload()
                ))
            })
    }

    fn check_range(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(ClientError::InvalidRequest(format!(
                "{len} bytes at {offset} go past the end of the export ({} bytes)",
                self.info.size
            ))),
        }
    }

    fn check_writable(&self) -> Result<(), ClientError> {
        if self.info.read_only() {
            return Err(ClientError::InvalidRequest(
                "the export is read-only".into(),
            ));
        }
        Ok(())
    }

    fn offered(&self, flag: u16, what: &str) -> Result<(), ClientError> {
        if self.info.flags & flag == 0 {
            return Err(ClientError::InvalidRequest(format!(
                "the server does not offer {what}"
            )));
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> Result<u16, ClientError> {
        if !fua {
            return Ok(0);
        }
        self.offered(wire::FLAG_SEND_FUA, "FUA")?;
        Ok(wire::CMD_FLAG_FUA)
    }

    /// Registers the request, sends it, and waits for its reply; a READ's data goes into
    /// `data` (of the request's length).
    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        data: Vec<u8>,
    ) -> Result<Outcome, ClientError> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut state = lock(&self.shared.state);
            if let Some(reason) = &state.closed {
                return Err(ClientError::Disconnected(reason.clone()));
            }
            state.waiting.insert(
                cookie,
                InFlight {
                    command,
                    offset,
                    data,
                    status: BlockStatusReply::default(),
                    error: None,
                    reply,
                },
            );
        }
        let mut header = [0u8; wire::REQUEST_LEN];
        header[0..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&command.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&len.to_be_bytes());
        let sent = {
            let mut writer = self.shared.writer.lock().await;
            let mut sent = writer.write_all(&header).await;
            if sent.is_ok() && !payload.is_empty() {
                sent = writer.write_all(payload).await;
            }
            sent
        };
        if let Err(error) = sent {
            // The stream is out of sync (or gone): nothing more can go over it.
            fail_all(&self.shared, format!("sending a request failed: {error}"));
            self.close();
            return Err(ClientError::Disconnected(error.to_string()));
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Disconnected(
                "the connection closed before the reply".into(),
            )),
        }
    }

    /// Ends the connection at once (no DISC): requests waiting fail as disconnected.
    pub fn close(&self) {
        if let Some(task) = lock(&self.reader).take() {
            task.abort();
        }
        fail_all(&self.shared, "the client closed the connection".into());
    }

    /// A clean disconnect: NBD_CMD_DISC, then the server closes the connection.
    pub async fn disconnect(self) {
        let mut header = [0u8; wire::REQUEST_LEN];
        header[0..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        header[6..8].copy_from_slice(&wire::CMD_DISC.to_be_bytes());
        header[8..16].copy_from_slice(
            &self
                .shared
                .next_cookie
                .fetch_add(1, Ordering::Relaxed)
                .to_be_bytes(),
        );
        {
            let mut writer = self.shared.writer.lock().await;
            // The server may be gone already: the connection ends either way.
            let _ = writer.write_all(&header).await;
            let _ = writer.shutdown().await;
        }
        let task = lock(&self.reader).take();
        if let Some(task) = task {
            // The reader ends when the server closes its side.
            let _ = task.await;
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.reader).take() {
            task.abort();
        }
    }
}

/// Marks the connection closed and fails every request waiting.
fn fail_all(shared: &Shared, reason: String) {
    let waiting = {
        let mut state = lock(&shared.state);
        state.closed.get_or_insert(reason.clone());
        std::mem::take(&mut state.waiting)
    };
    for (_, request) in waiting {
        let _ = request
            .reply
            .send(Err(ClientError::Disconnected(reason.clone())));
    }
}

/// Size of the buffer reply headers are read through. Data is read around it, straight into
/// the request's buffer; what a read brings past the data (the next headers, the start of the
/// next data) lands here.
const REPLY_BUFFER: usize = 32 * 1024;

/// The reading side of a connection, with its header buffer: `buffer[start..end]` has been
/// read from the socket and not consumed yet.
struct Replies {
    socket: ReadSide,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Replies {
    /// The next `n` bytes (`n` at most the buffer's size), read first if need be; they stay
    /// unconsumed.
    async fn peek(&mut self, n: usize) -> std::io::Result<&[u8]> {
        if self.end - self.start < n {
            if self.buffer.len() - self.start < n {
                self.buffer.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            while self.end - self.start < n {
                let got = self
                    .socket
                    .read_vectored(&mut self.buffer[self.end..], &mut [])
                    .await?;
                if got == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                self.end += got;
            }
        }
        Ok(&self.buffer[self.start..self.start + n])
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Fills `dest`: what is buffered first, the rest straight from the socket, together with
    /// whatever follows it (into the emptied buffer).
    async fn read_exact(&mut self, dest: &mut [u8]) -> std::io::Result<()> {
        let buffered = (self.end - self.start).min(dest.len());
        dest[..buffered].copy_from_slice(&self.buffer[self.start..self.start + buffered]);
        self.consume(buffered);
        let mut done = buffered;
        while done < dest.len() {
            // The buffer is empty here.
            let got = self
                .socket
                .read_vectored(&mut dest[done..], &mut self.buffer)
                .await?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let into_dest = got.min(dest.len() - done);
            done += into_dest;
            self.end = got - into_dest;
        }
        Ok(())
    }
}

/// The reader task: routes replies until the connection ends, then fails what is left.
async fn read_replies(mut replies: Replies, shared: Arc<Shared>) {
    let reason = loop {
        match read_reply(&mut replies, &shared).await {
            Ok(()) => {}
            Err(ReadError::Closed(error)) => {
                break format!("the server closed the connection ({error})");
            }
            Err(ReadError::Protocol(message)) => {
                tracing::warn!("NBD server broke the protocol: {message}");
                break format!("protocol error: {message}");
            }
        }
    };
    fail_all(&shared, reason);
}

enum ReadError {
    Closed(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for ReadError {
    fn from(error: std::io::Error) -> ReadError {
        ReadError::Closed(error)
    }
}

fn take(shared: &Shared, cookie: u64) -> Result<InFlight, ReadError> {
    lock(&shared.state)
        .waiting
        .remove(&cookie)
        .ok_or_else(|| ReadError::Protocol(format!("a reply to unknown cookie {cookie:#x}")))
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(bytes, at)) << 32) | u64::from(be_u32(bytes, at + 4))
}

/// Reads one simple reply or one structured chunk.
async fn read_reply(replies: &mut Replies, shared: &Shared) -> Result<(), ReadError> {
    let magic = be_u32(replies.peek(4).await?, 0);
    match magic {
        wire::SIMPLE_REPLY_MAGIC => {
            let header = replies.peek(wire::SIMPLE_REPLY_LEN).await?;
            let (error, cookie) = (be_u32(header, 4), be_u64(header, 8));
            replies.consume(wire::SIMPLE_REPLY_LEN);
            let mut request = take(shared, cookie)?;
            if error == 0 && request.command == wire::CMD_READ {
                replies.read_exact(&mut request.data).await?;
            }
            if error != 0 {
                request.error = Some((error, String::new()));
            }
            complete(request);
            Ok(())
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            let header = replies.peek(wire::CHUNK_HEADER_LEN).await?;
            let flags = be_u16(header, 4);
            let kind = be_u16(header, 6);
            let cookie = be_u64(header, 8);
            let length = be_u32(header, 16);
            replies.consume(wire::CHUNK_HEADER_LEN);
            if length > MAX_CHUNK {
                return Err(ReadError::Protocol(format!("a chunk of {length} bytes")));
            }
            let mut request = take(shared, cookie)?;
            read_chunk(replies, &mut request, kind, length).await?;
            if flags & wire::REPLY_FLAG_DONE != 0 {
                complete(request);
            } else {
                lock(&shared.state).waiting.insert(cookie, request);
            }
            Ok(())
        }
        other => Err(ReadError::Protocol(format!("reply magic {other:#x}"))),
    }
}

/// Applies one chunk's payload to its request.
async fn read_chunk(
    replies: &mut Replies,
    request: &mut InFlight,
    kind: u16,
    length: u32,
) -> Result<(), ReadError> {
    let malformed = |what: &str| ReadError::Protocol(format!("malformed {what} chunk"));
    match kind {
        wire::REPLY_TYPE_NONE if length == 0 => Ok(()),
        wire::REPLY_TYPE_OFFSET_DATA if request.command == wire::CMD_READ && length >= 8 => {
            let offset = be_u64(replies.peek(8).await?, 0);
            replies.consume(8);
            let len = u64::from(length - 8);
            let start = offset
                .checked_sub(request.offset)
                .filter(|start| start + len <= request.data.len() as u64)
                .ok_or_else(|| malformed("data"))?;
            let range = start as usize..(start + len) as usize;
            replies.read_exact(&mut request.data[range]).await?;
            Ok(())
        }
        wire::REPLY_TYPE_OFFSET_HOLE if request.command == wire::CMD_READ && length == 12 => {
            let payload = replies.peek(12).await?;
            let (offset, len) = (be_u64(payload, 0), u64::from(be_u32(payload, 8)));
            replies.consume(12);
            let start = offset
                .checked_sub(request.offset)
                .filter(|start| start + len <= request.data.len() as u64)
                .ok_or_else(|| malformed("hole"))?;
            request.data[start as usize..(start + len) as usize].fill(0);
            Ok(())
        }
        wire::REPLY_TYPE_BLOCK_STATUS
            if request.command == wire::CMD_BLOCK_STATUS && length >= 4 && length % 8 == 4 =>
        {
            let mut payload = vec![0u8; length as usize];
            replies.read_exact(&mut payload).await?;
            let id = be_u32(&payload, 0);
            let extents = payload[4..]
                .chunks_exact(8)
                .map(|pair| StatusExtent {
                    length: u64::from(be_u32(pair, 0)),
                    flags: be_u32(pair, 4),
                })
                .collect();
            request.status.contexts.push((id, extents));
            Ok(())
        }
        kind if kind & 0x8000 != 0 && length >= 6 => {
            let mut payload = vec![0u8; length as usize];
            replies.read_exact(&mut payload).await?;
            let errno = be_u32(&payload, 0);
            let message_len = usize::from(be_u16(&payload, 4));
            let message = payload
                .get(6..6 + message_len)
                .map(|text| String::from_utf8_lossy(text).into_owned())
                .unwrap_or_default();
            request.error.get_or_insert((errno, message));
            Ok(())
        }
        _ => Err(ReadError::Protocol(format!(
            "an unexpected chunk of type {kind} ({length} bytes)"
        ))),
    }
}

/// Answers the waiting caller.
fn complete(request: InFlight) {
    let result = match request.error {
        Some((errno, message)) => Err(ClientError::Server { errno, message }),
        None => Ok(match request.command {
            wire::CMD_READ => Outcome::Data(request.data),
            wire::CMD_BLOCK_STATUS => Outcome::Status(request.status),
            _ => Outcome::Done,
        }),
    };
    // The caller may have given up waiting; the reply is dropped then.
    let _ = request.reply.send(result);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const READS: u64 = 8;

    fn info() -> ExportInfo {
        ExportInfo {
            name: "test".into(),
            size: 1 << 20,
            flags: wire::FLAG_HAS_FLAGS,
            block_size: None,
            structured: true,
            contexts: Vec::new(),
        }
    }

    /// The byte the scripted server sends at `offset`.
    fn byte_at(offset: u64) -> u8 {
        (offset as u8) ^ 0x5a
    }

    /// A server that reads `READS` requests, then answers them in reverse order (every other
    /// one in two chunks), its bytes written `fragment` at a time.
    async fn scripted_server(mut socket: tokio::net::UnixStream, fragment: usize) {
        let mut requests = Vec::new();
        for _ in 0..READS {
            let mut header = [0u8; wire::REQUEST_LEN];
            socket.read_exact(&mut header).await.expect("a request");
            requests.push(wire::Request::decode(&header).expect("a request header"));
        }
        let mut out = Vec::new();
        for (i, request) in requests.iter().enumerate().rev() {
            let half = if i % 2 == 0 { request.length / 2 } else { 0 };
            for (start, end, flags) in [(0, half, 0), (half, request.length, wire::REPLY_FLAG_DONE)]
            {
                if start == end && flags == 0 {
                    continue;
                }
                let at = request.offset + u64::from(start);
                let mut payload = at.to_be_bytes().to_vec();
                payload.extend((0..u64::from(end - start)).map(|i| byte_at(at + i)));
                out.extend(wire::chunk_with_flags(
                    flags,
                    wire::REPLY_TYPE_OFFSET_DATA,
                    request.cookie,
                    &payload,
                ));
            }
        }
        for piece in out.chunks(fragment) {
            socket.write_all(piece).await.expect("a reply");
        }
    }

    #[tokio::test]
    async fn replies_cut_anywhere_or_run_together_fill_the_callers_buffers() {
        for fragment in [1, 7, 20, 28, 4096, 1 << 20] {
            let (ours, theirs) = tokio::net::UnixStream::pair().expect("a socket pair");
            let client = Arc::new(NbdClient::start(Stream::Unix(ours), info()));
            let server = tokio::spawn(scripted_server(theirs, fragment));
            let reads: Vec<_> = (0..READS)
                .map(|i| {
                    let client = Arc::clone(&client);
                    // From 100 bytes to past the header buffer's 32 KiB.
                    let (offset, len) = (i * 70_000 + 3, 100 + i as usize * 9000);
                    tokio::spawn(async move {
                        let buffer = vec![0u8; len];
                        let pointer = buffer.as_ptr() as usize;
                        let data = client.read_buf(offset, buffer).await.expect("the read");
                        (offset, data, pointer)
                    })
                })
                .collect();
            for read in reads {
                let (offset, data, pointer) = read.await.expect("the read task");
                assert_eq!(
                    data.as_ptr() as usize,
                    pointer,
                    "the caller's buffer comes back"
                );
                for (i, byte) in data.iter().enumerate() {
                    assert_eq!(*byte, byte_at(offset + i as u64), "fragment {fragment}");
                }
            }
            server.await.expect("the server");
        }
    }
}
