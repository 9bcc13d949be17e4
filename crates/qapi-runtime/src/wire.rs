//! Small wire-level types the generated code shares: event timestamps, command
//! properties, replies, and the built-in types `QType` and `null`.

use crate::error::QmpError;
use crate::input::{FromQmp, QmpPath};
use serde_json::Value;

/// The `timestamp` of an event: wall-clock time split like `struct timeval`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct EventTimestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl EventTimestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        EventTimestamp {
            seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
            microseconds: i64::from(since_epoch.subsec_micros()),
        }
    }
}

/// Properties of a command that a monitor (or a client) needs besides its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandProperties {
    /// The wire name (`block-job-finalize`).
    pub name: &'static str,
    /// `false` for commands that never answer (`'success-response': false`).
    pub success_response: bool,
    pub allow_oob: bool,
    pub allow_preconfig: bool,
    pub deprecated: bool,
}

/// QEMU's built-in `QType` enum (the JSON type of a value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QType {
    None,
    Qnull,
    Qnum,
    Qstring,
    Qdict,
    Qlist,
    Qbool,
}

impl crate::Enum for QType {
    const NAME: &'static str = "QType";
    const ALL: &'static [Self] = &[
        Self::None,
        Self::Qnull,
        Self::Qnum,
        Self::Qstring,
        Self::Qdict,
        Self::Qlist,
        Self::Qbool,
    ];
    const UNKNOWN: Option<Self> = None;

    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Qnull => "qnull",
            Self::Qnum => "qnum",
            Self::Qstring => "qstring",
            Self::Qdict => "qdict",
            Self::Qlist => "qlist",
            Self::Qbool => "qbool",
        }
    }
}

crate::impl_enum_traits!(QType);

/// QAPI's built-in `null` type: JSON `null` (an alternate's branch in QEMU's schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Null;

impl serde::Serialize for Null {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

impl FromQmp for Null {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        match value {
            Value::Null => Ok(Null),
            _ => Err(path.invalid_type("null")),
        }
    }
}

crate::impl_deserialize!(Null);

/// A command's return value as the `return` member of its reply.
pub fn reply<T: serde::Serialize>(value: T) -> Result<Value, QmpError> {
    serde_json::to_value(&value).map_err(|e| QmpError::generic(e.to_string()))
}

/// The `return` member of a command without `returns`: `{}`.
pub fn reply_empty(_: ()) -> Result<Value, QmpError> {
    Ok(Value::Object(serde_json::Map::new()))
}

/// The `data` of an event as JSON (`null` if it cannot be serialised, which a generated
/// type always can).
pub fn data<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
