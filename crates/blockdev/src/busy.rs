//! Whether a command may act on a node, decided in one place: QEMU's operation blockers
//! (`bdrv_op_is_blocked`: the node's blockers are data on the node, set by its backing
//! parents and by the jobs that use it), its root-node rule (`qmp_get_root_bs`: nothing but an
//! export may use the node) and `blockdev-del`'s checks. Every command that consults them
//! calls these functions, in the order QEMU checks.

use std::sync::Arc;

use block::{BlockOp, OpSet, Perm};
use job::JobKey;
use qmp_api::{JobType, QmpError};

use crate::BlockState;
use crate::claims::JobNode;
use crate::node::BlockIo;

/// The role of the node a block job is created on (QEMU's `block_job_create`).
pub(crate) const MAIN_NODE: &str = "main node";

impl BlockState {
    /// `Node '<name>' is busy: <reason>` if `op` is blocked on `node` (QEMU's
    /// `bdrv_op_is_blocked`). A node that does not exist blocks nothing.
    pub(crate) fn check_op(&self, node: &str, op: BlockOp) -> Result<(), QmpError> {
        match self.graph.as_ref().and_then(|g| g.op_blockers(node)) {
            Some(blockers) => blockers.check(node, op).map_err(QmpError::generic),
            None => Ok(()),
        }
    }

    /// Whether only exports use `node` (QEMU's `bdrv_is_root_node`: every parent is a block
    /// backend): no node has it as a child and no job uses it.
    pub(crate) fn is_root(&self, node: &str) -> bool {
        let parents = self.graph.as_ref().is_some_and(|g| g.has_parent_node(node));
        !parents && !self.claims.is_claimed(node)
    }

    /// QEMU's `qmp_get_root_bs`: the node named `name` (`Cannot find device=... nor
    /// node-name=...`), which must be a root (`Need a root block node`).
    pub(crate) fn root_node(&self, name: &str) -> Result<Arc<dyn BlockIo>, QmpError> {
        let node = self.lookup(name)?;
        if !self.is_root(name) {
            return Err(QmpError::generic("Need a root block node"));
        }
        Ok(node)
    }

    /// `blockdev-del`'s checks, in QEMU's order: the node exists, no export uses it, it is not
    /// blocked for deletion, the monitor added it, and nothing else (a parent node, a job)
    /// uses it.
    pub(crate) fn check_deletable(&self, name: &str) -> Result<(), QmpError> {
        let facts = self.graph.as_ref().and_then(|g| g.node_facts(name));
        let Some(facts) = facts else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        if self.exports.is_exported(name) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        self.check_op(name, BlockOp::DriveDel)?;
        if !facts.monitor_owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if facts.in_use || self.claims.is_claimed(name) {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        Ok(())
    }

    /// Records that job `key` of type `job_type` uses `node` in `role` with `perm`/`shared`
    /// (QEMU's `block_job_add_bdrv`), blocking `blocks` on it with the job's reason until the
    /// job releases its nodes.
    pub(crate) fn add_job_node(
        &self,
        key: JobKey,
        job_type: JobType,
        node: &str,
        role: &'static str,
        blocks: OpSet,
    ) {
        let blocker = (blocks != OpSet::default())
            .then(|| self.graph.as_ref().and_then(|g| g.op_blockers(node)))
            .flatten()
            .map(|list| {
                list.block(
                    format!("block device is in use by block job: {job_type}"),
                    blocks,
                )
            });
        let use_ = JobNode {
            job: key,
            role,
            perm: Perm::NONE,
            shared: Perm::ALL,
        };
        self.claims.claim(node, use_, blocker);
    }
}
