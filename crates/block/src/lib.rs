//! block (work in progress).
