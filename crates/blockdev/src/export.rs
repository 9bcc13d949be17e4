//! NBD exports of nodes (QEMU's `blockdev-nbd.c` and `block/export/export.c`):
//! `nbd-server-start`/`-stop`, `block-export-add`/`-del` and `BLOCK_EXPORT_DELETED`.
//! An export offers `base:allocation` (block status through the backing chain, as QEMU's
//! `bdrv_block_status_above`), and on request `qemu:allocation-depth` and
//! `qemu:dirty-bitmap:NAME` for each of its `bitmaps` (busy while exported).
//!
//! The server runs on a tokio runtime ([`crate::Blockdev::with_runtime`]); the commands wait
//! for it from the command thread, which must not be one of that runtime's workers driving
//! the wait itself (the daemon's dispatcher is a thread of its own). Clients' block I/O goes
//! through the node's [`BlockIo`] on tokio's blocking threads (the `nbd` crate calls its
//! [`ExportBackend`] there), so writes mark the node's dirty bitmaps.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use job::{EventSink, id_wellformed, strerror};
use nbd::{
    BlockStatus, Export, ExportBackend, ExportError, ListenAddr, NbdServer, RemoveMode,
    ServerConfig, StatusExtent,
};
use qmp_api::{
    BlockDirtyBitmapOrStr, BlockExportDelArguments, BlockExportDeletedData, BlockExportOptions,
    BlockExportOptionsBranch, BlockExportRemoveMode, Event, NbdServerOptionsLegacy, QmpError,
    SocketAddressLegacyBranch,
};
use tokio::runtime::Handle;

use crate::BlockState;
use crate::bitmaps::{BitmapCheck, check_bitmap, with_bitmap};
use crate::node::{self, BlockIo, NodeBitmaps, NodeGraph};
use crate::quiesce::{DrainedSection, ExportGate};

/// QEMU's `NBD_MAX_STRING_SIZE`: longest export name or description.
const MAX_STRING: usize = 4096;

/// How long stopping the server (shutdown) waits for its connections to close.
const STOP_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// One `block-export-add`ed export, until it is really gone.
#[derive(Clone)]
struct ExportRecord {
    id: String,
    /// The NBD export name.
    name: String,
    node: String,
    /// `block-export-del` was accepted; clients are still being disconnected.
    shutting_down: bool,
    /// Clients may write.
    writable: bool,
    /// The bitmaps exported (busy until the export is gone).
    bitmaps: Vec<ExportedBitmap>,
}

/// A dirty bitmap an export offers as `qemu:dirty-bitmap:NAME`.
#[derive(Clone)]
struct ExportedBitmap {
    node: Arc<dyn NodeBitmaps>,
    name: String,
}

impl ExportedBitmap {
    /// The bitmap is usable by other operations again (the export is gone).
    fn release(&self) {
        let _ = with_bitmap(self.node.as_ref(), &self.name, |b| {
            b.set_busy(false);
            Ok(())
        });
    }
}

impl BlockStatus for ExportedBitmap {
    /// Clean and dirty runs (QEMU's `bitmap_to_extents`): dirty ranges as the bitmap records
    /// them, cut to the range asked for.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        let end = offset + len;
        let ranges = with_bitmap(self.node.as_ref(), &self.name, |b| {
            Ok(b.dirty_ranges(offset, end).collect::<Vec<_>>())
        })
        .map_err(|e| io::Error::other(e.desc))?;
        let mut extents = Vec::with_capacity(2 * ranges.len() + 1);
        let mut at = offset;
        for (start, length) in ranges {
            if start > at {
                extents.push(StatusExtent {
                    length: start - at,
                    flags: 0,
                });
            }
            extents.push(StatusExtent {
                length,
                flags: nbd::wire::STATE_DIRTY,
            });
            at = start + length;
        }
        if at < end {
            extents.push(StatusExtent {
                length: end - at,
                flags: 0,
            });
        }
        Ok(extents)
    }
}

