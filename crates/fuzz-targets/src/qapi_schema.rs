//! The QAPI schema parser and model: any text is either a checked [`qapi_model::Schema`] or
//! diagnostics located inside the text, never a panic.

/// Where the fuzzed text pretends to live: a directory that does not exist, so an `include`
/// never reads a real file.
const NAME: &str = "/nonexistent-fuzz-dir/fuzz.json";

/// Parses and checks `data` as a schema file.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match qapi_model::load_str(NAME, text) {
        Ok(schema) => {
            // A schema that checks can be walked end to end.
            let _ = format!("{schema:?}");
        }
        Err(diagnostics) => {
            let shown = diagnostics.to_string();
            assert!(!shown.is_empty(), "an error without a message");
        }
    }
}
