//! Rust source written directly as text, laid out the way `rustfmt` (default
//! configuration, edition 2024) lays it out, so the generated files need no
//! formatter pass and `cargo fmt --check` leaves them alone.
//!
//! Only the shapes the generator emits are covered: item skeletons are fixed
//! text; what varies with the length of schema names goes through the few
//! rules below, each one a rule of rustfmt:
//!
//! - a line is at most [`MAX_WIDTH`] columns; what fits stays on one line;
//! - a call with several arguments stays on one line only if its arguments
//!   take at most [`FN_CALL_WIDTH`] columns, else one argument per line; a
//!   call with one argument that is itself a call or a struct literal keeps
//!   it on the same line and breaks inside it ("overflow");
//! - a struct literal stays on one line only if its fields take at most
//!   [`STRUCT_LIT_WIDTH`] columns;
//! - an array literal stays on one line only if its elements take at most
//!   [`ARRAY_WIDTH`] columns;
//! - the right-hand side of `let`/a field that does not fit beside its
//!   left-hand side goes on the next line, one level deeper, when it fits
//!   there on one line; a match arm's body likewise, in a block;
//! - function signatures that do not fit put one parameter per line.
//!
//! `tests/rustfmt_stable.rs` checks the result against rustfmt itself for
//! QEMU's complete schema and for names of every length.

use std::borrow::Cow;
use std::fmt::Write as _;

pub const MAX_WIDTH: usize = 100;
pub const FN_CALL_WIDTH: usize = 60;
pub const STRUCT_LIT_WIDTH: usize = 18;
pub const ARRAY_WIDTH: usize = 60;
pub const INDENT: usize = 4;

/// Text of an expression: most of it is fixed (`path`, `::std::result::Result::Ok`),
/// and borrowed rather than copied.
pub type Text = Cow<'static, str>;

/// An expression whose layout depends on where it lands.
#[derive(Debug, Clone)]
pub enum Expr {
    /// Text that is never broken.
    Atom(Text),
    /// `head(args)tail`, `tail` being `?` or nothing.
    Call {
        head: Text,
        args: Vec<Expr>,
        tail: &'static str,
    },
    /// `receiver.method(args)tail`: a method call on a local, a chain of one
    /// link, which rustfmt breaks before the `.` (`call` holds `.method(...)`).
    Method { receiver: Text, call: Box<Expr> },
    /// `head { name: value, shorthand }`.
    Struct {
        head: Text,
        fields: Vec<(Text, Option<Expr>)>,
    },
}

pub fn atom(text: impl Into<Text>) -> Expr {
    Expr::Atom(text.into())
}

pub fn call(head: impl Into<Text>, args: Vec<Expr>) -> Expr {
    Expr::Call {
        head: head.into(),
        args,
        tail: "",
    }
}

pub fn try_call(head: impl Into<Text>, args: Vec<Expr>) -> Expr {
    Expr::Call {
        head: head.into(),
        args,
        tail: "?",
    }
}

/// `receiver.method(args)`; `method` starts with its `.` (`".into"`).
pub fn method(receiver: impl Into<Text>, method: impl Into<Text>, args: Vec<Expr>) -> Expr {
    Expr::Method {
        receiver: receiver.into(),
        call: Box::new(call(method, args)),
    }
}

/// `receiver.method(args)?`; `method` starts with its `.`.
pub fn try_method(receiver: impl Into<Text>, method: impl Into<Text>, args: Vec<Expr>) -> Expr {
    Expr::Method {
        receiver: receiver.into(),
        call: Box::new(try_call(method, args)),
    }
}

impl Expr {
    /// The one-line form.
    pub fn flat(&self) -> String {
        let mut s = String::new();
        self.write_flat(&mut s);
        s
    }

