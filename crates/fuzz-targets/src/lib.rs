//! fuzz-targets: what each coverage-guided fuzz target does with one input, as plain functions
//! over bytes, so that the fuzzer (`fuzz/`, `cargo xtask fuzz TARGET`) and the replay tests of
//! this crate (the committed corpus and every crash found, in `fuzz/corpus/` and
//! `fuzz/regressions/`) run the same code. A target's function panics exactly when it finds a
//! bug: a panic in the code under test, or a broken invariant it checks.

pub mod nbd_server;
pub mod qapi_schema;
pub mod qcow2_image;
pub mod qmp_input;
pub mod seeds;

/// What a target does with one input.
pub type TargetBody = fn(&[u8]);

/// Every target: its name (as `cargo xtask fuzz NAME` takes it) and its body.
pub const TARGETS: &[(&str, TargetBody)] = &[
    ("qapi_schema", qapi_schema::run),
    ("qmp_input", qmp_input::run),
    ("nbd_server", nbd_server::run),
    ("qcow2_image", qcow2_image::run),
];
