//! The `transaction` command's actions run through the block layer's protocol runner
//! ([`block::run_transaction`], QEMU's `util/transactions.c` order, see ARCHITECTURE.md): every
//! daemon action (backups, snapshots, bitmaps, abort) is an [`Action`] over the command layer's
//! state, failing with a QMP error.

use qmp_api::QmpError;

use crate::BlockState;

pub use block::TransactionAction;

/// A transaction action of the daemon: acts on [`BlockState`], fails with a [`QmpError`].
pub type Action = dyn TransactionAction<BlockState, QmpError>;

/// Runs `actions` as one transaction; returns the first prepare error.
pub fn run(state: &mut BlockState, actions: Vec<Box<Action>>) -> Result<(), QmpError> {
    block::run_transaction(state, actions)
}
