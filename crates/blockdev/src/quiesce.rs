//! Quiescing the exports (QEMU's drained sections, as its NBD exports see them): while a
//! `transaction` runs, no request of an export is under way and none starts, so its actions
//! see one point in time. QEMU gets this from its single main loop: an export's requests run
//! in the same thread as the QMP command, and `qmp_transaction` drains all I/O first. Here
//! exports serve requests on their own threads, so each request passes a gate that a drain
//! closes (waiting for the requests under way) and reopens.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Default)]
struct State {
    /// Drains begun and not ended (nested).
    drains: usize,
    /// Requests under way.
    in_flight: usize,
}

/// The gate every export request passes.
#[derive(Default)]
pub(crate) struct ExportGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl ExportGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request starts: waits while a drain holds the gate.
    pub(crate) fn enter(self: &Arc<Self>) -> Pass {
        let mut state = self.lock();
        while state.drains > 0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.in_flight += 1;
        Pass(self.clone())
    }

    /// Closes the gate and waits until no request is under way; it opens again when the
    /// returned section drops.
    pub(crate) fn drain(self: &Arc<Self>) -> DrainedSection {
        let mut state = self.lock();
        state.drains += 1;
        while state.in_flight > 0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        DrainedSection(self.clone())
    }
}

/// A request under way; it ends when this drops.
pub(crate) struct Pass(Arc<ExportGate>);

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 && state.drains > 0 {
            self.0.changed.notify_all();
        }
    }
}

/// The gate held closed; it opens when this drops.
pub(crate) struct DrainedSection(Arc<ExportGate>);

impl Drop for DrainedSection {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.drains -= 1;
        if state.drains == 0 {
            self.0.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_drain_waits_for_requests_under_way_and_holds_new_ones_until_it_ends() {
        let gate = Arc::new(ExportGate::default());
        let request = gate.enter();
        let (drained_tx, drained) = mpsc::channel();
        let drainer = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let section = gate.drain();
                drained_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                drop(section);
            })
        };
        assert!(drained.recv_timeout(Duration::from_millis(100)).is_err());
        drop(request);
        drained.recv().unwrap();
        // A new request waits for the section to end.
        let (entered_tx, entered) = mpsc::channel();
        let requester = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _pass = gate.enter();
                entered_tx.send(()).unwrap();
            })
        };
        drainer.join().unwrap();
        entered.recv().unwrap();
        requester.join().unwrap();
    }
}
