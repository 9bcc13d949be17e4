//! The async client.

use crate::connection::{self, Incoming, PendingReply, Reader, Reply, Shared, Tasks, Writer};
use crate::error::{Error, Result, TransportError};
use crate::events::{EventMessage, EventStream, read_event};
use crate::greeting::Greeting;
use crate::socket::{Registered, Socket};
use qapi_runtime::{Command, ErrorClass, Event, QmpError};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};

/// A QMP connection, shared by cheap clones: any number of tasks may call it at once,
/// each call matched to its reply by `id`.
///
/// Dropping the last clone closes the connection. Every method is cancel-safe: a
/// dropped call (say, by [`tokio::time::timeout`]) never leaves half a request on the
/// wire. See [the crate docs](crate#timeouts) for what a timeout leaves behind.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tasks: Mutex<Option<Tasks>>,
    greeting: Option<Greeting>,
    oob: bool,
    early_events: std::sync::OnceLock<Vec<Arc<Incoming>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close(TransportError::ClosedByClient);
    }
}

/// How to open a connection: [`Client::builder`].
#[derive(Debug, Clone)]
pub struct Connector {
    oob: bool,
    greeting: bool,
}

impl Default for Connector {
    fn default() -> Self {
        Connector {
            oob: false,
            greeting: true,
        }
    }
}

impl Connector {
    /// Ask for the `oob` capability (out-of-band commands, `exec-oob`) if the server
    /// offers it. [`Client::oob_enabled`] tells whether it was enabled.
    pub fn oob(mut self, oob: bool) -> Self {
        self.oob = oob;
        self
    }

    /// For the QEMU guest agent, which sends no greeting and has no capabilities
    /// negotiation: the connection is ready at once.
    pub fn guest_agent(mut self) -> Self {
        self.greeting = false;
        self
    }

    /// Connects to a unix socket.
    pub async fn connect_unix(self, path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| connect_error(path.display(), &e))?;
        let stream = stream
            .into_std()
            .map_err(|e| connect_error(path.display(), &e))?;
        self.handshake_socket(Socket::Unix(stream), path.display())
            .await
    }

    /// Connects over TCP.
    pub async fn connect_tcp(
        self,
        address: impl ToSocketAddrs + std::fmt::Debug,
    ) -> Result<Client> {
        let stream = TcpStream::connect(&address)
            .await
            .map_err(|e| connect_error(format_args!("{address:?}"), &e))?;
        let _ = stream.set_nodelay(true);
        let stream = stream
            .into_std()
            .map_err(|e| connect_error(format_args!("{address:?}"), &e))?;
        self.handshake_socket(Socket::Tcp(stream), format_args!("{address:?}"))
            .await
    }

    async fn handshake_socket(
        self,
        socket: Socket,
        address: impl std::fmt::Display,
    ) -> Result<Client> {
        let socket = Arc::new(Registered::new(socket).map_err(|e| connect_error(address, &e))?);
        self.handshake(Reader::Socket(socket.clone()), Writer::Direct(socket))
            .await
    }

    /// Takes an already connected stream (a socket passed by a parent process, one end
    /// of a socket pair, ...). A tokio `UnixStream` or `TcpStream` is used as
    /// [`Connector::connect_unix`] and [`Connector::connect_tcp`] use their sockets
    /// (calls write and read it themselves); any other stream is read by the
    /// connection's reader task and written by its writer task.
    pub async fn connect_stream<S>(self, stream: S) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let mut stream = Some(stream);
        let any: &mut dyn std::any::Any = &mut stream;
        if let Some(Some(unix)) = any.downcast_mut::<Option<UnixStream>>().map(Option::take) {
            let unix = unix.into_std().map_err(|e| connect_error("a stream", &e))?;
            return self.handshake_socket(Socket::Unix(unix), "a stream").await;
        }
        if let Some(Some(tcp)) = any.downcast_mut::<Option<TcpStream>>().map(Option::take) {
            let _ = tcp.set_nodelay(true);
            let tcp = tcp.into_std().map_err(|e| connect_error("a stream", &e))?;
            return self.handshake_socket(Socket::Tcp(tcp), "a stream").await;
        }
        let Some(stream) = stream else {
            unreachable!("taken only when it was a socket, which returned")
        };
        let (read, write) = tokio::io::split(stream);
        self.handshake(
            Reader::Stream(Box::new(read)),
            Writer::Stream(Box::new(write)),
        )
        .await
    }

    async fn handshake(self, read: Reader, write: Writer) -> Result<Client> {
        let started = connection::start(read, write, self.greeting);
        let mut early = started.early_events;
        let client_parts = (started.shared, started.tasks);
        let greeting = match started.greeting {
            None => None,
            Some(rx) => {
                let message = rx.await.unwrap_or(Err(TransportError::ClosedByClient))?;
                Some(Greeting::from_message(&message.message)?)
            }
        };
        let oob = self.oob && greeting.as_ref().is_some_and(|g| g.offers("oob"));
        let client = Client {
            inner: Arc::new(Inner {
                shared: client_parts.0,
                tasks: Mutex::new(Some(client_parts.1)),
                greeting,
                oob,
                early_events: std::sync::OnceLock::new(),
            }),
        };
        if self.greeting {
            let arguments = if oob {
                serde_json::json!({"enable": ["oob"]})
            } else {
                Value::Object(Default::default())
            };
            client.execute_value("qmp_capabilities", arguments).await?;
        }
        // Events read before this point (before the greeting, during negotiation):
        // kept for `early_events`, then the queue that held them is dropped.
        let mut early_events = Vec::new();
        while let Ok(event) = early.try_recv() {
            early_events.push(event);
        }
        drop(early);
        let _ = client.inner.early_events.set(early_events);
        Ok(client)
    }
}

