//! The standard traits of generated types, implemented through the runtime so that
//! generated code states only what is particular to a type.

/// `Display`, `FromStr`, `Serialize`, `Deserialize` (tolerant) and `FromQmp` (strictness
/// of the reader) for types implementing [`Enum`](crate::Enum).
#[macro_export]
macro_rules! impl_enum {
    ($($ty:ty),* $(,)?) => {$(
        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str($crate::Enum::as_str(*self))
            }
        }
        impl ::std::str::FromStr for $ty {
            type Err = $crate::enums::UnknownEnumValue;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                $crate::enums::parse(s)
            }
        }
        impl $crate::__private::serde::Serialize for $ty {
            fn serialize<S: $crate::__private::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                $crate::enums::serialize(*self, serializer)
            }
        }
        impl $crate::input::FromQmp for $ty {
            fn from_qmp(
                value: &$crate::__private::serde_json::Value,
                path: &mut $crate::input::QmpPath,
            ) -> ::std::result::Result<Self, $crate::QmpError> {
                $crate::input::enum_from_qmp(value, path)
            }
        }
        $crate::impl_deserialize!($ty);
    )*};
}

/// `FromQmp` (through [`ReadMembers`](crate::input::ReadMembers)) and `Deserialize`
/// (tolerant) for object types: structs, unions, command arguments, event data.
#[macro_export]
macro_rules! impl_object {
    ($($ty:ty),* $(,)?) => {$(
        impl $crate::input::FromQmp for $ty {
            fn from_qmp(
                value: &$crate::__private::serde_json::Value,
                path: &mut $crate::input::QmpPath,
            ) -> ::std::result::Result<Self, $crate::QmpError> {
                $crate::input::read_object(value, path)
            }
        }
        $crate::impl_deserialize!($ty);
    )*};
}

/// `serde::Deserialize` through [`FromQmp`](crate::input::FromQmp), reading tolerantly
/// as a client reads replies and events: serde and the input visitor accept the same
/// values, and errors carry QEMU's messages.
#[macro_export]
macro_rules! impl_deserialize {
    ($($ty:ty),* $(,)?) => {$(
        impl<'de> $crate::__private::serde::Deserialize<'de> for $ty {
            fn deserialize<D: $crate::__private::serde::Deserializer<'de>>(
                deserializer: D,
            ) -> ::std::result::Result<Self, D::Error> {
                $crate::__private::deserialize(deserializer)
            }
        }
    )*};
}
