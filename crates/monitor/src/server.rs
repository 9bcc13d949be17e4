//! The QMP server: monitors on unix sockets, TCP and stdio, one client at a time per monitor
//! (as qemu-storage-daemon: a second client waits in the listen backlog until the first
//! leaves), all commands run in order on one dispatcher thread.

use std::io;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use qmp_api::{QMPCapability, VersionInfo, VersionTriple};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinSet;

use crate::backend::{QmpBackend, QmpError};
use crate::events::{Broadcast, Client, Line};
use crate::json_stream::JsonStream;
use crate::session::{Action, Session, failure, success};
use crate::wire;

/// Requests a client may have queued before the server stops reading from it (QEMU's
/// `QMP_REQ_QUEUE_LEN_MAX`).
const IN_FLIGHT: usize = 8;
/// Size of each read from a client, and of each write to it.
const READ_CHUNK: usize = 64 * 1024;
/// How long a closing connection may take to flush its last replies.
const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The greeting's `version` member (the `query-version` answer).
    pub version: VersionInfo,
    /// Bytes of output a client may leave unread before it counts as not reading and is
    /// disconnected (see [`crate::events`]).
    pub client_output_limit: usize,
}

impl ServerConfig {
    /// Output a client may leave unread by default: 64 MiB, ten times the largest burst of a
    /// 10,000-job transaction.
    pub const DEFAULT_OUTPUT_LIMIT: usize = 64 << 20;
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            version: VersionInfo {
                qemu: VersionTriple {
                    major: 10,
                    minor: 0,
                    micro: 2,
                },
                package: concat!("blockjobd ", env!("CARGO_PKG_VERSION")).to_string(),
            },
            client_output_limit: Self::DEFAULT_OUTPUT_LIMIT,
        }
    }
}

/// Where a monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket at this path (an existing file there is replaced, as QEMU does).
    Unix(PathBuf),
    /// A TCP socket.
    Tcp { host: String, port: u16 },
    /// The daemon's stdin and stdout: one client, for the life of the process.
    Stdio,
}

/// The address a monitor ended up listening on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Stdio,
}

/// Why [`MonitorServer::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// A client executed `quit` (its reply has been sent).
    Quit,
    /// [`ShutdownHandle::request`] was called (e.g. on SIGTERM).
    Requested,
}

/// Asks a running server to stop. Cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<Option<ShutdownReason>>>,
    jobs: std::sync::mpsc::Sender<Job>,
    stopping: Arc<AtomicBool>,
}

impl ShutdownHandle {
    /// Stop serving: commands not yet started are dropped, the dispatcher (once the command
    /// it runs, if any, has returned) runs [`QmpBackend::stop`] with every client still
    /// connected, then `run` returns [`ShutdownReason::Requested`] (unless already stopping).
    pub fn request(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.jobs.send(Job::Stop).is_err() {
            // No dispatcher: nothing to stop first.
            set_shutdown(&self.tx, ShutdownReason::Requested);
        }
    }
}

fn set_shutdown(tx: &watch::Sender<Option<ShutdownReason>>, reason: ShutdownReason) {
    tx.send_if_modified(|v| {
        if v.is_none() {
            *v = Some(reason);
            true
        } else {
            false
        }
    });
}

async fn stopping(rx: &mut watch::Receiver<Option<ShutdownReason>>) {
    // The sender lives as long as the server; an error means it is gone: stop as well.
    let _ = rx.wait_for(Option::is_some).await;
}

enum Monitor {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    Stdio,
}

enum Work {
    Reply(Line),
    Negotiated(Line),
    Execute {
        name: String,
        arguments: Option<Map<String, Value>>,
        id: Option<Value>,
    },
    Quit {
        id: Option<Value>,
    },
}

enum Job {
    Client {
        client: Arc<Client>,
        work: Work,
        _permit: OwnedSemaphorePermit,
    },
    /// Answered once every job queued before it has been handled.
    Barrier(oneshot::Sender<()>),
    /// [`ShutdownHandle::request`]: run the backend's `stop`, then stop the server.
    Stop,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::Client { .. } => "Job::Client",
            Job::Barrier(_) => "Job::Barrier",
            Job::Stop => "Job::Stop",
        })
    }
}

