//! One connection. Requests are written whole, in the order they were queued: by the
//! calling task itself when the socket takes them at once (unix and TCP sockets, the
//! common case: no task switch on the way out), otherwise by a writer task that drains
//! the queue.
//!
//! Replies are read by whoever waits for one. On a unix or TCP socket, a call waiting
//! for its reply reads the socket itself when no other call is reading (it *leads*):
//! it routes what it reads (replies to the calls they answer, events to every
//! subscriber) until its own reply comes, then hands the reading to another waiting
//! call, or back to the connection's background reader when no call waits. So a lone
//! call's reply wakes that call directly, with no task in between. When nobody calls,
//! the background reader reads, so events reach subscribers as they come. Who reads
//! is a state ([`Role`]), changed under the state lock; the bytes read and the message
//! begun live in the connection, not in the reading call, so a call dropped in the
//! middle (a caller's timeout) loses nothing. A reading call that is kept but not
//! polled (a future parked in a `select!` while its task awaits something else) does
//! not hold the others up: every wake-up of the socket also wakes the background
//! reader, which lets the reading call have one turn of the scheduler and, if the call
//! has not read by then, reads itself. Other streams are read by the background reader
//! only.
//!
//! Every message read gets a sequence number. Replies go to the call waiting for their
//! `id`; events go to every subscriber present when they were read, each with its own
//! unbounded queue, so a subscriber never misses an event and a slow one never holds the
//! others up. When the connection ends (EOF, EOF in the middle of a message, an I/O or
//! protocol error, or the client closing it), every waiting call receives the reason,
//! every later call fails with it at once, and every event queue ends.

use crate::error::TransportError;
use crate::framing::Framer;
use crate::socket::Registered;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};

/// A message as read, with its place in the stream.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// Position in the stream (1 for the first message read).
    pub seq: u64,
    pub message: Value,
}

/// What the callers, the background reader and the writer task share.
pub(crate) struct Shared {
    state: Mutex<State>,
    writing: Mutex<Writing>,
    /// The read half and the bytes read from it not yet routed. Locked by whoever reads,
    /// for one read and the routing of what it brought; taken before `state`, never
    /// while holding it.
    reading: Mutex<Reading>,
    /// The socket, when calls may read it themselves.
    socket: Option<Arc<Registered>>,
    /// Whom a wake-up of the socket wakes.
    wakeup: Arc<Wakeup>,
    /// `wakeup` as a waker: the only waker ever given to the socket.
    socket_waker: Waker,
}

struct Reading {
    /// Dropped when the connection ends.
    reader: Option<Reader>,
    framer: Framer,
}

/// The way out. Invariant: while `backlog` is set, every request goes through the
/// writer task's queue (so requests never overtake each other, and no two writers
/// write at once); when it is clear, the queue is empty and the writer task idle.
struct Writing {
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    /// The socket, when callers may write to it themselves.
    direct: Option<Arc<Registered>>,
    backlog: bool,
}

/// The write half of a connection.
pub(crate) enum Writer {
    /// A socket callers may write to themselves.
    Direct(Arc<Registered>),
    /// Any other stream: written by the writer task only.
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
}

/// The read half of a connection.
pub(crate) enum Reader {
    /// A unix or TCP socket: read by the calls themselves, or the background reader.
    Socket(Arc<Registered>),
    /// Any other stream: read by the background reader only.
    Stream(Box<dyn AsyncRead + Unpin + Send>),
}

impl Reader {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        match self {
            Reader::Socket(socket) => socket.poll_read(cx, buf),
            Reader::Stream(stream) => {
                let mut buf = ReadBuf::new(buf);
                ready!(Pin::new(stream).poll_read(cx, &mut buf))?;
                Poll::Ready(Ok(buf.filled().len()))
            }
        }
    }
}

/// Who reads the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Role {
    /// The background reader (no call waits, or the connection is not a socket).
    #[default]
    Background,
    /// The call with this id, whenever it is polled.
    Call(u64),
}

