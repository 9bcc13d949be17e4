//! `nbd`: the node is an export of an NBD server, reached as a client (QEMU's `block/nbd.c`),
//! over `nbd::client::Reconnecting`: structured replies, block status from `base:allocation`
//! (or the context `x-dirty-bitmap` names, read the way QEMU reads it), many requests in flight
//! (each caller's request is sent at once and matched to its reply by cookie), FLUSH, TRIM,
//! WRITE_ZEROES with FAST_ZERO, and reconnection within `reconnect-delay`.
//!
//! The client is async; the block layer's calls block. Connections live on one small runtime
//! of their own ([`client_runtime`]), whose workers drive the sockets and route the replies: a
//! caller on any thread (the I/O pool, the NBD server's blocking threads, the monitor's
//! dispatcher) sends its request itself, its data borrowed, and sleeps until the reply wakes
//! it ([`wait_here`]); no caller's own runtime can be starved by the wait.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nbd::client::{
    ClientError, Command, Connector, ExportInfo, Outcome, Reconnecting, ServerAddr, ZeroFlags,
};
use nbd::wire;
use qmp_api::{BlockdevOptionsNbd, SocketAddressBranch};
use tokio::runtime::Runtime;

use crate::driver::{BlockDriver, DriverInfo, OpenContext};
use crate::error::{BlockError, BlockResult, strerror};

/// QEMU's `NBD_MAX_STRING_SIZE`: the longest export name or context name.
const MAX_STRING: usize = 4096;

/// Largest TRIM sent at once (QEMU's `max_pdiscard` without extended headers: `INT_MAX`
/// aligned down).
const MAX_TRIM: u64 = (i32::MAX as u64) & !511;

/// The runtime the NBD client connections of every `nbd` node run on, made at the first open.
fn client_runtime() -> BlockResult<&'static Runtime> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nbd-client")
        .enable_all()
        .build()
        .map_err(|e| {
            BlockError::with_errno(
                format!("Cannot start the NBD client: {e}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
    // Another thread may have won the race: its runtime is used, this one dropped.
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// Runs `future` on the client runtime and waits for it from this thread.
fn wait<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> BlockResult<T> {
    let runtime = client_runtime()?;
    let (answer, result) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        // The waiter is only gone if this thread is being torn down.
        let _ = answer.send(future.await);
    });
    result
        .recv()
        .map_err(|_| BlockError::with_errno("The NBD client stopped", libc::EIO))
}

/// Runs `future` on this thread (in the client runtime's context, whose workers drive the
/// sockets) until it is done: a request's data is borrowed from the caller, not copied, and
/// the reply wakes the caller itself rather than a task that then wakes it.
fn wait_here<F: Future>(future: F) -> BlockResult<F::Output> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let _context = client_runtime()?.enter();
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return Ok(output);
        }
        // A wake-up before the park makes it return at once; a spurious one polls again.
        std::thread::park();
    }
}

/// Which metadata context the node's block status comes from.
#[derive(Debug, Clone, Copy)]
struct StatusContext {
    id: u32,
    /// `qemu:allocation-depth` through `x-dirty-bitmap`: depths above 2 read as 2, as QEMU's
    /// client reads them (only the low two bits mean something as allocation flags).
    depth: bool,
}

/// An `nbd` node.
pub struct NbdDriver {
    client: Arc<Reconnecting>,
    info: ExportInfo,
    /// QEMU's pseudo file name: `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`.
    filename: String,
    status: Option<StatusContext>,
}

/// The server address of `server`, or why it cannot be used here.
fn server_addr(server: &qmp_api::SocketAddress) -> BlockResult<ServerAddr> {
    match &server.branch {
        SocketAddressBranch::Unix(unix) => {
            if unix.r#abstract == Some(true) {
                return Err(BlockError::new(
                    "Parameter 'server.abstract' is not supported: this daemon has no abstract \
                     unix sockets",
                ));
            }
            if unix.tight.is_some() {
                return Err(BlockError::new(
                    "Parameter 'server.tight' is only meaningful with 'abstract', which this \
                     daemon does not support",
                ));
            }
            Ok(ServerAddr::Unix(unix.path.clone().into()))
        }
        SocketAddressBranch::Inet(inet) => {
            let unsupported = [
                ("numeric", inet.numeric.is_some()),
                ("to", inet.to.is_some()),
                ("ipv4", inet.ipv4.is_some()),
                ("ipv6", inet.ipv6.is_some()),
                ("keep-alive", inet.keep_alive.is_some()),
                ("mptcp", inet.mptcp.is_some()),
            ];
            if let Some((name, _)) = unsupported.iter().find(|(_, given)| *given) {
                return Err(BlockError::new(format!(
                    "Parameter 'server.{name}' is not supported by this daemon's NBD client"
                )));
            }
            let port = inet.port.parse::<u16>().map_err(|_| {
                BlockError::new(format!(
                    "address resolution failed for {}:{}: Servname not supported for \
                     ai_socktype",
                    inet.host, inet.port
                ))
            })?;
            Ok(ServerAddr::Tcp {
                host: inet.host.clone(),
                port,
            })
        }
        SocketAddressBranch::Vsock(_) => Err(BlockError::new(
            "vsock sockets are not supported by this daemon's NBD client",
        )),
        SocketAddressBranch::Fd(_) => Err(BlockError::new(
            "only QEMU supports file descriptor passing",
        )),
    }
}

