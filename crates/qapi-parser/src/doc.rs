//! Doc comment blocks (`##` ... `##`): the definition they document, its
//! overview, `@member:` and feature descriptions, and tagged sections.

use crate::{Error, Location};

/// A described name (`@member: text` or a feature's `@name: text`).
#[derive(Debug, Clone, PartialEq)]
pub struct DocItem {
    pub name: String,
    pub text: String,
    pub location: Location,
}

/// A section after the member descriptions: tagged (`Returns:`, `Errors:`,
/// `Since:`, `TODO:`, `Note:`, `Example:`...) or a plain paragraph.
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

/// Section tags (a tag followed by `::` is rST markup, not a tag).
const TAGS: &[&str] = &[
    "Returns", "Errors", "Since", "TODO", "Notes", "Note", "Examples", "Example",
];

/// Tags that may appear once only.
const UNIQUE_TAGS: &[&str] = &["Returns", "Errors", "Since"];

fn at_col(loc: &Location, col: u32) -> Location {
    Location {
        file: loc.file.clone(),
        line: loc.line,
        col,
    }
}

/// `@name:` at the start of a line: the name (anything up to the first
/// colon) and the text after the colon.
fn member_header(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('@')?;
    let colon = rest.find(':')?;
    Some((&rest[..colon], rest[colon + 1..].trim_start_matches(' ')))
}

/// `Tag:` at the start of a line: the tag and the text after it.
fn section_header(line: &str) -> Option<(&'static str, &str)> {
    TAGS.iter().find_map(|tag| {
        let rest = line.strip_prefix(tag)?.strip_prefix(':')?;
        if rest.starts_with(':') {
            return None;
        }
        Some((*tag, rest.trim_start_matches(' ')))
    })
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '\t']).len()
}

/// Parses the comment lines of one `##` block (without the delimiters):
/// a definition's doc if the first line is `# @name:`, else free-form.
pub(crate) fn parse_doc(start: &Location, lines: &[(&str, Location)]) -> Result<DocBlock, Error> {
    let mut texts = Vec::with_capacity(lines.len());
    for (raw, loc) in lines {
        let rest = &raw[1..];
        if rest.is_empty() {
            texts.push(("", loc));
        } else if let Some(text) = rest.strip_prefix(' ') {
            texts.push((text, loc));
        } else {
            return Err(Error::new(
                at_col(loc, loc.col + 1),
                "missing space after #",
            ));
        }
    }
    match texts.first() {
        Some((first, loc)) if first.starts_with('@') => {
            let symbol = first.trim_end();
            let Some(name) = symbol[1..].strip_suffix(':') else {
                return Err(Error::new((*loc).clone(), "line should end with ':'"));
            };
            if name.is_empty() {
                return Err(Error::new((*loc).clone(), "name required after '@'"));
            }
            definition_doc(start, name, &texts[1..])
        }
        _ => free_form_doc(start, &texts),
    }
}

fn free_form_doc(start: &Location, texts: &[(&str, &Location)]) -> Result<DocBlock, Error> {
    let mut body = String::new();
    for (text, loc) in texts {
        if let Some((name, _)) = member_header(text) {
            return Err(Error::new(
                (*loc).clone(),
                format!("'@{name}:' not allowed in free-form documentation"),
            ));
        }
        body.push_str(text.trim_end());
        body.push('\n');
    }
    Ok(free_block(start, &body))
}

fn free_block(location: &Location, body: &str) -> DocBlock {
    DocBlock {
        location: location.clone(),
        symbol: None,
        body: body.trim().to_string(),
        members: Vec::new(),
        features: Vec::new(),
        sections: Vec::new(),
    }
}

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

/// What the doc block holds so far; the last entry is where text goes.
#[derive(Clone, Copy, PartialEq)]
enum Last {
    Body,
    Member(usize),
    Feature(usize),
    Section(usize),
}

