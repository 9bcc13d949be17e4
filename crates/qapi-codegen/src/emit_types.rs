//! Enums, structs, unions and alternates, each with its serde `Serialize` and
//! its QMP input visitor (`FromQmp`).

use crate::context::{self, Context, DocText, JsonKind};
use crate::layout::{self, AttrOn, Expr, atom, call, try_call, try_method};
use crate::naming;
use qapi_model::{
    AlternateType, Builtin, Entity, EnumType, Member, StructType, TypeRef, UnionType,
};
use std::fmt::Write as _;

/// `derive` of every enum with wire names.
const ENUM_DERIVE: &str = "\
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    ::serde::Serialize,
    ::serde::Deserialize,
)]
";

/// `derive` of structs, unions and alternates (`Deserialize` comes from `FromQmp`).
const OBJECT_DERIVE: &str = "#[derive(Debug, Clone, PartialEq, ::serde::Serialize)]\n";

/// The `from_qmp` signature, up to its body.
const FROM_QMP_SIGNATURE: &str = "    fn from_qmp(
        value: &::serde_json::Value,
        path: &mut crate::input::QmpPath,
    ) -> ::std::result::Result<Self, crate::error::QmpError> {
";

/// The `read_qmp_members` signature, up to its body.
const READ_MEMBERS_SIGNATURE: &str = "    pub(crate) fn read_qmp_members(
        object: &mut crate::input::QmpObject<'_>,
        path: &mut crate::input::QmpPath,
    ) -> ::std::result::Result<Self, crate::error::QmpError> {
";

/// A blank line before a top-level item that follows another item, as
/// between items in a rustfmt-formatted file.
pub fn item_start(out: &mut String) {
    let body = out.strip_suffix('\n').unwrap_or(out);
    let last = &body[body.rfind('\n').map_or(0, |i| i + 1)..];
    let top_level = !last.is_empty() && !last.starts_with([' ', '}', ')', ']']);
    if last == "}" || last == "};" || (top_level && last.ends_with(';')) {
        out.push('\n');
    }
}

/// The items of one definition: an enum, struct, union or alternate with its
/// impls (nothing for commands and events, which live in their own files).
pub fn emit_entity(out: &mut String, cx: &Context, entity: &Entity) {
    match entity {
        Entity::Enum(e) => emit_enum(out, e),
        Entity::Struct(s) => emit_struct(out, cx, s),
        Entity::Union(u) => emit_union(out, cx, u),
        Entity::Alternate(a) => emit_alternate(out, cx, a),
        Entity::Command(_) | Entity::Event(_) => {}
    }
}

/// What follows the definitions in `types.rs`: `Deserialize` through
/// `FromQmp` for every struct, union and alternate.
pub fn emit_tail(out: &mut String, cx: &Context) {
    let via_from_qmp: Vec<String> = cx
        .schema
        .entities
        .iter()
        .filter_map(|entity| match entity {
            Entity::Struct(_) | Entity::Union(_) | Entity::Alternate(_) => {
                Some(naming::type_ident(entity.name()))
            }
            Entity::Enum(_) | Entity::Command(_) | Entity::Event(_) => None,
        })
        .collect();
    deserialize_via_from_qmp(out, via_from_qmp);
}

/// `crate::deserialize_via_from_qmp!(A, B, ...);` (nothing for no types).
pub fn deserialize_via_from_qmp(out: &mut String, types: Vec<String>) {
    if types.is_empty() {
        return;
    }
    item_start(out);
    let args = types.into_iter().map(atom).collect();
    layout::stmt(out, 0, &call("crate::deserialize_via_from_qmp!", args), ";");
}

/// `#[serde(rename = "wire")]` on a field or variant when serde would not derive `wire` from `ident`.
fn rename_attr(out: &mut String, on: AttrOn, ident: &str, wire: &str) {
    if naming::serde_name(ident) != wire {
        layout::attribute(out, 4, on, "serde", "rename", wire);
    }
}

/// `impl crate::input::FromQmp for name` with `body` (at indentation 8).
fn from_qmp_impl(out: &mut String, name: &str, body: &str) {
    item_start(out);
    layout::impl_header(out, "crate::input::FromQmp", name);
    out.push_str(FROM_QMP_SIGNATURE);
    out.push_str(body);
    out.push_str("    }\n}\n");
}

fn emit_enum(out: &mut String, e: &EnumType) {
    let name = naming::type_ident(&e.common.name);
    let type_name = &e.common.name;
    let variants = naming::dedupe(
        e.values
            .iter()
            .map(|v| naming::variant_ident(&v.name))
            .collect(),
    );
    item_start(out);
    context::entity_doc(&e.common).write(out, 0);
    context::deprecated_attr(out, 0, e.common.is_deprecated());
    out.push_str(ENUM_DERIVE);
    let _ = writeln!(out, "pub enum {name} {{");
    for (v, id) in e.values.iter().zip(&variants) {
        let mut d = DocText::default();
        if let Some(text) = &v.doc {
            d.push(text);
        }
        if let Some(cond) = &v.ifcond {
            d.push(context::if_note(cond));
        }
        d.write(out, 4);
        let deprecated = v.features.iter().any(|f| f.name == "deprecated");
        context::deprecated_attr(out, 4, deprecated);
        rename_attr(out, AttrOn::Other, id, &v.name);
        let _ = writeln!(out, "    {id},");
    }
    layout::close_block(out);

    item_start(out);
    let _ = writeln!(out, "impl {name} {{");
    out.push_str("    /// Every value, in schema order.\n");
    let all: Vec<String> = variants.iter().map(|v| format!("Self::{v}")).collect();
    layout::array(out, 4, "pub const ALL: &'static [Self] = &", &all, ";");
    out.push_str("    /// The wire name.\n    pub fn as_str(self) -> &'static str {\n");
    if variants.is_empty() {
        out.push_str("        match self {}\n");
    } else {
        out.push_str("        match self {\n");
        for (v, id) in e.values.iter().zip(&variants) {
            layout::arm(
                out,
                12,
                &format!("Self::{id}"),
                &atom(format!("\"{}\"", v.name)),
            );
        }
        out.push_str("        }\n");
    }
    out.push_str("    }\n}\n");

    item_start(out);
    layout::impl_header(out, "::std::fmt::Display", &name);
    out.push_str(
        "    fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
        f.write_str(self.as_str())
    }
}
",
    );

    item_start(out);
    layout::impl_header(out, "::std::str::FromStr", &name);
    out.push_str(
        "    type Err = crate::input::UnknownEnumValue;
    fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
        match s {
",
    );
    for (v, id) in e.values.iter().zip(&variants) {
        let ok = call(
            "::std::result::Result::Ok",
            vec![atom(format!("Self::{id}"))],
        );
        layout::arm(out, 12, &format!("\"{}\"", v.name), &ok);
    }
    let unknown = Expr::Struct {
        head: "crate::input::UnknownEnumValue".into(),
        fields: vec![
            ("type_name".into(), Some(atom(format!("\"{type_name}\"")))),
            ("value".into(), Some(atom("s.to_string()"))),
        ],
    };
    layout::arm(
        out,
        12,
        "_",
        &call("::std::result::Result::Err", vec![unknown]),
    );
    out.push_str("        }\n    }\n}\n");

    from_qmp_impl(
        out,
        &name,
        "        crate::input::enum_from_qmp(value, path)\n",
    );
}

