//! One connection: a reader task owns the read half and routes every message; requests
//! are written whole, in the order they were queued: by the calling task itself when the
//! socket takes them at once (unix and TCP sockets, the common case: no task switch on
//! the way out), otherwise by a writer task that drains the queue.
//!
//! Every message read gets a sequence number. Replies go to the call waiting for their
//! `id`; events go to every subscriber present when they were read, each with its own
//! unbounded queue, so a subscriber never misses an event and a slow one never holds the
//! others up. When the connection ends (EOF, EOF in the middle of a message, an I/O or
//! protocol error, or the client closing it), every waiting call receives the reason,
//! every later call fails with it at once, and every event queue ends.

use crate::error::TransportError;
use crate::framing::Framer;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// A message as read, with its place in the stream.
#[derive(Debug)]
pub(crate) struct Incoming {
    /// Position in the stream (1 for the first message read).
    pub seq: u64,
    pub message: Value,
}

type ReplySender = oneshot::Sender<Result<Incoming, TransportError>>;

/// What the reader task and the callers share.
pub(crate) struct Shared {
    state: Mutex<State>,
    writing: Mutex<Writing>,
}

/// The way out. Invariant: while `backlog` is set, every request goes through the
/// writer task's queue (so requests never overtake each other, and no two writers
/// write at once); when it is clear, the queue is empty and the writer task idle.
struct Writing {
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    /// The socket, when callers may write to it themselves.
    direct: Option<Arc<dyn DirectWrite>>,
    backlog: bool,
}

/// A write half that can be written without `&mut` and without waiting: unix and TCP
/// sockets.
pub(crate) trait DirectWrite: Send + Sync + 'static {
    /// Writes what the socket takes now (`WouldBlock` if nothing).
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
    /// Waits until the socket may take more.
    fn writable(&self) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>>;
}

impl DirectWrite for tokio::net::unix::OwnedWriteHalf {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write(self, buf)
    }

    fn writable(&self) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>> {
        Box::pin(tokio::net::unix::OwnedWriteHalf::writable(self))
    }
}

impl DirectWrite for tokio::net::tcp::OwnedWriteHalf {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write(self, buf)
    }

    fn writable(&self) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + '_>> {
        Box::pin(tokio::net::tcp::OwnedWriteHalf::writable(self))
    }
}

/// The write half of a connection.
pub(crate) enum Writer {
    /// A socket callers may write to themselves.
    Direct(Arc<dyn DirectWrite>),
    /// Any other stream: written by the writer task only.
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Calls waiting for their reply, by id.
    pending: HashMap<u64, ReplySender>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<Incoming>>>,
    /// Waiting for the greeting (`{"QMP": ...}`), until it comes.
    greeting: Option<oneshot::Sender<Result<Incoming, TransportError>>>,
    /// Sequence number of the last message read.
    seq: u64,
    /// Set once the connection has ended.
    closed: Option<TransportError>,
}

/// A call sent and waiting for its reply. Dropping it (a caller's timeout) forgets the
/// call: a reply that comes later is read and discarded.
pub(crate) struct PendingReply {
    id: u64,
    rx: Option<oneshot::Receiver<Result<Incoming, TransportError>>>,
    shared: Arc<Shared>,
}

