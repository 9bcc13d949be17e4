//! Phase 1 of checking: the shape of each definition on its own (keys,
//! value types, names, `if`, features, flags), as QEMU's `expr.py` does.
//! Turns each top-level expression into a [`Def`].

use crate::names;
use crate::types::{Feature, IfCond};
use qapi_parser::{Dict, DocBlock, Error, Location, Node, Pragmas, TopExpr, Value};
use std::fmt;

type R<T> = Result<T, Error>;

fn err(loc: &Location, msg: impl Into<String>) -> Error {
    Error::new(loc.clone(), msg)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Meta {
    Enum,
    Struct,
    Union,
    Alternate,
    Command,
    Event,
}

impl Meta {
    pub fn as_str(self) -> &'static str {
        match self {
            Meta::Enum => "enum",
            Meta::Struct => "struct",
            Meta::Union => "union",
            Meta::Alternate => "alternate",
            Meta::Command => "command",
            Meta::Event => "event",
        }
    }
    const ALL: [Meta; 6] = [
        Meta::Enum,
        Meta::Struct,
        Meta::Union,
        Meta::Alternate,
        Meta::Command,
        Meta::Event,
    ];
}

/// A name and where it is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Named {
    pub name: String,
    pub loc: Location,
}

/// A type reference as written: a name or a one-element array.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawType {
    pub name: String,
    pub array: bool,
    pub loc: Location,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawMember {
    pub name: String,
    pub optional: bool,
    pub loc: Location,
    pub ty: RawType,
    pub ifcond: Option<IfCond>,
    pub features: Vec<Feature>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawValue {
    pub name: String,
    pub loc: Location,
    pub ifcond: Option<IfCond>,
    pub features: Vec<Feature>,
}

/// A union branch or an alternate's alternative.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawBranch {
    pub name: String,
    pub loc: Location,
    pub ty: RawType,
    pub ifcond: Option<IfCond>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawArgs {
    Named(Named),
    Inline(Vec<RawMember>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DefKind {
    Enum {
        values: Vec<RawValue>,
        prefix: Option<String>,
    },
    Struct {
        base: Option<Named>,
        members: Vec<RawMember>,
    },
    Union {
        base: RawArgs,
        base_loc: Location,
        discriminator: Named,
        branches: Vec<RawBranch>,
    },
    Alternate {
        alternatives: Vec<RawBranch>,
    },
    Command {
        data: Option<RawArgs>,
        returns: Option<RawType>,
        boxed: bool,
        success_response: bool,
        gen_: bool,
        allow_oob: bool,
        allow_preconfig: bool,
        coroutine: bool,
    },
    Event {
        data: Option<RawArgs>,
        boxed: bool,
    },
}

/// One definition whose shape is valid.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Def {
    pub meta: Meta,
    pub name: String,
    pub name_loc: Location,
    /// The `{` of the definition.
    pub location: Location,
    pub doc: Option<DocBlock>,
    pub doc_broken: bool,
    pub ifcond: Option<IfCond>,
    pub features: Vec<Feature>,
    pub kind: DefKind,
}

fn quoted_sorted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = names.collect();
    v.sort_unstable();
    v.iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Required keys must be present, and no key outside `required` and
/// `optional` may be.
fn check_keys(
    dict: &Dict,
    loc: &Location,
    source: &dyn fmt::Display,
    required: &[&str],
    optional: &[&str],
) -> R<()> {
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|k| !dict.contains(k))
        .collect();
    if !missing.is_empty() {
        return Err(err(
            loc,
            format!(
                "{source} misses key{} {}",
                if missing.len() > 1 { "s" } else { "" },
                quoted_sorted(missing.into_iter())
            ),
        ));
    }
    let unknown: Vec<&qapi_parser::Key> = dict
        .keys()
        .filter(|k| !required.contains(&k.name.as_str()) && !optional.contains(&k.name.as_str()))
        .collect();
    if let Some(first) = unknown.first() {
        return Err(err(
            &first.location,
            format!(
                "{source} has unknown key{} {}\nValid keys are {}.",
                if unknown.len() > 1 { "s" } else { "" },
                quoted_sorted(unknown.iter().map(|k| k.name.as_str())),
                quoted_sorted(required.iter().chain(optional).copied())
            ),
        ));
    }
    Ok(())
}

fn check_if(dict: &Dict, source: &dyn fmt::Display) -> R<Option<IfCond>> {
    let Some(node) = dict.get("if") else {
        return Ok(None);
    };
    if_cond(node, source).map(Some)
}

fn if_cond(node: &Node, source: &dyn fmt::Display) -> R<IfCond> {
    match &node.value {
        Value::Str(s) => {
            if !names::is_config_symbol(s) {
                return Err(err(
                    &node.location,
                    format!("'if' condition '{s}' of {source} is not a valid identifier"),
                ));
            }
            Ok(IfCond::Name(s.clone()))
        }
        Value::Dict(d) => {
            check_keys(
                d,
                &node.location,
                &format!("'if' condition of {source}"),
                &[],
                &["all", "any", "not"],
            )?;
            if d.len() != 1 {
                return Err(err(
                    &node.location,
                    format!("'if' condition of {source} has conflicting keys"),
                ));
            }
            let (key, operand) = &d.entries[0];
            if key.name == "not" {
                return Ok(IfCond::Not(Box::new(if_cond(operand, source)?)));
            }
            let Some(list) = operand.as_list() else {
                return Err(err(
                    &operand.location,
                    format!("'{}' condition of {source} must be an array", key.name),
                ));
            };
            if list.is_empty() {
                return Err(err(
                    &operand.location,
                    format!("'if' condition [] of {source} is useless"),
                ));
            }
            let conds = list
                .iter()
                .map(|n| if_cond(n, source))
                .collect::<R<Vec<_>>>()?;
            Ok(if key.name == "all" {
                IfCond::All(conds)
            } else {
                IfCond::Any(conds)
            })
        }
        _ => Err(err(
            &node.location,
            format!("'if' condition of {source} must be a string or an object"),
        )),
    }
}

fn check_features(dict: &Dict) -> R<Vec<Feature>> {
    let Some(node) = dict.get("features") else {
        return Ok(Vec::new());
    };
    let Some(list) = node.as_list() else {
        return Err(err(&node.location, "'features' must be an array"));
    };
    let mut out = Vec::with_capacity(list.len());
    for f in list {
        let (name_node, ifcond) = match &f.value {
            Value::Dict(d) => {
                check_keys(d, &f.location, &"'features' member", &["name"], &["if"])?;
                let name_node = d
                    .get("name")
                    .ok_or_else(|| err(&f.location, "'features' member misses key 'name'"))?;
                let source = match name_node.as_str() {
                    Some(n) => format!("'features' member '{n}'"),
                    None => "'features' member".to_string(),
                };
                (name_node, check_if(d, &source)?)
            }
            _ => (f, None),
        };
        let Some(name) = name_node.as_str() else {
            return Err(err(
                &name_node.location,
                "'features' member requires a string name",
            ));
        };
        names::check_lower(name, &format!("'features' member '{name}'"), false, false)
            .map_err(|m| err(&name_node.location, m))?;
        out.push(Feature {
            name: name.to_string(),
            ifcond,
            location: name_node.location.clone(),
        });
    }
    Ok(out)
}

/// `check_type`: a type name, an array of one type name, or (where
/// `allow_dict`) an inline object; `Ok(None)` for the inline object, which
/// the caller handles.
fn check_type(
    node: &Node,
    source: &dyn fmt::Display,
    allow_array: bool,
    allow_dict: bool,
) -> R<Option<RawType>> {
    match &node.value {
        Value::Str(s) => Ok(Some(RawType {
            name: s.clone(),
            array: false,
            loc: node.location.clone(),
        })),
        Value::List(l) => {
            if !allow_array {
                return Err(err(&node.location, format!("{source} cannot be an array")));
            }
            match l.as_slice() {
                [one] => match one.as_str() {
                    Some(s) => Ok(Some(RawType {
                        name: s.to_string(),
                        array: true,
                        loc: one.location.clone(),
                    })),
                    None => Err(err(
                        &one.location,
                        format!("{source}: array type must contain single type name"),
                    )),
                },
                _ => Err(err(
                    &node.location,
                    format!("{source}: array type must contain single type name"),
                )),
            }
        }
        Value::Dict(_) if allow_dict => Ok(None),
        Value::Dict(_) | Value::Bool(_) if !allow_dict => Err(err(
            &node.location,
            format!("{source} should be a type name"),
        )),
        _ => Err(err(
            &node.location,
            format!("{source} should be an object or type name"),
        )),
    }
}

/// Members of an inline object (`'data': {...}`, an inline union base).
/// `permissive` lifts the naming rules (pragma member-name-exceptions).
fn check_members(node: &Node, source: &str, permissive: bool) -> R<Vec<RawMember>> {
    let Some(dict) = node.as_dict() else {
        return Err(err(
            &node.location,
            format!("{source} should be an object or type name"),
        ));
    };
    let mut out = Vec::with_capacity(dict.len());
    for (key, value) in &dict.entries {
        // Only written out in a message.
        let key_source = MemberSource {
            source,
            member: &key.name,
        };
        let key_source: &dyn fmt::Display = &key_source;
        let (name, optional) = match key.name.strip_prefix('*') {
            Some(n) => (n, true),
            None => (key.name.as_str(), false),
        };
        names::check_lower(name, key_source, permissive, permissive)
            .map_err(|m| err(&key.location, m))?;
        if name == "u" || names::c_name_starts_with(name, "has_") {
            return Err(err(
                &key.location,
                format!("{key_source} uses reserved name"),
            ));
        }
        let (ty_node, ifcond, features) = match &value.value {
            Value::Dict(d) => {
                check_keys(
                    d,
                    &value.location,
                    &key_source,
                    &["type"],
                    &["if", "features"],
                )?;
                let ifcond = check_if(d, &key_source)?;
                let features = check_features(d)?;
                let ty = d.get("type").ok_or_else(|| {
                    err(&value.location, format!("{key_source} misses key 'type'"))
                })?;
                (ty, ifcond, features)
            }
            _ => (value, None, Vec::new()),
        };
        let ty = check_type(ty_node, &key_source, true, false)?.ok_or_else(|| {
            err(
                &ty_node.location,
                format!("{key_source} should be a type name"),
            )
        })?;
        out.push(RawMember {
            name: name.to_string(),
            optional,
            loc: key.location.clone(),
            ty,
            ifcond,
            features,
        });
    }
    Ok(out)
}

/// `{source} member '{member}'`, written only when a message needs it.
struct MemberSource<'s> {
    source: &'s str,
    member: &'s str,
}

