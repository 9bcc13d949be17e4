//! Node management commands (QEMU's `blockdev.c` and `block/write-threshold.c`):
//! `block_resize`, `blockdev-snapshot-delete-internal-sync`, `change-backing-file` and
//! `block-set-write-threshold` with its `BLOCK_WRITE_THRESHOLD` event. Each makes QEMU's
//! checks in QEMU's order; whether a node may be used is [`crate::busy`]'s to say.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use block::{BeforeWrite, BlockOp, BlockResult, NotifierHandle};
use job::EventSink;
use qmp_api::{
    BlockResizeArguments, BlockSetWriteThresholdArguments, BlockWriteThresholdData,
    BlockdevSnapshotDeleteInternalSyncArguments, ChangeBackingFileArguments, Event, QmpError,
    SnapshotInfo,
};

use crate::BlockState;
use crate::claims::Drain;
use crate::node::not_found;

/// `block_resize`: the node by `device` (none exist here) or `node-name`, a size that is not
/// negative, not blocked for resizing; then, drained, resized holding resize like QEMU's
/// unnamed block device.
pub(crate) fn block_resize(
    env: &mut BlockState,
    args: BlockResizeArguments,
) -> Result<(), QmpError> {
    let device = args.device.as_deref().unwrap_or("");
    let node = match args.node_name.as_deref() {
        Some(name) if env.graph.as_ref().is_some_and(|g| g.node(name).is_some()) => name,
        other => return Err(not_found(device, other.unwrap_or(""))),
    };
    let size = u64::try_from(args.size)
        .map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
    env.check_op(node, BlockOp::Resize)?;
    let _drain = Drain::begin(&env.jobs, &env.claims, env.graph.as_deref(), node);
    env.graph_mut()?.resize(node, size)
}

/// `blockdev-snapshot-delete-internal-sync`: a root node, an id or a name, not blocked; the
/// snapshot matching both (when both are given) is deleted and returned.
pub(crate) fn delete_internal_snapshot(
    env: &mut BlockState,
    args: BlockdevSnapshotDeleteInternalSyncArguments,
) -> Result<SnapshotInfo, QmpError> {
    let device = args.device.as_str();
    env.root_node(device)?;
    if args.id.is_none() && args.name.is_none() {
        return Err(QmpError::generic("Name or id must be provided"));
    }
    env.check_op(device, BlockOp::InternalSnapshotDelete)?;
    let graph = env.graph_mut()?;
    let Some(snapshots) = graph.internal_snapshots(device) else {
        return Err(QmpError::generic(
            "Failed to get a snapshot list: Operation not supported",
        ));
    };
    let found = snapshots.into_iter().find(|s| {
        args.id.as_ref().is_none_or(|id| *id == s.id)
            && args.name.as_ref().is_none_or(|name| *name == s.name)
    });
    let Some(snapshot) = found else {
        let or_null = |v: &Option<String>| v.clone().unwrap_or_else(|| "null".into());
        return Err(QmpError::generic(format!(
            "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
            or_null(&args.id),
            or_null(&args.name)
        )));
    };
    graph.delete_internal_snapshot_id(device, &snapshot.id)?;
    Ok(snapshot)
}

/// `change-backing-file`: `device` must be a root node whose chain holds `image-node-name`,
/// an image with a backing file; the root must not be blocked for changes.
pub(crate) fn change_backing_file(
    env: &mut BlockState,
    args: ChangeBackingFileArguments,
) -> Result<(), QmpError> {
    let device = args.device.as_str();
    env.root_node(device)?;
    let image_name = args.image_node_name.as_str();
    let image = env
        .graph
        .as_ref()
        .and_then(|g| g.node(image_name))
        .ok_or_else(|| not_found("", image_name))?;
    if image.backing_node().is_none() {
        return Err(QmpError::generic(
            "not allowing backing file change on an image without a backing file",
        ));
    }
    env.check_op(device, BlockOp::Change)?;
    if !chain_contains(env, device, image_name) {
        return Err(QmpError::generic(format!(
            "'{device}' and image file are not in the same chain"
        )));
    }
    env.graph_mut()?
        .change_backing_file(image_name, &args.backing_file)
}

