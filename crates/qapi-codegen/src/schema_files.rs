//! The files a schema is made of: the entry file and every file its `include`
//! directives reach, for a build to depend on (`cargo:rerun-if-changed`, `include_bytes!`).
//!
//! `qapi-parser` reads them all but does not list them, and a file holding only a
//! `pragma` (QEMU's `pragma.json`) leaves no trace in the checked schema's locations; so
//! the `include` directives of an already checked schema are found again here, with a
//! few nom combinators for the only tokens that matter (comments, strings, brackets).

use nom::branch::alt;
use nom::bytes::complete::{escaped_transform, is_not, tag, take};
use nom::character::complete::{char, multispace1, none_of, not_line_ending};
use nom::combinator::{map, opt, value};
use nom::sequence::{delimited, preceded};
use nom::{IResult, Parser};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Open,
    Close,
    Colon,
    Str(String),
    Other,
}

/// Whitespace and `#` comments.
fn trivia(input: &str) -> IResult<&str, ()> {
    value(
        (),
        nom::multi::many0(alt((
            value((), multispace1),
            value((), preceded(char('#'), not_line_ending)),
        ))),
    )
    .parse(input)
}

/// A single-quoted QAPI string (`\x` stands for `x`).
fn string(input: &str) -> IResult<&str, String> {
    delimited(
        char('\''),
        map(
            opt(escaped_transform(is_not("\\'"), '\\', take(1usize))),
            Option::unwrap_or_default,
        ),
        char('\''),
    )
    .parse(input)
}

fn token(input: &str) -> IResult<&str, Token> {
    preceded(
        trivia,
        alt((
            value(Token::Open, alt((tag("{"), tag("[")))),
            value(Token::Close, alt((tag("}"), tag("]")))),
            value(Token::Colon, tag(":")),
            map(string, Token::Str),
            value(Token::Other, none_of("")),
        )),
    )
    .parse(input)
}

/// The paths named by the top-level `{ 'include': PATH }` directives of `text`.
fn includes(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut rest = text;
    while let Ok((next, t)) = token(rest) {
        tokens.push(t);
        rest = next;
    }
    let mut depth = 0usize;
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        match t {
            Token::Open => depth += 1,
            Token::Close => depth = depth.saturating_sub(1),
            Token::Str(key) if depth == 1 && key == "include" => {
                if let (Some(Token::Colon), Some(Token::Str(path))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    out.push(path.clone());
                }
            }
            _ => {}
        }
    }
    out
}

/// `entry` and every file it includes, transitively, each once (an include is relative
/// to the including file's directory, as in QEMU), in the order they are reached.
pub fn schema_files(entry: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    let mut stack = vec![entry.to_path_buf()];
    while let Some(file) = stack.pop() {
        let key = file.canonicalize().unwrap_or_else(|_| file.clone());
        if !seen.insert(key) {
            continue;
        }
        let text = std::fs::read_to_string(&file)?;
        let dir = file.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut found: Vec<PathBuf> = includes(&text).iter().map(|p| dir.join(p)).collect();
        found.reverse();
        stack.extend(found);
        order.push(file);
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_top_level_include_directives_only() {
        let text = "# { 'include': 'commented.json' }\n\
                    { 'include': 'a.json' }\n\
                    { 'struct': 'S', 'data': { 'include': 'str' } }\n\
                    { 'include': 'sub/b\\'s.json' }\n";
        assert_eq!(includes(text), ["a.json", "sub/b's.json"]);
    }

    #[test]
    fn qemus_schema_includes_its_pragma_only_file() {
        let entry = qapi_testdata::qemu_schema().expect("QEMU's schema is available");
        let files = schema_files(&entry).expect("reads");
        let names: Vec<String> = files
            .iter()
            .map(|f| {
                f.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names[0], "qapi-schema.json");
        for module in ["pragma.json", "block-core.json", "job.json", "machine.json"] {
            assert!(names.iter().any(|n| n == module), "{module} in {names:?}");
        }
        let unique: BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }
}
