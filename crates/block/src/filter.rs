//! The filter nodes block jobs insert above a node while they run, as QEMU does: a stream's
//! `copy-on-read` filter above the node it streams into, a commit's `commit_top` above the top
//! of what it commits, an active commit's `mirror_top` above the active layer. Each shows its
//! one child's data unchanged and is listed in `query-named-block-nodes` under the job's
//! `filter-node-name` (or a generated name) until the job removes it. Inserted and removed by
//! [`crate::BlockGraph::insert_filter`] and [`crate::BlockGraph::remove_filter`].

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::driver::{BlockDriver, DriverInfo};
use crate::error::{BlockError, BlockResult};
use crate::graph::node_filename;
use crate::node::{BlockNode, ChildSlot};

/// Which filter a job inserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterKind {
    /// A stream's: reads copy what the layers down to `bottom` (a node name; `None`: the
    /// whole chain) hold into the child's own layer. Its child is `file`.
    CopyOnRead {
        /// The lowest layer whose data is copied.
        bottom: Option<String>,
    },
    /// An intermediate commit's: read-only, above the top of what is committed. Its child is
    /// `backing`.
    CommitTop,
    /// An active commit's (and a mirror's): above the active layer. Its child is `backing`.
    MirrorTop,
}

impl FilterKind {
    /// The driver name QEMU shows (`drv`, `image.format`).
    pub fn driver_name(&self) -> &'static str {
        match self {
            FilterKind::CopyOnRead { .. } => "copy-on-read",
            FilterKind::CommitTop => "commit_top",
            FilterKind::MirrorTop => "mirror_top",
        }
    }

    /// The role of its child.
    pub fn child_role(&self) -> &'static str {
        match self {
            FilterKind::CopyOnRead { .. } => "file",
            FilterKind::CommitTop | FilterKind::MirrorTop => "backing",
        }
    }

    /// Whether QEMU opens it read-only (`commit_top` takes no write on its child).
    pub fn read_only(&self) -> bool {
        matches!(self, FilterKind::CommitTop)
    }

    /// The options the node records (they make its `json:` file name, as QEMU's
    /// `full_open_options` do).
    pub(crate) fn options(&self, name: &str, child: &BlockNode) -> Value {
        let mut options = Map::new();
        options.insert("driver".into(), json!(self.driver_name()));
        options.insert("node-name".into(), json!(name));
        options.insert(self.child_role().into(), crate::graph::full_options(child));
        Value::Object(options)
    }
}

/// The driver of a job's filter node.
pub(crate) struct FilterDriver {
    kind: FilterKind,
    /// Follows the edge when the graph moves it.
    child: ChildSlot,
    /// Named by the job (QEMU: not `implicit`): a `copy-on-read` filter then has a `json:`
    /// file name of its own; an implicit one shows its child's.
    named: bool,
    /// The node's own options (for its `json:` file name).
    options: Value,
}

impl FilterDriver {
    pub(crate) fn new(
        kind: FilterKind,
        child: Arc<BlockNode>,
        named: bool,
        options: Value,
    ) -> Self {
        FilterDriver {
            kind,
            child: ChildSlot::new(child),
            named,
            options,
        }
    }
}

impl BlockDriver for FilterDriver {
    fn size(&self) -> BlockResult<u64> {
        self.child.get().size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let child = self.child.get();
        if let FilterKind::CopyOnRead { bottom } = &self.kind
            && !child.is_read_only()
        {
            // Guest reads populate the child, as QEMU's copy-on-read filter does.
            let end = offset + buf.len() as u64;
            let mut pos = offset;
            let mut bounce = vec![0u8; buf.len().clamp(1, 1 << 20)];
            while pos < end {
                let (n, _) = child.copy_on_read(pos, end - pos, bottom.as_deref(), &mut bounce)?;
                pos += n.max(1).min(end - pos);
            }
        }
        child.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        if self.kind.read_only() {
            return Err(BlockError::from_errno(libc::EPERM));
        }
        self.child.get().write_at(offset, buf)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.kind.read_only() {
            return Err(BlockError::from_errno(libc::EPERM));
        }
        self.child.get().write_zeroes_at(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        // The node flushes its child after this.
        Ok(())
    }

    /// Nothing is allocated in the filter itself: status comes from the child, a layer below.
    fn block_status(&self, _offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        Ok((false, len))
    }

    fn info(&self) -> DriverInfo {
        let child = self.child.get();
        let child_info = child.driver().info();
        let filename = match (&self.kind, self.named) {
            (FilterKind::CopyOnRead { .. }, true) => crate::graph::json_filename(&self.options),
            _ => node_filename(&child),
        };
        DriverInfo {
            filename: Some(filename),
            actual_size: crate::graph::actual_size(&child),
            cluster_size: child_info.cluster_size,
            dirty_flag: Some(false),
            format_specific: None,
        }
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some(self.kind.child_role())
    }

    fn follows_child(&self, role: &str) -> bool {
        role == self.kind.child_role()
    }

    fn replace_child(&self, role: &str, node: Arc<BlockNode>) {
        if role == self.kind.child_role() {
            self.child.set(node);
        }
    }
}