impl PendingReply {
    pub(crate) async fn wait(mut self) -> Result<Incoming, TransportError> {
        let rx = self.rx.as_mut().ok_or(TransportError::ClosedByClient)?;
        let reply = rx.await.unwrap_or(Err(TransportError::ClosedByClient));
        self.rx = None;
        reply
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.shared.lock().pending.remove(&self.id);
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

/// Starts the reader and writer tasks on the current tokio runtime.
pub(crate) fn start<R>(reader: R, writer: Writer, expect_greeting: bool) -> Started
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (outbox, outbox_rx) = mpsc::unbounded_channel();
    let (events_tx, early_events) = mpsc::unbounded_channel();
    let mut state = State {
        subscribers: vec![events_tx],
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
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        writing: Mutex::new(Writing {
            outbox,
            backlog: direct.is_none(),
            direct,
        }),
    });
    let reader = tokio::spawn(read_loop(shared.clone(), reader)).abort_handle();
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
                let (tx, rx) = oneshot::channel();
                state.pending.insert(id, tx);
                PendingReply {
                    id,
                    rx: Some(rx),
                    shared: self.clone(),
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
    /// event queue.
    pub(crate) fn close(&self, reason: TransportError) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        tracing::debug!(%reason, "QMP connection ends");
        state.closed = Some(reason.clone());
        for (_, waiter) in state.pending.drain() {
            let _ = waiter.send(Err(reason.clone()));
        }
        if let Some(greeting) = state.greeting.take() {
            let _ = greeting.send(Err(reason.clone()));
        }
        state.subscribers.clear();
    }

    /// Routes one message read from the server.
    fn route(&self, bytes: &[u8]) -> Result<(), TransportError> {
        let message: Value = serde_json::from_slice(bytes)
            .map_err(|e| TransportError::Protocol(format!("not JSON ({e}): {}", excerpt(bytes))))?;
        let Value::Object(object) = &message else {
            unreachable!("the framer hands out objects only")
        };
        let kind = if object.contains_key("event") {
            Kind::Event
        } else if object.contains_key("return") || object.contains_key("error") {
            match object.get("id") {
                Some(id) => Kind::Reply(id.as_u64()),
                None => {
                    return Err(TransportError::Protocol(format!(
                        "a reply without an id: {}",
                        excerpt(bytes)
                    )));
                }
            }
        } else if object.contains_key("QMP") {
            Kind::Greeting
        } else {
            return Err(TransportError::Protocol(format!(
                "a message that is neither a reply nor an event: {}",
                excerpt(bytes)
            )));
        };
        let mut state = self.lock();
        state.seq += 1;
        let incoming = Incoming {
            seq: state.seq,
            message,
        };
        match kind {
            Kind::Event => {
                let incoming = Arc::new(incoming);
                state
                    .subscribers
                    .retain(|queue| queue.send(incoming.clone()).is_ok());
            }
            Kind::Reply(id) => match id.and_then(|id| state.pending.remove(&id)) {
                Some(waiter) => {
                    let _ = waiter.send(Ok(incoming));
                }
                None => tracing::debug!(
                    "discarding a reply nobody waits for (a call given up): {}",
                    excerpt(bytes)
                ),
            },
            Kind::Greeting => match state.greeting.take() {
                Some(waiter) => {
                    let _ = waiter.send(Ok(incoming));
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
    Event,
    Reply(Option<u64>),
    Greeting,
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

async fn read_loop<R: AsyncRead + Unpin>(shared: Arc<Shared>, mut reader: R) {
    let mut framer = Framer::default();
    let reason = loop {
        let buf = framer.buffer();
        buf.reserve(64 * 1024);
        match reader.read_buf(buf).await {
            Ok(0) => {
                let partial = framer.partial();
                break if partial.is_empty() {
                    TransportError::Eof
                } else {
                    TransportError::EofMidMessage {
                        len: partial.len(),
                        excerpt: excerpt(partial),
                    }
                };
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break TransportError::io(&e),
        }
        let mut failed = None;
        let framed = framer.messages(|bytes| {
            if failed.is_none() {
                failed = shared.route(bytes).err();
            }
        });
        if let Err(stray) = framed {
            failed.get_or_insert(TransportError::Protocol(format!(
                "byte {:#04x} outside a message",
                stray.0
            )));
        }
        if let Some(reason) = failed {
            break reason;
        }
    };
    shared.close(reason);
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
            Writer::Direct(socket) => write_all_direct(socket.as_ref(), &batch).await,
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

async fn write_all_direct(socket: &dyn DirectWrite, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        socket.writable().await?;
        match socket.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
