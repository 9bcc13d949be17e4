//! Writing generated object types: [`WriteMembers`] puts a type's members into a map
//! being serialised, so that a union writes its base, its discriminator and its branch's
//! members into one JSON object, as QEMU does.

use serde::ser::SerializeMap;

/// An object type (struct, union, branch of a union, command arguments, event data):
/// writes its members, absent optional members left out, into `map`.
pub trait WriteMembers {
    fn write_members<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error>;
}

impl<T: WriteMembers> WriteMembers for Box<T> {
    fn write_members<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        (**self).write_members(map)
    }
}

/// `Serialize` for an object type: a map of its members.
pub fn serialize_object<T: WriteMembers, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(None)?;
    value.write_members(&mut map)?;
    map.end()
}

/// The error of writing a union whose branch is `UnknownValue` (read from a newer QEMU,
/// it has no wire name and cannot be sent).
pub fn unknown_branch<E: serde::ser::Error>(union: &str) -> E {
    E::custom(format!(
        "a {union} whose branch this schema does not know cannot be sent"
    ))
}

/// Writes optional member `name` if it is present.
pub fn write_optional<M: SerializeMap, T: serde::Serialize>(
    map: &mut M,
    name: &'static str,
    value: &Option<T>,
) -> Result<(), M::Error> {
    match value {
        Some(value) => map.serialize_entry(name, value),
        None => Ok(()),
    }
}
