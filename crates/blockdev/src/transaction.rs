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
/// The actions' drained sections end together after the last clean, in clean order, under one
/// job-registry lock: a job resumed by an early clean cannot run (and, say, fail) before the
/// later ones are resumed, as in QEMU where they only run once the command returns.
pub fn run(state: &mut BlockState, actions: Vec<Box<Action>>) -> Result<(), QmpError> {
    let result = block::run_transaction(state, actions);
    let ended = std::mem::take(&mut state.ended_drains);
    state.jobs.resume_all(&ended);
    result
}
