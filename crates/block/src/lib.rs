//! The block layer: a graph of named nodes with drivers (file, raw, null-co, blkdebug, qcow2,
//! nbd, copy-before-write, snapshot-access), permissions and image locking, dirty bitmaps as
//! data (the QMP bitmap commands are the command layer's, `blockdev`), and block copy
//! ([`copy`]: the state a backup and the copy-before-write filter share).

pub mod active;
pub mod backend;
pub mod base_options;
pub mod bitmap;
pub mod blocker;
pub mod copy;
pub mod create;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod filter;
pub mod graph;
pub mod io;
pub mod node;
pub mod perm;
pub mod reopen;
pub mod replace;
mod requests;
pub mod throttle;

pub use backend::BlockBackend;
pub use bitmap::DirtyBitmap;
pub use blocker::{BlockOp, OpBlocker, OpBlockers, OpSet};
pub use driver::{
    BitmapStore, BlkdebugEvent, BlockDriver, BlockEvent, BlockEventSink, ChildKind, DriverInfo,
    InternalSnapshots, OpenContext, SnapshotView,
};
pub use error::{BlockError, BlockResult};
pub use filter::FilterKind;
pub use graph::{BackingName, BlockGraph};
pub use io::PageBuf;
pub use node::{
    BeforeRead, BeforeWrite, BlockNode, ChainStatus, ChildEdge, ChildSlot, Extent, NotifierHandle,
    Parent, PermGrant,
};
pub use perm::Perm;
pub use replace::replace_node;

#[cfg(test)]
pub(crate) mod test_support {
    //! `blockdev-add` from QMP arguments for the unit tests (see `tests/common`).

    use std::sync::Arc;

    use crate::{BlockError, BlockGraph, BlockNode, BlockResult};

    pub(crate) trait AddJson {
        fn blockdev_add_json(
            &mut self,
            arguments: &serde_json::Value,
        ) -> BlockResult<Arc<BlockNode>>;
    }

    impl AddJson for BlockGraph {
        fn blockdev_add_json(
            &mut self,
            arguments: &serde_json::Value,
        ) -> BlockResult<Arc<BlockNode>> {
            let options: qmp_api::BlockdevOptions =
                qmp_api::input::from_value(arguments).map_err(|e| BlockError::new(e.desc))?;
            self.blockdev_add(&options)
        }
    }
}
