//! Phase 2 of checking: definitions against each other (as QEMU's
//! `schema.py` does): unique names, type references that resolve to the
//! right kind of type, clashes after normalisation, discriminators and
//! branches, alternates that can be told apart, command and event
//! arguments, doc comments that match their definitions. Then builds the
//! linked [`Schema`](crate::Schema) entities.

use crate::exprs::{Def, DefKind, Meta, RawArgs, RawBranch, RawMember, RawType};
use crate::names::c_name;
use crate::types::*;
use qapi_parser::{Definition, Error, Location, Pragmas};
use std::collections::{HashMap, HashSet};

type R<T> = Result<T, Error>;

fn err(loc: &Location, msg: impl Into<String>) -> Error {
    Error::new(loc.clone(), msg)
}

/// What a type name refers to.
#[derive(Clone, Copy)]
enum Kind<'a> {
    Builtin(Builtin),
    Def(&'a Def),
}

/// A member on the way to a clash check, with its description relative
/// to the definition being checked.
#[derive(Clone)]
struct Seen {
    describe: String,
}

pub(crate) struct Checker<'a> {
    defs: &'a [Def],
    index: HashMap<&'a str, usize>,
    pragmas: &'a Pragmas,
}

fn describe_kind(kind: Kind, name: &str) -> String {
    match kind {
        Kind::Builtin(_) => format!("built-in type '{name}'"),
        Kind::Def(d) => format!("{} type '{}'", d.meta.as_str(), d.name),
    }
}

fn describe_type(kind: Kind, ty: &RawType) -> String {
    if ty.array {
        format!("array type ['{}']", ty.name)
    } else {
        describe_kind(kind, &ty.name)
    }
}

fn has_special(features: &[Feature]) -> Option<&Feature> {
    features
        .iter()
        .find(|f| f.name == "deprecated" || f.name == "unstable")
}

fn check_feature_clash(features: &[Feature]) -> R<()> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for f in features {
        if let Some(prev) = seen.insert(c_name(&f.name), &f.name) {
            return Err(err(
                &f.location,
                format!("feature '{}' collides with feature '{prev}'", f.name),
            ));
        }
    }
    Ok(())
}

impl<'a> Checker<'a> {
    /// Indexes the definitions; reports duplicates (the later definition
    /// is then left out of the index).
    pub fn new(defs: &'a [Def], pragmas: &'a Pragmas, errors: &mut Vec<Error>) -> Self {
        let mut index = HashMap::with_capacity(defs.len());
        for (i, d) in defs.iter().enumerate() {
            if Builtin::from_name(&d.name).is_some() {
                errors.push(
                    err(
                        &d.name_loc,
                        format!("built-in type '{}' is already defined", d.name),
                    )
                    .in_definition(d.meta.as_str(), &d.name),
                );
                continue;
            }
            match index.get(d.name.as_str()) {
                Some(&prev) => {
                    let p: &Def = &defs[prev];
                    errors.push(
                        err(&d.name_loc, format!("'{}' is already defined", d.name))
                            .in_definition(d.meta.as_str(), &d.name)
                            .with_note_in(
                                Some(Definition::new(p.meta.as_str(), &p.name)),
                                p.name_loc.clone(),
                                "previous definition",
                            ),
                    );
                }
                None => {
                    index.insert(d.name.as_str(), i);
                }
            }
        }
        Checker {
            defs,
            index,
            pragmas,
        }
    }

