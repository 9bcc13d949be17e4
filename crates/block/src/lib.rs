//! The block layer: a graph of named nodes with drivers (file, raw, null-co, blkdebug, and
//! format drivers plugged in from outside), permissions and image locking, and dirty bitmaps
//! with their QMP-level operations and transaction actions.

pub mod bitmap;
pub mod error;
pub mod perm;

pub use bitmap::DirtyBitmap;
pub use error::{BlockError, BlockResult};
pub use perm::Perm;
