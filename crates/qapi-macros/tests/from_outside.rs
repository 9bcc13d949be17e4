//! `qapi!` as cargo and rustc see it, in a crate of its own: an edit to an *included*
//! schema file rebuilds the crate, and a schema error is a compile error carrying
//! `FILE:LINE:COL` and the message.
//!
//! Slow the first time (it builds the macro and its dependencies in a target directory
//! kept under `target/tmp`), quick afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;

const ENTRY: &str =
    "{ 'include': 'colours.json' }\n{ 'command': 'paint', 'data': { 'colour': 'Colour' } }\n";
const COLOURS: &str = "{ 'enum': 'Colour', 'data': [ 'red', 'dark-blue' ] }\n";
const COLOURS_BROKEN: &str = "{ 'enum': 'Colour', 'data': [ 'red', 'dark-blue' ] }\n{ 'struct': 'Tint', 'data': { 'c': 'Nope' } }\n";

/// A crate using `qapi!("schema/entry.json")` and a function using its types.
fn downstream_crate(dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dep = |name: &str| format!("{{ path = {:?} }}", workspace.join("crates").join(name));
    let manifest = format!(
        "[package]\nname = \"paint-api\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [dependencies]\nqapi-macros = {}\nqapi-runtime = {}\n\
         serde = {{ version = \"1\", features = [\"derive\"] }}\n\
         serde_json = {{ version = \"1\", features = [\"preserve_order\"] }}\n\n[workspace]\n",
        dep("qapi-macros"),
        dep("qapi-runtime"),
    );
    std::fs::create_dir_all(dir.join("src")).expect("creates");
    std::fs::create_dir_all(dir.join("schema")).expect("creates");
    std::fs::write(dir.join("Cargo.toml"), manifest).expect("writes");
    std::fs::write(
        dir.join("src/lib.rs"),
        "qapi_macros::qapi!(\"schema/entry.json\");\n\
         pub fn paint() -> PaintArguments { PaintArguments { colour: Colour::DarkBlue } }\n",
    )
    .expect("writes");
    std::fs::write(dir.join("schema/entry.json"), ENTRY).expect("writes");
    std::fs::write(dir.join("schema/colours.json"), COLOURS).expect("writes");
}

/// `cargo check` of the crate in `dir`: success, and what rustc said.
fn check(dir: &Path, target: &PathBuf) -> (bool, String) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["check", "--offline", "--message-format", "short"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_edit_to_an_included_file_rebuilds_and_schema_errors_are_located_compile_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qapi-macro-check");
    downstream_crate(dir.path());
    let (ok, stderr) = check(dir.path(), &target);
    assert!(ok, "the crate builds:\n{stderr}");

    // Only the included file changes: cargo must notice (include_bytes! in the expansion).
    std::fs::write(dir.path().join("schema/colours.json"), COLOURS_BROKEN).expect("writes");
    let (ok, stderr) = check(dir.path(), &target);
    assert!(!ok, "the broken schema must fail the build");
    let colours = dir
        .path()
        .join("schema/entry.json")
        .parent()
        .map(|d| d.join("colours.json"));
    let located = format!("{}:2:", colours.expect("a path").display());
    assert!(
        stderr.contains(&located) && stderr.contains("Nope"),
        "a located error naming the unknown type:\n{stderr}"
    );

    // Fixed again: builds again.
    std::fs::write(dir.path().join("schema/colours.json"), COLOURS).expect("writes");
    let (ok, stderr) = check(dir.path(), &target);
    assert!(ok, "the fixed crate builds:\n{stderr}");
}
