//! The NBD server through its public API: one server (on a unix socket in a temporary
//! directory) serves a writable 1 MiB in-memory export named `disk`; each input is what one
//! client sends — the handshake, then the transmission phase — after which the client closes
//! its sending side and reads until the server closes.
//!
//! Invariants besides "no panic": the server ends every connection once its client has sent
//! everything and closed (no hang), and stays up for the next client.

use std::io;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use nbd::{Export, ExportBackend, ListenAddr, NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The export's size.
const SIZE: u64 = 1 << 20;
/// How long a connection may take after the client closed its side.
const HANG: Duration = Duration::from_secs(10);

/// A fixed-size disk in memory.
struct MemoryDisk(Mutex<Vec<u8>>);

impl ExportBackend for MemoryDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let disk = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let at = offset as usize;
        buf.copy_from_slice(&disk[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let at = offset as usize;
        disk[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut disk = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        disk[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

struct Served {
    runtime: tokio::runtime::Runtime,
    socket: std::path::PathBuf,
    _server: NbdServer,
    _dir: tempfile::TempDir,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("nbd.sock");
        let server = runtime
            .block_on(NbdServer::start(
                &ListenAddr::Unix(socket.clone()),
                ServerConfig::default(),
            ))
            .expect("the NBD server starts");
        let disk = Arc::new(MemoryDisk(Mutex::new(vec![0; SIZE as usize])));
        server
            .add_export(Export::new("disk", disk).writable(true))
            .expect("a new export");
        Served {
            runtime,
            socket,
            _server: server,
            _dir: dir,
        }
    })
}

/// Sends `data` as one client and reads until the server closes.
pub fn run(data: &[u8]) {
    let served = served();
    let outcome = served.runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(&served.socket).await?;
        let (mut rx, mut tx) = stream.into_split();
        let send = async {
            // The server may close first (a bad request ends the connection).
            let _ = tx.write_all(data).await;
            let _ = tx.shutdown().await;
        };
        let receive = async {
            let mut sink = Vec::new();
            let _ = rx.read_to_end(&mut sink).await;
        };
        tokio::time::timeout(HANG, async { tokio::join!(send, receive) })
            .await
            .map_err(|_| io::Error::other("the server did not close the connection"))
    });
    if let Err(e) = outcome {
        panic!("client connection: {e}");
    }
}