struct Shared {
    backend: Arc<dyn QmpBackend>,
    events: Broadcast,
    greeting: Line,
    client_output_limit: usize,
    jobs: std::sync::mpsc::Sender<Job>,
    shutdown: Arc<watch::Sender<Option<ShutdownReason>>>,
    /// Set once stopping has begun (`quit` executed or shutdown requested): commands not yet
    /// started are dropped from then on.
    stopping: Arc<AtomicBool>,
    next_client: AtomicU64,
}

/// A QMP server over a [`QmpBackend`].
///
/// ```no_run
/// # async fn demo(backend: std::sync::Arc<dyn monitor::QmpBackend>) -> std::io::Result<()> {
/// use monitor::{Endpoint, MonitorServer, ServerConfig};
/// let mut server = MonitorServer::new(backend, ServerConfig::default());
/// server.listen(Endpoint::Unix("qmp.sock".into())).await?;
/// let events = server.events(); // hand to the job layer
/// let reason = server.run().await; // returns after `quit` or ShutdownHandle::request
/// # let _ = (events, reason); Ok(()) }
/// ```
pub struct MonitorServer {
    shared: Arc<Shared>,
    monitors: Vec<Monitor>,
    socket_paths: Vec<PathBuf>,
}

impl MonitorServer {
    /// A server with no monitors yet; starts the dispatcher thread.
    pub fn new(backend: Arc<dyn QmpBackend>, config: ServerConfig) -> Self {
        Self::with_events(backend, Broadcast::new(), config)
    }

    /// Like [`new`](Self::new), broadcasting the events emitted into `events` (create the
    /// broadcast first when the backend needs it at construction).
    pub fn with_events(
        backend: Arc<dyn QmpBackend>,
        events: Broadcast,
        config: ServerConfig,
    ) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel();
        let (shutdown, _) = watch::channel(None);
        let shutdown = Arc::new(shutdown);
        let stopping = Arc::new(AtomicBool::new(false));
        let greeting = json!({"QMP": {
            "version": serde_json::to_value(&config.version).unwrap_or(Value::Null),
            "capabilities": QMPCapability::ALL,
        }});
        let shared = Arc::new(Shared {
            backend: backend.clone(),
            events: events.clone(),
            greeting: wire::line(&greeting).into(),
            client_output_limit: config.client_output_limit.max(1),
            jobs,
            shutdown: shutdown.clone(),
            stopping: stopping.clone(),
            next_client: AtomicU64::new(1),
        });
        // Commands run inside the caller's tokio runtime context (when there is one), so a
        // backend may spawn tasks or `Handle::current().block_on(...)`.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let spawned = std::thread::Builder::new()
            .name("qmp-dispatcher".into())
            .spawn(move || {
                let _context = runtime.as_ref().map(|r| r.enter());
                dispatch_loop(rx, backend, events, shutdown, stopping)
            });
        if let Err(e) = spawned {
            // Without a dispatcher every job send fails and clients see their connection close.
            tracing::error!("cannot start the QMP dispatcher thread: {e}");
        }
        MonitorServer {
            shared,
            monitors: Vec::new(),
            socket_paths: Vec::new(),
        }
    }

    /// The handle for emitting events to every negotiated client.
    pub fn events(&self) -> Broadcast {
        self.shared.events.clone()
    }

    /// A handle to stop [`run`](Self::run) from elsewhere (signal handlers).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.shared.shutdown.clone(),
            jobs: self.shared.jobs.clone(),
            stopping: self.shared.stopping.clone(),
        }
    }

    /// Add a monitor. Sockets listen at once (QEMU's `server=on,wait=off`): clients may
    /// connect before [`run`](Self::run) and are greeted when it starts.
    pub async fn listen(&mut self, endpoint: Endpoint) -> io::Result<Bound> {
        match endpoint {
            Endpoint::Unix(path) => {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let listener = UnixListener::bind(&path)?;
                self.socket_paths.push(path.clone());
                self.monitors.push(Monitor::Unix(listener, path.clone()));
                Ok(Bound::Unix(path))
            }
            Endpoint::Tcp { host, port } => {
                let listener = TcpListener::bind((host.as_str(), port)).await?;
                let addr = listener.local_addr()?;
                self.monitors.push(Monitor::Tcp(listener));
                Ok(Bound::Tcp(addr))
            }
            Endpoint::Stdio => {
                self.monitors.push(Monitor::Stdio);
                Ok(Bound::Stdio)
            }
        }
    }

    /// Serve every monitor until a client executes `quit` or shutdown is requested. Before
    /// returning: the command being executed (if any) has finished, queued commands are
    /// dropped, and pending replies have been flushed (bounded by a grace period). Unix
    /// socket files are removed.
    pub async fn run(self) -> ShutdownReason {
        let shared = self.shared;
        let mut tasks = JoinSet::new();
        for monitor in self.monitors {
            tasks.spawn(run_monitor(shared.clone(), monitor));
        }
        let mut rx = shared.shutdown.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(ShutdownReason::Requested),
            Err(_) => ShutdownReason::Requested,
        };
        // Wait for the dispatcher to be idle: the daemon's shutdown work must not race a
        // command.
        let (tx, done) = oneshot::channel();
        if shared.jobs.send(Job::Barrier(tx)).is_ok() {
            let _ = done.await;
        }
        let _ = tokio::time::timeout(FLUSH_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        shared.events.unsubscribe_all();
        for path in &self.socket_paths {
            let _ = std::fs::remove_file(path);
        }
        reason
    }
}

