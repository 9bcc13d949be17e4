//! Enums, structs, unions and alternates, each with its serde `Serialize`, its QMP
//! input visitor (`FromQmp`, through `ReadMembers` for object types) and a
//! `Deserialize` that reads tolerantly (see `qapi_runtime::input`).

use crate::context::{self, Context, DocText, JsonKind, Moved};
use crate::naming::{self, token};
use proc_macro2::{Ident, TokenStream};
use qapi_model::{
    AlternateType, Builtin, Entity, EnumType, IfCond, Member, StructType, TypeRef, UnionType,
};
use quote::{format_ident, quote};

/// The items of one definition: an enum, struct, union or alternate with its
/// impls (nothing for commands and events, which live in their own modules).
pub fn entity(cx: &Context, entity: &Entity) -> TokenStream {
    match entity {
        Entity::Enum(e) => enum_(cx, e),
        Entity::Struct(s) => struct_(cx, s),
        Entity::Union(u) => union(cx, u),
        Entity::Alternate(a) => alternate(cx, a),
        Entity::Command(_) | Entity::Event(_) => TokenStream::new(),
    }
}

/// `impl ReadMembers for name` whose body is `body` (an expression of type `Result<Self>`).
pub fn read_members_impl(name: &Ident, body: TokenStream) -> Moved {
    let body = Moved::new(body);
    Moved::new(quote! {
        impl ::qapi_runtime::ReadMembers for #name {
            fn read_members(
                object: &mut ::qapi_runtime::QmpObject,
            ) -> ::qapi_runtime::Result<Self> {
                #body
            }
        }
    })
}

/// The name of the variant standing for values the schema does not know, after
/// `variants` (`UnknownValue`, unless a value of the schema already took it).
fn unknown_variant(variants: &[String]) -> Ident {
    let mut all = variants.to_vec();
    all.push("UnknownValue".to_string());
    token(&naming::dedupe(all).pop().unwrap_or_default())
}

/// Rustdoc of one enum value, alternative or branch.
fn value_doc(doc: Option<&str>, ifcond: Option<&IfCond>) -> DocText {
    let mut d = DocText::default();
    if let Some(text) = doc {
        d.push(text);
    }
    if let Some(cond) = ifcond {
        d.push(context::if_note(cond));
    }
    d
}

/// The documentation of a type's `UnknownValue`.
fn unknown_doc() -> TokenStream {
    quote! {
        /// A value this schema does not know, read from a newer QEMU's reply or event
        /// (it has no wire name and cannot be sent).
    }
}

