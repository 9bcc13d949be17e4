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

const TAGS: &[&str] = &[
    "Returns", "Errors", "Since", "TODO", "Note", "Notes", "Example", "Examples",
];

/// Tags that may appear once only.
const UNIQUE_TAGS: &[&str] = &["Returns", "Errors", "Since"];

#[derive(Clone, Copy, PartialEq)]
enum Part {
    Body,
    Members,
    Features,
    Sections,
}

#[derive(Clone, Copy)]
enum Target {
    Body,
    Member(usize),
    Feature(usize),
    Section(usize),
}

fn at_col(loc: &Location, col: u32) -> Location {
    Location {
        file: loc.file.clone(),
        line: loc.line,
        col,
    }
}

/// `@name:` at the start of a line: the name and the rest of the line.
fn member_header(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('@')?;
    let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    let word = &rest[..word_end];
    let name = word.strip_suffix(':')?;
    Some((name, rest[word_end..].trim_start()))
}

fn section_header(line: &str) -> Option<(&'static str, &str)> {
    let word_end = line.find(char::is_whitespace).unwrap_or(line.len());
    let word = line[..word_end].strip_suffix(':')?;
    let tag = TAGS.iter().find(|t| **t == word)?;
    Some((tag, line[word_end..].trim_start()))
}

/// Splits the comment lines of one `##` block (without the delimiters)
/// into one or more blocks: a free-form block is split before each `= Heading`.
pub(crate) fn parse_doc(
    start: &Location,
    lines: &[(String, Location)],
) -> Result<Vec<DocBlock>, Error> {
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
            let block = definition_doc(start, name, &texts[1..])?;
            Ok(vec![block])
        }
        _ => free_form_docs(start, &texts),
    }
}

