//! demo-api-checked-in: the API of `examples/demo-schema/` checked in, as a project
//! outside this repository would keep one: `src/generated/` is written by
//! `cargo xtask codegen` and kept fresh by `cargo xtask codegen --check`.

// Printed by prettyplease, not rustfmt: `cargo fmt` leaves the generated module alone.
#[rustfmt::skip]
pub mod generated;

pub use generated::*;
