//! The contract between a node and its driver. Protocol drivers (`file`, `null-co`) talk to
//! storage; format and filter drivers (`raw`, `blkdebug`, `qcow2`) work over child nodes they
//! open through [`OpenContext::open_child`] and then call like storage
//! (`read_at`/`write_at`/`flush`/`size`/`truncate` on [`BlockNode`]).

use std::sync::Arc;

use qmp_api::{BlockdevRef, ImageInfoSpecific, SnapshotInfo};

use crate::bitmap::DirtyBitmap;
use crate::error::{BlockError, BlockResult};
use crate::graph::BlockGraph;
use crate::node::BlockNode;
use crate::perm::Perm;

/// A block driver instance: the I/O of one node. Every method may be called from several
/// threads at once; all I/O is synchronous (run it on a worker thread, see [`crate::io`]).
pub trait BlockDriver: Send + Sync {
    /// Size in bytes (unrounded; the node rounds up to 512 like QEMU).
    fn size(&self) -> BlockResult<u64>;
    /// Fills `buf` from `offset`. Reads past the end of a file read zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    /// Writes `buf` at `offset` in one request (never split by the layer).
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()>;
    /// Writes `len` zero bytes at `offset`; the default writes a zero buffer.
    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
    /// Writes `len` zero bytes at `offset` and may free the storage behind them (QEMU's
    /// `BDRV_REQ_MAY_UNMAP`; the node asks only when opened with `discard=unmap`). The
    /// default writes zeroes as [`BlockDriver::write_zeroes_at`].
    fn write_zeroes_unmap_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes_at(offset, len)
    }
    /// Whether the format stores compressed clusters (QEMU's
    /// `bdrv_supports_compressed_writes`).
    fn supports_compressed_writes(&self) -> bool {
        false
    }
    /// Writes one cluster compressed (`offset` cluster aligned, `buf` a whole cluster or the
    /// disk's end).
    fn write_compressed_at(&self, _offset: u64, _buf: &[u8]) -> BlockResult<()> {
        Err(BlockError::from_errno(libc::ENOTSUP))
    }
    /// Writes `len` zero bytes at `offset` only if that is fast (nothing like a zero buffer is
    /// written); otherwise fails at once with `ENOTSUP` (QEMU's `BDRV_REQ_NO_FALLBACK`, NBD's
    /// `FAST_ZERO`). The default is never fast.
    fn write_zeroes_fast_at(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Err(BlockError::from_errno(libc::ENOTSUP))
    }
    /// Discards `[offset, offset + len)` (QEMU's `bdrv_co_pdiscard`, called only on nodes
    /// opened with `discard=unmap`, NBD's TRIM): afterwards the range may read as zeroes. The
    /// default, as QEMU for drivers without discard, does nothing.
    fn discard_at(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }
    /// Makes this driver's own writes stable (children are flushed by the node afterwards).
    fn flush(&self) -> BlockResult<()>;
    /// Runs `f` on the open file descriptor behind the node, if it is a plain file that
    /// the kernel may copy from and to directly (`copy_file_range`); `None` otherwise (the
    /// default).
    fn with_fd(
        &self,
        _f: &mut dyn FnMut(std::os::fd::RawFd) -> std::io::Result<u64>,
    ) -> Option<std::io::Result<u64>> {
        None
    }
    /// Whether [`BlockDriver::flush`] forces data to the disk (QEMU's `bdrv_co_flush_to_disk`,
    /// skipped on a node with `cache.no-flush`) rather than writing back the driver's own
    /// caches (`bdrv_co_flush_to_os`, which always runs). The default: write-back.
    fn flushes_to_disk(&self) -> bool {
        false
    }
    /// Changes the size.
    fn truncate(&self, _size: u64) -> BlockResult<()> {
        Err(BlockError::with_errno(
            "Image format driver does not support resize",
            libc::ENOTSUP,
        ))
    }
    /// Whether `[offset, offset+len)` starts with allocated data in this layer; returns the
    /// status and how many bytes share it. The default says "all allocated".
    fn block_status(&self, _offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        Ok((true, len))
    }
    /// Like [`BlockDriver::block_status`], also telling whether the range is allocated as
    /// zeroes in this layer (a qcow2 zero cluster): `(allocated, zero, bytes)`. The default
    /// knows of no zero allocation.
    fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        let (allocated, n) = self.block_status(offset, len)?;
        Ok((allocated, false, n))
    }
    /// Whether a range [`BlockDriver::zero_status`] calls unallocated reads as zeroes when
    /// there is no backing file (true of image formats). An NBD export's hole is not known to
    /// read as zeroes unless the server says so.
    fn unallocated_reads_zero(&self) -> bool {
        true
    }
    /// Called before the node's cumulative permissions change: refuse (e.g. an image lock is
    /// held elsewhere) or prepare. `perm`/`shared` are the new cumulative values.
    fn check_perm(&self, _perm: Perm, _shared: Perm) -> BlockResult<()> {
        Ok(())
    }
    /// Commits the permissions last checked.
    fn set_perm(&self, _perm: Perm, _shared: Perm) {}
    /// Abandons the permissions last checked (the previous ones stay in force).
    fn abort_perm(&self) {}
    /// Facts for `query-named-block-nodes`.
    fn info(&self) -> DriverInfo {
        DriverInfo::default()
    }
    /// A debug event happened on this node (blkdebug acts on it; others ignore it).
    fn debug_event(&self, _event: BlkdebugEvent) {}
    /// A format's metadata caches: `(capacity, held)` in tables, L2 then refcount blocks
    /// (qcow2; `None` for drivers without one).
    fn metadata_caches(&self) -> Option<((usize, usize), (usize, usize))> {
        None
    }
    /// Whether the format has a backing file (accepts the `backing` option).
    fn supports_backing(&self) -> bool {
        false
    }
    /// The backing file named in the image header: `(name as stored, format if stored)`.
    /// The graph opens it after this node (read-only) unless `backing` was given.
    fn backing_file(&self) -> Option<(String, Option<String>)> {
        None
    }
    /// The backing node changed (attached at open, or replaced, or removed with `None`).
    fn set_backing(&self, _backing: Option<Arc<BlockNode>>) {}
    /// Whether the driver follows its child in role `role` (other than `backing`, which every
    /// driver follows through [`BlockDriver::set_backing`]) when the graph moves the edge to
    /// another node ([`crate::replace_node`]). A driver that keeps its child's I/O handle for
    /// good says no, and the move is refused.
    fn follows_child(&self, _role: &str) -> bool {
        false
    }
    /// The child in role `role` is now `node` (only called when [`BlockDriver::follows_child`]).
    fn replace_child(&self, _role: &str, _node: Arc<BlockNode>) {}
    /// Rewrites the backing file named in the image header: `(name, format)`, or none (QEMU's
    /// `bdrv_change_backing_file`; the node is writable). The default: the format records no
    /// backing file (`ENOTSUP`).
    fn change_backing_file(&self, _backing: Option<(&str, &str)>) -> BlockResult<()> {
        Err(BlockError::from_errno(libc::ENOTSUP))
    }
    /// The role of the child whose data this node shows unchanged, if the node is a filter
    /// in QEMU's sense (`is_filter`: the job filters `copy-on-read`, `commit_top`,
    /// `mirror_top`). A filter counts as a layer of the chain in what the node's image
    /// information shows.
    fn filtered_child(&self) -> Option<&'static str> {
        None
    }
    /// Persistent bitmap storage, for formats that have it (qcow2).
    fn bitmap_store(&self) -> Option<&dyn BitmapStore> {
        None
    }
    /// Internal snapshots, for formats that have them (qcow2). The command layer
    /// (`blockdev-snapshot-internal-sync`, `blockdev-snapshot-delete-internal-sync`) reaches
    /// them through this; `None` means the format has none.
    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        None
    }
    /// Whether the node lost its driver at run time (QEMU sets `bs->drv = NULL` on a qcow2
    /// image it marks corrupt): it takes no more I/O.
    fn is_ejected(&self) -> bool {
        false
    }
    /// `blockdev-reopen` of the node with `options` (its new options as given): the driver's
    /// own checks of them (QEMU's `bdrv_reopen_prepare` of the driver), nothing changed yet.
    fn prepare_reopen(&self, _options: &qmp_api::BlockdevOptions) -> BlockResult<()> {
        Ok(())
    }
    /// Takes the options [`BlockDriver::prepare_reopen`] accepted (QEMU's
    /// `bdrv_reopen_commit` of the driver).
    fn commit_reopen(&self, _options: &qmp_api::BlockdevOptions) {}
    /// The node is being reopened read-only (its bitmaps were stored and it was flushed;
    /// no write arrives after this). A format that marks its image in use while writable
    /// releases that here. The default has nothing to do.
    fn reopen_read_only(&self) -> BlockResult<()> {
        Ok(())
    }
    /// Anonymous bitmaps the driver keeps on its node, as `(granularity, count in bytes)`,
    /// newest first, shown after the node's own (QEMU's copy-before-write filter shows its
    /// three).
    fn internal_bitmaps(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// The block-copy state of a copy-before-write filter (a backup copies through it).
    fn block_copy(&self) -> Option<&Arc<crate::copy::BlockCopy>> {
        None
    }
    /// The point-in-time view this node keeps (the copy-before-write filter), which a
    /// `snapshot-access` node over it reads.
    fn snapshot_view(&self) -> Option<&dyn SnapshotView> {
        None
    }
    /// The node is being reopened read-write (its children that inherit the flag already
    /// were): a driver holding its storage read-only reopens it for writing here. The default
    /// has nothing to do.
    fn reopen_read_write(&self) -> BlockResult<()> {
        Ok(())
    }
    /// The node is being inactivated (its bitmaps were stored and it was flushed): write out
    /// anything cached and mark the image clean, as if closing it; reads may still come.
    /// QEMU's `bdrv_inactivate`. The default has nothing to do.
    fn inactivate(&self) -> BlockResult<()> {
        Ok(())
    }
    /// The node is being activated again: another process may have written the image
    /// meanwhile, so forget what is cached and read it anew (QEMU's
    /// `bdrv_co_invalidate_cache`). The default has nothing to do.
    fn activate(&self) -> BlockResult<()> {
        Ok(())
    }
    /// Releases the driver: flushes; after this no I/O arrives.
    fn close(&self) -> BlockResult<()> {
        self.flush()
    }
    /// Whether [`BlockDriver::close`] does the flush at close itself, deciding what a failed
    /// one means (the nbd driver: a server that is gone neither fails nor delays the close);
    /// otherwise the node flushes a written node (and its children) before closing it, and a
    /// failed flush is the close's error.
    fn flushes_at_close(&self) -> bool {
        false
    }
}

