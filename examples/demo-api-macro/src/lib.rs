//! demo-api-macro: the API of `examples/demo-schema/`, expanded at compile time by
//! `qapi!` (the path is relative to this crate). Editing any file of the schema
//! rebuilds this crate.

qapi_macros::qapi!("../demo-schema/demo.json");
