//! An NBD client: the fixed newstyle handshake ([`Negotiation`]), then a connection in
//! transmission ([`NbdClient`]) with many requests in flight, matched to replies by cookie.
//! [`Connector`] holds what it takes to connect (address, export, metadata contexts) and runs
//! the whole handshake again on a new connection; [`Reconnecting`] uses it to survive a server
//! that goes away: requests that lost their connection are sent again on the next one, within a
//! delay. A block driver is a thin layer over [`Reconnecting`] (or [`NbdClient`]): its
//! `read_at`/`write_at`/… call the async methods from a blocking thread with
//! `Handle::block_on`.
//!
//! ```no_run
//! # async fn example() -> Result<(), nbd::client::ClientError> {
//! use nbd::client::{Connector, ServerAddr};
//! let connector = Connector::new(ServerAddr::Unix("/tmp/nbd.sock".into()), "disk")
//!     .meta_context("base:allocation");
//! let client = connector.connect().await?;
//! let data = client.read(0, 4096).await?;
//! let status = client.block_status(0, 1 << 20, false).await?;
//! client.disconnect().await;
//! # Ok(()) }
//! ```

mod negotiate;
pub mod pull;
mod transport;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Mutex;

pub use negotiate::Negotiation;
pub use transport::{BlockStatusReply, NbdClient};

use crate::wire;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// A connection to a server, unix or TCP.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    async fn connect(addr: &ServerAddr) -> io::Result<Stream> {
        match addr {
            ServerAddr::Unix(path) => {
                let stream = UnixStream::connect(path).await?;
                crate::wire::widen_send_buffer(&stream);
                Ok(Stream::Unix(stream))
            }
            ServerAddr::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                // Requests are written whole; coalescing them only adds latency.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
        }
    }
}

impl Stream {
    /// The two directions, each usable without a lock on the other (the reader task reads
    /// while callers write requests).
    fn into_split(self) -> (ReadSide, WriteSide) {
        match self {
            Stream::Unix(s) => {
                let (read, write) = s.into_split();
                (ReadSide::Unix(read), WriteSide::Unix(write))
            }
            Stream::Tcp(s) => {
                let (read, write) = s.into_split();
                (ReadSide::Tcp(read), WriteSide::Tcp(write))
            }
        }
    }
}

/// The reading half of a [`Stream`].
enum ReadSide {
    Unix(tokio::net::unix::OwnedReadHalf),
    Tcp(tokio::net::tcp::OwnedReadHalf),
}

