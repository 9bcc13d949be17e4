//! Writeback while a job copies: a flush of the node written starts every [`WRITEBACK_STEP`]
//! bytes (one at a time, not waited for), so the disk writes back what the page cache holds
//! while the copy goes on, instead of all of it in the flush that ends the copy (the mirror's
//! before READY, the stream's before its backing file changes). QEMU has no such step: its
//! qcow2 flushes in the middle of a copy only as a side effect of its metadata caches (see
//! docs/decisions.md, "active commit and mirror: writes one at a time, writeback during the
//! copy").

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::node::{BlockIo, IoFuture, IoPool};

/// Bytes copied between two flushes.
pub(crate) const WRITEBACK_STEP: u64 = 64 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A flush started on the I/O threads.
struct Flush {
    result: Arc<Mutex<Option<io::Result<()>>>>,
    done: IoFuture,
}

impl Flush {
    fn start(pool: &dyn IoPool, node: Arc<dyn BlockIo>) -> Flush {
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        let done = pool.run(Box::new(move || {
            *lock(&slot) = Some(node.flush());
        }));
        Flush { result, done }
    }

    /// Its outcome if it is done.
    fn outcome(&self) -> Option<io::Result<()>> {
        lock(&self.result).take()
    }

    /// Its outcome, once done.
    async fn wait(mut self) -> io::Result<()> {
        (&mut self.done).await;
        lock(&self.result)
            .take()
            .unwrap_or_else(|| Err(io::Error::other("I/O worker lost")))
    }
}

/// The flushes of one node during a copy. An error is kept until [`Writeback::finish`]: a
/// later flush of the same file does not report it again (Linux reports a writeback error
/// once per open file).
pub(crate) struct Writeback {
    node: Arc<dyn BlockIo>,
    pool: Arc<dyn IoPool>,
    unflushed: u64,
    running: Option<Flush>,
    error: Option<io::Error>,
}

impl Writeback {
    pub(crate) fn new(node: Arc<dyn BlockIo>, pool: Arc<dyn IoPool>) -> Writeback {
        Writeback {
            node,
            pool,
            unflushed: 0,
            running: None,
            error: None,
        }
    }

    /// Notes the end of a flush that completed.
    fn reap(&mut self) {
        if let Some(outcome) = self.running.as_ref().and_then(Flush::outcome) {
            self.running = None;
            if let Err(e) = outcome {
                self.error.get_or_insert(e);
            }
        }
    }

    /// `n` more bytes written: starts a flush once a step's worth is, unless one still runs.
    pub(crate) fn written(&mut self, n: u64) {
        self.unflushed += n;
        self.reap();
        if self.unflushed >= WRITEBACK_STEP && self.running.is_none() {
            self.running = Some(Flush::start(self.pool.as_ref(), self.node.clone()));
            self.unflushed = 0;
        }
    }

    /// Waits for the flush running, if any; the first error any flush met, taken.
    pub(crate) async fn finish(&mut self) -> io::Result<()> {
        if let Some(flush) = self.running.take()
            && let Err(e) = flush.wait().await
        {
            self.error.get_or_insert(e);
        }
        self.error.take().map_or(Ok(()), Err)
    }
}
