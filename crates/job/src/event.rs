//! Where events go: the one sink every emitter of the daemon writes generated
//! [`qmp_api::Event`]s into (the job core, under its lock and in QEMU's order; the command
//! layer for exports). The daemon's sink hands them to the monitor's broadcast.

use qmp_api::Event;

/// Receives events, in order. The job core calls it with its registry lock held: an
/// implementation queues the event and returns, never calling back into the registry.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);

    /// The caller (a command, on the monitor's dispatcher) is about to wait for other threads
    /// — jobs parking for a drain, concluding when cancelled, exports ending their requests:
    /// QEMU's `AIO_WAIT_WHILE`, which lets coroutines run, and emit, before the command's
    /// reply. A sink that holds other threads' events until the reply lets them pass until the
    /// returned guard drops. The default holds nothing.
    fn polling(&self) -> Polling {
        Polling::default()
    }

    /// The caller has just taken the registry's lock: it sees the state every event emitted
    /// so far describes. A sink holding other threads' events until a command's reply lets
    /// those pass now when the caller is that command (its reply may show that state, and in
    /// QEMU an event comes before any reply showing its change). The default does nothing.
    fn observed(&self) {}
}

impl<F: Fn(Event) + Send + Sync> EventSink for F {
    fn emit(&self, event: Event) {
        self(event)
    }
}

/// A wait during which other threads' events pass ([`EventSink::polling`]); ends when
/// dropped.
#[must_use = "the wait ends when the guard drops"]
#[derive(Default)]
pub struct Polling {
    _guard: Option<Box<dyn std::any::Any>>,
}

impl Polling {
    /// A wait that ends when `guard` (the sink's own) drops.
    pub fn new(guard: impl std::any::Any) -> Self {
        Polling {
            _guard: Some(Box::new(guard)),
        }
    }
}

impl std::fmt::Debug for Polling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Polling").finish_non_exhaustive()
    }
}
