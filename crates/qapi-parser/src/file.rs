//! Whole schemas: files, `include` (expanded in place, each file once),
//! `pragma`, and doc blocks attached to the definitions they precede.

use crate::doc::{DocBlock, parse_doc};
use crate::grammar::{Item as Syntax, RawDocBlock, Source};
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
    // A schema without errors is parsed a file per thread; any error (or an
    // unexpected turn) and the whole schema is parsed again the plain way,
    // which alone words diagnostics.
    match parallel::parse(name, text) {
        Some(parsed) => Ok(parsed),
        None => parse_sequential(name, text),
    }
}

/// [`parse_str`] on one thread, includes expanded as they are met.
fn parse_sequential(name: &Path, text: &str) -> Result<ParsedSchema, Diagnostics> {
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

/// The path of the file `include` names, as messages show it: joined to
/// the directory of the including file.
fn include_path(file: &SourceFile, include: &str) -> PathBuf {
    file.path.parent().unwrap_or(Path::new("")).join(include)
}

/// Where an `include` directive's value is (the directive itself if it has
/// none).
fn include_value_location(node: &Node) -> Location {
    node.as_dict()
        .and_then(|d| d.get("include"))
        .map_or_else(|| node.location.clone(), |v| v.location.clone())
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
    /// Record one file's contents in `items` instead of expanding its
    /// includes into `out` (the parallel parse, see [`parallel`]).
    deferred: Option<Vec<Item>>,
}

/// What one file contains, in order, its includes not expanded.
#[derive(Debug)]
enum Item {
    Expr(TopExpr),
    FreeDoc(DocBlock),
    Include(Node),
    Pragma(Node),
}

enum PendingDoc {
    None,
    Doc(DocBlock),
    Broken,
}

impl State {
    /// Parses one file's text and acts on its items in order (includes
    /// expanded or recorded); a syntax error ends the file.
    fn parse_text(&mut self, file: Arc<SourceFile>, text: &str) {
        let source = Source::new(text, file);
        let (items, stopped) = source.file();
        let mut pending = PendingDoc::None;
        for item in items {
            match item {
                Syntax::Doc(block) => {
                    self.reject_doc(&mut pending);
                    pending = self.doc_block(&block);
                }
                Syntax::Value(node) => self.top_level(node, &mut pending, source.source_file()),
            }
        }
        match stopped {
            // QEMU has dealt with the doc block before when it meets
            // another one; a syntax error elsewhere leaves it pending.
            Some(stop) => {
                if stop.in_doc_block {
                    self.reject_doc(&mut pending);
                }
                self.errors.push(source.error(&stop.error));
            }
            None => self.reject_doc(&mut pending),
        }
    }

    fn reject_doc(&mut self, doc: &mut PendingDoc) {
        if let PendingDoc::Doc(d) = std::mem::replace(doc, PendingDoc::None) {
            match &d.symbol {
                Some(sym) => self.errors.push(Error::new(
                    d.location.clone(),
                    format!("documentation for '{sym}' is not followed by the definition"),
                )),
                None => self.free_doc(d),
            }
        }
    }

    fn free_doc(&mut self, d: DocBlock) {
        match &mut self.deferred {
            Some(items) => items.push(Item::FreeDoc(d)),
            None => self.out.free_docs.push((self.out.exprs.len(), d)),
        }
    }

    /// A top-level value: an object, which is an `include`, a `pragma` or
    /// a definition (with the doc block before it).
    fn top_level(&mut self, node: Node, pending: &mut PendingDoc, file: &Arc<SourceFile>) {
        let Some(dict) = node.as_dict() else {
            self.errors.push(Error::new(
                node.location.clone(),
                "top-level expression must be an object",
            ));
            *pending = PendingDoc::None;
            return;
        };
        if dict.contains("include") {
            self.reject_doc(pending);
            match &mut self.deferred {
                Some(items) => items.push(Item::Include(node)),
                None => self.include(&node, file),
            }
        } else if dict.contains("pragma") {
            self.reject_doc(pending);
            match &mut self.deferred {
                Some(items) => items.push(Item::Pragma(node)),
                None => self.pragma(&node),
            }
        } else {
            let (doc, doc_broken) = match std::mem::replace(pending, PendingDoc::None) {
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
            let expr = TopExpr {
                node,
                doc,
                doc_broken,
            };
            match &mut self.deferred {
                Some(items) => items.push(Item::Expr(expr)),
                None => self.out.exprs.push(expr),
            }
        }
    }

    /// A `##` block's sections; a block that does not parse is reported
    /// and leaves its definition without documentation.
    fn doc_block(&mut self, block: &RawDocBlock) -> PendingDoc {
        match parse_doc(&block.location, &block.lines) {
            Ok(doc) => PendingDoc::Doc(doc),
            Err(e) => {
                self.errors.push(e);
                PendingDoc::Broken
            }
        }
    }

    fn include(&mut self, node: &Node, file: &Arc<SourceFile>) {
        let Some((path, abs, sub)) = self.include_target(node, file) else {
            return;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                self.errors.push(Error::new(
                    include_value_location(node),
                    format!("can't read include file '{}': {e}", path.display()),
                ));
                return;
            }
        };
        self.stack.push(abs);
        self.parse_text(sub, &text);
        self.stack.pop();
    }

    /// The file an `include` directive names, if it is to be read now:
    /// the path as shown, its canonical form (marked included) and its
    /// [`SourceFile`]. Reports a bad directive or a loop.
    fn include_target(
        &mut self,
        node: &Node,
        file: &Arc<SourceFile>,
    ) -> Option<(PathBuf, PathBuf, Arc<SourceFile>)> {
        let dict = node.as_dict()?;
        if dict.len() != 1 {
            self.errors.push(Error::new(
                node.location.clone(),
                "invalid 'include' directive",
            ));
            return None;
        }
        let value = dict.get("include")?;
        let Some(include) = value.as_str() else {
            self.errors.push(Error::new(
                value.location.clone(),
                "value of 'include' must be a string",
            ));
            return None;
        };
        let path = include_path(file, include);
        let abs = canonical(&path);
        if self.stack.contains(&abs) {
            self.errors.push(Error::new(
                value.location.clone(),
                format!("inclusion loop for {include}"),
            ));
            return None;
        }
        if !self.included.insert(abs.clone()) {
            return None;
        }
        let sub = Arc::new(SourceFile {
            path: path.clone(),
            included_from: Some(node.location.clone()),
        });
        Some((path, abs, sub))
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

/// The parse of a schema split over threads, a file per task.
///
/// Each file is parsed on its own into [`Item`]s, its includes recorded
/// rather than expanded; a file found in an include is queued for the next
/// free thread as soon as the including file is parsed. The expansion then runs as
/// in the sequential parse (same order, include-once, loop checks, pragma
/// merging), taking each file's items instead of parsing it. A file's items
/// carry locations in a provisional [`SourceFile`] (included from where it
/// was first found); where the expansion reaches the file from elsewhere,
/// its locations are moved to the real one. The result equals the
/// sequential parse's (tested on QEMU's schema); `None` on any error.
mod parallel {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Condvar, Mutex, PoisonError};

    type Files = HashMap<PathBuf, (Arc<SourceFile>, Vec<Item>)>;

    pub(super) fn parse(name: &Path, text: &str) -> Option<ParsedSchema> {
        let root = Arc::new(SourceFile {
            path: name.to_path_buf(),
            included_from: None,
        });
        let root_items = parse_one(root.clone(), text)?;
        let root_abs = canonical(name);

        let mut known = HashSet::from([root_abs.clone()]);
        let mut first = includes_of(&root, &root_items, &mut known);
        if first.is_empty() {
            // Nothing to share out: the plain parse is as fast.
            return None;
        }
        // A stack of files to parse: the first file the root includes on
        // top, and files found meanwhile pushed on top, so that a big file
        // reached only through another is not left for last.
        first.reverse();
        let mut files = parse_all(first, known)?;

        let mut st = State::default();
        st.included.insert(root_abs.clone());
        st.stack.push(root_abs);
        let complete = st.expand(&root, root_items, &mut files);
        (complete && st.errors.is_empty()).then_some(st.out)
    }

    /// Work shared by the parsing threads.
    struct Queue {
        todo: Vec<(PathBuf, Arc<SourceFile>)>,
        known: HashSet<PathBuf>,
        busy: usize,
        done: Files,
        failed: bool,
    }

    /// Parses every file of `todo` and every file they include, on up to one
    /// thread per core; `None` if one does not read or parse.
    fn parse_all(todo: Vec<(PathBuf, Arc<SourceFile>)>, known: HashSet<PathBuf>) -> Option<Files> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let queue = Mutex::new(Queue {
            todo,
            known,
            busy: 0,
            done: Files::new(),
            failed: false,
        });
        let wake = Condvar::new();
        let lock = || queue.lock().unwrap_or_else(PoisonError::into_inner);
        let work = || {
            let mut q = lock();
            loop {
                if q.failed {
                    break;
                }
                let Some((abs, file)) = q.todo.pop() else {
                    if q.busy == 0 {
                        break;
                    }
                    q = wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                    continue;
                };
                q.busy += 1;
                drop(q);
                let items = std::fs::read_to_string(&file.path)
                    .ok()
                    .and_then(|text| parse_one(file.clone(), &text));
                q = lock();
                q.busy -= 1;
                match items {
                    Some(items) => {
                        let found = includes_of(&file, &items, &mut q.known);
                        q.todo.extend(found.into_iter().rev());
                        q.done.insert(abs, (file, items));
                    }
                    None => q.failed = true,
                }
                wake.notify_all();
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..cores.clamp(1, 8) {
                scope.spawn(work);
            }
            work();
        });
        let q = queue.into_inner().unwrap_or_else(PoisonError::into_inner);
        (!q.failed).then_some(q.done)
    }

    /// One file's items, `None` if it has errors.
    fn parse_one(file: Arc<SourceFile>, text: &str) -> Option<Vec<Item>> {
        let mut st = State {
            deferred: Some(Vec::new()),
            ..State::default()
        };
        st.parse_text(file, text);
        if st.errors.is_empty() {
            st.deferred
        } else {
            None
        }
    }

    /// The files `items` include that are not `known` yet (now known), by
    /// canonical path, each with its provisional [`SourceFile`].
    fn includes_of(
        file: &SourceFile,
        items: &[Item],
        known: &mut HashSet<PathBuf>,
    ) -> Vec<(PathBuf, Arc<SourceFile>)> {
        let mut out = Vec::new();
        for item in items {
            let Item::Include(node) = item else { continue };
            let Some(include) = node
                .as_dict()
                .and_then(|d| d.get("include"))
                .and_then(Node::as_str)
            else {
                continue;
            };
            let path = include_path(file, include);
            let abs = canonical(&path);
            if known.insert(abs.clone()) {
                let provisional = Arc::new(SourceFile {
                    path,
                    included_from: Some(node.location.clone()),
                });
                out.push((abs, provisional));
            }
        }
        out
    }

    impl State {
        /// Expands `items` of `file` into `out` as the sequential parse
        /// would; `false` if a file to include was not parsed ahead.
        fn expand(&mut self, file: &Arc<SourceFile>, items: Vec<Item>, files: &mut Files) -> bool {
            for item in items {
                match item {
                    Item::Expr(e) => self.out.exprs.push(e),
                    Item::FreeDoc(d) => self.out.free_docs.push((self.out.exprs.len(), d)),
                    Item::Pragma(node) => self.pragma(&node),
                    Item::Include(node) => {
                        let Some((_, abs, sub)) = self.include_target(&node, file) else {
                            continue;
                        };
                        let Some((provisional, mut sub_items)) = files.remove(&abs) else {
                            return false;
                        };
                        let sub = if *provisional == *sub {
                            provisional
                        } else {
                            for item in &mut sub_items {
                                retarget_item(item, &provisional, &sub);
                            }
                            sub
                        };
                        self.stack.push(abs);
                        let complete = self.expand(&sub, sub_items, files);
                        self.stack.pop();
                        if !complete {
                            return false;
                        }
                    }
                }
            }
            true
        }
    }

    fn retarget(loc: &mut Location, from: &Arc<SourceFile>, to: &Arc<SourceFile>) {
        if Arc::ptr_eq(&loc.file, from) {
            loc.file = to.clone();
        }
    }

    fn retarget_node(node: &mut Node, from: &Arc<SourceFile>, to: &Arc<SourceFile>) {
        retarget(&mut node.location, from, to);
        match &mut node.value {
            Value::List(items) => {
                for n in items {
                    retarget_node(n, from, to);
                }
            }
            Value::Dict(dict) => {
                for (key, value) in &mut dict.entries {
                    retarget(&mut key.location, from, to);
                    retarget_node(value, from, to);
                }
            }
            Value::Str(_) | Value::Bool(_) => {}
        }
    }

    fn retarget_doc(doc: &mut DocBlock, from: &Arc<SourceFile>, to: &Arc<SourceFile>) {
        retarget(&mut doc.location, from, to);
        for item in doc.members.iter_mut().chain(doc.features.iter_mut()) {
            retarget(&mut item.location, from, to);
        }
        for section in &mut doc.sections {
            retarget(&mut section.location, from, to);
        }
    }

    fn retarget_item(item: &mut Item, from: &Arc<SourceFile>, to: &Arc<SourceFile>) {
        match item {
            Item::Expr(e) => {
                retarget_node(&mut e.node, from, to);
                if let Some(doc) = &mut e.doc {
                    retarget_doc(doc, from, to);
                }
            }
            Item::FreeDoc(doc) => retarget_doc(doc, from, to),
            Item::Include(node) | Item::Pragma(node) => retarget_node(node, from, to),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel parse gives exactly what the sequential one gives.
    #[test]
    fn parallel_parse_equals_sequential_parse_on_qemus_schema() {
        let path = qapi_testdata::qemu_schema().expect("QEMU's schema is available");
        let text = std::fs::read_to_string(&path).expect("QEMU's schema reads");
        let parallel = parallel::parse(&path, &text).expect("parallel parse succeeds");
        let sequential = parse_sequential(&path, &text).expect("sequential parse succeeds");
        assert_eq!(parallel.exprs.len(), sequential.exprs.len());
        assert_eq!(parallel, sequential);
        // Locations equal by value includes each file's include chain.
        let chains = |p: &ParsedSchema| -> Vec<Vec<String>> {
            p.exprs
                .iter()
                .map(|e| e.node.location.include_context())
                .collect()
        };
        assert_eq!(chains(&parallel), chains(&sequential));
    }

    /// A file included first from a nested file (not from where the waves
    /// found it) gets its include chain from the nested file.
    #[test]
    fn a_file_first_included_from_a_nested_file_has_that_chain() {
        let dir = std::env::temp_dir().join(format!("qapi-parser-par-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
        write(
            "a.json",
            "{ 'include': 'c.json' }\n{ 'enum': 'A', 'data': ['x'] }\n",
        );
        write("b.json", "{ 'enum': 'B', 'data': ['y'] }\n");
        write(
            "c.json",
            "{ 'include': 'b.json' }\n{ 'enum': 'C', 'data': ['z'] }\n",
        );
        let root = dir.join("root.json");
        let text = "{ 'include': 'a.json' }\n{ 'include': 'b.json' }\n{ 'include': 'c.json' }\n";
        std::fs::write(&root, text).expect("write root");
        let parallel = parallel::parse(&root, text).expect("parallel parse succeeds");
        let sequential = parse_sequential(&root, text).expect("sequential parse succeeds");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(parallel, sequential);
        let b = &parallel.exprs[0];
        assert_eq!(
            b.node.location.include_context().len(),
            3,
            "b via c via a via root"
        );
    }
}