impl ReadSide {
    /// Reads into `first`, then `second`, in one system call once the socket is readable;
    /// returns the bytes read (0: the server closed the connection).
    async fn read_vectored(&self, first: &mut [u8], second: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut slices = [io::IoSliceMut::new(first), io::IoSliceMut::new(second)];
            let result = match self {
                ReadSide::Unix(s) => s.try_read_vectored(&mut slices),
                ReadSide::Tcp(s) => s.try_read_vectored(&mut slices),
            };
            match result {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => match self {
                    ReadSide::Unix(s) => s.readable().await?,
                    ReadSide::Tcp(s) => s.readable().await?,
                },
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// The writing half of a [`Stream`].
enum WriteSide {
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
}

impl AsyncWrite for WriteSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Unix(s) => Pin::new(s).poll_write(cx, buf),
            WriteSide::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Unix(s) => Pin::new(s).poll_flush(cx),
            WriteSide::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Unix(s) => Pin::new(s).poll_shutdown(cx),
            WriteSide::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What the server said about the export at GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Minimum, preferred and maximum block size, if the server said.
    pub block_size: Option<(u32, u32, u32)>,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts selected: (id, name).
    pub contexts: Vec<(u32, String)>,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    pub fn read_only(&self) -> bool {
        self.has(wire::FLAG_READ_ONLY)
    }
    pub fn can_flush(&self) -> bool {
        self.has(wire::FLAG_SEND_FLUSH)
    }
    pub fn can_fua(&self) -> bool {
        self.has(wire::FLAG_SEND_FUA)
    }
    pub fn can_trim(&self) -> bool {
        self.has(wire::FLAG_SEND_TRIM)
    }
    pub fn can_zero(&self) -> bool {
        self.has(wire::FLAG_SEND_WRITE_ZEROES)
    }
    pub fn can_fast_zero(&self) -> bool {
        self.has(wire::FLAG_SEND_FAST_ZERO)
    }
    pub fn can_cache(&self) -> bool {
        self.has(wire::FLAG_SEND_CACHE)
    }
    pub fn can_multi_conn(&self) -> bool {
        self.has(wire::FLAG_CAN_MULTI_CONN)
    }
    /// Largest READ or WRITE the server takes (its maximum block size, else 32 MiB).
    pub fn max_payload(&self) -> u32 {
        self.block_size
            .map_or(wire::MAX_PAYLOAD, |(_, _, max)| max.min(wire::MAX_PAYLOAD))
    }
    /// The id of the selected context `name`.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, selected)| selected == name)
            .map(|(id, _)| *id)
    }
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or hung up during the greeting.
    #[error("cannot connect to the NBD server: {0}")]
    Connect(io::Error),
    /// The server refused an option (for GO: typically an unknown export).
    #[error("the NBD server refused option {option} (reply {reply:#x}): {message}")]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    /// The export has no metadata context of that name (a required one was asked for).
    #[error("the export has no metadata context '{0}'")]
    NoSuchContext(String),
    /// The server broke the protocol; the connection is closed.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The connection was lost (or closed) before the reply: the request may be sent again
    /// on a new connection.
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
    /// The server answered the request with an error.
    #[error("NBD server error {errno}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server { errno: u32, message: String },
    /// The request cannot be sent on this export (read-only, command not offered, too long,
    /// past the end); nothing was sent.
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),
    /// The export changed between connections (size, read-only), so requests cannot be
    /// retried on it.
    #[error("the NBD export changed on reconnection: {0}")]
    ExportChanged(String),
}

impl ClientError {
    /// Whether sending the request again on a new connection may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Disconnected(_) | ClientError::Connect(_))
    }
}

impl From<ClientError> for io::Error {
    /// The error a block driver reports: the server's errno, `EINVAL`/`EPERM` for requests
    /// that could not be sent, `EIO` for the rest.
    fn from(error: ClientError) -> io::Error {
        match &error {
            ClientError::Server { errno, .. } => {
                let errno = wire::error_of(*errno).raw_os_error().unwrap_or(5);
                io::Error::new(
                    io::Error::from_raw_os_error(errno).kind(),
                    error.to_string(),
                )
            }
            ClientError::InvalidRequest(_) => {
                io::Error::new(io::ErrorKind::InvalidInput, error.to_string())
            }
            _ => io::Error::other(error.to_string()),
        }
    }
}

/// Flags of a WRITE_ZEROES.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Do not deallocate (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail with `ENOTSUP` unless zeroing is fast (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
    /// Durable before the reply (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// A request as a value, so that it can be sent again on a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// A request [`Reconnecting`] may send again: a command, or a write of borrowed data.
#[derive(Clone, Copy)]
enum Request<'a> {
    Command(&'a Command),
    Write {
        offset: u64,
        data: &'a [u8],
        fua: bool,
    },
}

impl Request<'_> {
    async fn run_on(self, client: &NbdClient) -> Result<Outcome, ClientError> {
        match self {
            Request::Command(command) => client.execute(command).await,
            Request::Write { offset, data, fua } => client
                .write(offset, data, fua)
                .await
                .map(|()| Outcome::Done),
        }
    }
}

/// What a [`Command`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Data(Vec<u8>),
    Status(BlockStatusReply),
}

/// Everything needed to open a connection to an export, again and again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connector {
    pub addr: ServerAddr,
    pub export: String,
    /// Metadata contexts to select; the connection fails if the server lacks one.
    pub meta_contexts: Vec<String>,
    /// Metadata contexts to select if the server has them (QEMU's driver asks for
    /// `base:allocation` this way: without it every range reads as data).
    pub optional_meta_contexts: Vec<String>,
}

