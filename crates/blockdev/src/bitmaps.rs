//! `block-dirty-bitmap-*` as qemu-storage-daemon performs them (same checks, same order, same
//! error texts): the commands, their transaction actions, and the bitmap a backup job freezes.
//! The bitmaps themselves are data in the node layer ([`block::DirtyBitmap`] in each node's
//! list, reached through [`NodeBitmaps`]).

use std::sync::Arc;

use block::DirtyBitmap;
use block::bitmap::{MAX_NAME_LEN, granularity_is_valid};
use qmp_api::{
    BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockDirtyBitmapOrStr, QmpError,
};

use crate::BlockState;
use crate::node::{NodeBitmaps, NodeGraph};
use crate::transaction::{Action, Transaction};

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

fn block_error(e: block::BlockError) -> QmpError {
    QmpError::generic(e.desc())
}

/// What an operation needs from a bitmap (QEMU's `BDRV_BITMAP_*` check flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BitmapCheck {
    /// Modifying the bits: not busy, not read-only, not inconsistent.
    Default,
    /// Using without modifying bits (enable/disable, merge source, backup): not busy, not
    /// inconsistent.
    AllowReadOnly,
    /// Removing: not busy, not read-only (inconsistent bitmaps may be removed).
    Remove,
}

/// QEMU's `bdrv_dirty_bitmap_check`: refuses a bitmap the operation cannot use.
pub(crate) fn check_bitmap(bitmap: &DirtyBitmap, check: BitmapCheck) -> Result<(), QmpError> {
    let name = bitmap.name().unwrap_or("");
    if bitmap.is_busy() {
        return Err(generic(format!(
            "Bitmap '{name}' is currently in use by another operation and cannot be used"
        )));
    }
    if check != BitmapCheck::AllowReadOnly && bitmap.is_readonly() {
        return Err(generic(format!(
            "Bitmap '{name}' is readonly and cannot be modified"
        )));
    }
    if check != BitmapCheck::Remove && bitmap.is_inconsistent() {
        return Err(generic(format!(
            "Bitmap '{name}' is inconsistent and cannot be used"
        )));
    }
    Ok(())
}

fn not_found(name: &str) -> QmpError {
    generic(format!("Dirty bitmap '{name}' not found"))
}

/// Runs `f` on the bitmap `name` of a node, with the node's list locked.
pub(crate) fn with_bitmap<T>(
    node: &dyn NodeBitmaps,
    name: &str,
    f: impl FnOnce(&mut DirtyBitmap) -> Result<T, QmpError>,
) -> Result<T, QmpError> {
    let mut list = node.list();
    let b = list
        .iter_mut()
        .find(|b| b.name() == Some(name))
        .ok_or_else(|| not_found(name))?;
    f(b)
}

/// A bitmap's node for the commands that name both: `Node '<n>' not found`, then `Dirty
/// bitmap '<b>' not found`.
pub(crate) fn lookup(
    graph: &dyn NodeGraph,
    node: &str,
    name: &str,
) -> Result<Arc<dyn NodeBitmaps>, QmpError> {
    let n = graph
        .bitmaps(node)
        .ok_or_else(|| generic(format!("Node '{node}' not found")))?;
    if !n.list().iter().any(|b| b.name() == Some(name)) {
        return Err(not_found(name));
    }
    Ok(n)
}

fn graph(state: &BlockState) -> Result<&dyn NodeGraph, QmpError> {
    state
        .graph
        .as_deref()
        .ok_or_else(|| generic("No block layer is available"))
}