fn connect_error(address: impl std::fmt::Display, error: &std::io::Error) -> Error {
    Error::Transport(TransportError::Connect {
        address: address.to_string(),
        kind: error.kind(),
        message: error.to_string(),
    })
}

/// Which key a request uses.
#[derive(Clone, Copy)]
enum Key {
    Execute,
    ExecOob,
}

impl Client {
    /// Options for opening a connection (`oob`, guest agent).
    pub fn builder() -> Connector {
        Connector::default()
    }

    /// Connects to a unix socket, reads the greeting and negotiates (without `oob`).
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Client> {
        Connector::default().connect_unix(path).await
    }

    /// Connects over TCP, reads the greeting and negotiates (without `oob`).
    pub async fn connect_tcp(address: impl ToSocketAddrs + std::fmt::Debug) -> Result<Client> {
        Connector::default().connect_tcp(address).await
    }

    /// Uses an already connected stream, reads the greeting and negotiates.
    pub async fn connect_stream<S>(stream: S) -> Result<Client>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Connector::default().connect_stream(stream).await
    }

    /// The server's greeting (`None` for the guest agent, which sends none).
    pub fn greeting(&self) -> Option<&Greeting> {
        self.inner.greeting.as_ref()
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.inner.oob
    }

    /// Events the server sent before the connection was ready (before the greeting and
    /// during negotiation), kept so that none is lost. Events sent later go to the
    /// streams of [`Client::events`] open at the time.
    pub fn early_events<E: Event>(&self) -> Vec<Result<EventMessage<E>>> {
        self.inner
            .early_events
            .get()
            .into_iter()
            .flatten()
            .map(|incoming| read_event(&incoming.message))
            .collect()
    }

    /// Every event read from now on, typed through `E` (a generated API's `Event`, or
    /// [`RawEvent`](crate::RawEvent)). Any number of streams may be open; each sees every
    /// event. The stream ends when the connection ends.
    pub fn events<E: Event>(&self) -> EventStream<E> {
        EventStream::new(self.inner.shared.subscribe().0)
    }

    /// A stream, and the sequence number of the last message read before it.
    pub(crate) fn events_since<E: Event>(&self) -> (EventStream<E>, u64) {
        let (queue, seq) = self.inner.shared.subscribe();
        (EventStream::new(queue), seq)
    }

    /// Why the connection ended, if it has.
    pub fn closed(&self) -> Option<TransportError> {
        self.inner.shared.closed()
    }

    /// Runs a command and reads its typed return:
    /// `client.execute(BlockJobFinalizeArguments { id }).await?`.
    ///
    /// For a command with `'success-response': false` (the guest agent's
    /// `guest-shutdown`), nothing is awaited but the request being queued; an error the
    /// server may still send is discarded.
    pub async fn execute<C: Command>(&self, command: C) -> Result<C::Returns> {
        self.execute_seq(command).await.map(|(returns, _)| returns)
    }

    /// Runs a command with `exec-oob` (out of band: it may overtake commands sent
    /// before it). Refused unless the command allows it and `oob` was negotiated
    /// ([`Connector::oob`]).
    pub async fn execute_oob<C: Command>(&self, command: C) -> Result<C::Returns> {
        if !C::ALLOW_OOB {
            return Err(Error::Refused(format!(
                "'{}' does not allow out-of-band execution",
                C::NAME
            )));
        }
        if !self.inner.oob {
            return Err(Error::Refused(
                "out-of-band execution needs the 'oob' capability, which was not negotiated"
                    .to_string(),
            ));
        }
        let reply = self.call(Key::ExecOob, C::NAME, &command, C::SUCCESS_RESPONSE)?;
        finish_typed::<C>(reply).await.map(|(returns, _)| returns)
    }

    /// `execute`, also giving the reply's place in the stream.
    pub(crate) async fn execute_seq<C: Command>(&self, command: C) -> Result<(C::Returns, u64)> {
        let reply = self.call(Key::Execute, C::NAME, &command, C::SUCCESS_RESPONSE)?;
        finish_typed::<C>(reply).await
    }

    /// Runs a command by name with JSON arguments (an object, or `null` for none) and
    /// returns its `return` member as sent: for commands outside the schema.
    pub async fn execute_value(&self, name: &str, arguments: Value) -> Result<Value> {
        self.execute_value_seq(name, arguments)
            .await
            .map(|(v, _)| v)
    }

    pub(crate) async fn execute_value_seq(
        &self,
        name: &str,
        arguments: Value,
    ) -> Result<(Value, u64)> {
        let reply = match &arguments {
            Value::Null => self.call(Key::Execute, name, &None::<()>, true)?,
            Value::Object(_) => self.call(Key::Execute, name, &Some(&arguments), true)?,
            other => {
                return Err(Error::Refused(format!(
                    "the arguments of '{name}' must be an object, not {other}"
                )));
            }
        };
        let reply = wait(reply).await?;
        let seq = reply.seq;
        Ok((returned(reply.outcome)?, seq))
    }

    /// Sends `quit` and waits for the server to go: its reply, or the connection closing
    /// before it (as QEMU may), are both success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute_value("quit", Value::Null).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_disconnect() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Closes the connection: every call waiting fails with
    /// [`TransportError::ClosedByClient`], every event stream ends.
    pub fn close(&self) {
        self.inner.shared.close(TransportError::ClosedByClient);
        let tasks = self.inner.tasks.lock().map(|mut t| t.take());
        drop(tasks);
    }

    fn call<A: Serialize + ?Sized>(
        &self,
        key: Key,
        name: &str,
        arguments: &A,
        expect_reply: bool,
    ) -> Result<Option<PendingReply>> {
        // Encoded before an id is taken, so that a value that does not serialise to an
        // object is refused without touching the connection.
        let body = encode_body(key, name, arguments)?;
        Ok(self.inner.shared.send(expect_reply, |id| {
            use std::io::Write as _;
            let mut request = body;
            // Writing to a Vec cannot fail.
            let _ = writeln!(request, ",\"id\":{id}}}");
            request
        })?)
    }
}

