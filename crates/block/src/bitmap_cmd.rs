//! The `block-dirty-bitmap-*` operations as qemu-storage-daemon performs them (same checks,
//! same order, same error texts), and the bitmap helpers jobs use.

use std::sync::Arc;

use crate::bitmap::{DirtyBitmap, MAX_NAME_LEN, granularity_is_valid};
use crate::error::{BlockError, BlockResult};
use crate::graph::BlockGraph;
use crate::node::BlockNode;
pub use crate::transaction::{TransactionAction, run_transaction};

/// What an operation needs from a bitmap (QEMU's `BDRV_BITMAP_*` check flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapCheck {
    /// Modifying the bits: not busy, not read-only, not inconsistent.
    Default,
    /// Using without modifying bits (enable/disable, merge source, backup): not busy, not
    /// inconsistent.
    AllowReadOnly,
    /// Removing: not busy, not read-only (inconsistent bitmaps may be removed).
    Remove,
}

/// Refuses a bitmap the operation cannot use, with QEMU's texts.
pub fn check_bitmap(bitmap: &DirtyBitmap, check: BitmapCheck) -> BlockResult<()> {
    let name = bitmap.name().unwrap_or("");
    if bitmap.is_busy() {
        return Err(BlockError::new(format!(
            "Bitmap '{name}' is currently in use by another operation and cannot be used"
        )));
    }
    if check != BitmapCheck::AllowReadOnly && bitmap.is_readonly() {
        return Err(BlockError::new(format!(
            "Bitmap '{name}' is readonly and cannot be modified"
        )));
    }
    if check != BitmapCheck::Remove && bitmap.is_inconsistent() {
        return Err(BlockError::new(format!(
            "Bitmap '{name}' is inconsistent and cannot be used"
        )));
    }
    Ok(())
}

/// The named bitmap in a node's list.
pub fn find_bitmap<'a>(bitmaps: &'a mut [DirtyBitmap], name: &str) -> Option<&'a mut DirtyBitmap> {
    bitmaps.iter_mut().find(|b| b.name() == Some(name))
}

/// Finds a bitmap's node for the commands that name both: `Node '<n>' not found`, then
/// `Dirty bitmap '<b>' not found`.
pub fn lookup_bitmap_node(
    graph: &BlockGraph,
    node: &str,
    name: &str,
) -> BlockResult<Arc<BlockNode>> {
    let n = graph
        .find(node)
        .ok_or_else(|| BlockError::new(format!("Node '{node}' not found")))?;
    if !n.bitmaps().iter().any(|b| b.name() == Some(name)) {
        return Err(not_found(name));
    }
    Ok(n)
}

fn not_found(name: &str) -> BlockError {
    BlockError::new(format!("Dirty bitmap '{name}' not found"))
}

/// Runs `f` on the named bitmap of `node` with the node's bitmap list locked.
pub fn with_bitmap<T>(
    node: &BlockNode,
    name: &str,
    f: impl FnOnce(&mut DirtyBitmap) -> BlockResult<T>,
) -> BlockResult<T> {
    let mut list = node.bitmaps();
    let b = find_bitmap(&mut list, name).ok_or_else(|| not_found(name))?;
    f(b)
}

