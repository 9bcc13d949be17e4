//! The [`Command`] trait: a command's arguments know the command.

use crate::input::FromQmp;
use crate::wire::CommandProperties;

/// The argument type of one command (`BlockJobFinalizeArguments`): serialising it gives
/// the `arguments` object, and it knows the command's wire name, what its reply returns
/// and its properties. Every command has one, even a command without `data` (an empty
/// struct), so that a client can write `client.execute(BlockJobFinalizeArguments { id })`
/// and get `Self::Returns` back.
pub trait Command: serde::Serialize {
    /// The wire name (`block-job-finalize`).
    const NAME: &'static str;
    /// What the reply's `return` member holds, read tolerantly
    /// ([`input::from_value_tolerant`](crate::input::from_value_tolerant)); `()` for
    /// commands without `returns` (QEMU answers `{}`).
    type Returns: FromQmp;
    /// `false` for commands that never answer (`'success-response': false`).
    const SUCCESS_RESPONSE: bool = true;
    /// `'allow-oob': true`: may be sent with `exec-oob`.
    const ALLOW_OOB: bool = false;
    /// `'allow-preconfig': true`.
    const ALLOW_PRECONFIG: bool = false;
    /// The command has the `deprecated` feature.
    const DEPRECATED: bool = false;
    /// All of the above as one value (what `COMMANDS` lists).
    const PROPERTIES: CommandProperties = CommandProperties {
        name: Self::NAME,
        success_response: Self::SUCCESS_RESPONSE,
        allow_oob: Self::ALLOW_OOB,
        allow_preconfig: Self::ALLOW_PRECONFIG,
        deprecated: Self::DEPRECATED,
    };

    /// The `arguments` object of a request.
    fn arguments(&self) -> Result<serde_json::Map<String, serde_json::Value>, crate::QmpError> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(other) => Err(crate::QmpError::generic(format!(
                "arguments of '{}' serialise to {other}, not an object",
                Self::NAME
            ))),
            Err(e) => Err(crate::QmpError::generic(e.to_string())),
        }
    }

    /// Reads the `return` member of this command's reply.
    fn read_returns(value: &serde_json::Value) -> Result<Self::Returns, crate::QmpError> {
        crate::input::from_value_tolerant(value)
    }
}
