//! qmp-api: the Rust API generated from `qapi-schema/` plus its small hand-written runtime.
//!
//! Everything generated (types, the `Commands` trait, `dispatch`, `Event`,
//! `qmp_schema`) is re-exported at the crate root. The runtime is [`error`]
//! (QMP errors), [`input`] (the QMP input visitor with QEMU's messages) and
//! [`wire`] (event timestamps, command properties).

pub mod error;
// Printed by prettyplease, not rustfmt: `cargo fmt` leaves the generated module alone.
#[rustfmt::skip]
pub mod generated;
pub mod input;
pub mod wire;

pub use error::{ErrorClass, QmpError};
pub use generated::*;
pub use wire::{CommandInfo, EventTimestamp};
