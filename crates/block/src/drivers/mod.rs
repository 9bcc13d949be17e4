//! The built-in drivers, one per branch of the generated `BlockdevOptions`: each opens from
//! its branch's options (`BlockdevOptionsFile`, `BlockdevOptionsQcow2`, ...).

pub mod blkdebug;
pub mod cbw;
pub mod copy_on_read;
pub mod file;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod raw;
pub mod snapshot_access;
pub mod throttle;

use qmp_api::{BlockdevDriver, BlockdevOptionsBranch, BlockdevRefOrNull};

use crate::driver::{BlockDriver, OpenContext};
use crate::error::BlockResult;

/// Opens the driver `branch` names, with its options.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    branch: &BlockdevOptionsBranch,
) -> BlockResult<Box<dyn BlockDriver>> {
    match branch {
        BlockdevOptionsBranch::Blkdebug(o) => blkdebug::open(ctx, o),
        BlockdevOptionsBranch::File(o) => file::open(ctx, o),
        BlockdevOptionsBranch::Nbd(o) => nbd::open(ctx, o),
        BlockdevOptionsBranch::NullCo(o) => null::open(ctx, o),
        BlockdevOptionsBranch::Qcow2(o) => qcow2::open(ctx, o),
        BlockdevOptionsBranch::Raw(o) => raw::open(ctx, o),
        BlockdevOptionsBranch::CopyBeforeWrite(o) => cbw::open(ctx, o),
        BlockdevOptionsBranch::SnapshotAccess(o) => snapshot_access::open(ctx, o),
        BlockdevOptionsBranch::Throttle(o) => throttle::open(ctx, o),
        BlockdevOptionsBranch::CopyOnRead(o) => copy_on_read::open(ctx, o),
    }
}

/// QEMU's protocol-style drivers (`file`, `nbd`, `null-co`, `blkdebug`) get their node name before
/// their children open; formats (`raw`, `qcow2`) open their `file` child first. This fixes the
/// `#blockNNN` counters and the order of `query-named-block-nodes`.
pub(crate) fn is_protocol(driver: BlockdevDriver) -> bool {
    matches!(
        driver,
        BlockdevDriver::File
            | BlockdevDriver::Nbd
            | BlockdevDriver::NullCo
            | BlockdevDriver::Blkdebug
    )
}

/// The `backing` option of a format with backing files.
pub(crate) fn backing_option(branch: &BlockdevOptionsBranch) -> Option<&BlockdevRefOrNull> {
    match branch {
        BlockdevOptionsBranch::Qcow2(o) => o.backing.as_deref(),
        _ => None,
    }
}

/// The block drivers QEMU 10.0 has (its `BlockdevDriver`): a name outside them is an
/// `Unknown driver` (or, to create an image, an `Unknown file format`) as in QEMU; a name in
/// them that this block layer lacks is refused naming it.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Whether QEMU 10.0 has a block driver named `name`.
pub fn is_qemu_driver(name: &str) -> bool {
    QEMU_DRIVERS.contains(&name)
}
