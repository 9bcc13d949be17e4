//! qmp-api: the Rust API generated from `qapi-schema/` plus its small hand-written runtime.

pub mod error;
pub use error::{ErrorClass, QmpError};
