//! The contract between a node and its driver. Protocol drivers (`file`, `null-co`) talk to
//! storage; format and filter drivers (`raw`, `blkdebug`, `qcow2`) work over child nodes they
//! open through [`OpenContext::open_child`] and then call like storage
//! (`read_at`/`write_at`/`flush`/`size`/`truncate` on [`BlockNode`]).

use std::sync::Arc;

use qmp_api::{ImageInfoSpecific, SnapshotInfo};
use serde_json::{Map, Value};

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
    /// Makes this driver's own writes stable (children are flushed by the node afterwards).
    fn flush(&self) -> BlockResult<()>;
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
    /// The node is being reopened read-only (its bitmaps were stored and it was flushed;
    /// no write arrives after this). A format that marks its image in use while writable
    /// releases that here. The default has nothing to do.
    fn reopen_read_only(&self) -> BlockResult<()> {
        Ok(())
    }
    /// Releases the driver: flushes; after this no I/O arrives.
    fn close(&self) -> BlockResult<()> {
        self.flush()
    }
}

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

/// How a parent uses a child, which fixes the permissions the parent takes on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    /// A filter or raw child: the parent's users' permissions pass through unchanged.
    Filtered,
    /// A format's image file (qcow2's `file`): consistent read always, write and resize when the
    /// parent is writable; write and resize are not shared.
    Metadata,
    /// A backing file: consistent read; everything shared.
    Backing,
}

impl ChildKind {
    /// The `(perm, shared)` a parent with cumulative `(perm, shared)` takes on such a child.
    pub fn child_perms(self, perm: Perm, shared: Perm, writable: bool) -> (Perm, Perm) {
        match self {
            ChildKind::Filtered => (perm, shared),
            ChildKind::Metadata => {
                let mut p = perm | Perm::CONSISTENT_READ;
                if writable {
                    p = p | Perm::WRITE | Perm::RESIZE;
                }
                (p, shared & !(Perm::WRITE | Perm::RESIZE))
            }
            ChildKind::Backing => (Perm::CONSISTENT_READ, Perm::ALL),
        }
    }
}

macro_rules! blkdebug_events {
    ($($variant:ident = $name:literal,)*) => {
        /// QEMU's `BlkdebugEvent`: points in I/O paths where blkdebug rules trigger.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum BlkdebugEvent { $(#[doc = $name] $variant,)* }

        impl BlkdebugEvent {
            /// Every event in schema order.
            pub const ALL: &'static [BlkdebugEvent] = &[$(BlkdebugEvent::$variant,)*];
            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self { $(BlkdebugEvent::$variant => $name,)* }
            }
            /// Parses a wire name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($name => Some(BlkdebugEvent::$variant),)* _ => None }
            }
        }
    };
}

blkdebug_events! {
    L1Update = "l1_update", L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table", L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load", L2Update = "l2_update", L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read", L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio", ReadBackingAio = "read_backing_aio", ReadCompressed = "read_compressed",
    WriteAio = "write_aio", WriteCompressed = "write_compressed", VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save", CowRead = "cow_read", CowWrite = "cow_write",
    ReftableLoad = "reftable_load", ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update", RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update", RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc", RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table", ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes", ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os", FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head", PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail", PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev", PwritevZero = "pwritev_zero", PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare", L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters", CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space", None = "none",
}

/// Opens a driver for a node being created.
pub type DriverOpenFn = fn(&mut OpenContext<'_>) -> BlockResult<Box<dyn BlockDriver>>;

/// A driver the graph can instantiate by name (`driver` in `blockdev-add`).
#[derive(Clone, Copy)]
pub struct DriverSpec {
    /// The `driver` value, e.g. `"qcow2"`.
    pub name: &'static str,
    /// QEMU's protocol-style drivers (`file`, `null-co`, `blkdebug`) get their node name
    /// before their children open; formats (`raw`, `qcow2`) open their `file` child first.
    /// This fixes `#blockNNN` counters and the order of `query-named-block-nodes`.
    pub is_protocol: bool,
    /// The opener.
    pub open: DriverOpenFn,
}

/// Options every node accepts besides its driver's.
const COMMON_OPTIONS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "cache",
    "detect-zeroes",
];

/// What a driver sees while its node opens: its options, its read-only flag, and a way to
/// open children.
pub struct OpenContext<'g> {
    pub(crate) graph: &'g mut BlockGraph,
    pub(crate) options: &'g Map<String, Value>,
    pub(crate) explicit_name: Option<String>,
    /// Assigned name and whether it was generated; set when first needed.
    pub(crate) name: Option<(String, bool)>,
    pub(crate) read_only: bool,
    pub(crate) children: Vec<crate::node::ChildEdge>,
    pub(crate) consumed: Vec<String>,
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

    /// Whether the node opens read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Every option as given.
    pub fn options(&self) -> &Map<String, Value> {
        self.options
    }

    fn take(&mut self, key: &str) -> Option<&Value> {
        self.consumed.push(key.to_string());
        self.options.get(key)
    }

    /// A string option.
    pub fn opt_str(&mut self, key: &str) -> BlockResult<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(type_error(key, "string")),
        }
    }

    /// A mandatory string option (`Parameter '<key>' is missing`).
    pub fn req_str(&mut self, key: &str) -> BlockResult<String> {
        self.opt_str(key)?
            .ok_or_else(|| BlockError::new(format!("Parameter '{key}' is missing")))
    }

    /// A non-negative integer option.
    pub fn opt_u64(&mut self, key: &str) -> BlockResult<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| type_error(key, "integer")),
        }
    }

    /// A boolean option.
    pub fn opt_bool(&mut self, key: &str) -> BlockResult<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(type_error(key, "boolean")),
        }
    }

    /// Any option, raw (marks it consumed).
    pub fn opt_value(&mut self, key: &str) -> Option<Value> {
        self.take(key).cloned()
    }

    /// Opens (or references) the child under option `key` (`file`, `backing`, `image`): a
    /// nested options dict opens a new node (read-only inherited unless given), a string names
    /// an existing node. Returns `None` if the option is absent and `required` is false.
    pub fn open_child(
        &mut self,
        key: &str,
        kind: ChildKind,
        required: bool,
    ) -> BlockResult<Option<Arc<BlockNode>>> {
        let spec = self.take(key).cloned();
        let child = match spec {
            None if required => {
                return Err(BlockError::new(format!("Parameter '{key}' is missing")));
            }
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(name)) => self.graph.lookup(&name)?,
            Some(Value::Object(map)) => self.graph.open_node(&map, Some(self.read_only), false)?,
            Some(_) => return Err(type_error(key, "BlockdevRef")),
        };
        let (perm, shared) = kind.child_perms(Perm::NONE, Perm::ALL, !self.read_only);
        let holder = format!("node '{}'", self.ensure_name()?);
        let use_id = child.add_use(&holder, key, perm, shared)?;
        self.children.push(crate::node::ChildEdge {
            name: key.to_string(),
            kind,
            node: child.clone(),
            use_id,
        });
        Ok(Some(child))
    }

    pub(crate) fn unknown_option(&self) -> Option<BlockError> {
        let key = self
            .options
            .keys()
            .find(|k| !COMMON_OPTIONS.contains(&k.as_str()) && !self.consumed.contains(k))?;
        Some(BlockError::new(format!("Parameter '{key}' is unexpected")))
    }
}

fn type_error(key: &str, expected: &str) -> BlockError {
    BlockError::new(format!(
        "Invalid parameter type for '{key}', expected: {expected}"
    ))
}
