//! `blockdev-snapshot-sync`, `blockdev-snapshot` and `blockdev-snapshot-internal-sync` as
//! transaction actions (QEMU's `external_snapshot_*` and `internal_snapshot_*`).

use block::BlockOp;
use qmp_api::{
    BlockdevSnapshot, BlockdevSnapshotInternal, BlockdevSnapshotSync, NewImageMode, QmpError,
};

use crate::BlockState;
use crate::claims::Drain;
use crate::node::{ImageRef, not_found};
use crate::transaction::{Action, Transaction};

/// Where the overlay of an external snapshot comes from.
enum Overlay {
    /// `blockdev-snapshot-sync`: a new image file, opened by the action.
    New(BlockdevSnapshotSync),
    /// `blockdev-snapshot`: an existing node.
    Existing(BlockdevSnapshot),
}

/// An external snapshot: an overlay takes the node's place, with the node as its backing.
pub(crate) struct ExternalSnapshot {
    overlay: Overlay,
    drain: Option<Drain>,
    /// (node, overlay) once the overlay is in place.
    inserted: Option<(String, String)>,
    /// The overlay node this action opened.
    opened: Option<String>,
}

impl ExternalSnapshot {
    pub(crate) fn sync(args: BlockdevSnapshotSync) -> Self {
        Self::with(Overlay::New(args))
    }

    pub(crate) fn existing(args: BlockdevSnapshot) -> Self {
        Self::with(Overlay::Existing(args))
    }

    fn with(overlay: Overlay) -> Self {
        ExternalSnapshot {
            overlay,
            drain: None,
            inserted: None,
            opened: None,
        }
    }

    /// The node to snapshot, by QEMU's `bdrv_lookup_bs(device, node-name)`. `device` names a
    /// BlockBackend (a guest device), of which this daemon has none, as QSD: only
    /// `node-name` can find the node (`blockdev-snapshot`'s `node` is tried as both).
    fn node_name(&self, env: &BlockState) -> Result<String, QmpError> {
        let (device, node, candidates) = match &self.overlay {
            Overlay::New(a) => (
                a.device.clone(),
                a.node_name.clone(),
                [None, a.node_name.clone()],
            ),
            Overlay::Existing(a) => (
                Some(a.node.clone()),
                Some(a.node.clone()),
                [Some(a.node.clone()), None],
            ),
        };
        candidates
            .into_iter()
            .flatten()
            .find(|name| env.graph.as_ref().is_some_and(|g| g.node(name).is_some()))
            .ok_or_else(|| {
                not_found(
                    device.as_deref().unwrap_or(""),
                    node.as_deref().unwrap_or(""),
                )
            })
    }

    /// The overlay node's name, opening a new image first for `-sync`.
    fn overlay(&mut self, env: &mut BlockState, node: &str) -> Result<String, QmpError> {
        let args = match &self.overlay {
            Overlay::Existing(a) => {
                env.lookup(&a.overlay)?;
                return Ok(a.overlay.clone());
            }
            Overlay::New(a) => a.clone(),
        };
        if args.node_name.is_some() && args.snapshot_node_name.is_none() {
            return Err(QmpError::generic("New overlay node-name missing"));
        }
        // QEMU names an unnamed overlay itself; ours are named after their file.
        let overlay_name = args
            .snapshot_node_name
            .clone()
            .unwrap_or_else(|| format!("snapshot-{}", args.snapshot_file));
        if env
            .graph
            .as_ref()
            .is_some_and(|g| g.node(&overlay_name).is_some())
        {
            return Err(QmpError::generic("New overlay node-name already in use"));
        }
        let source = env.lookup(node)?;
        let image = ImageRef {
            filename: args.snapshot_file.clone(),
            format: args.format.clone().unwrap_or_else(|| "qcow2".into()),
        };
        let graph = env.graph_mut()?;
        if args.mode.unwrap_or(NewImageMode::AbsolutePaths) != NewImageMode::Existing {
            graph.create_image(&image, source.size(), Some(&source.image()))?;
        }
        graph.open_overlay(&image, &overlay_name)?;
        self.opened = Some(overlay_name.clone());
        Ok(overlay_name)
    }
}

