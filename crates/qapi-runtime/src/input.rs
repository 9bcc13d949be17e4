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
//!
//! **Two ways to read.** A server reads command arguments [`Strictness::Strict`]ly, as QEMU does:
//! every rule above applies ([`from_value`]). A client reads replies and events
//! [`Strictness::Tolerant`]ly, as QEMU's compatibility promise asks of it ([`from_value_tolerant`],
//! and every generated `Deserialize`): members it does not know are ignored, and an enum value or
//! union branch it does not know becomes the type's `UnknownValue` (generated for the enums and
//! unions that replies or events carry); everything else (types, missing members, ranges) is
//! checked as strictly.

use crate::error::QmpError;
use serde_json::{Map, Value};

/// How unknown members, enum values and union branches are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strictness {
    /// Refused with QEMU's message: how a server reads command arguments.
    #[default]
    Strict,
    /// Ignored (members) or read as `UnknownValue` (enum values, union branches, where the
    /// type has one): how a client reads replies and events from a newer QEMU.
    Tolerant,
}

/// One step of a path: a member name or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Member(String),
    Index(usize),
}

/// Where in the input a value sits (`actions[0].data.device`), and how strictly it is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QmpPath {
    steps: Vec<Step>,
    strictness: Strictness,
}

impl QmpPath {
    /// The path of a command's arguments object, read strictly.
    pub fn root() -> Self {
        QmpPath::default()
    }

    /// The root of a reply or event, read tolerantly.
    pub fn tolerant_root() -> Self {
        QmpPath {
            steps: Vec::new(),
            strictness: Strictness::Tolerant,
        }
    }

    pub fn strictness(&self) -> Strictness {
        self.strictness
    }

