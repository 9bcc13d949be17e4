//! Image creation (QEMU's `bdrv_co_create` of each driver, what `blockdev-create` runs):
//! `file` creates a file; `qcow2` writes an image onto an open node, after QEMU's checks of
//! its options, in QEMU's order and words. Options this block layer does not implement are
//! refused, naming them, before anything is written.

use std::sync::Arc;

use qmp_api::{
    BlockdevCreateOptionsQcow2, BlockdevQcow2Version, PreallocMode, Qcow2CompressionType,
};

use crate::error::{BlockError, BlockResult};
use crate::node::BlockNode;
use crate::perm::Perm;

pub use crate::drivers::file::create as create_file;

fn refuse(option: &str) -> BlockError {
    BlockError::new(format!(
        "Parameter '{option}' is not supported by this block layer"
    ))
}

/// The preallocation mode in the qcow2 crate's terms.
pub fn preallocation(mode: PreallocMode) -> qcow2::Preallocation {
    match mode {
        PreallocMode::Off => qcow2::Preallocation::Off,
        PreallocMode::Metadata => qcow2::Preallocation::Metadata,
        PreallocMode::Falloc => qcow2::Preallocation::Falloc,
        PreallocMode::Full => qcow2::Preallocation::Full,
    }
}

/// QEMU's checks of qcow2 creation options (`qcow2_co_create`), in its order and words,
/// then the options this layer does not implement; the result is what the image becomes.
pub fn qcow2_options(o: &BlockdevCreateOptionsQcow2) -> BlockResult<qcow2::CreateOptions> {
    const V3: &str = "compatibility level 1.1 and above (use version=v3 or greater)";
    if !o.size.is_multiple_of(512) {
        return Err(BlockError::new(
            "Image size must be a multiple of 512 bytes",
        ));
    }
    let version = match o.version {
        Some(BlockdevQcow2Version::V2) => 2,
        _ => 3,
    };
    let cluster_size = o.cluster_size.unwrap_or(65536);
    let extended_l2 = o.extended_l2.unwrap_or(false);
    if extended_l2 && version < 3 {
        return Err(BlockError::new(format!(
            "Extended L2 entries are only supported with {V3}"
        )));
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(BlockError::new(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(BlockError::new(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let prealloc = o.preallocation.unwrap_or(PreallocMode::Off);
    if o.backing_file.is_some() && prealloc != PreallocMode::Off && !extended_l2 {
        return Err(BlockError::new(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err(BlockError::new(
            "Backing format cannot be used without backing file",
        ));
    }
    let lazy_refcounts = o.lazy_refcounts.unwrap_or(false);
    if version < 3 && lazy_refcounts {
        return Err(BlockError::new(format!(
            "Lazy refcounts only supported with {V3}"
        )));
    }
    let refcount_bits = o.refcount_bits.unwrap_or(16);
    let refcount_bits = match u32::try_from(refcount_bits) {
        Ok(bits) if bits <= 64 && bits.is_power_of_two() => bits,
        _ => {
            return Err(BlockError::new(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
    };
    if version < 3 && refcount_bits != 16 {
        return Err(BlockError::new(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use version=v3 or greater)",
        ));
    }
    let data_file_raw = o.data_file_raw.unwrap_or(false);
    if data_file_raw && o.data_file.is_none() {
        return Err(BlockError::new("data-file-raw requires data-file"));
    }
    if data_file_raw && o.backing_file.is_some() {
        return Err(BlockError::new(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    if o.data_file.is_some() {
        if version < 3 {
            return Err(BlockError::new(format!(
                "External data files are only supported with {V3}"
            )));
        }
        return Err(refuse("data-file"));
    }
    if let Some(kind) = o.compression_type
        && kind != Qcow2CompressionType::Zlib
    {
        if version < 3 {
            return Err(BlockError::new(format!(
                "Non-zlib compression type is only supported with {V3}"
            )));
        }
        return Err(BlockError::new(format!(
            "Parameter 'compression-type' is not supported with value {kind} by this block layer"
        )));
    }
    if extended_l2 {
        return Err(BlockError::new(
            "Parameter 'extended-l2' is not supported with value true by this block layer",
        ));
    }
    if o.encrypt.is_some() {
        return Err(refuse("encrypt"));
    }
    if version < 3 && prealloc != PreallocMode::Off {
        return Err(BlockError::new(
            "Parameter 'preallocation' is not supported with version v2 by this block layer",
        ));
    }
    Ok(qcow2::CreateOptions {
        size: o.size,
        version,
        cluster_size,
        refcount_bits,
        lazy_refcounts,
        backing: o
            .backing_file
            .clone()
            .map(|name| (name, o.backing_fmt.map(|f| f.as_str().to_string()))),
        preallocation: preallocation(prealloc),
    })
}

/// Writes a qcow2 image as `options` say onto `file` (its content is replaced), holding
/// write and resize on it as an unnamed block device does in QEMU: a node that does not
/// share them (a qcow2 node open on the file) makes it fail with QEMU's permission
/// conflict.
pub fn create_qcow2(file: &Arc<BlockNode>, options: &qcow2::CreateOptions) -> BlockResult<()> {
    let _grant = file.take_perm(
        "an unnamed block device",
        "root",
        Perm::WRITE | Perm::RESIZE,
        Perm::ALL,
    )?;
    crate::drivers::qcow2::create_on(file, options)
}
