//! `snapshot-access`: reads the point-in-time view its `file` keeps (QEMU's
//! `block/snapshot-access.c`; the file is a copy-before-write filter). Writes fail with
//! `ENOTSUP`; a discard drops the range from the view (the filter stops copying it and frees
//! it on its target), so a fleecing client can say what it has read. Block status is the
//! view's: a range already copied reads as the target holds it, the rest as the file's layers
//! do.

use std::sync::Arc;

use qmp_api::BlockdevOptionsGenericFormat;

use crate::driver::{BlockDriver, ChildKind, DriverInfo, OpenContext, SnapshotView};
use crate::error::{BlockError, BlockResult};
use crate::node::BlockNode;

/// A snapshot-access node.
pub struct SnapshotAccessDriver {
    file: Arc<BlockNode>,
}

/// Opens the node over its `file` (taking no permission on it, as QEMU).
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsGenericFormat,
) -> BlockResult<Box<dyn BlockDriver>> {
    let file = ctx.open_child("file", &options.file, ChildKind::SnapshotOf)?;
    Ok(Box::new(SnapshotAccessDriver { file }))
}

impl SnapshotAccessDriver {
    /// The file's view; a file without one fails every request with `ENOTSUP`, as QEMU's
    /// snapshot-access does over a node that is not a copy-before-write filter.
    fn view(&self) -> BlockResult<&dyn SnapshotView> {
        self.file
            .driver()
            .snapshot_view()
            .ok_or_else(|| BlockError::from_errno(libc::ENOTSUP))
    }
}

impl BlockDriver for SnapshotAccessDriver {
    fn size(&self) -> BlockResult<u64> {
        self.file.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.view()?.snapshot_read(offset, buf)
    }

    fn write_at(&self, _offset: u64, _buf: &[u8]) -> BlockResult<()> {
        Err(BlockError::from_errno(libc::ENOTSUP))
    }

    fn write_zeroes_at(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Err(BlockError::from_errno(libc::ENOTSUP))
    }

    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.view()?.snapshot_discard(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        let (allocated, _, n) = self.zero_status(offset, len)?;
        Ok((allocated, n))
    }

    /// The view holds all of its data: every range is this layer's, data or zeroes as the
    /// layer the view reads it from says.
    fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        let status = self.view()?.snapshot_status(offset, len)?;
        Ok((
            true,
            status.zero && !status.data,
            status.len.max(1).min(len),
        ))
    }

    /// QEMU's node takes its file's name.
    fn info(&self) -> DriverInfo {
        DriverInfo {
            filename: Some(crate::graph::node_filename(&self.file)),
            ..DriverInfo::default()
        }
    }

    fn close(&self) -> BlockResult<()> {
        Ok(())
    }
}
