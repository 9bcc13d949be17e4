//! What the command layer needs from the block layer: the node graph (look nodes up, add and
//! delete them, list them, flush them) and each node's I/O. `crates/block` provides the real
//! graph; the daemon hands it over with [`crate::Blockdev::with_graph`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use qmp_api::{BlockDeviceInfo, BlockdevDelArguments, BlockdevOptions, QmpError};

/// How a range of a node reads, as far as its format knows (`block_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the queried offset with the same state (at least 1 unless at the end).
    pub len: u64,
    /// Allocated in this node's own layer (false: comes from the backing chain, or nowhere).
    pub allocated: bool,
    /// Reads as zeroes (through the backing chain).
    pub zero: bool,
}

/// An image file and its format, as QEMU names a backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The file name (absolute when QEMU would write it so).
    pub filename: String,
    /// The format driver (`qcow2`, `raw`).
    pub format: String,
}

/// A node's data, as a job reads and writes it. Calls block: jobs run them on an [`IoPool`].
pub trait BlockIo: Send + Sync {
    /// The format driver's name (`qcow2`, `raw`, ...).
    fn format(&self) -> &str;
    /// The image this node reads (its file and format).
    fn image(&self) -> ImageRef;
    /// The image of its backing node, if it has one.
    fn backing_image(&self) -> Option<ImageRef>;
    /// The name of its backing node, if it has one.
    fn backing_node(&self) -> Option<String> {
        None
    }
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The state of the range starting at `offset` (at most `len` bytes).
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent>;
    /// Makes everything written so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Runs `hook` before every write to the node until the handle drops (a backup's
    /// copy-before-write); `None` if the node cannot.
    fn add_write_notifier(
        &self,
        _hook: Arc<dyn block::BeforeWrite>,
    ) -> Option<block::NotifierHandle> {
        None
    }
}

/// A dirty bitmap as a backup job uses it (QEMU's successor protocol).
pub trait SyncBitmap: Send + Sync {
    /// QEMU's `bdrv_dirty_bitmap_check`: busy, inconsistent, or read-only (unless allowed).
    fn check_usable(&self, allow_read_only: bool) -> Result<(), QmpError>;
    /// Freezes the bitmap (busy); an anonymous successor records new writes from now on.
    fn freeze(&self) -> Result<(), QmpError>;
    /// The frozen bitmap's dirty ranges `(offset, len)`, in order, granularity aligned.
    fn dirty_ranges(&self) -> Vec<(u64, u64)>;
    /// The successor replaces the bitmap (the frozen bits are dropped), which is usable again.
    fn abdicate(&self);
    /// The successor is merged back into the bitmap (nothing lost), which is usable again.
    fn reclaim(&self);
    /// Marks `[offset, offset + len)` dirty (bits a failed job did not copy).
    fn mark_dirty(&self, offset: u64, len: u64);
}

/// Records writes to a node while a mirror runs (an anonymous dirty bitmap).
pub trait WriteTracker: Send + Sync {
    /// The ranges written since the last call, `(offset, len)` in order; forgets them.
    fn take_dirty(&self) -> Vec<(u64, u64)>;
    /// Stops recording.
    fn stop(&self);
}

