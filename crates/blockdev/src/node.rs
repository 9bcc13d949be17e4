//! What the command layer needs from the node layer, as one trait ([`NodeGraph`]: look nodes
//! up, add and delete them, list them, their bitmaps, images, snapshots, closing) and each
//! node's I/O ([`BlockIo`]). `crates/block` provides the real graph ([`crate::BlockLayer`]);
//! tests provide one in memory. Jobs run their blocking I/O on an [`IoPool`], through buffers
//! from [`CopyBuffers`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use block::copy::BlockCopy;
use block::{BitmapStore, DirtyBitmap};
use qmp_api::{
    BlockDeviceInfo, BlockdevCreateOptions, BlockdevDelArguments, BlockdevOptions, QmpError,
    SnapshotInfo,
};

pub use block::{BackingName, Extent, FilterKind};

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
    /// Makes `len` bytes at `offset` read as zeroes, freeing what is behind them where the
    /// node allows it (QEMU's `BDRV_REQ_MAY_UNMAP`, honoured on nodes opened with
    /// `discard=unmap`).
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Whether the node was opened with `discard=unmap` (QEMU's `BDRV_O_UNMAP`).
    fn discard_unmaps(&self) -> bool {
        false
    }
    /// Like [`BlockIo::write_zeroes`] if that is fast, else fails at once with
    /// [`io::ErrorKind::Unsupported`] (NBD's `FAST_ZERO`). The default is never fast.
    fn write_zeroes_fast(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// The state of the range starting at `offset` (at most `len` bytes).
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent>;
    /// Makes everything written so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Whether the node is read-only (a job cannot write or discard it).
    fn read_only(&self) -> bool {
        false
    }
    /// The format's cluster size, if it has clusters.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// Whether the node stores compressed clusters (a qcow2 node).
    fn supports_compressed_writes(&self) -> bool {
        false
    }
    /// Writes one cluster compressed (`offset` cluster aligned, `buf` a whole cluster or the
    /// rest of the disk).
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "compressed writes are not supported",
        ))
    }
    /// Discards `len` bytes at `offset` as QEMU does: only on a node opened with
    /// `discard=unmap`, which may read as zeroes afterwards; elsewhere nothing happens.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// The state of the range through the node's backing chain (QEMU's
    /// `bdrv_block_status_above`: data, zero, the depth of the layer that allocates it);
    /// `None` where the graph cannot look through layers (test graphs).
    fn chain_status(&self, _offset: u64, _len: u64) -> Option<io::Result<block::ChainStatus>> {
        None
    }
    /// QEMU's `bdrv_is_allocated_above(node, bottom, include_base=true)`: whether the range
    /// at `offset` (at most `len` bytes) is allocated in a layer from this node down to the
    /// layer named `bottom` (inclusive; `None`: the whole chain), and for how many bytes.
    fn allocated_above(
        &self,
        _bottom: Option<&str>,
        _offset: u64,
        _len: u64,
    ) -> io::Result<(bool, u64)> {
        Err(io::Error::from_raw_os_error(95))
    }
    /// One copy-on-read step of a stream (see `block::BlockNode::copy_on_read`): copies into
    /// this node's own layer what it does not allocate and the layers down to `bottom` do,
    /// serialised against writes; returns the bytes covered and whether they were copied.
    fn copy_on_read(
        &self,
        _offset: u64,
        _len: u64,
        _bottom: Option<&str>,
        _buf: &mut [u8],
    ) -> io::Result<(u64, bool)> {
        Err(io::Error::from_raw_os_error(95))
    }
    /// The graph node behind this handle, if it is one plainly (no job filter in between).
    fn block_node(&self) -> Option<&Arc<block::BlockNode>> {
        None
    }
    /// Copies `[offset, offset + len)` to the same place in `target` inside the kernel
    /// (`x-perf.use-copy-range`); `Ok(false)` when it cannot (nothing written).
    fn copy_range_to(&self, target: &dyn BlockIo, offset: u64, len: u64) -> io::Result<bool> {
        match (self.block_node(), target.block_node()) {
            (Some(from), Some(to)) => from
                .copy_range_to(to, offset, len)
                .map_err(crate::block_layer::io_error),
            _ => Ok(false),
        }
    }
    /// Grows the node to `size` bytes (a commit's base smaller than its top).
    fn truncate(&self, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(95))
    }
    /// Runs `hook` before every write to the node until the handle drops (a backup's
    /// copy-before-write); `None` if the node cannot.
    fn add_write_notifier(
        &self,
        _hook: Arc<dyn block::BeforeWrite>,
    ) -> Option<block::NotifierHandle> {
        None
    }
}

