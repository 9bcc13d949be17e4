//! Metadata overlap protection (QEMU's `overlap-check`): before any cluster of the image file
//! is written, data or metadata, the write is compared with the image's own metadata; a write
//! that would land on it is refused, and the image is marked corrupt.
//!
//! The checks are QEMU's, with its names and templates: `none`, `constant` (header, active
//! L1 table, refcount table, snapshot table, bitmap directory), `cached` (the default:
//! `constant` plus every active L2 table and refcount block, which the in-memory L1 and
//! refcount tables list, and the snapshots' L1 tables) and `all` (`cached` plus the
//! snapshots' L2 tables, read from the file for each check). Each check can be switched on or
//! off on top of a template, as QEMU's `overlap-check.<name>` booleans do.

/// A kind of metadata a write is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metadata {
    /// The header cluster.
    MainHeader,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table of the active L1 table.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
    /// An L2 table of a snapshot.
    InactiveL2,
    /// The bitmap directory.
    BitmapDirectory,
}

impl Metadata {
    /// Every kind, in QEMU's bit order.
    pub const ALL: [Metadata; 9] = [
        Metadata::MainHeader,
        Metadata::ActiveL1,
        Metadata::ActiveL2,
        Metadata::RefcountTable,
        Metadata::RefcountBlock,
        Metadata::SnapshotTable,
        Metadata::InactiveL1,
        Metadata::InactiveL2,
        Metadata::BitmapDirectory,
    ];

    /// QEMU's name in messages (`overlaps with active L1 table`).
    pub fn name(self) -> &'static str {
        match self {
            Metadata::MainHeader => "qcow2_header",
            Metadata::ActiveL1 => "active L1 table",
            Metadata::ActiveL2 => "active L2 table",
            Metadata::RefcountTable => "refcount table",
            Metadata::RefcountBlock => "refcount block",
            Metadata::SnapshotTable => "snapshot table",
            Metadata::InactiveL1 => "inactive L1 table",
            Metadata::InactiveL2 => "inactive L2 table",
            Metadata::BitmapDirectory => "bitmap directory",
        }
    }

    /// The member of `Qcow2OverlapCheckFlags` that switches this check.
    pub fn option(self) -> &'static str {
        match self {
            Metadata::MainHeader => "main-header",
            Metadata::ActiveL1 => "active-l1",
            Metadata::ActiveL2 => "active-l2",
            Metadata::RefcountTable => "refcount-table",
            Metadata::RefcountBlock => "refcount-block",
            Metadata::SnapshotTable => "snapshot-table",
            Metadata::InactiveL1 => "inactive-l1",
            Metadata::InactiveL2 => "inactive-l2",
            Metadata::BitmapDirectory => "bitmap-directory",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// Which metadata writes are checked against (QEMU's `overlap-check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlapChecks(u16);

impl OverlapChecks {
    /// No checks.
    pub const NONE: OverlapChecks = OverlapChecks(0);
    /// What is checked without reading anything: header, active L1 table, refcount table,
    /// snapshot table, bitmap directory.
    pub const CONSTANT: OverlapChecks = OverlapChecks(
        (1 << Metadata::MainHeader as u16)
            | (1 << Metadata::ActiveL1 as u16)
            | (1 << Metadata::RefcountTable as u16)
            | (1 << Metadata::SnapshotTable as u16)
            | (1 << Metadata::BitmapDirectory as u16),
    );
    /// `CONSTANT` plus the tables known in memory: active L2 tables, refcount blocks and the
    /// snapshots' L1 tables (QEMU's default).
    pub const CACHED: OverlapChecks = OverlapChecks(
        Self::CONSTANT.0
            | (1 << Metadata::ActiveL2 as u16)
            | (1 << Metadata::RefcountBlock as u16)
            | (1 << Metadata::InactiveL1 as u16),
    );
    /// Everything, the snapshots' L2 tables included (read from the file on every write).
    pub const ALL: OverlapChecks =
        OverlapChecks(Self::CACHED.0 | (1 << Metadata::InactiveL2 as u16));

    /// A template by its `Qcow2OverlapCheckMode` name.
    pub fn template(name: &str) -> Option<OverlapChecks> {
        match name {
            "none" => Some(Self::NONE),
            "constant" => Some(Self::CONSTANT),
            "cached" => Some(Self::CACHED),
            "all" => Some(Self::ALL),
            _ => None,
        }
    }

    /// These checks with `m` switched on or off.
    pub fn with(self, m: Metadata, on: bool) -> OverlapChecks {
        if on {
            OverlapChecks(self.0 | m.bit())
        } else {
            OverlapChecks(self.0 & !m.bit())
        }
    }

    /// Whether writes are checked against `m`.
    pub fn contains(self, m: Metadata) -> bool {
        self.0 & m.bit() != 0
    }
}

impl Default for OverlapChecks {
    fn default() -> Self {
        Self::CACHED
    }
}

/// The image found inconsistent on a write and marked corrupt (QEMU's
/// `BLOCK_IMAGE_CORRUPTED`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// What was found, e.g. `Preventing invalid write on metadata (overlaps with active L1
    /// table)`.
    pub message: String,
    /// Where in the image file, if known.
    pub offset: Option<u64>,
    /// How many bytes, if known.
    pub size: Option<u64>,
}

/// Called once when an image is marked corrupt. It runs with the image's metadata lock held:
/// it must only record or queue, never call back into the image.
pub type CorruptionListener = std::sync::Arc<dyn Fn(&Corruption) + Send + Sync>;

/// Whether `[a, a + alen)` and `[b, b + blen)` share a byte.
pub(crate) fn ranges_overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_nest_as_in_qemu() {
        for m in Metadata::ALL {
            assert!(!OverlapChecks::NONE.contains(m));
            assert!(OverlapChecks::ALL.contains(m));
            if OverlapChecks::CONSTANT.contains(m) {
                assert!(OverlapChecks::CACHED.contains(m));
            }
        }
        assert!(!OverlapChecks::CACHED.contains(Metadata::InactiveL2));
        assert!(!OverlapChecks::CONSTANT.contains(Metadata::ActiveL2));
        assert_eq!(OverlapChecks::default(), OverlapChecks::CACHED);
        assert_eq!(
            OverlapChecks::NONE.with(Metadata::ActiveL1, true),
            OverlapChecks::CONSTANT
                .with(Metadata::MainHeader, false)
                .with(Metadata::RefcountTable, false)
                .with(Metadata::SnapshotTable, false)
                .with(Metadata::BitmapDirectory, false)
        );
    }

    #[test]
    fn overlap_is_half_open() {
        assert!(ranges_overlap(0, 10, 9, 1));
        assert!(!ranges_overlap(0, 10, 10, 1));
        assert!(!ranges_overlap(0, 0, 0, 10));
        assert!(ranges_overlap(u64::MAX - 4, 10, u64::MAX - 5, 3));
    }
}
