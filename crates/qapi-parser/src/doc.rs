//! Doc comment blocks (`##` ... `##`): the definition they document, its
//! overview, `@member:` and feature descriptions, and tagged sections.
//!
//! [`crate::grammar`] reads a block's comment lines; this module's grammar
//! (nom combinators again) parses them, at two levels: one line's text
//! (`doc_text`, `description`, `section_tag`, `features_heading`,
//! `heading`) and the block as a sequence of lines (`Lines`):
//!
//! ```text
//! doc          := definition | free_form
//! free_form    := heading? line*
//! definition   := '@symbol:' (blank* section)*
//! section      := features | descriptions | tagged | paragraph
//! features     := 'Features:' blank* description+
//! descriptions := description+
//! description  := '@name:' text indented
//! tagged       := Tag ':' text indented
//! paragraph    := non_blank+
//! indented     := blank* (indented_line (blank | deeper_line)*)?
//! ```

use crate::{Error, Location};
use nom::branch::alt;
use nom::bytes::complete::{tag, take_till, take_while, take_while1};
use nom::character::complete::char;
use nom::combinator::{all_consuming, eof, not, rest, value, verify};
use nom::error::{ErrorKind, ParseError};
use nom::multi::many0_count;
use nom::sequence::{preceded, terminated};
use nom::{Err, IResult, Input, Needed, Parser};

/// A described name (`@member: text` or a feature's `@name: text`).
#[derive(Debug, Clone, PartialEq)]
pub struct DocItem {
    pub name: String,
    pub text: String,
    pub location: Location,
}

/// A section after the member descriptions: tagged (`Returns:`, `Errors:`,
/// `Since:`, `TODO:`...) or a plain paragraph.
#[derive(Debug, Clone, PartialEq)]
pub struct DocSectionBlock {
    /// The tag without its colon, `None` for plain text.
    pub tag: Option<String>,
    pub text: String,
    pub location: Location,
}

/// One doc comment block.
#[derive(Debug, Clone, PartialEq)]
pub struct DocBlock {
    /// Where the opening `##` is.
    pub location: Location,
    /// The documented definition (`# @name:` first line); `None` for a
    /// free-form block (section headings, prose).
    pub symbol: Option<String>,
    /// The overview (free-form blocks: all of their text).
    pub body: String,
    pub members: Vec<DocItem>,
    pub features: Vec<DocItem>,
    pub sections: Vec<DocSectionBlock>,
}

impl DocBlock {
    pub fn has_section(&self, tag: &str) -> bool {
        self.sections.iter().any(|s| s.tag.as_deref() == Some(tag))
    }
}

/// A comment line of a `##` block as read: `#` and what follows (without
/// the newline), and where the `#` is.
pub(crate) struct RawDocLine<'a> {
    pub text: &'a str,
    pub location: Location,
}

// ---------------------------------------------------------------------
// One line's text.

type TextResult<'a, O> = IResult<&'a str, O, ()>;

/// `doc_text := '#' (end | ' ' text)`: a comment line's text.
fn doc_text(raw: &str) -> TextResult<'_, &str> {
    preceded(char('#'), alt((value("", eof), preceded(char(' '), rest)))).parse(raw)
}

/// `description := '@' name ':' ' '* text`: the name is anything up to the
/// first colon (checked against the definition later).
fn description(line: &str) -> TextResult<'_, (&str, &str)> {
    preceded(
        char('@'),
        (
            take_till(|c| c == ':'),
            preceded((char(':'), take_while(|c| c == ' ')), rest),
        ),
    )
    .parse(line)
}

/// `Tag: text`, the tag followed by one colon (`Tag::` is rST markup).
fn tagged<'a>(name: &'static str) -> impl Parser<&'a str, Output = &'static str, Error = ()> {
    terminated(
        value(name, tag(name)),
        (char(':'), not(char(':')), take_while(|c| c == ' ')),
    )
}

/// `section_tag := ('Returns' | 'Errors' | 'Since' | 'TODO' | 'Notes' |
/// 'Note' | 'Examples' | 'Example') ':' ' '* text`
fn section_tag(line: &str) -> TextResult<'_, (&'static str, &str)> {
    (
        alt((
            tagged("Returns"),
            tagged("Errors"),
            tagged("Since"),
            tagged("TODO"),
            tagged("Notes"),
            tagged("Note"),
            tagged("Examples"),
            tagged("Example"),
        )),
        rest,
    )
        .parse(line)
}

/// `Features:` alone on its line.
fn features_heading(line: &str) -> TextResult<'_, &str> {
    all_consuming(tag("Features:")).parse(line)
}

