//! The grammar of one schema file, as nom combinators, one function per
//! production: QEMU's JSON dialect (single-quoted strings with `\\` as the
//! only escape, `#` comments, `true`/`false`, no numbers, no null) and the
//! `##` doc comment blocks.
//!
//! ```text
//! file      := trivia item* EOF
//! item      := (doc_block | value) lookahead
//! value     := object | list | string | boolean         (each then trivia)
//! object    := '{' ( '}' | member (',' member)* '}' )
//! member    := string ':' value
//! list      := '[' ( ']' | value (',' value)* ']' )
//! doc_block := '##' (doc_trivia doc_line)* doc_trivia '##' trivia
//! trivia    := spaces (plain_comment spaces)*
//! ```
//!
//! Strings, booleans, comments and punctuation are the tokens (`token`);
//! anything else, numbers included, is a stray word, as in QEMU. A `##`
//! comment is a token everywhere (it starts a doc block); other comments
//! are trivia, except inside a doc block, where every comment is a line.
//!
//! QEMU's lexer reads one token ahead, so an error is always reported at
//! the *current token*, and a token that cannot be read at all (a stray
//! word, a bad string) is reported as such before any complaint about what
//! the grammar expected there: see [`unexpected`] and [`lookahead`].

use crate::doc::RawDocLine;
use crate::value::{Dict, Key, Node, Value};
use crate::{Error, Location, SourceFile};
use nom::branch::alt;
use nom::bytes::complete::{tag, take_till1, take_while, take_while1};
use nom::character::complete::{char, one_of, satisfy};
use nom::combinator::{eof, not, peek, recognize, value};
use nom::error::{ErrorKind, ParseError};
use nom::multi::{fold_many0, many0_count};
use nom::sequence::{preceded, terminated};
use nom::{Err, IResult, Offset, Parser};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

/// Deepest nesting of lists and dictionaries we accept (QEMU's schema uses
/// four levels); a guard against stack exhaustion on hostile input.
const MAX_DEPTH: usize = 64;

/// Why the text is not QAPI: QEMU's messages.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message<'a> {
    /// A production did not match here; nom backtracks and tries another.
    /// Never reported: [`unexpected`] turns it into a real message.
    Mismatch,
    /// `expected ':'` and the like.
    Expected(&'static str),
    /// A word that is no token (numbers included), up to the next
    /// structural character, quote or whitespace.
    Stray(&'a str),
    MissingQuote,
    UnknownEscape(char),
    FunnyCharacter,
    NestingTooDeep,
    DuplicateKey(String),
    DocJunkAtStart,
    DocJunkAtEnd,
    DocUnterminated,
}

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Mismatch => f.write_str("syntax error"),
            Message::Expected(what) => f.write_str(what),
            Message::Stray(word) => write!(f, "stray '{word}'"),
            Message::MissingQuote => f.write_str("missing terminating \"'\""),
            Message::UnknownEscape(c) => write!(f, "unknown escape \\{c}"),
            Message::FunnyCharacter => f.write_str("funny character in string"),
            Message::NestingTooDeep => f.write_str("nesting too deep"),
            Message::DuplicateKey(key) => write!(f, "duplicate key '{key}'"),
            Message::DocJunkAtStart => {
                f.write_str("junk after '##' at start of documentation comment")
            }
            Message::DocJunkAtEnd => f.write_str("junk after '##' at end of documentation comment"),
            Message::DocUnterminated => f.write_str("documentation comment must end with '##'"),
        }
    }
}

/// nom's error type for this grammar: the message and the input at the
/// offending character (its offset in the file gives the location).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SyntaxError<'a> {
    pub at: &'a str,
    pub message: Message<'a>,
}

impl<'a> ParseError<&'a str> for SyntaxError<'a> {
    fn from_error_kind(at: &'a str, _kind: ErrorKind) -> Self {
        SyntaxError {
            at,
            message: Message::Mismatch,
        }
    }

    fn append(_at: &'a str, _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

type PResult<'a, O> = IResult<&'a str, O, SyntaxError<'a>>;

/// A fatal error (nom's `Failure`: no backtracking past it).
fn failure<'a>(at: &'a str, message: Message<'a>) -> Err<SyntaxError<'a>> {
    Err::Failure(SyntaxError { at, message })
}

// ---------------------------------------------------------------------
// Trivia: what separates tokens.

/// Blanks within a line: space, tab, CR, FF, VT (C's `isspace` but the
/// newline, which counts lines).
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\x0c' | '\x0b')
}