impl fmt::Display for MemberSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} member '{}'", self.source, self.member)
    }
}

/// `'data'` of a command or event: inline members or a type name.
fn check_args(node: &Node, boxed: bool) -> R<RawArgs> {
    match check_type(node, &"'data'", false, !boxed)? {
        Some(t) => Ok(RawArgs::Named(Named {
            name: t.name,
            loc: t.loc,
        })),
        None => Ok(RawArgs::Inline(check_members(node, "'data'", false)?)),
    }
}

/// Union branches and alternatives (`'data': { 'name': 'Type' }`).
fn check_branches(node: &Node, name_rule: bool, allow_array: bool) -> R<Vec<RawBranch>> {
    let Some(dict) = node.as_dict() else {
        return Err(err(&node.location, "'data' must be an object"));
    };
    let mut out = Vec::with_capacity(dict.len());
    for (key, value) in &dict.entries {
        let source = format!("'data' member '{}'", key.name);
        if name_rule {
            names::check_lower(&key.name, &source, false, false)
                .map_err(|m| err(&key.location, m))?;
        }
        let (ty_node, ifcond) = match &value.value {
            Value::Dict(d) => {
                check_keys(d, &value.location, &source, &["type"], &["if"])?;
                let ifcond = check_if(d, &source)?;
                let ty = d
                    .get("type")
                    .ok_or_else(|| err(&value.location, format!("{source} misses key 'type'")))?;
                (ty, ifcond)
            }
            _ => (value, None),
        };
        let ty = check_type(ty_node, &source, allow_array, false)?
            .ok_or_else(|| err(&ty_node.location, format!("{source} should be a type name")))?;
        out.push(RawBranch {
            name: key.name.clone(),
            loc: key.location.clone(),
            ty,
            ifcond,
        });
    }
    Ok(out)
}