    fn write_flat(&self, s: &mut String) {
        match self {
            Expr::Atom(t) => s.push_str(t),
            Expr::Call { head, args, tail } => {
                s.push_str(head);
                s.push('(');
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    a.write_flat(s);
                }
                s.push(')');
                s.push_str(tail);
            }
            Expr::Method { receiver, call } => {
                s.push_str(receiver);
                call.write_flat(s);
            }
            Expr::Struct { head, fields } => {
                s.push_str(head);
                if fields.is_empty() {
                    s.push_str(" {}");
                    return;
                }
                s.push_str(" { ");
                write_fields_flat(fields, s);
                s.push_str(" }");
            }
        }
    }

    /// The length of the one-line form, without building it.
    fn flat_len(&self) -> usize {
        match self {
            Expr::Atom(t) => t.len(),
            Expr::Call { head, args, tail } => head.len() + 2 + tail.len() + list_width(args),
            Expr::Method { receiver, call } => receiver.len() + call.flat_len(),
            Expr::Struct { head, fields } if fields.is_empty() => head.len() + 3,
            Expr::Struct { head, fields } => head.len() + 6 + fields_width(fields),
        }
    }

    /// A call of a function (not a method), which rustfmt gives at most
    /// [`FN_CALL_WIDTH`] columns when it is the only argument of another call.
    fn is_nested_call(&self) -> bool {
        matches!(self, Expr::Call { .. })
    }

    /// Whether rustfmt's width heuristics allow the one-line form at all.
    fn flat_allowed(&self) -> bool {
        match self {
            Expr::Atom(_) => true,
            Expr::Call { args, .. } => {
                if !args.iter().all(Expr::flat_allowed) {
                    return false;
                }
                match args.as_slice() {
                    [] => true,
                    [only] if only.is_nested_call() => only.flat_len() <= FN_CALL_WIDTH,
                    [_] => true,
                    _ => list_width(args) <= FN_CALL_WIDTH,
                }
            }
            Expr::Method { call, .. } => call.flat_allowed(),
            Expr::Struct { fields, .. } => {
                fields_width(fields) <= STRUCT_LIT_WIDTH
                    && fields
                        .iter()
                        .all(|(_, v)| v.as_ref().is_none_or(Expr::flat_allowed))
            }
        }
    }

    /// The one-line form if it is allowed and ends by column `limit`
    /// when started at column `col`.
    fn flat_within(&self, col: usize, limit: usize) -> Option<String> {
        self.fits_flat(col, limit).then(|| self.flat())
    }

    /// Whether the one-line form is allowed and ends by column `limit` when
    /// started at column `col`.
    fn fits_flat(&self, col: usize, limit: usize) -> bool {
        // rustfmt keeps two more columns free for a method chain ending in
        // `?` (measured: such a line ends by column 98).
        let quirk = if self.is_try_chain() { 2 } else { 0 };
        col + self.flat_len() + quirk <= limit && self.flat_allowed()
    }

    /// [`Expr::render_within`] appended to `out`: the one-line form is
    /// written in place, without an intermediate string.
    fn render_into(&self, out: &mut String, indent: usize, col: usize, suffix: &str, limit: usize) {
        if self.fits_flat(col, limit.saturating_sub(suffix.len())) {
            self.write_flat(out);
            out.push_str(suffix);
        } else {
            out.push_str(&self.render_within(indent, col, suffix, limit));
        }
    }

    /// The one-line `.method(args)?` of a chain, if allowed.
    fn link_flat(&self) -> Option<String> {
        match self {
            Expr::Method { call, .. } if call.flat_allowed() => Some(call.flat()),
            _ => None,
        }
    }

    /// A method chain ending in `?`.
    fn is_try_chain(&self) -> bool {
        matches!(self, Expr::Method { call, .. } if matches!(**call, Expr::Call { tail: "?", .. }))
    }

    /// The text of `self` started at column `col` of a line whose
    /// continuation lines are indented by `indent`, followed by `suffix`
    /// (which is included). The first line has no indentation.
    pub fn render(&self, indent: usize, col: usize, suffix: &str) -> String {
        self.render_within(indent, col, suffix, MAX_WIDTH)
    }

    /// [`Expr::render`] with the expression ending by column `limit`.
    fn render_within(&self, indent: usize, col: usize, suffix: &str, limit: usize) -> String {
        if let Some(mut flat) = self.flat_within(col, limit.saturating_sub(suffix.len())) {
            flat.push_str(suffix);
            return flat;
        }
        match self {
            Expr::Atom(t) => format!("{t}{suffix}"),
            Expr::Call { head, args, tail } => {
                let close = format!("){tail}{suffix}");
                let inner_col = col + head.len() + 1;
                if let [only @ (Expr::Call { .. } | Expr::Struct { .. })] = args.as_slice() {
                    let inner_limit = if only.is_nested_call() {
                        MAX_WIDTH.min(inner_col + FN_CALL_WIDTH)
                    } else {
                        MAX_WIDTH
                    };
                    let inner = only.render_within(indent, inner_col, &close, inner_limit);
                    let first = first_line_len(&inner);
                    // The first line must leave room for what closes the call.
                    if inner_col + first + close.len() <= MAX_WIDTH
                        && (!only.is_nested_call() || first <= FN_CALL_WIDTH)
                    {
                        return format!("{head}({inner}");
                    }
                }
                // A method call on a short local as the only argument stays
                // beside the head, its arguments broken, when its link
                // `.method(..)` would not fit on a line of its own.
                if let [only @ Expr::Method { receiver, .. }] = args.as_slice() {
                    let link = only.link_flat().map_or(0, |l| l.len());
                    if receiver.len() <= INDENT && indent + INDENT + link + close.len() > limit {
                        let inner = only.render_within(indent, inner_col, &close, limit);
                        if inner_col + first_line_len(&inner) <= limit {
                            return format!("{head}({inner}");
                        }
                    }
                }
                let mut s = format!("{head}(\n");
                // Macros take no trailing comma.
                let last = if head.ends_with('!') { "" } else { "," };
                if args.len() > 1 && args.iter().all(Expr::is_short_simple) {
                    let items: Vec<&str> = args.iter().map(Expr::atom_text).collect();
                    mixed(&mut s, indent + INDENT, &items, last);
                } else {
                    for (i, a) in args.iter().enumerate() {
                        let sep = if i + 1 == args.len() { last } else { "," };
                        push_indent(&mut s, indent + INDENT);
                        a.render_into(&mut s, indent + INDENT, indent + INDENT, sep, MAX_WIDTH);
                        s.push('\n');
                    }
                }
                push_indent(&mut s, indent);
                s.push_str(&close);
                s
            }
            Expr::Method { receiver, call } => {
                if receiver.len() <= INDENT {
                    let rest = call.render(indent, col + receiver.len(), suffix);
                    return format!("{receiver}{rest}");
                }
                let next = indent + INDENT;
                if let Some(link) = self
                    .link_flat()
                    .filter(|link| next + link.len() + suffix.len() < MAX_WIDTH)
                {
                    let mut s = format!("{receiver}\n");
                    push_indent(&mut s, next);
                    s.push_str(&link);
                    s.push_str(suffix);
                    return s;
                }
                let rest = call.render(indent, col + receiver.len(), suffix);
                // Joined, the first line keeps a column free (two before a
                // `?`), else the link goes on the next line (measured).
                let reserve = 1 + usize::from(self.is_try_chain());
                if col + receiver.len() + first_line_len(&rest) + reserve <= limit {
                    return format!("{receiver}{rest}");
                }
                // The link on its own line, broken (it was too long flat).
                let rest = call.render_within(next, next, suffix, MAX_WIDTH - 1);
                let mut s = format!("{receiver}\n");
                push_indent(&mut s, next);
                s.push_str(&rest);
                s
            }
            Expr::Struct { head, fields } => {
                let mut s = format!("{head} {{\n");
                for (name, value) in fields {
                    push_indent(&mut s, indent + INDENT);
                    match value {
                        None => {
                            s.push_str(name);
                            s.push(',');
                        }
                        Some(v) => field_into(&mut s, indent + INDENT, name, v, ","),
                    }
                    s.push('\n');
                }
                push_indent(&mut s, indent);
                s.push('}');
                s.push_str(suffix);
                s
            }
        }
    }
}

