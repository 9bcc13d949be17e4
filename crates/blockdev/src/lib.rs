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
mod claims;
mod commands;
mod events;
mod export;
pub mod mirror;
pub mod node;
mod snapshot;
pub mod transaction;

use std::io;
use std::sync::Arc;

use job::{Clock, JobRegistry, JobTxn, Spawn};
use qmp_api::{Event, QmpError};

pub use block_layer::BlockLayer;
pub use events::qmp_event;
#[cfg(feature = "tokio")]
pub use node::TokioBlockingPool;
pub use node::{
    BlockIo, Extent, ImageRef, InlineIo, IoPool, NodeFacts, NodeGraph, SyncBitmap, WriteTracker,
};

pub use claims::DrainWait;
use claims::NodeClaims;

/// Where QMP events go (the monitor broadcasts them). Called in order, possibly with the job
/// registry's lock held: queue the event and return, never call back into [`Blockdev`].
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// The version `query-version` reports: the QEMU release whose behaviour we match (clients
/// gate features on it) and our own package string.
pub const QEMU_VERSION: (i64, i64, i64) = (10, 0, 2);

/// The package string of `query-version`.
pub fn package_version() -> String {
    format!("blockjobd {}", env!("CARGO_PKG_VERSION"))
}

/// How long shutdown waits for cancelled jobs to stop before closing their nodes anyway.
const SHUTDOWN_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The commands the monitor answers itself (listed by `query-commands` too).
pub const MONITOR_COMMANDS: &[&str] = &["qmp_capabilities", "quit"];

/// The commands [`Blockdev`] implements; `query-commands` lists these plus
/// [`MONITOR_COMMANDS`].
pub const COMMANDS: &[&str] = &[
    "query-version",
    "query-commands",
    "query-qmp-schema",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-dismiss",
    "job-finalize",
    "query-jobs",
    "query-named-block-nodes",
    "blockdev-add",
    "blockdev-del",
    "query-block-jobs",
    "block-job-set-speed",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-dismiss",
    "block-job-finalize",
    "block-job-change",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "drive-backup",
    "blockdev-mirror",
    "blockdev-snapshot-sync",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "transaction",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
];

/// The state the commands and transaction actions work on.
pub struct BlockState {
    pub(crate) jobs: JobRegistry,
    pub(crate) claims: NodeClaims,
    pub(crate) graph: Option<Box<dyn NodeGraph>>,
    pub(crate) pool: Arc<dyn IoPool>,
    /// The shared job transaction of a grouped `transaction` being prepared.
    pub(crate) group: Option<JobTxn>,
    pub(crate) drain_wait: DrainWait,
    /// Jobs whose drained sections the running transaction's actions ended in `clean`, in that
    /// order; resumed together once every action is cleaned (see `transaction::run`).
    pub(crate) ended_drains: Vec<job::JobKey>,
    /// The NBD server and its exports.
    pub(crate) exports: export::NbdExports,
}

impl BlockState {
    /// A node by name, or QEMU's `Cannot find device=... nor node-name=...`.
    pub(crate) fn lookup(&self, name: &str) -> Result<Arc<dyn BlockIo>, QmpError> {
        self.graph
            .as_ref()
            .and_then(|g| g.node(name))
            .ok_or_else(|| node::not_found(name, name))
    }

    /// Ends a transaction action's drained section: its jobs are resumed with the others' once
    /// the whole transaction is cleaned.
    pub(crate) fn end_drain(&mut self, mut drain: claims::Drain) {
        self.ended_drains.extend(drain.take_held());
    }

    pub(crate) fn graph_mut(&mut self) -> Result<&mut Box<dyn NodeGraph>, QmpError> {
        self.graph
            .as_mut()
            .ok_or_else(|| QmpError::generic("No block layer is available"))
    }
}