/// Something a node reports on its own, outside any request (the daemon turns it into a QMP
/// event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockEvent {
    /// QEMU's `BLOCK_IMAGE_CORRUPTED`: the image's metadata was found corrupt.
    ImageCorrupted {
        /// The node's name.
        node_name: String,
        /// What was found.
        msg: String,
        /// Where in the image file, if known.
        offset: Option<u64>,
        /// How many bytes, if known.
        size: Option<u64>,
        /// The image is marked corrupt and the node takes no more I/O.
        fatal: bool,
    },
}

/// Where nodes report [`BlockEvent`]s. It may be called with a node's locks held: it must only
/// queue the event.
pub type BlockEventSink = Arc<dyn Fn(BlockEvent) + Send + Sync>;

/// What a driver reports about its image (QEMU's `bdrv_get_info`/`ImageInfo` pieces).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriverInfo {
    /// The image's file name; `None`: inherit the `file` child's, or build a `json:` name.
    pub filename: Option<String>,
    /// Bytes allocated on the host; `None`: the `file` child's.
    pub actual_size: Option<u64>,
    /// Cluster size, if the format has one (sets the default bitmap granularity).
    pub cluster_size: Option<u64>,
    /// `Some` when the driver supports `get_info` (the image's dirty flag).
    pub dirty_flag: Option<bool>,
    /// `ImageInfoSpecific`.
    pub format_specific: Option<ImageInfoSpecific>,
}

