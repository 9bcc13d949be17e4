//! blockdev: the daemon's QMP block command layer (named after QEMU's `blockdev.c`). It
//! implements the generated [`qmp_api::Commands`] over the job registry and the node graph:
//! job verbs and queries, `transaction` and its actions, backup and mirror jobs, snapshots and
//! bitmap commands, and turns job events into QMP events for the monitor.
//!
//! ```text
//! let blockdev = Blockdev::new(events, spawn, clock).with_graph(graph).with_io_pool(pool);
//! qmp_api::dispatch(&mut blockdev, "query-jobs", None)
//! ```

mod actions;
pub mod backup;
mod bitmaps;
pub mod block_layer;
mod busy;
mod chardev;
mod claims;
mod commands;
pub mod commit;
mod create;
mod events;
mod export;
mod inspect;
mod io_threads;
pub mod mirror;
mod mirror_top;
pub mod node;
mod nodes;
mod objects;
mod qom;
mod quiesce;
mod snapshot;
pub mod stream;
pub mod transaction;
mod writeback;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use job::{Clock, EventSink, JobRegistry, Spawn};
use qmp_api::QmpError;

pub use block_layer::BlockLayer;
pub use events::block_event_sink;
pub use io_threads::IoThreads;
pub use node::{
    BlockIo, ChainEditor, ChainLayer, CopyBuffers, CreateRun, CreateWork, Extent, FilterWrites,
    GraphEdge, GraphNode, ImageRef, InlineIo, IoPool, MirrorNodes, MirrorTargetImage, NodeBitmaps,
    NodeFacts, NodeGraph, WriteTracker,
};

use claims::NodeClaims;

/// The version `query-version` reports: the QEMU release whose behaviour we match (clients
/// gate features on it) and our own package string.
pub const QEMU_VERSION: (i64, i64, i64) = (10, 0, 2);

/// The package string of `query-version`.
pub fn package_version() -> String {
    format!("blockjobd {}", env!("CARGO_PKG_VERSION"))
}

/// What `query-version` answers and the monitor's greeting shows.
pub fn version_info() -> qmp_api::VersionInfo {
    let (major, minor, micro) = QEMU_VERSION;
    qmp_api::VersionInfo {
        qemu: qmp_api::VersionTriple {
            major,
            minor,
            micro,
        },
        package: package_version(),
    }
}

/// How long shutdown waits for cancelled jobs to stop before closing their nodes anyway.
const SHUTDOWN_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// The state the commands and transaction actions work on.
pub struct BlockState {
    pub(crate) jobs: JobRegistry,
    pub(crate) claims: NodeClaims,
    pub(crate) graph: Option<Box<dyn NodeGraph>>,
    pub(crate) pool: Arc<dyn IoPool>,
    pub(crate) buffers: Arc<CopyBuffers>,
    /// The NBD server and its exports.
    pub(crate) exports: export::NbdExports,
    /// Mirrors' shared state, for `block-job-change` and `block-job-complete` (held by each
    /// job and its filter; gone with them).
    pub(crate) mirrors:
        std::collections::HashMap<job::JobKey, std::sync::Weak<mirror::MirrorShared>>,
    /// The nodes' write thresholds.
    pub(crate) thresholds: nodes::WriteThresholds,
    /// Where events the command layer emits go (write thresholds).
    pub(crate) events: Arc<dyn EventSink>,
    /// `object-add`'s objects (`/objects`).
    pub(crate) objects: objects::Objects,
    /// Character devices (`/chardevs`).
    pub(crate) chardevs: chardev::Chardevs,
}

impl BlockState {
    /// A node by name, or QEMU's `Cannot find device=... nor node-name=...`.
    pub(crate) fn lookup(&self, name: &str) -> Result<Arc<dyn BlockIo>, QmpError> {
        self.graph
            .as_ref()
            .and_then(|g| g.node(name))
            .ok_or_else(|| node::not_found(name, name))
    }

    pub(crate) fn graph_mut(&mut self) -> Result<&mut Box<dyn NodeGraph>, QmpError> {
        self.graph
            .as_mut()
            .ok_or_else(|| QmpError::generic("No block layer is available"))
    }

    #[cfg(test)]
    pub(crate) fn for_tests() -> BlockState {
        let events: Arc<dyn EventSink> = Arc::new(|_: qmp_api::Event| {});
        Blockdev::new(
            events,
            Arc::new(job::manual::ManualExecutor::new()),
            Arc::new(job::manual::ManualClock::new()),
        )
        .state
    }
}

/// A [`Blockdev`] shared by the monitor's dispatcher: commands run one at a time.
pub struct SharedBlockdev(std::sync::Mutex<Blockdev>);

impl SharedBlockdev {
    pub fn new(blockdev: Blockdev) -> Self {
        SharedBlockdev(std::sync::Mutex::new(blockdev))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Blockdev> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a command (`arguments: None` is `{}`), answering like QEMU.
    pub fn execute(
        &self,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<serde_json::Value, QmpError> {
        let mut blockdev = self.lock();
        // Nodes that only finished jobs held (a mirror's filter) go before the next command.
        blockdev.close_retired_nodes();
        qmp_api::dispatch(&mut *blockdev, name, arguments)
    }

    /// [`Blockdev::register_monitor_chardev`].
    pub fn register_monitor_chardev(&self, id: &str, filename: &str) {
        self.lock().register_monitor_chardev(id, filename);
    }

    /// [`Blockdev::shutdown`].
    pub fn shutdown(&self) -> io::Result<()> {
        self.lock().shutdown()
    }

    /// [`Blockdev::stop_jobs`].
    pub fn stop_jobs(&self) -> bool {
        self.lock().stop_jobs()
    }

    /// [`Blockdev::close_images`].
    pub fn close_images(&self) -> io::Result<()> {
        self.lock().close_images()
    }

    /// The job registry (for waiting on jobs).
    pub fn jobs(&self) -> JobRegistry {
        self.lock().jobs().clone()
    }
}

/// The QMP block command layer of the daemon.
pub struct Blockdev {
    state: BlockState,
}

impl std::fmt::Debug for Blockdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blockdev").finish_non_exhaustive()
    }
}