/// `block-dirty-bitmap-add`. The granularity defaults to the node's.
pub(crate) fn add(state: &BlockState, a: &BlockDirtyBitmapAdd) -> Result<(), QmpError> {
    let name = a.name.as_str();
    if name.is_empty() {
        return Err(generic("Bitmap name cannot be empty"));
    }
    let n = graph(state)?
        .bitmaps(&a.node)
        .ok_or_else(|| crate::node::not_found(&a.node, &a.node))?;
    let granularity = match a.granularity.map(u64::from) {
        Some(g) if !granularity_is_valid(g) => {
            return Err(generic("Granularity must be power of 2 and at least 512"));
        }
        Some(g) => g,
        None => n.default_granularity(),
    };
    let persistent = a.persistent.unwrap_or(false);
    if persistent {
        match n.store() {
            Some(store) => store
                .can_store_new_bitmap(name, granularity)
                .map_err(block_error)?,
            None => {
                return Err(generic(format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    n.node_name()
                )));
            }
        }
    }
    let size = n.size();
    let mut list = n.list();
    if list.iter().any(|b| b.name() == Some(name)) {
        return Err(generic(format!("Bitmap already exists: {name}")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(generic(format!("Bitmap name too long: {name}")));
    }
    let mut bitmap =
        DirtyBitmap::new(Some(name.to_string()), granularity, size).map_err(block_error)?;
    bitmap.set_persistent(persistent);
    bitmap.set_enabled(!a.disabled.unwrap_or(false));
    list.insert(0, bitmap);
    Ok(())
}

/// The checks and on-disk removal of `block-dirty-bitmap-remove`, without releasing the
/// bitmap (a transaction releases it at commit).
fn remove_prepare(
    state: &BlockState,
    b: &BlockDirtyBitmap,
) -> Result<Arc<dyn NodeBitmaps>, QmpError> {
    let n = lookup(graph(state)?, &b.node, &b.name)?;
    let persistent = with_bitmap(n.as_ref(), &b.name, |bm| {
        check_bitmap(bm, BitmapCheck::Remove)?;
        Ok(bm.is_persistent())
    })?;
    if persistent && let Some(store) = n.store() {
        store
            .remove_persistent_bitmap(&b.name)
            .map_err(block_error)?;
    }
    Ok(n)
}

/// `block-dirty-bitmap-remove`.
pub(crate) fn remove(state: &BlockState, b: &BlockDirtyBitmap) -> Result<(), QmpError> {
    let n = remove_prepare(state, b)?;
    n.list().retain(|bm| bm.name() != Some(b.name.as_str()));
    Ok(())
}

/// `block-dirty-bitmap-clear`; returns the bits it cleared.
pub(crate) fn clear(state: &BlockState, b: &BlockDirtyBitmap) -> Result<DirtyBitmap, QmpError> {
    let n = lookup(graph(state)?, &b.node, &b.name)?;
    with_bitmap(n.as_ref(), &b.name, |bm| {
        check_bitmap(bm, BitmapCheck::Default)?;
        let saved = bm.copy_bits();
        bm.clear();
        Ok(saved)
    })
}

/// `block-dirty-bitmap-enable` / `-disable`; returns the previous state.
pub(crate) fn set_enabled(
    state: &BlockState,
    b: &BlockDirtyBitmap,
    enabled: bool,
) -> Result<bool, QmpError> {
    let n = lookup(graph(state)?, &b.node, &b.name)?;
    with_bitmap(n.as_ref(), &b.name, |bm| {
        check_bitmap(bm, BitmapCheck::AllowReadOnly)?;
        let was = bm.is_enabled();
        bm.set_enabled(enabled);
        Ok(was)
    })
}

/// `block-dirty-bitmap-merge`: ORs every source into the target (granularities may differ).
/// Returns the target's previous bits. The target is unchanged on failure.
pub(crate) fn merge(
    state: &BlockState,
    m: &BlockDirtyBitmapMerge,
) -> Result<DirtyBitmap, QmpError> {
    let graph = graph(state)?;
    let n = lookup(graph, &m.node, &m.target)?;
    let mut merged = with_bitmap(n.as_ref(), &m.target, |bm| {
        check_bitmap(bm, BitmapCheck::Default)?;
        DirtyBitmap::new(None, bm.granularity(), bm.size()).map_err(block_error)
    })?;
    for source in &m.bitmaps {
        let (node, name) = match source {
            BlockDirtyBitmapOrStr::Local(name) => (n.clone(), name.as_str()),
            BlockDirtyBitmapOrStr::External(BlockDirtyBitmap { node, name }) => {
                (lookup(graph, node, name)?, name.as_str())
            }
        };
        let bits = with_bitmap(node.as_ref(), name, |bm| {
            check_bitmap(bm, BitmapCheck::AllowReadOnly)?;
            Ok(bm.copy_bits())
        })?;
        merged.merge_from(&bits).map_err(block_error)?;
    }
    with_bitmap(n.as_ref(), &m.target, |bm| {
        check_bitmap(bm, BitmapCheck::Default)?;
        let saved = bm.copy_bits();
        bm.merge_from(&merged).map_err(block_error)?;
        Ok(saved)
    })
}

/// A `block-dirty-bitmap-*` transaction action (QEMU's `block_dirty_bitmap_*_prepare` and
/// their abort/commit): what prepare did, to undo or finish.
pub(crate) enum BitmapAction {
    /// Abort deletes the bitmap prepare created.
    Add {
        args: BlockDirtyBitmapAdd,
        added: bool,
    },
    /// Prepare makes the bitmap busy and unstored; commit releases it; abort gives it back.
    Remove {
        args: BlockDirtyBitmap,
        held: Option<Arc<dyn NodeBitmaps>>,
    },
    /// Abort restores the bits.
    Clear {
        args: BlockDirtyBitmap,
        saved: Option<DirtyBitmap>,
    },
    /// Abort restores the previous state.
    Enable {
        args: BlockDirtyBitmap,
        enable: bool,
        previous: Option<bool>,
    },
    /// Abort restores the target's bits.
    Merge {
        args: BlockDirtyBitmapMerge,
        saved: Option<DirtyBitmap>,
    },
}

impl BitmapAction {
    pub(crate) fn add(args: BlockDirtyBitmapAdd) -> Self {
        BitmapAction::Add { args, added: false }
    }

    pub(crate) fn remove(args: BlockDirtyBitmap) -> Self {
        BitmapAction::Remove { args, held: None }
    }

    pub(crate) fn clear(args: BlockDirtyBitmap) -> Self {
        BitmapAction::Clear { args, saved: None }
    }

    pub(crate) fn set_enabled(args: BlockDirtyBitmap, enable: bool) -> Self {
        BitmapAction::Enable {
            args,
            enable,
            previous: None,
        }
    }

    pub(crate) fn merge(args: BlockDirtyBitmapMerge) -> Self {
        BitmapAction::Merge { args, saved: None }
    }
}

/// The bitmap `name` of node `node` as the graph has it now, if both exist.
fn restore(state: &BlockState, node: &str, name: &str, f: impl FnOnce(&mut DirtyBitmap)) {
    if let Some(n) = state.graph.as_deref().and_then(|g| g.bitmaps(node)) {
        let _ = with_bitmap(n.as_ref(), name, |bm| {
            f(bm);
            Ok(())
        });
    }
}

impl Action for BitmapAction {
    fn prepare(&mut self, txn: &mut Transaction<'_>) -> Result<(), QmpError> {
        let state = &*txn.state;
        match self {
            BitmapAction::Add { args, added } => {
                add(state, args)?;
                *added = true;
            }
            BitmapAction::Remove { args, held } => {
                let n = remove_prepare(state, args)?;
                with_bitmap(n.as_ref(), &args.name, |bm| {
                    bm.set_skip_store(true);
                    bm.set_busy(true);
                    Ok(())
                })?;
                *held = Some(n);
            }
            BitmapAction::Clear { args, saved } => *saved = Some(clear(state, args)?),
            BitmapAction::Enable {
                args,
                enable,
                previous,
            } => *previous = Some(set_enabled(state, args, *enable)?),
            BitmapAction::Merge { args, saved } => *saved = Some(merge(state, args)?),
        }
        Ok(())
    }

    fn commit(&mut self, _txn: &mut Transaction<'_>) {
        if let BitmapAction::Remove { args, held } = self
            && let Some(n) = held.take()
        {
            n.list().retain(|bm| bm.name() != Some(args.name.as_str()));
        }
    }

    fn abort(&mut self, txn: &mut Transaction<'_>) {
        let state = &*txn.state;
        match self {
            BitmapAction::Add { args, added } => {
                if std::mem::take(added)
                    && let Some(n) = state.graph.as_deref().and_then(|g| g.bitmaps(&args.node))
                {
                    n.list().retain(|bm| bm.name() != Some(args.name.as_str()));
                }
            }
            BitmapAction::Remove { args, held } => {
                if let Some(n) = held.take() {
                    let _ = with_bitmap(n.as_ref(), &args.name, |bm| {
                        bm.set_skip_store(false);
                        bm.set_busy(false);
                        Ok(())
                    });
                }
            }
            BitmapAction::Clear { args, saved } => {
                if let Some(saved) = saved.take() {
                    restore(state, &args.node, &args.name, |bm| bm.restore_bits(&saved));
                }
            }
            BitmapAction::Enable { args, previous, .. } => {
                if let Some(was) = previous.take() {
                    restore(state, &args.node, &args.name, |bm| bm.set_enabled(was));
                }
            }
            BitmapAction::Merge { args, saved } => {
                if let Some(saved) = saved.take() {
                    restore(state, &args.node, &args.target, |bm| {
                        bm.restore_bits(&saved)
                    });
                }
            }
        }
    }
}

/// The bitmap a backup job freezes for its life (QEMU's successor protocol): new writes go to
/// an anonymous successor while the job copies the frozen bits; at the end the successor
/// replaces the bitmap (abdicate) or is merged back (reclaim).
#[derive(Clone)]
pub(crate) struct JobBitmap {
    node: Arc<dyn NodeBitmaps>,
    name: String,
}

impl JobBitmap {
    /// The bitmap `name` of `node`, if both exist.
    pub(crate) fn find(graph: &dyn NodeGraph, node: &str, name: &str) -> Option<JobBitmap> {
        let n = graph.bitmaps(node)?;
        if !n.list().iter().any(|b| b.name() == Some(name)) {
            return None;
        }
        Some(JobBitmap {
            node: n,
            name: name.to_string(),
        })
    }

    fn with(&self, f: impl FnOnce(&mut DirtyBitmap) -> Result<(), QmpError>) {
        if let Err(e) = with_bitmap(self.node.as_ref(), &self.name, f) {
            tracing::warn!("bitmap {}: {}", self.name, e.desc);
        }
    }

    /// QEMU's `bdrv_dirty_bitmap_check` (read-only allowed for the sync modes that keep the
    /// bitmap as it is).
    pub(crate) fn check_usable(&self, allow_read_only: bool) -> Result<(), QmpError> {
        let check = if allow_read_only {
            BitmapCheck::AllowReadOnly
        } else {
            BitmapCheck::Default
        };
        with_bitmap(self.node.as_ref(), &self.name, |b| check_bitmap(b, check))
    }

    /// Freezes the bitmap (busy); a successor records new writes from now on.
    pub(crate) fn freeze(&self) -> Result<(), QmpError> {
        with_bitmap(self.node.as_ref(), &self.name, |b| {
            b.create_successor().map_err(block_error)
        })
    }

    /// The frozen bitmap's dirty ranges `(offset, len)`, in order.
    pub(crate) fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        with_bitmap(self.node.as_ref(), &self.name, |b| {
            Ok(b.dirty_ranges(0, b.size()).collect())
        })
        .unwrap_or_default()
    }

    /// The successor replaces the bitmap, which is usable again.
    pub(crate) fn abdicate(&self) {
        self.with(|b| b.abdicate().map_err(block_error));
    }

    /// The successor is merged back into the bitmap, which is usable again.
    pub(crate) fn reclaim(&self) {
        self.with(|b| b.reclaim().map_err(block_error));
    }

    /// Marks `[offset, offset + len)` dirty (bits a failed job did not copy).
    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) {
        self.with(|b| {
            b.set_dirty(offset, len);
            Ok(())
        });
    }
}
