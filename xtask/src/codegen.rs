//! `cargo xtask codegen`: schema → generated Rust, checked in and kept fresh.

use clap::Args;
use qapi_codegen::GeneratedFile;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct CodegenArgs {
    /// Fail (listing stale files) instead of writing, if the checked-in files differ.
    #[arg(long)]
    check: bool,
    /// Generate a self-contained crate from this schema instead of qmp-api's module
    /// (with --check: check that crate instead).
    #[arg(long, requires = "out")]
    schema: Option<PathBuf>,
    /// Directory for the crate generated from --schema.
    #[arg(long, requires = "schema")]
    out: Option<PathBuf>,
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `qapi-runtime`'s dependency line for a crate generated into `out`: this
/// workspace's `crates/qapi-runtime`, relative to `out` where both share a root.
pub(crate) fn runtime_dependency(out: &Path) -> Result<String, String> {
    let runtime = workspace_root().join("crates/qapi-runtime");
    let runtime = runtime
        .canonicalize()
        .map_err(|e| format!("{}: {e}", runtime.display()))?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let out = out
        .canonicalize()
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let common = out
        .components()
        .zip(runtime.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut relative = PathBuf::new();
    for _ in out.components().skip(common) {
        relative.push("..");
    }
    relative.extend(runtime.components().skip(common));
    Ok(format!("{{ path = {:?} }}", relative.display().to_string()))
}

/// Loads a checked schema; errors are printed `FILE:LINE:COL: message`.
fn load(path: &Path) -> Result<qapi_model::Schema, String> {
    qapi_model::load(path).map_err(|diagnostics| diagnostics.to_string())
}

/// Writes `contents` to `path` through a temporary file, so a reader never sees half a file.
pub(crate) fn write_file(path: &Path, contents: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, contents).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn run(args: &CodegenArgs) -> Result<(), String> {
    let (files, out_dir, command) = match (&args.schema, &args.out) {
        (Some(schema), Some(out)) => {
            let model = load(schema)?;
            let name = out
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("qapi-generated");
            let files = qapi_codegen::generate_crate(&model, name, &runtime_dependency(out)?)
                .map_err(|e| e.to_string())?;
            let command = format!(
                "cargo xtask codegen --schema {} --out {}",
                schema.display(),
                out.display()
            );
            (files, out.clone(), command)
        }
        _ => {
            let root = workspace_root();
            let model = load(&root.join("qapi-schema/qapi-schema.json"))?;
            let files = qapi_codegen::generate(&model).map_err(|e| e.to_string())?;
            let out = root.join("crates/qmp-api/src/generated");
            (files, out, "cargo xtask codegen".to_string())
        }
    };
    let stale: Vec<&GeneratedFile> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(out_dir.join(&f.path))
                .ok()
                .as_deref()
                != Some(f.contents.as_str())
        })
        .collect();
    if args.check {
        if stale.is_empty() {
            println!("generated files are up to date");
            return Ok(());
        }
        let list: Vec<String> = stale
            .iter()
            .map(|f| format!("  {}", out_dir.join(&f.path).display()))
            .collect();
        return Err(format!(
            "generated files are stale:\n{}\nrun `{command}` and commit",
            list.join("\n")
        ));
    }
    for f in stale {
        let path = out_dir.join(&f.path);
        write_file(&path, &f.contents)?;
        println!("updated {}", path.display());
    }
    Ok(())
}