/// A [`Blockdev`] shared by the monitor's dispatcher: commands run one at a time.
/// `execute`/`has_command` have the shape of the monitor's `QmpBackend`.
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
        if !COMMANDS.contains(&name) {
            return Err(QmpError::command_not_found(name));
        }
        qmp_api::dispatch(&mut *self.lock(), name, arguments)
    }

    /// Whether [`COMMANDS`] has `name`.
    pub fn has_command(&self, name: &str) -> bool {
        COMMANDS.contains(&name)
    }

    /// [`Blockdev::shutdown`].
    pub fn shutdown(&self) -> io::Result<()> {
        self.lock().shutdown()
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
    pub fn new(events: EventSink, spawn: Arc<dyn Spawn>, clock: Arc<dyn Clock>) -> Self {
        let exports = export::NbdExports::new(Arc::clone(&events));
        let sink = move |e: job::JobEvent| events(qmp_event(e));
        let jobs = JobRegistry::new(Arc::new(sink), spawn, clock);
        Blockdev {
            state: BlockState {
                jobs,
                claims: NodeClaims::default(),
                graph: None,
                pool: Arc::new(InlineIo),
                group: None,
                drain_wait: DrainWait::No,
                ended_drains: Vec::new(),
                exports,
            },
        }
    }

    /// The daemon's set-up: jobs on the current tokio runtime, block I/O on its blocking
    /// threads, the block crate's graph with its built-in drivers.
    #[cfg(feature = "tokio")]
    pub fn for_tokio(events: EventSink) -> Self {
        Blockdev::new(
            events,
            Arc::new(job::TokioSpawn),
            Arc::new(job::TokioClock::default()),
        )
        .with_graph(Box::new(BlockLayer::new(block::BlockGraph::new())))
        .with_io_pool(Arc::new(TokioBlockingPool))
        .with_drain_wait(DrainWait::UntilParked)
        .with_runtime(tokio::runtime::Handle::current())
    }

    /// Runs the NBD server (`nbd-server-start`) on `runtime`. Commands wait for it, so they
    /// must not run on a thread that drives `runtime` (a current-thread runtime's own thread).
    pub fn with_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.state.exports.set_runtime(runtime);
        self
    }

    /// How drains treat busy jobs (the daemon: [`DrainWait::UntilParked`]).
    pub fn with_drain_wait(mut self, wait: DrainWait) -> Self {
        self.state.drain_wait = wait;
        self
    }

    /// Uses `graph` for nodes (blockdev-add, lookups, images).
    pub fn with_graph(mut self, graph: Box<dyn NodeGraph>) -> Self {
        self.state.graph = Some(graph);
        self
    }

    /// Runs jobs' block I/O on `pool` (the daemon: [`TokioBlockingPool`]).
    pub fn with_io_pool(mut self, pool: Arc<dyn IoPool>) -> Self {
        self.state.pool = pool;
        self
    }

    /// The job registry (e.g. to wait for a job with [`JobRegistry::concluded`]).
    pub fn jobs(&self) -> &JobRegistry {
        &self.state.jobs
    }

    /// Daemon shutdown (`quit`, SIGTERM): stops the NBD server (its exports reported
    /// deleted), force-cancels every job (a job busy in a request
    /// stops at its next pause point; its later I/O fails on the closed nodes), then stores
    /// persistent bitmaps, flushes and closes every node. Returns the first error.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.state.exports.shutdown();
        let jobs = self.state.jobs.clone();
        if self.state.drain_wait == DrainWait::UntilParked {
            // Jobs run on other threads: let them stop before their nodes close. Cancelled
            // from a thread of its own, so the jobs woken are not queued behind this one.
            let stopper = std::thread::spawn(move || {
                let keys = jobs.cancel_all();
                let start = std::time::Instant::now();
                while start.elapsed() < SHUTDOWN_WAIT_LIMIT
                    && keys.iter().any(|k| {
                        !matches!(jobs.status(*k), None | Some(job::BlockJobStatus::Concluded))
                    })
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            let _ = stopper.join();
        } else {
            jobs.cancel_all();
        }
        self.close_retired_nodes();
        match self.state.graph.as_mut() {
            Some(graph) => graph.close_all(),
            None => Ok(()),
        }
    }
}
