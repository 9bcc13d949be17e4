//! Tokens and values of one schema file: QEMU's JSON dialect with single
//! quotes, `#` comments, `true`/`false`, and no numbers.

use crate::value::{Dict, Key, Node, Value};
use crate::{Error, Location, SourceFile};
use nom::IResult;
use nom::bytes::complete::{tag, take_till, take_while};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::Arc;

/// Deepest nesting of lists and dictionaries we accept (QEMU's schema uses
/// four levels); a guard against stack exhaustion on hostile input.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok<'a> {
    /// One of `{ } : , [ ]`.
    Punct(char),
    Str(String),
    Bool(bool),
    /// A comment line, `#` included; only returned when asked for, or when
    /// it starts a doc block (`##`).
    Comment(&'a str),
    Eof,
}

/// A lexer that, like QEMU's, holds the current token.
pub(crate) struct Lexer<'a> {
    src: &'a str,
    file: Arc<SourceFile>,
    cursor: usize,
    line: u32,
    line_start: usize,
    pub tok: Tok<'a>,
    tok_pos: usize,
    tok_line: u32,
    tok_line_start: usize,
    /// The last column computed: (line start, position, column), so that
    /// columns along a long line are found without rescanning it.
    col_cache: Cell<(usize, usize, u32)>,
}

fn ws(i: &str) -> IResult<&str, &str> {
    take_while(|c: char| c == ' ' || c == '\t' || c == '\r' || c == '\x0c' || c == '\x0b')(i)
}

fn comment_line(i: &str) -> IResult<&str, &str> {
    take_till(|c: char| c == '\n')(i)
}

fn keyword(i: &str) -> IResult<&str, bool> {
    if let Ok((rest, _)) = tag::<_, _, nom::error::Error<&str>>("true")(i) {
        return Ok((rest, true));
    }
    let (rest, _) = tag("false")(i)?;
    Ok((rest, false))
}

