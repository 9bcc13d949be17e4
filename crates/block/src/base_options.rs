//! The generic options every node takes (the base of `BlockdevOptions`, QEMU's
//! `bdrv_runtime_opts`): `cache.direct`, `cache.no-flush`, `force-share`, `auto-read-only`,
//! `detect-zeroes` (beside `read-only` and `discard`). [`NodeFlags`] is what they come to for
//! one node: its own options, else what its parent passes down ([`Inherited`], QEMU's
//! `bdrv_inherited_options` and `bdrv_backing_options`), checked as QEMU's
//! `bdrv_open_common` checks them, in its order and words.
//!
//! Where they act (and `discard`, whose default below a format is `unmap`): `cache.direct` in the `file` driver (`O_DIRECT`, aligned bounce buffers),
//! `cache.no-flush` in [`crate::BlockNode::flush`] (the flush to disk is skipped, the
//! format's own write-back and the children's flushes are not), `detect-zeroes` in
//! [`crate::BlockNode::write_at`] (a write of zeroes becomes a write-zeroes request, allowed
//! to unmap with `unmap`), `force-share` on the edges into the node (a parent shares every
//! permission with others, so image locks of other processes do not conflict), and
//! `auto-read-only` in the `file` driver (opened read-only until a user wants to write).

use qmp_api::{BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevOptions};

use crate::error::{BlockError, BlockResult};

/// The generic options as they act on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFlags {
    /// Opened read-only.
    pub read_only: bool,
    /// `cache.direct`: the host page cache is bypassed (`O_DIRECT`).
    pub direct: bool,
    /// `cache.no-flush`: flushes do not reach the disk.
    pub no_flush: bool,
    /// `force-share`: users of the node share every permission with others.
    pub force_share: bool,
    /// `auto-read-only`: a `file` is opened read-only until a user wants to write.
    pub auto_read_only: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: BlockdevDetectZeroesOptions,
    /// `discard=unmap` (given, or a format's data child's default): discards and
    /// write-zeroes that may unmap free storage.
    pub discard_unmap: bool,
}

impl Default for NodeFlags {
    fn default() -> Self {
        NodeFlags {
            read_only: false,
            direct: false,
            no_flush: false,
            force_share: false,
            auto_read_only: false,
            detect_zeroes: BlockdevDetectZeroesOptions::Off,
            discard_unmap: false,
        }
    }
}

/// What a parent passes to a child it opens: values the child takes unless it sets its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inherited {
    read_only: Option<bool>,
    auto_read_only: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    force_share: Option<bool>,
    /// A format's data child defaults to `discard=unmap` (formats pass on only the discards
    /// their own policy allows).
    discard_unmap: bool,
}

impl Inherited {
    /// Nothing inherited (a node `blockdev-add` names, or one a command opens itself).
    pub fn none() -> Self {
        Inherited::default()
    }

    /// Read-only and nothing else (an image a command opens below another).
    pub fn read_only() -> Self {
        Inherited {
            read_only: Some(true),
            ..Inherited::default()
        }
    }

    /// What `parent` passes to a child it opens in a role other than `backing` (QEMU's
    /// `bdrv_inherited_options`): read-only, auto-read-only, the cache mode and
    /// force-share; `discard=unmap` as default below a format.
    pub fn child_of(parent: &NodeFlags, parent_is_format: bool) -> Self {
        Inherited {
            read_only: Some(parent.read_only),
            auto_read_only: Some(parent.auto_read_only),
            direct: Some(parent.direct),
            no_flush: Some(parent.no_flush),
            force_share: Some(parent.force_share),
            discard_unmap: parent_is_format,
        }
    }

    /// What `overlay` passes to its backing file (QEMU's `bdrv_backing_options`): the cache
    /// mode and force-share; read-only, not auto-read-only, by default.
    pub fn backing_of(overlay: &NodeFlags) -> Self {
        Inherited {
            read_only: Some(true),
            auto_read_only: Some(false),
            direct: Some(overlay.direct),
            no_flush: Some(overlay.no_flush),
            force_share: Some(overlay.force_share),
            discard_unmap: false,
        }
    }

    /// The read-only flag passed down, if any.
    pub fn read_only_flag(&self) -> Option<bool> {
        self.read_only
    }
}

/// The node's flags from its options and what it inherits, refused as QEMU's
/// `bdrv_open_common` refuses them (force-share on a writable node, then detect-zeroes=unmap
/// without discard=unmap).
pub fn resolve(options: &BlockdevOptions, inherited: &Inherited) -> BlockResult<NodeFlags> {
    let cache = options.cache.as_ref();
    let flags = NodeFlags {
        read_only: options.read_only.or(inherited.read_only).unwrap_or(false),
        direct: cache
            .and_then(|c| c.direct)
            .or(inherited.direct)
            .unwrap_or(false),
        no_flush: cache
            .and_then(|c| c.no_flush)
            .or(inherited.no_flush)
            .unwrap_or(false),
        force_share: options
            .force_share
            .or(inherited.force_share)
            .unwrap_or(false),
        auto_read_only: options
            .auto_read_only
            .or(inherited.auto_read_only)
            .unwrap_or(false),
        detect_zeroes: options
            .detect_zeroes
            .unwrap_or(BlockdevDetectZeroesOptions::Off),
        discard_unmap: match options.discard {
            Some(d) => d == BlockdevDiscardOptions::Unmap,
            None => inherited.discard_unmap,
        },
    };
    if flags.force_share && !flags.read_only {
        return Err(BlockError::new(
            "force-share=on can only be used with read-only images",
        ));
    }
    if flags.detect_zeroes == BlockdevDetectZeroesOptions::Unmap && !flags.discard_unmap {
        return Err(BlockError::new(
            "setting detect-zeroes to unmap is not allowed without setting discard operation \
             to unmap",
        ));
    }
    Ok(flags)
}

/// QEMU's check after a node opened that every option was used: an empty `cache` object
/// stays behind (it sets nothing), and the driver is said not to support it.
pub fn check_unused(options: &BlockdevOptions, protocol: bool) -> BlockResult<()> {
    let Some(cache) = &options.cache else {
        return Ok(());
    };
    if cache.direct.is_some() || cache.no_flush.is_some() {
        return Ok(());
    }
    let driver = options.branch.kind().as_str();
    Err(BlockError::new(if protocol {
        format!("Block protocol '{driver}' doesn't support the option 'cache'")
    } else {
        format!("Block format '{driver}' does not support the option 'cache'")
    }))
}

/// Whether `buf` is all zeroes (QEMU's `buffer_is_zero`).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the middle.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for i in [0, 1, 7, 8, 4095, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
    }
}
