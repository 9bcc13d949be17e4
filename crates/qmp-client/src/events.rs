//! Event streams: every subscriber sees every event read after it subscribed, typed
//! through a generated API's `Event` enum (or [`RawEvent`] for none).

use crate::connection::Incoming;
use crate::error::Error;
use futures_core::Stream;
use qapi_runtime::{Event, EventTimestamp, QmpError};
use serde_json::Value;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// An event with the time the server stamped on it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMessage<E> {
    /// The typed event; an event the schema does not know is the API's `UnknownEvent`
    /// variant (its name and data).
    pub event: E,
    pub timestamp: EventTimestamp,
}

/// An event read without a schema: its name and data as sent. Implements
/// [`qapi_runtime::Event`], so `client.events::<RawEvent>()` streams every event untyped.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    pub name: String,
    pub data: Option<Value>,
}

impl Event for RawEvent {
    fn name(&self) -> &str {
        &self.name
    }

    fn data(&self) -> Option<Value> {
        self.data.clone()
    }

    fn from_wire(message: &Value) -> Result<Self, QmpError> {
        let (name, data) = qapi_runtime::event::split_message(message)?;
        Ok(RawEvent {
            name: name.to_string(),
            data: data.cloned(),
        })
    }
}

/// Reads one event message as `E`.
pub(crate) fn read_event<E: Event>(message: &Value) -> Result<EventMessage<E>, Error> {
    let name = message.get("event").and_then(Value::as_str).unwrap_or("");
    let mismatch = |reason: String| Error::Mismatch {
        what: format!("event '{name}'"),
        reason,
        value: message.clone(),
    };
    let timestamp = message
        .get("timestamp")
        .ok_or_else(|| mismatch("Parameter 'timestamp' is missing".to_string()))
        .and_then(|t| {
            <EventTimestamp as serde::Deserialize>::deserialize(t)
                .map_err(|e| mismatch(format!("Parameter 'timestamp' is invalid: {e}")))
        })?;
    let event = E::from_wire(message).map_err(|e| mismatch(e.desc))?;
    Ok(EventMessage { event, timestamp })
}

/// The events read after [`Client::events`](crate::Client::events) was called, in the
/// order the server sent them. Ends when the connection ends. An event whose data does
/// not fit the schema is an `Err(Error::Mismatch)` item, and the stream goes on.
///
/// Events queue up until they are read: a subscriber that stops reading should drop its
/// stream.
pub struct EventStream<E> {
    queue: mpsc::UnboundedReceiver<Arc<Incoming>>,
    typed: PhantomData<fn() -> E>,
}

impl<E: Event> EventStream<E> {
    pub(crate) fn new(queue: mpsc::UnboundedReceiver<Arc<Incoming>>) -> Self {
        EventStream {
            queue,
            typed: PhantomData,
        }
    }

    /// The next event; `None` once the connection has ended and every event read
    /// before has been returned.
    pub async fn next(&mut self) -> Option<Result<EventMessage<E>, Error>> {
        let incoming = self.queue.recv().await?;
        Some(read_event(&incoming.message))
    }

    /// The next event if one has been read already, without waiting.
    pub fn try_next(&mut self) -> Option<Result<EventMessage<E>, Error>> {
        let incoming = self.queue.try_recv().ok()?;
        Some(read_event(&incoming.message))
    }

    /// The next event with its place in the stream (for the job helpers).
    pub(crate) async fn next_incoming(&mut self) -> Option<Arc<Incoming>> {
        self.queue.recv().await
    }

    pub(crate) fn try_next_incoming(&mut self) -> Option<Arc<Incoming>> {
        self.queue.try_recv().ok()
    }
}

impl<E: Event> Stream for EventStream<E> {
    type Item = Result<EventMessage<E>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.queue
            .poll_recv(cx)
            .map(|incoming| incoming.map(|incoming| read_event(&incoming.message)))
    }
}
