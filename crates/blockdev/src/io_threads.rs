//! The daemon's I/O threads (QEMU's thread pool behind `aio=threads`): a fixed number of
//! persistent threads take jobs' blocking block I/O from one queue, in order. A request is
//! queued the moment it is submitted, so a job keeps as many running as it submits; its
//! future completes when a thread has run it. However many jobs run, job I/O occupies at most
//! that many threads (and copy buffers, which belong to the requests running).
//!
//! Why not tokio's blocking pool: each request was a task (for a semaphore permit) and then a
//! `spawn_blocking`, three hand-offs between threads and a contended pool lock per request;
//! on a loaded machine a 1 GiB mirror spent a third of its time with no I/O in flight.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::node::{IoFuture, IoPool};

type Work = Box<dyn FnOnce() + Send + 'static>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pool of at most `threads` I/O threads, started as requests need them.
pub struct IoThreads {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    work_ready: Condvar,
    max_threads: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Work>,
    threads: usize,
    idle: usize,
    closing: bool,
}

impl IoThreads {
    /// Threads by default: enough to keep two cores and a disk queue busy.
    pub const DEFAULT_THREADS: usize = 16;

    /// A pool of at most `threads` threads (at least one).
    pub fn new(threads: usize) -> Self {
        IoThreads {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work_ready: Condvar::new(),
                max_threads: threads.max(1),
            }),
        }
    }

    /// Threads started so far.
    pub fn threads(&self) -> usize {
        lock(&self.shared.state).threads
    }
}

impl Default for IoThreads {
    fn default() -> Self {
        Self::new(Self::DEFAULT_THREADS)
    }
}

impl Drop for IoThreads {
    /// The threads finish what is queued, then exit.
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.work_ready.notify_all();
    }
}

impl Shared {
    fn serve(self: Arc<Self>) {
        let mut state = lock(&self.state);
        loop {
            if let Some(work) = state.queue.pop_front() {
                drop(state);
                work();
                state = lock(&self.state);
                continue;
            }
            if state.closing {
                state.threads -= 1;
                return;
            }
            state.idle += 1;
            state = self
                .work_ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
        }
    }
}

impl IoPool for IoThreads {
    fn run(&self, work: Work) -> IoFuture {
        let done = Arc::new(Completion::default());
        let signal = done.clone();
        let request: Work = Box::new(move || {
            // A panicking request is a bug in a driver; the job then sees no result.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(work));
            signal.complete();
        });
        let mut state = lock(&self.shared.state);
        state.queue.push_back(request);
        if state.idle > state.queue.len().saturating_sub(1) {
            drop(state);
            self.shared.work_ready.notify_one();
        } else if state.threads < self.shared.max_threads {
            state.threads += 1;
            let n = state.threads;
            drop(state);
            let shared = self.shared.clone();
            let started = std::thread::Builder::new()
                .name(format!("io-{n}"))
                .spawn(move || shared.serve());
            if started.is_err() {
                // Requests still run: on the threads already started.
                lock(&self.shared.state).threads -= 1;
            }
        }
        Box::pin(CompletionFuture(done))
    }
}

/// The index of the first of `items` whose request (`request` of it) completes; pending
/// forever if there are none. Each completed request must leave `items` before the next call.
pub(crate) fn first_done<'a, T>(
    items: &'a mut [T],
    request: impl Fn(&mut T) -> &mut IoFuture + 'a,
) -> impl Future<Output = usize> + 'a {
    std::future::poll_fn(move |cx| {
        for (i, item) in items.iter_mut().enumerate() {
            if request(item).as_mut().poll(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
}

/// Set once a request has run; wakes whoever awaits it.
#[derive(Default)]
struct Completion {
    state: Mutex<(bool, Option<Waker>)>,
}

impl Completion {
    fn complete(&self) {
        let waker = {
            let mut state = lock(&self.state);
            state.0 = true;
            state.1.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

struct CompletionFuture(Arc<Completion>);

impl Future for CompletionFuture {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.0.state);
        if state.0 {
            return Poll::Ready(());
        }
        state.1 = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    fn block_on<F: Future>(f: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    #[test]
    fn requests_run_as_soon_as_they_are_submitted_not_when_awaited() {
        let pool = IoThreads::new(4);
        let started = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let futures: Vec<IoFuture> = (0..4)
            .map(|_| {
                let (started, gate) = (started.clone(), gate.clone());
                pool.run(Box::new(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let mut open = lock(&gate.0);
                    while !*open {
                        open = gate.1.wait(open).unwrap_or_else(PoisonError::into_inner);
                    }
                }))
            })
            .collect();
        // Nothing awaited yet: all four run at once, each holding its thread.
        let deadline = Instant::now() + Duration::from_secs(10);
        while started.load(Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "requests did not all start");
            std::thread::yield_now();
        }
        *lock(&gate.0) = true;
        gate.1.notify_all();
        for f in futures {
            block_on(f);
        }
        assert_eq!(pool.threads(), 4);
    }

    #[test]
    fn at_most_the_given_number_of_threads_run_requests() {
        let pool = IoThreads::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let futures: Vec<IoFuture> = (0..20)
            .map(|_| {
                let (running, peak) = (running.clone(), peak.clone());
                pool.run(Box::new(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    running.fetch_sub(1, Ordering::SeqCst);
                }))
            })
            .collect();
        for f in futures {
            block_on(f);
        }
        assert!(peak.load(Ordering::SeqCst) <= 2);
        assert!(pool.threads() <= 2);
    }

    #[test]
    fn a_panicking_request_still_completes() {
        let pool = IoThreads::new(1);
        block_on(pool.run(Box::new(|| panic!("driver bug"))));
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        block_on(pool.run(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        })));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
