//! Whole schemas: files, `include` (expanded in place, each file once),
//! `pragma`, and doc blocks attached to the definitions they precede.

use crate::doc::{DocBlock, parse_doc};
use crate::syntax::{Lexer, Tok};
use crate::value::{Node, Value};
use crate::{Diagnostics, Error, Location, SourceFile};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `pragma` directives of a schema, merged (a later directive replaces
/// an earlier value of the same pragma).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pragmas {
    pub doc_required: bool,
    pub command_name_exceptions: Vec<String>,
    pub command_returns_exceptions: Vec<String>,
    pub documentation_exceptions: Vec<String>,
    pub member_name_exceptions: Vec<String>,
}

/// One top-level definition (not an `include` or `pragma`), with the doc
/// block right before it.
#[derive(Debug, Clone, PartialEq)]
pub struct TopExpr {
    /// The expression; not necessarily a dictionary of valid shape, which
    /// the model checks.
    pub node: Node,
    pub doc: Option<DocBlock>,
    /// A doc block preceded it but could not be parsed (already reported):
    /// later checks should not complain that the doc is missing.
    pub doc_broken: bool,
}

/// A parsed schema: definitions in order, includes expanded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedSchema {
    pub exprs: Vec<TopExpr>,
    /// Free-form doc blocks with the index into `exprs` they precede.
    pub free_docs: Vec<(usize, DocBlock)>,
    pub pragmas: Pragmas,
}

/// Parses the schema file at `path` and every file it includes.
///
/// Messages show `path` as given (relative stays relative); included files
/// are shown joined to the directory of the file including them.
pub fn parse_file(path: &Path) -> Result<ParsedSchema, Diagnostics> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        let file = Arc::new(SourceFile {
            path: path.to_path_buf(),
            included_from: None,
        });
        Error::new(
            Location {
                file,
                line: 1,
                col: 1,
            },
            format!("can't read schema file '{}': {e}", path.display()),
        )
    })?;
    parse_str(path, &src)
}