/// Blanks and newlines.
fn spaces(i: &str) -> PResult<'_, &str> {
    take_while(|c| c == '\n' || is_blank(c)).parse(i)
}

/// The rest of a line, newline excluded (found with `memchr`).
fn rest_of_line(i: &str) -> PResult<'_, &str> {
    let end = i.find('\n').unwrap_or(i.len());
    Ok((&i[end..], &i[..end]))
}

/// A comment: `#` up to the end of its line, newline excluded.
pub(crate) fn comment(i: &str) -> PResult<'_, &str> {
    recognize(preceded(char('#'), rest_of_line)).parse(i)
}

/// A comment that is not part of a doc block (`##` starts one): skipped
/// like whitespace.
fn plain_comment(i: &str) -> PResult<'_, ()> {
    value((), (char('#'), not(char('#')), rest_of_line)).parse(i)
}

/// Blanks, newlines and plain comments between tokens.
fn trivia(i: &str) -> PResult<'_, ()> {
    preceded(
        spaces,
        fold_many0((plain_comment, spaces), || (), |(), _| ()),
    )
    .parse(i)
}

/// Inside a doc block every comment is a line of it: only blanks and
/// newlines separate them.
fn doc_trivia(i: &str) -> PResult<'_, ()> {
    value((), spaces).parse(i)
}

/// `parser`, then the trivia after it.
fn lexeme<'a, O>(
    parser: impl Parser<&'a str, Output = O, Error = SyntaxError<'a>>,
) -> impl Parser<&'a str, Output = O, Error = SyntaxError<'a>> {
    terminated(parser, trivia)
}

// ---------------------------------------------------------------------
// Tokens.

/// `true` or `false`.
fn boolean(i: &str) -> PResult<'_, bool> {
    alt((value(true, tag("true")), value(false, tag("false")))).parse(i)
}

/// Printable ASCII, the only characters a string may hold.
fn is_printable(c: char) -> bool {
    (' '..='~').contains(&c)
}

/// A piece of a string's text: a run of printable characters other than
/// the quote and the backslash, or an escape. `open` is the opening quote
/// (where an unterminated string is reported).
fn string_piece<'a>(
    open: &'a str,
) -> impl Parser<&'a str, Output = &'a str, Error = SyntaxError<'a>> {
    alt((
        take_while1(|c| c != '\'' && c != '\\' && is_printable(c)),
        move |i| escape(open, i),
    ))
}

/// `\\`, the only escape: any other character after a backslash is an
/// unknown escape (reported at the backslash); a backslash ending the line
/// leaves the string unterminated.
fn escape<'a>(open: &'a str, i: &'a str) -> PResult<'a, &'a str> {
    let (rest, _) = char('\\').parse(i)?;
    match rest.chars().next() {
        Some('\\') => Ok((&rest[1..], "\\")),
        None | Some('\n') => Err(failure(open, Message::MissingQuote)),
        Some(c) => Err(failure(i, Message::UnknownEscape(c))),
    }
}

/// What ends a string: its closing quote. A newline or the end of the file
/// first leaves it unterminated; any other character that is not printable
/// ASCII is a funny character (reported where it is).
fn closing_quote<'a>(open: &'a str, i: &'a str) -> PResult<'a, char> {
    match i.chars().next() {
        Some('\'') => Ok((&i[1..], '\'')),
        None | Some('\n') => Err(failure(open, Message::MissingQuote)),
        Some(_) => Err(failure(i, Message::FunnyCharacter)),
    }
}

/// A string: `'` pieces `'`.
pub(crate) fn string(i: &str) -> PResult<'_, String> {
    let open = i;
    preceded(
        char('\''),
        terminated(
            fold_many0(string_piece(open), String::new, |mut s, piece| {
                s.push_str(piece);
                s
            }),
            move |i| closing_quote(open, i),
        ),
    )
    .parse(i)
}

/// The characters that end a stray word.
fn ends_word(c: char) -> bool {
    "[]{}:,'\"".contains(c) || c.is_whitespace()
}