impl Action for ExternalSnapshot {
    fn prepare(&mut self, txn: &mut Transaction<'_>) -> Result<(), QmpError> {
        let env = &mut *txn.state;
        let node = self.node_name(env)?;
        self.drain = Some(Drain::begin(
            &env.jobs,
            &env.claims,
            env.graph.as_deref(),
            &node,
        ));
        env.check_op(&node, BlockOp::ExternalSnapshot)?;
        let source = env.lookup(&node)?;
        source
            .flush()
            .map_err(|e| QmpError::generic(job::strerror(&e)))?;
        let overlay = self.overlay(env, &node)?;
        let graph = env.graph_mut()?;
        if overlay != node
            && let Some(facts) = graph.node_facts(&overlay)
        {
            if matches!(self.overlay, Overlay::Existing(_)) && facts.in_use {
                return Err(QmpError::generic("The overlay is already in use"));
            }
            if facts.has_backing {
                return Err(QmpError::generic("The overlay already has a backing image"));
            }
            if !facts.supports_backing {
                return Err(QmpError::generic(
                    "The overlay does not support backing images",
                ));
            }
        }
        if overlay == node {
            return Err(QmpError::generic(format!(
                "Making '{node}' a backing child of '{node}' would create a cycle"
            )));
        }
        graph.insert_overlay(&node, &overlay)?;
        self.inserted = Some((node, overlay));
        Ok(())
    }

    fn commit(&mut self, txn: &mut Transaction<'_>) {
        if let (Some((node, _)), Ok(graph)) = (&self.inserted, txn.state.graph_mut()) {
            graph.make_read_only(node);
        }
    }

    fn abort(&mut self, txn: &mut Transaction<'_>) {
        let Ok(graph) = txn.state.graph_mut() else {
            return;
        };
        if let Some((node, overlay)) = self.inserted.take() {
            graph.remove_overlay(&node, &overlay);
        }
        // The file stays (QEMU does not delete what it created); the node goes.
        if let Some(opened) = self.opened.take() {
            graph.release_if_unused(&opened);
        }
    }

    fn clean(&mut self, txn: &mut Transaction<'_>) {
        if let Some(drain) = self.drain.take() {
            txn.end_drain(drain);
        }
        // The action's reference to a node it opened ends: with no parent, the overlay goes
        // (QSD's behaviour for a snapshot of a node nothing uses).
        if let (Some(opened), Ok(graph)) = (self.opened.take(), txn.state.graph_mut()) {
            graph.release_if_unused(&opened);
        }
    }
}

/// `blockdev-snapshot-internal-sync`: the snapshot is taken at prepare, deleted on abort.
pub(crate) struct InternalSnapshot {
    args: BlockdevSnapshotInternal,
    drain: Option<Drain>,
    created: Option<String>,
}

impl InternalSnapshot {
    pub(crate) fn new(args: BlockdevSnapshotInternal) -> Self {
        InternalSnapshot {
            args,
            drain: None,
            created: None,
        }
    }
}

impl Action for InternalSnapshot {
    fn prepare(&mut self, txn: &mut Transaction<'_>) -> Result<(), QmpError> {
        let env = &mut *txn.state;
        let device = self.args.device.clone();
        let node = env.root_node(&device)?;
        self.drain = Some(Drain::begin(
            &env.jobs,
            &env.claims,
            env.graph.as_deref(),
            &device,
        ));
        env.check_op(&device, BlockOp::InternalSnapshot)?;
        let graph = env.graph_mut()?;
        if graph.node_facts(&device).is_some_and(|f| f.read_only) {
            return Err(QmpError::generic(format!("Device '{device}' is read only")));
        }
        // QEMU's bdrv_can_snapshot: an inactive node cannot (it is not writable).
        let active = graph.is_active(&device);
        let Some(existing) = graph.internal_snapshots(&device).filter(|_| active) else {
            return Err(QmpError::generic(format!(
                "Block format '{}' used by device '{device}' does not support internal snapshots",
                node.format()
            )));
        };
        let name = &self.args.name;
        if name.is_empty() {
            return Err(QmpError::generic("Name is empty"));
        }
        if existing.iter().any(|s| s.name == *name) {
            return Err(QmpError::generic(format!(
                "Snapshot with name '{name}' already exists on device '{device}'"
            )));
        }
        graph.create_internal_snapshot(&device, name)?;
        self.created = Some(name.clone());
        Ok(())
    }

    fn abort(&mut self, txn: &mut Transaction<'_>) {
        if let (Some(name), Ok(graph)) = (self.created.take(), txn.state.graph_mut())
            && let Err(e) = graph.delete_internal_snapshot(&self.args.device, &name)
        {
            tracing::warn!("could not delete snapshot {name}: {}", e.desc);
        }
    }

    fn clean(&mut self, txn: &mut Transaction<'_>) {
        if let Some(drain) = self.drain.take() {
            txn.end_drain(drain);
        }
    }
}
