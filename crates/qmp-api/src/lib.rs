//! qmp-api (work in progress).