/// A wake-up of the socket (something may have arrived) wakes the reading call, if a
/// call reads, and the background reader. Kept apart from [`Shared`], which owns the
/// socket that holds this waker.
#[derive(Default)]
struct Wakeup {
    /// Wake-ups so far.
    raised: AtomicU64,
    /// `raised` as it was when the socket was last read: a wake-up after it is one that
    /// no reader has answered yet.
    answered: AtomicU64,
    wakers: Mutex<Wakers>,
}

#[derive(Default)]
struct Wakers {
    call: Option<Waker>,
    background: Option<Waker>,
}

impl Wakeup {
    fn wakers(&self) -> MutexGuard<'_, Wakers> {
        self.wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn unanswered(&self) -> bool {
        self.answered.load(Ordering::Acquire) < self.raised.load(Ordering::Acquire)
    }
}

impl Wake for Wakeup {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raised.fetch_add(1, Ordering::AcqRel);
        let (call, background) = {
            let wakers = self.wakers();
            (wakers.call.clone(), wakers.background.clone())
        };
        // The reading call first: on a current-thread runtime it then runs first, reads,
        // and the background reader finds nothing left to answer.
        if let Some(call) = call {
            call.wake();
        }
        if let Some(background) = background {
            background.wake();
        }
    }
}

/// Sets `slot` to `waker` unless it already wakes the same task.
fn keep_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(kept) if kept.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// A reply as read: its place in the stream and its `return` member, or its `error`.
#[derive(Debug)]
pub(crate) struct Reply {
    pub seq: u64,
    pub outcome: Result<Value, Value>,
}

/// A call waiting for its reply.
#[derive(Default)]
struct Call {
    reply: Option<Result<Reply, TransportError>>,
    waker: Option<Waker>,
}

/// Hashes call ids (our own counter, so no attacker picks them) with one multiplication,
/// which spreads consecutive ids over the high bits the table uses.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Calls waiting for their reply, by id.
    calls: HashMap<u64, Call, BuildHasherDefault<IdHasher>>,
    /// Who reads.
    reads: Role,
    /// Whether calls may read (a socket).
    calls_read: bool,
    /// The wake-up ([`Wakeup::raised`]) for which the background reader last left the
    /// reading call one turn to answer.
    turn_given: u64,
    subscribers: Vec<mpsc::UnboundedSender<Arc<Incoming>>>,
    /// Waiting for the greeting (`{"QMP": ...}`), until it comes.
    greeting: Option<oneshot::Sender<Result<Incoming, TransportError>>>,
    /// Sequence number of the last message read.
    seq: u64,
    /// Set once the connection has ended.
    closed: Option<TransportError>,
}

/// A call sent and waiting for its reply. Dropping it (a caller's timeout) forgets the
/// call: a reply that comes later is read and discarded. Dropping the call that reads
/// hands the reading on; what it had read stays with the connection.
pub(crate) struct PendingReply {
    id: u64,
    shared: Arc<Shared>,
    done: bool,
}

impl PendingReply {
    pub(crate) async fn wait(mut self) -> Result<Reply, TransportError> {
        std::future::poll_fn(|cx| {
            let reply = ready!(self.shared.poll_reply(self.id, cx));
            self.done = true;
            Poll::Ready(reply)
        })
        .await
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if !self.done {
            self.shared.forget(self.id);
        }
    }
}

