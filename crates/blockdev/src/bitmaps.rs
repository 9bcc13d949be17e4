//! `block-dirty-bitmap-*`: the commands and the transaction actions, over the block crate's
//! bitmap operations.

use block::BlockGraph;
use block::bitmap_cmd::{
    self, BitmapAddAction, BitmapClearAction, BitmapEnableAction, BitmapMergeAction,
    BitmapRemoveAction, MergeSource, TransactionAction,
};
use qmp_api::{
    BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockDirtyBitmapOrStr, QmpError,
};

use crate::BlockState;
use crate::block_layer::qmp_error;

impl BlockState {
    /// The block crate's graph, or an error if the daemon runs without one.
    pub(crate) fn block_graph(&mut self) -> Result<&mut BlockGraph, QmpError> {
        self.graph
            .as_mut()
            .and_then(|g| g.block_graph())
            .ok_or_else(|| QmpError::generic("Dirty bitmaps need the block layer"))
    }
}

fn sources(bitmaps: Vec<BlockDirtyBitmapOrStr>) -> Vec<MergeSource> {
    bitmaps
        .into_iter()
        .map(|b| match b {
            BlockDirtyBitmapOrStr::Local(name) => MergeSource::Local(name),
            BlockDirtyBitmapOrStr::External(BlockDirtyBitmap { node, name }) => {
                MergeSource::External { node, name }
            }
        })
        .collect()
}

pub(crate) fn add(state: &mut BlockState, a: BlockDirtyBitmapAdd) -> Result<(), QmpError> {
    bitmap_cmd::bitmap_add(
        state.block_graph()?,
        &a.node,
        &a.name,
        a.granularity.map(u64::from),
        a.persistent.unwrap_or(false),
        a.disabled.unwrap_or(false),
    )
    .map_err(qmp_error)
}

pub(crate) fn remove(state: &mut BlockState, b: BlockDirtyBitmap) -> Result<(), QmpError> {
    bitmap_cmd::bitmap_remove(state.block_graph()?, &b.node, &b.name).map_err(qmp_error)
}

pub(crate) fn clear(state: &mut BlockState, b: BlockDirtyBitmap) -> Result<(), QmpError> {
    bitmap_cmd::bitmap_clear(state.block_graph()?, &b.node, &b.name).map_err(qmp_error)
}

pub(crate) fn set_enabled(
    state: &mut BlockState,
    b: BlockDirtyBitmap,
    enabled: bool,
) -> Result<(), QmpError> {
    bitmap_cmd::bitmap_set_enabled(state.block_graph()?, &b.node, &b.name, enabled)
        .map(|_| ())
        .map_err(qmp_error)
}

pub(crate) fn merge(state: &mut BlockState, m: BlockDirtyBitmapMerge) -> Result<(), QmpError> {
    bitmap_cmd::bitmap_merge(
        state.block_graph()?,
        &m.node,
        &m.target,
        &sources(m.bitmaps),
    )
    .map(|_| ())
    .map_err(qmp_error)
}

/// A block-crate bitmap action as one of our transaction actions.
pub(crate) struct BitmapAction(Box<dyn TransactionAction<BlockGraph>>);

impl BitmapAction {
    pub(crate) fn add(a: BlockDirtyBitmapAdd) -> Self {
        BitmapAction(Box::new(BitmapAddAction::new(
            &a.node,
            &a.name,
            a.granularity.map(u64::from),
            a.persistent.unwrap_or(false),
            a.disabled.unwrap_or(false),
        )))
    }

    pub(crate) fn remove(b: BlockDirtyBitmap) -> Self {
        BitmapAction(Box::new(BitmapRemoveAction::new(&b.node, &b.name)))
    }

    pub(crate) fn clear(b: BlockDirtyBitmap) -> Self {
        BitmapAction(Box::new(BitmapClearAction::new(&b.node, &b.name)))
    }

    pub(crate) fn set_enabled(b: BlockDirtyBitmap, enabled: bool) -> Self {
        BitmapAction(Box::new(BitmapEnableAction::new(&b.node, &b.name, enabled)))
    }

    pub(crate) fn merge(m: BlockDirtyBitmapMerge) -> Self {
        BitmapAction(Box::new(BitmapMergeAction::new(
            &m.node,
            &m.target,
            sources(m.bitmaps),
        )))
    }
}

impl TransactionAction<BlockState, QmpError> for BitmapAction {
    fn prepare(&mut self, env: &mut BlockState) -> Result<(), QmpError> {
        let graph = env.block_graph()?;
        self.0.prepare(graph).map_err(qmp_error)
    }

    fn commit(&mut self, env: &mut BlockState) {
        if let Ok(graph) = env.block_graph() {
            self.0.commit(graph);
        }
    }

    fn abort(&mut self, env: &mut BlockState) {
        if let Ok(graph) = env.block_graph() {
            self.0.abort(graph);
        }
    }

    fn clean(&mut self, env: &mut BlockState) {
        if let Ok(graph) = env.block_graph() {
            self.0.clean(graph);
        }
    }
}
