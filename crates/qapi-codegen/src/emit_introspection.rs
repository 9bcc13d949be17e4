//! The `query-qmp-schema` answer (QEMU's `SchemaInfo` list) computed at generation time.
//!
//! Same algorithm as QEMU: commands and events in schema order, then every
//! type they use, transitively, in order of first use. Type names are masked
//! as numbers in order of first use; every integer type reads as `int`;
//! implicit argument types and the empty object get numbers too. Conditions
//! are not reported (the answer is `if`-less).

use crate::context::Context;
use qapi_model::{ArgType, Builtin, Entity, Feature, Member, TypeRef};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashSet};

/// A type as introspection sees it.
#[derive(Debug, Clone, PartialEq)]
enum Used<'a> {
    Builtin(Builtin),
    Named(&'a str),
    Array(Box<Used<'a>>),
    /// QEMU's `q_empty`.
    Empty,
    /// The implicit object of an inline `data`, keyed by its owner's name.
    Implicit(&'a str, &'a [Member]),
}

struct Introspection<'a, 'c> {
    cx: &'c Context<'a>,
    used: Vec<Used<'a>>,
    /// The keys of `used`.
    seen: HashSet<String>,
    masks: BTreeMap<String, usize>,
    out: Vec<Value>,
}

impl<'a, 'c> Introspection<'a, 'c> {
    fn mask(&mut self, key: String) -> String {
        let next = self.masks.len();
        self.masks.entry(key).or_insert(next).to_string()
    }

    fn key(used: &Used) -> String {
        match used {
            Used::Builtin(b) => b.name().to_string(),
            Used::Named(n) => n.to_string(),
            Used::Array(inner) => format!("{}List", Self::key(inner)),
            Used::Empty => "q_empty".to_string(),
            Used::Implicit(owner, _) => format!("q_obj_{owner}-arg"),
        }
    }

    fn normalise(used: Used<'a>) -> Used<'a> {
        match used {
            Used::Builtin(b) if b.json_type() == "int" => Used::Builtin(Builtin::Int),
            Used::Array(inner) => Used::Array(Box::new(Self::normalise(*inner))),
            other => other,
        }
    }

    fn use_type(&mut self, used: Used<'a>) -> String {
        let used = Self::normalise(used);
        if self.seen.insert(Self::key(&used)) {
            self.used.push(used.clone());
        }
        match &used {
            Used::Builtin(b) => b.name().to_string(),
            Used::Array(inner) => format!("[{}]", self.use_type((**inner).clone())),
            other => self.mask(Self::key(other)),
        }
    }

    fn use_ref(&mut self, ty: &'a TypeRef) -> String {
        self.use_type(Self::from_ref(ty))
    }

    fn from_ref(ty: &'a TypeRef) -> Used<'a> {
        match ty {
            TypeRef::Builtin(b) => Used::Builtin(*b),
            TypeRef::Named(n) => Used::Named(n),
            TypeRef::Array(inner) => Used::Array(Box::new(Self::from_ref(inner))),
        }
    }

    fn arg_type(owner: &'a str, data: &'a Option<ArgType>) -> Used<'a> {
        match data {
            None => Used::Empty,
            Some(ArgType::Inline(m)) if m.is_empty() => Used::Empty,
            Some(ArgType::Inline(m)) => Used::Implicit(owner, m),
            Some(ArgType::Named(n)) => Used::Named(n),
        }
    }

    fn features(features: &[Feature]) -> Option<Value> {
        if features.is_empty() {
            None
        } else {
            Some(Value::Array(
                features
                    .iter()
                    .map(|f| Value::from(f.name.clone()))
                    .collect(),
            ))
        }
    }

    fn member(&mut self, m: &'a Member) -> Value {
        let mut obj = Map::new();
        obj.insert("name".into(), m.name.clone().into());
        obj.insert("type".into(), self.use_ref(&m.ty).into());
        if m.optional {
            obj.insert("default".into(), Value::Null);
        }
        if let Some(f) = Self::features(&m.features) {
            obj.insert("features".into(), f);
        }
        Value::Object(obj)
    }

    fn push(
        &mut self,
        mut obj: Map<String, Value>,
        name: String,
        meta: &str,
        features: &[Feature],
    ) {
        obj.insert("name".into(), name.into());
        obj.insert("meta-type".into(), meta.into());
        if let Some(f) = Self::features(features) {
            obj.insert("features".into(), f);
        }
        self.out.push(Value::Object(obj));
    }

    fn visit_entities(&mut self) {
        let schema = self.cx.schema;
        for entity in &schema.entities {
            match entity {
                Entity::Command(c) => {
                    let mut obj = Map::new();
                    let arg = Self::arg_type(&c.common.name, &c.args);
                    obj.insert("arg-type".into(), self.use_type(arg).into());
                    let ret = match &c.returns {
                        Some(t) => self.use_ref(t),
                        None => self.use_type(Used::Empty),
                    };
                    obj.insert("ret-type".into(), ret.into());
                    if c.allow_oob {
                        obj.insert("allow-oob".into(), true.into());
                    }
                    self.push(obj, c.common.name.clone(), "command", &c.common.features);
                }
                Entity::Event(e) => {
                    let mut obj = Map::new();
                    let arg = Self::arg_type(&e.common.name, &e.data);
                    obj.insert("arg-type".into(), self.use_type(arg).into());
                    self.push(obj, e.common.name.clone(), "event", &e.common.features);
                }
                _ => {}
            }
        }
    }

    fn visit_used(&mut self) {
        let mut i = 0;
        while i < self.used.len() {
            let used = self.used[i].clone();
            i += 1;
            self.visit_type(used);
        }
    }

    fn visit_object(&mut self, name: String, members: Vec<&'a Member>, features: &[Feature]) {
        let members: Vec<Value> = members.into_iter().map(|m| self.member(m)).collect();
        let mut obj = Map::new();
        obj.insert("members".into(), Value::Array(members));
        self.push(obj, name, "object", features);
    }

    fn visit_type(&mut self, used: Used<'a>) {
        match used {
            Used::Builtin(b) => {
                let mut obj = Map::new();
                obj.insert("json-type".into(), b.json_type().into());
                self.push(obj, b.name().to_string(), "builtin", &[]);
            }
            Used::Array(inner) => {
                let element = self.use_type(*inner);
                let mut obj = Map::new();
                obj.insert("element-type".into(), element.clone().into());
                self.push(obj, format!("[{element}]"), "array", &[]);
            }
            Used::Empty => {
                let name = self.mask(Self::key(&Used::Empty));
                self.visit_object(name, Vec::new(), &[]);
            }
            Used::Implicit(owner, members) => {
                let name = self.mask(Self::key(&Used::Implicit(owner, members)));
                self.visit_object(name, members.iter().collect(), &[]);
            }
            Used::Named(n) => {
                let name = self.mask(n.to_string());
                match self.cx.entity(n) {
                    Some(Entity::Enum(e)) => {
                        let members: Vec<Value> = e
                            .values
                            .iter()
                            .map(|v| {
                                let mut m = Map::new();
                                m.insert("name".into(), v.name.clone().into());
                                if let Some(f) = Self::features(&v.features) {
                                    m.insert("features".into(), f);
                                }
                                Value::Object(m)
                            })
                            .collect();
                        let values: Vec<Value> =
                            e.values.iter().map(|v| v.name.clone().into()).collect();
                        let mut obj = Map::new();
                        obj.insert("members".into(), Value::Array(members));
                        obj.insert("values".into(), Value::Array(values));
                        self.push(obj, name, "enum", &e.common.features);
                    }
                    Some(Entity::Struct(s)) => {
                        self.visit_object(name, self.cx.all_members(n), &s.common.features);
                    }
                    Some(Entity::Union(u)) => {
                        let members: Vec<Value> = self
                            .cx
                            .union_base_members(u)
                            .into_iter()
                            .map(|m| self.member(m))
                            .collect();
                        let mut variants: Vec<Value> = u
                            .branches
                            .iter()
                            .map(|b| json!({"case": b.name, "type": self.use_type(Used::Named(&b.ty))}))
                            .collect();
                        // Like QEMU, discriminator values without a branch
                        // get the empty object, after the explicit branches.
                        if let Some(Entity::Enum(e)) = self.cx.entity(&u.discriminator_enum) {
                            for v in &e.values {
                                if !u.branches.iter().any(|b| b.name == v.name) {
                                    let empty = self.use_type(Used::Empty);
                                    variants.push(json!({"case": v.name, "type": empty}));
                                }
                            }
                        }
                        let mut obj = Map::new();
                        obj.insert("members".into(), Value::Array(members));
                        obj.insert("tag".into(), u.discriminator.clone().into());
                        obj.insert("variants".into(), Value::Array(variants));
                        self.push(obj, name, "object", &u.common.features);
                    }
                    Some(Entity::Alternate(a)) => {
                        let members: Vec<Value> = a
                            .alternatives
                            .iter()
                            .map(|alt| json!({"type": self.use_ref(&alt.ty)}))
                            .collect();
                        let mut obj = Map::new();
                        obj.insert("members".into(), Value::Array(members));
                        self.push(obj, name, "alternate", &a.common.features);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Sorts object keys recursively, in place, as QEMU prints its schema literal.
fn sort_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

/// The `query-qmp-schema` answer for the schema in `cx`.
pub fn schema_info(cx: &Context) -> Value {
    let mut intro = Introspection {
        cx,
        used: Vec::new(),
        seen: HashSet::new(),
        masks: BTreeMap::new(),
        out: Vec::new(),
    };
    intro.visit_entities();
    intro.visit_used();
    let mut info = Value::Array(intro.out);
    sort_keys(&mut info);
    info
}