fn check_enum_values(node: &Node, permissive: bool) -> R<Vec<RawValue>> {
    let Some(list) = node.as_list() else {
        return Err(err(&node.location, "'data' must be an array"));
    };
    let mut out = Vec::with_capacity(list.len());
    for v in list {
        let (name_node, dict) = match &v.value {
            Value::Dict(d) => {
                check_keys(
                    d,
                    &v.location,
                    &"'data' member",
                    &["name"],
                    &["if", "features"],
                )?;
                let n = d
                    .get("name")
                    .ok_or_else(|| err(&v.location, "'data' member misses key 'name'"))?;
                (n, Some(d))
            }
            _ => (v, None),
        };
        let Some(name) = name_node.as_str() else {
            return Err(err(
                &name_node.location,
                "'data' member requires a string name",
            ));
        };
        let source = format!("'data' member '{name}'");
        // Enum values may start with a digit.
        let checked = if name.starts_with(|c: char| c.is_ascii_digit()) {
            format!("d{name}")
        } else {
            name.to_string()
        };
        names::check_lower(&checked, &source, permissive, permissive)
            .map_err(|m| err(&name_node.location, m))?;
        let (ifcond, features) = match dict {
            Some(d) => (check_if(d, &source)?, check_features(d)?),
            None => (None, Vec::new()),
        };
        out.push(RawValue {
            name: name.to_string(),
            loc: name_node.location.clone(),
            ifcond,
            features,
        });
    }
    Ok(out)
}

