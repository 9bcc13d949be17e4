//! The standard traits of generated types, implemented through the runtime so that
//! generated code states only what is particular to a type.

/// The wire names of a generated enum, and what follows from them: inherent `ALL` (every
/// value in schema order) and `as_str` (the wire name), [`Enum`](crate::Enum), and the
/// standard traits of [`impl_enum_traits!`](crate::impl_enum_traits).
///
/// ```text
/// impl_enum!(BlockJobVerb = "BlockJobVerb" { Cancel("cancel"), SetSpeed("set-speed") });
/// // an enum that replies or events carry names its variant for values the schema does
/// // not know after the list:
/// impl_enum!(JobStatus = "JobStatus" { Running("running") } UnknownValue);
/// ```
#[macro_export]
macro_rules! impl_enum {
    ($ty:ident = $name:literal { $($variant:ident($wire:literal)),* $(,)? }) => {
        $crate::impl_enum!(@impl $ty, $name, { $($variant = $wire),* }, ::std::option::Option::None, {});
    };
    ($ty:ident = $name:literal { $($variant:ident($wire:literal)),* $(,)? } $unknown:ident) => {
        $crate::impl_enum!(
            @impl $ty,
            $name,
            { $($variant = $wire),* },
            ::std::option::Option::Some(Self::$unknown),
            { Self::$unknown => $crate::enums::UNKNOWN_VALUE, }
        );
    };
    (@impl $ty:ident, $name:literal, { $($variant:ident = $wire:literal),* },
        $unknown:expr, { $($unknown_arm:tt)* }) => {
        impl $ty {
            /// Every value, in schema order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];
            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $wire,)*
                    $($unknown_arm)*
                }
            }
        }
        impl $crate::Enum for $ty {
            const NAME: &'static str = $name;
            const ALL: &'static [Self] = Self::ALL;
            const UNKNOWN: ::std::option::Option<Self> = $unknown;
            fn as_str(self) -> &'static str {
                Self::as_str(self)
            }
        }
        $crate::impl_enum_traits!($ty);
    };
}

/// `Display`, `FromStr`, `Serialize`, `Deserialize` (tolerant) and `FromQmp` (strictness
/// of the reader) for types implementing [`Enum`](crate::Enum).
#[macro_export]
macro_rules! impl_enum_traits {
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

/// The members of an object type (struct, command arguments, event data) in wire order,
/// each with the field it lives in, and what follows from them:
/// [`ReadMembers`](crate::ReadMembers) and [`WriteMembers`](crate::WriteMembers) (an
/// absent optional member is left out), `FromQmp`, `Serialize` and `Deserialize`
/// (tolerant). A union, whose reading and writing pick a branch, writes its own
/// `ReadMembers` and `WriteMembers` and gets the rest with `impl_object!(Union)`.
///
/// ```text
/// impl_object!(JobInfo { id("id"), r#type("type"), optional error("error") });
/// impl_object!(BlockdevOptions);
/// ```
#[macro_export]
macro_rules! impl_object {
    ($ty:ident { $($members:tt)* }) => {
        impl $crate::ReadMembers for $ty {
            fn read_members(
                object: &mut $crate::QmpObject<'_, '_>,
            ) -> ::std::result::Result<Self, $crate::QmpError> {
                ::std::result::Result::Ok($crate::impl_object!(@read object [] $($members)*))
            }
        }
        impl $crate::WriteMembers for $ty {
            fn write_members<M: $crate::__private::serde::ser::SerializeMap>(
                &self,
                map: &mut M,
            ) -> ::std::result::Result<(), M::Error> {
                $crate::impl_object!(@write self map $($members)*);
                ::std::result::Result::Ok(())
            }
        }
        $crate::impl_object!($ty);
    };
    // The struct literal, its members read in order (a tt-muncher: `optional` is a word).
    (@read $object:ident [$($done:tt)*] optional $field:ident($wire:literal) $(, $($rest:tt)*)?) => {
        $crate::impl_object!(@read $object [$($done)* $field: $object.optional($wire)?,] $($($rest)*)?)
    };
    (@read $object:ident [$($done:tt)*] $field:ident($wire:literal) $(, $($rest:tt)*)?) => {
        $crate::impl_object!(@read $object [$($done)* $field: $object.required($wire)?,] $($($rest)*)?)
    };
    (@read $object:ident [$($done:tt)*]) => {
        Self { $($done)* }
    };
    // The members written in order.
    (@write $self:ident $map:ident optional $field:ident($wire:literal) $(, $($rest:tt)*)?) => {
        $crate::output::write_optional($map, $wire, &$self.$field)?;
        $crate::impl_object!(@write $self $map $($($rest)*)?);
    };
    (@write $self:ident $map:ident $field:ident($wire:literal) $(, $($rest:tt)*)?) => {
        $crate::__private::serde::ser::SerializeMap::serialize_entry($map, $wire, &$self.$field)?;
        $crate::impl_object!(@write $self $map $($($rest)*)?);
    };
    (@write $self:ident $map:ident) => {};
    ($ty:ident) => {
        impl $crate::input::FromQmp for $ty {
            fn from_qmp(
                value: &$crate::__private::serde_json::Value,
                path: &mut $crate::input::QmpPath,
            ) -> ::std::result::Result<Self, $crate::QmpError> {
                $crate::input::read_object(value, path)
            }
        }
        impl $crate::__private::serde::Serialize for $ty {
            fn serialize<S: $crate::__private::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                $crate::output::serialize_object(self, serializer)
            }
        }
        $crate::impl_deserialize!($ty);
    };
}

/// A newtype of another type with its wire form (`struct BlockdevAddArguments(pub
/// BlockdevOptions)`): `From` the inner type, and `FromQmp`, `Serialize`, `Deserialize`
/// as the inner type's.
#[macro_export]
macro_rules! impl_newtype {
    ($ty:ident($inner:ty)) => {
        impl ::std::convert::From<$inner> for $ty {
            fn from(inner: $inner) -> Self {
                Self(inner)
            }
        }
        impl $crate::input::FromQmp for $ty {
            fn from_qmp(
                value: &$crate::__private::serde_json::Value,
                path: &mut $crate::input::QmpPath,
            ) -> ::std::result::Result<Self, $crate::QmpError> {
                $crate::input::FromQmp::from_qmp(value, path).map(Self)
            }
        }
        impl $crate::__private::serde::Serialize for $ty {
            fn serialize<S: $crate::__private::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                $crate::__private::serde::Serialize::serialize(&self.0, serializer)
            }
        }
        $crate::impl_deserialize!($ty);
    };
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
