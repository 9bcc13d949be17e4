//! Where events go: the one sink every emitter of the daemon writes generated
//! [`qmp_api::Event`]s into (the job core, under its lock and in QEMU's order; the command
//! layer for exports). The daemon's sink hands them to the monitor's broadcast.

use qmp_api::Event;

/// Receives events, in order. The job core calls it with its registry lock held: an
/// implementation queues the event and returns, never calling back into the registry.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

impl<F: Fn(Event) + Send + Sync> EventSink for F {
    fn emit(&self, event: Event) {
        self(event)
    }
}