/// One field of a generated object.
pub struct Field<'m> {
    pub ident: String,
    pub member: &'m Member,
    /// The Rust type of the field (without the `Option` of optional members).
    pub ty: String,
}

/// The fields for `members` inside the type named `container`.
pub fn fields<'m>(cx: &Context, container: Option<&str>, members: &[&'m Member]) -> Vec<Field<'m>> {
    let idents = naming::dedupe(
        members
            .iter()
            .map(|m| naming::field_ident(&m.name))
            .collect(),
    );
    members
        .iter()
        .zip(idents)
        .map(|(m, ident)| Field {
            ty: cx.rust_type(container, &m.ty),
            ident,
            member: m,
        })
        .collect()
}

/// The declarations of `fields`, at indentation 4.
fn write_field_decls(out: &mut String, fields: &[Field]) {
    for f in fields {
        let m = f.member;
        context::member_doc(m).write(out, 4);
        let deprecated = m.features.iter().any(|f| f.name == "deprecated");
        context::deprecated_attr(out, 4, deprecated);
        rename_attr(out, AttrOn::Field, &f.ident, &m.name);
        if m.optional {
            out.push_str(
                "    #[serde(skip_serializing_if = \"::std::option::Option::is_none\")]\n",
            );
            let ty = format!("::std::option::Option<{}>", f.ty);
            layout::field_decl(out, 4, &format!("pub {}", f.ident), &ty);
        } else {
            layout::field_decl(out, 4, &format!("pub {}", f.ident), &f.ty);
        }
    }
}

