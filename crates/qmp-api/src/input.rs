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

    /// Fails if a member was not read. With several such members, names
    /// the one QEMU names (see [`qemu_order`]).
    pub fn finish(self, path: &mut QmpPath) -> Result<(), QmpError> {
        if self.map.keys().all(|k| self.visited.contains(&k.as_str())) {
            return Ok(());
        }
        let keys: Vec<&str> = self.map.keys().map(String::as_str).collect();
        match qemu_order::first_unvisited(&keys, &self.visited) {
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

/// Which unread member QEMU reports when there are several.
///
/// QEMU keeps the members of an input object in a `QDict` (iterated by
/// bucket of its own string hash, newest first within a bucket), copies
/// their names in that order into a GLib hash table, removes each member
/// as it is read, and reports the first name left in the table's slot
/// order. This is a model of those two tables, checked against
/// qemu-storage-daemon 10.0.2 (GLib 2.74) on 700 random objects with up to
/// 16 members.
pub mod qemu_order {
    const QDICT_BUCKETS: u32 = 512;
    const MIN_SHIFT: u32 = 3;
    const PRIMES: [u32; 17] = [
        1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
    ];
    const UNUSED: u32 = 0;
    const TOMBSTONE: u32 = 1;

    /// QDict's bucket hash.
    fn qdict_hash(key: &str) -> u32 {
        let bytes = key.as_bytes();
        let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
        for (i, &b) in bytes.iter().enumerate() {
            value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
        }
        1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
    }

    /// GLib's `g_str_hash` (bytes as signed chars), never 0 or 1.
    fn str_hash(key: &str) -> u32 {
        let h = key.as_bytes().iter().fold(5381u32, |h, &b| {
            h.wrapping_mul(33).wrapping_add(i32::from(b as i8) as u32)
        });
        if h <= TOMBSTONE { 2 } else { h }
    }

    /// An open-addressing table laid out like `GHashTable`.
    struct Table<'k> {
        hashes: Vec<u32>,
        keys: Vec<Option<&'k str>>,
        shift: u32,
        nnodes: usize,
        noccupied: usize,
    }

    impl<'k> Table<'k> {
        fn new() -> Self {
            Table {
                hashes: vec![UNUSED; 1 << MIN_SHIFT],
                keys: vec![None; 1 << MIN_SHIFT],
                shift: MIN_SHIFT,
                nnodes: 0,
                noccupied: 0,
            }
        }

        fn size(&self) -> usize {
            1 << self.shift
        }

        fn mask(&self) -> usize {
            self.size() - 1
        }

        fn index(&self, hash: u32) -> usize {
            (hash.wrapping_mul(11) % PRIMES[self.shift as usize]) as usize
        }

        fn insert(&mut self, key: &'k str) {
            let hash = str_hash(key);
            let mut i = self.index(hash);
            let mut step = 0;
            let mut tombstone = None;
            while self.hashes[i] != UNUSED {
                if self.hashes[i] == hash && self.keys[i] == Some(key) {
                    return;
                }
                if self.hashes[i] == TOMBSTONE && tombstone.is_none() {
                    tombstone = Some(i);
                }
                step += 1;
                i = (i + step) & self.mask();
            }
            let i = tombstone.unwrap_or(i);
            let was_unused = self.hashes[i] == UNUSED;
            self.hashes[i] = hash;
            self.keys[i] = Some(key);
            self.nnodes += 1;
            if was_unused {
                self.noccupied += 1;
                self.maybe_resize();
            }
        }

        fn remove(&mut self, key: &str) {
            let hash = str_hash(key);
            let mut i = self.index(hash);
            let mut step = 0;
            while self.hashes[i] != UNUSED {
                if self.hashes[i] == hash && self.keys[i] == Some(key) {
                    self.hashes[i] = TOMBSTONE;
                    self.keys[i] = None;
                    self.nnodes -= 1;
                    self.maybe_resize();
                    return;
                }
                step += 1;
                i = (i + step) & self.mask();
            }
        }

        fn maybe_resize(&mut self) {
            let size = self.size();
            if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
                || size <= self.noccupied + self.noccupied / 16
            {
                self.resize();
            }
        }

        /// GLib's in-place rehash: entries move in slot order, evicting
        /// not-yet-moved entries from their new slots.
        fn resize(&mut self) {
            let old_size = self.size();
            let mut n = (self.nnodes as f64 * 1.333) as usize;
            let mut shift = 0;
            while n != 0 {
                n >>= 1;
                shift += 1;
            }
            self.shift = shift.clamp(MIN_SHIFT, PRIMES.len() as u32 - 1);
            let size = self.size();
            if size > old_size {
                self.hashes.resize(size, UNUSED);
                self.keys.resize(size, None);
            }
            let mut moved = vec![false; size.max(old_size)];
            for i in 0..old_size {
                let mut hash = self.hashes[i];
                if hash <= TOMBSTONE {
                    self.hashes[i] = UNUSED;
                    continue;
                }
                if moved[i] {
                    continue;
                }
                self.hashes[i] = UNUSED;
                let mut key = self.keys[i].take();
                loop {
                    let mut slot = self.index(hash);
                    let mut step = 0;
                    while moved[slot] {
                        step += 1;
                        slot = (slot + step) & self.mask();
                    }
                    moved[slot] = true;
                    let replaced = std::mem::replace(&mut self.hashes[slot], hash);
                    let replaced_key = std::mem::replace(&mut self.keys[slot], key);
                    if replaced <= TOMBSTONE {
                        break;
                    }
                    hash = replaced;
                    key = replaced_key;
                }
            }
            self.hashes.truncate(size);
            self.keys.truncate(size);
            self.noccupied = self.nnodes;
        }

        fn first(&self) -> Option<&'k str> {
            self.hashes
                .iter()
                .zip(&self.keys)
                .find(|(h, _)| **h > TOMBSTONE)
                .and_then(|(_, k)| *k)
        }
    }

    /// The member QEMU reports as unexpected, given the object's members in
    /// input order and the names read from it in reading order.
    pub fn first_unvisited<'k>(keys: &[&'k str], visited: &[&str]) -> Option<&'k str> {
        let mut qdict_order: Vec<(usize, &'k str)> = keys.iter().copied().enumerate().collect();
        qdict_order.sort_by_key(|&(i, k)| (qdict_hash(k) % QDICT_BUCKETS, std::cmp::Reverse(i)));
        let mut table = Table::new();
        for (_, key) in qdict_order {
            table.insert(key);
        }
        for name in visited {
            if keys.contains(name) {
                table.remove(name);
            }
        }
        table.first()
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

    #[test]
    fn several_unread_members_report_the_one_qemu_reports() {
        // Both orders give 'b' in qemu-storage-daemon 10.0.2, then 'zz'.
        let visited = ["device", "speed"];
        for keys in [["device", "speed", "a", "b"], ["device", "speed", "b", "a"]] {
            assert_eq!(qemu_order::first_unvisited(&keys, &visited), Some("b"));
        }
        let keys = ["device", "speed", "zz", "bogus", "c"];
        assert_eq!(qemu_order::first_unvisited(&keys, &visited), Some("zz"));
        let keys = ["device", "speed", "c", "bogus", "zz"];
        assert_eq!(qemu_order::first_unvisited(&keys, &visited), Some("zz"));
    }

    #[test]
    fn no_unread_member_reports_nothing() {
        assert_eq!(qemu_order::first_unvisited(&["a"], &["a", "b"]), None);
    }
}
