//! job (work in progress).
