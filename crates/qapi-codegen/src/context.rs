//! What every emitter needs: schema lookups, Rust types for QAPI types,
//! which members must be boxed, and rustdoc from schema docs.

use crate::naming;
use proc_macro2::TokenStream;
use qapi_model::{
    Builtin, Common, Doc, Entity, IfCond, Member, Schema, TypeRef, UnionBase, UnionType,
};
use quote::{ToTokens, quote};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// The JSON kind of a value, as alternates dispatch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum JsonKind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
    Any,
}

pub struct Context<'a> {
    pub schema: &'a Schema,
    index: HashMap<&'a str, usize>,
    /// For each named type, the named types it contains by value (not through an array).
    by_value: BTreeMap<&'a str, BTreeSet<&'a str>>,
    /// Memo of [`Context::reachable`].
    reachable: Mutex<BTreeMap<String, Arc<BTreeSet<&'a str>>>>,
    /// The `Event` variant of each event, by entity index.
    event_variants: HashMap<usize, String>,
    /// The named types that replies or events carry (see [`Context::is_output`]).
    output: HashSet<&'a str>,
    /// How generated code names each prelude item (`Option`, `String`, ...): plainly, or
    /// by its full path where a schema type shadows it.
    prelude: HashMap<&'static str, &'static str>,
}

/// The prelude types and traits generated code names, with their full paths.
const PRELUDE: [(&str, &str); 6] = [
    ("Option", "::std::option::Option"),
    ("String", "::std::string::String"),
    ("Vec", "::std::vec::Vec"),
    ("Box", "::std::boxed::Box"),
    ("Into", "::std::convert::Into"),
    ("From", "::std::convert::From"),
];

