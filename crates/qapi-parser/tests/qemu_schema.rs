//! QEMU's complete schema parses without syntax errors.

#[test]
fn qemu_schema_parses_without_errors() {
    let path = qapi_testdata::qemu_schema().expect("locate QEMU's schema");
    let parsed = qapi_parser::parse_file(&path).unwrap_or_else(|d| panic!("{d}"));
    assert!(
        parsed.exprs.len() > 900,
        "only {} definitions",
        parsed.exprs.len()
    );
    assert!(parsed.pragmas.doc_required);
    assert!(parsed.exprs.iter().all(|e| e.doc.is_some()));
}
