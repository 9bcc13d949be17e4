//! A mirror's graph side over the block crate (QEMU's `mirror_top` filter driver): the filter
//! node above the source, its writes handed to the mirror ([`FilterWrites`]), the pivot
//! ([`block::replace_node`]) and the removal; and the `BlockBackend` I/O exports use so that a
//! pivot moves them.

use std::io;
use std::sync::{Arc, Weak};

use block::graph::node_filename;
use block::{
    BlockBackend, BlockDriver, BlockError, BlockGraph, BlockNode, BlockResult, ChildKind,
    ChildSlot, DriverInfo, Perm,
};

use crate::block_layer::{NodeBitmapList, NodeIo, io_error};
use crate::node::{BlockIo, Extent, FilterWrites, ImageRef, MirrorNodes, NodeBitmaps};

/// The filter's child role (QEMU names it `backing`; `file` keeps the node out of backing
/// chains in `query-named-block-nodes`, where QEMU shows no backing file for it either).
const ROLE: &str = "file";

fn block_error(e: io::Error) -> BlockError {
    match e.raw_os_error() {
        Some(errno) => BlockError::from_errno(errno),
        None => BlockError::new(e.to_string()),
    }
}

/// The `mirror_top` driver: reads pass to the source; writes go through the mirror, which
/// records them in this node's dirty bitmap.
struct MirrorTop {
    /// The filter's own node (it holds the mirror's dirty bitmap).
    node: Weak<BlockNode>,
    child: ChildSlot,
    writes: Arc<dyn FilterWrites>,
}

impl MirrorTop {
    fn write(
        &self,
        (offset, len, data): (u64, u64, Option<&[u8]>),
        below: &mut dyn FnMut() -> io::Result<()>,
    ) -> BlockResult<()> {
        // A driver is dropped with its node: the node is there while it takes requests.
        let node = self
            .node
            .upgrade()
            .ok_or_else(|| BlockError::from_errno(libc::ENOMEDIUM))?;
        self.writes
            .write(&NodeBitmapList(node), offset, len, data, below)
            .map_err(block_error)
    }
}

impl BlockDriver for MirrorTop {
    fn size(&self) -> BlockResult<u64> {
        self.child.get().size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.child.get().read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        let mut below = || self.child.get().write_at(offset, buf).map_err(io_error);
        self.write((offset, buf.len() as u64, Some(buf)), &mut below)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        let mut below = || {
            self.child
                .get()
                .write_zeroes_at(offset, len)
                .map_err(io_error)
        };
        self.write((offset, len, None), &mut below)
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn block_status(&self, _offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        // A filter allocates nothing itself: status comes from below.
        Ok((false, len))
    }

    fn zero_status(&self, _offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        Ok((false, false, len))
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            filename: Some(node_filename(&self.child.get())),
            ..DriverInfo::default()
        }
    }

    fn follows_child(&self, role: &str) -> bool {
        role == ROLE
    }

    /// QEMU's `mirror_top` is a filter: its child counts as a layer (`backing_file_depth`).
    fn filtered_child(&self) -> Option<&'static str> {
        Some(ROLE)
    }

    fn replace_child(&self, role: &str, node: Arc<BlockNode>) {
        if role == ROLE {
            self.child.set(node);
        }
    }
}

/// A running mirror's filter, source and target nodes.
pub(crate) struct MirrorGraph {
    filter: Arc<BlockNode>,
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    /// Every node, as when the mirror started (for `replaces` and the target's backing).
    nodes: Vec<Arc<BlockNode>>,
}

/// Inserts the filter above `source`.
pub(crate) fn insert(
    graph: &mut BlockGraph,
    (source, target): (&str, &str),
    name: Option<&str>,
    writes: Arc<dyn FilterWrites>,
) -> BlockResult<MirrorGraph> {
    let source = graph.lookup(source)?;
    let target = graph.lookup(target)?;
    let make_driver = |node: &Weak<BlockNode>| -> Box<dyn BlockDriver> {
        Box::new(MirrorTop {
            node: node.clone(),
            child: ChildSlot::new(source.clone()),
            writes,
        })
    };
    let filter = graph.insert_filter(name, "mirror_top", make_driver, (&source, ROLE))?;
    let nodes = graph.nodes().cloned().collect();
    Ok(MirrorGraph {
        filter,
        source,
        target,
        nodes,
    })
}

