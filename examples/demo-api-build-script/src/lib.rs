//! demo-api-build-script: the API of `examples/demo-schema/`, written at build time by
//! a build script (`build.rs`, `qapi_codegen::Builder`) and included here. Editing any
//! file of the schema reruns the build script (`cargo:rerun-if-changed`).

include!(concat!(env!("OUT_DIR"), "/qapi.rs"));