    fn lookup(&self, name: &str) -> Option<Kind<'a>> {
        if let Some(b) = Builtin::from_name(name) {
            return Some(Kind::Builtin(b));
        }
        let d = &self.defs[*self.index.get(name)?];
        match d.meta {
            Meta::Command | Meta::Event => None,
            _ => Some(Kind::Def(d)),
        }
    }

    /// Resolves a type reference (an array's element type for arrays).
    fn resolve(&self, ty: &RawType, what: &str) -> R<Kind<'a>> {
        self.lookup(&ty.name)
            .ok_or_else(|| err(&ty.loc, format!("{what} uses unknown type '{}'", ty.name)))
    }

    fn resolve_named(&self, name: &str, loc: &Location, what: &str) -> R<Kind<'a>> {
        self.lookup(name)
            .ok_or_else(|| err(loc, format!("{what} uses unknown type '{name}'")))
    }

    /// All members of struct `name` in wire order (base first), each with
    /// the name of the struct declaring it. Stops at cycles and at bases
    /// that are not structs (reported where they are defined).
    fn struct_members(&self, name: &str) -> Vec<(&'a RawMember, &'a str)> {
        let mut chain = Vec::new();
        let mut visited = HashSet::new();
        let mut cur = Some(name);
        while let Some(n) = cur {
            if !visited.insert(n) {
                break;
            }
            let Some(&i) = self.index.get(n) else { break };
            let d = &self.defs[i];
            let DefKind::Struct { base, .. } = &d.kind else {
                break;
            };
            chain.push(d);
            cur = base.as_ref().map(|b| b.name.as_str());
        }
        let mut out = Vec::new();
        for d in chain.iter().rev() {
            if let DefKind::Struct { members, .. } = &d.kind {
                out.extend(members.iter().map(|m| (m, d.name.as_str())));
            }
        }
        out
    }

    /// Members a union contributes besides its branches (its base).
    fn union_base_members(&self, base: &'a RawArgs) -> Vec<(&'a RawMember, Option<&'a str>)> {
        match base {
            RawArgs::Named(n) => self
                .struct_members(&n.name)
                .into_iter()
                .map(|(m, owner)| (m, Some(owner)))
                .collect(),
            RawArgs::Inline(ms) => ms.iter().map(|m| (m, None)).collect(),
        }
    }

    /// A branch's members against its union's (`seen`): a struct's
    /// members, or a union's base members and then, one branch at a time,
    /// its own branches' (a union holds its branches by value, so they all
    /// share one set of names). Clashes are reported at `loc`, the branch.
    /// `path` holds the unions being walked: a cycle (reported as an object
    /// containing itself) ends the walk.
    fn check_branch_clash(
        &self,
        seen: &HashMap<String, Seen>,
        ty: &'a str,
        loc: &Location,
        path: &mut Vec<&'a str>,
    ) -> R<()> {
        let Some(&i) = self.index.get(ty) else {
            return Ok(());
        };
        let d = &self.defs[i];
        if path.contains(&d.name.as_str()) {
            return Ok(());
        }
        let mut seen = seen.clone();
        match &d.kind {
            DefKind::Struct { .. } => {
                for (m, owner) in self.struct_members(ty) {
                    let describe = format!("member '{}' of type '{owner}'", m.name);
                    Self::clash(&mut seen, &m.name, describe, loc)?;
                }
            }
            DefKind::Union { base, branches, .. } => {
                for (m, owner) in self.union_base_members(base) {
                    let describe = match owner {
                        Some(owner) => format!("member '{}' of type '{owner}'", m.name),
                        None => format!("base member '{}' of type '{}'", m.name, d.name),
                    };
                    Self::clash(&mut seen, &m.name, describe, loc)?;
                }
                path.push(&d.name);
                for b in branches {
                    self.check_branch_clash(&seen, &b.ty.name, loc, path)?;
                }
                path.pop();
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether union `from` holds `target` by value: as a branch, or in a
    /// branch that is a union holding it.
    fn union_holds(&self, from: &'a str, target: &str, visited: &mut HashSet<&'a str>) -> bool {
        if !visited.insert(from) {
            return false;
        }
        let Some(DefKind::Union { branches, .. }) =
            self.index.get(from).map(|&i| &self.defs[i].kind)
        else {
            return false;
        };
        branches
            .iter()
            .any(|b| b.ty.name == target || self.union_holds(&b.ty.name, target, visited))
    }

    fn clash(
        seen: &mut HashMap<String, Seen>,
        name: &str,
        describe: String,
        loc: &Location,
    ) -> R<()> {
        let key = c_name(name);
        if let Some(prev) = seen.get(&key) {
            return Err(err(
                loc,
                format!("{describe} collides with {}", prev.describe),
            ));
        }
        seen.insert(key, Seen { describe });
        Ok(())
    }

    fn check_member(&self, m: &RawMember, describe: &str) -> R<()> {
        self.resolve(&m.ty, describe)?;
        check_feature_clash(&m.features)
    }

    /// Checks one definition; the first error found (about `d`).
    pub fn check_def(&self, d: &'a Def) -> R<()> {
        self.check_def_parts(d)
            .map_err(|e| e.in_definition(d.meta.as_str(), &d.name))
    }

    fn check_def_parts(&self, d: &'a Def) -> R<()> {
        check_feature_clash(&d.features)?;
        if !matches!(d.meta, Meta::Command | Meta::Event)
            && let Some(f) = has_special(&d.features)
        {
            return Err(err(
                &f.location,
                format!("feature '{}' is not supported for types", f.name),
            ));
        }
        match &d.kind {
            DefKind::Enum { values, .. } => {
                let mut seen = HashMap::new();
                for v in values {
                    Self::clash(&mut seen, &v.name, format!("value '{}'", v.name), &v.loc)?;
                    check_feature_clash(&v.features)?;
                }
                Ok(())
            }
            DefKind::Struct { base, members } => {
                let mut seen = HashMap::new();
                if let Some(b) = base {
                    self.check_base(d, &b.name, &b.loc)?;
                    for (m, owner) in self.struct_members(&b.name) {
                        let _ = Self::clash(
                            &mut seen,
                            &m.name,
                            format!("member '{}' of type '{owner}'", m.name),
                            &m.loc,
                        );
                    }
                }
                for m in members {
                    let describe = format!("member '{}'", m.name);
                    self.check_member(m, &describe)?;
                    Self::clash(&mut seen, &m.name, describe, &m.loc)?;
                }
                Ok(())
            }
            DefKind::Union {
                base,
                base_loc,
                discriminator,
                branches,
            } => self.check_union(d, base, base_loc, discriminator, branches),
            DefKind::Alternate { alternatives } => self.check_alternate(alternatives),
            DefKind::Command {
                data,
                returns,
                boxed,
                ..
            } => {
                self.check_args(data.as_ref(), *boxed, "command")?;
                if let Some(r) = returns {
                    let kind = self.resolve(r, "command's 'returns'")?;
                    if !self.pragmas.command_returns_exceptions.contains(&d.name)
                        && !matches!(kind, Kind::Def(t) if matches!(t.meta, Meta::Struct | Meta::Union))
                    {
                        return Err(err(
                            &r.loc,
                            format!("command's 'returns' cannot take {}", describe_type(kind, r)),
                        ));
                    }
                }
                Ok(())
            }
            DefKind::Event { data, boxed } => self.check_args(data.as_ref(), *boxed, "event"),
        }
    }

    /// `'base'` must name a struct (not a union), and the chain of bases
    /// must not loop back.
    fn check_base(&self, d: &Def, base: &str, loc: &Location) -> R<()> {
        let kind = self.resolve_named(base, loc, "'base'")?;
        match kind {
            Kind::Def(b) if b.meta == Meta::Struct => {}
            _ => {
                return Err(err(
                    loc,
                    format!(
                        "'base' requires a struct type, {} isn't",
                        describe_kind(kind, base)
                    ),
                ));
            }
        }
        let mut visited = HashSet::new();
        let mut cur = Some(base);
        while let Some(n) = cur {
            if n == d.name {
                return Err(err(loc, format!("object {} contains itself", d.name)));
            }
            if !visited.insert(n) {
                break;
            }
            cur = match self.index.get(n).map(|&i| &self.defs[i].kind) {
                Some(DefKind::Struct { base: Some(b), .. }) => Some(b.name.as_str()),
                _ => None,
            };
        }
        Ok(())
    }

    fn check_union(
        &self,
        d: &'a Def,
        base: &'a RawArgs,
        base_loc: &Location,
        discriminator: &crate::exprs::Named,
        branches: &[RawBranch],
    ) -> R<()> {
        let mut seen = HashMap::new();
        let base_desc;
        match base {
            RawArgs::Named(b) => {
                self.check_base(d, &b.name, &b.loc)?;
                base_desc = format!("base type '{}'", b.name);
                for (m, owner) in self.struct_members(&b.name) {
                    let _ = Self::clash(
                        &mut seen,
                        &m.name,
                        format!("member '{}' of type '{owner}'", m.name),
                        &m.loc,
                    );
                }
            }
            RawArgs::Inline(ms) => {
                base_desc = "'base'".to_string();
                for m in ms {
                    let describe = format!("base member '{}'", m.name);
                    self.check_member(m, &describe)?;
                    Self::clash(&mut seen, &m.name, describe, &m.loc)?;
                }
            }
        }
        let base_members = self.union_base_members(base);
        let tag = base_members
            .iter()
            .find(|(m, _)| m.name == discriminator.name)
            .map(|(m, _)| *m);
        let Some(tag) = tag else {
            return Err(err(
                &discriminator.loc,
                format!(
                    "discriminator '{}' is not a member of 'base'",
                    discriminator.name
                ),
            ));
        };
        let enum_def = match self.lookup(&tag.ty.name) {
            Some(Kind::Def(e)) if e.meta == Meta::Enum && !tag.ty.array => e,
            _ => {
                return Err(err(
                    &discriminator.loc,
                    format!(
                        "discriminator member '{}' of {base_desc} must be of enum type",
                        discriminator.name
                    ),
                ));
            }
        };
        if tag.optional {
            return Err(err(
                &discriminator.loc,
                format!(
                    "discriminator member '{}' of {base_desc} must not be optional",
                    discriminator.name
                ),
            ));
        }
        if tag.ifcond.is_some() {
            return Err(err(
                &discriminator.loc,
                format!(
                    "discriminator member '{}' of {base_desc} must not be conditional",
                    discriminator.name
                ),
            ));
        }
        let DefKind::Enum { values, .. } = &enum_def.kind else {
            return Ok(());
        };
        if branches.is_empty() && values.is_empty() {
            return Err(err(base_loc, "union has no branches"));
        }
        let value_names: HashSet<&str> = values.iter().map(|v| v.name.as_str()).collect();
        for b in branches {
            if !value_names.contains(b.name.as_str()) {
                return Err(err(
                    &b.loc,
                    format!(
                        "branch '{}' is not a value of enum type '{}'",
                        b.name, enum_def.name
                    ),
                ));
            }
            let describe = format!("branch '{}'", b.name);
            let kind = self.resolve(&b.ty, &describe)?;
            match kind {
                Kind::Def(t) if matches!(t.meta, Meta::Struct | Meta::Union) => {
                    if t.name == d.name || self.union_holds(&t.name, &d.name, &mut HashSet::new()) {
                        return Err(err(&b.ty.loc, format!("object {} contains itself", d.name)));
                    }
                }
                _ => {
                    return Err(err(
                        &b.ty.loc,
                        format!("{describe} cannot use {}", describe_kind(kind, &b.ty.name)),
                    ));
                }
            }
            self.check_branch_clash(&seen, &b.ty.name, &b.ty.loc, &mut vec![d.name.as_str()])?;
        }
        Ok(())
    }

    fn check_alternate(&self, alternatives: &[RawBranch]) -> R<()> {
        let mut seen = HashMap::new();
        let mut types_seen: HashMap<&'static str, &str> = HashMap::new();
        for v in alternatives {
            let describe = format!("branch '{}'", v.name);
            Self::clash(&mut seen, &v.name, describe.clone(), &v.loc)?;
            let kind = self.resolve(&v.ty, &describe)?;
            let qtype: Option<&'static str> = if v.ty.array {
                Some("QLIST")
            } else {
                match kind {
                    Kind::Builtin(b) => match b.json_type() {
                        "string" => Some("QSTRING"),
                        "number" | "int" => Some("QNUM"),
                        "boolean" => Some("QBOOL"),
                        "null" => Some("QNULL"),
                        _ => None,
                    },
                    Kind::Def(t) => match t.meta {
                        Meta::Enum => Some("QSTRING"),
                        Meta::Struct | Meta::Union => Some("QDICT"),
                        _ => None,
                    },
                }
            };
            let Some(qtype) = qtype else {
                return Err(err(
                    &v.ty.loc,
                    format!("{describe} cannot use {}", describe_type(kind, &v.ty)),
                ));
            };
            let mut conflicting = vec![qtype];
            if qtype == "QSTRING" {
                match kind {
                    Kind::Def(t) if !v.ty.array => {
                        if let DefKind::Enum { values, .. } = &t.kind {
                            for m in values {
                                if m.name == "on" || m.name == "off" {
                                    conflicting.push("QBOOL");
                                }
                                if m.name.starts_with(|c: char| "-+0123456789.".contains(c)) {
                                    conflicting.push("QNUM");
                                }
                            }
                        }
                    }
                    // QEMU's predefined enum: its values (`none`, `qnull`,
                    // `qnum`, ...) look like neither numbers nor booleans.
                    Kind::Builtin(Builtin::QType) if !v.ty.array => {}
                    _ => {
                        conflicting.push("QNUM");
                        conflicting.push("QBOOL");
                    }
                }
            }
            conflicting.sort_unstable();
            conflicting.dedup();
            for qt in conflicting {
                if let Some(prev) = types_seen.get(qt) {
                    return Err(err(
                        &v.ty.loc,
                        format!("{describe} can't be distinguished from '{prev}'"),
                    ));
                }
                types_seen.insert(qt, &v.name);
            }
        }
        Ok(())
    }

    fn check_args(&self, data: Option<&RawArgs>, boxed: bool, meta: &str) -> R<()> {
        match data {
            None => Ok(()),
            Some(RawArgs::Inline(ms)) => {
                let mut seen = HashMap::new();
                for m in ms {
                    let describe = format!("parameter '{}'", m.name);
                    self.check_member(m, &describe)?;
                    Self::clash(&mut seen, &m.name, describe, &m.loc)?;
                }
                if !boxed && let Some(m) = ms.iter().find(|m| m.ifcond.is_some()) {
                    return Err(err(
                        &m.loc,
                        format!("conditional {meta} arguments require 'boxed': true"),
                    ));
                }
                Ok(())
            }
            Some(RawArgs::Named(n)) => {
                let what = format!("{meta}'s 'data'");
                let kind = self.resolve_named(&n.name, &n.loc, &what)?;
                match kind {
                    Kind::Def(t) if t.meta == Meta::Struct => {
                        if !boxed
                            && self
                                .struct_members(&t.name)
                                .iter()
                                .any(|(m, _)| m.ifcond.is_some())
                        {
                            return Err(err(
                                &n.loc,
                                format!("conditional {meta} arguments require 'boxed': true"),
                            ));
                        }
                        Ok(())
                    }
                    Kind::Def(t) if t.meta == Meta::Union => {
                        if boxed {
                            Ok(())
                        } else {
                            Err(err(
                                &n.loc,
                                format!(
                                    "{what} can take {} only with 'boxed': true",
                                    describe_kind(kind, &n.name)
                                ),
                            ))
                        }
                    }
                    _ => Err(err(
                        &n.loc,
                        format!("{what} cannot take {}", describe_kind(kind, &n.name)),
                    )),
                }
            }
        }
    }

    /// Doc comment against definition: every documented member and feature
    /// exists; every member is documented (unless the definition is a
    /// pragma documentation-exception) and every feature is.
    pub fn check_doc(&self, d: &'a Def) -> R<()> {
        let Some(doc) = &d.doc else { return Ok(()) };
        let mut connected: Vec<(&str, &'static str, &Location)> = Vec::new();
        let mut features: Vec<&Feature> = d.features.iter().collect();
        let add_members =
            |ms: &'a [RawMember], connected: &mut Vec<_>, features: &mut Vec<&'a Feature>| {
                for m in ms {
                    connected.push((m.name.as_str(), "member", &m.loc));
                    features.extend(m.features.iter());
                }
            };
        match &d.kind {
            DefKind::Enum { values, .. } => {
                for v in values {
                    connected.push((&v.name, "value", &v.loc));
                    features.extend(v.features.iter());
                }
            }
            DefKind::Struct { members, .. } => add_members(members, &mut connected, &mut features),
            DefKind::Union {
                base: RawArgs::Inline(ms),
                ..
            } => add_members(ms, &mut connected, &mut features),
            DefKind::Union { .. } => {}
            DefKind::Alternate { alternatives } => {
                for a in alternatives {
                    connected.push((&a.name, "branch", &a.loc));
                }
            }
            DefKind::Command {
                data: Some(RawArgs::Inline(ms)),
                ..
            }
            | DefKind::Event {
                data: Some(RawArgs::Inline(ms)),
                ..
            } => add_members(ms, &mut connected, &mut features),
            DefKind::Command { .. } | DefKind::Event { .. } => {}
        }
        let excepted = self.pragmas.documentation_exceptions.contains(&d.name);
        let documented: HashSet<&str> = doc.members.iter().map(|m| m.name.as_str()).collect();
        let documented_features: HashSet<&str> =
            doc.features.iter().map(|f| f.name.as_str()).collect();
        // Missing documentation is about the definition; documentation of
        // what does not exist is about the doc comment (QEMU words both so).
        let in_definition = |e: Error| e.in_definition(d.meta.as_str(), &d.name);
        for (name, role, loc) in &connected {
            if !excepted && !documented.contains(name) {
                return Err(in_definition(err(
                    loc,
                    format!("{role} '{name}' lacks documentation"),
                )));
            }
        }
        for f in &features {
            if !documented_features.contains(f.name.as_str()) {
                return Err(in_definition(err(
                    &f.location,
                    format!("feature '{}' lacks documentation", f.name),
                )));
            }
        }
        let members: HashSet<&str> = connected.iter().map(|(n, _, _)| *n).collect();
        let feature_names: HashSet<&str> = features.iter().map(|f| f.name.as_str()).collect();
        bogus(
            "member",
            doc.members
                .iter()
                .filter(|m| !members.contains(m.name.as_str())),
        )?;
        bogus(
            "feature",
            doc.features
                .iter()
                .filter(|df| !feature_names.contains(df.name.as_str())),
        )?;
        Ok(())
    }
}

fn bogus<'b>(what: &str, items: impl Iterator<Item = &'b qapi_parser::DocItem>) -> R<()> {
    let items: Vec<_> = items.collect();
    let Some(first) = items.first() else {
        return Ok(());
    };
    let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
    let many = names.len() > 1;
    Err(err(
        &first.location,
        format!(
            "documented {what}{} '{}' {} not exist",
            if many { "s" } else { "" },
            names.join("', '"),
            if many { "do" } else { "does" }
        ),
    ))
}

/// The schema may use at most 64 distinct feature names (the two special
/// ones included); the error is about the definition using the 65th.
pub(crate) fn check_feature_count(defs: &[Def]) -> R<()> {
    let mut names: HashSet<&str> = ["deprecated", "unstable"].into_iter().collect();
    for d in defs {
        let mut all: Vec<&Feature> = d.features.iter().collect();
        match &d.kind {
            DefKind::Enum { values, .. } => {
                values.iter().for_each(|v| all.extend(v.features.iter()))
            }
            DefKind::Struct { members, .. }
            | DefKind::Union {
                base: RawArgs::Inline(members),
                ..
            }
            | DefKind::Command {
                data: Some(RawArgs::Inline(members)),
                ..
            }
            | DefKind::Event {
                data: Some(RawArgs::Inline(members)),
                ..
            } => members.iter().for_each(|m| all.extend(m.features.iter())),
            _ => {}
        }
        for f in all {
            if names.insert(&f.name) && names.len() > 64 {
                return Err(
                    err(&f.location, "Maximum of 64 schema features is permitted")
                        .in_definition(d.meta.as_str(), &d.name),
                );
            }
        }
    }
    Ok(())
}
