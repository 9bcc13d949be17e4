//! The checked schema: every entity resolved, named, and linked.
//!
//! This module is the contract between the front end (parser + checks) and
//! the code generator. Everything here has passed every check QEMU's
//! generator makes, so the generator may rely on it: names are unique after
//! normalisation, every type reference resolves, discriminators and branches
//! agree, alternates are distinguishable.
//!
//! Entities appear in [`Schema::entities`] in definition order (includes
//! expanded in place), which is the order generated code uses. Implicit
//! object types (the anonymous `data` of commands and events, an inline
//! union base) are not separate entities: they are stored inline as
//! [`ArgType::Inline`] / [`UnionBase::Inline`].

use qapi_parser::Location;
use std::collections::BTreeMap;

/// A whole checked schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    /// User-defined entities in definition order.
    pub entities: Vec<Entity>,
    /// Every `pragma` seen, merged.
    pub pragma: Pragma,
    /// Top-level doc blocks that are not attached to a definition
    /// (section headings like `# = Block devices` and free-form text),
    /// in order, with the index into `entities` they precede.
    pub free_docs: Vec<(usize, Doc)>,
}

impl Schema {
    /// Find a user-defined entity by name.
    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entities.iter().find(|e| e.name() == name)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pragma {
    pub doc_required: bool,
    pub command_name_exceptions: Vec<String>,
    pub command_returns_exceptions: Vec<String>,
    pub documentation_exceptions: Vec<String>,
    pub member_name_exceptions: Vec<String>,
}

/// One named definition.
#[derive(Debug, Clone, PartialEq)]
pub enum Entity {
    Enum(EnumType),
    Struct(StructType),
    Union(UnionType),
    Alternate(AlternateType),
    Command(Command),
    Event(Event),
}

impl Entity {
    pub fn name(&self) -> &str {
        &self.common().name
    }
    pub fn common(&self) -> &Common {
        match self {
            Entity::Enum(e) => &e.common,
            Entity::Struct(e) => &e.common,
            Entity::Union(e) => &e.common,
            Entity::Alternate(e) => &e.common,
            Entity::Command(e) => &e.common,
            Entity::Event(e) => &e.common,
        }
    }
}

/// What every definition has.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// Name as written in the schema (`BlockJobStatus`, `block-job-cancel`).
    pub name: String,
    /// Where the definition starts (the `{`).
    pub location: Location,
    /// The doc block attached to it, if any.
    pub doc: Option<Doc>,
    pub ifcond: Option<IfCond>,
    pub features: Vec<Feature>,
}

impl Common {
    pub fn is_deprecated(&self) -> bool {
        self.features.iter().any(|f| f.name == "deprecated")
    }
    pub fn is_unstable(&self) -> bool {
        self.features.iter().any(|f| f.name == "unstable")
    }
}

/// `'if'` conditions. Leaves are configuration symbols such as
/// `CONFIG_LINUX`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IfCond {
    Name(String),
    All(Vec<IfCond>),
    Any(Vec<IfCond>),
    Not(Box<IfCond>),
}

/// A feature flag (`deprecated`, `unstable`, or any other name).
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    pub name: String,
    pub ifcond: Option<IfCond>,
    pub location: Location,
}

/// Built-in types of the QAPI language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Builtin {
    Str,
    Number,
    Int,
    Int8,
    Int16,
    Int32,
    Int64,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Size,
    Bool,
    Null,
    Any,
    /// `QType`, the built-in enum used by alternates' introspection.
    QType,
}

impl Builtin {
    pub const ALL: &'static [Builtin] = &[
        Builtin::Str,
        Builtin::Number,
        Builtin::Int,
        Builtin::Int8,
        Builtin::Int16,
        Builtin::Int32,
        Builtin::Int64,
        Builtin::Uint8,
        Builtin::Uint16,
        Builtin::Uint32,
        Builtin::Uint64,
        Builtin::Size,
        Builtin::Bool,
        Builtin::Null,
        Builtin::Any,
        Builtin::QType,
    ];

    /// The schema spelling (`str`, `uint64`, `QType`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Number => "number",
            Builtin::Int => "int",
            Builtin::Int8 => "int8",
            Builtin::Int16 => "int16",
            Builtin::Int32 => "int32",
            Builtin::Int64 => "int64",
            Builtin::Uint8 => "uint8",
            Builtin::Uint16 => "uint16",
            Builtin::Uint32 => "uint32",
            Builtin::Uint64 => "uint64",
            Builtin::Size => "size",
            Builtin::Bool => "bool",
            Builtin::Null => "null",
            Builtin::Any => "any",
            Builtin::QType => "QType",
        }
    }

    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.iter().copied().find(|b| b.name() == name)
    }

    /// The JSON type introspection reports (`string`, `int`, `number`,
    /// `boolean`, `null`, `value`).
    pub fn json_type(self) -> &'static str {
        match self {
            Builtin::Str | Builtin::QType => "string",
            Builtin::Number => "number",
            Builtin::Int
            | Builtin::Int8
            | Builtin::Int16
            | Builtin::Int32
            | Builtin::Int64
            | Builtin::Uint8
            | Builtin::Uint16
            | Builtin::Uint32
            | Builtin::Uint64
            | Builtin::Size => "int",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "value",
        }
    }
}

