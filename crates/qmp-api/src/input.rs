//! The QMP input visitor: JSON values → generated types, with QEMU's exact error messages.
//!
//! Generated types implement [`FromQmp`]. Each reading step knows its [`QmpPath`] (`actions[0].data.device`)
//! so errors read exactly like QEMU's QObject input visitor:
//!
//! | situation | message |
//! |---|---|
//! | member absent | `Parameter 'actions[0].data.device' is missing` |
//! | member not declared | `Parameter 'properties.y' is unexpected` |
//! | wrong JSON type | `Invalid parameter type for 'flat', expected: boolean` |
//! | `uint64`/`size` not representable | `Parameter 'write-threshold' expects uint64` |
//! | sized integer out of range | `Parameter 'granularity' expects uint32_t` (last name only) |
//! | unknown enum value | `Parameter 'sync' does not accept value 'bogus'` (last name only) |
//! | alternate matching no branch | `Invalid parameter type for 'file', expected: BlockdevRef` (last name only) |
//!
//! "Last name only" messages name the innermost member, or `null` for an array element, as QEMU does.
//! An optional member given as JSON `null` is present, so its type is checked (QEMU does the same).

use crate::error::QmpError;
use serde_json::{Map, Value};

/// One step of a path: a member name or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Member(String),
    Index(usize),
}

/// Where in the input a value sits (`actions[0].data.device`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QmpPath {
    steps: Vec<Step>,
}

impl QmpPath {
    /// The path of a command's arguments object.
    pub fn root() -> Self {
        QmpPath::default()
    }

    pub fn push_member(&mut self, name: &str) {
        self.steps.push(Step::Member(name.to_string()));
    }

    pub fn push_index(&mut self, index: usize) {
        self.steps.push(Step::Index(index));
    }

    pub fn pop(&mut self) {
        self.steps.pop();
    }

    /// The full name QEMU prints: members joined by `.`, indexes as `[n]`.
    pub fn full(&self) -> String {
        let mut out = String::new();
        for step in &self.steps {
            match step {
                Step::Member(name) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(name);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        if out.is_empty() {
            out.push_str("<anonymous>");
        }
        out
    }

    /// The innermost name, `null` for an array element.
    pub fn last(&self) -> String {
        match self.steps.last() {
            Some(Step::Member(name)) => name.clone(),
            _ => "null".to_string(),
        }
    }

    pub fn missing(&self) -> QmpError {
        QmpError::generic(format!("Parameter '{}' is missing", self.full()))
    }

    pub fn unexpected(&self) -> QmpError {
        QmpError::generic(format!("Parameter '{}' is unexpected", self.full()))
    }

    /// Wrong JSON type; `expected` is `string`, `integer`, `number`, `boolean`, `null`, `object`, `array`.
    pub fn invalid_type(&self, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.full()
        ))
    }

    /// An alternate's value matched none of its branches.
    pub fn invalid_alternate(&self, alternate: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {alternate}",
            self.last()
        ))
    }

    pub fn invalid_enum_value(&self, value: &str) -> QmpError {
        QmpError::generic(format!(
            "Parameter '{}' does not accept value '{value}'",
            self.last()
        ))
    }

    fn expects_full(&self, what: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' expects {what}", self.full()))
    }

    fn expects_last(&self, what: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' expects {what}", self.last()))
    }
}

/// A type the QMP input visitor can read.
pub trait FromQmp: Sized {
    /// Reads `value`, found at `path`.
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError>;
}

/// Reads a whole value the way a command's arguments are read (path at the root).
pub fn from_value<T: FromQmp>(value: &Value) -> Result<T, QmpError> {
    T::from_qmp(value, &mut QmpPath::root())
}

/// A JSON object being read member by member; [`QmpObject::finish`] rejects
/// members nobody asked for.
pub struct QmpObject<'a> {
    map: &'a Map<String, Value>,
    visited: Vec<&'static str>,
}

impl<'a> QmpObject<'a> {
    /// Opens `value` as an object, or fails with `expected: object`.
    pub fn open(value: &'a Value, path: &QmpPath) -> Result<Self, QmpError> {
        match value {
            Value::Object(map) => Ok(QmpObject {
                map,
                visited: Vec::new(),
            }),
            _ => Err(path.invalid_type("object")),
        }
    }

    /// A mandatory member.
    pub fn required<T: FromQmp>(
        &mut self,
        name: &'static str,
        path: &mut QmpPath,
    ) -> Result<T, QmpError> {
        self.visited.push(name);
        path.push_member(name);
        let value = self.map.get(name).ok_or_else(|| path.missing())?;
        let read = T::from_qmp(value, path)?;
        path.pop();
        Ok(read)
    }

    /// An optional member: `None` when absent.
    pub fn optional<T: FromQmp>(
        &mut self,
        name: &'static str,
        path: &mut QmpPath,
    ) -> Result<Option<T>, QmpError> {
        self.visited.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(value) => {
                path.push_member(name);
                let read = T::from_qmp(value, path)?;
                path.pop();
                Ok(Some(read))
            }
        }
    }

    /// Fails on the first member (in input order) that was not read.
    pub fn finish(self, path: &mut QmpPath) -> Result<(), QmpError> {
        match self
            .map
            .keys()
            .find(|k| !self.visited.contains(&k.as_str()))
        {
            Some(key) => {
                path.push_member(key);
                Err(path.unexpected())
            }
            None => Ok(()),
        }
    }
}

/// Reads an object type: opens `value`, lets `read_members` take its
/// members, then rejects the rest.
pub fn read_object<T>(
    value: &Value,
    path: &mut QmpPath,
    read_members: impl FnOnce(&mut QmpObject<'_>, &mut QmpPath) -> Result<T, QmpError>,
) -> Result<T, QmpError> {
    let mut object = QmpObject::open(value, path)?;
    let read = read_members(&mut object, path)?;
    object.finish(path)?;
    Ok(read)
}

impl FromQmp for String {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        match value {
            Value::String(s) => Ok(s.clone()),
            _ => Err(path.invalid_type("string")),
        }
    }
}

