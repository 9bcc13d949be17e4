//! Every kind of error the front end reports, one small schema each under
//! `tests/errors/` (helper modules they include live in
//! `tests/errors/include/`). Each case must fail, and its full output
//! (`FILE:LINE:COL: message`, with `In file included from` and QEMU's
//! `FILE: In KIND 'NAME':` context lines) is
//! snapshotted as `snapshots/errors__<case>.snap`, paths relative to the
//! repository.

use std::path::{Path, PathBuf};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("repository root")
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/errors")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    cases
}

/// The diagnostics for one case, paths relative to the repository;
/// `None` if the case loads.
fn try_diagnose(case: &Path) -> Option<String> {
    let root = repo_root();
    qapi_model::load(case)
        .err()
        .map(|d| d.to_string().replace(&format!("{}/", root.display()), ""))
}

fn diagnose(case: &Path) -> String {
    try_diagnose(case).unwrap_or_else(|| panic!("{} loaded without errors", case.display()))
}

#[test]
fn every_error_case_fails_with_its_snapshotted_message() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} error cases", cases.len());
    let mut loaded = Vec::new();
    for case in cases {
        let name = case
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("case name")
            .to_string();
        match try_diagnose(&case) {
            Some(output) => insta::assert_snapshot!(name, output),
            None => loaded.push(name),
        }
    }
    assert!(
        loaded.is_empty(),
        "cases that loaded without errors: {loaded:?}"
    );
}

#[test]
fn error_inside_an_included_file_names_the_include_chain() {
    let output = diagnose(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors/error_in_included_file.json"),
    );
    assert!(
        output.starts_with(
            "In file included from crates/qapi-model/tests/errors/error_in_included_file.json:2:\n"
        ),
        "{output}"
    );
}

#[test]
fn errors_in_several_definitions_are_all_reported() {
    let case =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors/many_errors_collected.json");
    let errors = qapi_model::load(&case)
        .expect_err("three bad definitions")
        .errors;
    let named: Vec<_> = errors
        .iter()
        .filter_map(|e| e.definition.as_ref())
        .map(|d| format!("{} {}", d.meta, d.name))
        .collect();
    assert_eq!(named, ["struct Point", "enum color", "command go"]);
}

/// As QEMU prints it: the include chain, then `FILE: In KIND 'NAME':`, then
/// `FILE:LINE:COL: message`.
#[test]
fn an_error_about_a_definition_is_preceded_by_the_definition() {
    let err = qapi_model::load_str(
        "t.json",
        "{ 'struct': 'Point', 'data': { 'x': 'int' } }\n{ 'command': 'move', 'data': { 'to': 'Place' } }",
    )
    .expect_err("unknown type");
    assert_eq!(
        err.to_string(),
        "t.json: In command 'move':\nt.json:2:38: parameter 'to' uses unknown type 'Place'"
    );
}

/// QEMU locates these in the doc comment, not in the definition.
#[test]
fn an_error_about_a_doc_comment_names_no_definition() {
    let err = qapi_model::load_str(
        "t.json",
        "##\n# @Color:\n#\n# @red: red\n# @blue: blue\n##\n{ 'enum': 'Color', 'data': [ 'red' ] }",
    )
    .expect_err("documented value that does not exist");
    assert_eq!(
        err.to_string(),
        "t.json:5:3: documented member 'blue' does not exist"
    );
}