/// The NBD server and the exports on it.
pub(crate) struct NbdExports {
    runtime: Option<Handle>,
    server: Option<NbdServer>,
    /// Newest first, as QEMU lists them. Shared with the tasks that wait for a deletion.
    records: Arc<Mutex<Vec<ExportRecord>>>,
    events: Arc<dyn EventSink>,
    /// Every export's requests pass it; a transaction holds it closed.
    gate: Arc<ExportGate>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn deleted_event(id: String) -> Event {
    Event::BlockExportDeleted(BlockExportDeletedData { id })
}

/// Runs `future` on `runtime` and waits for it from this (non-worker) thread.
fn wait_on<F>(runtime: &Handle, future: F, limit: Option<Duration>) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    match limit {
        Some(limit) => rx.recv_timeout(limit).ok(),
        None => rx.recv().ok(),
    }
}

impl NbdExports {
    pub(crate) fn new(events: Arc<dyn EventSink>) -> NbdExports {
        NbdExports {
            runtime: None,
            server: None,
            records: Arc::default(),
            events,
            gate: Arc::default(),
        }
    }

    pub(crate) fn set_runtime(&mut self, runtime: Handle) {
        self.runtime = Some(runtime);
    }

    /// Holds every export's requests (waiting for those under way) until the section drops:
    /// what a transaction does first (QEMU's `bdrv_drain_all`, atomic in its main loop).
    /// The wait is QEMU's drain poll: events of the requests it waits for pass meanwhile.
    pub(crate) fn drain(&self) -> DrainedSection {
        let _polling = self.events.polling();
        self.gate.drain()
    }

    /// `query-block-exports`: newest first; an export deleted while clients are still
    /// connected is shutting down.
    pub(crate) fn query(&self) -> Vec<qmp_api::BlockExportInfo> {
        lock(&self.records)
            .iter()
            .map(|r| qmp_api::BlockExportInfo {
                id: r.id.clone(),
                r#type: qmp_api::BlockExportType::Nbd,
                node_name: r.node.clone(),
                shutting_down: r.shutting_down,
            })
            .collect()
    }

    /// The exported nodes and whether each export is writable, newest first (the block
    /// backends of `x-debug-query-block-graph`).
    pub(crate) fn backends(&self) -> Vec<(String, bool)> {
        lock(&self.records)
            .iter()
            .map(|r| (r.node.clone(), r.writable))
            .collect()
    }

    /// Whether an export uses `node` (QEMU: it has a block backend).
    pub(crate) fn is_exported(&self, node: &str) -> bool {
        lock(&self.records).iter().any(|r| r.node == node)
    }

