//! qapi-codegen (work in progress).