/// QEMU's pseudo file name of an NBD node.
fn pseudo_filename(server: &qmp_api::SocketAddress, export: Option<&str>) -> String {
    match (&server.branch, export) {
        (SocketAddressBranch::Unix(unix), Some(export)) => {
            format!("nbd+unix:///{export}?socket={}", unix.path)
        }
        (SocketAddressBranch::Unix(unix), None) => format!("nbd+unix://?socket={}", unix.path),
        (SocketAddressBranch::Inet(inet), Some(export)) => {
            format!("nbd://{}:{}/{export}", inet.host, inet.port)
        }
        (SocketAddressBranch::Inet(inet), None) => format!("nbd://{}:{}", inet.host, inet.port),
        _ => String::new(),
    }
}

/// The name QEMU's connect errors give the server: the socket path, or `host:port`.
fn server_name(server: &qmp_api::SocketAddress) -> String {
    match &server.branch {
        SocketAddressBranch::Unix(unix) => unix.path.clone(),
        SocketAddressBranch::Inet(inet) => format!("{}:{}", inet.host, inet.port),
        _ => String::new(),
    }
}

/// QEMU's name of an option, as its refusal messages print it.
fn option_name(option: u32) -> &'static str {
    match option {
        wire::OPT_EXPORT_NAME => "export name",
        wire::OPT_ABORT => "abort",
        wire::OPT_LIST => "list",
        wire::OPT_STARTTLS => "starttls",
        wire::OPT_INFO => "info",
        wire::OPT_GO => "go",
        wire::OPT_STRUCTURED_REPLY => "structured reply",
        wire::OPT_LIST_META_CONTEXT => "list meta context",
        wire::OPT_SET_META_CONTEXT => "set meta context",
        wire::OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// A failed open, worded as QEMU words it.
fn open_error(server: &qmp_api::SocketAddress, error: ClientError) -> BlockError {
    match error {
        ClientError::Connect(io) => {
            let errno = io.raw_os_error().unwrap_or(libc::EIO);
            BlockError::with_errno(
                format!(
                    "Failed to connect to '{}': {}",
                    server_name(server),
                    strerror(errno)
                ),
                errno,
            )
        }
        ClientError::NoSuchContext(_) => {
            // QEMU 10.0 reports a context the server lacks this way.
            BlockError::with_errno("Could not open image: Invalid argument", libc::EINVAL)
        }
        ClientError::Refused { option, reply, .. } => {
            let name = option_name(option);
            let desc = match reply {
                wire::REP_ERR_UNKNOWN => "Requested export not available".to_string(),
                wire::REP_ERR_POLICY => format!("Denied by server for option {option} ({name})"),
                wire::REP_ERR_INVALID => {
                    format!("Invalid parameters for option {option} ({name})")
                }
                wire::REP_ERR_PLATFORM => {
                    format!("Server lacks support for option {option} ({name})")
                }
                wire::REP_ERR_TLS_REQD => {
                    format!("TLS negotiation required before option {option} ({name})")
                }
                wire::REP_ERR_SHUTDOWN => {
                    format!("Server shutting down before option {option} ({name})")
                }
                wire::REP_ERR_BLOCK_SIZE_REQD => {
                    format!("Server requires INFO_BLOCK_SIZE for option {option} ({name})")
                }
                _ => format!("Unknown error code when asking for option {option} ({name})"),
            };
            BlockError::with_errno(desc, libc::EINVAL)
        }
        other => BlockError::with_errno(other.to_string(), libc::EIO),
    }
}

/// A failed request as the block layer reports it: the server's errno, `EINVAL` for a request
/// that could not be sent, `EIO` for a lost connection (past the reconnect delay) and the rest.
fn request_error(error: ClientError) -> BlockError {
    let errno = match &error {
        ClientError::Server { errno, .. } => {
            wire::error_of(*errno).raw_os_error().unwrap_or(libc::EIO)
        }
        ClientError::InvalidRequest(_) => libc::EINVAL,
        _ => libc::EIO,
    };
    tracing::debug!(%error, "NBD request failed");
    BlockError::from_errno(errno)
}

/// Opens an `nbd` node: connects (retrying for `open-timeout`), selects `base:allocation` if the
/// server has it (or the `x-dirty-bitmap` context, which it must have), and refuses TLS, which
/// this daemon does not have.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsNbd,
) -> BlockResult<Box<dyn BlockDriver>> {
    let addr = server_addr(&options.server)?;
    let export = options.export.clone();
    if export.as_ref().is_some_and(|e| e.len() > MAX_STRING) {
        return Err(BlockError::new("export name too long to send to server"));
    }
    if let Some(creds) = &options.tls_creds {
        return Err(BlockError::new(format!(
            "No TLS credentials with id '{creds}'"
        )));
    }
    if options.tls_hostname.is_some() {
        return Err(BlockError::new(
            "Parameter 'tls-hostname' needs TLS, which this daemon does not have",
        ));
    }
    let context = options.x_dirty_bitmap.clone();
    if context.as_ref().is_some_and(|c| c.len() > MAX_STRING) {
        return Err(BlockError::new(
            "x-dirty-bitmap query too long to send to server",
        ));
    }
    let mut connector = Connector::new(addr, export.clone().unwrap_or_default());
    connector = match &context {
        Some(name) => connector.meta_context(name.clone()),
        None => connector.optional_meta_context(wire::BASE_ALLOCATION),
    };
    let delay = Duration::from_secs(u64::from(options.reconnect_delay.unwrap_or(0)));
    let open_timeout = Duration::from_secs(u64::from(options.open_timeout.unwrap_or(0)));
    let client = wait(Reconnecting::open(connector, delay, open_timeout))?
        .map_err(|e| open_error(&options.server, e))?;
    let info = client.info().clone();
    let client = Arc::new(client);
    if info.read_only() && !ctx.read_only() {
        if !ctx.auto_read_only() {
            close_quietly(&client);
            // QEMU 10.0 reports it this way (its "NBD export is read-only" is lost on the way).
            return Err(BlockError::with_errno(
                "Could not open image: Permission denied",
                libc::EACCES,
            ));
        }
        ctx.set_read_only();
    }
    let wanted = context.as_deref().unwrap_or(wire::BASE_ALLOCATION);
    let status = info.context_id(wanted).map(|id| StatusContext {
        id,
        depth: wanted == wire::ALLOCATION_DEPTH,
    });
    Ok(Box::new(NbdDriver {
        client,
        filename: pseudo_filename(&options.server, export.as_deref()),
        info,
        status,
    }))
}

