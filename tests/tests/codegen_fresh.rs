//! `cargo xtask codegen --check` as a test: `cargo test` alone catches generated code that no
//! longer matches the schema (run `cargo xtask codegen` and commit).

use std::process::Command;

use blockjobs_tests::repo_root;

#[test]
fn the_generated_api_matches_the_schema() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let out = Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "run",
            "--quiet",
            "--profile",
            profile,
            "--package",
            "xtask",
            "--",
            "codegen",
            "--check",
        ])
        .output()
        .expect("run cargo xtask codegen --check");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
