//! The lexical and syntactic layer: values, locations, doc blocks.

use qapi_parser::{ParsedSchema, Value, parse_str};
use std::path::Path;

fn parse(text: &str) -> ParsedSchema {
    parse_str(Path::new("t.json"), text).unwrap_or_else(|d| panic!("{d}"))
}

fn first_error(text: &str) -> String {
    parse_str(Path::new("t.json"), text)
        .expect_err("should fail")
        .errors[0]
        .to_string()
}

#[test]
fn values_are_strings_booleans_lists_and_dicts() {
    let p = parse("{ 'a': 'x', 'b': true, 'c': [ false, {} ] }");
    let dict = p.exprs[0].node.as_dict().expect("dict");
    assert_eq!(dict.get("a").and_then(|n| n.as_str()), Some("x"));
    assert_eq!(dict.get("b").and_then(|n| n.as_bool()), Some(true));
    let c = dict.get("c").and_then(|n| n.as_list()).expect("list");
    assert_eq!(c[0].value, Value::Bool(false));
}

#[test]
fn backslash_escapes_a_backslash() {
    let p = parse(r"{ 'a': 'x\\y' }");
    assert_eq!(
        p.exprs[0]
            .node
            .as_dict()
            .unwrap()
            .get("a")
            .unwrap()
            .as_str(),
        Some(r"x\y")
    );
}

#[test]
fn locations_are_one_based_line_and_column_of_the_token() {
    let p = parse("# comment\n\n  { 'enum': 'E',\n    'data': [] }\n");
    let node = &p.exprs[0].node;
    assert_eq!((node.location.line, node.location.col), (3, 3));
    let key = p.exprs[0].node.as_dict().unwrap().key("data").unwrap();
    assert_eq!((key.location.line, key.location.col), (4, 5));
}

#[test]
fn tabs_advance_the_column_to_the_next_tab_stop() {
    let err = first_error("{\t'a': 1 }");
    assert!(err.starts_with("t.json:1:14: stray '1'"), "{err}");
}

#[test]
fn numbers_are_not_qapi() {
    assert_eq!(first_error("{ 'a': 42 }"), "t.json:1:8: stray '42'");
}

#[test]
fn comments_are_skipped_and_doc_blocks_attach_to_the_next_definition() {
    let p = parse(
        "# plain\n##\n# @E:\n#\n# Body.\n#\n# @a: first\n#     value\n##\n{ 'enum': 'E', 'data': [ 'a' ] }\n",
    );
    let doc = p.exprs[0].doc.as_ref().expect("doc");
    assert_eq!(doc.symbol.as_deref(), Some("E"));
    assert_eq!(doc.body, "Body.");
    assert_eq!(doc.members[0].name, "a");
    assert_eq!(doc.members[0].text, "first\nvalue");
}

#[test]
fn tagged_and_plain_sections_follow_members() {
    let p = parse(concat!(
        "##\n# @c:\n#\n# @x: an x\n#\n# Features:\n#\n# @deprecated: old\n#\n",
        "# Returns: nothing\n#\n# Since: 9.0\n#\n# A closing remark.\n##\n{ 'command': 'c' }\n"
    ));
    let doc = p.exprs[0].doc.as_ref().expect("doc");
    assert_eq!(doc.features[0].name, "deprecated");
    let tags: Vec<Option<&str>> = doc.sections.iter().map(|s| s.tag.as_deref()).collect();
    assert_eq!(tags, [Some("Returns"), Some("Since"), None]);
    assert_eq!(doc.sections[2].text, "A closing remark.");
}

#[test]
fn free_form_blocks_keep_headings_and_record_their_position() {
    let p = parse("{ 'enum': 'A', 'data': [] }\n##\n# = One\n#\n# text\n##\n\n##\n# == Two\n##\n");
    assert_eq!(p.free_docs.len(), 2);
    assert_eq!(p.free_docs[0].0, 1);
    assert_eq!(p.free_docs[0].1.body, "= One\n\ntext");
    assert_eq!(p.free_docs[1].1.body, "== Two");
}

#[test]
fn a_heading_must_come_first_in_its_block() {
    assert_eq!(
        first_error("##\n# = One\n#\n# == Two\n##\n"),
        "t.json:4:1: '=' heading must come first in a comment block"
    );
}

#[test]
fn member_descriptions_continue_on_indented_lines() {
    let p = parse(concat!(
        "##\n# @S:\n#\n# @a: first line\n#     second line\n#\n#     second paragraph\n",
        "# @b:\n#     all on the next line\n#\n# Closing words.\n##\n{ 'struct': 'S', 'data': {} }\n"
    ));
    let doc = p.exprs[0].doc.as_ref().expect("doc");
    assert_eq!(
        doc.members[0].text,
        "first line\nsecond line\n\nsecond paragraph"
    );
    assert_eq!(doc.members[1].text, "all on the next line");
    assert_eq!(doc.sections[0].tag, None);
    assert_eq!(doc.sections[0].text, "Closing words.");
}

