//! The qcow2 image format: reads versions 2 and 3 (standard, zero and compressed clusters,
//! backing files), writes version 3 with crash-safe metadata ordering, creates images, and
//! manages internal snapshots and persistent dirty bitmaps, over any [`Storage`].
//!
//! The crate knows nothing about the block layer: an image sits on a [`Storage`] (a file, or
//! a block-layer node) and falls through to a [`Backing`] image for unallocated clusters.
//! [`Image`] methods take `&self` and may be called from several threads at once.
//!
//! Crash safety: refcount blocks reach the storage (and a flush) before the L2 tables that
//! reference new clusters, L2 tables before the L1 entries that point to them, and clusters are
//! freed only after the references to them are stored. A crash at any point therefore leaves at
//! worst leaked clusters, never a cluster referenced without a refcount. Creating a snapshot
//! changes refcounts and COPIED flags that live in different clusters, so it stores the whole
//! new state (L1/L2 copies, snapshot table, refcount table and blocks) past everything in use
//! and switches to it with one header write. Because refcounts are always kept ahead, this
//! crate never marks an image dirty; an image left dirty by QEMU's lazy refcounts gets its
//! refcounts rebuilt when opened read-write (as QEMU repairs it).

mod bitmap;
mod cache;
mod cleaner;
mod header;
mod image;
mod meta;
mod overlap;
mod repair;
mod resize;
mod snapshot;
mod storage;

pub use bitmap::PersistentBitmap;
pub use image::{Allocation, Image, ImageInfo, create};
pub use overlap::{Corruption, CorruptionListener, Metadata, OverlapChecks};
pub use resize::{CreateOptions, Preallocation, create_with};
pub use snapshot::SnapshotInfo;
pub use storage::{Backing, PageBuf, RawImage, Storage};

/// Everything that can go wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The image's metadata is invalid or inconsistent.
    #[error("invalid qcow2 image: {0}")]
    Invalid(String),
    /// The image uses a feature this implementation does not support.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// The image is marked corrupt: it opens read-only only, and an image marked corrupt
    /// while open takes no more I/O.
    #[error("qcow2 image is marked corrupt; repair it with 'qemu-img check -r all'")]
    Corrupt,
    /// A write would have landed on the image's own metadata (QEMU's `overlap-check`), or an
    /// allocation the metadata makes invalid (a refcount block at offset 0): refused, and the
    /// image marked corrupt.
    #[error("{0}")]
    MetadataOverlap(String),
    /// A write was attempted on an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// The caller passed an invalid argument (out of range, bad name, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A snapshot or bitmap of that name does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The backing file could not be opened.
    #[error("could not open backing file '{path}': {reason}")]
    Backing {
        /// The backing file's name as resolved.
        path: String,
        /// Why it failed.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}