/// The tasks of one connection; aborted when dropped.
pub(crate) struct Tasks {
    reader: tokio::task::AbortHandle,
    writer: tokio::task::AbortHandle,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Everything `start` sets up before the first byte is read.
pub(crate) struct Started {
    pub shared: Arc<Shared>,
    pub tasks: Tasks,
    /// The greeting, for connections that expect one.
    pub greeting: Option<oneshot::Receiver<Result<Incoming, TransportError>>>,
    /// Every event from the first byte on, until the caller drops it.
    pub early_events: mpsc::UnboundedReceiver<Arc<Incoming>>,
}

/// Starts the background reader and the writer task on the current tokio runtime.
pub(crate) fn start(reader: Reader, writer: Writer, expect_greeting: bool) -> Started {
    let (outbox, outbox_rx) = mpsc::unbounded_channel();
    let (events_tx, early_events) = mpsc::unbounded_channel();
    let socket = match &reader {
        Reader::Socket(socket) => Some(socket.clone()),
        Reader::Stream(_) => None,
    };
    let mut state = State {
        subscribers: vec![events_tx],
        calls_read: socket.is_some(),
        ..State::default()
    };
    let greeting = expect_greeting.then(|| {
        let (tx, rx) = oneshot::channel();
        state.greeting = Some(tx);
        rx
    });
    let direct = match &writer {
        Writer::Direct(socket) => Some(socket.clone()),
        Writer::Stream(_) => None,
    };
    let wakeup = Arc::new(Wakeup::default());
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        writing: Mutex::new(Writing {
            outbox,
            backlog: direct.is_none(),
            direct,
        }),
        reading: Mutex::new(Reading {
            reader: Some(reader),
            framer: Framer::default(),
        }),
        socket,
        socket_waker: Waker::from(wakeup.clone()),
        wakeup,
    });
    let reader = tokio::spawn(BackgroundReader(shared.clone())).abort_handle();
    let writer = tokio::spawn(write_loop(shared.clone(), writer, outbox_rx)).abort_handle();
    Started {
        shared,
        tasks: Tasks { reader, writer },
        greeting,
        early_events,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed in a way
        // that matters more than losing the connection; carry on with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_writing(&self) -> MutexGuard<'_, Writing> {
        self.writing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_reading(&self) -> MutexGuard<'_, Reading> {
        self.reading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends the request `encode(id)` returns; with `reply`, registers the call first so
    /// its reply cannot come before anyone waits for it.
    pub(crate) fn send(
        self: &Arc<Self>,
        reply: bool,
        encode: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<Option<PendingReply>, TransportError> {
        let (id, pending) = {
            let mut state = self.lock();
            if let Some(reason) = &state.closed {
                return Err(reason.clone());
            }
            state.next_id += 1;
            let id = state.next_id;
            let pending = reply.then(|| {
                state.calls.insert(id, Call::default());
                PendingReply {
                    id,
                    shared: self.clone(),
                    done: false,
                }
            });
            (id, pending)
        };
        let mut request = encode(id);
        let mut writing = self.lock_writing();
        if !writing.backlog
            && let Some(socket) = &writing.direct
        {
            let mut written = 0;
            while written < request.len() {
                match socket.try_write(&request[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        drop(writing);
                        let reason = TransportError::io(&e);
                        self.close(reason.clone());
                        return Err(reason);
                    }
                }
            }
            if written == request.len() {
                return Ok(pending);
            }
            // The socket is full: the writer task sends the rest, and everything after.
            request.drain(..written);
            writing.backlog = true;
        }
        if writing.outbox.send(request).is_err() {
            drop(writing);
            return Err(self.closed().unwrap_or(TransportError::ClosedByClient));
        }
        Ok(pending)
    }

    /// A new event queue: every event read from now on, until the connection ends.
    /// Also returns the sequence number of the last message read before it.
    pub(crate) fn subscribe(&self) -> (mpsc::UnboundedReceiver<Arc<Incoming>>, u64) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.lock();
        if state.closed.is_none() {
            state.subscribers.push(tx);
        }
        (rx, state.seq)
    }

    /// Why the connection ended, if it has.
    pub(crate) fn closed(&self) -> Option<TransportError> {
        self.lock().closed.clone()
    }

    /// Ends the connection (the first reason wins): fails every waiting call, ends every
    /// event queue, stops the background reader.
    pub(crate) fn close(&self, reason: TransportError) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        tracing::debug!(%reason, "QMP connection ends");
        state.closed = Some(reason.clone());
        for call in state.calls.values_mut() {
            // A reply read before the end is still the call's.
            call.reply.get_or_insert_with(|| Err(reason.clone()));
            if let Some(waker) = call.waker.take() {
                waker.wake();
            }
        }
        if let Some(greeting) = state.greeting.take() {
            let _ = greeting.send(Err(reason.clone()));
        }
        state.subscribers.clear();
        drop(state);
        // The other end sees the connection close now, not when the last clone goes.
        if let Some(socket) = &self.socket {
            socket.shutdown();
        }
        self.lock_reading().reader = None;
        let background = self.wakeup.wakers().background.take();
        if let Some(background) = background {
            background.wake();
        }
    }

    /// The call `id`'s reply, reading the socket for it when no other call reads.
    fn poll_reply(&self, id: u64, cx: &mut Context<'_>) -> Poll<Result<Reply, TransportError>> {
        loop {
            {
                let mut state = self.lock();
                let Some(call) = state.calls.get_mut(&id) else {
                    // Only this call removes its entry, on its way out.
                    return Poll::Ready(Err(TransportError::ClosedByClient));
                };
                if let Some(reply) = call.reply.take() {
                    state.calls.remove(&id);
                    self.stop_reading(state, id);
                    return Poll::Ready(reply);
                }
                keep_waker(&mut call.waker, cx.waker());
                match state.reads {
                    Role::Call(reader) if reader == id => {}
                    Role::Background if state.calls_read => state.reads = Role::Call(id),
                    // Another call reads, or only the background reader may: woken when
                    // the reply is routed here, or when the reading is handed over.
                    _ => return Poll::Pending,
                }
                keep_waker(&mut self.wakeup.wakers().call, cx.waker());
            }
            if self.read(Role::Call(id)).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// A call given up (dropped before its reply): forgets it, hands the reading on.
    fn forget(&self, id: u64) {
        let mut state = self.lock();
        state.calls.remove(&id);
        self.stop_reading(state, id);
    }

    /// The call `id` no longer reads, if it did: another waiting call reads next, or
    /// the background reader when none waits.
    fn stop_reading(&self, mut state: MutexGuard<'_, State>, id: u64) {
        if state.reads != Role::Call(id) {
            return;
        }
        let next = state
            .calls
            .iter()
            .find(|(_, call)| call.reply.is_none() && call.waker.is_some())
            .map(|(&next, call)| (next, call.waker.clone()));
        let mut wakers = self.wakeup.wakers();
        match next {
            Some((next, waker)) => {
                state.reads = Role::Call(next);
                wakers.call = waker.clone();
                drop(wakers);
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            None => {
                state.reads = Role::Background;
                wakers.call = None;
                let background = wakers.background.clone();
                drop(wakers);
                drop(state);
                if let Some(background) = background {
                    background.wake();
                }
            }
        }
        // Whoever reads next must hear of what arrives, even before it first reads:
        // make sure the socket will wake it (or wake it now if something is there).
        if let Some(socket) = &self.socket
            && socket
                .poll_read_ready(&mut Context::from_waker(&self.socket_waker))
                .is_ready()
        {
            self.socket_waker.wake_by_ref();
        }
    }

    /// One read by `role` (if it still reads) and the routing of what it brought.
    /// `Pending`: nothing to read, the socket will wake the readers. `Ready`: something
    /// changed (messages routed, the connection ended, the role moved); look again.
    fn read(&self, role: Role) -> Poll<()> {
        let mut reading = self.lock_reading();
        {
            let state = self.lock();
            if state.closed.is_some() || state.reads != role {
                return Poll::Ready(());
            }
            // A reader before this one may have read this call's reply (the background
            // reader, reading when the call began to).
            if let Role::Call(id) = role
                && state
                    .calls
                    .get(&id)
                    .is_some_and(|call| call.reply.is_some())
            {
                return Poll::Ready(());
            }
        }
        self.wakeup.answered.store(
            self.wakeup.raised.load(Ordering::Acquire),
            Ordering::Release,
        );
        let Reading {
            reader: Some(reader),
            framer,
        } = &mut *reading
        else {
            return Poll::Ready(());
        };
        let failed =
            match reader.poll_read(&mut Context::from_waker(&self.socket_waker), framer.space()) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let partial = framer.partial();
                    Some(if partial.is_empty() {
                        TransportError::Eof
                    } else {
                        TransportError::EofMidMessage {
                            len: partial.len(),
                            excerpt: excerpt(partial),
                        }
                    })
                }
                Poll::Ready(Ok(n)) => {
                    framer.filled(n);
                    let mut failed = None;
                    let framed = framer.messages(|bytes| {
                        if failed.is_none() {
                            failed = self.route(bytes).err();
                        }
                    });
                    if let Err(stray) = framed {
                        failed.get_or_insert(TransportError::Protocol(format!(
                            "byte {:#04x} outside a message",
                            stray.0
                        )));
                    }
                    failed
                }
                Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => None,
                Poll::Ready(Err(e)) => Some(TransportError::io(&e)),
            };
        drop(reading);
        if let Some(reason) = failed {
            self.close(reason);
        }
        Poll::Ready(())
    }

    /// Routes one message read from the server.
    fn route(&self, bytes: &[u8]) -> Result<(), TransportError> {
        let parsed: Parsed = serde_json::from_slice(bytes)
            .map_err(|e| TransportError::Protocol(format!("not JSON ({e}): {}", excerpt(bytes))))?;
        let kind = if parsed.rest.contains_key("event") {
            Kind::Event(parsed.into_message())
        } else if parsed.returned.is_some() || parsed.error.is_some() {
            let Some(id) = &parsed.id else {
                return Err(TransportError::Protocol(format!(
                    "a reply without an id: {}",
                    excerpt(bytes)
                )));
            };
            let id = id.as_u64();
            let outcome = match parsed.returned {
                Some(returned) => Ok(returned),
                None => Err(parsed.error.unwrap_or(Value::Null)),
            };
            Kind::Reply(id, outcome)
        } else if parsed.rest.contains_key("QMP") {
            Kind::Greeting(parsed.into_message())
        } else {
            return Err(TransportError::Protocol(format!(
                "a message that is neither a reply nor an event: {}",
                excerpt(bytes)
            )));
        };
        let mut state = self.lock();
        state.seq += 1;
        let seq = state.seq;
        match kind {
            Kind::Event(message) => {
                let incoming = Arc::new(Incoming { seq, message });
                state
                    .subscribers
                    .retain(|queue| queue.send(incoming.clone()).is_ok());
            }
            Kind::Reply(id, outcome) => match id.and_then(|id| {
                let reading = state.reads == Role::Call(id);
                Some((state.calls.get_mut(&id)?, reading))
            }) {
                Some((call, reading)) => {
                    call.reply = Some(Ok(Reply { seq, outcome }));
                    // The reading call itself needs no wake-up: it takes its reply when
                    // its read returns (see `read`).
                    if let Some(waker) = call.waker.take()
                        && !reading
                    {
                        waker.wake();
                    }
                }
                None => tracing::debug!(
                    "discarding a reply nobody waits for (a call given up): {}",
                    excerpt(bytes)
                ),
            },
            Kind::Greeting(message) => match state.greeting.take() {
                Some(waiter) => {
                    let _ = waiter.send(Ok(Incoming { seq, message }));
                }
                None => {
                    return Err(TransportError::Protocol(format!(
                        "an unexpected greeting: {}",
                        excerpt(bytes)
                    )));
                }
            },
        }
        Ok(())
    }
}

