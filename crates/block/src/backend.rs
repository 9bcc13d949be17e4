//! `BlockBackend`: a user of a node that is not a node (an NBD export, a job's target), as
//! QEMU's `BlockBackend`. It holds permissions on its root node and is one of the node's
//! parents: [`crate::replace_node`] moves it to another node with the others (a mirror's
//! pivot moves an export to the mirror's target).

use std::sync::{Arc, Mutex, Weak};

use crate::error::BlockResult;
use crate::node::{BlockNode, ParentLink, lock};
use crate::perm::Perm;

/// A non-node parent of a node: holds `perm` on its root, sharing `shared`, until dropped.
pub struct BlockBackend {
    holder: String,
    /// The root node and the id of the use held on it.
    root: Mutex<(Arc<BlockNode>, u64)>,
}

impl BlockBackend {
    /// Attaches a backend named `holder` (e.g. `export 'e0'`) to `node`, taking `perm` and
    /// sharing `shared`. Fails with QEMU's permission texts.
    pub fn new(
        node: &Arc<BlockNode>,
        holder: &str,
        perm: Perm,
        shared: Perm,
    ) -> BlockResult<Arc<BlockBackend>> {
        let mut failure = None;
        let backend = Arc::new_cyclic(|me: &Weak<BlockBackend>| {
            let id = match node.add_use_linked(
                holder,
                "root",
                (perm, shared),
                Some(ParentLink::Backend(me.clone())),
            ) {
                Ok(id) => id,
                Err(e) => {
                    failure = Some(e);
                    0
                }
            };
            BlockBackend {
                holder: holder.to_string(),
                root: Mutex::new((node.clone(), id)),
            }
        });
        match failure {
            Some(e) => {
                // Nothing was taken: make the drop release nothing.
                lock(&backend.root).1 = 0;
                Err(e)
            }
            None => Ok(backend),
        }
    }

    /// The node the backend reads and writes now.
    pub fn root(&self) -> Arc<BlockNode> {
        lock(&self.root).0.clone()
    }

    /// Who holds the backend (as permission errors name it).
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Points the backend at `to`, whose use `new_id` was taken already, if it is still on
    /// the use `old_id`; returns the old root.
    pub(crate) fn retarget(&self, old_id: u64, to: &Arc<BlockNode>, new_id: u64) -> bool {
        let mut root = lock(&self.root);
        if root.1 != old_id {
            return false;
        }
        *root = (to.clone(), new_id);
        true
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        let (node, id) = {
            let root = lock(&self.root);
            (root.0.clone(), root.1)
        };
        if id != 0 {
            node.remove_use(id);
        }
    }
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("holder", &self.holder)
            .field("root", &self.root().name())
            .finish()
    }
}
