//! qcow2 (work in progress).