enum Kind {
    Event(Value),
    Reply(Option<u64>, Result<Value, Value>),
    Greeting(Value),
}

/// A message read in one pass: a reply's members are taken out as they are read (no
/// object is built around them), anything else is kept as an object.
struct Parsed {
    returned: Option<Value>,
    error: Option<Value>,
    id: Option<Value>,
    rest: serde_json::Map<String, Value>,
}

impl Parsed {
    /// The whole message as an object (events, the greeting).
    fn into_message(self) -> Value {
        let mut object = self.rest;
        for (name, value) in [
            ("return", self.returned),
            ("error", self.error),
            ("id", self.id),
        ] {
            if let Some(value) = value {
                object.insert(name.to_string(), value);
            }
        }
        Value::Object(object)
    }
}

/// A member name, without a copy for the names a reply has.
enum Member {
    Return,
    Error,
    Id,
    Other(String),
}

impl<'de> serde::Deserialize<'de> for Member {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = Member;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Member, E> {
                Ok(match name {
                    "return" => Member::Return,
                    "error" => Member::Error,
                    "id" => Member::Id,
                    other => Member::Other(other.to_string()),
                })
            }
        }
        deserializer.deserialize_str(Name)
    }
}

impl<'de> serde::Deserialize<'de> for Parsed {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Parsed;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Parsed, A::Error> {
                let mut parsed = Parsed {
                    returned: None,
                    error: None,
                    id: None,
                    rest: serde_json::Map::new(),
                };
                // As in a `Value`, a member given twice keeps its last value.
                while let Some(member) = map.next_key::<Member>()? {
                    match member {
                        Member::Return => parsed.returned = Some(map.next_value()?),
                        Member::Error => parsed.error = Some(map.next_value()?),
                        Member::Id => parsed.id = Some(map.next_value()?),
                        Member::Other(name) => {
                            parsed.rest.insert(name, map.next_value()?);
                        }
                    }
                }
                Ok(parsed)
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// The beginning of a message, for error texts.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{text}...")
    } else {
        text
    }
}

