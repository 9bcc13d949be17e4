//! Operation blockers as data (QEMU's `bdrv_op_block`/`bdrv_op_is_blocked`): each node keeps a
//! list of blockers, newest first; a blocker is a reason and the set of operations it blocks.
//! An operation is refused with the newest blocker that blocks it: `Node '<name>' is busy:
//! <reason>`.
//!
//! Who blocks what (QEMU's rules): a node used as a backing file blocks everything but commit
//! (as target), stream and backup (either end) for as long as its parent uses it (the graph
//! sets that blocker on every `backing` edge); a block job blocks everything on every node it
//! adds (the command layer sets those).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The operations a blocker can forbid (QEMU's `BlockOpType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockOp {
    BackupSource,
    BackupTarget,
    Change,
    CommitSource,
    CommitTarget,
    Dataplane,
    DriveDel,
    Eject,
    ExternalSnapshot,
    InternalSnapshot,
    InternalSnapshotDelete,
    MirrorSource,
    MirrorTarget,
    Resize,
    Stream,
    Replace,
}

impl BlockOp {
    fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// A set of [`BlockOp`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpSet(u32);

impl OpSet {
    /// Every operation (QEMU's `bdrv_op_block_all`).
    pub const ALL: OpSet = OpSet((1 << (BlockOp::Replace as u32 + 1)) - 1);

    /// What a backing edge blocks on the backing node: everything except committing into it,
    /// streaming from it and backing it up or into it (QEMU's `bdrv_backing_attach`).
    pub const BACKING: OpSet = OpSet::ALL
        .without(BlockOp::CommitTarget)
        .without(BlockOp::Stream)
        .without(BlockOp::BackupSource)
        .without(BlockOp::BackupTarget);

    /// What a block job blocks on its main node (every operation but dataplane, which has no
    /// meaning here); its other nodes are blocked for [`OpSet::ALL`].
    pub const JOB_MAIN: OpSet = OpSet::ALL.without(BlockOp::Dataplane);

    /// This set less `op`.
    pub const fn without(self, op: BlockOp) -> OpSet {
        OpSet(self.0 & !(1 << op as u32))
    }

    /// Whether `op` is in the set.
    pub fn contains(self, op: BlockOp) -> bool {
        self.0 & op.bit() != 0
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    reason: String,
    ops: OpSet,
}

/// One node's blockers, newest first. Shared by the node and the [`OpBlocker`] handles.
#[derive(Debug, Default)]
pub struct OpBlockers {
    entries: Mutex<Vec<Entry>>,
    next: Mutex<u64>,
}

impl OpBlockers {
    /// An empty list.
    pub fn new() -> Arc<OpBlockers> {
        Arc::new(OpBlockers::default())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks `ops` with `reason` until the returned handle drops.
    pub fn block(self: &Arc<Self>, reason: impl Into<String>, ops: OpSet) -> OpBlocker {
        let id = self.add(reason, ops);
        OpBlocker {
            list: Arc::downgrade(self),
            id,
        }
    }

    /// Blocks `ops` with `reason` until [`OpBlockers::remove`] is called with the id returned
    /// (for blockers owned by the graph's own edges).
    pub fn add(&self, reason: impl Into<String>, ops: OpSet) -> u64 {
        let id = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            *next += 1;
            *next
        };
        self.lock().insert(
            0,
            Entry {
                id,
                reason: reason.into(),
                ops,
            },
        );
        id
    }

    /// Removes the blocker `id` (nothing if it is gone).
    pub fn remove(&self, id: u64) {
        self.lock().retain(|e| e.id != id);
    }

    /// The reason of the newest blocker of `op`, if any.
    pub fn reason(&self, op: BlockOp) -> Option<String> {
        self.lock()
            .iter()
            .find(|e| e.ops.contains(op))
            .map(|e| e.reason.clone())
    }

    /// `Node '<node>' is busy: <reason>` if `op` is blocked (QEMU's `bdrv_op_is_blocked`).
    pub fn check(&self, node: &str, op: BlockOp) -> Result<(), String> {
        match self.reason(op) {
            Some(reason) => Err(format!("Node '{node}' is busy: {reason}")),
            None => Ok(()),
        }
    }

    /// Whether no blocker is set.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// A blocker on one node; removed when dropped.
#[derive(Debug)]
pub struct OpBlocker {
    list: std::sync::Weak<OpBlockers>,
    id: u64,
}

impl Drop for OpBlocker {
    fn drop(&mut self) {
        if let Some(list) = self.list.upgrade() {
            list.remove(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_blocker_of_an_operation_is_the_one_reported() {
        let list = OpBlockers::new();
        let _old = list.block("old reason", OpSet::ALL);
        let new = list.block("new reason", OpSet::BACKING);
        assert_eq!(
            list.check("n", BlockOp::Resize),
            Err("Node 'n' is busy: new reason".to_string())
        );
        // The newer blocker lets streams through; the older one does not.
        assert_eq!(
            list.check("n", BlockOp::Stream),
            Err("Node 'n' is busy: old reason".to_string())
        );
        drop(new);
        assert_eq!(
            list.check("n", BlockOp::Resize),
            Err("Node 'n' is busy: old reason".to_string())
        );
    }

    #[test]
    fn a_backing_blocker_lets_commit_stream_and_backup_through() {
        let list = OpBlockers::new();
        let _b = list.block("node is used as backing hd of 'top'", OpSet::BACKING);
        for op in [
            BlockOp::CommitTarget,
            BlockOp::Stream,
            BlockOp::BackupSource,
            BlockOp::BackupTarget,
        ] {
            assert_eq!(list.check("n", op), Ok(()));
        }
        for op in [
            BlockOp::Resize,
            BlockOp::DriveDel,
            BlockOp::ExternalSnapshot,
            BlockOp::Change,
            BlockOp::MirrorSource,
            BlockOp::CommitSource,
        ] {
            assert!(list.check("n", op).is_err(), "{op:?}");
        }
    }

    #[test]
    fn a_dropped_handle_unblocks_and_an_empty_list_blocks_nothing() {
        let list = OpBlockers::new();
        let b = list.block("r", OpSet::ALL);
        assert!(!list.is_empty());
        drop(b);
        assert!(list.is_empty());
        assert_eq!(list.check("n", BlockOp::DriveDel), Ok(()));
    }
}