/// Persistent dirty bitmaps of a format (qcow2 implements this over its bitmap extension).
pub trait BitmapStore: Send + Sync {
    /// The bitmaps stored in the image, loaded at open (flags set: persistent, and
    /// readonly/inconsistent as found).
    fn load_bitmaps(&self) -> BlockResult<Vec<DirtyBitmap>>;
    /// Whether a new persistent bitmap `name` of `granularity` can be stored.
    fn can_store_new_bitmap(&self, name: &str, granularity: u64) -> BlockResult<()>;
    /// Deletes the stored copy of `name` (block-dirty-bitmap-remove of a persistent bitmap).
    fn remove_persistent_bitmap(&self, name: &str) -> BlockResult<()>;
    /// Writes these persistent bitmaps (at close / quit). Stored bitmaps absent from the list
    /// stay as they are: removal goes through [`BitmapStore::remove_persistent_bitmap`].
    fn store_bitmaps(&self, bitmaps: &[DirtyBitmap]) -> BlockResult<()>;
}

/// Internal snapshots of a format (qcow2 implements this over its snapshot table). Name
/// checks QEMU does before calling the format (`Snapshot with name '...' already exists`,
/// read-only node, ...) belong to the command layer.
pub trait InternalSnapshots: Send + Sync {
    /// The snapshots, in table order.
    fn list(&self) -> Vec<SnapshotInfo>;
    /// Creates a disk-only snapshot `name` of the current contents (flushed first) and returns
    /// it.
    fn create(&self, name: &str) -> BlockResult<SnapshotInfo>;
    /// Deletes the snapshot whose id is `id_or_name`, else the first named so; returns what was
    /// deleted. Not found: `Can't find snapshot '<id_or_name>'` (ENOENT).
    fn delete(&self, id_or_name: &str) -> BlockResult<SnapshotInfo>;
}