/// The connection's own reader: reads while no call does (and always, for a stream that
/// is not a socket), so that events are read when nobody calls; takes over from a
/// reading call that is not polled.
struct BackgroundReader(Arc<Shared>);

impl Future for BackgroundReader {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &*self.0;
        keep_waker(&mut shared.wakeup.wakers().background, cx.waker());
        loop {
            {
                let mut state = shared.lock();
                if state.closed.is_some() {
                    return Poll::Ready(());
                }
                if let Role::Call(_) = state.reads {
                    if !shared.wakeup.unanswered() {
                        // The reading call keeps up.
                        return Poll::Pending;
                    }
                    let raised = shared.wakeup.raised.load(Ordering::Acquire);
                    if state.turn_given < raised {
                        // Woken with the reading call: it had the first turn. Once every
                        // task woken now has run, look again.
                        state.turn_given = raised;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    // The reading call was woken and has not read: it is not being polled
                    // (kept in a `select!` while its task awaits something else). Read for
                    // it; it finds its reply waiting when it is polled again.
                    state.reads = Role::Background;
                    shared.wakeup.wakers().call = None;
                }
            }
            if shared.read(Role::Background).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// Writes what callers could not write themselves, in order.
async fn write_loop(
    shared: Arc<Shared>,
    mut writer: Writer,
    mut outbox: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut batch = Vec::new();
    while let Some(first) = outbox.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        // Requests queued meanwhile go out in the same write.
        while batch.len() < 64 * 1024 {
            match outbox.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let written = match &mut writer {
            Writer::Direct(socket) => socket.write_all(&batch).await,
            Writer::Stream(stream) => {
                async {
                    stream.write_all(&batch).await?;
                    stream.flush().await
                }
                .await
            }
        };
        if let Err(e) = written {
            shared.close(TransportError::io(&e));
            return;
        }
        // Caught up: callers may write directly again (checked under the lock callers
        // queue under, so nothing queued is left behind).
        let mut writing = shared.lock_writing();
        if writing.direct.is_some() && outbox.is_empty() {
            writing.backlog = false;
        }
    }
}
