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
            ServerAddr::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
            ServerAddr::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                // Requests are written whole; coalescing them only adds latency.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
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
    /// Metadata contexts to select (none: no BLOCK_STATUS).
    pub meta_contexts: Vec<String>,
}

impl Connector {
    pub fn new(addr: ServerAddr, export: impl Into<String>) -> Connector {
        Connector {
            addr,
            export: export.into(),
            meta_contexts: Vec::new(),
        }
    }

    /// Also selects the metadata context `name` (`base:allocation`,
    /// `qemu:dirty-bitmap:NAME`, …).
    pub fn meta_context(mut self, name: impl Into<String>) -> Connector {
        self.meta_contexts.push(name.into());
        self
    }

    /// Connects and runs the handshake: structured replies, the metadata contexts (every
    /// one asked for must be known to the server), GO.
    pub async fn connect(&self) -> Result<NbdClient, ClientError> {
        let mut negotiation = Negotiation::connect(&self.addr).await?;
        negotiation.structured_replies().await?;
        if !self.meta_contexts.is_empty() {
            let names: Vec<&str> = self.meta_contexts.iter().map(String::as_str).collect();
            let selected = negotiation.set_meta_contexts(&self.export, &names).await?;
            if let Some(missing) = names
                .iter()
                .find(|name| !selected.iter().any(|s| s == *name))
            {
                return Err(ClientError::Refused {
                    option: wire::OPT_SET_META_CONTEXT,
                    reply: wire::REP_ERR_UNKNOWN,
                    message: format!("the export has no metadata context '{missing}'"),
                });
            }
        }
        let (stream, info) = negotiation.go(&self.export).await?;
        Ok(NbdClient::start(stream, info))
    }
}

/// A client that reconnects: a request whose connection is lost is sent again on a new one,
/// made with the same [`Connector`] (the whole handshake again), for up to `delay` after the
/// loss was noticed; after that, and for a server that answers with an error, it fails. The
/// export must not change size or become read-only in between. Like QEMU's `reconnect-delay`,
/// a delay of zero means one attempt to reconnect per request.
pub struct Reconnecting {
    connector: Connector,
    delay: Duration,
    info: ExportInfo,
    current: Mutex<Option<std::sync::Arc<NbdClient>>>,
}

/// Pause between two attempts to reach a server that is not there yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

impl Reconnecting {
    /// Connects a first time (that failure is returned at once, as QEMU's `open-timeout`
    /// of zero does).
    pub async fn connect(
        connector: Connector,
        delay: Duration,
    ) -> Result<Reconnecting, ClientError> {
        let client = connector.connect().await?;
        Ok(Reconnecting {
            connector,
            delay,
            info: client.info().clone(),
            current: Mutex::new(Some(std::sync::Arc::new(client))),
        })
    }

    /// The export as first connected.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// A connected client: the current one, or a new one (the first caller after a loss
    /// reconnects, the others wait for it).
    async fn client(&self, deadline: Instant) -> Result<std::sync::Arc<NbdClient>, ClientError> {
        let mut current = self.current.lock().await;
        if let Some(client) = current.as_ref().filter(|c| c.is_connected()) {
            return Ok(client.clone());
        }
        *current = None;
        loop {
            match self.connector.connect().await {
                Ok(client) => {
                    self.check_same_export(client.info())?;
                    let client = std::sync::Arc::new(client);
                    *current = Some(client.clone());
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

    /// Runs `command`, on a new connection if the current one is lost, until `delay` has
    /// passed since the first loss.
    pub async fn execute(&self, command: &Command) -> Result<Outcome, ClientError> {
        let mut deadline: Option<Instant> = None;
        loop {
            let until = deadline.unwrap_or_else(|| Instant::now() + self.delay);
            let result = match self.client(until).await {
                Ok(client) => client.execute(command).await,
                Err(error) => Err(error),
            };
            match result {
                Err(error) if error.is_retryable() => match deadline {
                    None => deadline = Some(Instant::now() + self.delay),
                    Some(limit) if Instant::now() >= limit => return Err(error),
                    // Lost again on a new connection: do not hammer the server.
                    Some(limit) => {
                        tokio::time::sleep(RETRY_PAUSE.min(limit - Instant::now())).await
                    }
                },
                other => return other,
            }
        }
    }

    /// Disconnects cleanly (NBD_CMD_DISC) if connected.
    pub async fn disconnect(&self) {
        if let Some(client) = self.current.lock().await.take() {
            match std::sync::Arc::try_unwrap(client) {
                Ok(client) => client.disconnect().await,
                Err(shared) => shared.close(),
            }
        }
    }
}
