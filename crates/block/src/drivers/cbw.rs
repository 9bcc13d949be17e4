//! `copy-before-write`: a filter over its `file` that, before a range of the file is
//! overwritten, copies the old data to `target` (QEMU's `block/copy-before-write.c`). The copy
//! state is a [`BlockCopy`], the same one a backup job copies through (a backup makes one of
//! these filters over its source). The copy-before-write hooks the `file` node itself, so a
//! write reaches it first whichever way it comes (through this filter, or to the file
//! directly, e.g. through an export of the file node).
//!
//! The filter keeps the point-in-time view of its file as it was when it opened
//! ([`SnapshotView`]), which a `snapshot-access` node over it reads; when the target's backing
//! chain holds the file (fleecing into an overlay of the live node), reads of the target are
//! held against the copies that would change what they read through to the file.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp_api::{BlockdevOptionsCbw, OnCbwError};

use crate::copy::{BlockCopy, CopyBeforeWriteHook, DEFAULT_CLUSTER, OnCopyError};
use crate::driver::{BlockDriver, ChildKind, DriverInfo, OpenContext, SnapshotView};
use crate::error::{BlockError, BlockResult};
use crate::node::{BeforeRead, BlockNode, ChainStatus, NotifierHandle};

/// A copy-before-write filter node.
pub struct CbwDriver {
    file: Arc<BlockNode>,
    target: Arc<BlockNode>,
    copy: Arc<BlockCopy>,
    /// The hooks on `file` (before writes) and on `target` (around fleecing reads); dropped at
    /// close.
    hooks: Mutex<Vec<NotifierHandle>>,
}

/// Reads of a fleecing target, held against the copies to it.
struct FenceReads(Arc<BlockCopy>);

impl BeforeRead for FenceReads {
    fn before_read(&self, offset: u64, len: u64) -> Box<dyn Send> {
        Box::new(self.0.fence_read(offset, len))
    }
}

/// The size of what a copy-before-write copies (QEMU's `block_copy_calculate_cluster_size`): at
/// least 64 KiB and `min-cluster-size`, and the target's cluster size when it has one.
fn cluster_size(target: &BlockNode, min_cluster_size: Option<u64>) -> BlockResult<u64> {
    let min = min_cluster_size.unwrap_or(0);
    if min > i64::MAX as u64 {
        return Err(BlockError::new(format!(
            "min-cluster-size too large: {min} > {}",
            i64::MAX
        )));
    }
    if min != 0 && !min.is_power_of_two() {
        // QEMU says it while creating its block-copy state.
        return Err(BlockError::new(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2",
        ));
    }
    let target_cluster = target.driver().info().cluster_size.unwrap_or(0);
    Ok(DEFAULT_CLUSTER.max(min).max(target_cluster))
}

/// Opens the filter: its `file` and `target`, the copy state (`bitmap` limits it, as QEMU's
/// copy bitmap starts from that bitmap), and the hooks.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsCbw,
) -> BlockResult<Box<dyn BlockDriver>> {
    let file = ctx.open_child("file", &options.file, ChildKind::Filtered)?;
    let target = ctx.open_child("target", &options.target, ChildKind::CopyTarget)?;
    let ranges = match &options.bitmap {
        None => None,
        Some(bitmap) => {
            let node = ctx
                .graph
                .find(&bitmap.node)
                .ok_or_else(|| BlockError::new(format!("Node '{}' not found", bitmap.node)))?;
            let bitmaps = node.bitmaps();
            let found = bitmaps
                .iter()
                .find(|b| b.name() == Some(bitmap.name.as_str()))
                .ok_or_else(|| {
                    BlockError::new(format!("Dirty bitmap '{}' not found", bitmap.name))
                })?;
            let size = file.size()?;
            if found.size() != size {
                return Err(BlockError::new(format!(
                    "Cannot create block-copy-state: Failed to merge bitmap '{}' to internal \
                     copy-bitmap: Bitmaps are of different sizes (destination size is {size}, \
                     source size is {})",
                    bitmap.name,
                    found.size()
                )));
            }
            Some(found.dirty_ranges(0, size).collect::<Vec<_>>())
        }
    };
    let cluster = cluster_size(&target, options.min_cluster_size)?;
    let on_error = match options.on_cbw_error {
        Some(OnCbwError::BreakSnapshot) => OnCopyError::BreakSnapshot,
        Some(OnCbwError::BreakGuestWrite) | None => OnCopyError::FailWrite,
    };
    let timeout = options
        .cbw_timeout
        .filter(|&seconds| seconds > 0)
        .map(|seconds| Duration::from_secs(u64::from(seconds)));
    let copy = BlockCopy::new(
        file.clone(),
        target.clone(),
        file.size()?,
        cluster,
        ctx.graph.copy_buffers().clone(),
    )
    .on_error(on_error)
    .timeout(timeout);
    if let Some(ranges) = ranges {
        copy.restrict_to(&ranges);
    }
    let copy = Arc::new(copy);
    let mut hooks = vec![file.add_write_notifier(Arc::new(CopyBeforeWriteHook(copy.clone())))];
    if target.chain_contains(&file) {
        hooks.push(target.add_read_notifier(Arc::new(FenceReads(copy.clone()))));
    }
    Ok(Box::new(CbwDriver {
        file,
        target,
        copy,
        hooks: Mutex::new(hooks),
    }))
}

