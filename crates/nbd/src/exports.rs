//! Exports by name and their lifetime: the backend trait, the metadata contexts an export offers,
//! which clients are attached, removal (safe or hard) and the notification that an export is
//! fully deleted.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::wire;

/// The storage behind an export. Calls block (they run on the connections' worker threads,
/// never on the executor) and may come from several connections at once.
pub trait ExportBackend: Send + Sync + 'static {
    /// Size of the export in bytes, read when a client connects.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (the range is inside `size()`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`. Never called for a read-only export.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes. Never called for a read-only export.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Like [`ExportBackend::write_zeroes`], but only if that is fast (no zero data written):
    /// otherwise fails at once with [`io::ErrorKind::Unsupported`], as `NBD_CMD_FLAG_FAST_ZERO`
    /// asks, and the client falls back to a plain zeroing. The default is never fast.
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Hints that `len` bytes at `offset` are no longer needed; the default ignores it.
    /// Never called for a read-only export.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Prefetches `len` bytes at `offset` (`NBD_CMD_CACHE`); the default reads them.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.read_at(&mut buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// How the `len` bytes at `offset` are allocated, as consecutive extents from `offset`
    /// (`base:allocation`); they may cover less than `len` (the server asks again for the
    /// rest). The default: all data.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
        }])
    }
}

/// A run of bytes with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated in this layer.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// A source of block status for a metadata context other than `base:allocation`
/// (`qemu:allocation-depth`, `qemu:dirty-bitmap:NAME`). Calls block, like the backend's.
pub trait BlockStatus: Send + Sync + 'static {
    /// The status of the `len` bytes at `offset`, as consecutive extents from `offset`; they
    /// may cover less than `len` (the server asks again for the rest).
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>>;
}

/// A run of bytes with the same status flags, in a context's own meaning (for
/// `qemu:dirty-bitmap:NAME` bit 0 is dirty; for `qemu:allocation-depth` the value is the depth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u64,
    pub flags: u32,
}

/// A metadata context an export offers besides `base:allocation`, which every export has.
#[derive(Clone)]
pub struct MetaContext {
    /// The full name, `namespace:leaf` (`qemu:dirty-bitmap:b0`).
    pub name: String,
    pub source: Arc<dyn BlockStatus>,
}

/// An export to serve: a name clients ask for, and its backend.
#[derive(Clone)]
pub struct Export {
    /// The name clients connect to (`nbd+unix:///NAME?socket=…`); may be empty.
    pub name: String,
    /// Free text shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`; may be empty.
    pub description: String,
    /// Whether clients may write (WRITE, WRITE_ZEROES, TRIM); if not they get `EPERM`.
    pub writable: bool,
    /// Whether every write is flushed before its reply (QEMU's `writethrough`), as if the
    /// client had set FUA.
    pub writethrough: bool,
    /// The contexts offered after `base:allocation`, in this order (context ids 1, 2, ...).
    pub contexts: Vec<MetaContext>,
    pub backend: Arc<dyn ExportBackend>,
}

impl Export {
    /// A read-only export without description.
    pub fn new(name: impl Into<String>, backend: Arc<dyn ExportBackend>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            writable: false,
            writethrough: false,
            contexts: Vec::new(),
            backend,
        }
    }

    /// Sets whether every write is flushed before its reply.
    pub fn writethrough(mut self, writethrough: bool) -> Export {
        self.writethrough = writethrough;
        self
    }

    /// Offers the metadata context `name` (after those added before).
    pub fn meta_context(mut self, name: impl Into<String>, source: Arc<dyn BlockStatus>) -> Export {
        self.contexts.push(MetaContext {
            name: name.into(),
            source,
        });
        self
    }

    /// Sets whether clients may write.
    pub fn writable(mut self, writable: bool) -> Export {
        self.writable = writable;
        self
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Export {
        self.description = description.into();
        self
    }
}

/// How `block-export-del` treats clients still connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse to remove an export that has clients.
    Safe,
    /// Disconnect the clients (after the request each is executing).
    Hard,
}