struct DefDoc<'t> {
    start: &'t Location,
    texts: &'t [(&'t str, &'t Location)],
    body: TextBuf<'t>,
    members: Vec<(String, TextBuf<'t>, bool, Location)>,
    features: Vec<(String, TextBuf<'t>, bool, Location)>,
    sections: Vec<(Option<String>, TextBuf<'t>, bool, Location)>,
    last: Last,
}

impl<'t> DefDoc<'t> {
    fn line(&self, i: usize) -> Option<&'t str> {
        self.texts.get(i).map(|(t, _)| t.trim_end())
    }
    fn loc(&self, i: usize) -> Location {
        match self.texts.get(i) {
            Some((_, l)) => (*l).clone(),
            None => match self.texts.last() {
                Some((_, l)) => Location {
                    file: l.file.clone(),
                    line: l.line + 1,
                    col: 1,
                },
                None => self.start.clone(),
            },
        }
    }
    fn append(&mut self, line: &'t str) {
        match self.last {
            Last::Body => self.body.push(line),
            Last::Member(i) => self.members[i].1.push(line),
            Last::Feature(i) => self.features[i].1.push(line),
            Last::Section(i) => self.sections[i].1.push(line),
        }
    }
    fn skip_blank(&self, mut i: usize) -> usize {
        while self.line(i) == Some("") {
            i += 1;
        }
        i
    }

    /// Continuation lines of a description or tagged section: blank lines,
    /// then lines indented at least as much as the first indented one.
    /// Returns the index of the first line that is not part of it.
    fn indented(&mut self, mut i: usize) -> Result<usize, Error> {
        while self.line(i) == Some("") {
            self.append("");
            i += 1;
        }
        let Some(first) = self.line(i) else {
            return Ok(i);
        };
        let indent = indent_of(first);
        if indent == 0 {
            return Ok(i);
        }
        self.append(first);
        i += 1;
        let mut prev_blank = false;
        while let Some(line) = self.line(i) {
            if member_header(line).is_some() {
                return Ok(i);
            }
            if !line.is_empty() && indent_of(line) < indent {
                if prev_blank {
                    return Ok(i);
                }
                return Err(Error::new(
                    self.loc(i),
                    format!("unexpected de-indent (expected at least {indent} spaces)"),
                ));
            }
            self.append(line);
            prev_blank = line.is_empty();
            i += 1;
        }
        Ok(i)
    }

    fn describe(&mut self, i: usize, feature: bool) -> Result<usize, Error> {
        let line = self.line(i).unwrap_or_default();
        let Some((name, text)) = member_header(line) else {
            return Ok(i);
        };
        let loc = self.loc(i);
        let here = at_col(&loc, loc.col + 2);
        if name.is_empty() {
            return Err(Error::new(here, "invalid parameter name"));
        }
        let list = if feature {
            &mut self.features
        } else {
            &mut self.members
        };
        if list.iter().any(|(n, ..)| n == name) {
            return Err(Error::new(
                here,
                format!("'{name}' parameter name duplicated"),
            ));
        }
        list.push((name.to_string(), TextBuf::new(text), !text.is_empty(), here));
        self.last = if feature {
            Last::Feature(list.len() - 1)
        } else {
            Last::Member(list.len() - 1)
        };
        self.indented(i + 1)
    }
}

fn definition_doc(
    start: &Location,
    symbol: &str,
    texts: &[(&str, &Location)],
) -> Result<DocBlock, Error> {
    let mut d = DefDoc {
        start,
        texts,
        body: TextBuf::new(""),
        members: Vec::new(),
        features: Vec::new(),
        sections: Vec::new(),
        last: Last::Body,
    };
    let mut no_more_args = false;
    let mut i = 0;
    loop {
        i = d.skip_blank(i);
        let Some(line) = d.line(i) else { break };
        let loc = d.loc(i);
        let here = at_col(&loc, loc.col + 2);
        if line.starts_with('=') {
            return Err(Error::new(
                here,
                "unexpected '=' markup in definition documentation",
            ));
        }
        if line == "Features:" {
            if !d.features.is_empty() {
                return Err(Error::new(here, "duplicated 'Features:' line"));
            }
            i = d.skip_blank(i + 1);
            while d.line(i).and_then(member_header).is_some() {
                i = d.describe(i, true)?;
            }
            if d.features.is_empty() {
                return Err(Error::new(d.loc(i), "feature descriptions expected"));
            }
            no_more_args = true;
        } else if let Some((name, _)) = member_header(line) {
            if no_more_args {
                return Err(Error::new(
                    here,
                    format!("description of '@{name}:' follows a section"),
                ));
            }
            while d.line(i).and_then(member_header).is_some() {
                i = d.describe(i, false)?;
            }
            no_more_args = true;
        } else if let Some((tag, text)) = section_header(line) {
            if tag.starts_with("Note") {
                return Err(Error::new(
                    here,
                    format!(
                        "The '{tag}' section is no longer supported. Please use rST's \
                         '.. note::' or '.. admonition:: notes' directives, or another \
                         suitable admonition instead."
                    ),
                ));
            }
            if tag.starts_with("Example") {
                return Err(Error::new(
                    here,
                    format!(
                        "The '{tag}' section is no longer supported. Please use the \
                         '.. qmp-example::' directive, or other suitable markup instead."
                    ),
                ));
            }
            if UNIQUE_TAGS.contains(&tag)
                && d.sections.iter().any(|(t, ..)| t.as_deref() == Some(tag))
            {
                return Err(Error::new(here, format!("duplicated '{tag}' section")));
            }
            d.sections.push((
                Some(tag.to_string()),
                TextBuf::new(text),
                !text.is_empty(),
                here,
            ));
            d.last = Last::Section(d.sections.len() - 1);
            i = d.indented(i + 1)?;
            no_more_args = true;
        } else {
            // A plain paragraph: extends the body or a plain section right
            // before it, else starts a plain section.
            match d.last {
                Last::Body => {
                    if !d.body.is_blank() {
                        d.body.push("");
                    }
                }
                Last::Section(s) if d.sections[s].0.is_none() => d.sections[s].1.push(""),
                _ => {
                    d.sections.push((None, TextBuf::new(""), false, here));
                    d.last = Last::Section(d.sections.len() - 1);
                }
            }
            while let Some(l) = d.line(i) {
                if l.is_empty() {
                    break;
                }
                d.append(l);
                i += 1;
            }
        }
    }

    let empty = |what: &str, loc: &Location| {
        Err(Error::new(
            loc.clone(),
            format!("text required after '{what}:'"),
        ))
    };
    for (name, text, _, loc) in d.members.iter().chain(&d.features) {
        if text.is_blank() {
            return empty(&format!("@{name}"), loc);
        }
    }
    for (tag, text, _, loc) in &d.sections {
        if let Some(tag) = tag
            && text.is_blank()
        {
            return empty(tag, loc);
        }
    }
    let items = |list: Vec<(String, TextBuf, bool, Location)>| -> Vec<DocItem> {
        list.into_iter()
            .map(|(name, text, header_text, location)| DocItem {
                name,
                text: text.finish(header_text),
                location,
            })
            .collect()
    };
    Ok(DocBlock {
        location: start.clone(),
        symbol: Some(symbol.to_string()),
        body: d.body.finish(false),
        members: items(d.members),
        features: items(d.features),
        sections: d
            .sections
            .into_iter()
            .map(|(tag, text, header_text, location)| DocSectionBlock {
                text: text.finish(header_text),
                tag,
                location,
            })
            .collect(),
    })
}