fn enum_(cx: &Context, e: &EnumType) -> TokenStream {
    let name = token(&naming::type_ident(&e.common.name));
    let type_name = &e.common.name;
    let variant_names = naming::dedupe(
        e.values
            .iter()
            .map(|v| naming::variant_ident(&v.name))
            .collect(),
    );
    let variants: Vec<Ident> = variant_names.iter().map(|v| token(v)).collect();
    let wires: Vec<&str> = e.values.iter().map(|v| v.name.as_str()).collect();
    let doc = context::entity_doc(&e.common);
    let deprecated = context::deprecated_attr(e.common.is_deprecated());
    let decls = e.values.iter().zip(&variants).map(|(v, id)| {
        let doc = value_doc(v.doc.as_deref(), v.ifcond.as_ref());
        let deprecated =
            context::deprecated_attr(v.features.iter().any(|f| f.name == "deprecated"));
        Moved::from(quote!(#doc #deprecated #id,))
    });
    let (unknown_decl, unknown) = if cx.is_output(type_name) {
        let id = unknown_variant(&variant_names);
        let doc = unknown_doc();
        (quote!(#doc #id,), quote!(#id))
    } else {
        (TokenStream::new(), TokenStream::new())
    };
    quote! {
        #doc
        #deprecated
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum #name {
            #(#decls)*
            #unknown_decl
        }
        ::qapi_runtime::impl_enum!(#name = #type_name { #(#variants(#wires)),* } #unknown);
    }
}

/// One field of a generated object.
pub struct Field<'m> {
    pub ident: String,
    pub member: &'m Member,
    /// The Rust type of the field (without the `Option` of optional members).
    pub ty: TokenStream,
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

/// The declarations of `fields`.
fn field_decls(cx: &Context, fields: &[Field]) -> Moved {
    let option = cx.std_item("Option");
    let decls = fields.iter().map(|f| {
        let m = f.member;
        let doc = context::member_doc(m);
        let deprecated =
            context::deprecated_attr(m.features.iter().any(|f| f.name == "deprecated"));
        let id = token(&f.ident);
        let ty = &f.ty;
        if m.optional {
            quote!(#doc #deprecated pub #id: #option<#ty>,)
        } else {
            quote!(#doc #deprecated pub #id: #ty,)
        }
    });
    let mut out = TokenStream::new();
    out.extend(decls);
    Moved::new(out)
}

/// The expression reading one member from `object`.
fn read_member(m: &Member) -> TokenStream {
    let wire = &m.name;
    if m.optional {
        quote!(object.optional(#wire)?)
    } else {
        quote!(object.required(#wire)?)
    }
}

/// Parameters and field initialisers of `new`: mandatory members as
/// parameters (strings as `impl Into<String>`), optional ones `None`.
fn constructor_parts(cx: &Context, fields: &[Field]) -> (Vec<Moved>, Vec<Moved>) {
    let (into, string) = (cx.std_item("Into"), cx.std_item("String"));
    let mut params = Vec::new();
    let mut values = Vec::new();
    for f in fields {
        let id = token(&f.ident);
        let ty = &f.ty;
        if f.member.optional {
            values.push(quote!(#id: None).into());
        } else if f.member.ty == TypeRef::Builtin(Builtin::Str) {
            params.push(quote!(#id: impl #into<#string>).into());
            values.push(quote!(#id: #id.into()).into());
        } else {
            params.push(quote!(#id: #ty).into());
            values.push(quote!(#id).into());
        }
    }
    (params, values)
}

/// A plain object type: struct, command arguments, event data.
pub fn object(
    cx: &Context,
    name: &str,
    container: Option<&str>,
    members: &[&Member],
    doc: &DocText,
    deprecated: bool,
) -> TokenStream {
    let fields = fields(cx, container, members);
    let name = token(name);
    let deprecated = context::deprecated_attr(deprecated);
    let decls = field_decls(cx, &fields);
    let (params, values) = constructor_parts(cx, &fields);
    let members = fields.iter().map(|f| {
        let id = token(&f.ident);
        let wire = &f.member.name;
        if f.member.optional {
            quote!(optional #id(#wire))
        } else {
            quote!(#id(#wire))
        }
    });
    quote! {
        #doc
        #deprecated
        #[derive(Debug, Clone, PartialEq)]
        pub struct #name {
            #decls
        }
        impl #name {
            /// A value with the mandatory members given and every optional member absent.
            pub fn new(#(#params),*) -> Self {
                Self { #(#values),* }
            }
        }
        ::qapi_runtime::impl_object!(#name { #(#members),* });
    }
}

fn struct_(cx: &Context, s: &StructType) -> TokenStream {
    let name = naming::type_ident(&s.common.name);
    let mut doc = context::entity_doc(&s.common);
    if let Some(base) = &s.base {
        doc.push(format!(
            "Includes the members of [`{}`] (its base).",
            naming::type_ident(base)
        ));
    }
    let members = cx.all_members(&s.common.name);
    object(
        cx,
        &name,
        Some(&s.common.name),
        &members,
        &doc,
        s.common.is_deprecated(),
    )
}

/// The field holding the branch, renamed if a base member already took `branch`.
fn branch_field(fields: &[Field]) -> String {
    let mut text = String::from("branch");
    while fields.iter().any(|f| f.ident == text) {
        text.push('_');
    }
    naming::ident(&text)
}

fn union(cx: &Context, u: &UnionType) -> TokenStream {
    let union_name = &u.common.name;
    let name_text = naming::type_ident(union_name);
    let name = token(&name_text);
    let branch_name_text = format!("{name_text}Branch");
    let branch_name = token(&branch_name_text);
    let disc_name = token(&naming::type_ident(&u.discriminator_enum));
    let mut doc = context::entity_doc(&u.common);
    doc.push(format!(
        "The members of the branch selected by `{}` are in [`{branch_name_text}`], flattened into the same JSON object.",
        u.discriminator
    ));
    let deprecated = context::deprecated_attr(u.common.is_deprecated());

    let base_members = cx.union_base_members(u);
    let non_disc: Vec<&Member> = base_members
        .iter()
        .copied()
        .filter(|m| m.name != u.discriminator)
        .collect();
    let fields = fields(cx, Some(union_name), &non_disc);
    let branch_field = token(&branch_field(&fields));
    let decls = field_decls(cx, &fields);

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

    let mut branch_decls = Vec::new();
    let mut read_arms = Vec::new();
    let mut kind_arms = Vec::new();
    let mut write_arms = Vec::new();
    for ((value, text), id_text) in values.iter().zip(&value_docs).zip(&variants) {
        let id = token(id_text);
        match u.branches.iter().find(|b| b.name == *value) {
            Some(b) => {
                let ty = token(&naming::type_ident(&b.ty));
                let doc = value_doc(text.as_deref(), b.ifcond.as_ref());
                let read = quote!(::qapi_runtime::ReadMembers::read_members(object)?);
                if cx.needs_box(Some(union_name), &b.ty) {
                    let boxed = cx.std_item("Box");
                    branch_decls.push(quote!(#doc #id(#boxed<#ty>),));
                    read_arms.push(quote! {
                        #disc_name::#id => #branch_name::#id(#boxed::new(#read)),
                    });
                } else {
                    branch_decls.push(quote!(#doc #id(#ty),));
                    read_arms.push(quote!(#disc_name::#id => #branch_name::#id(#read),));
                }
                kind_arms.push(quote!(Self::#id(_) => #disc_name::#id,));
                write_arms.push(quote! {
                    Self::#id(data) => ::qapi_runtime::WriteMembers::write_members(data, map),
                });
            }
            None => {
                let doc = value_doc(text.as_deref(), None);
                branch_decls.push(quote!(#doc #id,));
                read_arms.push(quote!(#disc_name::#id => #branch_name::#id,));
                kind_arms.push(quote!(Self::#id => #disc_name::#id,));
                write_arms.push(quote!(Self::#id => Ok(()),));
            }
        }
    }
    // Values the discriminator's enum does not know: a branch of their own if replies
    // or events carry the union, else an error naming the value (the enum is read
    // tolerantly elsewhere, this union only strictly).
    if cx.is_output(&u.discriminator_enum) {
        let disc_unknown = unknown_variant(&variants);
        if cx.is_output(union_name) {
            let doc = unknown_doc();
            branch_decls.push(quote!(#doc #disc_unknown,));
            read_arms.push(quote!(#disc_name::#disc_unknown => #branch_name::#disc_unknown,));
            kind_arms.push(quote!(Self::#disc_unknown => #disc_name::#disc_unknown,));
            write_arms.push(quote! {
                Self::#disc_unknown => Err(::qapi_runtime::output::unknown_branch(#union_name)),
            });
        } else {
            read_arms.push(quote! {
                #disc_name::#disc_unknown => return Err(object.unknown_branch(#tag)),
            });
        }
    }
    let (kind_body, write_branch) = if kind_arms.is_empty() {
        (quote!(match *self {}), quote!(match *self {}))
    } else {
        (
            quote!(match self { #(#kind_arms)* }),
            quote!(match self { #(#write_arms)* }),
        )
    };

    let (mut params, mut values) = constructor_parts(cx, &fields);
    params.push(quote!(#branch_field: #branch_name).into());
    values.push(quote!(#branch_field).into());

    // Reading: base members in wire order (the discriminator among them), then the branch.
    let mut reads = Vec::new();
    let mut inits = Vec::new();
    let mut writes = Vec::new();
    let mut field_iter = fields.iter();
    for (i, m) in base_members.iter().enumerate() {
        let wire = &m.name;
        if m.name == u.discriminator {
            reads.push(quote!(let kind: #disc_name = object.required(#wire)?;));
            writes.push(quote!(map.serialize_entry(#wire, &self.#branch_field.kind())?;));
        } else {
            let local = format_ident!("member_{i}");
            let read = read_member(m);
            reads.push(quote!(let #local = #read;));
            if let Some(f) = field_iter.next() {
                let id = token(&f.ident);
                inits.push(quote!(#id: #local));
                writes.push(if m.optional {
                    quote!(::qapi_runtime::output::write_optional(map, #wire, &self.#id)?;)
                } else {
                    quote!(map.serialize_entry(#wire, &self.#id)?;)
                });
            }
        }
    }
    inits.push(quote!(#branch_field));
    let doc_line = format!(
        " The branch of [`{name_text}`] chosen by its discriminator `{tag}` (serialised as that member)."
    );
    let (branch_decls, read_arms, kind_body) = (
        branch_decls.into_iter().map(Moved::from),
        read_arms.into_iter().map(Moved::from),
        Moved::new(kind_body),
    );
    let read_members = read_members_impl(
        &name,
        quote! {
            #(#reads)*
            let #branch_field = match kind {
                #(#read_arms)*
            };
            Ok(Self { #(#inits),* })
        },
    );
    quote! {
        #doc
        #deprecated
        #[derive(Debug, Clone, PartialEq)]
        pub struct #name {
            #decls
            pub #branch_field: #branch_name,
        }
        #[doc = #doc_line]
        #[derive(Debug, Clone, PartialEq)]
        pub enum #branch_name {
            #(#branch_decls)*
        }
        impl #branch_name {
            /// The discriminator value selecting this branch.
            pub fn kind(&self) -> #disc_name {
                #kind_body
            }
        }
        impl #name {
            /// A value with the mandatory base members and the branch given,
            /// every optional base member absent.
            pub fn new(#(#params),*) -> Self {
                Self { #(#values),* }
            }
        }
        #read_members
        impl ::qapi_runtime::WriteMembers for #name {
            fn write_members<M: ::serde::ser::SerializeMap>(
                &self,
                map: &mut M,
            ) -> ::std::result::Result<(), M::Error> {
                #(#writes)*
                ::qapi_runtime::WriteMembers::write_members(&self.#branch_field, map)
            }
        }
        impl ::qapi_runtime::WriteMembers for #branch_name {
            fn write_members<M: ::serde::ser::SerializeMap>(
                &self,
                map: &mut M,
            ) -> ::std::result::Result<(), M::Error> {
                #write_branch
            }
        }
        ::qapi_runtime::impl_object!(#name);
    }
}

fn alternate(cx: &Context, a: &AlternateType) -> TokenStream {
    let alt_name = &a.common.name;
    let name = token(&naming::type_ident(alt_name));
    let mut doc = context::entity_doc(&a.common);
    doc.push("Chosen by the JSON type of the value.");
    let deprecated = context::deprecated_attr(a.common.is_deprecated());
    let variants = naming::dedupe(
        a.alternatives
            .iter()
            .map(|alt| naming::variant_ident(&alt.name))
            .collect(),
    );
    let mut decls = Vec::new();
    let mut writes = Vec::new();
    let mut arms = Vec::new();
    let mut any_arm = None;
    for (alt, id) in a.alternatives.iter().zip(&variants) {
        let id = token(id);
        let ty = cx.rust_type(Some(alt_name), &alt.ty);
        let d = value_doc(alt.doc.as_deref(), alt.ifcond.as_ref());
        decls.push(quote!(#d #id(#ty),));
        writes.push(quote!(Self::#id(value) => ::serde::Serialize::serialize(value, serializer),));
        let read = quote!(Self::#id(::qapi_runtime::FromQmp::from_qmp(value, path)?));
        let pattern = match cx.json_kind(&alt.ty) {
            JsonKind::Object => quote!(::serde_json::Value::Object(_)),
            JsonKind::Array => quote!(::serde_json::Value::Array(_)),
            JsonKind::String => quote!(::serde_json::Value::String(_)),
            JsonKind::Number => quote!(::serde_json::Value::Number(_)),
            JsonKind::Bool => quote!(::serde_json::Value::Bool(_)),
            JsonKind::Null => quote!(::serde_json::Value::Null),
            JsonKind::Any => {
                any_arm = Some(read);
                continue;
            }
        };
        arms.push(quote!(#pattern => #read,));
    }
    let decls = decls.into_iter().map(Moved::from);
    let last = match any_arm {
        Some(read) => quote!(_ => #read,),
        None => quote!(_ => return Err(path.invalid_alternate(#alt_name)),),
    };
    quote! {
        #doc
        #deprecated
        #[derive(Debug, Clone, PartialEq)]
        pub enum #name {
            #(#decls)*
        }
        impl ::serde::Serialize for #name {
            fn serialize<S: ::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                match self {
                    #(#writes)*
                }
            }
        }
        impl ::qapi_runtime::FromQmp for #name {
            fn from_qmp(
                value: &::serde_json::Value,
                path: &mut ::qapi_runtime::QmpPath,
            ) -> ::qapi_runtime::Result<Self> {
                Ok(match value {
                    #(#arms)*
                    #last
                })
            }
        }
        ::qapi_runtime::impl_deserialize!(#name);
    }
}
