//! monitor (work in progress).