    /// `nbd-server-start`.
    pub(crate) fn start(&mut self, args: NbdServerOptionsLegacy) -> Result<(), QmpError> {
        if self.server.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        if let Some(creds) = &args.tls_creds {
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{creds}'"
            )));
        }
        if args.tls_authz.is_some() {
            return Err(QmpError::generic("tls-authz is not supported without TLS"));
        }
        let addr = match args.addr.branch {
            SocketAddressLegacyBranch::Unix(w) => {
                if w.data.r#abstract == Some(true) {
                    return Err(QmpError::generic("Abstract unix sockets are not supported"));
                }
                ListenAddr::Unix(w.data.path.into())
            }
            SocketAddressLegacyBranch::Inet(w) => {
                let port = w.data.port.parse::<u16>().map_err(|_| {
                    QmpError::generic(format!(
                        "address resolution failed for {}:{}: Servname not supported for \
                         ai_socktype",
                        w.data.host, w.data.port
                    ))
                })?;
                ListenAddr::Tcp {
                    host: w.data.host,
                    port,
                }
            }
            SocketAddressLegacyBranch::Vsock(_) => {
                return Err(QmpError::generic("vsock sockets are not supported"));
            }
            SocketAddressLegacyBranch::Fd(_) => {
                return Err(QmpError::generic(
                    "only QEMU supports file descriptor passing",
                ));
            }
        };
        let config = ServerConfig {
            max_connections: args.max_connections.unwrap_or(0),
            handshake_timeout: match args.handshake_max_seconds {
                Some(0) => None,
                Some(seconds) => Some(Duration::from_secs(u64::from(seconds))),
                None => ServerConfig::default().handshake_timeout,
            },
        };
        let runtime = self.runtime()?;
        let bind_addr = addr.clone();
        let started = wait_on(
            &runtime,
            async move { NbdServer::start(&bind_addr, config).await },
            None,
        )
        .ok_or_else(|| QmpError::generic("The NBD server could not be started"))?;
        let server = started.map_err(|e| match &addr {
            ListenAddr::Unix(path) => QmpError::generic(format!(
                "Failed to bind socket to {}: {}",
                path.display(),
                strerror(&e)
            )),
            ListenAddr::Tcp { .. } => {
                QmpError::generic(format!("Failed to bind socket: {}", strerror(&e)))
            }
        })?;
        self.server = Some(server);
        Ok(())
    }

    /// `nbd-server-stop`: every export goes (clients disconnected), each reported deleted,
    /// then the server stops listening.
    pub(crate) fn stop(&mut self) -> Result<(), QmpError> {
        let server = self
            .server
            .take()
            .ok_or_else(|| QmpError::generic("NBD server not running"))?;
        self.stop_server(server, None);
        Ok(())
    }

    /// Shutdown: stops the server if it runs, waiting a bounded time for its clients.
    pub(crate) fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            self.stop_server(server, Some(STOP_WAIT_LIMIT));
        }
    }

    fn stop_server(&mut self, server: NbdServer, limit: Option<Duration>) {
        match &self.runtime {
            Some(runtime) => {
                // QEMU polls until every export has closed: their events pass meanwhile.
                let _polling = self.events.polling();
                let _ = wait_on(runtime, server.stop(), limit);
            }
            None => drop(server),
        }
        let gone = std::mem::take(&mut *lock(&self.records));
        for record in gone {
            record.bitmaps.iter().for_each(ExportedBitmap::release);
            self.events.emit(deleted_event(record.id));
        }
    }

    fn runtime(&self) -> Result<Handle, QmpError> {
        self.runtime
            .clone()
            .ok_or_else(|| QmpError::generic("NBD exports need an async runtime"))
    }
}

