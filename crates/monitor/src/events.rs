//! Event broadcast: every client that finished capabilities negotiation gets every event.
//!
//! An event is serialised once (QEMU's wire form) and the line is queued for every client
//! without waiting, so a slow client never stalls the others or the thread emitting the
//! event (the job core emits under its lock). A client's queue is bounded in bytes: it holds
//! what is queued and what its writer is still writing. A client that keeps reading drains it
//! as fast as its socket takes it and is never dropped; a burst of events (a 10,000-job
//! transaction emits about 6 MB at once) stays far below the bound. A client that stops
//! reading fills it, and is then disconnected, with a log line saying how many bytes it left
//! unread (QEMU instead buffers without bound).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

use qmp_api::{Event, EventTimestamp};
use tokio::sync::Notify;

use crate::wire;

/// A line of output, shared between the queues of all clients it goes to.
pub(crate) type Line = Arc<[u8]>;

/// What a client's writer has still to write.
#[derive(Default)]
struct Outbox {
    lines: VecDeque<Line>,
    /// Bytes queued plus bytes taken by the writer and not yet written.
    bytes: usize,
}

/// The server's end of one connected client.
pub(crate) struct Client {
    pub(crate) id: u64,
    /// Most bytes of output pending before the client counts as not reading.
    limit: usize,
    outbox: Mutex<Outbox>,
    /// Woken when lines are queued.
    pub(crate) ready: Notify,
    overflowed: AtomicBool,
    /// Woken when the client must be dropped (it stopped reading).
    pub(crate) kicked: Notify,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("id", &self.id).finish()
    }
}

impl Client {
    pub(crate) fn new(id: u64, limit: usize) -> Self {
        Client {
            id,
            limit,
            outbox: Mutex::default(),
            ready: Notify::new(),
            overflowed: AtomicBool::new(false),
            kicked: Notify::new(),
        }
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a line. A client whose pending output would exceed its limit has stopped
    /// reading: its queue is dropped, it is marked for disconnection (logged), and `false`
    /// is returned.
    pub(crate) fn push(&self, line: Line) -> bool {
        if self.overflowed() {
            return false;
        }
        let mut out = self.outbox();
        if out.bytes + line.len() > self.limit {
            let pending = out.bytes;
            *out = Outbox::default();
            drop(out);
            self.overflowed.store(true, Ordering::SeqCst);
            tracing::warn!(
                client = self.id,
                pending,
                limit = self.limit,
                "QMP client stopped reading: {pending} bytes of output pending, limit {} bytes; \
                 disconnecting",
                self.limit
            );
            self.kicked.notify_one();
            return false;
        }
        out.bytes += line.len();
        out.lines.push_back(line);
        drop(out);
        self.ready.notify_one();
        true
    }

    /// Moves up to `max_bytes` (at least one line) of queued output into `into`; returns how
    /// many bytes. They stay counted until [`Client::written`].
    pub(crate) fn take(&self, into: &mut Vec<u8>, max_bytes: usize) -> usize {
        let mut out = self.outbox();
        let mut taken = 0;
        while let Some(line) = out.lines.front() {
            if taken > 0 && taken + line.len() > max_bytes {
                break;
            }
            taken += line.len();
            into.extend_from_slice(line);
            out.lines.pop_front();
        }
        taken
    }

    /// `bytes` taken earlier have been written to the socket.
    pub(crate) fn written(&self, bytes: usize) {
        let mut out = self.outbox();
        out.bytes = out.bytes.saturating_sub(bytes);
    }

    /// Bytes of output not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.outbox().bytes
    }

    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::SeqCst)
    }
}

/// Sends every event to every negotiated client. Cheap to clone; usable from any thread.
///
/// While the dispatcher runs a command, events emitted by other threads are held and leave
/// right after the command's reply, in their order: in QEMU a job's coroutine runs only once
/// the command's handler has returned, so what it emits follows the reply. Events emitted on
/// the dispatcher thread itself (the command's synchronous effects) pass at once. Where the
/// command waits for other threads (QEMU's `AIO_WAIT_WHILE` polling, which lets coroutines
/// run and emit before the reply), it opens the hold with [`Broadcast::polling`]; where it
/// takes the lock they emit under, [`Broadcast::observed`] lets out what it can now see.
#[derive(Clone, Debug, Default)]
pub struct Broadcast {
    hub: Arc<Mutex<Hub>>,
    /// Whether `hub.held` may be non-empty (spares [`Broadcast::observed`] the lock).
    any_held: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Hub {
    clients: Vec<Arc<Client>>,
    /// The thread running the command in progress, if one is.
    command: Option<ThreadId>,
    /// Polling guards open on that thread.
    polling: usize,
    /// Events held until the command's reply (or its next polling wait).
    held: Vec<Line>,
}

impl Hub {
    fn send(&mut self, line: Line) {
        self.clients.retain(|c| c.push(line.clone()));
    }

