//! `raw`: the image is the child's bytes, optionally a window `offset`/`size` of them.

use std::sync::Arc;

use qmp_api::BlockdevOptionsRaw;

use crate::driver::{BlkdebugEvent, BlockDriver, ChildKind, DriverInfo, OpenContext};
use crate::error::{BlockError, BlockResult};
use crate::node::BlockNode;

/// A raw format node.
pub struct RawDriver {
    file: crate::node::ChildSlot,
    offset: u64,
    size: Option<u64>,
}

/// Opens a raw node over its `file`, optionally a window `offset`/`size` of it.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsRaw,
) -> BlockResult<Box<dyn BlockDriver>> {
    let non_negative = |name: &str, v: i64| {
        u64::try_from(v).map_err(|_| {
            BlockError::new(format!("Parameter '{name}' expects a non-negative value"))
        })
    };
    let offset = options
        .offset
        .map(|v| non_negative("offset", v))
        .transpose()?
        .unwrap_or(0);
    let size = options.size.map(|v| non_negative("size", v)).transpose()?;
    let file = ctx.open_child("file", &options.file, ChildKind::Filtered)?;
    let real = file.size()?;
    if offset > real {
        return Err(BlockError::new(format!(
            "Offset ({offset}) cannot be greater than size of the containing file ({real})"
        )));
    }
    if let Some(size) = size {
        if real - offset < size {
            return Err(BlockError::new(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to \
                 the  actual size of the containing file ({real})"
            )));
        }
        if size % 512 != 0 {
            return Err(BlockError::new("Specified size is not multiple of 512"));
        }
    }
    Ok(Box::new(RawDriver {
        file: crate::node::ChildSlot::new(file),
        offset,
        size,
    }))
}

impl RawDriver {
    fn window(&self, offset: u64, len: u64) -> BlockResult<u64> {
        if let Some(size) = self.size
            && (offset > size || len > size - offset)
        {
            return Err(BlockError::from_errno(libc::EINVAL));
        }
        self.offset
            .checked_add(offset)
            .ok_or_else(|| BlockError::from_errno(libc::EINVAL))
    }
}

impl BlockDriver for RawDriver {
    fn follows_child(&self, role: &str) -> bool {
        role == "file"
    }

    fn replace_child(&self, role: &str, node: Arc<BlockNode>) {
        if role == "file" {
            self.file.set(node);
        }
    }

    fn size(&self) -> BlockResult<u64> {
        match self.size {
            Some(s) => Ok(s),
            None => Ok(self.file.get().size()?.saturating_sub(self.offset)),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let at = self.window(offset, buf.len() as u64)?;
        self.file.get().debug_event(BlkdebugEvent::ReadAio);
        self.file.get().read_at(at, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        let at = self.window(offset, buf.len() as u64)?;
        self.file.get().debug_event(BlkdebugEvent::WriteAio);
        self.file.get().write_at(at, buf)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        let at = self.window(offset, len)?;
        self.file.get().write_zeroes_at(at, len)
    }

    fn write_zeroes_unmap_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        let at = self.window(offset, len)?;
        self.file.get().write_zeroes_unmap_at(at, len)
    }

    fn write_zeroes_fast_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        let at = self.window(offset, len)?;
        self.file.get().write_zeroes_fast_at(at, len)
    }

    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        let at = self.window(offset, len)?;
        self.file.get().discard_child_at(at, len)
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn truncate(&self, size: u64) -> BlockResult<()> {
        if self.size.is_some() || self.offset != 0 {
            return Err(BlockError::with_errno(
                "Cannot resize fixed-size raw disks",
                libc::ENOTSUP,
            ));
        }
        self.file.get().truncate(size)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        let at = self.window(offset, len)?;
        self.file.get().block_status(at, len)
    }

    fn unallocated_reads_zero(&self) -> bool {
        self.file.get().driver().unallocated_reads_zero()
    }

    /// The file's status, zeroes included (QEMU's raw passes block status down whole).
    fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        let at = self.window(offset, len)?;
        self.file.get().zero_status(at, len)
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }

    fn close(&self) -> BlockResult<()> {
        Ok(())
    }
}