/// The expression reading one member from `object`.
pub fn read_member(m: &Member) -> Expr {
    let method = if m.optional { ".optional" } else { ".required" };
    try_method(
        "object",
        method,
        vec![atom(format!("\"{}\"", m.name)), atom("path")],
    )
}

/// Parameters and field initialisers of `new`: mandatory members as
/// parameters (strings as `impl Into<String>`), optional ones `None`.
fn constructor_parts(fields: &[Field]) -> (Vec<String>, Vec<(String, Option<Expr>)>) {
    let mut params = Vec::new();
    let mut values = Vec::new();
    for f in fields {
        let id = &f.ident;
        if f.member.optional {
            values.push((id.clone(), Some(atom("::std::option::Option::None"))));
        } else if f.member.ty == TypeRef::Builtin(Builtin::Str) {
            params.push(format!(
                "{id}: impl ::std::convert::Into<::std::string::String>"
            ));
            values.push((
                id.clone(),
                Some(layout::method(id.clone(), ".into", Vec::new())),
            ));
        } else {
            params.push(format!("{id}: {}", f.ty));
            values.push((id.clone(), None));
        }
    }
    (params, values)
}

/// `Self { fields }` as the last line(s) of a body at indentation 8.
fn self_literal<T: Into<layout::Text>>(fields: Vec<(T, Option<Expr>)>) -> Expr {
    Expr::Struct {
        head: "Self".into(),
        fields: fields.into_iter().map(|(n, v)| (n.into(), v)).collect(),
    }
}

/// A plain object type: struct, command arguments, event data.
pub fn emit_object(
    out: &mut String,
    cx: &Context,
    name: &str,
    container: Option<&str>,
    members: &[&Member],
    doc: &DocText,
    deprecated: bool,
) {
    let fields = fields(cx, container, members);
    item_start(out);
    doc.write(out, 0);
    context::deprecated_attr(out, 0, deprecated);
    out.push_str(OBJECT_DERIVE);
    let _ = writeln!(out, "pub struct {name} {{");
    write_field_decls(out, &fields);
    layout::close_block(out);

    item_start(out);
    let _ = writeln!(out, "impl {name} {{");
    out.push_str(
        "    /// A value with the mandatory members given and every optional member absent.\n",
    );
    let (params, values) = constructor_parts(&fields);
    layout::signature(out, 4, "pub fn new", &params, " -> Self {");
    layout::stmt(out, 8, &self_literal(values), "");
    out.push_str("    }\n    /// Reads this type's members from an object being visited.\n");
    out.push_str(READ_MEMBERS_SIGNATURE);
    let inits = fields
        .iter()
        .map(|f| (f.ident.clone(), Some(read_member(f.member))))
        .collect();
    let ok = call("::std::result::Result::Ok", vec![self_literal(inits)]);
    layout::stmt(out, 8, &ok, "");
    out.push_str("    }\n}\n");

    from_qmp_impl(
        out,
        name,
        "        crate::input::read_object(value, path, Self::read_qmp_members)\n",
    );
}

fn emit_struct(out: &mut String, cx: &Context, s: &StructType) {
    let name = naming::type_ident(&s.common.name);
    let mut doc = context::entity_doc(&s.common);
    if let Some(base) = &s.base {
        doc.push(format!(
            "Includes the members of [`{}`] (its base).",
            naming::type_ident(base)
        ));
    }
    let members = cx.all_members(&s.common.name);
    emit_object(
        out,
        cx,
        &name,
        Some(&s.common.name),
        &members,
        &doc,
        s.common.is_deprecated(),
    );
}

/// The field holding the branch, renamed if a base member already took `branch`.
fn branch_field(fields: &[Field]) -> String {
    let mut text = String::from("branch");
    while fields.iter().any(|f| f.ident == text) {
        text.push('_');
    }
    naming::ident(&text)
}