/// `gen`/`success-response` only `false`; `boxed`, `allow-oob`,
/// `allow-preconfig`, `coroutine` only `true`.
fn check_flags(dict: &Dict) -> R<()> {
    for key in ["gen", "success-response"] {
        if let Some(v) = dict.get(key)
            && v.as_bool() != Some(false)
        {
            return Err(err(
                &v.location,
                format!("flag '{key}' may only use false value"),
            ));
        }
    }
    for key in ["boxed", "allow-oob", "allow-preconfig", "coroutine"] {
        if let Some(v) = dict.get(key)
            && v.as_bool() != Some(true)
        {
            return Err(err(
                &v.location,
                format!("flag '{key}' may only use true value"),
            ));
        }
    }
    if dict.contains("allow-oob")
        && let Some(k) = dict.key("coroutine")
    {
        return Err(err(
            &k.location,
            "flags 'allow-oob' and 'coroutine' are incompatible",
        ));
    }
    Ok(())
}

/// Checks one top-level expression.
pub(crate) fn check_expr(expr: &TopExpr, pragmas: &Pragmas) -> R<Def> {
    let node = &expr.node;
    let loc = &node.location;
    let Some(dict) = node.as_dict() else {
        return Err(err(loc, "top-level expression must be an object"));
    };
    let metas: Vec<Meta> = Meta::ALL
        .into_iter()
        .filter(|m| dict.contains(m.as_str()))
        .collect();
    let [meta] = metas.as_slice() else {
        return Err(err(
            loc,
            "expression must have exactly one key 'enum', 'struct', 'union', 'alternate', 'command', 'event'",
        ));
    };
    let meta = *meta;
    let m = meta.as_str();
    let name_node = dict
        .get(m)
        .ok_or_else(|| err(loc, "expression is missing metatype"))?;
    let Some(name) = name_node.as_str() else {
        return Err(err(
            &name_node.location,
            format!("'{m}' requires a string name"),
        ));
    };
    let name_loc = &name_node.location;
    // From here on, errors are about this definition (QEMU's `In KIND
    // 'NAME':`), except those located in its doc comment's sections.
    let in_definition = |e: Error| e.in_definition(m, name);
    check_definition_name(meta, name, pragmas).map_err(|msg| in_definition(err(name_loc, msg)))?;
    check_doc_comment(expr, dict, meta, name, pragmas.doc_required)?;
    let (kind, ifcond, features) =
        check_definition(dict, loc, meta, name, pragmas).map_err(in_definition)?;
    Ok(Def {
        meta,
        name: name.to_string(),
        name_loc: name_loc.clone(),
        location: loc.clone(),
        doc: expr.doc.clone(),
        doc_broken: expr.doc_broken,
        ifcond,
        features,
        kind,
    })
}