/// [`field`] appended to `out`, a one-line field written in place.
fn field_into(out: &mut String, indent: usize, name: &str, value: &Expr, suffix: &str) {
    let col = indent + name.len() + 2;
    if value.fits_flat(col, MAX_WIDTH - suffix.len()) {
        out.push_str(name);
        out.push_str(": ");
        value.write_flat(out);
        out.push_str(suffix);
    } else {
        out.push_str(&field(indent, name, value, suffix));
    }
}

/// A struct literal field `name: value suffix` at `indent`: the value
/// beside the name, broken there if need be, on the next line only if it
/// cannot start beside the name.
fn field(indent: usize, name: &str, value: &Expr, suffix: &str) -> String {
    let col = indent + name.len() + 2;
    let same_line = value.render(indent, col, suffix);
    // The first line keeps room for the suffix, as if it ended there.
    let reserved = if same_line.contains('\n') {
        suffix.len()
    } else {
        0
    };
    // A string literal counts as fitting wherever it lands (rustfmt's 2024
    // style leaves literals alone, so they never fail a width check).
    let literal = matches!(value, Expr::Atom(t) if t.starts_with('"'));
    if literal || col + first_line_len(&same_line) + reserved <= MAX_WIDTH {
        return format!("{name}: {same_line}");
    }
    let next = indent + INDENT;
    let mut s = format!("{name}:\n");
    push_indent(&mut s, next);
    // On a line of its own the value may leave its comma past the margin
    // (measured).
    s.push_str(&value.render_within(next, next, suffix, MAX_WIDTH + suffix.len()));
    s
}