/// `= Heading` markup.
fn heading(line: &str) -> TextResult<'_, char> {
    char('=').parse(line)
}

/// Tags that may appear once only.
const UNIQUE_TAGS: &[&str] = &["Returns", "Errors", "Since"];

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '\t']).len()
}

// ---------------------------------------------------------------------
// The block as lines.

/// A line of a doc block: its text after `# `, trailing whitespace
/// dropped, and where its `#` is.
#[derive(Debug)]
struct DocLine<'t> {
    text: &'t str,
    location: &'t Location,
}

impl DocLine<'_> {
    /// Where the text starts (after `# `).
    fn text_location(&self) -> Location {
        at_col(self.location, self.location.col + 2)
    }
}

fn at_col(loc: &Location, col: u32) -> Location {
    Location {
        file: loc.file.clone(),
        line: loc.line,
        col,
    }
}

/// The lines of a doc block as nom input.
#[derive(Debug, Clone, Copy)]
struct Lines<'t>(&'t [DocLine<'t>]);

impl<'t> Input for Lines<'t> {
    type Item = &'t DocLine<'t>;
    type Iter = std::slice::Iter<'t, DocLine<'t>>;
    type IterIndices = std::iter::Enumerate<Self::Iter>;

    fn input_len(&self) -> usize {
        self.0.len()
    }
    fn take(&self, index: usize) -> Self {
        Lines(&self.0[..index])
    }
    fn take_from(&self, index: usize) -> Self {
        Lines(&self.0[index..])
    }
    fn take_split(&self, index: usize) -> (Self, Self) {
        let (prefix, suffix) = self.0.split_at(index);
        (Lines(suffix), Lines(prefix))
    }
    fn position<P: Fn(Self::Item) -> bool>(&self, predicate: P) -> Option<usize> {
        self.0.iter().position(predicate)
    }
    fn iter_elements(&self) -> Self::Iter {
        self.0.iter()
    }
    fn iter_indices(&self) -> Self::IterIndices {
        self.0.iter().enumerate()
    }
    fn slice_index(&self, count: usize) -> Result<usize, Needed> {
        if self.0.len() >= count {
            Ok(count)
        } else {
            Err(Needed::new(count - self.0.len()))
        }
    }
}

/// The doc grammar's error: `None` while a production merely does not
/// match (nom backtracks), the error once one is found.
#[derive(Debug)]
struct DocError(Option<Error>);

impl<I> ParseError<I> for DocError {
    fn from_error_kind(_: I, _: ErrorKind) -> Self {
        DocError(None)
    }
    fn append(_: I, _: ErrorKind, other: Self) -> Self {
        other
    }
}

type DocResult<'t, O> = IResult<Lines<'t>, O, DocError>;

fn doc_failure(location: Location, message: impl Into<String>) -> Err<DocError> {
    Err::Failure(DocError(Some(Error::new(location, message))))
}

/// Any one line.
fn line(i: Lines<'_>) -> DocResult<'_, &DocLine<'_>> {
    match i.0.split_first() {
        Some((first, rest)) => Ok((Lines(rest), first)),
        None => Err(Err::Error(DocError(None))),
    }
}

/// A blank line (`#` alone).
fn blank(i: Lines<'_>) -> DocResult<'_, &DocLine<'_>> {
    verify(line, |l: &DocLine| l.text.is_empty()).parse(i)
}

/// A line that is not blank.
fn non_blank(i: Lines<'_>) -> DocResult<'_, &DocLine<'_>> {
    verify(line, |l: &DocLine| !l.text.is_empty()).parse(i)
}

/// A `@name: text` line: the line, the name and the text.
fn description_line(i: Lines<'_>) -> DocResult<'_, (&DocLine<'_>, &str, &str)> {
    let (rest, l) = line(i)?;
    match description(l.text) {
        Ok((_, (name, text))) => Ok((rest, (l, name, text))),
        Err(_) => Err(Err::Error(DocError(None))),
    }
}

// ---------------------------------------------------------------------
// Text of a section.

/// Text of a section: its first line, then continuation lines dedented
/// by their common indentation; surrounding blank lines dropped.
struct TextBuf<'t> {
    /// The lines, borrowed from the comment text.
    lines: Vec<&'t str>,
}

impl<'t> TextBuf<'t> {
    fn new(first: &'t str) -> Self {
        let mut lines = Vec::new();
        if !first.trim().is_empty() {
            lines.push(first.trim_end());
        }
        TextBuf { lines }
    }
    fn push(&mut self, line: &'t str) {
        self.lines.push(line.trim_end());
    }
    fn is_blank(&self) -> bool {
        self.lines.iter().all(|l| l.is_empty())
    }
    fn finish(&self, first_is_header_text: bool) -> String {
        let skip = usize::from(first_is_header_text);
        let indent = self
            .lines
            .iter()
            .skip(skip)
            .filter(|l| !l.is_empty())
            .map(|l| indent_of(l))
            .min()
            .unwrap_or(0);
        // Surrounding blank lines dropped.
        let first = self.lines.iter().position(|l| !l.is_empty());
        let last = self.lines.iter().rposition(|l| !l.is_empty());
        let (Some(first), Some(last)) = (first, last) else {
            return String::new();
        };
        let mut out =
            String::with_capacity(self.lines[first..=last].iter().map(|l| l.len() + 1).sum());
        for (i, l) in self.lines.iter().enumerate().take(last + 1).skip(first) {
            if i > first {
                out.push('\n');
            }
            if i >= skip && !l.is_empty() {
                out.push_str(&l[indent.min(l.len())..]);
            } else {
                out.push_str(l);
            }
        }
        out
    }
}

/// A described name or a section while the block is read.
struct Part<'t, K> {
    key: K,
    text: TextBuf<'t>,
    /// The header line had text after its colon.
    header_text: bool,
    location: Location,
}