/// Disconnects a client whose node did not open.
fn close_quietly(client: &Arc<Reconnecting>) {
    let client = client.clone();
    let _ = wait(async move { client.disconnect().await });
}

impl NbdDriver {
    /// Runs `command` (reconnecting as needed) and returns what it answered.
    fn execute(&self, command: Command) -> BlockResult<Outcome> {
        wait_here(self.client.execute(&command))?.map_err(request_error)
    }

    /// The part of `[offset, offset + len)` inside the export (the node's size is rounded up
    /// to 512 bytes; the tail past the server's size reads as zeroes).
    fn inside(&self, offset: u64, len: u64) -> u64 {
        self.info.size.saturating_sub(offset).min(len)
    }

    fn max_payload(&self) -> u64 {
        u64::from(self.info.max_payload())
    }

    fn writable(&self) -> BlockResult<()> {
        if self.info.read_only() {
            return Err(BlockError::from_errno(libc::EPERM));
        }
        Ok(())
    }

    /// Runs one command per chunk of `[offset, offset + len)` of at most `chunk` bytes.
    fn per_chunk(
        &self,
        offset: u64,
        len: u64,
        chunk: u64,
        command: impl Fn(u64, u32) -> Command,
    ) -> BlockResult<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            // `chunk` is at most u32::MAX.
            self.execute(command(offset + done, n as u32))?;
            done += n;
        }
        Ok(())
    }
}

