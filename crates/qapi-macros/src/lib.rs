//! qapi-macros: `qapi!("schema/qapi-schema.json")` expands to a QAPI schema's Rust API.
//!
//! The path is relative to the calling crate's manifest directory. The expansion is the
//! same items `cargo xtask codegen` checks in and a `qapi_codegen::Builder` build script
//! writes (modules `types`, `commands`, `events`, `introspection`, each re-exported),
//! built by `qapi-codegen`; the crate using it depends on `qapi-runtime`, `serde` and
//! `serde_json`. Every schema file the entry includes is read with `include_bytes!` in
//! the expansion, so editing any of them rebuilds the crate. Schema errors are compile
//! errors carrying `FILE:LINE:COL: message`, one per error.
//!
//! ```text
//! mod api {
//!     qapi_macros::qapi!("schema/qapi-schema.json");
//! }
//! let finalize = api::BlockJobFinalizeArguments { id: "job0".into() };
//! ```

use proc_macro::TokenStream;
use quote::quote_spanned;
use std::path::PathBuf;

/// A QAPI schema's Rust API: `qapi!("path/to/schema.json")`.
#[proc_macro]
pub fn qapi(input: TokenStream) -> TokenStream {
    let path = syn::parse_macro_input!(input as syn::LitStr);
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    match qapi_codegen::expand_macro(&manifest_dir, &path.value()) {
        Ok(tokens) => tokens.into(),
        Err(errors) => {
            let span = path.span();
            errors
                .iter()
                .map(|message| quote_spanned!(span=> ::std::compile_error!(#message);))
                .collect::<proc_macro2::TokenStream>()
                .into()
        }
    }
}