/// Anything that is no token: reported with the word it starts (one
/// character at least).
fn stray<O>(i: &str) -> PResult<'_, O> {
    let word = match take_till1::<_, _, SyntaxError>(ends_word).parse(i) {
        Ok((_, word)) => word,
        Err(_) => i.chars().next().map_or(i, |c| &i[..c.len_utf8()]),
    };
    Err(failure(i, Message::Stray(word)))
}

/// QAPI has no numbers: as in QEMU, a number is a stray word.
fn number<O>(i: &str) -> PResult<'_, O> {
    preceded(peek(satisfy(|c| c == '-' || c.is_ascii_digit())), stray).parse(i)
}

/// Any one token, as QEMU's lexer reads it: punctuation, a string, a
/// boolean, a comment or the end of the file; numbers and other words are
/// errors. Used to look ahead, so that a token that cannot be read is
/// reported before what the grammar makes of it.
fn token(i: &str) -> PResult<'_, ()> {
    alt((
        value((), one_of("{}:,[]")),
        value((), string),
        value((), boolean),
        value((), comment),
        value((), eof),
        number,
        stray,
    ))
    .parse(i)
}

/// The error for a current token that is not what the grammar wants: the
/// token's own error if it cannot be read, else `message`.
fn unexpected<'a, O>(i: &'a str, message: Message<'a>) -> PResult<'a, O> {
    match token(i) {
        Err(Err::Failure(e)) => Err(Err::Failure(e)),
        _ => Err(failure(i, message)),
    }
}

/// `parser`, or the error `expected` at the current token.
fn expect<'a, O>(
    expected: &'static str,
    mut parser: impl Parser<&'a str, Output = O, Error = SyntaxError<'a>>,
) -> impl Parser<&'a str, Output = O, Error = SyntaxError<'a>> {
    move |i| match parser.parse(i) {
        Err(Err::Error(_)) => unexpected(i, Message::Expected(expected)),
        other => other,
    }
}

/// Checks that the token after an item can be read (QEMU has read it
/// before it acts on the item).
fn lookahead(i: &str) -> PResult<'_, ()> {
    peek(token).parse(i)
}

// ---------------------------------------------------------------------
// Locations.

/// One file's text and the means to turn a position in it into a
/// [`Location`]: the start of every line, and the last column computed
/// (so that columns along a long line are found without rescanning it).
pub(crate) struct Source<'a> {
    text: &'a str,
    file: Arc<SourceFile>,
    line_starts: Vec<usize>,
    /// The line of the last location (index into `line_starts`).
    last_line: Cell<usize>,
    /// The last column computed: (line start, position, column).
    last_col: Cell<(usize, usize, u32)>,
}

impl<'a> Source<'a> {
    pub fn new(text: &'a str, file: Arc<SourceFile>) -> Self {
        let mut line_starts = Vec::with_capacity(text.len() / 32 + 1);
        line_starts.push(0);
        line_starts.extend(text.match_indices('\n').map(|(at, _)| at + 1));
        Source {
            text,
            file,
            line_starts,
            last_line: Cell::new(0),
            last_col: Cell::new((0, 0, 1)),
        }
    }

    pub fn source_file(&self) -> &Arc<SourceFile> {
        &self.file
    }

    /// The index of the line holding byte `pos`: locations are mostly asked
    /// for in order, so the search starts at the last line found.
    fn line_index(&self, pos: usize) -> usize {
        let starts = &self.line_starts;
        let mut line = self.last_line.get();
        if starts[line] <= pos {
            for _ in 0..4 {
                match starts.get(line + 1) {
                    Some(&next) if next <= pos => line += 1,
                    _ => {
                        self.last_line.set(line);
                        return line;
                    }
                }
            }
        }
        line = starts.partition_point(|&start| start <= pos) - 1;
        self.last_line.set(line);
        line
    }

    /// Where `at` (a part of the text) starts: 1-based line, and column
    /// with tabs advancing to the next multiple of 8, as QEMU counts.
    pub fn location(&self, at: &str) -> Location {
        let pos = self.text.offset(at);
        let line = self.line_index(pos);
        let line_start = self.line_starts[line];
        let (cached_start, cached_pos, cached_col) = self.last_col.get();
        let (from, mut col) = if cached_start == line_start && cached_pos <= pos {
            (cached_pos, cached_col)
        } else {
            (line_start, 1u32)
        };
        for ch in self.text[from..pos].chars() {
            if ch == '\t' {
                col = (col - 1) / 8 * 8 + 9;
            } else {
                col += 1;
            }
        }
        self.last_col.set((line_start, pos, col));
        Location {
            file: self.file.clone(),
            line: line as u32 + 1,
            col,
        }
    }

