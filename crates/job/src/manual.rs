//! A deterministic executor and clock for tests: tasks run only when the test steps the executor,
//! in FIFO wake order, and time moves only when the test advances the clock.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crate::runtime::{Clock, JobTask, Spawn};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct ExecutorState {
    tasks: Vec<Option<JobTask>>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
    queued: Vec<bool>,
}

/// A single-threaded executor stepped by hand. Cloning gives another handle to the same queue.
#[derive(Clone, Default)]
pub struct ManualExecutor {
    state: Arc<Mutex<ExecutorState>>,
}

struct TaskWaker {
    index: usize,
    state: Arc<Mutex<ExecutorState>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut st = lock(&self.state);
        if st.queued.get(self.index) == Some(&false) {
            st.queued[self.index] = true;
            st.ready.push_back(self.index);
        }
    }
}

impl ManualExecutor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Polls the oldest woken task once. Returns false if no task was ready.
    pub fn step(&self) -> bool {
        let (index, mut task) = {
            let mut st = lock(&self.state);
            let Some(index) = st.ready.pop_front() else {
                return false;
            };
            st.queued[index] = false;
            match st.tasks[index].take() {
                Some(task) => (index, task),
                None => return true,
            }
        };
        let waker = Waker::from(Arc::new(TaskWaker {
            index,
            state: self.state.clone(),
        }));
        let done = task
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready();
        let mut st = lock(&self.state);
        if done {
            st.free.push(index);
        } else {
            st.tasks[index] = Some(task);
        }
        true
    }

    /// Steps until no task is ready; returns how many polls that took.
    pub fn run_until_stalled(&self) -> usize {
        let mut polls = 0;
        while self.step() {
            polls += 1;
        }
        polls
    }

    /// Tasks spawned and not yet finished.
    pub fn live_tasks(&self) -> usize {
        let st = lock(&self.state);
        st.tasks.iter().filter(|t| t.is_some()).count()
    }
}

impl Spawn for ManualExecutor {
    fn spawn(&self, task: JobTask) {
        let mut st = lock(&self.state);
        let index = match st.free.pop() {
            Some(i) => {
                st.tasks[i] = Some(task);
                i
            }
            None => {
                st.tasks.push(Some(task));
                st.queued.push(false);
                st.tasks.len() - 1
            }
        };
        st.queued[index] = true;
        st.ready.push_back(index);
    }
}

#[derive(Default)]
struct ClockState {
    now: Duration,
    next_timer: u64,
    timers: BTreeMap<(Duration, u64), Waker>,
}

/// A clock that moves only when told to.
#[derive(Clone, Default)]
pub struct ManualClock {
    state: Arc<Mutex<ClockState>>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward and wakes every sleeper whose deadline has passed.
    pub fn advance(&self, by: Duration) {
        let wakers = {
            let mut st = lock(&self.state);
            st.now += by;
            let now = st.now;
            let later = st.timers.split_off(&(now, u64::MAX));
            std::mem::replace(&mut st.timers, later)
        };
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    /// The earliest pending deadline, if any sleeper waits.
    pub fn next_deadline(&self) -> Option<Duration> {
        lock(&self.state).timers.keys().next().map(|k| k.0)
    }

    /// Advances to the earliest pending deadline; false if nobody sleeps.
    pub fn advance_to_next_deadline(&self) -> bool {
        let Some(deadline) = self.next_deadline() else {
            return false;
        };
        let now = self.now();
        self.advance(deadline.saturating_sub(now));
        true
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        lock(&self.state).now
    }

    fn sleep_until(&self, deadline: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(ManualSleep {
            state: self.state.clone(),
            deadline,
            key: None,
        })
    }
}

struct ManualSleep {
    state: Arc<Mutex<ClockState>>,
    deadline: Duration,
    key: Option<(Duration, u64)>,
}

impl Future for ManualSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let state = self.state.clone();
        let mut st = lock(&state);
        if st.now >= self.deadline {
            if let Some(key) = self.key.take() {
                st.timers.remove(&key);
            }
            return Poll::Ready(());
        }
        let key = match self.key {
            Some(key) => key,
            None => {
                let key = (self.deadline, st.next_timer);
                st.next_timer += 1;
                self.key = Some(key);
                key
            }
        };
        st.timers.insert(key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for ManualSleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            lock(&self.state).timers.remove(&key);
        }
    }
}