/// Parses schema text as if read from `name` (includes are looked up
/// relative to `name`'s directory).
pub fn parse_str(name: &Path, text: &str) -> Result<ParsedSchema, Diagnostics> {
    let mut st = State::default();
    let file = Arc::new(SourceFile {
        path: name.to_path_buf(),
        included_from: None,
    });
    st.included.insert(canonical(name));
    st.stack.push(canonical(name));
    st.parse_text(file, text);
    if st.errors.is_empty() {
        Ok(st.out)
    } else {
        Err(Diagnostics { errors: st.errors })
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

#[derive(Default)]
struct State {
    out: ParsedSchema,
    errors: Vec<Error>,
    included: HashSet<PathBuf>,
    /// Canonical paths of the files being parsed, outermost first.
    stack: Vec<PathBuf>,
}

enum PendingDoc {
    None,
    Doc(DocBlock),
    Broken,
}

impl State {
    fn parse_text(&mut self, file: Arc<SourceFile>, text: &str) {
        let mut lx = Lexer::new(text, file);
        if let Err(e) = self.parse_all(&mut lx) {
            self.errors.push(e);
        }
    }

    fn reject_doc(&mut self, doc: &mut PendingDoc) {
        if let PendingDoc::Doc(d) = std::mem::replace(doc, PendingDoc::None) {
            match &d.symbol {
                Some(sym) => self.errors.push(Error::new(
                    d.location.clone(),
                    format!("documentation for '{sym}' is not followed by the definition"),
                )),
                None => self.out.free_docs.push((self.out.exprs.len(), d)),
            }
        }
    }

    /// Parses tokens until the end of the file; an `Err` is a syntax error
    /// that ends this file.
    fn parse_all(&mut self, lx: &mut Lexer) -> Result<(), Error> {
        let mut pending = PendingDoc::None;
        lx.accept(false)?;
        loop {
            match &lx.tok {
                Tok::Eof => break,
                Tok::Comment(_) => {
                    self.reject_doc(&mut pending);
                    pending = self.doc_blocks(lx)?;
                    continue;
                }
                _ => {}
            }
            let node = lx.value()?;
            let Some(dict) = node.as_dict() else {
                self.errors.push(Error::new(
                    node.location.clone(),
                    "top-level expression must be an object",
                ));
                pending = PendingDoc::None;
                continue;
            };
            if dict.contains("include") {
                self.reject_doc(&mut pending);
                self.include(&node, lx.file());
            } else if dict.contains("pragma") {
                self.reject_doc(&mut pending);
                self.pragma(&node);
            } else {
                let (doc, doc_broken) = match std::mem::replace(&mut pending, PendingDoc::None) {
                    PendingDoc::None => (None, false),
                    PendingDoc::Broken => (None, true),
                    PendingDoc::Doc(d) if d.symbol.is_none() => {
                        self.errors.push(Error::new(
                            d.location.clone(),
                            "definition documentation required",
                        ));
                        (None, true)
                    }
                    PendingDoc::Doc(d) => (Some(d), false),
                };
                self.out.exprs.push(TopExpr {
                    node,
                    doc,
                    doc_broken,
                });
            }
        }
        self.reject_doc(&mut pending);
        Ok(())
    }

    /// Reads one `##` block (the current token is its opening comment).
    fn doc_blocks(&mut self, lx: &mut Lexer) -> Result<PendingDoc, Error> {
        let start = lx.location();
        if lx.tok != Tok::Comment("##".to_string()) {
            return Err(Error::new(
                start,
                "junk after '##' at start of documentation comment",
            ));
        }
        let mut lines = Vec::new();
        lx.accept(true)?;
        loop {
            let Tok::Comment(text) = &lx.tok else {
                return Err(Error::new(
                    lx.location(),
                    "documentation comment must end with '##'",
                ));
            };
            if text.starts_with("##") {
                if text != "##" {
                    return Err(Error::new(
                        lx.location(),
                        "junk after '##' at end of documentation comment",
                    ));
                }
                break;
            }
            lines.push((text.clone(), lx.location()));
            lx.accept(true)?;
        }
        lx.accept(false)?;
        match parse_doc(&start, &lines) {
            Ok(block) => Ok(PendingDoc::Doc(block)),
            Err(e) => {
                self.errors.push(e);
                Ok(PendingDoc::Broken)
            }
        }
    }

    fn include(&mut self, node: &Node, file: &Arc<SourceFile>) {
        let Some(dict) = node.as_dict() else { return };
        if dict.len() != 1 {
            self.errors.push(Error::new(
                node.location.clone(),
                "invalid 'include' directive",
            ));
            return;
        }
        let Some(value) = dict.get("include") else {
            return;
        };
        let Some(include) = value.as_str() else {
            self.errors.push(Error::new(
                value.location.clone(),
                "value of 'include' must be a string",
            ));
            return;
        };
        let dir = file.path.parent().unwrap_or(Path::new(""));
        let path = dir.join(include);
        let abs = canonical(&path);
        if self.stack.contains(&abs) {
            self.errors.push(Error::new(
                value.location.clone(),
                format!("inclusion loop for {include}"),
            ));
            return;
        }
        if !self.included.insert(abs.clone()) {
            return;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                self.errors.push(Error::new(
                    value.location.clone(),
                    format!("can't read include file '{}': {e}", path.display()),
                ));
                return;
            }
        };
        let sub = Arc::new(SourceFile {
            path,
            included_from: Some(node.location.clone()),
        });
        self.stack.push(abs);
        self.parse_text(sub, &text);
        self.stack.pop();
    }

    fn pragma(&mut self, node: &Node) {
        let Some(dict) = node.as_dict() else { return };
        if dict.len() != 1 {
            self.errors.push(Error::new(
                node.location.clone(),
                "invalid 'pragma' directive",
            ));
            return;
        }
        let Some(value) = dict.get("pragma") else {
            return;
        };
        let Some(pragmas) = value.as_dict() else {
            self.errors.push(Error::new(
                value.location.clone(),
                "value of 'pragma' must be an object",
            ));
            return;
        };
        for (key, v) in &pragmas.entries {
            let list = |errors: &mut Vec<Error>| -> Option<Vec<String>> {
                let strings: Option<Vec<String>> = v
                    .as_list()
                    .and_then(|l| l.iter().map(|e| e.as_str().map(str::to_string)).collect());
                if strings.is_none() {
                    errors.push(Error::new(
                        v.location.clone(),
                        format!("pragma {} must be a list of strings", key.name),
                    ));
                }
                strings
            };
            let p = &mut self.out.pragmas;
            match key.name.as_str() {
                "doc-required" => match v.value {
                    Value::Bool(b) => p.doc_required = b,
                    _ => self.errors.push(Error::new(
                        v.location.clone(),
                        "pragma 'doc-required' must be boolean",
                    )),
                },
                "command-name-exceptions" => {
                    if let Some(l) = list(&mut self.errors) {
                        self.out.pragmas.command_name_exceptions = l;
                    }
                }
                "command-returns-exceptions" => {
                    if let Some(l) = list(&mut self.errors) {
                        self.out.pragmas.command_returns_exceptions = l;
                    }
                }
                "documentation-exceptions" => {
                    if let Some(l) = list(&mut self.errors) {
                        self.out.pragmas.documentation_exceptions = l;
                    }
                }
                "member-name-exceptions" => {
                    if let Some(l) = list(&mut self.errors) {
                        self.out.pragmas.member_name_exceptions = l;
                    }
                }
                other => self.errors.push(Error::new(
                    key.location.clone(),
                    format!("unknown pragma '{other}'"),
                )),
            }
        }
    }
}