impl Expr {
    /// An identifier, literal or `&identifier` of at most 10 columns: rustfmt
    /// packs lists of these several to a line.
    fn is_short_simple(&self) -> bool {
        match self {
            Expr::Atom(t) => is_short_simple(t),
            _ => false,
        }
    }

    fn atom_text(&self) -> &str {
        match self {
            Expr::Atom(t) => t,
            _ => "",
        }
    }
}

fn is_short_simple(t: &str) -> bool {
    let bare = t.strip_prefix('&').unwrap_or(t);
    let literal = bare.len() >= 2 && bare.starts_with('"') && bare.ends_with('"');
    t.len() <= 10
        && !bare.is_empty()
        && (literal || bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// `items` packed several to a line at `indent` (rustfmt's "mixed" list
/// layout), separated by commas, `last` after the last one.
fn mixed(s: &mut String, indent: usize, items: &[&str], last: &str) {
    let mut width = 0;
    for (i, item) in items.iter().enumerate() {
        let sep = if i + 1 == items.len() { last } else { "," };
        if width > 0 && width + 1 + item.len() + sep.len() <= MAX_WIDTH {
            s.push(' ');
            width += 1;
        } else {
            if width > 0 {
                s.push('\n');
            }
            push_indent(s, indent);
            width = indent;
        }
        s.push_str(item);
        s.push_str(sep);
        width += item.len() + sep.len();
    }
    s.push('\n');
}

fn write_fields_flat(fields: &[(Text, Option<Expr>)], s: &mut String) {
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(name);
        if let Some(v) = value {
            s.push_str(": ");
            v.write_flat(s);
        }
    }
}

fn list_width(args: &[Expr]) -> usize {
    args.iter().map(Expr::flat_len).sum::<usize>() + 2 * args.len().saturating_sub(1)
}

/// The length of `name: value, shorthand` on one line.
fn fields_width(fields: &[(Text, Option<Expr>)]) -> usize {
    let items: usize = fields
        .iter()
        .map(|(name, value)| name.len() + value.as_ref().map_or(0, |v| 2 + v.flat_len()))
        .sum();
    items + 2 * fields.len().saturating_sub(1)
}

/// The length of the first line of `text`.
pub fn first_line_len(text: &str) -> usize {
    text.find('\n').unwrap_or(text.len())
}

pub fn push_indent(s: &mut String, indent: usize) {
    s.extend(std::iter::repeat_n(' ', indent));
}

/// `lhs value suffix` at `indent` (`lhs` being `let x =` or `name:`), the
/// value beside `lhs` or on the next line as rustfmt chooses. The first
/// line has no indentation; there is no final newline.
fn rhs(indent: usize, lhs: &str, value: &Expr, suffix: &str) -> String {
    let col = indent + lhs.len() + 1;
    if let Some(flat) = value.flat_within(col, MAX_WIDTH - suffix.len()) {
        return format!("{lhs} {flat}{suffix}");
    }
    let next = indent + INDENT;
    let same_line = value.render(indent, col, suffix);
    let next_line = value.render(next, next, suffix);
    // Broken, the first line keeps room for the suffix (measured).
    let reserved = if same_line.contains('\n') {
        suffix.len()
    } else {
        0
    };
    let same_fits = col + first_line_len(&same_line) + reserved <= MAX_WIDTH;
    if same_fits && !prefer_next_line(&same_line, &next_line) {
        return format!("{lhs} {same_line}");
    }
    let mut s = format!("{lhs}\n");
    push_indent(&mut s, next);
    s.push_str(&next_line);
    s
}

/// [`rhs`] as a line of `out` at `indent`, a one-line value written in place.
pub fn rhs_line(out: &mut String, indent: usize, lhs: &str, value: &Expr, suffix: &str) {
    push_indent(out, indent);
    if value.fits_flat(indent + lhs.len() + 1, MAX_WIDTH - suffix.len()) {
        out.push_str(lhs);
        out.push(' ');
        value.write_flat(out);
        out.push_str(suffix);
    } else {
        out.push_str(&rhs(indent, lhs, value, suffix));
    }
    out.push('\n');
}

/// rustfmt's choice between a value beside its left-hand side and on the
/// next line, both already laid out.
fn prefer_next_line(same_line: &str, next_line: &str) -> bool {
    let first_ends = |s: &str, c: char| s[..first_line_len(s)].ends_with(c);
    !next_line.contains('\n')
        || same_line.matches('\n').count() > next_line.matches('\n').count() + 1
        || ['(', '{', '[']
            .iter()
            .any(|&c| first_ends(same_line, c) && !first_ends(next_line, c))
}

/// A match arm `pattern => body,` at `indent`, its body in a block on the
/// next line when it does not fit beside the pattern.
pub fn arm(out: &mut String, indent: usize, pattern: &str, body: &Expr) {
    push_indent(out, indent);
    out.push_str(pattern);
    out.push_str(" =>");
    let col = indent + pattern.len() + 4;
    if body.fits_flat(col, MAX_WIDTH - 1) {
        out.push(' ');
        body.write_flat(out);
        out.push_str(",\n");
        return;
    }
    let next = indent + INDENT;
    let same_line = body.render(indent, col, ",");
    let next_line = body.render(next, next, "");
    // The arm's comma is reserved on the first line too (measured: a body
    // opening beside the pattern ends by column 99).
    let same_fits = col + first_line_len(&same_line) < MAX_WIDTH;
    if same_fits && !prefer_next_line(&same_line, &next_line) {
        out.push(' ');
        out.push_str(&same_line);
        out.push('\n');
        return;
    }
    out.push_str(" {\n");
    push_indent(out, next);
    out.push_str(&next_line);
    out.push('\n');
    push_indent(out, indent);
    out.push_str("}\n");
}

/// A match arm `pattern => { return value; }` at `indent` (always a block,
/// as rustfmt keeps it).
pub fn return_arm(out: &mut String, indent: usize, pattern: &str, value: &Expr) {
    let next = indent + INDENT;
    push_indent(out, indent);
    out.push_str(pattern);
    out.push_str(" => {\n");
    push_indent(out, next);
    out.push_str("return ");
    // rustfmt ends a `return value;` line by column 99 (measured).
    out.push_str(&value.render_within(next, next + 7, ";", MAX_WIDTH - 1));
    out.push('\n');
    push_indent(out, indent);
    out.push_str("}\n");
}

/// `prefix(params)suffix` at `indent`: one line if it fits, else one
/// parameter per line and `)suffix` on a line of its own.
pub fn signature(out: &mut String, indent: usize, prefix: &str, params: &[String], suffix: &str) {
    let one_line = params.join(", ");
    push_indent(out, indent);
    if indent + prefix.len() + one_line.len() + 2 + suffix.len() <= MAX_WIDTH {
        let _ = writeln!(out, "{prefix}({one_line}){suffix}");
        return;
    }
    out.push_str(prefix);
    out.push_str("(\n");
    for p in params {
        generic_lines(out, indent + INDENT, p, ",");
    }
    push_indent(out, indent);
    out.push(')');
    let ret_ty = suffix
        .strip_prefix(" -> ")
        .and_then(|s| s.strip_suffix(" {"))
        .filter(|ty| ty.ends_with('>'));
    match suffix.strip_suffix(" {") {
        // A generic return type too long for `-> ty` to end by the margin
        // (the `) ` before it is not counted, measured) is broken like a
        // parameter's, the brace after its `>`.
        _ if let Some((ty, open)) = ret_ty
            .filter(|ty| indent + "-> ".len() + ty.len() > MAX_WIDTH)
            .and_then(|ty| Some((ty, ty.find('<')?))) =>
        {
            out.push_str(" -> ");
            out.push_str(&ty[..=open]);
            out.push('\n');
            generic_args_lines(out, indent + INDENT, &ty[open + 1..ty.len() - 1]);
            push_indent(out, indent);
            out.push_str("> {\n");
        }
        // The brace goes on a line of its own when the return type leaves
        // less room than rustfmt wants (measured: at 97 columns and more).
        Some(ret) if indent + 1 + suffix.len() > MAX_WIDTH - 4 => {
            out.push_str(ret);
            out.push('\n');
            push_indent(out, indent);
            out.push_str("{\n");
        }
        _ => {
            out.push_str(suffix);
            out.push('\n');
        }
    }
}

/// `prefix[elements]suffix` at `indent`: one line if the elements are
/// narrow enough and it fits, else one element per line.
pub fn array(out: &mut String, indent: usize, prefix: &str, elements: &[String], suffix: &str) {
    let one_line = elements.join(", ");
    push_indent(out, indent);
    if one_line.len() <= ARRAY_WIDTH {
        if indent + prefix.len() + one_line.len() + 2 + suffix.len() <= MAX_WIDTH {
            let _ = writeln!(out, "{prefix}[{one_line}]{suffix}");
            return;
        }
        // `prefix` ends in `= &`: the array goes on the next line if it fits there.
        if let Some(lhs) = prefix.strip_suffix(" &") {
            let next = indent + INDENT;
            if next + one_line.len() + 3 + suffix.len() <= MAX_WIDTH {
                let _ = writeln!(out, "{lhs}");
                push_indent(out, next);
                let _ = writeln!(out, "&[{one_line}]{suffix}");
                return;
            }
        }
    }
    out.push_str(prefix);
    out.push_str("[\n");
    if elements.len() > 1 && elements.iter().all(|e| is_short_simple(e)) {
        let items: Vec<&str> = elements.iter().map(String::as_str).collect();
        mixed(out, indent + INDENT, &items, ",");
        push_indent(out, indent);
        out.push(']');
        out.push_str(suffix);
        out.push('\n');
        return;
    }
    for e in elements {
        push_indent(out, indent + INDENT);
        out.push_str(e);
        out.push_str(",\n");
    }
    push_indent(out, indent);
    out.push(']');
    out.push_str(suffix);
    out.push('\n');
}

/// The `}` closing a block opened at column 0 (`{}` when it stayed empty).
pub fn close_block(out: &mut String) {
    if out.ends_with(" {\n") {
        out.pop();
    }
    out.push_str("}\n");
}

/// A field declaration `lhs: ty,` at `indent`: on one line if it fits, else
/// the type on the next line, else (as rustfmt falls back) the type broken
/// after its first `<` beside the name, or on the next line when even the
/// first line of that does not fit.
pub fn field_decl(out: &mut String, indent: usize, lhs: &str, ty: &str) {
    if indent + lhs.len() + ty.len() + 3 <= MAX_WIDTH {
        push_indent(out, indent);
        let _ = writeln!(out, "{lhs}: {ty},");
    } else if indent + INDENT + ty.len() + ",".len() <= MAX_WIDTH || !ty.ends_with('>') {
        push_indent(out, indent);
        let _ = writeln!(out, "{lhs}:");
        push_indent(out, indent + INDENT);
        let _ = writeln!(out, "{ty},");
    } else if indent + lhs.len() + 2 + ty.find('<').map_or(ty.len(), |open| open + 1) <= MAX_WIDTH {
        generic_lines(out, indent, &format!("{lhs}: {ty}"), ",");
    } else {
        push_indent(out, indent);
        let _ = writeln!(out, "{lhs}:");
        generic_lines(out, indent + INDENT, ty, ",");
    }
}

/// A tuple variant `name(ty),` at `indent`; the type on a line of its own
/// when the line would be too long.
pub fn tuple_variant(out: &mut String, indent: usize, name: &str, ty: &str) {
    push_indent(out, indent);
    out.push_str(name);
    if indent + name.len() + ty.len() + 3 <= MAX_WIDTH {
        out.push('(');
        out.push_str(ty);
        out.push_str("),\n");
        return;
    }
    out.push_str("(\n");
    generic_lines(out, indent + INDENT, ty, ",");
    push_indent(out, indent);
    out.push_str("),\n");
}

/// `text suffix` at `indent`, where `text` ends in a generic type
/// (`name: impl Into<String>`); when too long, the generic arguments go on
/// a line of their own (and so on inward), as rustfmt breaks types.
fn generic_lines(out: &mut String, indent: usize, text: &str, suffix: &str) {
    push_indent(out, indent);
    // rustfmt measures an `impl Trait<..>` type as if without its `impl `
    // (measured: the limits below move by those 5 columns).
    let limit = if text.contains(": impl ") {
        MAX_WIDTH + "impl ".len()
    } else {
        MAX_WIDTH
    };
    // Broken after `<` when the line with its comma passes the margin, and
    // only if the broken first line fits (else rustfmt keeps the long line).
    let split = text.find('<').filter(|&open| {
        text.ends_with('>')
            && indent + text.len() + suffix.len() > limit
            && indent + "<".len() + open <= limit
    });
    match split {
        Some(open) => {
            out.push_str(&text[..=open]);
            out.push('\n');
            generic_args_lines(out, indent + INDENT, &text[open + 1..text.len() - 1]);
            push_indent(out, indent);
            out.push('>');
        }
        None => out.push_str(text),
    }
    out.push_str(suffix);
    out.push('\n');
}

/// The generic arguments `args` (`A, B<C, D>`) one per line at `indent`,
/// each followed by a comma.
fn generic_args_lines(out: &mut String, indent: usize, args: &str) {
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in args.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                generic_lines(out, indent, args[start..i].trim(), ",");
                start = i + 1;
            }
            _ => {}
        }
    }
    generic_lines(out, indent, args[start..].trim(), ",");
}

