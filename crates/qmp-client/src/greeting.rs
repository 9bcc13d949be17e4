//! The QMP greeting: `{"QMP": {"version": {...}, "capabilities": [...]}}`.

use crate::error::TransportError;
use serde_json::Value;

/// What the server said when the connection opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub version: QemuVersion,
    /// The distribution's package string (`Debian 1:7.2+dfsg-7`), often empty.
    pub package: String,
    /// Capabilities offered (`oob`), including ones this client does not know.
    pub capabilities: Vec<String>,
}

/// QEMU's version as the greeting gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QemuVersion {
    pub major: i64,
    pub minor: i64,
    pub micro: i64,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl Greeting {
    /// Reads a greeting message; members it does not know are ignored.
    pub(crate) fn from_message(message: &Value) -> Result<Greeting, TransportError> {
        let bad =
            |what: &str| TransportError::Protocol(format!("a greeting without {what}: {message}"));
        let qmp = message.get("QMP").ok_or_else(|| bad("'QMP'"))?;
        let version = qmp.get("version").ok_or_else(|| bad("'QMP.version'"))?;
        let number = |name: &str| {
            version
                .get("qemu")
                .and_then(|q| q.get(name))
                .and_then(Value::as_i64)
                .ok_or_else(|| bad(&format!("'QMP.version.qemu.{name}'")))
        };
        let capabilities = match qmp.get("capabilities") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("string capabilities"))?,
            _ => return Err(bad("'QMP.capabilities'")),
        };
        Ok(Greeting {
            version: QemuVersion {
                major: number("major")?,
                minor: number("minor")?,
                micro: number("micro")?,
            },
            package: version
                .get("package")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            capabilities,
        })
    }

    /// Whether the server offers `capability`.
    pub fn offers(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}
