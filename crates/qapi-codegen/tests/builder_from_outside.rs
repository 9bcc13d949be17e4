//! `qapi_codegen::Builder` as cargo sees it, in a crate of its own with a build script:
//! an edit to an *included* schema file reruns the build script (it prints
//! `cargo:rerun-if-changed` for every schema file), and a schema error fails the build
//! with `FILE:LINE:COL` and the message.
//!
//! Slow the first time (it builds the generator in a target directory kept under
//! `target/tmp`, shared with qapi-macros' test of the same kind), quick afterwards.

use std::path::Path;
use std::process::Command;

const ENTRY: &str =
    "{ 'include': 'colours.json' }\n{ 'command': 'paint', 'data': { 'colour': 'Colour' } }\n";
const COLOURS: &str = "{ 'enum': 'Colour', 'data': [ 'red', 'dark-blue' ] }\n";
const COLOURS_BROKEN: &str = "{ 'enum': 'Colour', 'data': [ 'red', 'dark-blue' ] }\n{ 'struct': 'Tint', 'data': { 'c': 'Nope' } }\n";

fn downstream_crate(dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dep = |name: &str| format!("{{ path = {:?} }}", workspace.join("crates").join(name));
    let manifest = format!(
        "[package]\nname = \"paint-api\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [dependencies]\nqapi-runtime = {}\n\
         serde = {{ version = \"1\", features = [\"derive\"] }}\n\
         serde_json = {{ version = \"1\", features = [\"preserve_order\"] }}\n\n\
         [build-dependencies]\nqapi-codegen = {}\n\n[workspace]\n",
        dep("qapi-runtime"),
        dep("qapi-codegen"),
    );
    std::fs::create_dir_all(dir.join("src")).expect("creates");
    std::fs::create_dir_all(dir.join("schema")).expect("creates");
    std::fs::write(dir.join("Cargo.toml"), manifest).expect("writes");
    std::fs::write(
        dir.join("build.rs"),
        "fn main() -> Result<(), qapi_codegen::BuildError> {\n    \
         qapi_codegen::Builder::new().schema(\"schema/entry.json\").generate()?;\n    Ok(())\n}\n",
    )
    .expect("writes");
    std::fs::write(
        dir.join("src/lib.rs"),
        "include!(concat!(env!(\"OUT_DIR\"), \"/qapi.rs\"));\n\
         pub fn paint() -> PaintArguments { PaintArguments { colour: Colour::DarkBlue } }\n",
    )
    .expect("writes");
    std::fs::write(dir.join("schema/entry.json"), ENTRY).expect("writes");
    std::fs::write(dir.join("schema/colours.json"), COLOURS).expect("writes");
}

fn check(dir: &Path) -> (bool, String) {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qapi-macro-check");
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
fn an_edit_to_an_included_file_reruns_the_build_script_and_errors_are_located() {
    let dir = tempfile::tempdir().expect("temp dir");
    downstream_crate(dir.path());
    let (ok, stderr) = check(dir.path());
    assert!(ok, "the crate builds:\n{stderr}");

    std::fs::write(dir.path().join("schema/colours.json"), COLOURS_BROKEN).expect("writes");
    let (ok, stderr) = check(dir.path());
    assert!(!ok, "the broken schema must fail the build");
    let located = format!("{}:2:", dir.path().join("schema/colours.json").display());
    assert!(
        stderr.contains(&located) && stderr.contains("Nope"),
        "a located error naming the unknown type:\n{stderr}"
    );

    std::fs::write(dir.path().join("schema/colours.json"), COLOURS).expect("writes");
    let (ok, stderr) = check(dir.path());
    assert!(ok, "the fixed crate builds:\n{stderr}");
}
