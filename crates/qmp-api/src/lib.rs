//! qmp-api: blockjobd's QMP API, generated from `qapi-schema/` by `cargo xtask codegen`.
//!
//! Everything generated (types, each command's `<Command>Arguments` with its
//! `qapi_runtime::Command` impl, the server's `Commands` trait and `dispatch`, `Event`,
//! `qmp_schema`) is re-exported at the crate root. It builds on `qapi-runtime`, whose
//! modules are re-exported here too: [`error`] (QMP errors), [`input`] (the QMP input
//! visitor with QEMU's messages) and [`wire`] (event timestamps, command properties).

// Printed by prettyplease, not rustfmt: `cargo fmt` leaves the generated module alone.
#[rustfmt::skip]
pub mod generated;

pub use generated::*;
pub use qapi_runtime::{ErrorClass, EventTimestamp, QmpError, error, input, wire};