impl Blockdev {
    /// A command layer with no nodes yet: events go to `events`, jobs run on `spawn`, rate
    /// limits use `clock`; block I/O runs inline until [`Blockdev::with_io_pool`].
    pub fn new(events: Arc<dyn EventSink>, spawn: Arc<dyn Spawn>, clock: Arc<dyn Clock>) -> Self {
        let exports = export::NbdExports::new(Arc::clone(&events));
        let jobs = JobRegistry::new(events.clone(), spawn, clock);
        Blockdev {
            state: BlockState {
                jobs,
                claims: NodeClaims::default(),
                graph: None,
                pool: Arc::new(InlineIo),
                buffers: Arc::new(CopyBuffers::default()),
                exports,
                mirrors: std::collections::HashMap::new(),
                thresholds: nodes::WriteThresholds::default(),
                events,
                objects: objects::Objects::new(block::throttle::ThrottleGroups::default()),
                chardevs: chardev::Chardevs::default(),
            },
        }
    }

    /// The daemon's set-up: jobs on the current tokio runtime, block I/O on [`IoThreads`],
    /// the block crate's graph with its built-in drivers.
    #[cfg(feature = "tokio")]
    pub fn for_tokio(events: Arc<dyn EventSink>) -> Self {
        let mut graph = block::BlockGraph::new();
        graph.set_event_sink(events::block_event_sink(events.clone()));
        Blockdev::new(
            events,
            Arc::new(job::TokioSpawn),
            Arc::new(job::TokioClock::default()),
        )
        .with_block_graph(graph)
        .with_io_pool(Arc::new(IoThreads::default()))
        .with_runtime(tokio::runtime::Handle::current())
    }

    /// Runs the NBD server (`nbd-server-start`) on `runtime`. Commands wait for it, so they
    /// must not run on a thread that drives `runtime` (a current-thread runtime's own thread).
    pub fn with_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.state.exports.set_runtime(runtime.clone());
        self.state.chardevs.set_runtime(runtime);
        self
    }

    /// Uses the block crate's `graph` for nodes, sharing the throttle groups of the
    /// `throttle-group` objects with its `throttle` driver.
    pub fn with_block_graph(mut self, graph: block::BlockGraph) -> Self {
        let groups = block::throttle::ThrottleGroups::default();
        self.state.objects = objects::Objects::new(groups.clone());
        self.with_graph(Box::new(BlockLayer::new(
            graph.with_throttle_groups(groups),
        )))
    }

    /// Registers the chardev of a `--monitor` (listed by `query-chardev`, never removable);
    /// `filename` is QEMU's text for it (`unix:PATH,server=on`).
    pub fn register_monitor_chardev(&mut self, id: &str, filename: &str) {
        self.state.chardevs.register_monitor(id, filename);
    }

    /// Uses `graph` for nodes (blockdev-add, lookups, images).
    pub fn with_graph(mut self, graph: Box<dyn NodeGraph>) -> Self {
        if let Some(buffers) = graph.copy_buffers() {
            self.state.buffers = buffers;
        }
        self.state.graph = Some(graph);
        self
    }

    /// Runs jobs' block I/O on `pool` (the daemon: [`IoThreads`]).
    pub fn with_io_pool(mut self, pool: Arc<dyn IoPool>) -> Self {
        self.state.pool = pool;
        self
    }

    /// The job registry (e.g. to wait for a job with [`JobRegistry::concluded`]).
    pub fn jobs(&self) -> &JobRegistry {
        &self.state.jobs
    }

    /// The copy buffers the jobs share.
    pub fn copy_buffers(&self) -> &Arc<CopyBuffers> {
        &self.state.buffers
    }

    /// Daemon shutdown (`quit`, SIGTERM): [`Self::stop_jobs`], then [`Self::close_images`].
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.stop_jobs();
        self.close_images()
    }

    /// The first half of shutdown, run while the monitors are still open (their clients
    /// see the events): stops the NBD server (its exports reported deleted), then pauses
    /// every job and cancels them one at a time, newest first, each waited for until it has
    /// concluded (QSD's `bdrv_drain_all_begin` and `job_cancel_sync_all`, see
    /// [`JobRegistry::cancel_all_sync`]; bounded). Returns whether every job ended.
    pub fn stop_jobs(&mut self) -> bool {
        self.state.exports.shutdown();
        let ended = self.state.jobs.cancel_all_sync(SHUTDOWN_WAIT_LIMIT);
        if !ended {
            tracing::warn!("shutdown: some jobs did not stop in time; closing their nodes anyway");
        }
        ended
    }

    /// The second half of shutdown: stores persistent bitmaps, flushes and closes every
    /// node. Returns the first error.
    pub fn close_images(&mut self) -> io::Result<()> {
        self.close_retired_nodes();
        match self.state.graph.as_mut() {
            Some(graph) => graph.close_all(),
            None => Ok(()),
        }
    }
}
