//! The block layer: a graph of named nodes with drivers (file, raw, null-co, blkdebug, qcow2,
//! and format drivers plugged in from outside), permissions and image locking, and dirty bitmaps
//! as data (the QMP bitmap commands are the command layer's, `blockdev`).

pub mod bitmap;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod graph;
pub mod io;
pub mod node;
pub mod perm;

pub use bitmap::DirtyBitmap;
pub use driver::{
    BitmapStore, BlkdebugEvent, BlockDriver, ChildKind, DriverInfo, DriverSpec, InternalSnapshots,
    OpenContext,
};
pub use error::{BlockError, BlockResult};
pub use graph::BlockGraph;
pub use io::PageBuf;
pub use node::{
    BeforeWrite, BlockNode, ChainStatus, ChildEdge, Extent, NotifierHandle, OpBlocker, PermGrant,
};
pub use perm::Perm;