    /// The error a syntax error is, located.
    pub fn error(&self, e: &SyntaxError) -> Error {
        Error::new(self.location(e.at), e.message.to_string())
    }
}

// ---------------------------------------------------------------------
// Values.

/// The first token of a list element: what [`Source::value`] can start
/// with.
fn value_start(i: &str) -> PResult<'_, ()> {
    peek(alt((value((), one_of("{['")), value((), boolean)))).parse(i)
}

/// Keys seen so far in one object: looked up in the list while it is
/// short, in a set once it is long.
#[derive(Default)]
struct Members {
    dict: Dict,
    seen: HashSet<String>,
}

impl Members {
    fn contains(&mut self, key: &str) -> bool {
        if self.dict.entries.len() < 16 {
            return self.dict.contains(key);
        }
        if self.seen.is_empty() {
            self.seen.extend(self.dict.keys().map(|k| k.name.clone()));
        }
        self.seen.contains(key)
    }

    fn push(&mut self, key: Key, value: Node) {
        if !self.seen.is_empty() {
            self.seen.insert(key.name.clone());
        }
        self.dict.entries.push((key, value));
    }
}

impl<'a> Source<'a> {
    /// `value := object | list | string | boolean`, with the location of
    /// its first character. Nesting deeper than [`MAX_DEPTH`] is an error.
    pub fn value(&self, depth: usize, i: &'a str) -> PResult<'a, Node> {
        if depth > MAX_DEPTH {
            return unexpected(i, Message::NestingTooDeep);
        }
        let location = self.location(i);
        let (rest, value) = expect(
            "expected '{', '[', string, or boolean",
            alt((
                |i| self.object(depth, i).map(|(i, d)| (i, Value::Dict(d))),
                |i| self.list(depth, i).map(|(i, l)| (i, Value::List(l))),
                lexeme(string).map(Value::Str),
                lexeme(boolean).map(Value::Bool),
            )),
        )
        .parse(i)?;
        Ok((rest, Node { value, location }))
    }

    /// `object := '{' ( '}' | member (',' member)* '}' )`
    fn object(&self, depth: usize, i: &'a str) -> PResult<'a, Dict> {
        let members = RefCell::new(Members::default());
        let member = |i| self.member(depth, &members, i);
        let (rest, ()) = preceded(
            lexeme(char('{')),
            expect(
                "expected string or '}'",
                alt((
                    value((), lexeme(char('}'))),
                    value(
                        (),
                        terminated(
                            (
                                member,
                                many0_count(preceded(
                                    lexeme(char(',')),
                                    expect("expected string", member),
                                )),
                            ),
                            expect("expected ',' or '}'", lexeme(char('}'))),
                        ),
                    ),
                )),
            ),
        )
        .parse(i)?;
        Ok((rest, members.into_inner().dict))
    }

    /// `member := string ':' value`; a key may appear once per object.
    fn member(&self, depth: usize, members: &RefCell<Members>, i: &'a str) -> PResult<'a, ()> {
        let key_at = i;
        let location = self.location(key_at);
        let (i, name) = lexeme(string).parse(i)?;
        let (i, _) = expect("expected ':'", lexeme(char(':'))).parse(i)?;
        if members.borrow_mut().contains(&name) {
            // QEMU has read the value's first token by then.
            lookahead(i)?;
            return Err(failure(key_at, Message::DuplicateKey(name)));
        }
        let (i, node) = self.value(depth + 1, i)?;
        members.borrow_mut().push(Key { name, location }, node);
        Ok((i, ()))
    }

    /// `list := '[' ( ']' | value (',' value)* ']' )`
    fn list(&self, depth: usize, i: &'a str) -> PResult<'a, Vec<Node>> {
        let items = RefCell::new(Vec::new());
        let element = |i| {
            let (i, node) = self.value(depth + 1, i)?;
            items.borrow_mut().push(node);
            Ok((i, ()))
        };
        let (rest, ()) = preceded(
            lexeme(char('[')),
            expect(
                "expected '{', '[', ']', string, or boolean",
                alt((
                    value((), lexeme(char(']'))),
                    value(
                        (),
                        terminated(
                            (
                                preceded(value_start, element),
                                many0_count(preceded(lexeme(char(',')), element)),
                            ),
                            expect("expected ',' or ']'", lexeme(char(']'))),
                        ),
                    ),
                )),
            ),
        )
        .parse(i)?;
        Ok((rest, items.into_inner()))
    }
}

// ---------------------------------------------------------------------
// Top level.

/// One top-level item of a file.
pub(crate) enum Item<'a> {
    /// A value (the model wants an object: a definition, `include` or
    /// `pragma`).
    Value(Node),
    /// A `##` block, not yet parsed into sections.
    Doc(RawDocBlock<'a>),
}

/// A `##` block as read: where it starts and its comment lines.
pub(crate) struct RawDocBlock<'a> {
    pub location: Location,
    pub lines: Vec<RawDocLine<'a>>,
}

/// How a file's parse ended early: the syntax error, and whether it was
/// met while reading a doc block (QEMU has then already dealt with the
/// doc block before it).
pub(crate) struct Stopped<'a> {
    pub error: SyntaxError<'a>,
    pub in_doc_block: bool,
}

/// A comment without the carriage return of a CRLF line end.
fn without_cr(comment: &str) -> &str {
    comment.trim_end_matches('\r')
}

/// The closing `##` of a doc block, alone on its line.
fn doc_close(i: &str) -> PResult<'_, ()> {
    match comment(i) {
        Ok((rest, text)) if without_cr(text) == "##" => Ok((rest, ())),
        Ok(_) => Err(failure(i, Message::DocJunkAtEnd)),
        Err(_) => unexpected(i, Message::DocUnterminated),
    }
}

impl<'a> Source<'a> {
    /// `file := trivia item* EOF`: the items read, in order, and the syntax
    /// error that ended the file early, if any.
    pub fn file(&self) -> (Vec<Item<'a>>, Option<Stopped<'a>>) {
        let mut items = Vec::new();
        let item_start = Cell::new(self.text);
        let result = preceded(
            trivia,
            fold_many0(
                preceded(not(eof), |i| {
                    item_start.set(i);
                    self.item(i)
                }),
                || (),
                |(), item| items.push(item),
            ),
        )
        .parse(self.text);
        let stopped = match result {
            Ok(_) => None,
            Err(Err::Error(error) | Err::Failure(error)) => Some(Stopped {
                error,
                in_doc_block: item_start.get().starts_with('#'),
            }),
            Err(Err::Incomplete(_)) => Some(Stopped {
                error: SyntaxError {
                    at: item_start.get(),
                    message: Message::Mismatch,
                },
                in_doc_block: false,
            }),
        };
        (items, stopped)
    }

