//! The generator writes its text already laid out (no formatter runs over
//! it): rustfmt, the judge of that layout (`cargo fmt --check` runs over the
//! checked-in files), must leave every generated file unchanged. Checked
//! for QEMU's complete schema, ours, the seed, and a schema whose names take
//! every length from 3 to 72 columns, so each width rule of `layout` meets
//! both sides of its threshold.
//!
//! Why 72: QEMU's longest name has 38 characters. Past 72, shapes the layout
//! does not cover appear (a match pattern longer than its line), and from
//! 77 rustfmt misindents the string argument of a chain broken before its
//! `.`, a rustfmt defect the generator does not imitate.

mod fixture;

use fixture::*;
use qapi_model::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// `source` as rustfmt (edition 2024, default configuration) prints it.
fn rustfmt(source: &str) -> String {
    let mut child = Command::new("rustfmt")
        .args(["--edition", "2024", "--emit", "stdout", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rustfmt runs (it ships with the toolchain: `rustup component add rustfmt`)");
    let mut stdin = child.stdin.take().expect("rustfmt's stdin");
    let input = source.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("rustfmt finishes");
    writer
        .join()
        .expect("writer thread")
        .expect("source written to rustfmt");
    assert!(
        out.status.success(),
        "rustfmt rejected the generated code: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("rustfmt prints UTF-8")
}

/// Panics, showing the first difference, unless rustfmt leaves every `.rs`
/// file of `schema`'s output as it is.
fn assert_rustfmt_stable(what: &str, schema: &Schema) {
    let files = qapi_codegen::generate(schema).expect("generates");
    for f in files.iter().filter(|f| f.path.ends_with(".rs")) {
        let formatted = rustfmt(&f.contents);
        if formatted == f.contents {
            continue;
        }
        let ours: Vec<&str> = f.contents.lines().collect();
        let theirs: Vec<&str> = formatted.lines().collect();
        let first = ours
            .iter()
            .zip(&theirs)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(theirs.len()));
        let from = first.saturating_sub(3);
        // The whole file, to run rustfmt on by hand.
        let kept = std::env::temp_dir().join(format!("rustfmt-unstable-{}", f.path));
        let _ = std::fs::write(&kept, &f.contents);
        panic!(
            "{what}: rustfmt changes {} (kept as {}) from line {}.\n--- generated:\n{}\n--- rustfmt:\n{}",
            f.path,
            kept.display(),
            first + 1,
            ours[from..(first + 8).min(ours.len())].join("\n"),
            theirs[from..(first + 8).min(theirs.len())].join("\n"),
        );
    }
}

#[test]
fn qemu_schema_output_is_rustfmt_stable() {
    let path = qapi_testdata::qemu_schema().expect("QEMU's schema is available");
    let schema = qapi_model::load(&path).expect("QEMU's schema loads");
    assert_rustfmt_stable("QEMU's schema", &schema);
}

#[test]
fn our_schema_output_is_rustfmt_stable() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../qapi-schema/qapi-schema.json"
    ));
    let schema = qapi_model::load(path).unwrap_or_else(|d| panic!("{d}"));
    assert_rustfmt_stable("qapi-schema/", &schema);
}

#[test]
fn seed_output_is_rustfmt_stable() {
    assert_rustfmt_stable("the seed", &seed());
}

#[test]
fn empty_schema_output_is_rustfmt_stable() {
    assert_rustfmt_stable("an empty schema", &schema(Vec::new()));
}

/// `prefix` padded with `x` to `len` characters.
fn name(prefix: &str, len: usize) -> String {
    let mut s = prefix.to_string();
    while s.len() < len {
        s.push('x');
    }
    s
}

/// For one length `n`: an enum, a struct, a union with boxed and plain
/// branches, an alternate, commands (typed, raw, without arguments) and
/// events, each with a name and a member of `n` characters.
fn definitions_of_length(n: usize) -> Vec<Entity> {
    let (e, s, t, u, a) = (
        name(&format!("E{n}"), n),
        name(&format!("S{n}"), n),
        name(&format!("T{n}"), n),
        name(&format!("U{n}"), n),
        name(&format!("A{n}"), n),
    );
    let m = name("m", n);
    let wire = name("w-", n);
    let short: Vec<String> = (0..(n % 7 + 2)).map(|i| format!("v{i}")).collect();
    let mut values: Vec<&str> = short.iter().map(String::as_str).collect();
    values.push(&wire);
    values.push(&m);
    let mut raw = command(&name("raw-", n), None, Some(array(named(&s))));
    if let Entity::Command(c) = &mut raw {
        c.gen_ = false;
    }
    vec![
        enum_(&e, &values),
        struct_(
            &s,
            None,
            vec![
                member(&m, str_()),
                member(&format!("*{wire}"), named(&u)),
                member(&format!("*{}", name("o", n)), array(named(&e))),
                member("id", int()),
            ],
        ),
        struct_(&t, Some(&s), vec![member(&name("t", n), named(&e))]),
        union(
            &u,
            vec![member("kind", named(&e)), member(&format!("*{m}"), str_())],
            "kind",
            &e,
            &[(&wire, &s), (&m, &t), ("v0", &t)],
        ),
        alternate(
            &a,
            vec![("obj", named(&s)), ("name", str_()), (&m, named(&e))],
        ),
        command(
            &name("cmd-", n),
            Some(ArgType::Inline(vec![
                member(&m, str_()),
                member(&format!("*{wire}"), named(&a)),
            ])),
            Some(array(named(&t))),
        ),
        command(&name("q-", n), None, Some(named(&u))),
        command(&name("n-", n), Some(ArgType::Named(s.clone())), None),
        raw,
        event(
            &name("EV_", n).to_uppercase(),
            Some(ArgType::Inline(vec![member(&m, named(&e))])),
        ),
        event(
            &name("EN_", n).to_uppercase(),
            Some(ArgType::Named(t.clone())),
        ),
        event(&name("E0_", n).to_uppercase(), None),
    ]
}

#[test]
fn names_of_every_length_give_rustfmt_stable_output() {
    let entities = (3..=72).flat_map(definitions_of_length).collect();
    assert_rustfmt_stable("names of 3 to 72 characters", &schema(entities));
}

#[test]
fn short_names_give_rustfmt_stable_output() {
    // Lists of short plain items are packed several to a line by rustfmt.
    let values: Vec<String> = (0..40).map(|i| format!("v{i}")).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let events = (0..30).map(|i| event(&format!("E{i}"), None));
    let mut entities = vec![enum_("E", &values)];
    entities.extend(events);
    assert_rustfmt_stable("short names", &schema(entities));
}