/// `{"execute":"NAME","arguments":{...}` (closed by the caller, with the id).
fn encode_body<A: Serialize + ?Sized>(key: Key, name: &str, arguments: &A) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(match key {
        Key::Execute => b"{\"execute\":",
        Key::ExecOob => b"{\"exec-oob\":",
    });
    let refused = |e: serde_json::Error| {
        Error::Refused(format!(
            "the arguments of '{name}' cannot be serialised: {e}"
        ))
    };
    serde_json::to_writer(&mut out, name).map_err(refused)?;
    let at = out.len();
    out.extend_from_slice(b",\"arguments\":");
    let start = out.len();
    serde_json::to_writer(&mut out, arguments).map_err(refused)?;
    match out.get(start) {
        Some(b'{') => {}
        // `None::<()>`: no arguments.
        Some(b'n') => out.truncate(at),
        _ => {
            return Err(Error::Refused(format!(
                "the arguments of '{name}' do not serialise to an object: {}",
                String::from_utf8_lossy(&out[start..])
            )));
        }
    }
    Ok(out)
}

async fn wait(reply: Option<PendingReply>) -> Result<Reply> {
    match reply {
        Some(reply) => Ok(reply.wait().await?),
        None => Ok(Reply {
            seq: 0,
            outcome: Ok(Value::Object(Default::default())),
        }),
    }
}

