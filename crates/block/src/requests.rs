//! A node's writes in flight and the serialising requests that must not overlap them (QEMU's
//! tracked requests and `mark_request_serialising`): a copy-on-read writes back data it read
//! through the backing chain, which is only right if no write to the range happens between
//! its read and its write.
//!
//! Every write holds its range for as long as it runs; a serialising request waits until no
//! request overlaps its range and then holds it, and a write overlapping a serialising request
//! waits until it ends. Requests on disjoint ranges never wait for each other.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Clone, Copy)]
struct Request {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

impl Request {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

#[derive(Debug, Default)]
struct State {
    requests: Vec<Request>,
    next_id: u64,
    /// Threads waiting for a request to end (no notification needed when none is).
    waiters: usize,
}

/// The requests in flight on one node.
#[derive(Debug, Default)]
pub(crate) struct RequestTracker {
    state: Mutex<State>,
    ended: Condvar,
}

/// A request in flight; ends when dropped.
#[must_use = "the range is held only while the request lives"]
pub(crate) struct TrackedRequest<'a> {
    tracker: &'a RequestTracker,
    id: u64,
}

impl RequestTracker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Begins a request on `[offset, offset + len)`: a write (`serialising` false) waits only
    /// for overlapping serialising requests; a serialising one for every overlapping request.
    pub(crate) fn begin(&self, offset: u64, len: u64, serialising: bool) -> TrackedRequest<'_> {
        let (start, end) = (offset, offset.saturating_add(len));
        let mut st = self.lock();
        while st
            .requests
            .iter()
            .any(|r| r.overlaps(start, end) && (serialising || r.serialising))
        {
            st.waiters += 1;
            st = self.ended.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiters -= 1;
        }
        st.next_id += 1;
        let id = st.next_id;
        st.requests.push(Request {
            id,
            start,
            end,
            serialising,
        });
        TrackedRequest { tracker: self, id }
    }
}

impl Drop for TrackedRequest<'_> {
    fn drop(&mut self) {
        let mut st = self.tracker.lock();
        if let Some(i) = st.requests.iter().position(|r| r.id == self.id) {
            st.requests.swap_remove(i);
        }
        if st.waiters > 0 {
            drop(st);
            self.tracker.ended.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn writes_on_any_ranges_run_together() {
        let t = RequestTracker::default();
        let _a = t.begin(0, 4096, false);
        let _b = t.begin(0, 4096, false);
        let _c = t.begin(2048, 4096, false);
    }

    #[test]
    fn a_serialising_request_and_a_disjoint_write_run_together() {
        let t = RequestTracker::default();
        let _s = t.begin(0, 4096, true);
        let _w = t.begin(4096, 4096, false);
    }

    #[test]
    fn an_overlapping_write_waits_until_the_serialising_request_ends() {
        let t = Arc::new(RequestTracker::default());
        let s = t.begin(0, 4096, true);
        let wrote = Arc::new(AtomicBool::new(false));
        let writer = {
            let (t, wrote) = (t.clone(), wrote.clone());
            std::thread::spawn(move || {
                let _w = t.begin(4095, 2, false);
                wrote.store(true, Ordering::SeqCst);
            })
        };
        // The writer cannot get past `begin` while the serialising request lives; give it
        // ample time to (wrongly) do so before checking.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!wrote.load(Ordering::SeqCst));
        drop(s);
        writer.join().unwrap();
        assert!(wrote.load(Ordering::SeqCst));
    }

    #[test]
    fn a_serialising_request_waits_for_overlapping_writes_in_flight() {
        let t = Arc::new(RequestTracker::default());
        let w = t.begin(8192, 512, false);
        let began = Arc::new(AtomicBool::new(false));
        let cor = {
            let (t, began) = (t.clone(), began.clone());
            std::thread::spawn(move || {
                let _s = t.begin(0, 65536, true);
                began.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!began.load(Ordering::SeqCst));
        drop(w);
        cor.join().unwrap();
        assert!(began.load(Ordering::SeqCst));
    }
}