/// `block-export-add`, checks in QEMU's order.
pub(crate) fn add(state: &mut BlockState, args: BlockExportOptions) -> Result<(), QmpError> {
    if !id_wellformed(&args.id) {
        return Err(QmpError::generic("Invalid block export id"));
    }
    if lock(&state.exports.records).iter().any(|r| r.id == args.id) {
        return Err(QmpError::generic(format!(
            "Block export id '{}' is already in use",
            args.id
        )));
    }
    let options = match args.branch {
        BlockExportOptionsBranch::Nbd(options) => options,
        other => {
            return Err(QmpError::generic(format!(
                "Block export type '{}' is not supported",
                other.kind()
            )));
        }
    };
    let io = state
        .graph
        .as_ref()
        .and_then(|g| g.node(&args.node_name))
        .ok_or_else(|| node::not_found("", &args.node_name))?;
    let writable = args.writable.unwrap_or(false);
    let read_only = state
        .graph
        .as_ref()
        .and_then(|g| g.node_facts(&args.node_name))
        .is_some_and(|facts| facts.read_only);
    if writable && read_only {
        return Err(QmpError::generic(
            "Cannot export read-only node as writable",
        ));
    }
    if let Some(iothread) = &args.iothread
        && !state.objects.is_iothread(iothread)
    {
        // An existing iothread is accepted: the export's I/O runs on the daemon's I/O pool
        // whichever iothread is named (see `objects`).
        return Err(QmpError::generic(format!(
            "iothread \"{iothread}\" not found"
        )));
    }
    // An export keeps its node active unless it may stay on an inactive one (QEMU's
    // `allow-inactive`); this block layer lets only a read-only export do that.
    if args.allow_inactive == Some(true) {
        if writable {
            return Err(QmpError::generic(
                "Parameter 'allow-inactive' is not supported for a writable export by this \
                 block layer",
            ));
        }
    } else if let Some(graph) = state.graph.as_mut()
        && !graph.is_active(&args.node_name)
    {
        graph.set_active(Some(&args.node_name), true)?;
    }
    let Some(server) = state.exports.server.as_ref() else {
        return Err(QmpError::generic("NBD server not running"));
    };
    let name = options.name.unwrap_or_else(|| args.node_name.clone());
    if name.len() > MAX_STRING {
        return Err(QmpError::generic(format!("export name '{name}' too long")));
    }
    let description = options.description.unwrap_or_default();
    if description.len() > MAX_STRING {
        return Err(QmpError::generic(format!(
            "description '{description}' too long"
        )));
    }
    if server.export_names().contains(&name) {
        return Err(QmpError::generic(format!(
            "NBD server already has export named '{name}'"
        )));
    }
    let bitmaps = match options.bitmaps {
        Some(bitmaps) if !bitmaps.is_empty() => {
            let graph = state
                .graph
                .as_deref()
                .ok_or_else(|| QmpError::generic("Dirty bitmaps need the block layer"))?;
            exported_bitmaps(graph, &args.node_name, bitmaps, !writable)?
        }
        _ => Vec::new(),
    };
    let allocation_depth = options.allocation_depth == Some(true);
    if allocation_depth && io.chain_status(0, 0).is_none() {
        return Err(QmpError::generic(
            "Exporting qemu:allocation-depth needs the block layer",
        ));
    }
    // The export is a parent of the node that a mirror's pivot moves (QEMU's BlockBackend).
    let io = match state.graph.as_ref() {
        // QEMU's export BlockBackend has no name: permission errors call it so.
        Some(g) => g.backend(&args.node_name, "an unnamed block device", writable)?,
        None => io,
    };
    let backend = Arc::new(NodeExport {
        io: io.clone(),
        gate: state.exports.gate.clone(),
    });
    let mut export = Export::new(name.clone(), backend)
        .writable(writable)
        .writethrough(args.writethrough == Some(true))
        .description(description);
    if allocation_depth {
        export = export.meta_context(nbd::wire::ALLOCATION_DEPTH, Arc::new(AllocationDepth(io)));
    }
    for bitmap in &bitmaps {
        let context = format!("{}{}", nbd::wire::DIRTY_BITMAP_PREFIX, bitmap.name);
        export = export.meta_context(context, Arc::new(bitmap.clone()));
    }
    for bitmap in &bitmaps {
        let _ = with_bitmap(bitmap.node.as_ref(), &bitmap.name, |b| {
            b.set_busy(true);
            Ok(())
        });
    }
    server.add_export(export).map_err(|e| {
        bitmaps.iter().for_each(ExportedBitmap::release);
        match e {
            ExportError::DuplicateName(name) => {
                QmpError::generic(format!("NBD server already has export named '{name}'"))
            }
            ExportError::DuplicateContext(context) => {
                let name = context.trim_start_matches(nbd::wire::DIRTY_BITMAP_PREFIX);
                QmpError::generic(format!(
                    "Bitmap '{name}' is currently in use by another operation and cannot be used"
                ))
            }
            other => QmpError::generic(other.to_string()),
        }
    })?;
    lock(&state.exports.records).insert(
        0,
        ExportRecord {
            id: args.id,
            name,
            node: args.node_name,
            shutting_down: false,
            writable,
            bitmaps,
        },
    );
    Ok(())
}