/// The name rules of each kind of definition.
fn check_definition_name(meta: Meta, name: &str, pragmas: &Pragmas) -> Result<(), String> {
    let m = meta.as_str();
    match meta {
        Meta::Event => names::check_upper(name, m),
        // Upper case is never permitted; the pragma permits `_` only.
        Meta::Command => names::check_lower(
            name,
            &m,
            false,
            pragmas.command_name_exceptions.iter().any(|n| n == name),
        ),
        _ => names::check_camel(name, m).and_then(|()| {
            if name.ends_with("List") {
                Err(format!("{m} name should not end in 'List'"))
            } else {
                Ok(())
            }
        }),
    }
}

/// The doc comment against its definition: it names it, and only a command
/// that returns something has a `Returns` section (only commands have
/// `Errors`); it is required where the `doc-required` pragma says so.
fn check_doc_comment(
    expr: &TopExpr,
    dict: &Dict,
    meta: Meta,
    name: &str,
    doc_required: bool,
) -> R<()> {
    let in_definition = |e: Error| e.in_definition(meta.as_str(), name);
    let Some(doc) = &expr.doc else {
        if doc_required && !expr.doc_broken {
            return Err(in_definition(err(
                &expr.node.location,
                "documentation comment required",
            )));
        }
        return Ok(());
    };
    if doc.symbol.as_deref() != Some(name) {
        return Err(in_definition(err(
            &doc.location,
            format!(
                "documentation comment is for '{}'",
                doc.symbol.as_deref().unwrap_or_default()
            ),
        )));
    }
    let section = |tag: &str| doc.sections.iter().find(|s| s.tag.as_deref() == Some(tag));
    if meta == Meta::Command {
        if let Some(s) = section("Returns")
            && !dict.contains("returns")
        {
            return Err(err(
                &s.location,
                "'Returns' section, but command doesn't return anything",
            ));
        }
    } else {
        for tag in ["Returns", "Errors"] {
            if let Some(s) = section(tag) {
                return Err(err(
                    &s.location,
                    format!("'{tag}' section is only valid for commands"),
                ));
            }
        }
    }
    Ok(())
}