/// A node's dirty bitmaps, as data (the block crate's [`DirtyBitmap`]s), with what the bitmap
/// commands need to know about the node.
pub trait NodeBitmaps: Send + Sync {
    /// The node's name.
    fn node_name(&self) -> &str;
    /// The bitmaps, newest first, locked while the guard lives. Writes to the node mark the
    /// recording ones.
    fn list(&self) -> MutexGuard<'_, Vec<DirtyBitmap>>;
    /// The node's virtual size (what a new bitmap covers).
    fn size(&self) -> u64;
    /// Whether the node is read-only.
    fn read_only(&self) -> bool {
        false
    }
    /// The granularity of a bitmap added without one (QEMU: the cluster size clamped to
    /// 4 KiB..64 KiB, else 64 KiB).
    fn default_granularity(&self) -> u64;
    /// Where the node's format stores persistent bitmaps, if it can.
    fn store(&self) -> Option<&dyn BitmapStore>;
}

/// Records writes to a node while a mirror runs (an anonymous dirty bitmap).
pub trait WriteTracker: Send + Sync {
    /// The ranges written since the last call, `(offset, len)` in order; forgets them.
    fn take_dirty(&self) -> Vec<(u64, u64)>;
    /// Stops recording.
    fn stop(&self);
}

/// What a mirror's filter node does with the writes through it (QEMU's `mirror_top`
/// `do_write`): the mirror's shared state implements it.
pub trait FilterWrites: Send + Sync {
    /// A write of `len` bytes at `offset` reaches the filter (`data`: the bytes; `None`:
    /// zeroes); `below` performs it on the node under the filter; `bitmaps` are the filter
    /// node's own.
    fn write(
        &self,
        bitmaps: &dyn NodeBitmaps,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        below: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()>;
}

/// A running mirror's part of the graph: its filter node above the source.
pub trait MirrorNodes: Send + Sync {
    /// The filter node's name.
    fn filter_name(&self) -> String;
    /// The filter node's bitmaps (where the job's anonymous dirty bitmap lives).
    fn bitmaps(&self) -> Arc<dyn NodeBitmaps>;
    /// The pivot: every parent of `to_replace` moves onto the mirror's target, then the
    /// filter's parents too; the filter is left with no parent. Fails (changing nothing)
    /// with QEMU's text when the target cannot take them.
    fn pivot(&self, to_replace: &str) -> Result<(), String>;
    /// The filter's parents move back onto the source.
    fn remove_filter(&self);
    /// The target's backing becomes `backing` (drive-mirror with `absolute-paths`).
    fn set_target_backing(&self, backing: &str) -> Result<(), String>;
}

/// How `drive-mirror` opens its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorTargetImage {
    /// The file.
    pub filename: String,
    /// Its format; `None`: probed.
    pub format: Option<String>,
    /// The node name (`None`: generated).
    pub node_name: Option<String>,
    /// Open the backing chain its header names (`mode=existing`), else none.
    pub open_backing: bool,
    /// Open it with `discard=unmap` (the source's setting, as QEMU passes it on).
    pub discard_unmap: bool,
}

