//! Checked definitions → the linked [`Schema`](crate::Schema) handed to
//! generators, docs distributed to the members they describe.

use crate::exprs::{Def, DefKind, RawArgs, RawMember, RawType};
use crate::types::*;
use qapi_parser::{DocBlock, Pragmas};

pub(crate) fn doc(block: &DocBlock) -> Doc {
    Doc {
        body: block.body.clone(),
        members: block
            .members
            .iter()
            .map(|m| (m.name.clone(), m.text.clone()))
            .collect(),
        features: block
            .features
            .iter()
            .map(|f| (f.name.clone(), f.text.clone()))
            .collect(),
        sections: block
            .sections
            .iter()
            .map(|s| DocSection {
                tag: s.tag.clone(),
                text: s.text.clone(),
            })
            .collect(),
    }
}

fn type_ref(t: &RawType) -> TypeRef {
    let base = match Builtin::from_name(&t.name) {
        Some(b) => TypeRef::Builtin(b),
        None => TypeRef::Named(t.name.clone()),
    };
    if t.array {
        TypeRef::Array(Box::new(base))
    } else {
        base
    }
}

fn member(m: &RawMember, doc: Option<&Doc>) -> Member {
    Member {
        name: m.name.clone(),
        ty: type_ref(&m.ty),
        optional: m.optional,
        ifcond: m.ifcond.clone(),
        features: m.features.clone(),
        doc: doc.and_then(|d| d.member(&m.name)).map(str::to_string),
        location: m.loc.clone(),
    }
}

fn members(ms: &[RawMember], doc: Option<&Doc>) -> Vec<Member> {
    ms.iter().map(|m| member(m, doc)).collect()
}

fn args(a: &RawArgs, doc: Option<&Doc>) -> ArgType {
    match a {
        RawArgs::Named(n) => ArgType::Named(n.name.clone()),
        RawArgs::Inline(ms) => ArgType::Inline(members(ms, doc)),
    }
}

/// Builds the entity of one checked definition; `discriminator_enum`
/// looks up the enum type of a union's discriminator.
pub(crate) fn entity(d: &Def, discriminator_enum: impl Fn(&Def) -> String) -> Entity {
    let doc = d.doc.as_ref().map(doc);
    let common = Common {
        name: d.name.clone(),
        location: d.location.clone(),
        doc: doc.clone(),
        ifcond: d.ifcond.clone(),
        features: d.features.clone(),
    };
    let doc = doc.as_ref();
    match &d.kind {
        DefKind::Enum { values, prefix } => Entity::Enum(EnumType {
            common,
            values: values
                .iter()
                .map(|v| EnumValue {
                    name: v.name.clone(),
                    ifcond: v.ifcond.clone(),
                    features: v.features.clone(),
                    doc: doc.and_then(|d| d.member(&v.name)).map(str::to_string),
                })
                .collect(),
            prefix: prefix.clone(),
        }),
        DefKind::Struct { base, members: ms } => Entity::Struct(StructType {
            common,
            base: base.as_ref().map(|b| b.name.clone()),
            members: members(ms, doc),
        }),
        DefKind::Union {
            base,
            discriminator,
            branches,
            ..
        } => Entity::Union(UnionType {
            discriminator_enum: discriminator_enum(d),
            common,
            base: match base {
                RawArgs::Named(n) => UnionBase::Named(n.name.clone()),
                RawArgs::Inline(ms) => UnionBase::Inline(members(ms, doc)),
            },
            discriminator: discriminator.name.clone(),
            branches: branches
                .iter()
                .map(|b| Branch {
                    name: b.name.clone(),
                    ty: b.ty.name.clone(),
                    ifcond: b.ifcond.clone(),
                    location: b.loc.clone(),
                })
                .collect(),
        }),
        DefKind::Alternate { alternatives } => Entity::Alternate(AlternateType {
            common,
            alternatives: alternatives
                .iter()
                .map(|a| Alternative {
                    name: a.name.clone(),
                    ty: type_ref(&a.ty),
                    ifcond: a.ifcond.clone(),
                    doc: doc.and_then(|d| d.member(&a.name)).map(str::to_string),
                })
                .collect(),
        }),
        DefKind::Command {
            data,
            returns,
            boxed,
            success_response,
            gen_,
            allow_oob,
            allow_preconfig,
            coroutine,
        } => Entity::Command(Command {
            common,
            args: data.as_ref().map(|a| args(a, doc)),
            boxed: *boxed,
            returns: returns.as_ref().map(type_ref),
            success_response: *success_response,
            gen_: *gen_,
            allow_oob: *allow_oob,
            allow_preconfig: *allow_preconfig,
            coroutine: *coroutine,
        }),
        DefKind::Event { data, boxed } => Entity::Event(Event {
            common,
            data: data.as_ref().map(|a| args(a, doc)),
            boxed: *boxed,
        }),
    }
}

pub(crate) fn pragma(p: &Pragmas) -> Pragma {
    Pragma {
        doc_required: p.doc_required,
        command_name_exceptions: p.command_name_exceptions.clone(),
        command_returns_exceptions: p.command_returns_exceptions.clone(),
        documentation_exceptions: p.documentation_exceptions.clone(),
        member_name_exceptions: p.member_name_exceptions.clone(),
    }
}