/// The node graph, as the QMP command layer uses it.
pub trait NodeGraph: Send {
    /// The I/O of the node named `name`, if it exists.
    fn node(&self, name: &str) -> Option<Arc<dyn BlockIo>>;
    /// The bitmap `name` of node `node`, if both exist.
    fn dirty_bitmap(&self, node: &str, name: &str) -> Option<Arc<dyn SyncBitmap>>;
    /// Creates an image file (`drive-backup`, `blockdev-snapshot-sync`) of `size` bytes,
    /// with `backing` written into its header.
    fn create_image(
        &mut self,
        image: &ImageRef,
        size: u64,
        backing: Option<&ImageRef>,
    ) -> Result<(), QmpError>;
    /// Opens an image read-write as a node of its own (a `drive-backup` target), with the node
    /// `backing` as its backing (QEMU opens it without its own and attaches that); returns the
    /// node's name and I/O.
    fn open_image(
        &mut self,
        image: &ImageRef,
        backing: Option<&str>,
    ) -> Result<(String, Arc<dyn BlockIo>), QmpError>;
    /// `blockdev-add`.
    fn blockdev_add(&mut self, options: BlockdevOptions) -> Result<(), QmpError>;
    /// `blockdev-del`.
    fn blockdev_del(&mut self, args: BlockdevDelArguments) -> Result<(), QmpError>;
    /// `query-named-block-nodes`.
    fn query_named_block_nodes(&self, flat: bool) -> Result<Vec<BlockDeviceInfo>, QmpError>;
    /// What snapshots need to know about a node, if it exists.
    fn node_facts(&self, _name: &str) -> Option<NodeFacts> {
        None
    }
    /// Opens `image` as node `node_name` without opening its backing file (a new overlay).
    fn open_overlay(&mut self, image: &ImageRef, node_name: &str) -> Result<(), QmpError> {
        let _ = (image, node_name);
        Err(unsupported("external snapshots"))
    }
    /// QEMU's `bdrv_append`: `overlay` gets `node` as its backing and takes `node`'s place
    /// for every parent of `node`.
    fn insert_overlay(&mut self, node: &str, overlay: &str) -> Result<(), QmpError> {
        let _ = (node, overlay);
        Err(unsupported("external snapshots"))
    }
    /// Undoes [`NodeGraph::insert_overlay`].
    fn remove_overlay(&mut self, _node: &str, _overlay: &str) {}
    /// Reopens `node` read-only (the old top of a snapshot).
    fn make_read_only(&mut self, _node: &str) {}
    /// Closes `node` if nothing uses it (an overlay only the transaction held).
    fn release_if_unused(&mut self, _node: &str) {}
    /// The names of the node's internal snapshots; `None` if its format has none.
    fn internal_snapshots(&self, _node: &str) -> Option<Vec<String>> {
        None
    }
    /// Creates internal snapshot `name`.
    fn create_internal_snapshot(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let _ = (node, name);
        Err(unsupported("internal snapshots"))
    }
    /// Deletes internal snapshot `name`.
    fn delete_internal_snapshot(&mut self, node: &str, name: &str) -> Result<(), QmpError> {
        let _ = (node, name);
        Err(unsupported("internal snapshots"))
    }
    /// Starts recording writes to `node` (a mirror's source); `None` if it cannot.
    fn track_writes(&self, _node: &str) -> Option<Arc<dyn WriteTracker>> {
        None
    }
    /// The block crate's graph, for the bitmap commands and actions (none in test graphs).
    fn block_graph(&mut self) -> Option<&mut block::BlockGraph> {
        None
    }
    /// Flushes and closes every node (daemon shutdown). Returns the first error, having tried
    /// every node.
    fn close_all(&mut self) -> io::Result<()>;
}

/// Facts about a node that snapshot checks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFacts {
    /// Something (a parent node, a job, an export) uses it.
    pub in_use: bool,
    /// It has a backing node.
    pub has_backing: bool,
    /// Its format can have a backing file.
    pub supports_backing: bool,
    /// Opened read-only.
    pub read_only: bool,
}

fn unsupported(what: &str) -> QmpError {
    QmpError::generic(format!("This block layer does not support {what}"))
}

/// `Cannot find device='<device>' nor node-name='<node>'` (QEMU's `bdrv_lookup_bs`).
pub(crate) fn not_found(device: &str, node: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{device}' nor node-name='{node}'"
    ))
}

/// A sendable boxed future.
pub type IoFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs blocking I/O away from the job executor.
pub trait IoPool: Send + Sync {
    /// Runs `work`; the future completes when it has.
    fn run(&self, work: Box<dyn FnOnce() + Send + 'static>) -> IoFuture;
}

/// Runs the work on the calling thread at once (tests with the manual executor).
#[derive(Debug, Clone, Copy, Default)]
pub struct InlineIo;

impl IoPool for InlineIo {
    fn run(&self, work: Box<dyn FnOnce() + Send + 'static>) -> IoFuture {
        work();
        Box::pin(std::future::ready(()))
    }
}

/// Runs the work on tokio's blocking threads.
#[cfg(feature = "tokio")]
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioBlockingPool;

#[cfg(feature = "tokio")]
impl IoPool for TokioBlockingPool {
    fn run(&self, work: Box<dyn FnOnce() + Send + 'static>) -> IoFuture {
        let handle = tokio::task::spawn_blocking(work);
        Box::pin(async move {
            // A panicking closure is a bug in a driver; the job then sees no result.
            let _ = handle.await;
        })
    }
}

/// Runs `work` on `pool` and returns its result.
pub(crate) async fn run_blocking<T: Send + 'static>(
    pool: &dyn IoPool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let slot = Arc::new(Mutex::new(None));
    let out = slot.clone();
    pool.run(Box::new(move || {
        let value = work();
        *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
    }))
    .await;
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// An errno's text as QEMU prints it (`strerror`): `Input/output error`, without Rust's
/// ` (os error N)` suffix.
pub(crate) fn errno_text(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(cut) if error.raw_os_error().is_some() => text[..cut].to_string(),
        _ => text,
    }
}

/// Gives the executor a turn (a failed request retried under `ignore`/`stop` must not spin).
pub(crate) fn yield_now() -> impl Future<Output = ()> + Send {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
            if self.0 {
                return std::task::Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
    YieldNow(false)
}