impl CbwDriver {
    /// The copy state (a backup copies through it).
    pub fn block_copy(&self) -> &Arc<BlockCopy> {
        &self.copy
    }
}

impl BlockDriver for CbwDriver {
    /// QEMU's copy-before-write is a filter: its file counts as a layer below it.
    fn filtered_child(&self) -> Option<&'static str> {
        Some("file")
    }

    fn size(&self) -> BlockResult<u64> {
        self.file.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.file.read_at(offset, buf)
    }

    /// The copy-before-write runs on the file's hook, then the file takes the write.
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.file.write_at(offset, buf)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.file.write_zeroes_at(offset, len)
    }

    fn write_zeroes_fast_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.file.write_zeroes_fast_at(offset, len)
    }

    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.file.discard_child_at(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        self.file.block_status(offset, len)
    }

    fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        self.file.zero_status(offset, len)
    }

    fn unallocated_reads_zero(&self) -> bool {
        self.file.driver().unallocated_reads_zero()
    }

    /// QEMU's filter takes its file's name, and its cluster size and dirty flag (which QEMU
    /// reads through filters).
    fn info(&self) -> DriverInfo {
        let file = self.file.driver().info();
        DriverInfo {
            filename: Some(crate::graph::node_filename(&self.file)),
            cluster_size: file.cluster_size,
            dirty_flag: file.dirty_flag,
            ..DriverInfo::default()
        }
    }

    /// QEMU's filter keeps three anonymous bitmaps on its node (the view's accessible part,
    /// what copy-before-writes copied, what is still to copy), and shows them.
    fn internal_bitmaps(&self) -> Vec<(u64, u64)> {
        let granularity = self.copy.cluster_size();
        self.copy
            .bitmap_counts()
            .into_iter()
            .map(|count| (granularity, count))
            .collect()
    }

    fn block_copy(&self) -> Option<&Arc<BlockCopy>> {
        Some(&self.copy)
    }

    fn snapshot_view(&self) -> Option<&dyn SnapshotView> {
        Some(self)
    }

    fn close(&self) -> BlockResult<()> {
        self.copy.stop();
        crate::node::lock(&self.hooks).clear();
        Ok(())
    }
}

impl SnapshotView for CbwDriver {
    fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let lock = self.copy.snapshot_read(at, (buf.len() - done) as u64)?;
            let n = lock.len as usize;
            let chunk = &mut buf[done..done + n];
            if lock.from_target {
                self.target.read_at(at, chunk)?;
            } else {
                self.file.read_at(at, chunk)?;
            }
            drop(lock);
            done += n;
        }
        Ok(())
    }

    fn snapshot_status(&self, offset: u64, len: u64) -> BlockResult<ChainStatus> {
        let lock = self.copy.snapshot_read(offset, len)?;
        let node = if lock.from_target {
            &self.target
        } else {
            &self.file
        };
        let mut status = node.chain_status(offset, lock.len)?;
        if lock.from_target && !status.data && !status.zero {
            // Copied ranges are the target's own: a hole there holds no data of the source.
            status.zero = true;
        }
        status.len = status.len.min(lock.len);
        Ok(status)
    }

    fn snapshot_discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self.copy.snapshot_discard(offset, len) {
            Some((start, n)) => self.target.discard_at(start, n),
            None => Ok(()),
        }
    }
}