/// The keys and values of one definition of kind `meta`.
fn check_definition(
    dict: &Dict,
    loc: &Location,
    meta: Meta,
    name: &str,
    pragmas: &Pragmas,
) -> R<(DefKind, Option<IfCond>, Vec<Feature>)> {
    let m = meta.as_str();
    let permissive = pragmas.member_name_exceptions.iter().any(|n| n == name);
    let kind = match meta {
        Meta::Enum => {
            check_keys(
                dict,
                loc,
                &m,
                &["enum", "data"],
                &["if", "features", "prefix"],
            )?;
            let data = dict
                .get("data")
                .ok_or_else(|| err(loc, "enum misses key 'data'"))?;
            let values = check_enum_values(data, permissive)?;
            let prefix = match dict.get("prefix") {
                None => None,
                Some(p) => match p.as_str() {
                    Some(s) => Some(s.to_string()),
                    None => return Err(err(&p.location, "'prefix' must be a string")),
                },
            };
            DefKind::Enum { values, prefix }
        }
        Meta::Struct => {
            check_keys(
                dict,
                loc,
                &m,
                &["struct", "data"],
                &["base", "if", "features"],
            )?;
            let data = dict
                .get("data")
                .ok_or_else(|| err(loc, "struct misses key 'data'"))?;
            if data.as_dict().is_none() {
                return Err(err(
                    &data.location,
                    match data.value {
                        Value::Str(_) => "'data' of a struct must be an object".to_string(),
                        _ => "'data' should be an object or type name".to_string(),
                    },
                ));
            }
            let members = check_members(data, "'data'", permissive)?;
            let base = match dict.get("base") {
                None => None,
                Some(b) => check_type(b, &"'base'", false, false)?.map(|t| Named {
                    name: t.name,
                    loc: t.loc,
                }),
            };
            DefKind::Struct { base, members }
        }
        Meta::Union => {
            check_keys(
                dict,
                loc,
                &m,
                &["union", "base", "discriminator", "data"],
                &["if", "features"],
            )?;
            let base_node = dict
                .get("base")
                .ok_or_else(|| err(loc, "union misses key 'base'"))?;
            let base = match check_type(base_node, &"'base'", false, true)? {
                Some(t) => RawArgs::Named(Named {
                    name: t.name,
                    loc: t.loc,
                }),
                None => RawArgs::Inline(check_members(base_node, "'base'", permissive)?),
            };
            let disc = dict
                .get("discriminator")
                .ok_or_else(|| err(loc, "union misses key 'discriminator'"))?;
            let Some(disc_name) = disc.as_str() else {
                return Err(err(
                    &disc.location,
                    "'discriminator' requires a string name",
                ));
            };
            let data = dict
                .get("data")
                .ok_or_else(|| err(loc, "union misses key 'data'"))?;
            let branches = check_branches(data, false, false)?;
            DefKind::Union {
                base,
                base_loc: base_node.location.clone(),
                discriminator: Named {
                    name: disc_name.to_string(),
                    loc: disc.location.clone(),
                },
                branches,
            }
        }
        Meta::Alternate => {
            check_keys(dict, loc, &m, &["alternate", "data"], &["if", "features"])?;
            let data = dict
                .get("data")
                .ok_or_else(|| err(loc, "alternate misses key 'data'"))?;
            let empty = match &data.value {
                Value::Dict(d) => d.is_empty(),
                Value::List(l) => l.is_empty(),
                Value::Str(s) => s.is_empty(),
                Value::Bool(b) => !b,
            };
            if empty {
                return Err(err(&data.location, "'data' must not be empty"));
            }
            DefKind::Alternate {
                alternatives: check_branches(data, true, true)?,
            }
        }
        Meta::Command => {
            check_keys(
                dict,
                loc,
                &m,
                &["command"],
                &[
                    "data",
                    "returns",
                    "boxed",
                    "if",
                    "features",
                    "gen",
                    "success-response",
                    "allow-oob",
                    "allow-preconfig",
                    "coroutine",
                ],
            )?;
            let boxed = dict.get("boxed").and_then(Node::as_bool).unwrap_or(false);
            let data = dict.get("data");
            if boxed && data.is_none() {
                let k = dict.key("boxed").map(|k| &k.location).unwrap_or(loc);
                return Err(err(k, "'boxed': true requires 'data'"));
            }
            let data = data.map(|d| check_args(d, boxed)).transpose()?;
            let returns = match dict.get("returns") {
                None => None,
                Some(r) => check_type(r, &"'returns'", true, false)?,
            };
            let flag =
                |k: &str, default: bool| dict.get(k).and_then(Node::as_bool).unwrap_or(default);
            DefKind::Command {
                data,
                returns,
                boxed,
                success_response: flag("success-response", true),
                gen_: flag("gen", true),
                allow_oob: flag("allow-oob", false),
                allow_preconfig: flag("allow-preconfig", false),
                coroutine: flag("coroutine", false),
            }
        }
        Meta::Event => {
            check_keys(
                dict,
                loc,
                &m,
                &["event"],
                &["data", "boxed", "if", "features"],
            )?;
            let boxed = dict.get("boxed").and_then(Node::as_bool).unwrap_or(false);
            let data = dict.get("data");
            if boxed && data.is_none() {
                let k = dict.key("boxed").map(|k| &k.location).unwrap_or(loc);
                return Err(err(k, "'boxed': true requires 'data'"));
            }
            DefKind::Event {
                data: data.map(|d| check_args(d, boxed)).transpose()?,
                boxed,
            }
        }
    };
    let ifcond = check_if(dict, &m)?;
    let features = check_features(dict)?;
    check_flags(dict)?;
    Ok((kind, ifcond, features))
}
