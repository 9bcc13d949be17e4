//! The project's own schema (`qapi-schema/` at the repository root) loads
//! with zero errors.

use std::path::Path;

#[test]
fn project_schema_loads_with_zero_errors() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../qapi-schema/qapi-schema.json");
    let schema =
        qapi_model::load(&path).unwrap_or_else(|d| panic!("qapi-schema/ has errors:\n{d}"));
    for name in [
        "block-job-finalize",
        "BlockJobStatus",
        "transaction",
        "JOB_STATUS_CHANGE",
    ] {
        assert!(schema.entity(name).is_some(), "{name} missing");
    }
}
