//! The two tables of the job state machine, as data: which status changes may happen, and which
//! command verbs a job accepts in each status (QEMU 10.0's `JobSTT` and `JobVerbTable`).

use crate::{BlockJobStatus, BlockJobVerb};

const X: bool = true;
const O: bool = false;

/// Column/row order of both tables: U C R P Y S W D X E N.
pub const STATUS_ORDER: [BlockJobStatus; 11] = [
    BlockJobStatus::Undefined,
    BlockJobStatus::Created,
    BlockJobStatus::Running,
    BlockJobStatus::Paused,
    BlockJobStatus::Ready,
    BlockJobStatus::Standby,
    BlockJobStatus::Waiting,
    BlockJobStatus::Pending,
    BlockJobStatus::Aborting,
    BlockJobStatus::Concluded,
    BlockJobStatus::Null,
];

/// `TRANSITIONS[from][to]`: may a job go from `from` to `to`?
#[rustfmt::skip]
pub const TRANSITIONS: [[bool; 11]; 11] = [
    //         U  C  R  P  Y  S  W  D  X  E  N
    /* U */  [ O, X, O, O, O, O, O, O, O, O, O ],
    /* C */  [ O, O, X, O, O, O, O, O, X, O, X ],
    /* R */  [ O, O, O, X, X, O, X, O, X, O, O ],
    /* P */  [ O, O, X, O, O, O, O, O, O, O, O ],
    /* Y */  [ O, O, O, O, O, X, X, O, X, O, O ],
    /* S */  [ O, O, O, O, X, O, O, O, O, O, O ],
    /* W */  [ O, O, O, O, O, O, O, X, X, O, O ],
    /* D */  [ O, O, O, O, O, O, O, O, X, X, O ],
    /* X */  [ O, O, O, O, O, O, O, O, X, X, O ],
    /* E */  [ O, O, O, O, O, O, O, O, O, O, X ],
    /* N */  [ O, O, O, O, O, O, O, O, O, O, O ],
];

/// Row order of [`VERBS`].
pub const VERB_ORDER: [BlockJobVerb; 8] = [
    BlockJobVerb::Cancel,
    BlockJobVerb::Pause,
    BlockJobVerb::Resume,
    BlockJobVerb::SetSpeed,
    BlockJobVerb::Complete,
    BlockJobVerb::Finalize,
    BlockJobVerb::Dismiss,
    BlockJobVerb::Change,
];

/// `VERBS[verb][status]`: does a job in `status` accept `verb`?
#[rustfmt::skip]
pub const VERBS: [[bool; 11]; 8] = [
    //                U  C  R  P  Y  S  W  D  X  E  N
    /* cancel    */ [ O, X, X, X, X, X, X, X, O, O, O ],
    /* pause     */ [ O, X, X, X, X, X, O, O, O, O, O ],
    /* resume    */ [ O, X, X, X, X, X, O, O, O, O, O ],
    /* set-speed */ [ O, X, X, X, X, X, O, O, O, O, O ],
    /* complete  */ [ O, O, O, O, X, X, O, O, O, O, O ],
    /* finalize  */ [ O, O, O, O, O, O, O, X, O, O, O ],
    /* dismiss   */ [ O, O, O, O, O, O, O, O, O, X, O ],
    /* change    */ [ O, X, X, X, X, X, O, O, O, O, O ],
];

/// The table index of a status.
pub fn status_index(status: BlockJobStatus) -> usize {
    match status {
        BlockJobStatus::Undefined => 0,
        BlockJobStatus::Created => 1,
        BlockJobStatus::Running => 2,
        BlockJobStatus::Paused => 3,
        BlockJobStatus::Ready => 4,
        BlockJobStatus::Standby => 5,
        BlockJobStatus::Waiting => 6,
        BlockJobStatus::Pending => 7,
        BlockJobStatus::Aborting => 8,
        BlockJobStatus::Concluded => 9,
        BlockJobStatus::Null => 10,
        // A status the schema does not know: only a client reading a newer server's reply
        // has one; a job never does (its status comes from `TRANSITIONS`). UNDEFINED's
        // row and column: it accepts no verb.
        BlockJobStatus::UnknownValue => 0,
    }
}

/// The table index of a verb.
pub fn verb_index(verb: BlockJobVerb) -> usize {
    match verb {
        BlockJobVerb::Cancel => 0,
        BlockJobVerb::Pause => 1,
        BlockJobVerb::Resume => 2,
        BlockJobVerb::SetSpeed => 3,
        BlockJobVerb::Complete => 4,
        BlockJobVerb::Finalize => 5,
        BlockJobVerb::Dismiss => 6,
        BlockJobVerb::Change => 7,
    }
}

/// May a job go from `from` to `to`? (`from == to` is allowed only where the table says so:
/// ABORTING → ABORTING.)
pub fn transition_allowed(from: BlockJobStatus, to: BlockJobStatus) -> bool {
    TRANSITIONS[status_index(from)][status_index(to)]
}

/// Does a job in `status` accept `verb`?
pub fn verb_allowed(verb: BlockJobVerb, status: BlockJobStatus) -> bool {
    VERBS[verb_index(verb)][status_index(status)]
}

/// Work done (W), finalization pending (D), aborting (X), concluded (E) or gone (N).
pub fn is_completed(status: BlockJobStatus) -> bool {
    matches!(
        status,
        BlockJobStatus::Waiting
            | BlockJobStatus::Pending
            | BlockJobStatus::Aborting
            | BlockJobStatus::Concluded
            | BlockJobStatus::Null
    )
}

/// READY or STANDBY (paused while ready).
pub fn is_ready(status: BlockJobStatus) -> bool {
    matches!(status, BlockJobStatus::Ready | BlockJobStatus::Standby)
}
