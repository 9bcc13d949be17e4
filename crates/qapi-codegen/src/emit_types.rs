//! Enums, structs, unions and alternates, each with its serde `Serialize` and
//! its QMP input visitor (`FromQmp`).

use crate::context::{self, Context, DocText, JsonKind};
use crate::naming;
use proc_macro2::{Ident, TokenStream};
use qapi_model::{
    AlternateType, Builtin, Entity, EnumType, Member, StructType, TypeRef, UnionType,
};
use quote::{format_ident, quote};

/// Top-level items as built: tokens to print, or an impl that is the same for
/// every type but the type's name (printed once per length of name, then copied).
pub enum Segment {
    Tokens(TokenStream),
    Impl(NamedImpl, Ident),
}

/// An impl whose text depends only on the name of the type it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NamedImpl {
    /// `Display` of an enum (its wire name).
    EnumDisplay,
    /// `FromQmp` of an enum.
    EnumFromQmp,
    /// `FromQmp` of a struct or union (through its `read_qmp_members`).
    ObjectFromQmp,
}

impl NamedImpl {
    pub fn tokens(self, name: &Ident) -> TokenStream {
        match self {
            NamedImpl::EnumDisplay => quote! {
                impl ::std::fmt::Display for #name {
                    fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        f.write_str(self.as_str())
                    }
                }
            },
            NamedImpl::EnumFromQmp => quote! {
                impl crate::input::FromQmp for #name {
                    fn from_qmp(
                        value: &::serde_json::Value,
                        path: &mut crate::input::QmpPath,
                    ) -> ::std::result::Result<Self, crate::error::QmpError> {
                        crate::input::enum_from_qmp(value, path)
                    }
                }
            },
            NamedImpl::ObjectFromQmp => quote! {
                impl crate::input::FromQmp for #name {
                    fn from_qmp(
                        value: &::serde_json::Value,
                        path: &mut crate::input::QmpPath,
                    ) -> ::std::result::Result<Self, crate::error::QmpError> {
                        crate::input::read_object(value, path, Self::read_qmp_members)
                    }
                }
            },
        }
    }
}

/// The items of one definition: an enum, struct, union or alternate with its
/// impls (`None` for commands and events, which live in their own files).
pub fn emit_entity(cx: &Context, entity: &Entity) -> Option<Vec<Segment>> {
    match entity {
        Entity::Enum(e) => Some(emit_enum(e)),
        Entity::Struct(s) => Some(emit_struct(cx, s)),
        Entity::Union(u) => Some(emit_union(cx, u)),
        Entity::Alternate(a) => Some(vec![Segment::Tokens(emit_alternate(cx, a))]),
        Entity::Command(_) | Entity::Event(_) => None,
    }
}

/// What follows the definitions in `types.rs`: `Deserialize` through
/// `FromQmp` for every struct, union and alternate.
pub fn emit_tail(cx: &Context) -> TokenStream {
    let via_from_qmp: Vec<Ident> = cx
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
    deserialize_via_from_qmp(&via_from_qmp)
}

pub fn deserialize_via_from_qmp(types: &[Ident]) -> TokenStream {
    if types.is_empty() {
        quote!()
    } else {
        quote!(crate::deserialize_via_from_qmp!(#(#types),*);)
    }
}

fn emit_enum(e: &EnumType) -> Vec<Segment> {
    let name = naming::type_ident(&e.common.name);
    let type_name = &e.common.name;
    let doc = context::entity_doc(&e.common).to_tokens();
    let deprecated = context::deprecated_attr(e.common.is_deprecated());
    let variants = naming::dedupe(
        e.values
            .iter()
            .map(|v| naming::variant_ident(&v.name))
            .collect(),
    );
    let wires: Vec<&str> = e.values.iter().map(|v| v.name.as_str()).collect();
    let decls = e.values.iter().zip(&variants).map(|(v, id)| {
        let mut d = DocText::default();
        if let Some(text) = &v.doc {
            d.push(text.clone());
        }
        if let Some(cond) = &v.ifcond {
            d.push(context::if_note(cond));
        }
        let d = d.to_tokens();
        let dep = context::deprecated_attr(v.features.iter().any(|f| f.name == "deprecated"));
        let wire = &v.name;
        let rename = if naming::serde_name(id) != *wire {
            quote!(#[serde(rename = #wire)])
        } else {
            quote!()
        };
        quote!(#d #dep #rename #id,)
    });
    let definition = quote! {
        #doc
        #deprecated
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ::serde::Serialize, ::serde::Deserialize)]
        pub enum #name {
            #(#decls)*
        }

        impl #name {
            /// Every value, in schema order.
            pub const ALL: &'static [Self] = &[#(Self::#variants),*];

            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    #(Self::#variants => #wires,)*
                }
            }
        }

    };
    let from_str = quote! {
        impl ::std::str::FromStr for #name {
            type Err = crate::input::UnknownEnumValue;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                match s {
                    #(#wires => ::std::result::Result::Ok(Self::#variants),)*
                    _ => ::std::result::Result::Err(crate::input::UnknownEnumValue {
                        type_name: #type_name,
                        value: s.to_string(),
                    }),
                }
            }
        }
    };
    vec![
        Segment::Tokens(definition),
        Segment::Impl(NamedImpl::EnumDisplay, name.clone()),
        Segment::Tokens(from_str),
        Segment::Impl(NamedImpl::EnumFromQmp, name),
    ]
}