/// Where the next text line goes: the last part started.
#[derive(Clone, Copy, PartialEq)]
enum Last {
    Body,
    Member(usize),
    Feature(usize),
    Section(usize),
}

/// A definition's doc block while it is read: the productions of the
/// block grammar are its methods.
struct DefinitionDoc<'t> {
    /// Where a line after the last one would be.
    end: Location,
    body: TextBuf<'t>,
    members: Vec<Part<'t, &'t str>>,
    features: Vec<Part<'t, &'t str>>,
    sections: Vec<Part<'t, Option<&'static str>>>,
    last: Last,
    /// A section, or the descriptions, have been read: no descriptions
    /// may follow.
    no_more_args: bool,
}

impl<'t> DefinitionDoc<'t> {
    /// Where the first of `i` is, or the end.
    fn location(&self, i: Lines<'t>) -> Location {
        i.0.first()
            .map_or_else(|| self.end.clone(), |l| l.location.clone())
    }

    fn append(&mut self, line: &'t str) {
        match self.last {
            Last::Body => self.body.push(line),
            Last::Member(n) => self.members[n].text.push(line),
            Last::Feature(n) => self.features[n].text.push(line),
            Last::Section(n) => self.sections[n].text.push(line),
        }
    }

    /// `section := features | descriptions | tagged | paragraph`, told
    /// apart by the first line; `=` markup is an error.
    fn section(&mut self, i: Lines<'t>) -> DocResult<'t, ()> {
        let (_, first) = line(i)?;
        if heading(first.text).is_ok() {
            return Err(doc_failure(
                first.text_location(),
                "unexpected '=' markup in definition documentation",
            ));
        }
        if features_heading(first.text).is_ok() {
            return self.features(i);
        }
        if let Ok((_, (name, _))) = description(first.text) {
            if self.no_more_args {
                return Err(doc_failure(
                    first.text_location(),
                    format!("description of '@{name}:' follows a section"),
                ));
            }
            return self.descriptions(i);
        }
        if section_tag(first.text).is_ok() {
            return self.tagged(i);
        }
        self.paragraph(i)
    }

    /// `features := 'Features:' blank* description+`
    fn features(&mut self, i: Lines<'t>) -> DocResult<'t, ()> {
        let (i, heading) = line(i)?;
        if !self.features.is_empty() {
            return Err(doc_failure(
                heading.text_location(),
                "duplicated 'Features:' line",
            ));
        }
        let (mut i, _) = many0_count(blank).parse(i)?;
        while let Ok((_, (l, name, text))) = description_line(i) {
            i = self.description(i, l, name, text, true)?.0;
        }
        if self.features.is_empty() {
            return Err(doc_failure(
                self.location(i),
                "feature descriptions expected",
            ));
        }
        self.no_more_args = true;
        Ok((i, ()))
    }

    /// `descriptions := description+`
    fn descriptions(&mut self, mut i: Lines<'t>) -> DocResult<'t, ()> {
        while let Ok((_, (l, name, text))) = description_line(i) {
            i = self.description(i, l, name, text, false)?.0;
        }
        self.no_more_args = true;
        Ok((i, ()))
    }

    /// `description := '@name:' text indented`, a member's or a feature's.
    fn description(
        &mut self,
        i: Lines<'t>,
        l: &'t DocLine<'t>,
        name: &'t str,
        text: &'t str,
        feature: bool,
    ) -> DocResult<'t, ()> {
        let here = l.text_location();
        if name.is_empty() {
            return Err(doc_failure(here, "invalid parameter name"));
        }
        let list = if feature {
            &mut self.features
        } else {
            &mut self.members
        };
        if list.iter().any(|p| p.key == name) {
            return Err(doc_failure(
                here,
                format!("'{name}' parameter name duplicated"),
            ));
        }
        list.push(Part {
            key: name,
            text: TextBuf::new(text),
            header_text: !text.is_empty(),
            location: here,
        });
        self.last = if feature {
            Last::Feature(list.len() - 1)
        } else {
            Last::Member(list.len() - 1)
        };
        self.indented(i.take_from(1))
    }

    /// `tagged := Tag ':' text indented`. `Note`/`Example` sections are
    /// gone from QAPI (rST directives replace them); `Returns`, `Errors`
    /// and `Since` may appear once.
    fn tagged(&mut self, i: Lines<'t>) -> DocResult<'t, ()> {
        let (i, l) = line(i)?;
        let Ok((_, (tag, text))) = section_tag(l.text) else {
            return Err(Err::Error(DocError(None)));
        };
        let here = l.text_location();
        if tag.starts_with("Note") {
            return Err(doc_failure(
                here,
                format!(
                    "The '{tag}' section is no longer supported. Please use rST's \
                     '.. note::' or '.. admonition:: notes' directives, or another \
                     suitable admonition instead."
                ),
            ));
        }
        if tag.starts_with("Example") {
            return Err(doc_failure(
                here,
                format!(
                    "The '{tag}' section is no longer supported. Please use the \
                     '.. qmp-example::' directive, or other suitable markup instead."
                ),
            ));
        }
        if UNIQUE_TAGS.contains(&tag) && self.sections.iter().any(|s| s.key == Some(tag)) {
            return Err(doc_failure(here, format!("duplicated '{tag}' section")));
        }
        self.sections.push(Part {
            key: Some(tag),
            text: TextBuf::new(text),
            header_text: !text.is_empty(),
            location: here,
        });
        self.last = Last::Section(self.sections.len() - 1);
        self.no_more_args = true;
        self.indented(i)
    }

    /// `paragraph := non_blank+`: extends the body or a plain section
    /// right before it, else starts a plain section.
    fn paragraph(&mut self, i: Lines<'t>) -> DocResult<'t, ()> {
        let (_, first) = line(i)?;
        match self.last {
            Last::Body => {
                if !self.body.is_blank() {
                    self.body.push("");
                }
            }
            Last::Section(n) if self.sections[n].key.is_none() => self.sections[n].text.push(""),
            _ => {
                self.sections.push(Part {
                    key: None,
                    text: TextBuf::new(""),
                    header_text: false,
                    location: first.text_location(),
                });
                self.last = Last::Section(self.sections.len() - 1);
            }
        }
        let (i, lines) = take_while1(|l: &DocLine| !l.text.is_empty()).parse(i)?;
        for l in lines.0 {
            self.append(l.text);
        }
        Ok((i, ()))
    }

    /// `indented := blank* (indented_line (blank | deeper_line)*)?`: the
    /// continuation of a description or tagged section. It ends at an
    /// `@name:` line, or at a line indented less than the first one after
    /// a blank line (right after text, that is an error).
    fn indented(&mut self, i: Lines<'t>) -> DocResult<'t, ()> {
        let (i, blanks) = many0_count(blank).parse(i)?;
        for _ in 0..blanks {
            self.append("");
        }
        let Ok((after_first, first)) = verify(line, |l: &DocLine| indent_of(l.text) > 0).parse(i)
        else {
            return Ok((i, ()));
        };
        let indent = indent_of(first.text);
        self.append(first.text);
        let mut i = after_first;
        let mut prev_blank = false;
        loop {
            let continuation = alt((
                blank,
                verify(line, |l: &DocLine| {
                    description(l.text).is_err() && indent_of(l.text) >= indent
                }),
            ))
            .parse(i);
            let Ok((rest, l)) = continuation else { break };
            self.append(l.text);
            prev_blank = l.text.is_empty();
            i = rest;
        }
        if let Ok((_, l)) = non_blank(i)
            && description(l.text).is_err()
            && !prev_blank
        {
            return Err(doc_failure(
                self.location(i),
                format!("unexpected de-indent (expected at least {indent} spaces)"),
            ));
        }
        Ok((i, ()))
    }

    /// The block, checked (no empty descriptions or tagged sections).
    fn finish(self, start: &Location, symbol: &str) -> Result<DocBlock, Error> {
        for p in self.members.iter().chain(&self.features) {
            if p.text.is_blank() {
                return Err(Error::new(
                    p.location.clone(),
                    format!("text required after '@{}:'", p.key),
                ));
            }
        }
        for p in &self.sections {
            if let Some(tag) = p.key
                && p.text.is_blank()
            {
                return Err(Error::new(
                    p.location.clone(),
                    format!("text required after '{tag}:'"),
                ));
            }
        }
        let items = |parts: Vec<Part<'t, &'t str>>| -> Vec<DocItem> {
            parts
                .into_iter()
                .map(|p| DocItem {
                    name: p.key.to_string(),
                    text: p.text.finish(p.header_text),
                    location: p.location,
                })
                .collect()
        };
        Ok(DocBlock {
            location: start.clone(),
            symbol: Some(symbol.to_string()),
            body: self.body.finish(false),
            members: items(self.members),
            features: items(self.features),
            sections: self
                .sections
                .into_iter()
                .map(|p| DocSectionBlock {
                    text: p.text.finish(p.header_text),
                    tag: p.key.map(str::to_string),
                    location: p.location,
                })
                .collect(),
        })
    }
}

// ---------------------------------------------------------------------
// Whole blocks.

/// Parses the comment lines of one `##` block (without the delimiters):
/// a definition's doc if the first line is `# @name:`, else free-form.
/// Every line must have a space after its `#` (checked first).
pub(crate) fn parse_doc(start: &Location, raw: &[RawDocLine]) -> Result<DocBlock, Error> {
    let mut lines = Vec::with_capacity(raw.len());
    for r in raw {
        let Ok((_, text)) = doc_text(r.text) else {
            return Err(Error::new(
                at_col(&r.location, r.location.col + 1),
                "missing space after #",
            ));
        };
        lines.push(DocLine {
            text: text.trim_end(),
            location: &r.location,
        });
    }
    match lines.first() {
        Some(first) if first.text.starts_with('@') => {
            let Some(symbol) = first.text[1..].strip_suffix(':') else {
                return Err(Error::new(
                    first.location.clone(),
                    "line should end with ':'",
                ));
            };
            if symbol.is_empty() {
                return Err(Error::new(
                    first.location.clone(),
                    "name required after '@'",
                ));
            }
            definition_doc(start, symbol, &lines[1..])
        }
        _ => free_form_doc(start, &lines),
    }
}

/// `free_form_doc := heading? line*`: prose, and a `=` heading only on
/// the first line; no descriptions.
fn free_form_doc(start: &Location, lines: &[DocLine]) -> Result<DocBlock, Error> {
    let mut body = String::new();
    for (n, l) in lines.iter().enumerate() {
        if let Ok((_, (name, _))) = description(l.text) {
            return Err(Error::new(
                l.location.clone(),
                format!("'@{name}:' not allowed in free-form documentation"),
            ));
        }
        if n > 0 && heading(l.text).is_ok() {
            return Err(Error::new(
                l.location.clone(),
                "'=' heading must come first in a comment block",
            ));
        }
        body.push_str(l.text);
        body.push('\n');
    }
    Ok(DocBlock {
        location: start.clone(),
        symbol: None,
        body: body.trim().to_string(),
        members: Vec::new(),
        features: Vec::new(),
        sections: Vec::new(),
    })
}

/// `definition := '@symbol:' (blank* section)*`
fn definition_doc(start: &Location, symbol: &str, lines: &[DocLine]) -> Result<DocBlock, Error> {
    let end = match lines.last() {
        Some(l) => Location {
            file: l.location.file.clone(),
            line: l.location.line + 1,
            col: 1,
        },
        None => start.clone(),
    };
    let mut doc = DefinitionDoc {
        end,
        body: TextBuf::new(""),
        members: Vec::new(),
        features: Vec::new(),
        sections: Vec::new(),
        last: Last::Body,
        no_more_args: false,
    };
    let mut i = Lines(lines);
    loop {
        let (rest, _) = many0_count(blank)
            .parse(i)
            .map_err(|e| into_error(e, start))?;
        if rest.0.is_empty() {
            break;
        }
        i = doc.section(rest).map_err(|e| into_error(e, start))?.0;
    }
    doc.finish(start, symbol)
}

/// The error a failed doc production carries. Every production that fails
/// for good says why; one that does not would be a bug in this grammar,
/// reported at the block rather than as a panic.
fn into_error(e: Err<DocError>, start: &Location) -> Error {
    match e {
        Err::Error(DocError(Some(e))) | Err::Failure(DocError(Some(e))) => e,
        _ => Error::new(start.clone(), "malformed documentation comment"),
    }
}