impl FromQmp for bool {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        value.as_bool().ok_or_else(|| path.invalid_type("boolean"))
    }
}

impl FromQmp for f64 {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        value.as_f64().ok_or_else(|| path.invalid_type("number"))
    }
}

impl FromQmp for i64 {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        value.as_i64().ok_or_else(|| path.invalid_type("integer"))
    }
}

impl FromQmp for u64 {
    /// Like QEMU, negative integers are accepted and wrap around.
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        if let Some(v) = value.as_u64() {
            return Ok(v);
        }
        match value.as_i64() {
            Some(v) => Ok(v as u64),
            None => Err(path.expects_full("uint64")),
        }
    }
}

macro_rules! sized_int {
    ($($ty:ty => $wide:ty, $c_name:literal;)*) => {$(
        impl FromQmp for $ty {
            fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
                let wide = <$wide>::from_qmp(value, path)?;
                <$ty>::try_from(wide).map_err(|_| path.expects_last($c_name))
            }
        }
    )*};
}

sized_int! {
    i8 => i64, "int8_t";
    i16 => i64, "int16_t";
    i32 => i64, "int32_t";
    u8 => u64, "uint8_t";
    u16 => u64, "uint16_t";
    u32 => u64, "uint32_t";
}

impl FromQmp for () {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        match value {
            Value::Null => Ok(()),
            _ => Err(path.invalid_type("null")),
        }
    }
}

impl FromQmp for Value {
    fn from_qmp(value: &Value, _path: &mut QmpPath) -> Result<Self, QmpError> {
        Ok(value.clone())
    }
}

impl<T: FromQmp> FromQmp for Vec<T> {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        let items = value.as_array().ok_or_else(|| path.invalid_type("array"))?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            path.push_index(i);
            out.push(T::from_qmp(item, path)?);
            path.pop();
        }
        Ok(out)
    }
}

impl<T: FromQmp> FromQmp for Box<T> {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        T::from_qmp(value, path).map(Box::new)
    }
}

/// Implements `serde::Deserialize` for a generated type through [`FromQmp`],
/// so serde and QMP accept exactly the same input.
#[doc(hidden)]
#[macro_export]
macro_rules! deserialize_via_from_qmp {
    ($($ty:ty),* $(,)?) => {$(
        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                deserializer: D,
            ) -> ::std::result::Result<Self, D::Error> {
                let value = <::serde_json::Value as ::serde::Deserialize>::deserialize(deserializer)?;
                $crate::input::from_value(&value)
                    .map_err(|e| <D::Error as ::serde::de::Error>::custom(e.desc))
            }
        }
    )*};
}

/// An enum value that is not in the enum (returned by the generated `FromStr` impls).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value '{value}' for {type_name}")]
pub struct UnknownEnumValue {
    pub type_name: &'static str,
    pub value: String,
}

/// Reads an enum: a JSON string naming one of its values.
pub fn enum_from_qmp<T: std::str::FromStr>(
    value: &Value,
    path: &mut QmpPath,
) -> Result<T, QmpError> {
    match value {
        Value::String(s) => s.parse().map_err(|_| path.invalid_enum_value(s)),
        _ => Err(path.invalid_type("string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read<T: FromQmp>(value: Value, member: &str) -> Result<T, QmpError> {
        let mut path = QmpPath::root();
        path.push_member(member);
        T::from_qmp(&value, &mut path)
    }

    #[test]
    fn int64_rejects_fractions_with_integer() {
        let e = read::<i64>(json!(1.5), "speed").unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'speed', expected: integer"
        );
    }

    #[test]
    fn uint64_accepts_negative_integers_by_wrapping() {
        assert_eq!(read::<u64>(json!(-1), "write-threshold").unwrap(), u64::MAX);
    }

    #[test]
    fn uint64_rejects_strings_with_expects_uint64() {
        let e = read::<u64>(json!("x"), "write-threshold").unwrap_err();
        assert_eq!(e.desc, "Parameter 'write-threshold' expects uint64");
    }

    #[test]
    fn uint32_out_of_range_names_the_last_member_only() {
        let mut path = QmpPath::root();
        path.push_member("actions");
        path.push_index(0);
        path.push_member("data");
        path.push_member("granularity");
        let e = u32::from_qmp(&json!(-5), &mut path).unwrap_err();
        assert_eq!(e.desc, "Parameter 'granularity' expects uint32_t");
    }

    #[test]
    fn array_element_paths_use_brackets() {
        let e = read::<Vec<String>>(json!(["a", 1]), "names").unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'names[1]', expected: string"
        );
    }

    #[test]
    fn missing_and_unexpected_members_use_full_paths() {
        let value = json!({"a": "x", "zz": 1});
        let mut path = QmpPath::root();
        path.push_member("properties");
        let mut object = QmpObject::open(&value, &path).unwrap();
        let e = object
            .required::<String>("b", &mut path.clone())
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'properties.b' is missing");
        let _: String = object.required("a", &mut path).unwrap();
        let e = object.finish(&mut path).unwrap_err();
        assert_eq!(e.desc, "Parameter 'properties.zz' is unexpected");
    }

    #[test]
    fn null_for_an_optional_member_is_a_type_error() {
        let value = json!({"flat": null});
        let mut path = QmpPath::root();
        let mut object = QmpObject::open(&value, &path).unwrap();
        let e = object.optional::<bool>("flat", &mut path).unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid parameter type for 'flat', expected: boolean"
        );
    }
}