fn free_form_docs(start: &Location, texts: &[(&str, &Location)]) -> Result<Vec<DocBlock>, Error> {
    let mut out = Vec::new();
    let mut body = String::new();
    let mut block_start = start.clone();
    for (text, loc) in texts {
        if let Some((name, _)) = member_header(text) {
            return Err(Error::new(
                (*loc).clone(),
                format!("'@{name}:' not allowed in free-form documentation"),
            ));
        }
        if text.starts_with('=') && !body.trim().is_empty() {
            out.push(free_block(&block_start, &body));
            body.clear();
            block_start = (*loc).clone();
        }
        body.push_str(text.trim_end());
        body.push('\n');
    }
    out.push(free_block(&block_start, &body));
    Ok(out)
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

/// Text of a section: first line as is, continuation lines dedented by
/// their common indentation, surrounding blank lines dropped.
struct TextBuf {
    first: String,
    rest: Vec<String>,
}

impl TextBuf {
    fn new(first: &str) -> Self {
        TextBuf {
            first: first.trim_end().to_string(),
            rest: Vec::new(),
        }
    }
    fn push(&mut self, line: &str) {
        self.rest.push(line.trim_end().to_string());
    }
    fn is_blank(&self) -> bool {
        self.first.is_empty() && self.rest.iter().all(|l| l.is_empty())
    }
    fn last_blank(&self) -> bool {
        match self.rest.last() {
            Some(l) => l.is_empty(),
            None => false,
        }
    }
    fn finish(&self, dedent: bool) -> String {
        let indent = if dedent {
            self.rest
                .iter()
                .filter(|l| !l.is_empty())
                .map(|l| l.len() - l.trim_start_matches([' ', '\t']).len())
                .min()
                .unwrap_or(0)
        } else {
            0
        };
        let mut out = self.first.clone();
        for l in &self.rest {
            out.push('\n');
            if !l.is_empty() {
                out.push_str(&l[indent.min(l.len())..]);
            }
        }
        out.trim().to_string()
    }
}

fn definition_doc(
    start: &Location,
    symbol: &str,
    texts: &[(&str, &Location)],
) -> Result<DocBlock, Error> {
    let mut body = TextBuf::new("");
    let mut members: Vec<(String, TextBuf, Location)> = Vec::new();
    let mut features: Vec<(String, TextBuf, Location)> = Vec::new();
    let mut sections: Vec<(Option<String>, TextBuf, Location)> = Vec::new();
    let mut part = Part::Body;
    let mut target = Target::Body;
    let mut features_line: Option<Location> = None;

    for (text, loc) in texts {
        let loc = *loc;
        if text.starts_with('=') {
            return Err(Error::new(
                loc.clone(),
                "unexpected '=' markup in definition documentation",
            ));
        }
        if let Some((name, rest)) = member_header(text) {
            let here = at_col(loc, loc.col + 2);
            if name.is_empty() {
                return Err(Error::new(here, "invalid parameter name"));
            }
            let list = match part {
                Part::Body | Part::Members => {
                    part = Part::Members;
                    &mut members
                }
                Part::Features => &mut features,
                Part::Sections => {
                    return Err(Error::new(
                        here,
                        format!("description of '@{name}:' follows a section"),
                    ));
                }
            };
            if list.iter().any(|(n, _, _)| n == name) {
                return Err(Error::new(
                    here,
                    format!("'{name}' parameter name duplicated"),
                ));
            }
            list.push((name.to_string(), TextBuf::new(rest), here));
            target = if part == Part::Features {
                Target::Feature(list.len() - 1)
            } else {
                Target::Member(list.len() - 1)
            };
            continue;
        }
        if text.trim_end() == "Features:" {
            if let Some(prev) = &features_line {
                return Err(Error::new(loc.clone(), "duplicated 'Features' section")
                    .with_note(prev.clone(), "previous 'Features:' line"));
            }
            if part == Part::Sections {
                return Err(Error::new(
                    at_col(loc, loc.col + 2),
                    "'Features:' line follows a section",
                ));
            }
            features_line = Some(loc.clone());
            part = Part::Features;
            target = Target::Body;
            // Text after "Features:" and before the first feature has no home;
            // treat it as an untagged section if it appears.
            continue;
        }
        if let Some((tag, rest)) = section_header(text) {
            let here = at_col(loc, loc.col + 2);
            if UNIQUE_TAGS.contains(&tag)
                && sections.iter().any(|(t, _, _)| t.as_deref() == Some(tag))
            {
                return Err(Error::new(here, format!("duplicated '{tag}' section")));
            }
            sections.push((Some(tag.to_string()), TextBuf::new(rest), here));
            part = Part::Sections;
            target = Target::Section(sections.len() - 1);
            continue;
        }
        let indented = text.starts_with(char::is_whitespace);
        let blank = text.trim().is_empty();
        // A new unindented paragraph after a member, feature or tagged
        // section starts a plain section.
        let starts_paragraph = !blank
            && !indented
            && match target {
                Target::Body => part != Part::Body,
                Target::Member(i) => members[i].1.last_blank(),
                Target::Feature(i) => features[i].1.last_blank(),
                Target::Section(i) => sections[i].0.is_some() && sections[i].1.last_blank(),
            };
        if starts_paragraph {
            sections.push((None, TextBuf::new(text), at_col(loc, loc.col + 2)));
            part = Part::Sections;
            target = Target::Section(sections.len() - 1);
            continue;
        }
        match target {
            Target::Body => {
                if part == Part::Body {
                    body.push(text)
                }
            }
            Target::Member(i) => members[i].1.push(text),
            Target::Feature(i) => features[i].1.push(text),
            Target::Section(i) => sections[i].1.push(text),
        }
    }

    for (tag, text, loc) in &sections {
        if let Some(tag) = tag
            && text.is_blank()
        {
            return Err(Error::new(
                loc.clone(),
                format!("empty doc section '{tag}'"),
            ));
        }
    }
    let items = |list: Vec<(String, TextBuf, Location)>| {
        list.into_iter()
            .map(|(name, text, location)| DocItem {
                name,
                text: text.finish(true),
                location,
            })
            .collect()
    };
    Ok(DocBlock {
        location: start.clone(),
        symbol: Some(symbol.to_string()),
        body: body.finish(false),
        members: items(members),
        features: items(features),
        sections: sections
            .into_iter()
            .map(|(tag, text, location)| DocSectionBlock {
                text: text.finish(tag.is_some()),
                tag,
                location,
            })
            .collect(),
    })
}