/// Whether `image` is `top` or a layer below it (through backing files and filters).
fn chain_contains(env: &BlockState, top: &str, image: &str) -> bool {
    let Some(graph) = env.graph.as_ref() else {
        return false;
    };
    let nodes = graph.graph_nodes();
    let mut layer = Some(top.to_string());
    let mut seen = 0;
    while let Some(name) = layer {
        if name == image {
            return true;
        }
        seen += 1;
        if seen > nodes.len() {
            return false;
        }
        layer = nodes
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| {
                n.children
                    .iter()
                    .find(|e| e.role == "backing" || (e.primary && is_filter(&n.driver)))
            })
            .map(|e| e.child.clone());
    }
    false
}

/// Drivers whose primary child shows through them (QEMU's `is_filter`).
pub(crate) fn is_filter(driver: &str) -> bool {
    matches!(
        driver,
        "blkdebug" | "copy-before-write" | "copy-on-read" | "throttle" | "preallocate" | "compress"
    )
}

/// A node's write threshold: the first write (or zero write) ending past it sends
/// `BLOCK_WRITE_THRESHOLD` and clears it (QEMU's `bdrv_write_threshold_check_write`).
struct WriteThreshold {
    node: String,
    offset: AtomicU64,
    events: Arc<dyn EventSink>,
}

impl BeforeWrite for WriteThreshold {
    fn before_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        let end = offset.saturating_add(len);
        let threshold = self.offset.load(Ordering::Acquire);
        if threshold > 0
            && end > threshold
            && self
                .offset
                .compare_exchange(threshold, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.events
                .emit(Event::BlockWriteThreshold(BlockWriteThresholdData {
                    node_name: self.node.clone(),
                    amount_exceeded: end - threshold,
                    write_threshold: threshold,
                }));
        }
        Ok(())
    }
}

/// The write thresholds set, by node: the hook on the node and its threshold.
#[derive(Default)]
pub(crate) struct WriteThresholds {
    by_node: HashMap<String, (Arc<WriteThreshold>, NotifierHandle)>,
}

impl WriteThresholds {
    /// The threshold set on `node` (0: none), as `query-named-block-nodes` reports it.
    pub(crate) fn get(&self, node: &str) -> u64 {
        self.by_node
            .get(node)
            .map_or(0, |(t, _)| t.offset.load(Ordering::Acquire))
    }

    /// Forgets the threshold of a node that is gone.
    pub(crate) fn forget(&mut self, node: &str) {
        self.by_node.remove(node);
    }
}

/// `block-set-write-threshold`: `Device '<n>' not found`, else the threshold is set (0
/// clears it).
pub(crate) fn set_write_threshold(
    env: &mut BlockState,
    args: BlockSetWriteThresholdArguments,
) -> Result<(), QmpError> {
    let name = args.node_name;
    let Some(node) = env.graph.as_ref().and_then(|g| g.node(&name)) else {
        return Err(QmpError::generic(format!("Device '{name}' not found")));
    };
    if let Some((threshold, _)) = env.thresholds.by_node.get(&name) {
        threshold
            .offset
            .store(args.write_threshold, Ordering::Release);
        return Ok(());
    }
    let threshold = Arc::new(WriteThreshold {
        node: name.clone(),
        offset: AtomicU64::new(args.write_threshold),
        events: env.events.clone(),
    });
    match node.add_write_notifier(threshold.clone()) {
        Some(handle) => {
            env.thresholds.by_node.insert(name, (threshold, handle));
            Ok(())
        }
        None => Err(QmpError::generic(
            "This block layer cannot watch writes to this node",
        )),
    }
}

impl BlockState {
    /// QEMU creates a backup's copy-before-write filter node (a generated name) over the
    /// source with the target as a child: an inactive source or target cannot be a child of
    /// that active node, in QEMU's words.
    pub(crate) fn check_backup_nodes_active(
        &mut self,
        source: &str,
        target: &str,
    ) -> Result<(), QmpError> {
        let Some(graph) = self.graph.as_mut() else {
            return Ok(());
        };
        for (node, role) in [(source, "file"), (target, "target")] {
            if !graph.is_active(node) {
                let filter = graph.generate_node_name();
                return Err(QmpError::generic(format!(
                    "Could not create node: Inactive '{node}' can't be a {role} child of active \
                     '{filter}'"
                )));
            }
        }
        Ok(())
    }
}

/// A threshold as the wire's `int` (thresholds beyond `i64::MAX` cannot be set over QMP).
pub(crate) fn wire_threshold(threshold: u64) -> i64 {
    i64::try_from(threshold).unwrap_or(i64::MAX)
}