/// The node graph, as the QMP command layer uses it: the one seam between the command layer
/// and the node layer.
pub trait NodeGraph: Send {
    /// The I/O of the node named `name`, if it exists.
    fn node(&self, name: &str) -> Option<Arc<dyn BlockIo>>;
    /// The dirty bitmaps of node `name`, if it exists.
    fn bitmaps(&self, name: &str) -> Option<Arc<dyn NodeBitmaps>>;
    /// The dirty bitmaps of node `name` and of each layer below it whose data shows through
    /// (filter children, backing files), top first.
    fn chain_bitmaps(&self, name: &str) -> Vec<Arc<dyn NodeBitmaps>> {
        self.bitmaps(name).into_iter().collect()
    }
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
    fn query_named_block_nodes(&self, flat: bool) -> Vec<BlockDeviceInfo>;
    /// A node that lost its driver at run time (a qcow2 image marked corrupt), if any.
    fn ejected_node(&self) -> Option<String> {
        None
    }
    /// `blockdev-reopen`.
    fn reopen(&mut self, options: &[BlockdevOptions]) -> Result<(), QmpError> {
        let _ = options;
        Err(unsupported("blockdev-reopen"))
    }
    /// `blockdev-set-active`: node `node` (every node if `None`) made active or inactive.
    fn set_active(&mut self, node: Option<&str>, active: bool) -> Result<(), QmpError> {
        let _ = (node, active);
        Err(unsupported("blockdev-set-active"))
    }
    /// A generated node name (`#blockNNN`), as a node opened now would get.
    fn generate_node_name(&mut self) -> String {
        String::from("#block000")
    }
    /// Whether node `node` is active (a node this graph does not know is).
    fn is_active(&self, node: &str) -> bool {
        let _ = node;
        true
    }
    /// What snapshots need to know about a node, if it exists.
    fn node_facts(&self, _name: &str) -> Option<NodeFacts> {
        None
    }
    /// The op blockers of node `name` (QEMU's `bs->op_blockers`), if it exists; `None` also
    /// where the graph keeps none (nothing is blocked then).
    fn op_blockers(&self, _name: &str) -> Option<Arc<block::OpBlockers>> {
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
    /// The node's internal snapshots; `None` if its format has none.
    fn internal_snapshots(&self, _node: &str) -> Option<Vec<SnapshotInfo>> {
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
    /// Inserts a mirror's filter node (driver `mirror_top`, named `name` or generated) above
    /// `source`, passing its writes to `writes`; every parent of `source` moves onto it.
    /// `Ok(None)`: this graph has no filters (the mirror then tracks writes on the source).
    fn insert_mirror_filter(
        &mut self,
        source: &str,
        target: &str,
        name: Option<&str>,
        writes: Arc<dyn FilterWrites>,
    ) -> Result<Option<Arc<dyn MirrorNodes>>, QmpError> {
        let _ = (source, target, name, writes);
        Ok(None)
    }
    /// Whether `node` has a parent node (QEMU's `bdrv_is_root_node`, negated).
    fn has_parent_node(&self, _node: &str) -> bool {
        false
    }
    /// The nodes that have `node` as a child, directly or through others (a drained node's
    /// parents are drained with it, as QEMU's `bdrv_parent_drained_begin`).
    fn ancestors(&self, _node: &str) -> Vec<String> {
        Vec::new()
    }
    /// Whether `to_replace` shows `node`'s data: it is `node`, or `node` reaches it through
    /// filter children only (QEMU's `bdrv_recurse_can_replace`).
    fn can_replace(&self, node: &str, to_replace: &str) -> bool {
        node == to_replace
    }
    /// Whether `node` is `below` or lies under it in `below`'s backing chain.
    fn in_chain(&self, _below: &str, _node: &str) -> bool {
        false
    }
    /// Opens a `drive-mirror` target read-write; returns its name and I/O.
    fn open_mirror_target(
        &mut self,
        image: &MirrorTargetImage,
    ) -> Result<(String, Arc<dyn BlockIo>), QmpError> {
        let _ = image;
        Err(unsupported("drive-mirror"))
    }
    /// An I/O handle on `node` that follows it when its parents move (a pivot): an export's
    /// (QEMU's `BlockBackend`), held by `holder` with write permission if `writable`.
    fn backend(
        &self,
        node: &str,
        holder: &str,
        writable: bool,
    ) -> Result<Arc<dyn BlockIo>, QmpError> {
        let _ = (holder, writable);
        self.node(node).ok_or_else(|| not_found(node, node))
    }
    /// Puts a copy-before-write filter over `source` copying to `target`, as a backup does
    /// (QEMU's `bdrv_cbw_append`), named `filter_node_name` or automatically; returns its name
    /// and block-copy state. `Ok(None)`: this graph has no filter nodes (the backup hooks the
    /// source itself), which it can only be without a name asked for.
    fn add_backup_filter(
        &mut self,
        source: &str,
        target: &str,
        filter_node_name: Option<&str>,
    ) -> Result<Option<(String, Arc<BlockCopy>)>, QmpError> {
        let _ = (source, target);
        match filter_node_name {
            Some(_) => Err(unsupported("filter nodes (filter-node-name)")),
            None => Ok(None),
        }
    }
    /// The buffers the graph's copies share, if it has its own (jobs then use them too).
    fn copy_buffers(&self) -> Option<Arc<CopyBuffers>> {
        None
    }
    /// Starts recording writes to `node` (a mirror's source); `None` if it cannot.
    fn track_writes(&self, _node: &str) -> Option<Arc<dyn WriteTracker>> {
        None
    }
    /// `block_resize`'s work on a node that exists: holds resize as an unnamed block device
    /// does (permission conflicts in QEMU's words), then resizes it.
    fn resize(&mut self, node: &str, size: u64) -> Result<(), QmpError> {
        let _ = (node, size);
        Err(unsupported("resizing"))
    }
    /// Deletes the internal snapshot whose id is `id`.
    fn delete_internal_snapshot_id(&mut self, node: &str, id: &str) -> Result<(), QmpError> {
        let _ = (node, id);
        Err(unsupported("internal snapshots"))
    }
    /// Records `backing_file` as the backing file name in the image of `node` (with the
    /// node's own format as the backing format, as QEMU's `change-backing-file` does),
    /// reopening it read-write meanwhile if it is read-only.
    fn change_backing_file(&mut self, node: &str, backing_file: &str) -> Result<(), QmpError> {
        let _ = (node, backing_file);
        Err(unsupported("changing backing file names"))
    }
    /// Every node, oldest first, with its children newest first.
    fn graph_nodes(&self) -> Vec<GraphNode> {
        Vec::new()
    }
    /// Prepares `blockdev-create` of a driver that can create images (`file`, `qcow2`): finds
    /// or opens the nodes the options name (an error there is the job's, as QEMU finds it
    /// while the job runs) and returns the work the job runs.
    fn prepare_create(&mut self, options: &BlockdevCreateOptions) -> CreateWork {
        let _ = options;
        CreateWork::new(|| Err("This block layer does not support image creation".into()))
    }
    /// The layers of the chain from node `name` down (itself first), through filters'
    /// children and backing files (QEMU's `bdrv_filter_or_cow_bs` walk); empty if there is
    /// no such node or the graph cannot tell.
    fn backing_chain(&self, _name: &str) -> Vec<ChainLayer> {
        Vec::new()
    }
    /// QEMU's `bdrv_find_backing_image`: the node in `top`'s backing chain whose file name,
    /// as the chain records it (or resolved against the overlay's directory), is `filename`.
    fn find_backing_image(&self, _top: &str, _filename: &str) -> Option<String> {
        None
    }
    /// A handle on the graph for the changes a job makes while it runs and when it ends
    /// (filters, read-only reopens, relinking the chain); `None` if the graph cannot.
    fn chain_editor(&self) -> Option<Arc<dyn ChainEditor>> {
        None
    }
    /// Flushes and closes every node (daemon shutdown). Returns the first error, having tried
    /// every node.
    fn close_all(&mut self) -> io::Result<()>;
}

/// What a `blockdev-create` job runs (blocking I/O, on the I/O pool): `Err` is the job's
/// error message.
pub type CreateRun = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// The work of a `blockdev-create` job and the nodes opened for it (closed when it ends).
pub struct CreateWork {
    /// The creation.
    pub run: CreateRun,
    /// Nodes the graph opened for the job.
    pub opened: Vec<String>,
}

impl CreateWork {
    /// Work that opened no node.
    pub fn new(run: impl FnOnce() -> Result<(), String> + Send + 'static) -> Self {
        CreateWork {
            run: Box::new(run),
            opened: Vec::new(),
        }
    }
}

/// A node as `x-debug-query-block-graph` and `query-blockstats` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphNode {
    /// Its name.
    pub name: String,
    /// Its driver.
    pub driver: String,
    /// The end of the highest write to it.
    pub wr_highest_offset: u64,
    /// Its children, newest first.
    pub children: Vec<GraphEdge>,
}

/// A node's use of a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphEdge {
    /// The child's role (`file`, `backing`, `image`).
    pub role: String,
    /// The child's name.
    pub child: String,
    /// Whether the child is the node's primary child (QEMU's `bs->file`: the `file` of a
    /// format, the filtered child of a filter).
    pub primary: bool,
    /// The permissions taken on the child, and those shared.
    pub perm: block::Perm,
    pub shared: block::Perm,
}