fn emit_union(out: &mut String, cx: &Context, u: &UnionType) {
    let union_name = &u.common.name;
    let name = naming::type_ident(union_name);
    let branch_name = format!("{name}Branch");
    let disc_name = naming::type_ident(&u.discriminator_enum);
    let mut doc = context::entity_doc(&u.common);
    doc.push(format!(
        "The members of the branch selected by `{}` are in [`{branch_name}`], flattened into the same JSON object.",
        u.discriminator
    ));

    let base_members = cx.union_base_members(u);
    let non_disc: Vec<&Member> = base_members
        .iter()
        .copied()
        .filter(|m| m.name != u.discriminator)
        .collect();
    let fields = fields(cx, Some(union_name), &non_disc);
    let branch_field = branch_field(&fields);

    item_start(out);
    doc.write(out, 0);
    context::deprecated_attr(out, 0, u.common.is_deprecated());
    out.push_str(OBJECT_DERIVE);
    let _ = writeln!(out, "pub struct {name} {{");
    write_field_decls(out, &fields);
    let _ = writeln!(
        out,
        "    #[serde(flatten)]\n    pub {branch_field}: {branch_name},\n}}"
    );

    let (values, value_docs): (Vec<String>, Vec<Option<String>>) =
        match cx.entity(&u.discriminator_enum) {
            Some(Entity::Enum(e)) => e
                .values
                .iter()
                .map(|v| (v.name.clone(), v.doc.clone()))
                .unzip(),
            _ => u.branches.iter().map(|b| (b.name.clone(), None)).unzip(),
        };
    let variants = naming::dedupe(values.iter().map(|v| naming::variant_ident(v)).collect());
    let tag = &u.discriminator;

    item_start(out);
    let _ = writeln!(
        out,
        "/// The branch of [`{name}`] chosen by its discriminator `{tag}` (serialised as that member)."
    );
    out.push_str(OBJECT_DERIVE);
    layout::attribute(out, 0, AttrOn::Other, "serde", "tag", tag);
    let _ = writeln!(out, "pub enum {branch_name} {{");
    let mut read_arms = Vec::new();
    let mut kind_arms = Vec::new();
    for ((value, value_doc), id) in values.iter().zip(&value_docs).zip(&variants) {
        let mut d = DocText::default();
        if let Some(text) = value_doc {
            d.push(text);
        }
        match u.branches.iter().find(|b| b.name == *value) {
            Some(b) => {
                let ty_ident = naming::type_ident(&b.ty);
                let boxed = cx.needs_box(Some(union_name), &b.ty);
                if let Some(cond) = &b.ifcond {
                    d.push(context::if_note(cond));
                }
                d.write(out, 4);
                rename_attr(out, AttrOn::Other, id, value);
                if boxed {
                    let ty = format!("::std::boxed::Box<{ty_ident}>");
                    layout::tuple_variant(out, 4, id, &ty);
                } else {
                    layout::tuple_variant(out, 4, id, &ty_ident);
                }
                let read = try_call(
                    format!("{ty_ident}::read_qmp_members"),
                    vec![atom("object"), atom("path")],
                );
                let read = if boxed {
                    call("::std::boxed::Box::new", vec![read])
                } else {
                    read
                };
                read_arms.push((
                    format!("{disc_name}::{id}"),
                    call(format!("{branch_name}::{id}"), vec![read]),
                ));
                kind_arms.push((format!("Self::{id}(_)"), format!("{disc_name}::{id}")));
            }
            None => {
                d.write(out, 4);
                rename_attr(out, AttrOn::Other, id, value);
                let _ = writeln!(out, "    {id},");
                read_arms.push((
                    format!("{disc_name}::{id}"),
                    atom(format!("{branch_name}::{id}")),
                ));
                kind_arms.push((format!("Self::{id}"), format!("{disc_name}::{id}")));
            }
        }
    }
    layout::close_block(out);

    item_start(out);
    let _ = writeln!(out, "impl {branch_name} {{");
    out.push_str("    /// The discriminator value selecting this branch.\n");
    layout::signature(
        out,
        4,
        "pub fn kind",
        &["&self".into()],
        &format!(" -> {disc_name} {{"),
    );
    if kind_arms.is_empty() {
        out.push_str("        match *self {}\n");
    } else {
        out.push_str("        match self {\n");
        for (pattern, value) in kind_arms {
            layout::arm(out, 12, &pattern, &atom(value));
        }
        out.push_str("        }\n");
    }
    out.push_str("    }\n}\n");

    item_start(out);
    let _ = writeln!(out, "impl {name} {{");
    out.push_str(
        "    /// A value with the mandatory base members and the branch given,
    /// every optional base member absent.
",
    );
    let (mut params, mut values) = constructor_parts(&fields);
    params.push(format!("{branch_field}: {branch_name}"));
    values.push((branch_field.clone(), None));
    layout::signature(out, 4, "pub fn new", &params, " -> Self {");
    layout::stmt(out, 8, &self_literal(values), "");
    out.push_str("    }\n    /// Reads this union's members from an object being visited.\n");
    out.push_str(READ_MEMBERS_SIGNATURE);
    // Reading: base members in wire order (the discriminator among them), then the branch.
    let mut inits = Vec::new();
    let mut field_iter = fields.iter();
    for (i, m) in base_members.iter().enumerate() {
        if m.name == u.discriminator {
            let lhs = format!("let kind: {disc_name} =");
            let read = try_method(
                "object",
                ".required",
                vec![atom(format!("\"{}\"", m.name)), atom("path")],
            );
            layout::rhs_line(out, 8, &lhs, &read, ";");
        } else {
            let local = format!("member_{i}");
            let lhs = format!("let {local} =");
            layout::rhs_line(out, 8, &lhs, &read_member(m), ";");
            if let Some(f) = field_iter.next() {
                inits.push((f.ident.clone(), Some(atom(local))));
            }
        }
    }
    if read_arms.is_empty() {
        let _ = writeln!(out, "        let {branch_field} = match kind {{}};");
    } else {
        let _ = writeln!(out, "        let {branch_field} = match kind {{");
        for (pattern, body) in &read_arms {
            layout::arm(out, 12, pattern, body);
        }
        out.push_str("        };\n");
    }
    inits.push((branch_field, None));
    let ok = call("::std::result::Result::Ok", vec![self_literal(inits)]);
    layout::stmt(out, 8, &ok, "");
    out.push_str("    }\n}\n");

    from_qmp_impl(
        out,
        &name,
        "        crate::input::read_object(value, path, Self::read_qmp_members)\n",
    );
}

