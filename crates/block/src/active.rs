//! Active and inactive nodes (QEMU's `bdrv_activate`/`bdrv_inactivate`, what
//! `blockdev-set-active` runs): the handover of images between processes on migration. An
//! inactive node has written out what it caches and marked its image clean; it takes no
//! writes, and its children let other processes write the image. Activating reads the image
//! anew.

use std::sync::Arc;

use crate::error::{BlockError, BlockResult};
use crate::graph::BlockGraph;
use crate::node::{BlockNode, Parent};
use crate::perm::Perm;

/// Whether `node` has a parent node (an active one, if `only_active`): QEMU's
/// `bdrv_has_bds_parent`.
fn has_node_parent(node: &BlockNode, only_active: bool) -> bool {
    node.parents().iter().any(|p| match p {
        Parent::Node { node: parent, .. } => !only_active || parent.is_active(),
        Parent::Backend(_) => false,
    })
}

/// QEMU's `bdrv_inactivate_recurse`: a node still used by an active parent node is left to
/// that parent's turn; users that are not nodes (exports, jobs) must hold no more than
/// consistent read, and no inactive parent may still need to write (`EPERM`). Then the node,
/// then its children.
fn inactivate_recurse(node: &Arc<BlockNode>) -> BlockResult<()> {
    if has_node_parent(node, true) || !node.is_active() {
        return Ok(());
    }
    let eperm = || BlockError::from_errno(libc::EPERM);
    if node.non_node_users_perm() & !Perm::CONSISTENT_READ != Perm::NONE {
        return Err(eperm());
    }
    let (perm, _) = node.cumulative_perms();
    if perm & (Perm::WRITE | Perm::WRITE_UNCHANGED) != Perm::NONE {
        return Err(eperm());
    }
    node.inactivate_self()?;
    for edge in node.children() {
        inactivate_recurse(&edge.node)?;
    }
    Ok(())
}

/// QEMU's `bdrv_activate`: children first, then the node.
fn activate(node: &Arc<BlockNode>) -> BlockResult<()> {
    for edge in node.children() {
        activate(&edge.node)?;
    }
    node.activate_self()
}

impl BlockGraph {
    /// `blockdev-set-active` on one node (after the look-up): activating activates its
    /// children first; inactivating refuses a node an active node still uses and inactivates
    /// the node's children that no active node uses any more. QEMU's texts.
    pub fn set_node_active(&mut self, node: &Arc<BlockNode>, active: bool) -> BlockResult<()> {
        if active {
            return activate(node);
        }
        if has_node_parent(node, true) {
            return Err(BlockError::new("Node has active parent node"));
        }
        inactivate_recurse(node).map_err(|e| {
            BlockError::new(format!(
                "Failed to inactivate node: {}",
                crate::error::strerror(e.errno().unwrap_or(libc::EIO))
            ))
        })
    }

    /// `blockdev-set-active` without a node: every node, in the graph's order (QEMU's
    /// `bdrv_activate_all`, `bdrv_inactivate_all`: roots first, the rest through them).
    pub fn set_all_active(&mut self, active: bool) -> BlockResult<()> {
        // QEMU walks the monitor's nodes in the order they were added.
        let mut nodes: Vec<Arc<BlockNode>> = self
            .nodes()
            .filter(|n| n.is_monitor_owned())
            .cloned()
            .collect();
        nodes.reverse();
        if active {
            return nodes.iter().try_for_each(activate);
        }
        for node in nodes.iter().filter(|n| !has_node_parent(n, false)) {
            inactivate_recurse(node).map_err(|e| {
                BlockError::new(format!(
                    "Failed to inactivate all nodes: {}",
                    crate::error::strerror(e.errno().unwrap_or(libc::EIO))
                ))
            })?;
        }
        Ok(())
    }
}