fn dispatch_loop(
    rx: std::sync::mpsc::Receiver<Job>,
    backend: Arc<dyn QmpBackend>,
    events: Broadcast,
    shutdown: Arc<watch::Sender<Option<ShutdownReason>>>,
    stopping: Arc<AtomicBool>,
) {
    while let Ok(job) = rx.recv() {
        let (client, work) = match job {
            Job::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
            Job::Stop => {
                if shutdown.borrow().is_none() {
                    stop_backend(&*backend);
                    set_shutdown(&shutdown, ShutdownReason::Requested);
                }
                continue;
            }
            Job::Client { client, work, .. } => (client, work),
        };
        if shutdown.borrow().is_some() || stopping.load(Ordering::Acquire) {
            continue;
        }
        match work {
            Work::Reply(line) => {
                client.push(line);
            }
            Work::Negotiated(line) => events.reply_and_subscribe(&client, line),
            Work::Execute {
                name,
                arguments,
                id,
            } => {
                events.begin_command();
                let result = catch_unwind(AssertUnwindSafe(|| backend.execute(&name, arguments)))
                    .unwrap_or_else(|_| {
                        tracing::error!(command = %name, "QMP command panicked");
                        Err(QmpError::generic(format!(
                            "internal error while executing '{name}'"
                        )))
                    });
                let reply = match result {
                    Ok(value) => success(value, id),
                    Err(e) => failure(&e, id),
                };
                events.reply_and_release(&client, wire::line(&reply).into());
            }
            Work::Quit { id } => {
                stopping.store(true, Ordering::Release);
                events.begin_command();
                stop_backend(&*backend);
                events.reply_and_release(&client, wire::line(&success(json!({}), id)).into());
                set_shutdown(&shutdown, ShutdownReason::Quit);
            }
        }
    }
}

/// [`QmpBackend::stop`], a panic in it logged rather than taking the dispatcher down.
fn stop_backend(backend: &dyn QmpBackend) {
    if catch_unwind(AssertUnwindSafe(|| backend.stop())).is_err() {
        tracing::error!("stopping the QMP backend panicked");
    }
}