/// `block-export-del`: the export is gone for new clients at once; `BLOCK_EXPORT_DELETED`
/// comes when its last client has gone (before the reply if it had none).
/// `nbd-server-add` (deprecated): `block-export-add` of an NBD export whose id and name are
/// `name` (default: the device), as QEMU builds it. A read-only node is exported read-only
/// even when `writable` asks otherwise, as QEMU does for this command.
pub(crate) fn nbd_server_add(
    state: &mut BlockState,
    args: qmp_api::NbdServerAddOptions,
) -> Result<(), QmpError> {
    state
        .graph
        .as_ref()
        .and_then(|g| g.node(&args.device))
        .ok_or_else(|| node::not_found(&args.device, &args.device))?;
    if state.exports.server.is_none() {
        return Err(QmpError::generic("NBD server not running"));
    }
    let read_only = state
        .graph
        .as_ref()
        .and_then(|g| g.node_facts(&args.device))
        .is_some_and(|facts| facts.read_only);
    let name = args.name.unwrap_or_else(|| args.device.clone());
    let mut options = serde_json::json!({
        "type": "nbd", "id": name, "node-name": args.device, "name": name,
    });
    if let Some(description) = args.description {
        options["description"] = description.into();
    }
    if let Some(bitmap) = args.bitmap {
        options["bitmaps"] = serde_json::json!([bitmap]);
    }
    if let Some(writable) = args.writable {
        options["writable"] = (writable && !read_only).into();
    }
    add(state, qmp_api::input::from_value(&options)?)
}

/// `nbd-server-remove` (deprecated): `block-export-del` of an NBD export by its id.
pub(crate) fn nbd_server_remove(
    state: &mut BlockState,
    args: qmp_api::NbdServerRemoveArguments,
) -> Result<(), QmpError> {
    del(
        state,
        BlockExportDelArguments {
            id: args.name,
            mode: args.mode,
        },
    )
}

pub(crate) fn del(state: &mut BlockState, args: BlockExportDelArguments) -> Result<(), QmpError> {
    let exports = &mut state.exports;
    let record = lock(&exports.records)
        .iter()
        .find(|r| r.id == args.id)
        .cloned()
        .ok_or_else(|| QmpError::generic(format!("Export '{}' is not found", args.id)))?;
    if record.shutting_down {
        return Err(QmpError::generic(format!(
            "Export '{}' is already shutting down",
            args.id
        )));
    }
    let mode = match args.mode.unwrap_or(BlockExportRemoveMode::Safe) {
        BlockExportRemoveMode::Safe => RemoveMode::Safe,
        BlockExportRemoveMode::Hard => RemoveMode::Hard,
    };
    let server = exports
        .server
        .as_ref()
        .ok_or_else(|| QmpError::generic(format!("Export '{}' is not found", args.id)))?;
    let deletion = server
        .remove_export(&record.name, mode)
        .map_err(|e| match e {
            ExportError::InUse { .. } => {
                QmpError::generic(format!("export '{}' still in use", args.id))
            }
            other => QmpError::generic(other.to_string()),
        })?;
    if deletion.is_complete() {
        finish_deletion(&exports.records, &exports.events, &record.id);
        return Ok(());
    }
    if let Some(r) = lock(&exports.records)
        .iter_mut()
        .find(|r| r.id == record.id)
    {
        r.shutting_down = true;
    }
    let records = Arc::clone(&exports.records);
    let events = Arc::clone(&exports.events);
    let runtime = exports.runtime()?;
    runtime.spawn(async move {
        deletion.wait().await;
        finish_deletion(&records, &events, &record.id);
    });
    Ok(())
}

/// Forgets export `id`, releases its bitmaps and reports it deleted, unless that already
/// happened (server stop).
fn finish_deletion(records: &Mutex<Vec<ExportRecord>>, events: &Arc<dyn EventSink>, id: &str) {
    let removed = {
        let mut records = lock(records);
        records
            .iter()
            .position(|r| r.id == id)
            .map(|i| records.remove(i))
    };
    if let Some(record) = removed {
        record.bitmaps.iter().for_each(ExportedBitmap::release);
        events.emit(deleted_event(id.to_string()));
    }
}