fn emit_alternate(out: &mut String, cx: &Context, a: &AlternateType) {
    let alt_name = &a.common.name;
    let name = naming::type_ident(alt_name);
    let mut doc = context::entity_doc(&a.common);
    doc.push("Chosen by the JSON type of the value.");
    let variants = naming::dedupe(
        a.alternatives
            .iter()
            .map(|alt| naming::variant_ident(&alt.name))
            .collect(),
    );
    item_start(out);
    doc.write(out, 0);
    context::deprecated_attr(out, 0, a.common.is_deprecated());
    out.push_str(OBJECT_DERIVE);
    let _ = writeln!(out, "#[serde(untagged)]\npub enum {name} {{");
    let mut arms = Vec::new();
    let mut any_arm = None;
    for (alt, id) in a.alternatives.iter().zip(&variants) {
        let ty = cx.rust_type(Some(alt_name), &alt.ty);
        let mut d = DocText::default();
        if let Some(text) = &alt.doc {
            d.push(text);
        }
        if let Some(cond) = &alt.ifcond {
            d.push(context::if_note(cond));
        }
        d.write(out, 4);
        layout::tuple_variant(out, 4, id, &ty);
        let read = call(
            format!("Self::{id}"),
            vec![try_call(
                "crate::input::FromQmp::from_qmp",
                vec![atom("value"), atom("path")],
            )],
        );
        let pattern = match cx.json_kind(&alt.ty) {
            JsonKind::Object => "::serde_json::Value::Object(_)",
            JsonKind::Array => "::serde_json::Value::Array(_)",
            JsonKind::String => "::serde_json::Value::String(_)",
            JsonKind::Number => "::serde_json::Value::Number(_)",
            JsonKind::Bool => "::serde_json::Value::Bool(_)",
            JsonKind::Null => "::serde_json::Value::Null",
            JsonKind::Any => {
                any_arm = Some(read);
                continue;
            }
        };
        arms.push((pattern, read));
    }
    layout::close_block(out);

    let mut body = String::from("        ::std::result::Result::Ok(match value {\n");
    for (pattern, read) in &arms {
        layout::arm(&mut body, 12, pattern, read);
    }
    match any_arm {
        Some(read) => layout::arm(&mut body, 12, "_", &read),
        None => layout::return_arm(
            &mut body,
            12,
            "_",
            &call(
                "::std::result::Result::Err",
                vec![layout::method(
                    "path",
                    ".invalid_alternate",
                    vec![atom(format!("\"{alt_name}\""))],
                )],
            ),
        ),
    }
    body.push_str("        })\n");
    from_qmp_impl(out, &name, &body);
}