/// One field of a generated object.
pub struct Field<'m> {
    pub ident: Ident,
    pub member: &'m Member,
    pub decl: TokenStream,
}

/// Field declarations for `members` inside the type named `container`.
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
        .map(|(m, ident)| {
            let doc = context::member_doc(m).to_tokens();
            let dep = context::deprecated_attr(m.features.iter().any(|f| f.name == "deprecated"));
            let wire = &m.name;
            let rename = if naming::serde_name(&ident) != *wire {
                quote!(#[serde(rename = #wire)])
            } else {
                quote!()
            };
            let ty = cx.rust_type(container, &m.ty);
            let decl = if m.optional {
                quote! {
                    #doc #dep #rename
                    #[serde(skip_serializing_if = "::std::option::Option::is_none")]
                    pub #ident: ::std::option::Option<#ty>,
                }
            } else {
                quote!(#doc #dep #rename pub #ident: #ty,)
            };
            Field {
                ident,
                member: m,
                decl,
            }
        })
        .collect()
}

/// The expression reading one member from `object`.
pub fn read_member(m: &Member) -> TokenStream {
    let wire = &m.name;
    if m.optional {
        quote!(object.optional(#wire, path)?)
    } else {
        quote!(object.required(#wire, path)?)
    }
}

/// Parameters and field initialisers of `new`: mandatory members as
/// parameters (strings as `impl Into<String>`), optional ones `None`.
fn constructor_parts(
    cx: &Context,
    container: Option<&str>,
    fields: &[Field],
) -> (Vec<TokenStream>, Vec<TokenStream>) {
    let mut params = Vec::new();
    let mut values = Vec::new();
    for f in fields {
        let id = &f.ident;
        if f.member.optional {
            values.push(quote!(#id: ::std::option::Option::None,));
        } else if f.member.ty == TypeRef::Builtin(Builtin::Str) {
            params.push(quote!(#id: impl ::std::convert::Into<::std::string::String>));
            values.push(quote!(#id: #id.into(),));
        } else {
            let ty = cx.rust_type(container, &f.member.ty);
            params.push(quote!(#id: #ty));
            values.push(quote!(#id,));
        }
    }
    (params, values)
}

/// A plain object type: struct, command arguments, event data.
pub fn emit_object(
    cx: &Context,
    name: &Ident,
    container: Option<&str>,
    members: &[&Member],
    doc: TokenStream,
    deprecated: bool,
) -> Vec<Segment> {
    let fields = fields(cx, container, members);
    let decls = fields.iter().map(|f| &f.decl);
    let inits = fields.iter().map(|f| {
        let id = &f.ident;
        let read = read_member(f.member);
        quote!(#id: #read,)
    });
    let dep = context::deprecated_attr(deprecated);
    let (params, values) = constructor_parts(cx, container, &fields);
    let definition = quote! {
        #doc
        #dep
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize)]
        pub struct #name {
            #(#decls)*
        }

        impl #name {
            /// A value with the mandatory members given and every optional member absent.
            pub fn new(#(#params),*) -> Self {
                Self { #(#values)* }
            }

            /// Reads this type's members from an object being visited.
            pub(crate) fn read_qmp_members(
                object: &mut crate::input::QmpObject<'_>,
                path: &mut crate::input::QmpPath,
            ) -> ::std::result::Result<Self, crate::error::QmpError> {
                ::std::result::Result::Ok(Self { #(#inits)* })
            }
        }
    };
    vec![
        Segment::Tokens(definition),
        Segment::Impl(NamedImpl::ObjectFromQmp, name.clone()),
    ]
}

fn emit_struct(cx: &Context, s: &StructType) -> Vec<Segment> {
    let name = naming::type_ident(&s.common.name);
    let mut doc = context::entity_doc(&s.common);
    if let Some(base) = &s.base {
        doc.push(format!(
            "Includes the members of [`{}`] (its base).",
            naming::type_ident(base)
        ));
    }
    let members = cx.schema.all_members(&s.common.name);
    emit_object(
        cx,
        &name,
        Some(&s.common.name),
        &members,
        doc.to_tokens(),
        s.common.is_deprecated(),
    )
}

/// The field holding the branch, renamed if a base member already took `branch`.
fn branch_field(fields: &[Field]) -> Ident {
    let mut text = String::from("branch");
    while fields.iter().any(|f| f.ident == text) {
        text.push('_');
    }
    naming::ident(&text)
}

fn emit_union(cx: &Context, u: &UnionType) -> Vec<Segment> {
    let union_name = &u.common.name;
    let name = naming::type_ident(union_name);
    let branch_name = format_ident!("{}Branch", name.to_string());
    let disc_name = naming::type_ident(&u.discriminator_enum);
    let mut doc = context::entity_doc(&u.common);
    doc.push(format!(
        "The members of the branch selected by `{}` are in [`{branch_name}`], flattened into the same JSON object.",
        u.discriminator
    ));
    let doc = doc.to_tokens();
    let deprecated = context::deprecated_attr(u.common.is_deprecated());

    let base_members = cx.schema.union_base_members(u);
    let non_disc: Vec<&Member> = base_members
        .iter()
        .copied()
        .filter(|m| m.name != u.discriminator)
        .collect();
    let fields = fields(cx, Some(union_name), &non_disc);
    let branch_field = branch_field(&fields);
    let (ctor_params, ctor_values) = constructor_parts(cx, Some(union_name), &fields);
    let decls = fields.iter().map(|f| &f.decl);

    // Reading: base members in wire order (the discriminator among them), then the branch.
    let mut reads = Vec::new();
    let mut inits = Vec::new();
    let mut field_iter = fields.iter();
    for (i, m) in base_members.iter().enumerate() {
        let local = format_ident!("member_{}", i);
        let read = read_member(m);
        if m.name == u.discriminator {
            let wire = &m.name;
            reads.push(quote!(let kind: #disc_name = object.required(#wire, path)?;));
        } else {
            reads.push(quote!(let #local = #read;));
            if let Some(f) = field_iter.next() {
                let id = &f.ident;
                inits.push(quote!(#id: #local,));
            }
        }
    }

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
    let mut variant_decls = Vec::new();
    let mut read_arms = Vec::new();
    let mut kind_arms = Vec::new();
    for ((value, value_doc), id) in values.iter().zip(&value_docs).zip(&variants) {
        let mut d = DocText::default();
        if let Some(text) = value_doc {
            d.push(text.clone());
        }
        let rename = if naming::serde_name(id) != *value {
            quote!(#[serde(rename = #value)])
        } else {
            quote!()
        };
        match u.branches.iter().find(|b| b.name == *value) {
            Some(b) => {
                let ty_ident = naming::type_ident(&b.ty);
                let boxed = cx.needs_box(Some(union_name), &b.ty);
                let ty = if boxed {
                    quote!(::std::boxed::Box<#ty_ident>)
                } else {
                    quote!(#ty_ident)
                };
                if let Some(cond) = &b.ifcond {
                    d.push(context::if_note(cond));
                }
                let d = d.to_tokens();
                variant_decls.push(quote!(#d #rename #id(#ty),));
                let read = quote!(#ty_ident::read_qmp_members(object, path)?);
                let read = if boxed {
                    quote!(::std::boxed::Box::new(#read))
                } else {
                    read
                };
                read_arms.push(quote!(#disc_name::#id => #branch_name::#id(#read),));
                kind_arms.push(quote!(Self::#id(_) => #disc_name::#id,));
            }
            None => {
                let d = d.to_tokens();
                variant_decls.push(quote!(#d #rename #id,));
                read_arms.push(quote!(#disc_name::#id => #branch_name::#id,));
                kind_arms.push(quote!(Self::#id => #disc_name::#id,));
            }
        }
    }
    let tag = &u.discriminator;
    let branch_doc = format!(
        " The branch of [`{name}`] chosen by its discriminator `{tag}` (serialised as that member)."
    );
    let kind_body = if kind_arms.is_empty() {
        quote!(match *self {})
    } else {
        quote!(match self { #(#kind_arms)* })
    };
    let read_body = if read_arms.is_empty() {
        quote!(match kind {})
    } else {
        quote!(match kind { #(#read_arms)* })
    };

    let definition = quote! {
        #doc
        #deprecated
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize)]
        pub struct #name {
            #(#decls)*
            #[serde(flatten)]
            pub #branch_field: #branch_name,
        }

        #[doc = #branch_doc]
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize)]
        #[serde(tag = #tag)]
        pub enum #branch_name {
            #(#variant_decls)*
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
            pub fn new(#(#ctor_params,)* #branch_field: #branch_name) -> Self {
                Self { #(#ctor_values)* #branch_field }
            }

            /// Reads this union's members from an object being visited.
            pub(crate) fn read_qmp_members(
                object: &mut crate::input::QmpObject<'_>,
                path: &mut crate::input::QmpPath,
            ) -> ::std::result::Result<Self, crate::error::QmpError> {
                #(#reads)*
                let #branch_field = #read_body;
                ::std::result::Result::Ok(Self { #(#inits)* #branch_field })
            }
        }
    };
    vec![
        Segment::Tokens(definition),
        Segment::Impl(NamedImpl::ObjectFromQmp, name),
    ]
}

fn emit_alternate(cx: &Context, a: &AlternateType) -> TokenStream {
    let alt_name = &a.common.name;
    let name = naming::type_ident(alt_name);
    let mut doc = context::entity_doc(&a.common);
    doc.push("Chosen by the JSON type of the value.");
    let doc = doc.to_tokens();
    let deprecated = context::deprecated_attr(a.common.is_deprecated());
    let variants = naming::dedupe(
        a.alternatives
            .iter()
            .map(|alt| naming::variant_ident(&alt.name))
            .collect(),
    );
    let mut decls = Vec::new();
    let mut arms = Vec::new();
    let mut any_arm = None;
    for (alt, id) in a.alternatives.iter().zip(&variants) {
        let ty = cx.rust_type(Some(alt_name), &alt.ty);
        let mut d = DocText::default();
        if let Some(text) = &alt.doc {
            d.push(text.clone());
        }
        if let Some(cond) = &alt.ifcond {
            d.push(context::if_note(cond));
        }
        let d = d.to_tokens();
        decls.push(quote!(#d #id(#ty),));
        let read = quote!(Self::#id(crate::input::FromQmp::from_qmp(value, path)?));
        let pattern = match cx.json_kind(&alt.ty) {
            JsonKind::Object => quote!(::serde_json::Value::Object(_)),
            JsonKind::Array => quote!(::serde_json::Value::Array(_)),
            JsonKind::String => quote!(::serde_json::Value::String(_)),
            JsonKind::Number => quote!(::serde_json::Value::Number(_)),
            JsonKind::Bool => quote!(::serde_json::Value::Bool(_)),
            JsonKind::Null => quote!(::serde_json::Value::Null),
            JsonKind::Any => {
                any_arm = Some(quote!(_ => #read,));
                continue;
            }
        };
        arms.push(quote!(#pattern => #read,));
    }
    let fallback = any_arm.unwrap_or_else(
        || quote!(_ => return ::std::result::Result::Err(path.invalid_alternate(#alt_name)),),
    );
    quote! {
        #doc
        #deprecated
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize)]
        #[serde(untagged)]
        pub enum #name {
            #(#decls)*
        }

        impl crate::input::FromQmp for #name {
            fn from_qmp(
                value: &::serde_json::Value,
                path: &mut crate::input::QmpPath,
            ) -> ::std::result::Result<Self, crate::error::QmpError> {
                ::std::result::Result::Ok(match value {
                    #(#arms)*
                    #fallback
                })
            }
        }
    }
}
