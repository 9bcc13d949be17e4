//! What can go wrong with a command: the server refused it, its reply does not fit the
//! schema, or the connection failed.

use qapi_runtime::QmpError;
use serde_json::Value;

/// The error of every client call.
///
/// Three kinds that a caller treats differently: [`Error::Qmp`] (the server answered
/// with an error, exactly as sent), [`Error::Mismatch`] (the server answered, but not in
/// the shape the schema gives: the command may well have acted), and
/// [`Error::Transport`] (no answer: the connection failed or closed, and whether the
/// command ran is unknown). [`Error::Refused`] is the client's own refusal before
/// anything was sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server's error reply, class and text as it sent them. QEMU's error classes
    /// have been frozen since QEMU 1.2; a class outside them is read as `GenericError`.
    #[error("{0}")]
    Qmp(QmpError),
    /// A reply (or an event's data) that does not fit the schema, with the reader's
    /// message in QEMU's words and the value as received.
    #[error("{what} does not fit the schema: {reason}")]
    Mismatch {
        /// `reply to 'query-jobs'`, `event 'JOB_STATUS_CHANGE'`.
        what: String,
        reason: String,
        value: Value,
    },
    /// The connection failed, or closed before the answer came.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Not sent: the client refused the call (e.g. `exec-oob` of a command that does not
    /// allow it, or without the `oob` capability).
    #[error("{0}")]
    Refused(String),
    /// A job helper could not do what was asked: the job does not exist, or it ended
    /// before reaching the status waited for.
    #[error("{0}")]
    Job(String),
    /// A deadline set on the blocking client ([`crate::blocking::Client::set_timeout`])
    /// passed; the connection is in the state described there.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
}

impl Error {
    /// Whether the connection is gone (closed by either side, or failed): the case to
    /// accept after `quit`, as QEMU's own Python tools do.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::Transport(e) if e.is_disconnect())
    }

    /// The QMP error, if the server refused the command.
    pub fn qmp(&self) -> Option<&QmpError> {
        match self {
            Error::Qmp(e) => Some(e),
            _ => None,
        }
    }
}

/// How the connection failed or ended. Every call waiting for a reply receives the same
/// value, and so does every call made afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Connecting failed.
    #[error("cannot connect to {address}: {message}")]
    Connect {
        address: String,
        kind: std::io::ErrorKind,
        message: String,
    },
    /// The server closed the connection between messages.
    #[error("the server closed the connection")]
    Eof,
    /// The server closed the connection in the middle of a message.
    #[error("the server closed the connection in the middle of a message ({len} bytes: {excerpt})")]
    EofMidMessage {
        /// How many bytes of the cut message were received.
        len: usize,
        /// Its beginning, as text.
        excerpt: String,
    },
    /// Reading or writing failed.
    #[error("connection failed: {message}")]
    Io {
        kind: std::io::ErrorKind,
        message: String,
    },
    /// The server sent something that is not QMP (not JSON, a stray byte, a reply
    /// without an id, a bad greeting); the connection is closed, since nothing after it
    /// can be trusted.
    #[error("the server broke the QMP protocol: {0}")]
    Protocol(String),
    /// This client closed the connection ([`crate::Client::close`], or every handle was
    /// dropped).
    #[error("the connection was closed by this client")]
    ClosedByClient,
}

impl TransportError {
    pub(crate) fn io(error: &std::io::Error) -> Self {
        TransportError::Io {
            kind: error.kind(),
            message: error.to_string(),
        }
    }

    /// Whether the connection is closed (rather than failing to open).
    pub fn is_disconnect(&self) -> bool {
        !matches!(self, TransportError::Connect { .. })
    }
}

/// The result of every client call.
pub type Result<T, E = Error> = std::result::Result<T, E>;