impl Connector {
    pub fn new(addr: ServerAddr, export: impl Into<String>) -> Connector {
        Connector {
            addr,
            export: export.into(),
            meta_contexts: Vec::new(),
            optional_meta_contexts: Vec::new(),
        }
    }

    /// Also selects the metadata context `name` (`base:allocation`,
    /// `qemu:dirty-bitmap:NAME`, …), which the server must have.
    pub fn meta_context(mut self, name: impl Into<String>) -> Connector {
        self.meta_contexts.push(name.into());
        self
    }

    /// Also selects the metadata context `name` if the server has it.
    pub fn optional_meta_context(mut self, name: impl Into<String>) -> Connector {
        self.optional_meta_contexts.push(name.into());
        self
    }

    /// Connects and runs the handshake: structured replies, the metadata contexts (every
    /// required one must be known to the server), GO.
    pub async fn connect(&self) -> Result<NbdClient, ClientError> {
        let mut negotiation = Negotiation::connect(&self.addr).await?;
        let structured = negotiation.structured_replies().await?;
        let wanted: Vec<&str> = self
            .meta_contexts
            .iter()
            .chain(&self.optional_meta_contexts)
            .map(String::as_str)
            .collect();
        // Without structured replies there are no contexts: only optional ones may go.
        if !wanted.is_empty() && (structured || !self.meta_contexts.is_empty()) {
            let selected = negotiation.set_meta_contexts(&self.export, &wanted).await?;
            if let Some(missing) = self
                .meta_contexts
                .iter()
                .find(|name| !selected.iter().any(|s| s == *name))
            {
                return Err(ClientError::NoSuchContext(missing.clone()));
            }
        }
        let (stream, info) = negotiation.go(&self.export).await?;
        Ok(NbdClient::start(stream, info))
    }
}

/// A client that reconnects (QEMU's `reconnect-delay`): when the connection is lost, requests
/// wait while a new one is made with the same [`Connector`] (the whole handshake again) and
/// are then sent again on it, for up to `delay` after the loss. Past the delay, requests fail
/// at once unless a single attempt to reconnect succeeds, and the next request tries again.
/// A delay of zero means one attempt per request. The export must not change size or become
/// read-only in between. A server's error answer is not retried.
pub struct Reconnecting {
    connector: Connector,
    delay: Duration,
    info: ExportInfo,
    link: Mutex<Link>,
}

/// The current connection, or when it was lost.
struct Link {
    client: Option<std::sync::Arc<NbdClient>>,
    /// When the connection was found lost (`None` while connected, or closed on purpose).
    lost_at: Option<Instant>,
    /// `disconnect` was called: no more reconnecting.
    closed: bool,
}

/// Pause between two attempts to reach a server that is not there (yet): QEMU's reconnect
/// loop also waits between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

impl Reconnecting {
    /// Connects a first time; that failure is returned at once (QEMU's `open-timeout` of
    /// zero).
    pub async fn connect(
        connector: Connector,
        delay: Duration,
    ) -> Result<Reconnecting, ClientError> {
        Reconnecting::open(connector, delay, Duration::ZERO).await
    }

    /// Connects a first time, trying again until `open_timeout` has passed (QEMU's
    /// `open-timeout`: any failure is tried again; the last one is returned).
    pub async fn open(
        connector: Connector,
        delay: Duration,
        open_timeout: Duration,
    ) -> Result<Reconnecting, ClientError> {
        let deadline = Instant::now() + open_timeout;
        let client = loop {
            match connector.connect().await {
                Ok(client) => break client,
                Err(error) if Instant::now() < deadline => {
                    tracing::debug!(%error, "NBD connection failed, trying again");
                    tokio::time::sleep(RETRY_PAUSE.min(deadline - Instant::now())).await;
                }
                Err(error) => return Err(error),
            }
        };
        Ok(Reconnecting {
            connector,
            delay,
            info: client.info().clone(),
            link: Mutex::new(Link {
                client: Some(std::sync::Arc::new(client)),
                lost_at: None,
                closed: false,
            }),
        })
    }

