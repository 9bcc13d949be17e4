//! QEMU's complete schema generates the same files every time. (That they compile is
//! `crates/qemu-qmp-api`'s part: it is this output, checked in and kept fresh by
//! `cargo xtask codegen --check`.)

#[test]
fn qemus_complete_schema_generates_identical_files_twice() {
    let schema_path = qapi_testdata::qemu_schema().expect("QEMU's schema is available");
    let schema =
        qapi_model::load(&schema_path).unwrap_or_else(|d| panic!("QEMU's schema loads:\n{d}"));
    let first = qapi_codegen::generate(&schema).expect("generates");
    let second = qapi_codegen::generate(&schema).expect("generates");
    assert_eq!(first, second);
}