/// Why an export cannot be added or removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("NBD server already has export named '{0}'")]
    DuplicateName(String),
    #[error("export name, description or context name longer than 4096 bytes")]
    StringTooLong,
    #[error("export offers the metadata context '{0}' twice")]
    DuplicateContext(String),
    #[error("export '{0}' not found")]
    NotFound(String),
    #[error("export '{name}' still in use")]
    InUse { name: String, clients: usize },
}

/// Resolves once a removed export has no client left: the moment to report
/// `BLOCK_EXPORT_DELETED`.
#[derive(Debug)]
pub struct ExportDeletion {
    name: String,
    deleted: watch::Receiver<bool>,
}

impl ExportDeletion {
    /// The removed export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True once the last client is gone (immediately for an export without clients).
    pub fn is_complete(&self) -> bool {
        *self.deleted.borrow()
    }

    /// Waits until the last client is gone; returns the export's name.
    pub async fn wait(mut self) -> String {
        // The sender lives in the export entry, which our receiver does not keep alive: if it
        // is gone, every lease is gone too, so the deletion is complete either way.
        let _ = self.deleted.wait_for(|deleted| *deleted).await;
        self.name
    }
}

/// The exports of one server.
#[derive(Default)]
pub(crate) struct Registry {
    exports: Mutex<Vec<Arc<ExportEntry>>>,
    /// Whether clients may use several connections at once (`NBD_FLAG_CAN_MULTI_CONN`).
    multi_conn: bool,
}

/// One export and its attached clients.
pub(crate) struct ExportEntry {
    pub export: Export,
    multi_conn: bool,
    life: Mutex<Life>,
    disconnect: watch::Sender<bool>,
    deleted: watch::Sender<bool>,
}

#[derive(Default)]
struct Life {
    clients: usize,
    removed: bool,
}

/// A client's hold on an export in transmission; released on drop.
pub(crate) struct ExportLease {
    entry: Arc<ExportEntry>,
    /// Released already ([`ExportLease::end_with`]).
    ended: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// A registry whose exports advertise multi-conn if `multi_conn`.
    pub fn new(multi_conn: bool) -> Registry {
        Registry {
            exports: Mutex::default(),
            multi_conn,
        }
    }

    pub fn add(&self, export: Export) -> Result<(), ExportError> {
        let names = std::iter::once(&export.name)
            .chain(std::iter::once(&export.description))
            .chain(export.contexts.iter().map(|context| &context.name));
        if names.into_iter().any(|text| text.len() > wire::MAX_STRING) {
            return Err(ExportError::StringTooLong);
        }
        for (i, context) in export.contexts.iter().enumerate() {
            let twice = context.name == wire::BASE_ALLOCATION
                || export.contexts[..i].iter().any(|c| c.name == context.name);
            if twice {
                return Err(ExportError::DuplicateContext(context.name.clone()));
            }
        }
        let mut exports = lock(&self.exports);
        if exports.iter().any(|entry| entry.export.name == export.name) {
            return Err(ExportError::DuplicateName(export.name));
        }
        exports.push(Arc::new(ExportEntry {
            export,
            multi_conn: self.multi_conn,
            life: Mutex::default(),
            disconnect: watch::Sender::new(false),
            deleted: watch::Sender::new(false),
        }));
        Ok(())
    }

    /// Removes `name` at once for new clients; existing ones are refused (safe) or
    /// disconnected (hard).
    pub fn remove(&self, name: &str, mode: RemoveMode) -> Result<ExportDeletion, ExportError> {
        let mut exports = lock(&self.exports);
        let index = exports
            .iter()
            .position(|entry| entry.export.name == name)
            .ok_or_else(|| ExportError::NotFound(name.to_owned()))?;
        let clients = lock(&exports[index].life).clients;
        if mode == RemoveMode::Safe && clients > 0 {
            return Err(ExportError::InUse {
                name: name.to_owned(),
                clients,
            });
        }
        let entry = exports.remove(index);
        drop(exports);
        Ok(entry.begin_deletion())
    }