    /// `item := (doc_block | value) lookahead`
    fn item(&self, i: &'a str) -> PResult<'a, Item<'a>> {
        alt((
            |i| self.doc_block(i).map(|(i, d)| (i, Item::Doc(d))),
            terminated(|i| self.value(0, i), lookahead).map(Item::Value),
        ))
        .parse(i)
    }

    /// `doc_block := '##' (doc_trivia doc_line)* doc_trivia '##'`, then the
    /// trivia after it and a readable token.
    fn doc_block(&self, i: &'a str) -> PResult<'a, RawDocBlock<'a>> {
        let start = i;
        let (i, open) = comment(i)?;
        if without_cr(open) != "##" {
            return Err(failure(start, Message::DocJunkAtStart));
        }
        let location = self.location(start);
        let (i, lines) = fold_many0(
            preceded(doc_trivia, |i| self.doc_line(i)),
            Vec::new,
            |mut lines, line| {
                lines.push(line);
                lines
            },
        )
        .parse(i)?;
        let (i, ()) = preceded(doc_trivia, doc_close).parse(i)?;
        let (i, ()) = terminated(trivia, lookahead).parse(i)?;
        Ok((i, RawDocBlock { location, lines }))
    }

    /// `doc_line`: a comment inside a doc block (one that does not start
    /// with `##`, which closes it).
    fn doc_line(&self, i: &'a str) -> PResult<'a, RawDocLine<'a>> {
        let (rest, text) = preceded(not(tag("##")), comment).parse(i)?;
        Ok((
            rest,
            RawDocLine {
                text: without_cr(text),
                location: self.location(i),
            },
        ))
    }
}
