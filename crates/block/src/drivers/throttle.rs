//! `throttle`: a filter whose requests wait for the limits of a throttle group
//! ([`crate::throttle`]), shared with every other node of the group.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use qmp_api::BlockdevOptionsThrottle;

use crate::driver::{BlockDriver, ChildKind, DriverInfo, OpenContext};
use crate::error::{BlockError, BlockResult};
use crate::node::{BlockNode, ChildSlot};
use crate::throttle::ThrottleGroup;

/// A throttle node.
pub struct ThrottleDriver {
    file: ChildSlot,
    group: Arc<ThrottleGroup>,
    /// Still a member of the group (left at close).
    member: AtomicBool,
}

/// Opens a throttle node over its `file`, in the group `throttle-group` names.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsThrottle,
) -> BlockResult<Box<dyn BlockDriver>> {
    let file = ctx.open_child("file", &options.file, ChildKind::Filtered)?;
    let group = ctx
        .graph
        .throttle_groups()
        .get(&options.throttle_group)
        .ok_or_else(|| {
            BlockError::new(format!(
                "Throttle group '{}' does not exist",
                options.throttle_group
            ))
        })?;
    group.join();
    Ok(Box::new(ThrottleDriver {
        file: ChildSlot::new(file),
        group,
        member: AtomicBool::new(true),
    }))
}

impl ThrottleDriver {
    fn leave(&self) {
        if self.member.swap(false, Ordering::AcqRel) {
            self.group.leave();
        }
    }
}

impl Drop for ThrottleDriver {
    fn drop(&mut self) {
        self.leave();
    }
}

impl BlockDriver for ThrottleDriver {
    fn follows_child(&self, role: &str) -> bool {
        role == "file"
    }

    fn replace_child(&self, role: &str, node: Arc<BlockNode>) {
        if role == "file" {
            self.file.set(node);
        }
    }

    fn size(&self) -> BlockResult<u64> {
        self.file.get().size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.group.admit(false, buf.len() as u64);
        self.file.get().read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.group.admit(true, buf.len() as u64);
        self.file.get().write_at(offset, buf)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        // QEMU's throttle counts a zero write as a write of its length.
        self.group.admit(true, len);
        self.file.get().write_zeroes_at(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn truncate(&self, size: u64) -> BlockResult<()> {
        self.file.get().truncate(size)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        self.file.get().block_status(offset, len)
    }

    fn zero_status(&self, offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        self.file.get().zero_status(offset, len)
    }

    fn info(&self) -> DriverInfo {
        // The group is one of the options that make the node what it is: QEMU names it with
        // a `json:` name spelling out its child.
        let options = serde_json::json!({
            "driver": "throttle",
            "throttle-group": self.group.name(),
            "file": crate::graph::full_options(&self.file.get()),
        });
        DriverInfo {
            filename: Some(crate::graph::json_filename(&options)),
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }

    fn close(&self) -> BlockResult<()> {
        self.leave();
        Ok(())
    }
}