async fn finish_typed<C: Command>(reply: Option<PendingReply>) -> Result<(C::Returns, u64)> {
    let reply = wait(reply).await?;
    let seq = reply.seq;
    let value = returned(reply.outcome)?;
    match C::read_returns(&value) {
        Ok(returns) => Ok((returns, seq)),
        Err(e) => Err(Error::Mismatch {
            what: format!("reply to '{}'", C::NAME),
            reason: e.desc,
            value,
        }),
    }
}

/// The `return` member of a reply, or its error.
fn returned(outcome: std::result::Result<Value, Value>) -> Result<Value> {
    let error = match outcome {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    let desc = error.get("desc").and_then(Value::as_str);
    let class = error.get("class").and_then(Value::as_str);
    match (class, desc) {
        (Some(class), Some(desc)) => Err(Error::Qmp(QmpError::new(
            error_class(class),
            desc.to_string(),
        ))),
        _ => Err(Error::Mismatch {
            what: "error reply".to_string(),
            reason: "an error needs a 'class' and a 'desc' string".to_string(),
            value: error,
        }),
    }
}

fn error_class(name: &str) -> ErrorClass {
    match name {
        "CommandNotFound" => ErrorClass::CommandNotFound,
        "DeviceNotActive" => ErrorClass::DeviceNotActive,
        "DeviceNotFound" => ErrorClass::DeviceNotFound,
        "KVMMissingCap" => ErrorClass::KVMMissingCap,
        _ => ErrorClass::GenericError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_encoded_compactly_with_the_id_last() {
        let body = encode_body(Key::Execute, "job-pause", &serde_json::json!({"id": "j"}))
            .expect("an object");
        assert_eq!(body, br#"{"execute":"job-pause","arguments":{"id":"j"}"#);
        let body = encode_body(Key::ExecOob, "yank", &None::<()>).expect("no arguments");
        assert_eq!(body, br#"{"exec-oob":"yank""#);
    }

    #[test]
    fn arguments_that_are_not_an_object_are_refused() {
        let e = encode_body(Key::Execute, "x", &[1, 2]).expect_err("an array");
        assert_eq!(
            e.to_string(),
            "the arguments of 'x' do not serialise to an object: [1,2]"
        );
    }
}
