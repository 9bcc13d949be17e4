//! The same client for programs without an async runtime: every method blocks.
//!
//! A [`Client`] owns a small tokio runtime (one worker thread) on which the connection's
//! reader and writer run, so events are read and queued while the program does other
//! things. Clones share the connection and may be used from many threads at once. Do
//! not use it from inside an async runtime (use [`crate::Client`] there).

use crate::TransportError;
use crate::error::{Error, Result};
use crate::events::EventMessage;
use crate::greeting::Greeting;
use crate::jobs::JobProgress;
use qapi_runtime::input::FromQmp;
use qapi_runtime::{Command, Enum, Event};
use serde_json::Value;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A blocking QMP client: [`crate::Client`]'s surface, blocking.
#[derive(Clone)]
pub struct Client {
    client: crate::Client,
    runtime: Arc<tokio::runtime::Runtime>,
    timeout: Option<Duration>,
}

/// How to open a connection: [`Client::builder`].
#[derive(Debug, Clone, Default)]
pub struct Connector {
    connector: crate::Connector,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("qmp-client")
        .enable_all()
        .build()
        .map_err(|e| Error::Transport(TransportError::io(&e)))
}

impl Connector {
    /// See [`crate::Connector::oob`].
    pub fn oob(self, oob: bool) -> Self {
        Connector {
            connector: self.connector.oob(oob),
        }
    }

    /// See [`crate::Connector::guest_agent`].
    pub fn guest_agent(self) -> Self {
        Connector {
            connector: self.connector.guest_agent(),
        }
    }

    fn connect<F>(self, connect: impl FnOnce(crate::Connector) -> F) -> Result<Client>
    where
        F: Future<Output = Result<crate::Client>>,
    {
        let runtime = Arc::new(runtime()?);
        let client = runtime.block_on(connect(self.connector))?;
        Ok(Client {
            client,
            runtime,
            timeout: None,
        })
    }

    pub fn connect_unix(self, path: impl AsRef<Path>) -> Result<Client> {
        self.connect(|c| c.connect_unix(path))
    }

    pub fn connect_tcp(
        self,
        address: impl std::net::ToSocketAddrs + std::fmt::Debug,
    ) -> Result<Client> {
        let addresses: Vec<std::net::SocketAddr> = address
            .to_socket_addrs()
            .map_err(|e| {
                Error::Transport(TransportError::Connect {
                    address: format!("{address:?}"),
                    kind: e.kind(),
                    message: e.to_string(),
                })
            })?
            .collect();
        self.connect(|c| c.connect_tcp(&addresses[..]))
    }

    /// An already connected unix socket.
    pub fn connect_stream(self, stream: std::os::unix::net::UnixStream) -> Result<Client> {
        let runtime = Arc::new(runtime()?);
        let client = runtime.block_on(async {
            stream
                .set_nonblocking(true)
                .map_err(|e| Error::Transport(TransportError::io(&e)))?;
            let stream = tokio::net::UnixStream::from_std(stream)
                .map_err(|e| Error::Transport(TransportError::io(&e)))?;
            self.connector.connect_stream(stream).await
        })?;
        Ok(Client {
            client,
            runtime,
            timeout: None,
        })
    }
}

impl Client {
    pub fn builder() -> Connector {
        Connector::default()
    }

    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Client> {
        Connector::default().connect_unix(path)
    }

    pub fn connect_tcp(address: impl std::net::ToSocketAddrs + std::fmt::Debug) -> Result<Client> {
        Connector::default().connect_tcp(address)
    }

    pub fn connect_stream(stream: std::os::unix::net::UnixStream) -> Result<Client> {
        Connector::default().connect_stream(stream)
    }

