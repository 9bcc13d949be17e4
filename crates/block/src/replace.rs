//! `replace_node`: every parent of a node moves onto another node (QEMU's
//! `bdrv_replace_node`), as a mirror's pivot, an active commit's completion or a filter's
//! insertion and removal need it. Either every parent moves, or (a permission conflict, a
//! driver that cannot follow its child) nothing changes.

use std::sync::Arc;

use crate::error::{BlockError, BlockResult};
use crate::node::{BlockNode, ParentLink, ParentUse};

/// Whether `node` is `root` or below it (through any child edge).
fn reaches(root: &Arc<BlockNode>, node: &Arc<BlockNode>) -> bool {
    if Arc::ptr_eq(root, node) {
        return true;
    }
    root.children().iter().any(|edge| reaches(&edge.node, node))
}

/// Moves every parent of `from` (the nodes that have it as a child, and the
/// [`crate::BlockBackend`]s on it) onto `to`, with the same roles and permissions. A parent
/// that is `to` itself or lies below `to` stays (moving it would make a loop, QEMU's
/// `should_update_child`), as do uses that are no parent (a job's own grants).
///
/// The permissions every moving parent holds are taken on `to` first; if `to` cannot grant
/// them (a conflict, a read-only node) or a parent's driver cannot follow its child, the
/// error is returned and nothing has moved.
pub fn replace_node(from: &Arc<BlockNode>, to: &Arc<BlockNode>) -> BlockResult<()> {
    if Arc::ptr_eq(from, to) {
        return Ok(());
    }
    let moving: Vec<ParentUse> = from
        .parent_uses()
        .into_iter()
        .filter(|u| match &u.link {
            ParentLink::Node(w) => w.upgrade().is_some_and(|p| !reaches(to, &p)),
            ParentLink::Backend(w) => w.upgrade().is_some(),
        })
        .collect();
    // Check: each parent's driver follows the edge; `to` grants what each parent holds.
    for u in &moving {
        if let ParentLink::Node(w) = &u.link
            && let Some(parent) = w.upgrade()
            && u.role != "backing"
            && !parent.driver().follows_child(&u.role)
        {
            return Err(BlockError::new(format!(
                "Cannot change '{}' link from '{}' to '{}': the '{}' driver cannot change \
                 that child",
                u.role,
                parent.name(),
                to.name(),
                parent.driver_name()
            )));
        }
    }
    // Taken on `to`, oldest parent first so the parent list keeps its order (newest first).
    let mut taken: Vec<u64> = Vec::with_capacity(moving.len());
    for u in moving.iter().rev() {
        match to.add_use_linked(&u.holder, &u.role, (u.perm, u.shared), Some(u.link.clone())) {
            Ok(id) => taken.push(id),
            Err(e) => {
                for id in taken {
                    to.remove_use(id);
                }
                return Err(e);
            }
        }
    }
    taken.reverse();
    // Commit: each parent now points at `to`; `from` loses their uses.
    for (u, &new_id) in moving.iter().zip(&taken) {
        let moved = match &u.link {
            ParentLink::Node(w) => w
                .upgrade()
                .is_some_and(|p| p.retarget_edge(u.id, to, new_id).is_some()),
            ParentLink::Backend(w) => w.upgrade().is_some_and(|b| b.retarget(u.id, to, new_id)),
        };
        if moved {
            from.remove_use(u.id);
        } else {
            to.remove_use(new_id);
        }
    }
    Ok(())
}
