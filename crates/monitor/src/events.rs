//! Event broadcast: every client that finished capabilities negotiation gets every event.
//!
//! Each client has a bounded queue of outgoing lines. Events are serialised once and pushed
//! into every queue without waiting, so a slow client never stalls the others or the thread
//! emitting the event. A client whose queue overflows is disconnected (it would otherwise
//! silently miss events and lose track of jobs); QEMU instead buffers without bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};

use crate::wire;

/// A line of output, shared between the queues of all clients it goes to.
pub(crate) type Line = Arc<[u8]>;

/// The server's end of one connected client.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) id: u64,
    tx: mpsc::Sender<Line>,
    overflowed: AtomicBool,
    /// Woken when the client must be dropped (queue overflow).
    pub(crate) kicked: Notify,
}

impl Client {
    pub(crate) fn new(id: u64, tx: mpsc::Sender<Line>) -> Self {
        Client {
            id,
            tx,
            overflowed: AtomicBool::new(false),
            kicked: Notify::new(),
        }
    }

    /// Queue a line; on overflow mark the client for disconnection.
    pub(crate) fn push(&self, line: Line) -> bool {
        match self.tx.try_send(line) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        client = self.id,
                        "QMP client too slow: output queue full, disconnecting"
                    );
                }
                self.kicked.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::SeqCst)
    }
}

/// Handle for emitting QMP events to every negotiated client. Cheap to clone; usable from any
/// thread.
#[derive(Clone, Debug, Default)]
pub struct EventSink {
    clients: Arc<Mutex<Vec<Arc<Client>>>>,
}

/// The current time as QMP's `timestamp` member.
fn timestamp() -> Value {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(t) => json!({"seconds": t.as_secs(), "microseconds": t.subsec_micros()}),
        Err(_) => json!({"seconds": -1, "microseconds": -1}),
    }
}

impl EventSink {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Client>>> {
        // A panic while holding the lock cannot leave the list inconsistent.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Emit event `name` now: `{"timestamp": ..., "event": name, "data": data}` (no `data`
    /// member when `data` is `None`).
    pub fn emit(&self, name: &str, data: Option<Map<String, Value>>) {
        let mut event = Map::new();
        event.insert("timestamp".into(), timestamp());
        event.insert("event".into(), Value::String(name.to_string()));
        if let Some(data) = data {
            event.insert("data".into(), Value::Object(data));
        }
        self.emit_line(wire::line(&Value::Object(event)).into());
    }

    fn emit_line(&self, line: Line) {
        let mut clients = self.lock();
        clients.retain(|c| c.push(line.clone()) || !c.overflowed());
    }

    /// Number of clients currently receiving events.
    pub fn subscribers(&self) -> usize {
        self.lock().len()
    }

    /// Queue `reply` for `client`, then subscribe it, atomically with respect to events: no
    /// event can reach the client before the reply that ends its negotiation.
    pub(crate) fn reply_and_subscribe(&self, client: &Arc<Client>, reply: Line) {
        let mut clients = self.lock();
        if client.push(reply) {
            clients.push(client.clone());
        }
    }

    pub(crate) fn unsubscribe(&self, client_id: u64) {
        self.lock().retain(|c| c.id != client_id);
    }

    pub(crate) fn unsubscribe_all(&self) {
        self.lock().clear();
    }
}