fn stray(i: &str) -> IResult<&str, &str> {
    take_till(|c: char| "[]{}:,'\"".contains(c) || c.is_whitespace())(i)
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a str, file: Arc<SourceFile>) -> Self {
        Lexer {
            src,
            file,
            cursor: 0,
            line: 1,
            line_start: 0,
            tok: Tok::Eof,
            tok_pos: 0,
            tok_line: 1,
            tok_line_start: 0,
            col_cache: Cell::new((0, 0, 1)),
        }
    }

    pub fn file(&self) -> &Arc<SourceFile> {
        &self.file
    }

    fn location_at(&self, line: u32, line_start: usize, pos: usize) -> Location {
        let (cached_start, cached_pos, cached_col) = self.col_cache.get();
        let (from, mut col) = if cached_start == line_start && cached_pos <= pos {
            (cached_pos, cached_col)
        } else {
            (line_start, 1u32)
        };
        for ch in self.src[from..pos].chars() {
            if ch == '\t' {
                col = (col - 1) / 8 * 8 + 9;
            } else {
                col += 1;
            }
        }
        self.col_cache.set((line_start, pos, col));
        Location {
            file: self.file.clone(),
            line,
            col,
        }
    }

    /// Where the current token starts.
    pub fn location(&self) -> Location {
        self.location_at(self.tok_line, self.tok_line_start, self.tok_pos)
    }

    fn here(&self, pos: usize) -> Location {
        self.location_at(self.line, self.line_start, pos)
    }

    /// Reads the next token. Plain comments are skipped unless
    /// `keep_comments`; a comment starting with `##` is always returned.
    pub fn accept(&mut self, keep_comments: bool) -> Result<(), Error> {
        loop {
            let rest = &self.src[self.cursor..];
            let after_ws = match ws(rest) {
                Ok((r, _)) => r,
                Err(_) => rest,
            };
            self.cursor += rest.len() - after_ws.len();
            self.tok_pos = self.cursor;
            self.tok_line = self.line;
            self.tok_line_start = self.line_start;
            let rest = after_ws;
            let Some(ch) = rest.chars().next() else {
                self.tok = Tok::Eof;
                return Ok(());
            };
            match ch {
                '\n' => {
                    self.cursor += 1;
                    self.line += 1;
                    self.line_start = self.cursor;
                }
                '#' => {
                    let text = match comment_line(rest) {
                        Ok((_, t)) => t,
                        Err(_) => rest,
                    };
                    self.cursor += text.len();
                    if keep_comments || text.starts_with("##") {
                        self.tok = Tok::Comment(text.trim_end_matches('\r'));
                        return Ok(());
                    }
                }
                '{' | '}' | ':' | ',' | '[' | ']' => {
                    self.cursor += 1;
                    self.tok = Tok::Punct(ch);
                    return Ok(());
                }
                '\'' => {
                    let s = self.string()?;
                    self.tok = Tok::Str(s);
                    return Ok(());
                }
                _ => {
                    if let Ok((after, b)) = keyword(rest) {
                        self.cursor += rest.len() - after.len();
                        self.tok = Tok::Bool(b);
                        return Ok(());
                    }
                    let word = match stray(rest) {
                        Ok((_, w)) if !w.is_empty() => w,
                        _ => &rest[..ch.len_utf8()],
                    };
                    return Err(Error::new(
                        self.here(self.tok_pos),
                        format!("stray '{word}'"),
                    ));
                }
            }
        }
    }

    /// A single-quoted string; the cursor is on the opening quote.
    fn string(&mut self) -> Result<String, Error> {
        let start = self.cursor;
        let mut out = String::new();
        let mut chars = self.src[start + 1..].char_indices();
        let mut escaped = false;
        loop {
            let Some((off, ch)) = chars.next() else {
                return Err(Error::new(self.here(start), "missing terminating \"'\""));
            };
            let pos = start + 1 + off;
            if ch == '\n' {
                return Err(Error::new(self.here(start), "missing terminating \"'\""));
            }
            if escaped {
                if ch != '\\' {
                    return Err(Error::new(
                        self.here(pos - 1),
                        format!("unknown escape \\{ch}"),
                    ));
                }
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
                continue;
            } else if ch == '\'' {
                self.cursor = pos + 1;
                return Ok(out);
            }
            if !(' '..='~').contains(&ch) {
                return Err(Error::new(self.here(pos), "funny character in string"));
            }
            out.push(ch);
        }
    }

    fn err(&self, msg: &str) -> Error {
        Error::new(self.location(), msg)
    }

    /// Parses one value starting at the current token.
    pub fn value(&mut self) -> Result<Node, Error> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Result<Node, Error> {
        let location = self.location();
        if depth > MAX_DEPTH {
            return Err(Error::new(location, "nesting too deep"));
        }
        let value = match &self.tok {
            Tok::Punct('{') => {
                self.accept(false)?;
                Value::Dict(self.members(depth)?)
            }
            Tok::Punct('[') => {
                self.accept(false)?;
                Value::List(self.values(depth)?)
            }
            Tok::Str(_) => {
                let Tok::Str(s) = std::mem::replace(&mut self.tok, Tok::Eof) else {
                    return Err(self.err("expected string"));
                };
                self.accept(false)?;
                Value::Str(s)
            }
            Tok::Bool(b) => {
                let v = Value::Bool(*b);
                self.accept(false)?;
                v
            }
            _ => return Err(self.err("expected '{', '[', string, or boolean")),
        };
        Ok(Node { value, location })
    }

    fn members(&mut self, depth: usize) -> Result<Dict, Error> {
        let mut dict = Dict::default();
        let mut seen: HashSet<String> = HashSet::new();
        if self.tok == Tok::Punct('}') {
            self.accept(false)?;
            return Ok(dict);
        }
        if !matches!(self.tok, Tok::Str(_)) {
            return Err(self.err("expected string or '}'"));
        }
        loop {
            let location = self.location();
            let Tok::Str(name) = std::mem::replace(&mut self.tok, Tok::Eof) else {
                return Err(self.err("expected string"));
            };
            let key = Key { name, location };
            self.accept(false)?;
            if self.tok != Tok::Punct(':') {
                return Err(self.err("expected ':'"));
            }
            self.accept(false)?;
            let duplicate = if dict.entries.len() < 16 {
                dict.contains(&key.name)
            } else {
                if seen.is_empty() {
                    seen.extend(dict.keys().map(|k| k.name.clone()));
                }
                !seen.insert(key.name.clone())
            };
            if duplicate {
                return Err(Error::new(
                    key.location.clone(),
                    format!("duplicate key '{}'", key.name),
                ));
            }
            let value = self.value_at(depth + 1)?;
            dict.entries.push((key, value));
            match self.tok {
                Tok::Punct('}') => {
                    self.accept(false)?;
                    return Ok(dict);
                }
                Tok::Punct(',') => {}
                _ => return Err(self.err("expected ',' or '}'")),
            }
            self.accept(false)?;
            if !matches!(self.tok, Tok::Str(_)) {
                return Err(self.err("expected string"));
            }
        }
    }

    fn values(&mut self, depth: usize) -> Result<Vec<Node>, Error> {
        let mut list = Vec::new();
        if self.tok == Tok::Punct(']') {
            self.accept(false)?;
            return Ok(list);
        }
        if !matches!(
            self.tok,
            Tok::Punct('{') | Tok::Punct('[') | Tok::Str(_) | Tok::Bool(_)
        ) {
            return Err(self.err("expected '{', '[', ']', string, or boolean"));
        }
        loop {
            list.push(self.value_at(depth + 1)?);
            match self.tok {
                Tok::Punct(']') => {
                    self.accept(false)?;
                    return Ok(list);
                }
                Tok::Punct(',') => self.accept(false)?,
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }
}
