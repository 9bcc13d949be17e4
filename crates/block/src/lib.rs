//! The block layer: a graph of named nodes with drivers (file, raw, null-co, blkdebug, qcow2,
//! and format drivers plugged in from outside), permissions and image locking, and dirty bitmaps
//! with their QMP-level operations and transaction actions.

pub mod bitmap;
pub mod bitmap_cmd;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod graph;
pub mod io;
pub mod node;
pub mod perm;
pub mod transaction;

pub use bitmap::DirtyBitmap;
pub use driver::{
    BitmapStore, BlkdebugEvent, BlockDriver, ChildKind, DriverInfo, DriverSpec, InternalSnapshots,
    OpenContext, SnapshotSummary,
};
pub use error::{BlockError, BlockResult};
pub use graph::BlockGraph;
pub use io::PageBuf;
pub use node::{BeforeWrite, BlockNode, ChildEdge, NotifierHandle, OpBlocker, PermGrant};
pub use perm::Perm;
pub use transaction::{TransactionAction, run_transaction};