impl BlockDriver for NbdDriver {
    fn size(&self) -> BlockResult<u64> {
        Ok(self.info.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let inside = self.inside(offset, buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let mut done = 0;
        while done < inside {
            let n = (inside - done).min(self.max_payload() as usize);
            let read = Command::Read {
                offset: offset + done as u64,
                len: n as u32,
            };
            match self.execute(read)? {
                Outcome::Data(data) if data.len() == n => {
                    buf[done..done + n].copy_from_slice(&data);
                }
                _ => return Err(BlockError::from_errno(libc::EIO)),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.writable()?;
        if self.inside(offset, buf.len() as u64) < buf.len() as u64 {
            return Err(BlockError::from_errno(libc::EINVAL));
        }
        let chunk = self.max_payload() as usize;
        for (i, piece) in buf.chunks(chunk.max(1)).enumerate() {
            let offset = offset + (i * chunk) as u64;
            wait_here(self.client.write(offset, piece, false))?.map_err(request_error)?;
        }
        Ok(())
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable()?;
        if self.inside(offset, len) < len {
            return Err(BlockError::from_errno(libc::EINVAL));
        }
        if !self.info.can_zero() {
            // QEMU's block layer falls back to writing zeroes.
            let zeros = vec![0u8; self.max_payload().min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64);
                self.write_at(offset + done, &zeros[..n as usize])?;
                done += n;
            }
            return Ok(());
        }
        // The server may deallocate (QEMU's BDRV_REQ_MAY_UNMAP): no NO_HOLE.
        self.per_chunk(offset, len, self.max_payload(), |offset, len| {
            Command::WriteZeroes {
                offset,
                len,
                flags: ZeroFlags::default(),
            }
        })
    }

    fn write_zeroes_fast_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable()?;
        if !self.info.can_zero() || !self.info.can_fast_zero() || self.inside(offset, len) < len {
            return Err(BlockError::from_errno(libc::ENOTSUP));
        }
        self.per_chunk(offset, len, self.max_payload(), |offset, len| {
            Command::WriteZeroes {
                offset,
                len,
                flags: ZeroFlags {
                    fast: true,
                    ..ZeroFlags::default()
                },
            }
        })
    }

    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.writable()?;
        let len = self.inside(offset, len);
        if !self.info.can_trim() || len == 0 {
            // A discard is a hint: without TRIM it does nothing (as in QEMU).
            return Ok(());
        }
        self.per_chunk(offset, len, MAX_TRIM, |offset, len| Command::Trim {
            offset,
            len,
            fua: false,
        })
    }

    fn flush(&self) -> BlockResult<()> {
        if !self.info.can_flush() {
            return Ok(());
        }
        self.execute(Command::Flush).map(drop)
    }

    fn truncate(&self, size: u64) -> BlockResult<()> {
        if size == self.info.size {
            return Ok(());
        }
        Err(BlockError::with_errno(
            "Cannot resize NBD nodes",
            libc::ENOTSUP,
        ))
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        let (allocated, _, n) = self.zero_status(offset, len)?;
        Ok((allocated, n))
    }

    /// QEMU's reading of an extent: data unless its flags say hole (bit 0), zero if they say
    /// zero (bit 1); allocated if data or zero. With `x-dirty-bitmap` the same bits are read
    /// from that context: a dirty range reads as "not data".
    fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        let inside = self.inside(offset, len);
        if inside == 0 {
            return Ok((true, true, len));
        }
        let Some(context) = self.status else {
            return Ok((true, false, inside));
        };
        let request = inside.min(MAX_TRIM) as u32;
        let status = match self.execute(Command::BlockStatus {
            offset,
            len: request,
            req_one: true,
        })? {
            Outcome::Status(status) => status,
            _ => return Err(BlockError::from_errno(libc::EIO)),
        };
        let extent = status
            .extents(context.id)
            .and_then(|extents| extents.first())
            .filter(|extent| extent.length > 0)
            .ok_or_else(|| BlockError::from_errno(libc::EIO))?;
        let mut flags = extent.flags;
        if context.depth && flags > 2 {
            flags = 2;
        }
        let data = flags & wire::STATE_HOLE == 0;
        let zero = flags & wire::STATE_ZERO != 0;
        Ok((data || zero, zero, extent.length.min(u64::from(request))))
    }

    fn unallocated_reads_zero(&self) -> bool {
        false
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            filename: Some(self.filename.clone()),
            ..DriverInfo::default()
        }
    }

    /// Flushes (as QEMU's `bdrv_close` does) and disconnects. A server that is gone cannot
    /// stop the node from closing, nor make it wait for a reconnection: like QEMU,
    /// `blockdev-del` still succeeds.
    fn close(&self) -> BlockResult<()> {
        let client = self.client.clone();
        let connected = wait(async move { client.is_connected().await }).unwrap_or(false);
        if !self.info.read_only()
            && connected
            && let Err(e) = self.flush()
        {
            tracing::warn!("{}: flush at close failed: {e}", self.filename);
        }
        close_quietly(&self.client);
        Ok(())
    }

    fn flushes_at_close(&self) -> bool {
        true
    }
}