    /// The export as first connected.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Whether the connection stands now.
    pub async fn is_connected(&self) -> bool {
        let link = self.link.lock().await;
        link.client.as_ref().is_some_and(|c| c.is_connected())
    }

    /// A connected client: the current one, or a new one. The first caller after a loss
    /// reconnects (until the delay since the loss has passed, or once past it); the others
    /// wait for it.
    async fn client(&self) -> Result<std::sync::Arc<NbdClient>, ClientError> {
        let mut link = self.link.lock().await;
        if link.closed {
            return Err(ClientError::Disconnected(
                "the client closed the connection".into(),
            ));
        }
        if let Some(client) = link.client.as_ref().filter(|c| c.is_connected()) {
            return Ok(client.clone());
        }
        link.client = None;
        let lost_at = *link.lost_at.get_or_insert_with(Instant::now);
        let deadline = lost_at + self.delay;
        loop {
            match self.connector.connect().await {
                Ok(client) => {
                    self.check_same_export(client.info())?;
                    let client = std::sync::Arc::new(client);
                    link.client = Some(client.clone());
                    link.lost_at = None;
                    tracing::info!(export = %self.connector.export, "NBD connection re-established");
                    return Ok(client);
                }
                Err(error) if error.is_retryable() && Instant::now() < deadline => {
                    tracing::debug!(%error, "NBD reconnect failed, trying again");
                    tokio::time::sleep(RETRY_PAUSE.min(deadline - Instant::now())).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Records that the connection `client` was lost (if it is still the current one).
    async fn lost(&self, client: &std::sync::Arc<NbdClient>) {
        let mut link = self.link.lock().await;
        if link
            .client
            .as_ref()
            .is_some_and(|current| std::sync::Arc::ptr_eq(current, client))
        {
            link.client = None;
            link.lost_at.get_or_insert_with(Instant::now);
        }
    }

    fn check_same_export(&self, info: &ExportInfo) -> Result<(), ClientError> {
        if info.size != self.info.size {
            return Err(ClientError::ExportChanged(format!(
                "size {} instead of {}",
                info.size, self.info.size
            )));
        }
        if info.read_only() && !self.info.read_only() {
            return Err(ClientError::ExportChanged("now read-only".into()));
        }
        Ok(())
    }

    /// Runs `command`, sending it again on a new connection when the current one is lost,
    /// until `delay` has passed since the loss.
    pub async fn execute(&self, command: &Command) -> Result<Outcome, ClientError> {
        self.retrying(Request::Command(command)).await
    }

    /// WRITE of `data` at `offset` (as [`Command::Write`], without taking the data).
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.retrying(Request::Write { offset, data, fua })
            .await
            .map(|_| ())
    }

    async fn retrying(&self, request: Request<'_>) -> Result<Outcome, ClientError> {
        loop {
            let client = self.client().await?;
            match request.run_on(&client).await {
                Err(error) if error.is_retryable() => {
                    self.lost(&client).await;
                    let lost_at = self.link.lock().await.lost_at;
                    if lost_at.is_some_and(|at| Instant::now() >= at + self.delay) {
                        // One more attempt, as QEMU's requests past the delay make.
                        let client = self.client().await?;
                        return request.run_on(&client).await;
                    }
                }
                other => return other,
            }
        }
    }

    /// Disconnects cleanly (NBD_CMD_DISC) if connected; no reconnecting afterwards.
    pub async fn disconnect(&self) {
        let client = {
            let mut link = self.link.lock().await;
            link.closed = true;
            link.client.take()
        };
        if let Some(client) = client {
            match std::sync::Arc::try_unwrap(client) {
                Ok(client) => client.disconnect().await,
                Err(shared) => shared.close(),
            }
        }
    }
}
