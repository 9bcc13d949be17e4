//! Unix and TCP sockets, registered with the runtime for reading only.
//!
//! tokio's own `UnixStream` and `TcpStream` ask the kernel for both directions'
//! readiness. For a QMP client that costs a wake-up per request: when the server reads a
//! request, the socket's send buffer frees up and the kernel wakes the client's thread
//! for "writable", which nobody waits for (requests are small and written at once with
//! a plain non-blocking write). So the socket is registered for reading only, and
//! writability is asked for only while a request does not fit in the socket (the writer
//! task's backlog), through a second descriptor of the same socket registered for
//! writing, dropped when the backlog is written.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A connected unix or TCP socket in non-blocking mode.
#[derive(Debug)]
pub(crate) enum Socket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Unix(s) => s.as_fd(),
            Socket::Tcp(s) => s.as_fd(),
        }
    }
}

impl Socket {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => (&*s).read(buf),
            Socket::Tcp(s) => (&*s).read(buf),
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => (&*s).write(buf),
            Socket::Tcp(s) => (&*s).write(buf),
        }
    }
}

/// One socket, shared by the reading and the writing side of a connection.
#[derive(Debug)]
pub(crate) struct Registered {
    fd: AsyncFd<Socket>,
}

impl Registered {
    /// Registers `socket` (made non-blocking here) for reading, on the current runtime.
    pub(crate) fn new(socket: Socket) -> io::Result<Registered> {
        match &socket {
            Socket::Unix(s) => s.set_nonblocking(true)?,
            Socket::Tcp(s) => s.set_nonblocking(true)?,
        }
        Ok(Registered {
            fd: register(socket, Interest::READABLE)?,
        })
    }

    /// Reads what has arrived into `buf`, or registers `cx` to be woken when more does.
    pub(crate) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            match guard.get_inner().read(buf) {
                Ok(n) => {
                    // A short read took everything there was (a stream socket): the next
                    // read waits for the next arrival instead of finding nothing, as
                    // tokio's own sockets do. (Bytes that arrive meanwhile raise a new
                    // readiness event, which this does not clear.)
                    if n > 0 && n < buf.len() {
                        guard.clear_ready();
                    } else {
                        guard.retain_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => {
                    guard.retain_ready();
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    /// Whether something may be read; if not, `cx` is woken when it may.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.fd.poll_read_ready(cx).map_ok(|_still_ready| ())
    }

    /// Shuts both directions down (the descriptor closes when the last user drops it).
    pub(crate) fn shutdown(&self) {
        let _ = match self.fd.get_ref() {
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// Writes what the socket takes now (`WouldBlock` if nothing), without waiting.
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.fd.get_ref().write(buf)
    }

    /// Writes all of `buf`, waiting for room as long as needed.
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        // Only when the socket is full: a second descriptor of it, registered for
        // writing for as long as this takes.
        let mut writable: Option<AsyncFd<OwnedFd>> = None;
        while !buf.is_empty() {
            match self.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let fd = match &mut writable {
                        Some(fd) => fd,
                        None => writable.insert(register(
                            self.fd.get_ref().as_fd().try_clone_to_owned()?,
                            Interest::WRITABLE,
                        )?),
                    };
                    let mut guard = fd.writable().await?;
                    // Room again, or a spurious wake-up: the next write tells.
                    match self.try_write(buf) {
                        Ok(n) => buf = &buf[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Registers a descriptor the value owns with the current runtime.
fn register<T: AsFd + AsRawFd>(owner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` (a socket or an `OwnedFd`) owns its descriptor: it stays open, the
    // same description, and `as_raw_fd` returns it for as long as the `AsyncFd` lives
    // (nothing here replaces the value inside).
    unsafe { AsyncFd::register_with_interest(owner, interest) }.map_err(io::Error::from)
}
