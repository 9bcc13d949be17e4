//! The listening server: binds a unix or TCP socket, accepts clients (bounded by
//! `max_connections`), runs each connection's handshake and transmission, and stops.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::exports::{Export, ExportDeletion, ExportError, Registry, RemoveMode};
use crate::transmission::IntoSocket;
use crate::{handshake, transmission};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path; a stale socket file there is replaced.
    Unix(PathBuf),
    /// A TCP host (name or address) and port; port 0 picks a free port.
    Tcp { host: String, port: u16 },
}

/// Where the server actually listens (TCP with the port chosen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Server limits, as `nbd-server-start` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// At most this many clients at once (0: unlimited); further clients wait to be accepted.
    pub max_connections: u32,
    /// A client must finish its handshake within this time, or is disconnected.
    pub handshake_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    /// Unlimited connections, 10 s handshakes (QEMU's defaults).
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 0,
            handshake_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// A running NBD server and its exports. Dropping it stops it without waiting.
pub struct NbdServer {
    registry: Arc<Registry>,
    local_addr: BoundAddr,
    stop: watch::Sender<bool>,
    acceptor: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Binds `addr` and starts accepting clients on the current tokio runtime.
    pub async fn start(addr: &ListenAddr, config: ServerConfig) -> io::Result<NbdServer> {
        let (listener, local_addr) = match addr {
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)?;
                (
                    Listener::Unix(listener, path.clone()),
                    BoundAddr::Unix(path.clone()),
                )
            }
            ListenAddr::Tcp { host, port } => {
                let listener = TcpListener::bind((host.as_str(), *port)).await?;
                let local = listener.local_addr()?;
                (Listener::Tcp(listener), BoundAddr::Tcp(local))
            }
        };
        let registry = Arc::new(Registry::new(config.max_connections != 1));
        let stop = watch::Sender::new(false);
        let acceptor = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&registry),
            stop.subscribe(),
            config,
        ));
        Ok(NbdServer {
            registry,
            local_addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// Where the server listens.
    pub fn local_addr(&self) -> &BoundAddr {
        &self.local_addr
    }

    /// Serves `export` to new clients under its name.
    pub fn add_export(&self, export: Export) -> Result<(), ExportError> {
        self.registry.add(export)
    }

    /// Removes the export `name`: new clients no longer see it at once. With
    /// [`RemoveMode::Safe`] an export with clients is refused ([`ExportError::InUse`]); with
    /// [`RemoveMode::Hard`] its clients are disconnected once their current request is done.
    /// The returned [`ExportDeletion`] completes when the last client is gone.
    pub fn remove_export(
        &self,
        name: &str,
        mode: RemoveMode,
    ) -> Result<ExportDeletion, ExportError> {
        self.registry.remove(name, mode)
    }

    /// Names of the exports, in the order they were added.
    pub fn export_names(&self) -> Vec<String> {
        self.registry
            .list()
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// Number of clients in transmission on `name`, or `None` if there is no such export.
    pub fn client_count(&self, name: &str) -> Option<usize> {
        self.registry.clients(name)
    }

    /// Stops listening, removes every export (disconnecting clients, hard mode) and waits for
    /// every connection to close. Returns the names of the exports deleted, in the order they
    /// were added (for `BLOCK_EXPORT_DELETED`).
    pub async fn stop(mut self) -> Vec<String> {
        let deletions = self.registry.remove_all();
        self.stop.send_replace(true);
        if let Some(acceptor) = self.acceptor.take() {
            // The accept loop only ends by the stop signal; a panic in it has nothing to undo.
            let _ = acceptor.await;
        }
        let mut names = Vec::with_capacity(deletions.len());
        for deletion in deletions {
            names.push(deletion.wait().await);
        }
        names
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.registry.remove_all();
        self.stop.send_replace(true);
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

enum Connection {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Unix(listener, _) => Ok(Connection::Unix(listener.accept().await?.0)),
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                // Replies are written whole; waiting to coalesce them only adds latency.
                stream.set_nodelay(true)?;
                Ok(Connection::Tcp(stream))
            }
        }
    }
}

/// Replaces a socket left by an earlier server at `path`; any other kind of file is kept (and
/// binding then fails).
fn remove_stale_socket(path: &PathBuf) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

/// Resolves once `signal` is true (or its sender is gone).
async fn raised(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|raised| *raised).await;
}

async fn accept_loop(
    listener: Listener,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
    config: ServerConfig,
) {
    let slots = (config.max_connections > 0)
        .then(|| Arc::new(Semaphore::new(config.max_connections as usize)));
    let mut connections = JoinSet::new();
    'serve: loop {
        let slot = match &slots {
            None => None,
            Some(slots) => loop {
                tokio::select! {
                    slot = Arc::clone(slots).acquire_owned() => break slot.ok(),
                    Some(_) = connections.join_next() => {}
                    () = raised(&mut stop) => break 'serve,
                }
            },
        };
        let connection = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(connection) => break connection,
                    Err(error) => {
                        // Out of file descriptors and the like: retry later, do not spin.
                        tracing::warn!(%error, "NBD server: accept failed");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                            () = raised(&mut stop) => break 'serve,
                        }
                    }
                },
                Some(_) = connections.join_next() => {}
                () = raised(&mut stop) => break 'serve,
            }
        };
        let registry = Arc::clone(&registry);
        let stop = stop.clone();
        let timeout = config.handshake_timeout;
        match connection {
            Connection::Unix(stream) => {
                connections.spawn(serve_connection(stream, registry, stop, timeout, slot))
            }
            Connection::Tcp(stream) => {
                connections.spawn(serve_connection(stream, registry, stop, timeout, slot))
            }
        };
    }
    if let Listener::Unix(listener, path) = listener {
        drop(listener);
        let _ = std::fs::remove_file(path);
    }
    while connections.join_next().await.is_some() {}
}

/// One client, from greeting to close. `_slot` holds its place under `max_connections`.
async fn serve_connection<S>(
    mut stream: S,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
    handshake_timeout: Option<Duration>,
    _slot: Option<OwnedSemaphorePermit>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + IntoSocket + 'static,
{
    let negotiated = tokio::select! {
        negotiated = within(handshake_timeout, handshake::negotiate(&mut stream, &registry)) => negotiated,
        () = raised(&mut stop) => return,
    };
    let session = match negotiated {
        Ok(Some(session)) => session,
        Ok(None) => return,
        Err(error) => {
            tracing::debug!(%error, "NBD client dropped during handshake");
            return;
        }
    };
    let mut disconnect = session.lease.disconnect_signal();
    let stopped = async move {
        tokio::select! {
            () = raised(&mut stop) => {}
            () = raised(&mut disconnect) => {}
        }
    };
    let (served, socket) = match stream.into_socket() {
        Ok(socket) => transmission::serve(socket, &session, stopped).await,
        Err(error) => (Err(error), None),
    };
    if let Err(error) = served {
        tracing::debug!(%error, "NBD client dropped");
    }
    // The socket closes as the client leaves the export, in one step: a client that saw the
    // end finds the export free, and the export is reported deleted only once it is closed.
    session.lease.end_with(move || {
        if let Some(socket) = socket {
            socket.shutdown();
        }
    });
}

async fn within<T>(
    limit: Option<Duration>,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, work)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        None => work.await,
    }
}
