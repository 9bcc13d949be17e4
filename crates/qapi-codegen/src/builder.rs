//! The two ways of generating at build time: [`Builder`] for a downstream `build.rs`,
//! and [`expand_macro`] behind the `qapi!` procedural macro (`qapi-macros`). Both give
//! [`api_tokens`](crate::api_tokens) (the build script printed as one file) and make the
//! crate depend on every file of the schema.

use crate::schema_files::schema_files;
use proc_macro2::TokenStream;
use quote::quote;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a build-time generation failed.
pub enum BuildError {
    /// No `.schema(path)` was given, or no output directory is known.
    Usage(String),
    /// The schema has errors: one `FILE:LINE:COL: message` per error (with its include
    /// chain and context lines), as the schema's checks word them.
    Schema(Vec<String>),
    /// Reading the schema's files or writing the output failed.
    Io(String),
    /// Generation failed (a bug: a checked schema always generates).
    Codegen(crate::CodegenError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Usage(m) | BuildError::Io(m) => f.write_str(m),
            BuildError::Schema(errors) => f.write_str(&errors.join("\n")),
            BuildError::Codegen(e) => write!(f, "{e}"),
        }
    }
}

/// As `Display`, so that `fn main() -> Result<(), BuildError>` in a build script prints
/// the schema's errors as they read.
impl fmt::Debug for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for BuildError {}

/// Loads and checks the schema at `path`, with the files it is made of.
fn load(path: &Path) -> Result<(qapi_model::Schema, Vec<PathBuf>), BuildError> {
    let schema = qapi_model::load(path)
        .map_err(|d| BuildError::Schema(d.errors.iter().map(ToString::to_string).collect()))?;
    let files =
        schema_files(path).map_err(|e| BuildError::Io(format!("{}: {e}", path.display())))?;
    Ok((schema, files))
}

/// Generates a schema's API from a build script into `OUT_DIR`, for the crate to
/// `include!`:
///
/// ```text
/// // build.rs
/// fn main() -> Result<(), qapi_codegen::BuildError> {
///     qapi_codegen::Builder::new().schema("schema/qapi-schema.json").generate()?;
///     Ok(())
/// }
/// // src/lib.rs
/// include!(concat!(env!("OUT_DIR"), "/qapi.rs"));
/// ```
///
/// The file holds the modules `types`, `commands`, `events`, `introspection` and a
/// `pub use` of each, the same items as a checked-in `generated/` module and as
/// `qapi!`. `cargo:rerun-if-changed` is printed for every file the schema includes.
#[derive(Debug, Clone)]
pub struct Builder {
    schema: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    file_name: String,
    rerun_if_changed: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            schema: None,
            out_dir: None,
            file_name: "qapi.rs".to_string(),
            rerun_if_changed: true,
        }
    }
}

/// What [`Builder::generate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The file written.
    pub path: PathBuf,
    /// The schema's files (entry first), each one a `cargo:rerun-if-changed`.
    pub schema_files: Vec<PathBuf>,
}

impl Builder {
    pub fn new() -> Self {
        Builder::default()
    }

    /// The schema's entry file; a relative path is relative to the package being built
    /// (`CARGO_MANIFEST_DIR`), where cargo runs build scripts.
    pub fn schema(mut self, path: impl AsRef<Path>) -> Self {
        self.schema = Some(path.as_ref().to_path_buf());
        self
    }

    /// Where to write (default: `OUT_DIR`).
    pub fn out_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.out_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The name of the file written (default: `qapi.rs`).
    pub fn file_name(mut self, name: impl Into<String>) -> Self {
        self.file_name = name.into();
        self
    }

    /// Whether to print `cargo:rerun-if-changed` for every schema file (default: yes).
    pub fn rerun_if_changed(mut self, print: bool) -> Self {
        self.rerun_if_changed = print;
        self
    }

    /// Loads and checks the schema, writes the API (only if its text changed, so that an
    /// unchanged schema rebuilds nothing), and prints `cargo:rerun-if-changed` lines.
    pub fn generate(self) -> Result<Generated, BuildError> {
        let schema = self
            .schema
            .ok_or_else(|| BuildError::Usage("qapi_codegen::Builder: no .schema(path)".into()))?;
        let schema = match std::env::var_os("CARGO_MANIFEST_DIR") {
            Some(dir) if schema.is_relative() => PathBuf::from(dir).join(schema),
            _ => schema,
        };
        let out_dir = match self
            .out_dir
            .or_else(|| std::env::var_os("OUT_DIR").map(PathBuf::from))
        {
            Some(dir) => dir,
            None => {
                return Err(BuildError::Usage(
                    "qapi_codegen::Builder: no .out_dir(dir) and no OUT_DIR (not in a build script)"
                        .into(),
                ));
            }
        };
        let (model, files) = match load(&schema) {
            Ok(loaded) => loaded,
            Err(e) => {
                // A schema with errors must be looked at again once edited.
                if self.rerun_if_changed {
                    println!("cargo:rerun-if-changed={}", schema.display());
                }
                return Err(e);
            }
        };
        if self.rerun_if_changed {
            for file in &files {
                println!("cargo:rerun-if-changed={}", file.display());
            }
        }
        let text = crate::api_source(&model).map_err(BuildError::Codegen)?;
        let path = out_dir.join(&self.file_name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::create_dir_all(&out_dir)
                .and_then(|()| std::fs::write(&path, text))
                .map_err(|e| BuildError::Io(format!("{}: {e}", path.display())))?;
        }
        Ok(Generated {
            path,
            schema_files: files,
        })
    }
}

/// What `qapi!("path")` expands to, `path` relative to `manifest_dir` (the calling
/// crate's): the API's tokens, then an `include_bytes!` of every schema file so that
/// editing any of them rebuilds the crate. On schema errors, the messages
/// (`FILE:LINE:COL: message`, one per error) for the macro to report as compile errors.
pub fn expand_macro(manifest_dir: &Path, schema: &str) -> Result<TokenStream, Vec<String>> {
    let path = manifest_dir.join(schema);
    let (model, files) = load(&path).map_err(|e| match e {
        BuildError::Schema(errors) => errors,
        other => vec![other.to_string()],
    })?;
    let mut tokens = crate::api_tokens(&model);
    let files = files.iter().map(|f| f.display().to_string());
    tokens.extend(quote! {
        #(const _: &[u8] = include_bytes!(#files);)*
    });
    Ok(tokens)
}