    /// Removes every export, disconnecting their clients.
    pub fn remove_all(&self) -> Vec<ExportDeletion> {
        let removed = std::mem::take(&mut *lock(&self.exports));
        removed.iter().map(|entry| entry.begin_deletion()).collect()
    }

    pub fn find(&self, name: &str) -> Option<Arc<ExportEntry>> {
        lock(&self.exports)
            .iter()
            .find(|entry| entry.export.name == name)
            .cloned()
    }

    /// Attaches a client to `name`, unless no such export exists (any more).
    pub fn attach(&self, name: &str) -> Option<ExportLease> {
        // Holding the registry lock orders this against `remove`: an export is either still
        // listed (and the client counted before removal looks) or gone.
        let exports = lock(&self.exports);
        let entry = exports.iter().find(|entry| entry.export.name == name)?;
        lock(&entry.life).clients += 1;
        Some(ExportLease {
            entry: Arc::clone(entry),
            ended: false,
        })
    }

    /// Names and descriptions, in the order the exports were added.
    pub fn list(&self) -> Vec<(String, String)> {
        lock(&self.exports)
            .iter()
            .map(|entry| (entry.export.name.clone(), entry.export.description.clone()))
            .collect()
    }

    pub fn clients(&self, name: &str) -> Option<usize> {
        self.find(name).map(|entry| lock(&entry.life).clients)
    }
}

impl ExportEntry {
    /// Transmission flags advertised for this export to a client that did (or did not)
    /// negotiate structured replies; QEMU's set.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = wire::FLAG_HAS_FLAGS
            | wire::FLAG_SEND_FLUSH
            | wire::FLAG_SEND_FUA
            | wire::FLAG_SEND_CACHE;
        if self.multi_conn {
            // Every connection reaches the same backend, and a flush on any of them makes
            // every completed write durable: QEMU's condition (more than one connection allowed).
            flags |= wire::FLAG_CAN_MULTI_CONN;
        }
        if self.export.writable {
            flags |=
                wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES | wire::FLAG_SEND_FAST_ZERO;
        } else {
            flags |= wire::FLAG_READ_ONLY;
        }
        if structured {
            // Reads are always answered in one chunk.
            flags |= wire::FLAG_SEND_DF;
        }
        flags
    }

    fn begin_deletion(&self) -> ExportDeletion {
        let mut life = lock(&self.life);
        life.removed = true;
        self.disconnect.send_replace(true);
        if life.clients == 0 {
            self.deleted.send_replace(true);
        }
        ExportDeletion {
            name: self.export.name.clone(),
            deleted: self.deleted.subscribe(),
        }
    }
}

impl ExportLease {
    pub fn entry(&self) -> &ExportEntry {
        &self.entry
    }

    pub fn entry_arc(&self) -> Arc<ExportEntry> {
        Arc::clone(&self.entry)
    }

    /// Becomes true when the export's clients must be disconnected (hard removal).
    pub fn disconnect_signal(&self) -> watch::Receiver<bool> {
        self.entry.disconnect.subscribe()
    }
}

impl ExportLease {
    /// Ends the lease, running `close` (closing the client's socket) under the export's
    /// lock: whoever counts the export's clients or removes it sees the connection either
    /// open and counted or closed and gone, never closed and still counted. (QEMU's main loop
    /// shuts the socket down and drops the client from the export with no command between.)
    pub fn end_with(mut self, close: impl FnOnce()) {
        self.release(close);
    }

    fn release(&mut self, close: impl FnOnce()) {
        if self.ended {
            return;
        }
        self.ended = true;
        let mut life = lock(&self.entry.life);
        close();
        life.clients -= 1;
        if life.removed && life.clients == 0 {
            self.entry.deleted.send_replace(true);
        }
    }
}

impl Drop for ExportLease {
    fn drop(&mut self) {
        self.release(|| {});
    }
}