/// The bitmaps of `block-export-add`'s `bitmaps`, checked in QEMU's order (`nbd_export_create`):
/// a name alone is looked for on the node and then down its chain; an enabled bitmap on a
/// writable node cannot be exported read-only (it would change under the client); a busy or
/// inconsistent one cannot be exported.
fn exported_bitmaps(
    graph: &dyn NodeGraph,
    top: &str,
    bitmaps: Vec<BlockDirtyBitmapOrStr>,
    read_only_export: bool,
) -> Result<Vec<ExportedBitmap>, QmpError> {
    let mut found = Vec::with_capacity(bitmaps.len());
    for bitmap in bitmaps {
        let (node, name) = match bitmap {
            BlockDirtyBitmapOrStr::Local(name) => {
                let node = graph
                    .chain_bitmaps(top)
                    .into_iter()
                    .find(|layer| layer.list().iter().any(|b| b.name() == Some(&name)))
                    .ok_or_else(|| QmpError::generic(format!("Bitmap '{name}' is not found")))?;
                let enabled =
                    with_bitmap(node.as_ref(), &name, |b| Ok(b.is_enabled())).unwrap_or(false);
                if read_only_export && !node.read_only() && enabled {
                    return Err(QmpError::generic(format!(
                        "Enabled bitmap '{name}' incompatible with readonly export"
                    )));
                }
                (node, name)
            }
            BlockDirtyBitmapOrStr::External(b) => {
                let node = crate::bitmaps::lookup(graph, &b.node, &b.name)?;
                (node, b.name)
            }
        };
        with_bitmap(node.as_ref(), &name, |b| {
            check_bitmap(b, BitmapCheck::AllowReadOnly)
        })?;
        found.push(ExportedBitmap { node, name });
    }
    Ok(found)
}

/// `qemu:allocation-depth`: which layer of the chain allocates each range (0: none).
struct AllocationDepth(Arc<dyn BlockIo>);

impl BlockStatus for AllocationDepth {
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        let status = self
            .0
            .chain_status(offset, len)
            .unwrap_or_else(|| Err(io::Error::other("no backing chain here")))?;
        Ok(vec![StatusExtent {
            length: status.len,
            flags: status.depth,
        }])
    }
}

/// A node as an NBD export's storage: every request goes through the node, so writes mark
/// its dirty bitmaps. Block status looks through the backing chain where the graph can (the
/// block layer's nodes); elsewhere (test graphs), at the node's own layer.
struct NodeExport {
    io: Arc<dyn BlockIo>,
    /// Requests wait here while a transaction runs.
    gate: Arc<ExportGate>,
}

impl ExportBackend for NodeExport {
    fn size(&self) -> u64 {
        self.io.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _pass = self.gate.enter();
        self.io.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _pass = self.gate.enter();
        self.io.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let _pass = self.gate.enter();
        self.io.write_zeroes(offset, len)
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<()> {
        let _pass = self.gate.enter();
        self.io.write_zeroes_fast(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        let _pass = self.gate.enter();
        self.io.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _pass = self.gate.enter();
        self.io.discard(offset, len)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<nbd::Extent>> {
        if let Some(status) = self.io.chain_status(offset, len) {
            let status = status?;
            return Ok(vec![nbd::Extent {
                length: status.len,
                hole: !status.data,
                zero: status.zero,
            }]);
        }
        let status = self.io.block_status(offset, len)?;
        let length = if status.len == 0 {
            len
        } else {
            status.len.min(len)
        };
        Ok(vec![nbd::Extent {
            length,
            // Data from a backing file is not a hole for the client.
            hole: !status.allocated && status.zero,
            zero: status.zero,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_ids_follow_qemu_id_rules() {
        assert!(id_wellformed("e0"));
        assert!(id_wellformed("a-b.c_d"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("1bad"));
        assert!(!id_wellformed("a b"));
    }

    #[test]
    fn strerror_drops_the_os_error_suffix() {
        let enoent = io::Error::from_raw_os_error(2);
        assert_eq!(strerror(&enoent), "No such file or directory");
    }
}