    fn release(&mut self) {
        for line in std::mem::take(&mut self.held) {
            self.send(line);
        }
    }

    /// Whether an event emitted now, on this thread, waits for the reply.
    fn holds(&self) -> bool {
        self.command
            .is_some_and(|t| self.polling == 0 && t != std::thread::current().id())
    }

    /// Whether this thread runs the command in progress.
    fn runs_command(&self) -> bool {
        self.command == Some(std::thread::current().id())
    }
}

/// A command's wait for other threads, during which their events pass (see
/// [`Broadcast::polling`]); the hold closes again when this drops.
#[must_use = "the hold closes again when the guard drops"]
#[derive(Debug)]
pub struct Polling {
    hub: Option<Arc<Mutex<Hub>>>,
}

impl Drop for Polling {
    fn drop(&mut self) {
        if let Some(hub) = &self.hub {
            let mut hub = lock(hub);
            hub.polling = hub.polling.saturating_sub(1);
        }
    }
}

fn lock(hub: &Mutex<Hub>) -> MutexGuard<'_, Hub> {
    // A panic while holding the lock cannot leave the hub inconsistent.
    hub.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Broadcast {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Hub> {
        lock(&self.hub)
    }

    /// Sends `event`, stamped with the current time, to every negotiated client: now, or
    /// held until the reply of the command in progress (see [`Broadcast`]).
    pub fn emit(&self, event: &Event) {
        let message = event.to_wire(EventTimestamp::now());
        let line: Line = wire::line(&message).into();
        let mut hub = self.lock();
        if hub.holds() {
            hub.held.push(line);
            self.any_held.store(true, Ordering::Release);
        } else {
            hub.send(line);
        }
    }

    /// The command in progress waits for other threads (QEMU's `AIO_WAIT_WHILE`): the events
    /// held so far leave now, and events pass at once until the guard drops. Does nothing
    /// unless called on the thread running a command.
    pub fn polling(&self) -> Polling {
        let mut hub = self.lock();
        if !hub.runs_command() {
            return Polling { hub: None };
        }
        hub.polling += 1;
        hub.release();
        Polling {
            hub: Some(self.hub.clone()),
        }
    }

    /// The caller has just taken the lock other threads emit under (the job registry's): it
    /// sees the state their held events describe, so on the thread running a command those
    /// events leave now, before anything the command answers from that state (in QEMU a
    /// command that sees a job's new state comes after the coroutine that emitted it).
    pub fn observed(&self) {
        if !self.any_held.load(Ordering::Acquire) {
            return;
        }
        let mut hub = self.lock();
        if hub.runs_command() {
            hub.release();
            self.any_held.store(false, Ordering::Release);
        }
    }

    /// The dispatcher starts a command: events of other threads are held from now on.
    pub(crate) fn begin_command(&self) {
        let mut hub = self.lock();
        hub.command = Some(std::thread::current().id());
        hub.polling = 0;
    }

    /// Queues the command's `reply` for `client`, then the events held meanwhile, atomically
    /// with respect to other events; the hold ends.
    pub(crate) fn reply_and_release(&self, client: &Client, reply: Line) {
        let mut hub = self.lock();
        client.push(reply);
        hub.command = None;
        hub.release();
        self.any_held.store(false, Ordering::Release);
    }

    /// Number of clients currently receiving events.
    pub fn subscribers(&self) -> usize {
        self.lock().clients.len()
    }

    /// The most output any subscribed client has pending, in bytes.
    pub fn most_pending(&self) -> usize {
        self.lock()
            .clients
            .iter()
            .map(|c| c.pending())
            .max()
            .unwrap_or(0)
    }

    /// Queue `reply` for `client`, then subscribe it, atomically with respect to events: no
    /// event can reach the client before the reply that ends its negotiation.
    pub(crate) fn reply_and_subscribe(&self, client: &Arc<Client>, reply: Line) {
        let mut hub = self.lock();
        if client.push(reply) {
            hub.clients.push(client.clone());
        }
    }

    pub(crate) fn unsubscribe(&self, client_id: u64) {
        self.lock().clients.retain(|c| c.id != client_id);
    }

    pub(crate) fn unsubscribe_all(&self) {
        self.lock().clients.clear();
    }
}
