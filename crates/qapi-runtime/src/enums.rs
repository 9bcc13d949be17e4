//! The [`Enum`] trait every generated enum implements, and the standard traits it brings.

/// A QAPI enum: a closed set of wire names, plus an `UnknownValue` for the enums that
/// replies or events carry (a newer QEMU may send a value this schema does not know).
pub trait Enum: Copy + Eq + 'static {
    /// The schema name (`BlockJobStatus`), for messages.
    const NAME: &'static str;
    /// Every value, in schema order (`UnknownValue` is not one of them).
    const ALL: &'static [Self];
    /// The value a tolerant reader gives for a wire name the schema does not know;
    /// `None` for enums only ever sent to a server, which must refuse such names.
    const UNKNOWN: Option<Self>;

    /// The wire name (`"(unknown)"` for `UnknownValue`, which has none and cannot be sent).
    fn as_str(self) -> &'static str;

    /// The value with wire name `name`, if the schema has it.
    fn from_wire(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.as_str() == name)
    }

    /// Whether this is the stand-in for a value the schema does not know.
    fn is_unknown(self) -> bool {
        Self::UNKNOWN == Some(self)
    }
}

/// The wire name of `UnknownValue` as [`Enum::as_str`] gives it.
pub const UNKNOWN_VALUE: &str = "(unknown)";

/// An enum value that is not in the enum (returned by the generated `FromStr` impls).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value '{value}' for {type_name}")]
pub struct UnknownEnumValue {
    pub type_name: &'static str,
    pub value: String,
}

/// `FromStr` for an [`Enum`]: only the schema's values (never `UnknownValue`).
pub fn parse<T: Enum>(s: &str) -> Result<T, UnknownEnumValue> {
    T::from_wire(s).ok_or_else(|| UnknownEnumValue {
        type_name: T::NAME,
        value: s.to_string(),
    })
}

/// `Serialize` for an [`Enum`]: its wire name; `UnknownValue` cannot be sent.
pub fn serialize<T: Enum, S: serde::Serializer>(
    value: T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    if value.is_unknown() {
        return Err(<S::Error as serde::ser::Error>::custom(format!(
            "a {} value this schema does not know cannot be sent",
            T::NAME
        )));
    }
    serializer.serialize_str(value.as_str())
}