impl MirrorGraph {
    fn find(&self, name: &str) -> Option<Arc<BlockNode>> {
        self.nodes.iter().find(|n| n.name() == name).cloned()
    }
}

impl MirrorNodes for MirrorGraph {
    fn filter_name(&self) -> String {
        self.filter.name().to_string()
    }

    fn bitmaps(&self) -> Arc<dyn NodeBitmaps> {
        Arc::new(NodeBitmapList(self.filter.clone()))
    }

    fn pivot(&self, to_replace: &str) -> Result<(), String> {
        let replaced = if to_replace == self.source.name() {
            self.source.clone()
        } else {
            self.find(to_replace)
                .ok_or_else(|| format!("Node name '{to_replace}' not found"))?
        };
        if replaced.is_read_only() != self.target.is_read_only() && replaced.is_read_only() {
            // QEMU reopens the target to the replaced node's read-only flag (best effort).
            let _ = self.target.reopen_read_only();
        }
        block::replace_node(&replaced, &self.target).map_err(|e| e.desc().to_string())?;
        // The filter now sits on the target (it was a parent of the replaced node) or still
        // on the source; either way its parents go to the target.
        block::replace_node(&self.filter, &self.target).map_err(|e| e.desc().to_string())
    }

    fn remove_filter(&self) {
        let below = self
            .filter
            .child(ROLE)
            .unwrap_or_else(|| self.source.clone());
        if let Err(e) = block::replace_node(&self.filter, &below) {
            tracing::warn!(
                "mirror: removing filter {}: {}",
                self.filter.name(),
                e.desc()
            );
        }
    }

    fn set_target_backing(&self, backing: &str) -> Result<(), String> {
        let node = self
            .find(backing)
            .ok_or_else(|| format!("Node name '{backing}' not found"))?;
        if self
            .target
            .child("backing")
            .is_some_and(|b| Arc::ptr_eq(&b, &node))
        {
            return Ok(());
        }
        if let Some(old) = self.target.detach_child("backing") {
            drop(old);
        }
        self.target
            .attach_child("backing", ChildKind::Backing, node.clone())
            .map_err(|e| e.desc().to_string())?;
        self.target.driver().set_backing(Some(node));
        Ok(())
    }
}

/// An export's I/O through a [`BlockBackend`]: it follows its root when a pivot moves it.
pub(crate) struct BackendIo {
    backend: Arc<BlockBackend>,
    /// The root's format when the backend was made.
    format: String,
}

impl BackendIo {
    fn io(&self) -> NodeIo {
        NodeIo(self.backend.root())
    }
}

impl BlockIo for BackendIo {
    fn format(&self) -> &str {
        &self.format
    }

    fn image(&self) -> ImageRef {
        self.io().image()
    }

    fn backing_image(&self) -> Option<ImageRef> {
        self.io().backing_image()
    }

    fn backing_node(&self) -> Option<String> {
        self.io().backing_node()
    }

    fn size(&self) -> u64 {
        self.io().size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.io().read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.io().write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.io().write_zeroes(offset, len)
    }

    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.io().write_zeroes_unmap(offset, len)
    }

    fn discard_unmaps(&self) -> bool {
        self.io().discard_unmaps()
    }

    fn read_only(&self) -> bool {
        self.io().read_only()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.io().cluster_size()
    }

    fn supports_compressed_writes(&self) -> bool {
        self.io().supports_compressed_writes()
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.io().write_compressed(buf, offset)
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<()> {
        self.io().write_zeroes_fast(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.io().discard(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.io().block_status(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        self.io().flush()
    }

    fn chain_status(&self, offset: u64, len: u64) -> Option<io::Result<block::ChainStatus>> {
        self.io().chain_status(offset, len)
    }
}

/// A backend on `node` for `holder`.
pub(crate) fn backend(
    node: &Arc<BlockNode>,
    holder: &str,
    writable: bool,
) -> BlockResult<Arc<dyn BlockIo>> {
    let perm = if writable {
        Perm::CONSISTENT_READ | Perm::WRITE
    } else {
        Perm::CONSISTENT_READ
    };
    // Everything but resize shared, as QEMU's exports share (nbd_export_create).
    let backend = BlockBackend::new(node, holder, perm, Perm::ALL & !Perm::RESIZE)?;
    Ok(Arc::new(BackendIo {
        backend,
        format: node.driver_name().to_string(),
    }))
}
