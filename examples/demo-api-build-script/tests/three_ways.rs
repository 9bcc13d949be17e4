//! The three ways of generating an API give the same items for the same schema
//! (`examples/demo-schema/`): the module checked in by `cargo xtask codegen`
//! (`examples/demo-api-checked-in/src/generated/`), the file this crate's build script
//! wrote, and the expansion of `qapi!` (what `qapi_codegen::expand_macro` returns to the
//! macro for `examples/demo-api-macro`). Each module is printed by prettyplease from each
//! way's tokens and the texts are compared.

use std::collections::BTreeMap;
use syn::{File, Item};

/// Way 2: the file the build script wrote.
const BUILD_SCRIPT: &str = include_str!(concat!(env!("OUT_DIR"), "/qapi.rs"));

/// Way 1: the checked-in module's files.
const CHECKED_IN: [(&str, &str); 5] = [
    (
        "mod",
        include_str!("../../demo-api-checked-in/src/generated/mod.rs"),
    ),
    (
        "types",
        include_str!("../../demo-api-checked-in/src/generated/types.rs"),
    ),
    (
        "commands",
        include_str!("../../demo-api-checked-in/src/generated/commands.rs"),
    ),
    (
        "events",
        include_str!("../../demo-api-checked-in/src/generated/events.rs"),
    ),
    (
        "introspection",
        include_str!("../../demo-api-checked-in/src/generated/introspection.rs"),
    ),
];

/// A module's inner attributes and items, printed.
fn print(attrs: Vec<syn::Attribute>, items: Vec<Item>) -> String {
    prettyplease::unparse(&File {
        shebang: None,
        frontmatter: None,
        attrs,
        items,
    })
}

/// The API as a file of inline modules (`pub mod types { ... }` ...) → each module
/// printed, and the top level's other items (the `pub use`s) under `mod`.
fn modules_of_inline(file: File) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut top = Vec::new();
    for item in file.items {
        match item {
            Item::Mod(m) => {
                let (_, items) = m.content.expect("an inline module");
                let inner = m
                    .attrs
                    .into_iter()
                    .filter(|a| matches!(a.style, syn::AttrStyle::Inner(_)))
                    .collect();
                out.insert(m.ident.to_string(), print(inner, items));
            }
            other => top.push(other),
        }
    }
    out.insert("mod".to_string(), print(Vec::new(), top));
    out
}

/// The checked-in files → each module printed; `mod.rs` keeps only its `pub use`s (its
/// `pub mod x;` declarations and doc are what the inline form spells as modules).
fn modules_of_files() -> BTreeMap<String, String> {
    CHECKED_IN
        .iter()
        .map(|(name, text)| {
            let file = syn::parse_file(text).expect("a checked-in file parses");
            let printed = if *name == "mod" {
                let uses = file
                    .items
                    .into_iter()
                    .filter(|i| matches!(i, Item::Use(_)))
                    .collect();
                print(Vec::new(), uses)
            } else {
                print(file.attrs, file.items)
            };
            (name.to_string(), printed)
        })
        .collect()
}

/// Way 3: the macro's expansion, without the `include_bytes!` constants that make the
/// crate depend on the schema's files (they are not part of the API).
fn modules_of_macro() -> BTreeMap<String, String> {
    let macro_crate = concat!(env!("CARGO_MANIFEST_DIR"), "/../demo-api-macro");
    let tokens = qapi_codegen::expand_macro(
        std::path::Path::new(macro_crate),
        "../demo-schema/demo.json",
    )
    .expect("the demo schema expands");
    let mut file: File = syn::parse2(tokens).expect("the expansion parses");
    let before = file.items.len();
    file.items
        .retain(|i| !matches!(i, Item::Const(c) if c.ident == "_"));
    assert_eq!(
        before - file.items.len(),
        3,
        "one include_bytes! per schema file"
    );
    modules_of_inline(file)
}

#[test]
fn checked_in_build_script_and_macro_give_the_same_items() {
    let checked_in = modules_of_files();
    let build_script = modules_of_inline(syn::parse_file(BUILD_SCRIPT).expect("parses"));
    let expanded = modules_of_macro();
    assert_eq!(
        checked_in.keys().collect::<Vec<_>>(),
        ["commands", "events", "introspection", "mod", "types"]
    );
    for (module, text) in &checked_in {
        assert_eq!(
            &build_script[module], text,
            "build script vs checked in: {module}"
        );
        assert_eq!(&expanded[module], text, "macro vs checked in: {module}");
    }
    assert_eq!(build_script.len(), checked_in.len());
    assert_eq!(expanded.len(), checked_in.len());
}

#[test]
fn the_macro_depends_on_every_schema_file_and_the_builder_lists_them() {
    let macro_crate = concat!(env!("CARGO_MANIFEST_DIR"), "/../demo-api-macro");
    let schema = std::path::Path::new(macro_crate).join("../demo-schema/demo.json");
    let files = qapi_codegen::schema_files(&schema).expect("reads");
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["demo.json", "pragma.json", "jobs.json"]);
    let text = qapi_codegen::expand_macro(
        std::path::Path::new(macro_crate),
        "../demo-schema/demo.json",
    )
    .expect("expands")
    .to_string();
    for file in &files {
        let quoted = format!("include_bytes ! ({:?})", file.display().to_string());
        assert!(text.contains(&quoted), "{quoted} in the expansion");
    }
}

#[test]
fn schema_errors_come_back_located_for_the_macro_to_report() {
    let dir = std::env::temp_dir().join(format!("qapi-macro-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("bad.json"),
        "{ 'enum': 'Colour', 'data': [ 'red' ] }\n{ 'struct': 'Paint', 'data': { 'c': 'Nope' } }\n",
    )
    .expect("writes");
    let errors = qapi_codegen::expand_macro(&dir, "bad.json").expect_err("a bad schema");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let path = dir.join("bad.json").display().to_string();
    assert!(
        errors[0].contains(&format!("{path}:2:")) && errors[0].contains("Nope"),
        "{}",
        errors[0]
    );
}