#[test]
fn pragmas_merge_across_directives() {
    let p = parse(
        "{ 'pragma': { 'doc-required': true } }\n{ 'pragma': { 'member-name-exceptions': [ 'A' ] } }\n",
    );
    assert!(p.pragmas.doc_required);
    assert_eq!(p.pragmas.member_name_exceptions, ["A"]);
}

#[test]
fn syntax_error_ends_only_its_file_and_other_errors_are_collected() {
    let err = parse_str(
        Path::new("t.json"),
        "[ 'x' ]\n{ 'include': true }\n{ 'a': 'b'\n",
    )
    .expect_err("errors");
    let msgs: Vec<String> = err.errors.iter().map(|e| e.message.clone()).collect();
    assert_eq!(
        msgs,
        [
            "top-level expression must be an object",
            "value of 'include' must be a string",
            "expected ',' or '}'"
        ]
    );
}

#[test]
fn files_are_included_once_relative_to_the_including_file() {
    let dir = std::env::temp_dir().join(format!("qapi-parser-include-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(
        dir.join("sub/a.json"),
        "{ 'include': 'b.json' }\n{ 'enum': 'A', 'data': [] }\n",
    )
    .unwrap();
    std::fs::write(dir.join("sub/b.json"), "{ 'enum': 'B', 'data': [] }\n").unwrap();
    std::fs::write(
        dir.join("top.json"),
        "{ 'include': 'sub/a.json' }\n{ 'include': 'sub/b.json' }\n",
    )
    .unwrap();
    let p = qapi_parser::parse_file(&dir.join("top.json")).unwrap_or_else(|d| panic!("{d}"));
    let names: Vec<&str> = p
        .exprs
        .iter()
        .map(|e| {
            e.node
                .as_dict()
                .unwrap()
                .get("enum")
                .unwrap()
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(names, ["B", "A"]);
    let b = &p.exprs[0].node.location;
    assert_eq!(b.file.path, dir.join("sub/b.json"));
    assert_eq!(b.include_context().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// All the errors of a text, one per line.
fn all_errors(text: &str) -> String {
    parse_str(Path::new("t.json"), text)
        .expect_err("should fail")
        .to_string()
}

#[test]
fn an_unreadable_token_is_reported_before_what_the_grammar_expected_there() {
    assert_eq!(first_error("{ 'a' 1 }"), "t.json:1:7: stray '1'");
    assert_eq!(
        first_error("{ 'a': 'b' 'c\\d' }"),
        "t.json:1:14: unknown escape \\d"
    );
    assert_eq!(first_error("{ 'a' 'b' }"), "t.json:1:7: expected ':'");
}

#[test]
fn a_duplicate_key_is_reported_at_the_key_once_its_value_is_readable() {
    assert_eq!(
        first_error("{ 'a': 'x', 'a': 'y' }"),
        "t.json:1:13: duplicate key 'a'"
    );
    assert_eq!(
        first_error("{ 'a': 'x', 'a': 'é' }"),
        "t.json:1:19: funny character in string"
    );
}

#[test]
fn an_unreadable_token_after_an_item_ends_the_file_before_the_item_is_used() {
    // QEMU reads the next token before it looks at the item.
    assert_eq!(
        all_errors("[ 'x' ] 'a\\e'"),
        "t.json:1:11: unknown escape \\e"
    );
    assert_eq!(all_errors("##\n#x\n##\n-1"), "t.json:4:1: stray '-1'");
    assert_eq!(
        all_errors("##\n#x\n##\n{ 'enum': 'E', 'data': [] }"),
        "t.json:2:2: missing space after #"
    );
}

#[test]
fn strings_hold_printable_ascii_and_end_on_their_line() {
    assert_eq!(
        first_error("{ 'a': 'x\ty' }"),
        "t.json:1:10: funny character in string"
    );
    assert_eq!(
        first_error("{ 'a': 'x\\\n' }"),
        "t.json:1:8: missing terminating \"'\""
    );
    assert_eq!(
        first_error("{ 'a': 'x"),
        "t.json:1:8: missing terminating \"'\""
    );
}

#[test]
fn doc_blocks_must_be_delimited_by_lone_double_hashes() {
    assert_eq!(
        first_error("## x\n# @E:\n##\n"),
        "t.json:1:1: junk after '##' at start of documentation comment"
    );
    assert_eq!(
        first_error("##\n# @E:\n## x\n"),
        "t.json:3:1: junk after '##' at end of documentation comment"
    );
    assert_eq!(
        first_error("##\n# @E:\n{ 'enum': 'E', 'data': [] }"),
        "t.json:3:1: documentation comment must end with '##'"
    );
}

#[test]
fn nesting_deeper_than_64_is_refused() {
    let ok = format!("{{ 'a': {}{} }}", "[".repeat(64), "]".repeat(64));
    assert!(parse_str(Path::new("t.json"), &ok).is_ok());
    let deep = format!("{{ 'a': {}{} }}", "[".repeat(65), "]".repeat(65));
    assert_eq!(first_error(&deep), "t.json:1:72: nesting too deep");
}
