//! The `query-qmp-schema` answer (QEMU's `SchemaInfo` list) computed at generation time.
//!
//! Same algorithm as QEMU: commands and events in schema order, then every
//! type they use, transitively, in order of first use. Type names are masked
//! as numbers in order of first use; every integer type reads as `int`;
//! implicit argument types and the empty object get numbers too. Conditions
//! are not reported (the answer is `if`-less).

use crate::context::Context;
use proc_macro2::TokenStream;
use qapi_model::{ArgType, Builtin, Entity, Feature, Member, TypeRef};
use quote::quote;
use std::collections::{HashMap, HashSet};

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

/// An object member (`SchemaInfoObjectMember`).
struct MemberInfo<'a> {
    name: &'a str,
    ty: String,
    optional: bool,
    features: &'a [Feature],
}

/// One `SchemaInfo`, its members in the order QEMU prints them (sorted).
enum Info<'a> {
    Builtin {
        name: &'static str,
        json_type: &'static str,
    },
    Array {
        name: String,
        element: String,
    },
    Object {
        name: String,
        members: Vec<MemberInfo<'a>>,
        /// The discriminator and the `(case, type)` variants of a union.
        variants: Option<(&'a str, Vec<(&'a str, String)>)>,
        features: &'a [Feature],
    },
    Enum {
        name: String,
        values: Vec<(&'a str, &'a [Feature])>,
        features: &'a [Feature],
    },
    Alternate {
        name: String,
        members: Vec<String>,
        features: &'a [Feature],
    },
    Command {
        name: &'a str,
        arg_type: String,
        ret_type: String,
        allow_oob: bool,
        features: &'a [Feature],
    },
    Event {
        name: &'a str,
        arg_type: String,
        features: &'a [Feature],
    },
}

struct Introspection<'a, 'c> {
    cx: &'c Context<'a>,
    used: Vec<Used<'a>>,
    /// The keys of `used`.
    seen: HashSet<String>,
    masks: HashMap<String, usize>,
    out: Vec<Info<'a>>,
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