impl<'a> Context<'a> {
    pub fn new(schema: &'a Schema) -> Self {
        let index: HashMap<&str, usize> = schema
            .entities
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name(), i))
            .collect();
        let all_members = |name: &str| all_members(schema, &index, name);
        let mut by_value: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for entity in &schema.entities {
            let mut out = BTreeSet::new();
            let mut add = |t: &'a TypeRef| {
                if let TypeRef::Named(n) = t {
                    out.insert(n.as_str());
                }
            };
            match entity {
                Entity::Struct(s) => {
                    for m in all_members(&s.common.name) {
                        add(&m.ty);
                    }
                }
                Entity::Union(u) => {
                    let base = match &u.base {
                        UnionBase::Named(n) => all_members(n),
                        UnionBase::Inline(m) => m.iter().collect(),
                    };
                    for m in base {
                        add(&m.ty);
                    }
                    for b in &u.branches {
                        out.insert(b.ty.as_str());
                    }
                }
                Entity::Alternate(a) => {
                    for alt in &a.alternatives {
                        add(&alt.ty);
                    }
                }
                _ => {}
            }
            by_value.insert(entity.name(), out);
        }
        let events: Vec<(usize, &Entity)> = schema
            .entities
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Entity::Event(_)))
            .collect();
        let variants = naming::dedupe(
            events
                .iter()
                .map(|(_, e)| naming::event_variant_ident(e.name()))
                .collect(),
        );
        let event_variants = events.iter().map(|(i, _)| *i).zip(variants).collect();
        let output = output_types(schema, &index);
        let prelude = PRELUDE
            .iter()
            .map(|&(name, path)| {
                let shadowed = schema.entities.iter().any(|e| {
                    // Only a name that might be `name` once in UpperCamelCase.
                    e.name().eq_ignore_ascii_case(name) && naming::type_ident(e.name()) == name
                });
                (name, if shadowed { path } else { name })
            })
            .collect();
        Context {
            schema,
            index,
            by_value,
            reachable: Mutex::new(BTreeMap::new()),
            event_variants,
            output,
            prelude,
        }
    }

    /// A prelude item (`Option`, `String`, `Vec`, `Box`, `Into`, `From`): its plain name,
    /// or its full path where a schema type of that name shadows it (QEMU has `String`).
    pub fn std_item(&self, name: &'static str) -> TokenStream {
        match self.prelude.get(name) {
            Some(&text) if text == name => {
                let ident = proc_macro2::Ident::new(name, proc_macro2::Span::call_site());
                quote!(#ident)
            }
            // `::std::<module>::<Name>`, built rather than parsed from text.
            Some(path) => {
                let segments = path
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(|s| proc_macro2::Ident::new(s, proc_macro2::Span::call_site()));
                quote!(#(::#segments)*)
            }
            None => TokenStream::new(),
        }
    }

    /// Whether a reply or an event can carry the named type (by value or in an array, at
    /// any depth): then a newer QEMU may send it with values this schema does not know,
    /// and the type (an enum, or a union through its discriminator) gets an `UnknownValue`
    /// that tolerant reading gives for them.
    pub fn is_output(&self, name: &str) -> bool {
        self.output.contains(name)
    }

    /// The `Event` variant of the event at `entities[index]`.
    pub fn event_variant(&self, index: usize) -> String {
        self.event_variants.get(&index).cloned().unwrap_or_default()
    }

    pub fn entity(&self, name: &str) -> Option<&'a Entity> {
        self.index.get(name).map(|&i| &self.schema.entities[i])
    }

    /// Every member of a struct in wire order: base members first.
    pub fn all_members(&self, struct_name: &str) -> Vec<&'a Member> {
        all_members(self.schema, &self.index, struct_name)
    }

    /// The base members of a union in wire order.
    pub fn union_base_members<'u>(&self, u: &'u UnionType) -> Vec<&'u Member>
    where
        'a: 'u,
    {
        match &u.base {
            UnionBase::Named(n) => self.all_members(n),
            UnionBase::Inline(m) => m.iter().collect(),
        }
    }

    /// Every named type reachable from `from` by value, `from` included.
    fn reachable(&self, from: &str) -> Arc<BTreeSet<&'a str>> {
        if let Some(done) = self.reachable_memo().get(from) {
            return Arc::clone(done);
        }
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&'a str> = self
            .by_value
            .get_key_value(from)
            .map(|(k, _)| *k)
            .into_iter()
            .collect();
        while let Some(cur) = stack.pop() {
            if seen.insert(cur)
                && let Some(next) = self.by_value.get(cur)
            {
                stack.extend(next.iter().copied());
            }
        }
        let seen = Arc::new(seen);
        self.reachable_memo()
            .insert(from.to_string(), Arc::clone(&seen));
        seen
    }

    /// The memo of [`Context::reachable`] (shared by the generator's threads).
    fn reachable_memo(&self) -> MutexGuard<'_, BTreeMap<String, Arc<BTreeSet<&'a str>>>> {
        // A panic elsewhere cannot leave the memo half-written: use it as it is.
        self.reachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a by-value use of `ty` inside `container` needs a `Box`.
    pub fn needs_box(&self, container: Option<&str>, ty: &str) -> bool {
        container.is_some_and(|c| self.reachable(ty).contains(c))
    }

    /// The Rust type for a QAPI type used inside `container`.
    pub fn rust_type(&self, container: Option<&str>, ty: &TypeRef) -> TokenStream {
        match ty {
            TypeRef::Builtin(b) => self.builtin_type(*b),
            TypeRef::Array(inner) => {
                let vec = self.std_item("Vec");
                let inner = self.rust_type(None, inner);
                quote!(#vec<#inner>)
            }
            TypeRef::Named(n) => {
                let id = naming::token(&naming::type_ident(n));
                if self.needs_box(container, n) {
                    let boxed = self.std_item("Box");
                    quote!(#boxed<#id>)
                } else {
                    quote!(#id)
                }
            }
        }
    }

    /// The Rust type of a built-in type.
    pub fn builtin_type(&self, b: Builtin) -> TokenStream {
        match b {
            Builtin::Str => self.std_item("String"),
            Builtin::Number => quote!(f64),
            Builtin::Int | Builtin::Int64 => quote!(i64),
            Builtin::Int8 => quote!(i8),
            Builtin::Int16 => quote!(i16),
            Builtin::Int32 => quote!(i32),
            Builtin::Uint8 => quote!(u8),
            Builtin::Uint16 => quote!(u16),
            Builtin::Uint32 => quote!(u32),
            Builtin::Uint64 | Builtin::Size => quote!(u64),
            Builtin::Bool => quote!(bool),
            Builtin::Null => quote!(::qapi_runtime::Null),
            Builtin::Any => quote!(::serde_json::Value),
            Builtin::QType => quote!(::qapi_runtime::QType),
        }
    }

    pub fn json_kind(&self, ty: &TypeRef) -> JsonKind {
        match ty {
            TypeRef::Builtin(b) => match b.json_type() {
                "string" => JsonKind::String,
                "int" | "number" => JsonKind::Number,
                "boolean" => JsonKind::Bool,
                "null" => JsonKind::Null,
                _ => JsonKind::Any,
            },
            TypeRef::Array(_) => JsonKind::Array,
            TypeRef::Named(n) => match self.entity(n) {
                Some(Entity::Enum(_)) => JsonKind::String,
                Some(Entity::Struct(_)) | Some(Entity::Union(_)) => JsonKind::Object,
                _ => JsonKind::Any,
            },
        }
    }
}

/// Every named type reachable from a command's `returns` or an event's `data`.
fn output_types<'a>(schema: &'a Schema, index: &HashMap<&'a str, usize>) -> HashSet<&'a str> {
    fn named(ty: &TypeRef) -> Option<&str> {
        match ty {
            TypeRef::Named(n) => Some(n),
            TypeRef::Array(inner) => named(inner),
            TypeRef::Builtin(_) => None,
        }
    }
    let mut stack: Vec<&'a str> = Vec::new();
    for entity in &schema.entities {
        match entity {
            Entity::Command(c) => stack.extend(c.returns.as_ref().and_then(named)),
            Entity::Event(e) => match &e.data {
                Some(qapi_model::ArgType::Named(n)) => stack.push(n),
                Some(qapi_model::ArgType::Inline(members)) => {
                    stack.extend(members.iter().filter_map(|m| named(&m.ty)))
                }
                None => {}
            },
            _ => {}
        }
    }
    let mut seen = HashSet::new();
    while let Some(name) = stack.pop() {
        if !seen.insert(name) {
            continue;
        }
        match index.get(name).map(|&i| &schema.entities[i]) {
            Some(Entity::Struct(s)) => {
                stack.extend(
                    all_members(schema, index, &s.common.name)
                        .iter()
                        .filter_map(|m| named(&m.ty)),
                );
            }
            Some(Entity::Union(u)) => {
                let base: Vec<&Member> = match &u.base {
                    UnionBase::Named(n) => all_members(schema, index, n),
                    UnionBase::Inline(m) => m.iter().collect(),
                };
                stack.extend(base.iter().filter_map(|m| named(&m.ty)));
                stack.extend(u.branches.iter().map(|b| b.ty.as_str()));
            }
            Some(Entity::Alternate(a)) => {
                stack.extend(a.alternatives.iter().filter_map(|alt| named(&alt.ty)));
            }
            _ => {}
        }
    }
    seen
}

/// [`Schema::all_members`] through an index instead of a search.
fn all_members<'a>(
    schema: &'a Schema,
    index: &HashMap<&str, usize>,
    struct_name: &str,
) -> Vec<&'a Member> {
    let mut chain = Vec::new();
    let mut cur = Some(struct_name);
    while let Some(name) = cur.take() {
        if let Some(Entity::Struct(s)) = index.get(name).map(|&i| &schema.entities[i]) {
            // A checked schema has no base cycle; the bound keeps a bad one finite.
            if chain.len() <= schema.entities.len() {
                chain.push(s);
                cur = s.base.as_deref();
            }
        }
    }
    chain.iter().rev().flat_map(|s| s.members.iter()).collect()
}

/// `CONFIG_A and (CONFIG_B or not CONFIG_C)`.
pub fn ifcond_text(cond: &IfCond) -> String {
    match cond {
        IfCond::Name(n) => n.clone(),
        IfCond::All(v) => join_cond(v, " and "),
        IfCond::Any(v) => join_cond(v, " or "),
        IfCond::Not(c) => format!("not {}", ifcond_text(c)),
    }
}

fn join_cond(v: &[IfCond], sep: &str) -> String {
    let parts: Vec<String> = v
        .iter()
        .map(|c| match c {
            IfCond::Name(_) | IfCond::Not(_) => ifcond_text(c),
            _ => format!("({})", ifcond_text(c)),
        })
        .collect();
    parts.join(sep)
}

/// Schema doc references (`@name`) as inline code (`` `name` ``).
pub fn code_references(text: &str) -> String {
    if !text.contains('@') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.char_indices().peekable();
    let mut prev: Option<char> = None;
    while let Some((_, c)) = chars.next() {
        let starts_ref = c == '@'
            && !prev.is_some_and(|p| p.is_alphanumeric() || p == '`')
            && chars.peek().is_some_and(|(_, n)| n.is_ascii_alphanumeric());
        if starts_ref {
            let mut name = String::new();
            while let Some(&(_, n)) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '-' || n == '_' {
                    name.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            // A trailing `-` belongs to the sentence, not the name.
            let trailing = name.len() - name.trim_end_matches('-').len();
            let name = name.trim_end_matches('-').to_string();
            out.push('`');
            out.push_str(&name);
            out.push('`');
            out.push_str(&"-".repeat(trailing));
            prev = Some('`');
        } else {
            out.push(c);
            prev = Some(c);
        }
    }
    out
}

/// Rustdoc builder: paragraphs in order, rendered as one `#[doc]` per line.
#[derive(Default)]
pub struct DocText {
    paragraphs: Vec<String>,
}

impl DocText {
    pub fn push(&mut self, text: impl AsRef<str>) {
        let text = text.as_ref().trim_end();
        if !text.trim_start().is_empty() {
            self.paragraphs.push(code_references(text));
        }
    }
}

/// One `#[doc]` attribute per line (`///` lines once printed), an empty one between two
/// paragraphs; written straight into the stream being built. While [`DocBlocks`] collects,
/// a block of several lines is one placeholder attribute instead (see there).
impl ToTokens for DocText {
    fn to_tokens(&self, out: &mut TokenStream) {
        let mut lines: Vec<&str> = Vec::new();
        for (i, p) in self.paragraphs.iter().enumerate() {
            if i > 0 {
                lines.push("");
            }
            lines.extend(p.lines().map(str::trim_end));
        }
        if lines.len() > 1
            && let Some(placeholder) = DocBlocks::placeholder(&lines)
        {
            doc_attr(out, placeholder);
            return;
        }
        let mut buf = String::new();
        for line in lines {
            doc_attr(out, doc_literal(&mut buf, line));
        }
    }
}

/// Doc blocks set aside while a piece of a file is emitted, to be spliced into its printed
/// text: syn and prettyplease then see one attribute per block instead of one per line,
/// which was a seventh of generation time. prettyplease prints a doc attribute as `///`
/// and its text, alone on a line at the item's indentation, whatever surrounds it; so
/// printing the placeholder and putting the block's lines in its place, at its
/// indentation, is exactly what printing every line would give (a unit test compares the
/// two on QEMU's schema). Tokens for the macro and the build script are emitted without
/// placeholders.
pub struct DocBlocks;

/// What every placeholder's text starts with (a doc line holding it is emitted as it is).
const PLACEHOLDER: &str = "\u{27e6}qapi-codegen doc block ";

thread_local! {
    static DOC_BLOCKS: std::cell::RefCell<Option<Vec<Vec<String>>>> =
        const { std::cell::RefCell::new(None) };
}

impl DocBlocks {
    /// Runs `emit` with doc blocks set aside; returns its tokens and the blocks, each a
    /// list of line texts as `///` prints them (` text`, or nothing).
    pub fn collect<T>(emit: impl FnOnce() -> T) -> (T, Vec<Vec<String>>) {
        DOC_BLOCKS.with(|b| *b.borrow_mut() = Some(Vec::new()));
        let tokens = emit();
        let blocks = DOC_BLOCKS
            .with(|b| b.borrow_mut().take())
            .unwrap_or_default();
        (tokens, blocks)
    }

    /// The placeholder literal for `lines`, if blocks are being collected and the lines
    /// can be spliced back exactly (no carriage return, no placeholder look-alike).
    fn placeholder(lines: &[&str]) -> Option<proc_macro2::Literal> {
        if lines
            .iter()
            .any(|l| l.contains('\r') || l.contains(PLACEHOLDER))
        {
            return None;
        }
        DOC_BLOCKS.with(|b| {
            let mut b = b.borrow_mut();
            let blocks = b.as_mut()?;
            let text = format!("{PLACEHOLDER}{}\u{27e7}", blocks.len());
            blocks.push(
                lines
                    .iter()
                    .map(|l| {
                        if l.is_empty() {
                            String::new()
                        } else {
                            format!(" {l}")
                        }
                    })
                    .collect(),
            );
            format!("r\"{text}\"").parse().ok()
        })
    }

    /// `printed` with every placeholder line replaced by its block's lines.
    pub fn splice(printed: &str, blocks: &[Vec<String>]) -> String {
        if blocks.is_empty() {
            return printed.to_string();
        }
        let mut out = String::with_capacity(printed.len() + blocks.len() * 200);
        for line in printed.split_inclusive('\n') {
            let body = line.trim_end_matches('\n');
            let content = body.trim_start();
            let block = content
                .strip_prefix("///")
                .and_then(|rest| rest.strip_prefix(PLACEHOLDER))
                .and_then(|rest| rest.strip_suffix('\u{27e7}'))
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| blocks.get(n));
            match block {
                Some(lines) => {
                    let indent = &body[..body.len() - content.len()];
                    for l in lines {
                        out.push_str(indent);
                        out.push_str("///");
                        out.push_str(l);
                        out.push('\n');
                    }
                }
                None => out.push_str(line),
            }
        }
        out
    }
}

/// `#[doc = text]`, built token by token (it is the most frequent attribute by far).
fn doc_attr(out: &mut TokenStream, text: proc_macro2::Literal) {
    use proc_macro2::{Delimiter, Group, Ident, Punct, Spacing, Span, TokenTree};
    let inner = [
        TokenTree::Ident(Ident::new("doc", Span::call_site())),
        TokenTree::Punct(Punct::new('=', Spacing::Alone)),
        TokenTree::Literal(text),
    ];
    out.extend([
        TokenTree::Punct(Punct::new('#', Spacing::Alone)),
        TokenTree::Group(Group::new(Delimiter::Bracket, inner.into_iter().collect())),
    ]);
}

/// The literal of one doc line (`text` after a space, as `/// text` reads): a raw string
/// (`r" text"`), which syn and prettyplease take as it is, where a string literal would
/// be escaped here, then checked and unescaped twice by syn and once more by prettyplease
/// (together a fifth of generation time). `buf` is reused between lines.
fn doc_literal(buf: &mut String, text: &str) -> proc_macro2::Literal {
    let space = if text.is_empty() { "" } else { " " };
    if text.contains('\r') {
        return proc_macro2::Literal::string(&format!("{space}{text}"));
    }
    let mut hashes = String::new();
    if text.contains('"') {
        hashes.push('#');
        while text.contains(&format!("\"{hashes}")) {
            hashes.push('#');
        }
    }
    buf.clear();
    buf.push('r');
    buf.push_str(&hashes);
    buf.push('"');
    buf.push_str(space);
    buf.push_str(text);
    buf.push('"');
    buf.push_str(&hashes);
    buf.parse()
        .unwrap_or_else(|_| proc_macro2::Literal::string(&format!("{space}{text}")))
}

/// A token stream interpolated into `quote!` by moving it into place: interpolating a
/// `TokenStream` itself copies every token (each identifier is a new allocation), which
/// was a tenth of generation time.
pub struct Moved(std::cell::Cell<TokenStream>);

impl Moved {
    pub fn new(tokens: TokenStream) -> Self {
        Moved(std::cell::Cell::new(tokens))
    }
}

impl From<TokenStream> for Moved {
    fn from(tokens: TokenStream) -> Self {
        Moved::new(tokens)
    }
}

/// Moves the tokens (a second interpolation would find none: each is interpolated once).
impl ToTokens for Moved {
    fn to_tokens(&self, out: &mut TokenStream) {
        out.extend(self.0.take());
    }
}

/// Rustdoc for a definition: body, tagged sections, features, `if`.
pub fn entity_doc(common: &Common) -> DocText {
    let mut doc = DocText::default();
    if let Some(d) = &common.doc {
        push_doc_body(&mut doc, d);
    }
    push_features_and_if(&mut doc, common);
    doc
}

fn push_doc_body(doc: &mut DocText, d: &Doc) {
    doc.push(&d.body);
    for section in &d.sections {
        match &section.tag {
            None => doc.push(&section.text),
            Some(tag) => {
                let text = section.text.trim();
                if text.contains('\n') || text.starts_with("- ") {
                    doc.push(format!("**{tag}:**\n\n{text}"));
                } else {
                    doc.push(format!("**{tag}:** {text}"));
                }
            }
        }
    }
}

fn push_features_and_if(doc: &mut DocText, common: &Common) {
    if !common.features.is_empty() {
        let mut list = String::from("**Features:**");
        for f in &common.features {
            let text = common
                .doc
                .as_ref()
                .and_then(|d| d.features.iter().find(|(n, _)| *n == f.name))
                .map(|(_, t)| t.trim().replace('\n', " "))
                .unwrap_or_default();
            if text.is_empty() {
                list.push_str(&format!("\n- `{}`", f.name));
            } else {
                list.push_str(&format!("\n- `{}`: {text}", f.name));
            }
        }
        doc.push(list);
    }
    if let Some(cond) = &common.ifcond {
        doc.push(if_note(cond));
    }
}

pub fn if_note(cond: &IfCond) -> String {
    format!(
        "**If:** `{}` (QEMU builds this only under that condition; generated unconditionally here)",
        ifcond_text(cond)
    )
}

/// Rustdoc for a member: its `@name:` text, its features and its `if`.
pub fn member_doc(m: &Member) -> DocText {
    let mut doc = DocText::default();
    if let Some(text) = &m.doc {
        doc.push(text);
    }
    if !m.features.is_empty() {
        let names: Vec<String> = m.features.iter().map(|f| format!("`{}`", f.name)).collect();
        doc.push(format!("**Features:** {}", names.join(", ")));
    }
    if let Some(cond) = &m.ifcond {
        doc.push(if_note(cond));
    }
    doc
}

/// `#[deprecated]` when `deprecated`.
pub fn deprecated_attr(deprecated: bool) -> TokenStream {
    if deprecated {
        quote!(#[deprecated])
    } else {
        TokenStream::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_references_become_inline_code() {
        assert_eq!(
            code_references("see @block-job-finalize; @id: the job"),
            "see `block-job-finalize`; `id`: the job"
        );
    }

    #[test]
    fn at_signs_inside_words_are_kept() {
        assert_eq!(
            code_references("mail jsnow@redhat.com"),
            "mail jsnow@redhat.com"
        );
    }
}
