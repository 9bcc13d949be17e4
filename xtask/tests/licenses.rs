//! Repository hygiene: the two crates generated from QEMU's schema text are
//! GPL-2.0-or-later, and no other crate of the workspace depends on them outside its
//! tests and examples (dev-dependencies), so the rest stays MIT OR Apache-2.0.

use serde_json::Value;
use std::process::Command;

/// The crates whose documentation is QEMU's schema text.
const GPL_CRATES: [&str; 2] = ["qemu-qmp-api", "qemu-ga-api"];

fn workspace_packages() -> Vec<Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    metadata["packages"].as_array().expect("packages").clone()
}

#[test]
fn crates_generated_from_qemus_schema_text_are_gpl_and_nothing_else_links_them() {
    let packages = workspace_packages();
    for name in GPL_CRATES {
        let package = packages
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} is a workspace member"));
        assert_eq!(package["license"], "GPL-2.0-or-later", "{name}");
    }
    for package in &packages {
        let name = package["name"].as_str().unwrap_or_default();
        if GPL_CRATES.contains(&name) {
            continue;
        }
        assert_eq!(package["license"], "MIT OR Apache-2.0", "{name}");
        for dependency in package["dependencies"].as_array().into_iter().flatten() {
            let linked = dependency["kind"].is_null() || dependency["kind"] == "build";
            let dep_name = dependency["name"].as_str().unwrap_or_default();
            assert!(
                !(linked && GPL_CRATES.contains(&dep_name)),
                "{name} depends on {dep_name} outside its tests and examples"
            );
        }
    }
}