    fn member(&mut self, m: &'a Member) -> MemberInfo<'a> {
        MemberInfo {
            name: &m.name,
            ty: self.use_ref(&m.ty),
            optional: m.optional,
            features: &m.features,
        }
    }

    fn visit_entities(&mut self) {
        let schema = self.cx.schema;
        for entity in &schema.entities {
            match entity {
                Entity::Command(c) => {
                    let arg_type = self.use_type(Self::arg_type(&c.common.name, &c.args));
                    let ret_type = match &c.returns {
                        Some(t) => self.use_ref(t),
                        None => self.use_type(Used::Empty),
                    };
                    self.out.push(Info::Command {
                        name: &c.common.name,
                        arg_type,
                        ret_type,
                        allow_oob: c.allow_oob,
                        features: &c.common.features,
                    });
                }
                Entity::Event(e) => {
                    let arg_type = self.use_type(Self::arg_type(&e.common.name, &e.data));
                    self.out.push(Info::Event {
                        name: &e.common.name,
                        arg_type,
                        features: &e.common.features,
                    });
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

    fn visit_object(&mut self, name: String, members: Vec<&'a Member>, features: &'a [Feature]) {
        let members = members.into_iter().map(|m| self.member(m)).collect();
        self.out.push(Info::Object {
            name,
            members,
            variants: None,
            features,
        });
    }

    fn visit_type(&mut self, used: Used<'a>) {
        match used {
            Used::Builtin(b) => self.out.push(Info::Builtin {
                name: b.name(),
                json_type: b.json_type(),
            }),
            Used::Array(inner) => {
                let element = self.use_type(*inner);
                self.out.push(Info::Array {
                    name: format!("[{element}]"),
                    element,
                });
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
                    Some(Entity::Enum(e)) => self.out.push(Info::Enum {
                        name,
                        values: e.values.iter().map(|v| (&*v.name, &*v.features)).collect(),
                        features: &e.common.features,
                    }),
                    Some(Entity::Struct(s)) => {
                        self.visit_object(name, self.cx.all_members(n), &s.common.features);
                    }
                    Some(Entity::Union(u)) => {
                        let members = self
                            .cx
                            .union_base_members(u)
                            .into_iter()
                            .map(|m| self.member(m))
                            .collect();
                        let mut variants: Vec<(&str, String)> = u
                            .branches
                            .iter()
                            .map(|b| (&*b.name, self.use_type(Used::Named(&b.ty))))
                            .collect();
                        // Like QEMU, discriminator values without a branch
                        // get the empty object, after the explicit branches.
                        if let Some(Entity::Enum(e)) = self.cx.entity(&u.discriminator_enum) {
                            for v in &e.values {
                                if !u.branches.iter().any(|b| b.name == v.name) {
                                    let empty = self.use_type(Used::Empty);
                                    variants.push((&v.name, empty));
                                }
                            }
                        }
                        self.out.push(Info::Object {
                            name,
                            members,
                            variants: Some((&u.discriminator, variants)),
                            features: &u.common.features,
                        });
                    }
                    Some(Entity::Alternate(a)) => {
                        let members = a
                            .alternatives
                            .iter()
                            .map(|alt| self.use_ref(&alt.ty))
                            .collect();
                        self.out.push(Info::Alternate {
                            name,
                            members,
                            features: &a.common.features,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// JSON text laid out as `serde_json::to_string_pretty` lays it out (two
/// spaces a level), written directly.
struct Pretty {
    out: String,
    depth: usize,
    /// Whether the innermost open array or object has an element yet.
    nonempty: Vec<bool>,
}

impl Pretty {
    fn newline(&mut self) {
        self.out.push('\n');
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
    }

    /// Before an element of the innermost array or object.
    fn element(&mut self) {
        if let Some(nonempty) = self.nonempty.last_mut() {
            if *nonempty {
                self.out.push(',');
            }
            *nonempty = true;
            self.newline();
        }
    }

    fn open(&mut self, bracket: char) {
        self.out.push(bracket);
        self.depth += 1;
        self.nonempty.push(false);
    }

    fn close(&mut self, bracket: char) {
        self.depth -= 1;
        if self.nonempty.pop() == Some(true) {
            self.newline();
        }
        self.out.push(bracket);
    }

    fn key(&mut self, key: &str) {
        self.element();
        self.string(key);
        self.out.push_str(": ");
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if u32::from(c) < 0x20 => {
                    self.out.push_str(&format!("\\u{:04x}", u32::from(c)));
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn field(&mut self, key: &str, value: &str) {
        self.key(key);
        self.string(value);
    }

    fn strings<'s>(&mut self, key: &str, values: impl IntoIterator<Item = &'s str>) {
        self.key(key);
        self.open('[');
        for v in values {
            self.element();
            self.string(v);
        }
        self.close(']');
    }

    fn features(&mut self, features: &[Feature]) {
        if !features.is_empty() {
            self.strings("features", features.iter().map(|f| f.name.as_str()));
        }
    }

    fn info(&mut self, info: &Info) {
        self.element();
        self.open('{');
        match info {
            Info::Builtin { name, json_type } => {
                self.field("json-type", json_type);
                self.field("meta-type", "builtin");
                self.field("name", name);
            }
            Info::Array { name, element } => {
                self.field("element-type", element);
                self.field("meta-type", "array");
                self.field("name", name);
            }
            Info::Object {
                name,
                members,
                variants,
                features,
            } => {
                self.features(features);
                self.key("members");
                self.open('[');
                for m in members {
                    self.element();
                    self.open('{');
                    if m.optional {
                        self.key("default");
                        self.out.push_str("null");
                    }
                    self.features(m.features);
                    self.field("name", m.name);
                    self.field("type", &m.ty);
                    self.close('}');
                }
                self.close(']');
                self.field("meta-type", "object");
                self.field("name", name);
                if let Some((tag, variants)) = variants {
                    self.field("tag", tag);
                    self.key("variants");
                    self.open('[');
                    for (case, ty) in variants {
                        self.element();
                        self.open('{');
                        self.field("case", case);
                        self.field("type", ty);
                        self.close('}');
                    }
                    self.close(']');
                }
            }
            Info::Enum {
                name,
                values,
                features,
            } => {
                self.features(features);
                self.key("members");
                self.open('[');
                for (value, features) in values {
                    self.element();
                    self.open('{');
                    self.features(features);
                    self.field("name", value);
                    self.close('}');
                }
                self.close(']');
                self.field("meta-type", "enum");
                self.field("name", name);
                self.strings("values", values.iter().map(|(v, _)| *v));
            }
            Info::Alternate {
                name,
                members,
                features,
            } => {
                self.features(features);
                self.key("members");
                self.open('[');
                for ty in members {
                    self.element();
                    self.open('{');
                    self.field("type", ty);
                    self.close('}');
                }
                self.close(']');
                self.field("meta-type", "alternate");
                self.field("name", name);
            }
            Info::Command {
                name,
                arg_type,
                ret_type,
                allow_oob,
                features,
            } => {
                if *allow_oob {
                    self.key("allow-oob");
                    self.out.push_str("true");
                }
                self.field("arg-type", arg_type);
                self.features(features);
                self.field("meta-type", "command");
                self.field("name", name);
                self.field("ret-type", ret_type);
            }
            Info::Event {
                name,
                arg_type,
                features,
            } => {
                self.field("arg-type", arg_type);
                self.features(features);
                self.field("meta-type", "event");
                self.field("name", name);
            }
        }
        self.close('}');
    }
}

/// The items of the introspection module: `QMP_SCHEMA_JSON` and `qmp_schema()`.
pub fn items(cx: &Context) -> TokenStream {
    let json = raw_string_literal(&schema_json(cx));
    quote! {
        /// `query-qmp-schema`'s answer as JSON text (QEMU's `SchemaInfo` list,
        /// type names masked as numbers).
        pub const QMP_SCHEMA_JSON: &str = #json;
        /// `query-qmp-schema`'s answer.
        pub fn qmp_schema() -> ::serde_json::Value {
            ::serde_json::from_str(QMP_SCHEMA_JSON).unwrap_or(::serde_json::Value::Null)
        }
    }
}

/// `text` as a raw string literal (`r#"..."#`), so multi-line data stays readable in diffs.
fn raw_string_literal(text: &str) -> proc_macro2::Literal {
    let mut hashes = String::from("#");
    while text.contains(&format!("\"{hashes}")) {
        hashes.push('#');
    }
    let source = format!("r{hashes}\"{text}\"{hashes}");
    source
        .parse()
        .unwrap_or_else(|_| proc_macro2::Literal::string(text))
}

/// The `query-qmp-schema` answer for the schema in `cx`, as JSON text laid
/// out like `serde_json::to_string_pretty` (object keys sorted, as QEMU
/// prints its schema literal).
pub fn schema_json(cx: &Context) -> String {
    let mut intro = Introspection {
        cx,
        used: Vec::new(),
        seen: HashSet::new(),
        masks: HashMap::new(),
        out: Vec::new(),
    };
    intro.visit_entities();
    intro.visit_used();
    let mut json = Pretty {
        out: String::with_capacity(intro.out.len() * 200),
        depth: 0,
        nonempty: Vec::new(),
    };
    json.open('[');
    for info in &intro.out {
        json.info(info);
    }
    json.close(']');
    json.out
}

#[cfg(test)]
mod tests {
    use super::Pretty;

    /// Strings are escaped exactly as serde_json escapes them.
    #[test]
    fn strings_are_escaped_like_serde_json() {
        let samples = [
            "plain",
            "q\"uote",
            "back\\slash",
            "nl\ncr\rtab\t",
            "\u{1}\u{8}\u{c}\u{1f}",
            "é ü \u{7f}",
        ];
        for s in samples {
            let mut json = Pretty {
                out: String::new(),
                depth: 0,
                nonempty: Vec::new(),
            };
            json.string(s);
            assert_eq!(
                json.out,
                serde_json::to_string(s).expect("serialises"),
                "{s:?}"
            );
        }
    }

    /// Nesting, empty lists and separators as `to_string_pretty` prints them.
    #[test]
    fn layout_matches_to_string_pretty() {
        let mut json = Pretty {
            out: String::new(),
            depth: 0,
            nonempty: Vec::new(),
        };
        json.open('[');
        json.element();
        json.open('{');
        json.key("members");
        json.open('[');
        json.close(']');
        json.strings("values", ["a", "b"]);
        json.field("name", "x");
        json.close('}');
        json.close(']');
        let expected = serde_json::json!([{"members": [], "values": ["a", "b"], "name": "x"}]);
        assert_eq!(
            json.out,
            serde_json::to_string_pretty(&expected).expect("serialises")
        );
    }
}