/// A point-in-time view a node keeps of its data (QEMU's snapshot-access API of the
/// copy-before-write filter): what the node read when the view began, whatever was written
/// since.
pub trait SnapshotView: Send + Sync {
    /// Fills `buf` from the view at `offset`; `EACCES` outside the view.
    fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    /// How the view's range at `offset` reads through the layers behind it (at most `len`
    /// bytes).
    fn snapshot_status(&self, offset: u64, len: u64) -> BlockResult<crate::node::ChainStatus>;
    /// Drops a range from the view (its whole clusters stop being copied and readable).
    fn snapshot_discard(&self, offset: u64, len: u64) -> BlockResult<()>;
}

/// How a parent uses a child, which fixes the permissions the parent takes on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    /// A filter or raw child: the parent's users' permissions pass through unchanged.
    Filtered,
    /// A filter's child whose permissions the filter adjusts (blkdebug's `take-child-perms`
    /// and `unshare-child-perms`): as [`ChildKind::Filtered`], plus `take`, and `unshare`
    /// taken out of what is shared.
    FilteredAdjusted { take: Perm, unshare: Perm },
    /// A format's image file (qcow2's `file`): consistent read always, write and resize when the
    /// parent is writable; write and resize are not shared.
    Metadata,
    /// A backing file: consistent read when the parent's users read; writes and resizes
    /// shared when the parent's users share writes.
    Backing,
    /// Where a copy-before-write filter copies to (its `target`): write; everything shared but
    /// resize (the sizes are checked once).
    CopyTarget,
    /// What a `snapshot-access` node reads the point-in-time view of: no permission taken,
    /// everything shared; not a layer the node's data shows through.
    SnapshotOf,
}

impl ChildKind {
    /// Whether this is the child a filter passes its data through.
    pub fn is_filtered(self) -> bool {
        matches!(
            self,
            ChildKind::Filtered | ChildKind::FilteredAdjusted { .. }
        )
    }

    /// The `(perm, shared)` a parent with cumulative `(perm, shared)` takes on such a child.
    pub fn child_perms(self, perm: Perm, shared: Perm, writable: bool) -> (Perm, Perm) {
        match self {
            ChildKind::Filtered => (perm, shared),
            ChildKind::FilteredAdjusted { take, unshare } => (perm | take, shared & !unshare),
            ChildKind::Metadata => {
                let mut p = perm | Perm::CONSISTENT_READ;
                if writable {
                    p = p | Perm::WRITE | Perm::RESIZE;
                }
                (p, shared & !(Perm::WRITE | Perm::RESIZE))
            }
            // QEMU's bdrv_default_perms_for_cow: consistent read if the parent's users
            // read, and the backing file may change only under users that let the data change.
            ChildKind::Backing => {
                let changing = if shared.contains(Perm::WRITE) {
                    Perm::WRITE | Perm::RESIZE
                } else {
                    Perm::NONE
                };
                (
                    perm & Perm::CONSISTENT_READ,
                    changing | Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
                )
            }
            ChildKind::CopyTarget => (Perm::WRITE, Perm::ALL & !Perm::RESIZE),
            ChildKind::SnapshotOf => (Perm::NONE, Perm::ALL),
        }
    }
}