async fn run_monitor(shared: Arc<Shared>, monitor: Monitor) {
    let mut stop = shared.shutdown.subscribe();
    match monitor {
        Monitor::Unix(listener, path) => loop {
            tokio::select! {
                biased;
                _ = stopping(&mut stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (r, w) = stream.into_split();
                        serve(shared.clone(), r, w).await;
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        },
        Monitor::Tcp(listener) => loop {
            tokio::select! {
                biased;
                _ = stopping(&mut stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let (r, w) = stream.into_split();
                        serve(shared.clone(), r, w).await;
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        },
        Monitor::Stdio => serve(shared, tokio::io::stdin(), tokio::io::stdout()).await,
    }
}

/// How a connection's read loop ended.
#[derive(PartialEq, Eq)]
enum End {
    /// End of input or a read error: finish pending commands, flush, close.
    Eof,
    /// The client executed `quit`.
    Quit,
    /// The server is stopping.
    Shutdown,
    /// The client stopped reading: its output exceeded its limit.
    Kicked,
}

/// Serve one client until it leaves, overflows, or the server stops.
async fn serve<R, W>(shared: Arc<Shared>, mut reader: R, writer: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    let client = Arc::new(Client::new(id, shared.client_output_limit));
    let finish = Arc::new(Notify::new());
    let writer_task = tokio::spawn(write_loop(writer, client.clone(), finish.clone()));
    client.push(shared.greeting.clone());

    let mut stop = shared.shutdown.subscribe();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut session = Session::new();
    let mut stream = JsonStream::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut messages = Vec::new();

    let end = 'conn: loop {
        let n = tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => break 'conn End::Eof,
                Ok(n) => n,
            },
            _ = client.kicked.notified() => break 'conn End::Kicked,
            _ = stopping(&mut stop) => break 'conn End::Shutdown,
        };
        stream.feed(&buf[..n], &mut messages);
        for message in messages.drain(..) {
            let action = session.handle(message, &*shared.backend);
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break 'conn End::Eof,
                },
                _ = client.kicked.notified() => break 'conn End::Kicked,
                _ = stopping(&mut stop) => break 'conn End::Shutdown,
            };
            let quit = matches!(action, Action::Quit { .. });
            let work = match action {
                Action::Reply(reply) => Work::Reply(wire::line(&reply).into()),
                Action::Negotiated(reply) => Work::Negotiated(wire::line(&reply).into()),
                Action::Execute {
                    name,
                    arguments,
                    id,
                } => Work::Execute {
                    name,
                    arguments,
                    id,
                },
                Action::Quit { id } => Work::Quit { id },
            };
            let job = Job::Client {
                client: client.clone(),
                work,
                _permit: permit,
            };
            if shared.jobs.send(job).is_err() {
                break 'conn End::Shutdown;
            }
            if quit {
                break 'conn End::Quit;
            }
        }
    };

    if end != End::Kicked {
        // Let the commands already queued for this client finish (dropped if stopping).
        tokio::select! {
            _ = permits.acquire_many(IN_FLIGHT as u32) => {}
            _ = client.kicked.notified() => {}
        }
    }
    shared.events.unsubscribe(client.id);
    if end == End::Kicked || client.overflowed() {
        writer_task.abort();
    } else {
        finish.notify_one();
        let _ = tokio::time::timeout(FLUSH_GRACE, writer_task).await;
    }
}

/// Writes the client's output as it is queued, a chunk at a time; the bytes count against
/// the client's limit until written. On `finish`, writes what is left and closes.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    client: Arc<Client>,
    finish: Arc<Notify>,
) {
    let mut out = Vec::with_capacity(READ_CHUNK);
    let mut finishing = false;
    loop {
        out.clear();
        let taken = client.take(&mut out, READ_CHUNK);
        if taken == 0 {
            if finishing {
                break;
            }
            tokio::select! {
                biased;
                _ = client.ready.notified() => {}
                _ = finish.notified() => finishing = true,
            }
            continue;
        }
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            break;
        }
        client.written(taken);
    }
    let _ = writer.shutdown().await;
}