    pub fn is_tolerant(&self) -> bool {
        self.strictness == Strictness::Tolerant
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

/// Reads a whole value the way a server reads a command's arguments (strictly, path at the root).
pub fn from_value<T: FromQmp>(value: &Value) -> Result<T, QmpError> {
    T::from_qmp(value, &mut QmpPath::root())
}

/// Reads a whole value the way a client reads a reply or an event (tolerantly, path at the root).
pub fn from_value_tolerant<T: FromQmp>(value: &Value) -> Result<T, QmpError> {
    T::from_qmp(value, &mut QmpPath::tolerant_root())
}

/// A JSON object being read member by member; [`QmpObject::finish`] rejects
/// members nobody asked for (unless reading tolerantly).
pub struct QmpObject<'v, 'p> {
    map: &'v Map<String, Value>,
    visited: Vec<&'static str>,
    path: &'p mut QmpPath,
}

impl<'v, 'p> QmpObject<'v, 'p> {
    /// Opens `value` as an object, or fails with `expected: object`.
    pub fn open(value: &'v Value, path: &'p mut QmpPath) -> Result<Self, QmpError> {
        match value {
            Value::Object(map) => Ok(QmpObject {
                map,
                visited: Vec::new(),
                path,
            }),
            _ => Err(path.invalid_type("object")),
        }
    }

    /// A mandatory member.
    pub fn required<T: FromQmp>(&mut self, name: &'static str) -> Result<T, QmpError> {
        self.visited.push(name);
        self.path.push_member(name);
        let value = self.map.get(name).ok_or_else(|| self.path.missing())?;
        let read = T::from_qmp(value, self.path)?;
        self.path.pop();
        Ok(read)
    }

    /// An optional member: `None` when absent.
    pub fn optional<T: FromQmp>(&mut self, name: &'static str) -> Result<Option<T>, QmpError> {
        self.visited.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(value) => {
                self.path.push_member(name);
                let read = T::from_qmp(value, self.path)?;
                self.path.pop();
                Ok(Some(read))
            }
        }
    }

    /// The error for a union whose discriminator `tag` holds a value the union has no
    /// branch for (reached only when a tolerantly read discriminator enum knows more
    /// values than the union: the union itself is not read from replies).
    pub fn unknown_branch(&mut self, tag: &str) -> QmpError {
        let value = match self.map.get(tag) {
            Some(Value::String(s)) => s.as_str(),
            _ => "",
        };
        self.path.push_member(tag);
        let error = self.path.invalid_enum_value(value);
        self.path.pop();
        error
    }

    /// Fails if a member was not read, unless reading tolerantly. With several such
    /// members, names the one QEMU names (see [`qemu_order`]).
    pub fn finish(self) -> Result<(), QmpError> {
        if self.path.is_tolerant() || self.map.keys().all(|k| self.visited.contains(&k.as_str())) {
            return Ok(());
        }
        let keys: Vec<&str> = self.map.keys().map(String::as_str).collect();
        match qemu_order::first_unvisited(&keys, &self.visited) {
            Some(key) => {
                self.path.push_member(key);
                Err(self.path.unexpected())
            }
            None => Ok(()),
        }
    }
}

/// An object type (struct, union, command arguments, event data): reads its members
/// from an object being visited. [`FromQmp`] for it is [`read_object`] (see
/// [`impl_object!`](crate::impl_object)).
pub trait ReadMembers: Sized {
    fn read_members(object: &mut QmpObject<'_, '_>) -> Result<Self, QmpError>;
}

/// Reads an object type: opens `value`, lets `T` take its members, then
/// rejects the rest (unless reading tolerantly).
pub fn read_object<T: ReadMembers>(value: &Value, path: &mut QmpPath) -> Result<T, QmpError> {
    let mut object = QmpObject::open(value, path)?;
    let read = T::read_members(&mut object)?;
    object.finish()?;
    Ok(read)
}

/// The arguments of a command without `data`: an object with no members (strictly).
impl FromQmp for () {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        QmpObject::open(value, path)?.finish()
    }
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

/// The raw arguments of a `'gen': false` command: any object.
impl FromQmp for Map<String, Value> {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        match value {
            Value::Object(map) => Ok(map.clone()),
            _ => Err(path.invalid_type("object")),
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

/// Reads an enum: a JSON string naming one of its values. A value the enum does not
/// know is an error, unless reading tolerantly an enum that has an `UnknownValue`.
pub fn enum_from_qmp<T: crate::Enum>(value: &Value, path: &mut QmpPath) -> Result<T, QmpError> {
    match value {
        Value::String(s) => match T::from_wire(s) {
            Some(v) => Ok(v),
            None => match T::UNKNOWN {
                Some(unknown) if path.is_tolerant() => Ok(unknown),
                _ => Err(path.invalid_enum_value(s)),
            },
        },
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
        let mut probe = path.clone();
        let mut object = QmpObject::open(&value, &mut probe).unwrap();
        let e = object.required::<String>("b").unwrap_err();
        assert_eq!(e.desc, "Parameter 'properties.b' is missing");
        let mut object = QmpObject::open(&value, &mut path).unwrap();
        let _: String = object.required("a").unwrap();
        let e = object.finish().unwrap_err();
        assert_eq!(e.desc, "Parameter 'properties.zz' is unexpected");
    }

    #[test]
    fn tolerant_reading_ignores_members_nobody_asked_for() {
        let value = json!({"a": "x", "zz": 1});
        let mut path = QmpPath::tolerant_root();
        let mut object = QmpObject::open(&value, &mut path).unwrap();
        let _: String = object.required("a").unwrap();
        assert_eq!(object.finish(), Ok(()));
    }

    #[test]
    fn tolerant_reading_still_checks_types_and_missing_members() {
        let value = json!({"a": 1});
        let mut path = QmpPath::tolerant_root();
        let mut object = QmpObject::open(&value, &mut path).unwrap();
        let e = object.required::<String>("a").unwrap_err();
        assert_eq!(e.desc, "Invalid parameter type for 'a', expected: string");
        let mut path = QmpPath::tolerant_root();
        let mut object = QmpObject::open(&value, &mut path).unwrap();
        let e = object.required::<String>("b").unwrap_err();
        assert_eq!(e.desc, "Parameter 'b' is missing");
    }

    #[test]
    fn no_arguments_accept_an_empty_object_only_when_strict() {
        assert_eq!(from_value::<()>(&json!({})), Ok(()));
        let e = from_value::<()>(&json!({"x": 1})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' is unexpected");
        assert_eq!(from_value_tolerant::<()>(&json!({"x": 1})), Ok(()));
    }

    #[test]
    fn null_for_an_optional_member_is_a_type_error() {
        let value = json!({"flat": null});
        let mut path = QmpPath::root();
        let mut object = QmpObject::open(&value, &mut path).unwrap();
        let e = object.optional::<bool>("flat").unwrap_err();
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