/// QEMU's `BlkdebugEvent` (the generated type): points in I/O paths where blkdebug rules
/// trigger.
pub use qmp_api::BlkdebugEvent;

/// What a driver sees while its node opens: the node's read-only flag, its name, and a way
/// to open children. The driver's own options are its branch of the generated
/// `BlockdevOptions`, handed to its `open` beside this.
pub struct OpenContext<'g> {
    pub(crate) graph: &'g mut BlockGraph,
    pub(crate) explicit_name: Option<String>,
    /// Assigned name and whether it was generated; set when first needed.
    pub(crate) name: Option<(String, bool)>,
    pub(crate) read_only: bool,
    /// The node's generic options as they act ([`crate::base_options`]).
    pub(crate) flags: crate::base_options::NodeFlags,
    /// The driver is an image format (`raw`, `qcow2`; QEMU's `is_format`).
    pub(crate) is_format: bool,
    pub(crate) children: Vec<crate::node::ChildEdge>,
    /// The children opened from a definition here: they inherit from the node (QEMU's
    /// `inherits_from`), so a reopen of the node reopens them.
    pub(crate) opened: Vec<Arc<BlockNode>>,
}

impl OpenContext<'_> {
    /// The name of the node being opened, assigning it now if needed (a generated
    /// `#blockNNN`, or the validated `node-name`).
    pub fn ensure_name(&mut self) -> BlockResult<String> {
        if self.name.is_none() {
            self.name = Some(self.graph.assign_name(self.explicit_name.as_deref())?);
        }
        Ok(self
            .name
            .as_ref()
            .map(|(n, _)| n.clone())
            .unwrap_or_default())
    }

    /// Where the node reports events, if anywhere.
    pub fn event_sink(&self) -> Option<BlockEventSink> {
        self.graph.event_sink()
    }

    /// Whether the node opens read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The node's generic options (`cache.direct`, `auto-read-only`, ...).
    pub fn flags(&self) -> crate::base_options::NodeFlags {
        self.flags
    }

    /// Whether the node may open read-only when read-write access is impossible
    /// (`auto-read-only`).
    pub fn auto_read_only(&self) -> bool {
        self.flags.auto_read_only
    }

    /// The node opens read-only after all (QEMU's `bdrv_apply_auto_read_only`, for a driver
    /// that found its storage read-only and [`OpenContext::auto_read_only`] set).
    pub fn set_read_only(&mut self) {
        self.read_only = true;
        self.flags.read_only = true;
    }

    /// Opens (or references) a child in role `role` (`file`, `backing`, `image`): a
    /// definition opens a new node (read-only inherited unless given), a reference names an
    /// existing node.
    pub fn open_child(
        &mut self,
        role: &str,
        child: &BlockdevRef,
        kind: ChildKind,
    ) -> BlockResult<Arc<BlockNode>> {
        let node = match child {
            BlockdevRef::Reference(name) => self.graph.lookup(name)?,
            BlockdevRef::Definition(options) => {
                let inherited =
                    crate::base_options::Inherited::child_of(&self.flags, self.is_format);
                let node = self.graph.open_node(options, inherited, false)?;
                self.opened.push(node.clone());
                node
            }
        };
        let (perm, mut shared) = kind.child_perms(Perm::NONE, Perm::ALL, !self.read_only);
        if node.flags().force_share {
            shared = Perm::ALL;
        }
        let holder_name = self.ensure_name()?;
        let holder = format!("node '{holder_name}'");
        if !node.is_active() {
            return Err(BlockError::new(format!(
                "Inactive '{}' can't be a {role} child of active '{holder_name}'",
                node.name()
            )));
        }
        let use_id = node.add_use(&holder, role, perm, shared)?;
        let blocker = (kind == ChildKind::Backing).then(|| node.block_as_backing_of(&holder_name));
        self.children.push(crate::node::ChildEdge {
            name: role.to_string(),
            kind,
            node: node.clone(),
            use_id,
            blocker,
        });
        Ok(node)
    }
}
