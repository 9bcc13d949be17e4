//! qapi-model: QAPI expressions → a checked, linked [`Schema`] (work in progress).
//!
//! Entry point (to be implemented): `pub fn load(path: &Path) -> Result<Schema, Diagnostics>`.

pub mod types;
pub use types::*;