    /// Every later call of this handle gives up after `timeout` with
    /// [`Error::Timeout`]; the connection is then as after an async caller's timeout
    /// (see [the crate docs](crate#timeouts)): usable, the late reply discarded.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    fn block<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        let timeout = self.timeout;
        self.runtime.block_on(async move {
            match timeout {
                None => call.await,
                Some(limit) => tokio::time::timeout(limit, call)
                    .await
                    .unwrap_or(Err(Error::Timeout(limit))),
            }
        })
    }

    /// The async client underneath (sharing this connection).
    pub fn as_async(&self) -> &crate::Client {
        &self.client
    }

    pub fn greeting(&self) -> Option<&Greeting> {
        self.client.greeting()
    }

    pub fn oob_enabled(&self) -> bool {
        self.client.oob_enabled()
    }

    pub fn early_events<E: Event>(&self) -> Vec<Result<EventMessage<E>>> {
        self.client.early_events()
    }

    /// Every event read from now on; see [`crate::Client::events`].
    pub fn events<E: Event>(&self) -> Events<E> {
        Events {
            stream: self.client.events(),
            runtime: self.runtime.clone(),
        }
    }

    pub fn closed(&self) -> Option<TransportError> {
        self.client.closed()
    }

    pub fn execute<C: Command>(&self, command: C) -> Result<C::Returns> {
        self.block(self.client.execute(command))
    }

    pub fn execute_oob<C: Command>(&self, command: C) -> Result<C::Returns> {
        self.block(self.client.execute_oob(command))
    }

    pub fn execute_value(&self, name: &str, arguments: Value) -> Result<Value> {
        self.block(self.client.execute_value(name, arguments))
    }

    pub fn quit(&self) -> Result<()> {
        self.block(self.client.quit())
    }

    pub fn close(&self) {
        self.client.close()
    }

    pub fn wait_job<S: Enum + FromQmp>(&self, id: &str, status: S) -> Result<JobProgress<S>> {
        self.block(self.client.wait_job(id, status))
    }

    /// See [`crate::Client::follow_job`]; the timeout applies to each step.
    pub fn follow_job<S: Enum + FromQmp>(&self, id: &str, interval: Duration) -> JobFollow<S> {
        let _entered = self.runtime.enter();
        JobFollow {
            follow: self.client.follow_job(id, interval),
            client: self.clone(),
        }
    }

    pub fn transaction<C: Command>(&self, command: C) -> Result<(C::Returns, Vec<String>)> {
        self.block(self.client.transaction(command))
    }
}

/// Blocking event stream: an iterator that ends when the connection ends.
pub struct Events<E> {
    stream: crate::EventStream<E>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<E: Event> Events<E> {
    /// The next event, waiting at most `timeout`; `None` if none came (or the stream
    /// ended: see [`Client::closed`]).
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<EventMessage<E>>> {
        let stream = &mut self.stream;
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, stream.next()).await })
            .ok()
            .flatten()
    }

    /// The next event if one has been read, without waiting.
    pub fn try_next(&mut self) -> Option<Result<EventMessage<E>>> {
        self.stream.try_next()
    }
}

impl<E: Event> Iterator for Events<E> {
    type Item = Result<EventMessage<E>>;

    fn next(&mut self) -> Option<Self::Item> {
        let stream = &mut self.stream;
        self.runtime.block_on(stream.next())
    }
}

/// Blocking [`crate::JobFollow`]: an iterator of [`JobProgress`].
pub struct JobFollow<S> {
    follow: crate::JobFollow<S>,
    client: Client,
}

impl<S: Enum + FromQmp> Iterator for JobFollow<S> {
    type Item = Result<JobProgress<S>>;

    fn next(&mut self) -> Option<Self::Item> {
        let follow = &mut self.follow;
        let timeout = self.client.timeout;
        self.client.runtime.block_on(async move {
            match timeout {
                None => follow.next().await,
                Some(limit) => tokio::time::timeout(limit, follow.next())
                    .await
                    .unwrap_or(Some(Err(Error::Timeout(limit)))),
            }
        })
    }
}
