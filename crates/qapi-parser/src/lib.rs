//! qapi-parser: QAPI schema text → expressions with locations and doc comments (work in progress).

pub mod location;
pub use location::{Location, SourceFile};