/// `impl trait_ for ty {` at the top level: `for ty` and the brace on
/// lines of their own when the header does not fit on one.
pub fn impl_header(out: &mut String, trait_: &str, ty: &str) {
    if "impl  for  {".len() + trait_.len() + ty.len() <= MAX_WIDTH {
        let _ = writeln!(out, "impl {trait_} for {ty} {{");
    } else {
        let _ = writeln!(out, "impl {trait_}\n    for {ty}\n{{");
    }
}

/// Where an attribute stands: rustfmt gives one on a struct field a column
/// less than elsewhere (measured).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AttrOn {
    Field,
    Other,
}

/// An attribute `#[name(key = "value")]` at `indent`, its argument on a
/// line of its own when the attribute would not fit.
pub fn attribute(out: &mut String, indent: usize, on: AttrOn, name: &str, key: &str, value: &str) {
    let limit = if on == AttrOn::Field {
        MAX_WIDTH - 1
    } else {
        MAX_WIDTH
    };
    push_indent(out, indent);
    if indent + "#[( = \"\")]".len() + name.len() + key.len() + value.len() <= limit {
        let _ = writeln!(out, "#[{name}({key} = \"{value}\")]");
    } else {
        let _ = writeln!(out, "#[{name}(");
        push_indent(out, indent + INDENT);
        let _ = writeln!(out, "{key} = \"{value}\"");
        push_indent(out, indent);
        out.push_str(")]\n");
    }
}

/// A line of text at `indent`.
pub fn line(out: &mut String, indent: usize, text: &str) {
    push_indent(out, indent);
    out.push_str(text);
    out.push('\n');
}

/// A statement or expression line: `expr suffix` at `indent`.
pub fn stmt(out: &mut String, indent: usize, expr: &Expr, suffix: &str) {
    push_indent(out, indent);
    expr.render_into(out, indent, indent, suffix, MAX_WIDTH);
    out.push('\n');
}
