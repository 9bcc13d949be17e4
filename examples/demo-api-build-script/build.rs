//! Generates the API of `examples/demo-schema/` into `OUT_DIR` (see `src/lib.rs`).

fn main() -> Result<(), qapi_codegen::BuildError> {
    qapi_codegen::Builder::new()
        .schema("../demo-schema/demo.json")
        .generate()?;
    Ok(())
}
