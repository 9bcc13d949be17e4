//! What the monitor asks of the rest of the daemon: a command executor.

use serde_json::{Map, Value};

pub use qmp_api::{ErrorClass, QmpError};

/// The daemon's commands, as seen by the QMP server.
///
/// The monitor itself answers `qmp_capabilities` and `quit`; everything else comes here.
/// Commands run one at a time, in arrival order across all clients (QEMU runs QMP commands
/// serially in its main loop), on a dedicated dispatcher thread: `execute` may block. That
/// thread is inside the tokio runtime the server was created in, so `execute` may use
/// `tokio::runtime::Handle::current()` (spawn, or `block_on` a future).
pub trait QmpBackend: Send + Sync + 'static {
    /// Run command `name`. `arguments` is `None` when the request had no `"arguments"` member
    /// (QEMU treats that as `{}`). An unknown name must give
    /// `QmpError::new(ErrorClass::CommandNotFound, format!("The command {name} has not been found"))`.
    fn execute(&self, name: &str, arguments: Option<Map<String, Value>>)
    -> Result<Value, QmpError>;

    /// Whether `name` is a command of this backend. Used where QEMU looks a command up before
    /// running it (`exec-oob` of a known command is "does not support OOB", of an unknown one
    /// "has not been found").
    fn has_command(&self, name: &str) -> bool;

    /// Runs once, on the dispatcher thread, when the server stops (`quit`, or a
    /// [`ShutdownHandle::request`](crate::ShutdownHandle::request) such as SIGTERM), before any
    /// client is closed: the events it emits still reach every client, as
    /// qemu-storage-daemon cancels its jobs with its monitors open. After `quit` it runs before
    /// the reply is sent (QSD sends the cancelled jobs' events first). The daemon cancels its
    /// jobs here and waits for them; the default does nothing.
    fn stop(&self) {}
}