/// One layer of a backing chain, as stream and commit check their arguments against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// The node name.
    pub name: String,
    /// The file name QEMU shows for it (`bs->filename`).
    pub filename: String,
    /// The driver name (`qcow2`, `file`, `copy-on-read`, ...).
    pub driver: String,
    /// A filter (QEMU's `is_filter`): shows its child's data unchanged.
    pub filter: bool,
    /// Opened read-only.
    pub read_only: bool,
    /// Some parent node uses it (QEMU's `bdrv_is_root_node` is false).
    pub has_parent: bool,
    /// Someone holds write permission on it.
    pub written: bool,
}

/// The graph changes block jobs make, on a handle the job keeps (its hooks run outside the
/// command that started it). Nodes are named; each call locks the graph for its duration.
pub trait ChainEditor: Send + Sync {
    /// Inserts the job's filter above `node` (see `block::BlockGraph::insert_filter`);
    /// returns its name.
    fn insert_filter(
        &self,
        node: &str,
        kind: FilterKind,
        name: Option<&str>,
    ) -> Result<String, QmpError>;
    /// Removes the filter `filter` (nothing to do if it is gone).
    fn remove_filter(&self, filter: &str) -> Result<(), QmpError>;
    /// Reopens `node` read-only or read-write.
    fn set_read_only(&self, node: &str, read_only: bool) -> Result<(), QmpError>;
    /// The node name of `node`'s backing node (or a filter's child), if any.
    fn layer_below(&self, node: &str) -> Option<String>;
    /// A stream's end: `overlay` gets `base` (or no backing file) and its header names it.
    fn change_backing(
        &self,
        overlay: &str,
        base: Option<&str>,
        name: &BackingName,
    ) -> Result<(), QmpError>;
    /// An intermediate commit's end: the overlays of `top` get `base`, headers rewritten.
    fn drop_intermediate(&self, top: &str, base: &str, name: &BackingName) -> Result<(), QmpError>;
}

/// Facts about a node that snapshot checks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFacts {
    /// Something (a parent node, a job, an export) uses it.
    pub in_use: bool,
    /// The monitor added it (`blockdev-add`): only such nodes can be deleted.
    pub monitor_owned: bool,
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

/// The page-aligned buffers copy requests read into, shared by every job and copy-before-write
/// (the block crate's, where block copy lives).
pub use block::copy::CopyBuffers;
