//! Small wire-level types the generated code shares: event timestamps, command properties, `QType`.

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

/// Properties of a command that the monitor needs besides its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    /// The wire name (`block-job-finalize`).
    pub name: &'static str,
    /// `false` for commands that never answer (`'success-response': false`).
    pub success_response: bool,
    pub allow_oob: bool,
    pub allow_preconfig: bool,
    pub deprecated: bool,
}

/// QEMU's built-in `QType` enum (the JSON type of a value).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum QType {
    None,
    Qnull,
    Qnum,
    Qstring,
    Qdict,
    Qlist,
    Qbool,
}

impl QType {
    pub const ALL: &'static [QType] = &[
        QType::None,
        QType::Qnull,
        QType::Qnum,
        QType::Qstring,
        QType::Qdict,
        QType::Qlist,
        QType::Qbool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QType::None => "none",
            QType::Qnull => "qnull",
            QType::Qnum => "qnum",
            QType::Qstring => "qstring",
            QType::Qdict => "qdict",
            QType::Qlist => "qlist",
            QType::Qbool => "qbool",
        }
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QType {
    type Err = crate::input::UnknownEnumValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QType::ALL
            .iter()
            .copied()
            .find(|q| q.as_str() == s)
            .ok_or_else(|| crate::input::UnknownEnumValue {
                type_name: "QType",
                value: s.to_string(),
            })
    }
}

impl FromQmp for QType {
    fn from_qmp(value: &Value, path: &mut QmpPath) -> Result<Self, QmpError> {
        crate::input::enum_from_qmp(value, path)
    }
}

/// A command's return value as the `return` member of its reply.
pub fn reply_value<T: serde::Serialize>(value: &T) -> Result<Value, QmpError> {
    serde_json::to_value(value).map_err(|e| QmpError::generic(e.to_string()))
}