/// `block-dirty-bitmap-add`. `granularity` defaults to the node's (cluster size clamped to
/// 4..64 KiB, else 64 KiB).
pub fn bitmap_add(
    graph: &BlockGraph,
    node: &str,
    name: &str,
    granularity: Option<u64>,
    persistent: bool,
    disabled: bool,
) -> BlockResult<()> {
    if name.is_empty() {
        return Err(BlockError::new("Bitmap name cannot be empty"));
    }
    let n = graph.lookup(node)?;
    let granularity = match granularity {
        Some(g) if !granularity_is_valid(g) => {
            return Err(BlockError::new(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        Some(g) => g,
        None => n.default_bitmap_granularity(),
    };
    if persistent {
        match n.driver().bitmap_store() {
            Some(store) => store.can_store_new_bitmap(name, granularity)?,
            None => {
                return Err(BlockError::with_errno(
                    format!(
                        "Can't store persistent bitmaps to {}: Operation not supported",
                        n.name()
                    ),
                    libc::ENOTSUP,
                ));
            }
        }
    }
    let size = n.size()?;
    let mut list = n.bitmaps();
    if list.iter().any(|b| b.name() == Some(name)) {
        return Err(BlockError::new(format!("Bitmap already exists: {name}")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(BlockError::new(format!("Bitmap name too long: {name}")));
    }
    let mut bitmap = DirtyBitmap::new(Some(name.to_string()), granularity, size)?;
    bitmap.set_persistent(persistent);
    bitmap.set_enabled(!disabled);
    list.insert(0, bitmap);
    Ok(())
}

/// The checks and on-disk removal of `block-dirty-bitmap-remove`, without releasing the
/// bitmap (a transaction releases it at commit).
fn remove_prepare(graph: &BlockGraph, node: &str, name: &str) -> BlockResult<Arc<BlockNode>> {
    let n = lookup_bitmap_node(graph, node, name)?;
    let persistent = with_bitmap(&n, name, |b| {
        check_bitmap(b, BitmapCheck::Remove)?;
        Ok(b.is_persistent())
    })?;
    if persistent && let Some(store) = n.driver().bitmap_store() {
        store.remove_persistent_bitmap(name)?;
    }
    Ok(n)
}

/// `block-dirty-bitmap-remove`.
pub fn bitmap_remove(graph: &BlockGraph, node: &str, name: &str) -> BlockResult<()> {
    let n = remove_prepare(graph, node, name)?;
    n.bitmaps().retain(|b| b.name() != Some(name));
    Ok(())
}

/// `block-dirty-bitmap-clear`.
pub fn bitmap_clear(graph: &BlockGraph, node: &str, name: &str) -> BlockResult<()> {
    let n = lookup_bitmap_node(graph, node, name)?;
    with_bitmap(&n, name, |b| {
        check_bitmap(b, BitmapCheck::Default)?;
        b.clear();
        Ok(())
    })
}

/// `block-dirty-bitmap-enable` / `-disable`; returns the previous state.
pub fn bitmap_set_enabled(
    graph: &BlockGraph,
    node: &str,
    name: &str,
    enabled: bool,
) -> BlockResult<bool> {
    let n = lookup_bitmap_node(graph, node, name)?;
    with_bitmap(&n, name, |b| {
        check_bitmap(b, BitmapCheck::AllowReadOnly)?;
        let was = b.is_enabled();
        b.set_enabled(enabled);
        Ok(was)
    })
}

/// A source of `block-dirty-bitmap-merge`: a bitmap on the target's node, or on any node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeSource {
    /// A bitmap on the target's node.
    Local(String),
    /// `{node, name}`.
    External {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
    },
}

/// `block-dirty-bitmap-merge`: ORs every source into `target` (granularities may differ).
/// Returns the target's previous bits (for a transaction's abort). The target is unchanged on
/// failure.
pub fn bitmap_merge(
    graph: &BlockGraph,
    node: &str,
    target: &str,
    sources: &[MergeSource],
) -> BlockResult<DirtyBitmap> {
    let n = lookup_bitmap_node(graph, node, target)?;
    let mut merged = with_bitmap(&n, target, |b| {
        check_bitmap(b, BitmapCheck::Default)?;
        DirtyBitmap::new(None, b.granularity(), b.size())
    })?;
    for src in sources {
        let (src_node, src_name) = match src {
            MergeSource::Local(name) => (n.clone(), name.as_str()),
            MergeSource::External { node, name } => {
                (lookup_bitmap_node(graph, node, name)?, name.as_str())
            }
        };
        let bits = with_bitmap(&src_node, src_name, |b| {
            check_bitmap(b, BitmapCheck::AllowReadOnly)?;
            Ok(b.copy_bits())
        })?;
        merged.merge_from(&bits)?;
    }
    with_bitmap(&n, target, |b| {
        check_bitmap(b, BitmapCheck::Default)?;
        let backup = b.copy_bits();
        b.merge_from(&merged)?;
        Ok(backup)
    })
}

/// Access to the block graph from a transaction's context.
pub trait GraphAccess {
    /// The graph.
    fn graph(&mut self) -> &mut BlockGraph;
}

impl GraphAccess for BlockGraph {
    fn graph(&mut self) -> &mut BlockGraph {
        self
    }
}

/// The `abort` action: always fails.
#[derive(Debug, Default)]
pub struct AbortAction;

impl<C: ?Sized> TransactionAction<C> for AbortAction {
    fn prepare(&mut self, _ctx: &mut C) -> BlockResult<()> {
        Err(BlockError::new("Transaction aborted using Abort action"))
    }
}

/// `block-dirty-bitmap-add` as an action: abort deletes the bitmap it created.
#[derive(Debug)]
pub struct BitmapAddAction {
    /// Node name.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// Granularity (default: the node's).
    pub granularity: Option<u64>,
    /// Store in the image.
    pub persistent: bool,
    /// Create disabled.
    pub disabled: bool,
    added: bool,
}

impl BitmapAddAction {
    /// The action for these arguments.
    pub fn new(
        node: &str,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Self {
        BitmapAddAction {
            node: node.into(),
            name: name.into(),
            granularity,
            persistent,
            disabled,
            added: false,
        }
    }
}

impl<C: GraphAccess + ?Sized> TransactionAction<C> for BitmapAddAction {
    fn prepare(&mut self, ctx: &mut C) -> BlockResult<()> {
        bitmap_add(
            ctx.graph(),
            &self.node,
            &self.name,
            self.granularity,
            self.persistent,
            self.disabled,
        )?;
        self.added = true;
        Ok(())
    }

    fn abort(&mut self, ctx: &mut C) {
        if self.added
            && let Some(n) = ctx.graph().find(&self.node)
        {
            n.bitmaps().retain(|b| b.name() != Some(self.name.as_str()));
        }
    }
}

/// `block-dirty-bitmap-remove` as an action: prepare makes the bitmap busy and not stored;
/// commit releases it; abort gives it back.
#[derive(Debug)]
pub struct BitmapRemoveAction {
    /// Node name.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    held: Option<Arc<BlockNode>>,
}

impl BitmapRemoveAction {
    /// The action for these arguments.
    pub fn new(node: &str, name: &str) -> Self {
        BitmapRemoveAction {
            node: node.into(),
            name: name.into(),
            held: None,
        }
    }
}

impl<C: GraphAccess + ?Sized> TransactionAction<C> for BitmapRemoveAction {
    fn prepare(&mut self, ctx: &mut C) -> BlockResult<()> {
        let n = remove_prepare(ctx.graph(), &self.node, &self.name)?;
        with_bitmap(&n, &self.name, |b| {
            b.set_skip_store(true);
            b.set_busy(true);
            Ok(())
        })?;
        self.held = Some(n);
        Ok(())
    }

    fn commit(&mut self, _ctx: &mut C) {
        if let Some(n) = self.held.take() {
            n.bitmaps().retain(|b| b.name() != Some(self.name.as_str()));
        }
    }

    fn abort(&mut self, _ctx: &mut C) {
        if let Some(n) = self.held.take() {
            let _ = with_bitmap(&n, &self.name, |b| {
                b.set_skip_store(false);
                b.set_busy(false);
                Ok(())
            });
        }
    }
}

/// `block-dirty-bitmap-clear` as an action: abort restores the bits.
#[derive(Debug)]
pub struct BitmapClearAction {
    /// Node name.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    backup: Option<(Arc<BlockNode>, DirtyBitmap)>,
}

impl BitmapClearAction {
    /// The action for these arguments.
    pub fn new(node: &str, name: &str) -> Self {
        BitmapClearAction {
            node: node.into(),
            name: name.into(),
            backup: None,
        }
    }
}

impl<C: GraphAccess + ?Sized> TransactionAction<C> for BitmapClearAction {
    fn prepare(&mut self, ctx: &mut C) -> BlockResult<()> {
        let n = lookup_bitmap_node(ctx.graph(), &self.node, &self.name)?;
        let saved = with_bitmap(&n, &self.name, |b| {
            check_bitmap(b, BitmapCheck::Default)?;
            let saved = b.copy_bits();
            b.clear();
            Ok(saved)
        })?;
        self.backup = Some((n, saved));
        Ok(())
    }

    fn abort(&mut self, _ctx: &mut C) {
        if let Some((n, saved)) = self.backup.take() {
            let _ = with_bitmap(&n, &self.name, |b| {
                b.restore_bits(&saved);
                Ok(())
            });
        }
    }

    fn clean(&mut self, _ctx: &mut C) {
        self.backup = None;
    }
}

/// `block-dirty-bitmap-enable` (`enable: true`) or `-disable` as an action: abort restores the
/// previous state.
#[derive(Debug)]
pub struct BitmapEnableAction {
    /// Node name.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// True for enable, false for disable.
    pub enable: bool,
    previous: Option<bool>,
}

impl BitmapEnableAction {
    /// The action for these arguments.
    pub fn new(node: &str, name: &str, enable: bool) -> Self {
        BitmapEnableAction {
            node: node.into(),
            name: name.into(),
            enable,
            previous: None,
        }
    }
}

impl<C: GraphAccess + ?Sized> TransactionAction<C> for BitmapEnableAction {
    fn prepare(&mut self, ctx: &mut C) -> BlockResult<()> {
        self.previous = Some(bitmap_set_enabled(
            ctx.graph(),
            &self.node,
            &self.name,
            self.enable,
        )?);
        Ok(())
    }

    fn abort(&mut self, ctx: &mut C) {
        if let Some(was) = self.previous.take()
            && let Some(n) = ctx.graph().find(&self.node)
        {
            let _ = with_bitmap(&n, &self.name, |b| {
                b.set_enabled(was);
                Ok(())
            });
        }
    }
}

/// `block-dirty-bitmap-merge` as an action: abort restores the target's bits.
#[derive(Debug)]
pub struct BitmapMergeAction {
    /// Node of the target.
    pub node: String,
    /// Target bitmap.
    pub target: String,
    /// Sources.
    pub sources: Vec<MergeSource>,
    backup: Option<(Arc<BlockNode>, DirtyBitmap)>,
}

impl BitmapMergeAction {
    /// The action for these arguments.
    pub fn new(node: &str, target: &str, sources: Vec<MergeSource>) -> Self {
        BitmapMergeAction {
            node: node.into(),
            target: target.into(),
            sources,
            backup: None,
        }
    }
}

impl<C: GraphAccess + ?Sized> TransactionAction<C> for BitmapMergeAction {
    fn prepare(&mut self, ctx: &mut C) -> BlockResult<()> {
        let graph = ctx.graph();
        let saved = bitmap_merge(graph, &self.node, &self.target, &self.sources)?;
        self.backup = graph.find(&self.node).map(|n| (n, saved));
        Ok(())
    }

    fn abort(&mut self, _ctx: &mut C) {
        if let Some((n, saved)) = self.backup.take() {
            let _ = with_bitmap(&n, &self.target, |b| {
                b.restore_bits(&saved);
                Ok(())
            });
        }
    }

    fn clean(&mut self, _ctx: &mut C) {
        self.backup = None;
    }
}

/// Freezes `name` on `node` for a job (see [`DirtyBitmap::create_successor`]) after the
/// usability check a backup makes.
pub fn freeze_for_job(node: &BlockNode, name: &str) -> BlockResult<()> {
    with_bitmap(node, name, |b| {
        check_bitmap(b, BitmapCheck::AllowReadOnly)?;
        b.create_successor()
    })
}

/// Ends a job's use of `name`: `success` keeps only writes made meanwhile (abdicate), failure
/// merges them back (reclaim).
pub fn thaw_after_job(node: &BlockNode, name: &str, success: bool) -> BlockResult<()> {
    with_bitmap(
        node,
        name,
        |b| if success { b.abdicate() } else { b.reclaim() },
    )
}
