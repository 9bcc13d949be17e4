//! qapi-testdata: where QEMU's complete QAPI schema is on this machine.
//!
//! The `qapi-qmp` crate ships QEMU's whole schema (`schema/qapi/qapi-schema.json` and the modules
//! it includes). We never build that crate; it is a never-true `cfg` dependency of this one, so
//! `cargo metadata` fetches it and reports its manifest path. Nothing of QEMU's is copied into
//! this repository.

use std::path::PathBuf;
use std::process::Command;

/// The version of `qapi-qmp` whose schema we test against.
pub const QAPI_QMP_VERSION: &str = "0.15.0";

/// Path of QEMU's `qapi-schema.json` as shipped by `qapi-qmp`.
pub fn qemu_schema() -> Result<PathBuf, String> {
    Ok(qemu_schema_dir()?.join("qapi-schema.json"))
}

/// Directory holding QEMU's schema modules (`block-core.json`, `job.json`, ...).
pub fn qemu_schema_dir() -> Result<PathBuf, String> {
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
        .find(|p| p["name"] == "qapi-qmp" && p["version"] == QAPI_QMP_VERSION)
        .ok_or("cargo metadata does not list qapi-qmp")?;
    let manifest_path = pkg["manifest_path"]
        .as_str()
        .ok_or("qapi-qmp has no manifest path")?;
    let dir = PathBuf::from(manifest_path)
        .parent()
        .ok_or("qapi-qmp manifest path has no parent")?
        .join("schema/qapi");
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
}
