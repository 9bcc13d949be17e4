//! The crate generated from QEMU's complete schema compiles without errors or warnings.
//!
//! Slow (about a minute: it type-checks ~3 MB of generated code plus serde).
//! The check's target directory is kept under `target/tmp`, so reruns are faster.

use std::path::Path;
use std::process::Command;

#[test]
fn crate_generated_from_qemus_complete_schema_passes_cargo_check() {
    let schema_path = qapi_testdata::qemu_schema().expect("QEMU's schema is available");
    let schema =
        qapi_model::load(&schema_path).unwrap_or_else(|d| panic!("QEMU's schema loads:\n{d}"));
    let out = tempfile::tempdir().expect("temp dir");
    let runtime = format!(
        "{{ path = {:?} }}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../qapi-runtime")
    );
    let files = qapi_codegen::generate_crate(&schema, "qemu-qapi", &runtime).expect("generates");
    for f in &files {
        let path = out.path().join(&f.path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &f.contents).unwrap();
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-qapi-check");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["check", "--offline", "--message-format", "short"])
        .current_dir(out.path())
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "cargo check failed:\n{stderr}");
    let diagnostics: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(": warning") || l.contains(": error"))
        .collect();
    assert!(
        diagnostics.is_empty(),
        "diagnostics:\n{}",
        diagnostics.join("\n")
    );
}

#[test]
fn qemus_complete_schema_generates_identical_files_twice() {
    let schema_path = qapi_testdata::qemu_schema().expect("QEMU's schema is available");
    let schema =
        qapi_model::load(&schema_path).unwrap_or_else(|d| panic!("QEMU's schema loads:\n{d}"));
    let first = qapi_codegen::generate(&schema).expect("generates");
    let second = qapi_codegen::generate(&schema).expect("generates");
    assert_eq!(first, second);
}
