//! qapi-testdata: where QEMU's complete QAPI schema, and the guest agent's, are on this machine.
//!
//! The `qapi-qmp` crate ships QEMU's whole QMP schema (`schema/qapi/qapi-schema.json` and
//! the modules it includes), `qapi-qga` the guest agent's (`schema/qga/qapi-schema.json`).
//! We never build those crates; they are never-true `cfg` dependencies of this one, so
//! `cargo metadata` fetches them (checked against Cargo.lock's checksums) and reports their
//! manifest paths. Nothing of QEMU's is copied into this repository.

use std::path::PathBuf;
use std::process::Command;

/// The version of `qapi-qmp` whose schema we test against (QEMU 9.1's).
pub const QAPI_QMP_VERSION: &str = "0.15.0";

/// The version of `qapi-qga` whose schema `qemu-ga-api` is generated from (QEMU 9.1's).
pub const QAPI_QGA_VERSION: &str = "0.13.0";

/// Path of QEMU's `qapi-schema.json` as shipped by `qapi-qmp`.
pub fn qemu_schema() -> Result<PathBuf, String> {
    Ok(qemu_schema_dir()?.join("qapi-schema.json"))
}

/// Directory holding QEMU's schema modules (`block-core.json`, `job.json`, ...).
pub fn qemu_schema_dir() -> Result<PathBuf, String> {
    schema_dir("qapi-qmp", QAPI_QMP_VERSION, "schema/qapi")
}

/// Path of the QEMU guest agent's `qapi-schema.json` as shipped by `qapi-qga`.
pub fn qga_schema() -> Result<PathBuf, String> {
    Ok(schema_dir("qapi-qga", QAPI_QGA_VERSION, "schema/qga")?.join("qapi-schema.json"))
}

/// `dir` inside the unpacked sources of crate `name` `version`, if it holds a schema.
fn schema_dir(name: &str, version: &str, dir: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--manifest-path",
            manifest,
        ])
        .output()
        .map_err(|e| format!("cannot run {cargo} metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("cargo metadata printed invalid JSON: {e}"))?;
    let packages = meta["packages"]
        .as_array()
        .ok_or("cargo metadata: no packages")?;
    let pkg = packages
        .iter()
        .find(|p| p["name"] == name && p["version"] == version)
        .ok_or_else(|| format!("cargo metadata does not list {name} {version}"))?;
    let manifest_path = pkg["manifest_path"]
        .as_str()
        .ok_or_else(|| format!("{name} has no manifest path"))?;
    let dir = PathBuf::from(manifest_path)
        .parent()
        .ok_or_else(|| format!("{name}'s manifest path has no parent"))?
        .join(dir);
    if dir.join("qapi-schema.json").is_file() {
        Ok(dir)
    } else {
        Err(format!("{} has no qapi-schema.json", dir.display()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_qemu_schema_with_its_modules() {
        let dir = super::qemu_schema_dir().expect("locate qapi-qmp");
        for module in [
            "qapi-schema.json",
            "block-core.json",
            "job.json",
            "transaction.json",
        ] {
            assert!(
                dir.join(module).is_file(),
                "{module} missing in {}",
                dir.display()
            );
        }
    }

    #[test]
    fn finds_the_guest_agents_schema() {
        let schema = super::qga_schema().expect("locate qapi-qga");
        let text = std::fs::read_to_string(&schema).expect("reads");
        assert!(text.contains("'guest-ping'"), "{}", schema.display());
    }
}