/// A resolved reference to a type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TypeRef {
    Builtin(Builtin),
    /// A user-defined enum, struct, union or alternate, by name.
    Named(String),
    /// `['T']`.
    Array(Box<TypeRef>),
}

/// An object member (struct member, base member, branch member, command
/// argument, event datum).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Wire name, without the `*` of optional members.
    pub name: String,
    pub ty: TypeRef,
    pub optional: bool,
    pub ifcond: Option<IfCond>,
    pub features: Vec<Feature>,
    /// The member's text from the owner's doc block (`@name: ...`).
    pub doc: Option<String>,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnumValue {
    /// Wire name.
    pub name: String,
    pub ifcond: Option<IfCond>,
    pub features: Vec<Feature>,
    pub doc: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnumType {
    pub common: Common,
    pub values: Vec<EnumValue>,
    /// The `prefix` key (affects C names in QEMU; kept for completeness).
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StructType {
    pub common: Common,
    /// Name of the base struct, if any. Its members (recursively) come
    /// first on the wire; see [`Schema::all_members`].
    pub base: Option<String>,
    /// Members declared by this struct itself.
    pub members: Vec<Member>,
}

/// A discriminated union: base members (which include the discriminator)
/// plus the members of the branch the discriminator selects, all in one
/// JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct UnionType {
    pub common: Common,
    /// The base: either a named struct or inline members.
    pub base: UnionBase,
    /// Name of the discriminator member (a mandatory enum member of the base).
    pub discriminator: String,
    /// The discriminator's enum type.
    pub discriminator_enum: String,
    /// Branches in schema order. Enum values without a branch have no
    /// extra members.
    pub branches: Vec<Branch>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UnionBase {
    Named(String),
    Inline(Vec<Member>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    /// The discriminator value selecting this branch.
    pub name: String,
    /// The branch's struct type.
    pub ty: String,
    pub ifcond: Option<IfCond>,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlternateType {
    pub common: Common,
    pub alternatives: Vec<Alternative>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub name: String,
    pub ty: TypeRef,
    pub ifcond: Option<IfCond>,
    pub doc: Option<String>,
}

/// The `data` of a command or event.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgType {
    /// `'data': { ... }`: members given inline.
    Inline(Vec<Member>),
    /// `'data': 'TypeName'`: a struct, or (with `boxed`) a union.
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub common: Common,
    pub args: Option<ArgType>,
    pub boxed: bool,
    pub returns: Option<TypeRef>,
    /// `false` when `'success-response': false`.
    pub success_response: bool,
    /// `false` when `'gen': false`.
    pub gen_: bool,
    pub allow_oob: bool,
    pub allow_preconfig: bool,
    pub coroutine: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub common: Common,
    pub data: Option<ArgType>,
    pub boxed: bool,
}

/// A parsed doc block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Doc {
    /// The definition's `@name:` line is not kept; this is the free text
    /// that follows it (or the whole text of a free-form block).
    pub body: String,
    /// `@member: text` sections, in order.
    pub members: Vec<(String, String)>,
    /// `Features:` section: `@feature: text`.
    pub features: Vec<(String, String)>,
    /// Tagged sections (`Returns`, `Errors`, `Since`, `TODO`, ...) in order,
    /// and plain paragraphs that follow the member sections.
    pub sections: Vec<DocSection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DocSection {
    /// `None` for untagged text, else `Returns`, `Errors`, `Since`, `TODO`.
    pub tag: Option<String>,
    pub text: String,
}

impl Doc {
    pub fn member(&self, name: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
    pub fn section(&self, tag: &str) -> Option<&str> {
        self.sections
            .iter()
            .find(|s| s.tag.as_deref() == Some(tag))
            .map(|s| s.text.as_str())
    }
}

impl Schema {
    /// Every member of a struct in wire order: base members first
    /// (recursively), then its own.
    pub fn all_members(&self, struct_name: &str) -> Vec<&Member> {
        let mut out = Vec::new();
        if let Some(Entity::Struct(s)) = self.entity(struct_name) {
            if let Some(base) = &s.base {
                out.extend(self.all_members(base));
            }
            out.extend(s.members.iter());
        }
        out
    }

    /// The base members of a union in wire order.
    pub fn union_base_members<'a>(&'a self, u: &'a UnionType) -> Vec<&'a Member> {
        match &u.base {
            UnionBase::Named(n) => self.all_members(n),
            UnionBase::Inline(m) => m.iter().collect(),
        }
    }

    /// Name → entity index, for fast lookups by generators.
    pub fn index(&self) -> BTreeMap<&str, usize> {
        self.entities
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name(), i))
            .collect()
    }
}
