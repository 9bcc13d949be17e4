//! `blockdev-add` from QMP arguments, as the monitor reaches the graph: the JSON is read by
//! QEMU's input visitor into the generated `BlockdevOptions` (its errors in QEMU's words),
//! then opened.

use std::sync::Arc;

use block::{BlockError, BlockGraph, BlockNode, BlockResult};
use qmp_api::BlockdevOptions;
use serde_json::Value;

pub trait AddJson {
    /// `blockdev-add` with these arguments.
    fn blockdev_add_json(&mut self, arguments: &Value) -> BlockResult<Arc<BlockNode>>;
}

impl AddJson for BlockGraph {
    fn blockdev_add_json(&mut self, arguments: &Value) -> BlockResult<Arc<BlockNode>> {
        let options: BlockdevOptions =
            qmp_api::input::from_value(arguments).map_err(|e| BlockError::new(e.desc))?;
        self.blockdev_add(&options)
    }
}
