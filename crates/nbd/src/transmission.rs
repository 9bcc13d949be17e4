//! The transmission phase: requests in, replies out. After the handshake the connection's
//! socket becomes a blocking one, served by worker threads, leader/follower: the worker whose
//! turn it is reads the next request (through a buffer: clients send requests in bursts),
//! hands the reading to the next free worker and runs the request itself, so no request waits
//! for a hand-over between threads (QEMU's request coroutine likewise starts the next
//! receiving coroutine and runs its own request). Workers are taken on as needed, up to
//! [`wire::MAX_REQUESTS_IN_FLIGHT`], from those earlier connections left idle or else
//! started. Replies go out whole, in completion order, matched to requests by their cookie:
//! a worker done with a request queues its reply, and whichever worker is writing sends
//! every reply queued, several in one `writev` when several are ready; no worker waits for
//! another's write. At most [`wire::MAX_REQUESTS_IN_FLIGHT`] requests of a connection are
//! unanswered at once; no further request is read until one is answered. The first version
//! (a task per request, a `spawn_blocking` per backend call, the reply written by the
//! executor) made twice as many context switches and used 70% more CPU than
//! qemu-storage-daemon for the same pull; the next (a reader thread handing each request to
//! tokio's blocking pool, shared by every connection, its lock contended) cost a `futex` and
//! a `sched_yield` per request more than these workers (see `docs/decisions.md`).
//!
//! With structured replies negotiated, READ answers with one data chunk, BLOCK_STATUS with one
//! extents chunk per selected context (in context id order, the last one flagged done), errors
//! with error chunks; other successes stay simple replies, which the protocol allows.
//!
//! Checks, in QEMU's order: read-only export (`EPERM`), range past the end (`ENOSPC` for
//! WRITE/WRITE_ZEROES, `EINVAL` otherwise), flags the command does not take (`EINVAL`). A
//! request header with a bad magic, or a WRITE payload over 32 MiB, leaves the stream out of
//! sync: the connection is closed, once the requests already running are done. Stopping the
//! connection (server stop, hard export removal) shuts the socket down, which ends the reader
//! and any reply still being written; backend calls already running finish first.

use std::future::Future;
use std::io::{self, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::exports::{ExportBackend, ExportEntry, StatusExtent};
use crate::handshake::Session;
use crate::wire::{self, Request};

/// A connection's socket in blocking mode, unix or TCP.
pub(crate) enum Socket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Socket {
    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self) {
        // Already shut down or gone: the connection ends either way.
        let _ = match self {
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.flush(),
            Socket::Tcp(s) => s.flush(),
        }
    }
}

/// A tokio stream that can be served by blocking threads after the handshake.
pub(crate) trait IntoSocket {
    fn into_socket(self) -> io::Result<Socket>;
}

impl IntoSocket for tokio::net::UnixStream {
    fn into_socket(self) -> io::Result<Socket> {
        let socket = self.into_std()?;
        socket.set_nonblocking(false)?;
        // Replies of 256 KiB (nbdcopy's requests) and several coalesced ones go into the
        // kernel in one `writev` instead of a worker sleeping until the client drains the
        // default ~200 KiB (see `docs/decisions.md`).
        crate::wire::widen_send_buffer(&socket);
        Ok(Socket::Unix(socket))
    }
}

impl IntoSocket for tokio::net::TcpStream {
    fn into_socket(self) -> io::Result<Socket> {
        let socket = self.into_std()?;
        socket.set_nonblocking(false)?;
        Ok(Socket::Tcp(socket))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the server checks for each command before running it.
struct CommandRule {
    command: u16,
    /// Refused on read-only exports.
    modifies: bool,
    /// Error for a range past the end of the export.
    past_end: u32,
    /// Flags the command accepts (with structured replies, READ also takes DF).
    flags: u16,
    /// Longest length accepted (READ and CACHE: 32 MiB).
    max_length: u32,
}

const COMMANDS: &[CommandRule] = &[
    CommandRule {
        command: wire::CMD_READ,
        modifies: false,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
        max_length: wire::MAX_PAYLOAD,
    },
    CommandRule {
        command: wire::CMD_WRITE,
        modifies: true,
        past_end: wire::ENOSPC,
        flags: wire::CMD_FLAG_FUA,
        max_length: wire::MAX_PAYLOAD,
    },
    CommandRule {
        command: wire::CMD_FLUSH,
        modifies: false,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
        max_length: u32::MAX,
    },
    CommandRule {
        command: wire::CMD_TRIM,
        modifies: true,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
        max_length: u32::MAX,
    },
    CommandRule {
        command: wire::CMD_CACHE,
        modifies: false,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA,
        max_length: wire::MAX_PAYLOAD,
    },
    CommandRule {
        command: wire::CMD_WRITE_ZEROES,
        modifies: true,
        past_end: wire::ENOSPC,
        flags: wire::CMD_FLAG_FUA | wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO,
        max_length: u32::MAX,
    },
    CommandRule {
        command: wire::CMD_BLOCK_STATUS,
        modifies: false,
        past_end: wire::EINVAL,
        flags: wire::CMD_FLAG_FUA | wire::CMD_FLAG_REQ_ONE,
        max_length: u32::MAX,
    },
];

/// A connection's state shared by its worker threads.
struct Connection {
    entry: Arc<ExportEntry>,
    structured: bool,
    contexts: Vec<u32>,
    /// The request stream; whoever holds the lock is the connection's reader.
    requests: Mutex<Requests>,
    /// Workers serving the connection, and how many of them are free (reading, or waiting
    /// to read).
    crew: Mutex<Crew>,
    /// The socket replies are written to, only ever by the worker holding
    /// [`Replies::writing`].
    writer: Socket,
    /// Replies waiting to be written.
    replies: Mutex<Replies>,
    /// Requests not yet answered, and the signal that one was.
    running: Mutex<Running>,
    finished: Condvar,
    /// Every worker holds a clone until it has let go of the connection; the worker that
    /// sees the end sends the outcome on its own and takes this one away, and [`serve`]
    /// returns once the channel closes.
    workers_alive: Mutex<Option<Outcome>>,
    /// Reply buffers of past READs, reused: allocating and zeroing a fresh one per request
    /// cost more than the copy itself.
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// How a connection ended, sent by the worker that saw the end.
type Outcome = tokio::sync::mpsc::UnboundedSender<io::Result<()>>;

/// The request stream, read through a buffer (clients send requests in bursts), and whether
/// it has ended.
struct Requests {
    reader: BufReader<Socket>,
    over: bool,
}

#[derive(Default)]
struct Crew {
    workers: usize,
    free: usize,
}

/// Replies done and not yet written, and whether a worker is writing (it writes every reply
/// queued until none is left; the others only queue theirs).
#[derive(Default)]
struct Replies {
    queue: Vec<Vec<u8>>,
    writing: bool,
}

/// How many requests of a connection run, and whether the reader waits for one to finish
/// (a condition variable's notify is a system call even without waiters: it is only made
/// when someone waits).
#[derive(Default)]
struct Running {
    count: usize,
    waiting: bool,
}

/// Largest reply buffer kept for reuse (bigger READs allocate each time).
const KEPT_BUFFER: usize = 4 * 1024 * 1024 + 64;

/// Size of the buffer requests are read through.
const READ_BUFFER: usize = 64 * 1024;

impl Connection {
    /// A buffer of `len` bytes (contents unspecified: the caller overwrites them).
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut buffer = lock(&self.buffers).pop().unwrap_or_default();
        buffer.resize(len, 0);
        buffer
    }

    /// Keeps a READ's reply buffer for the next one (at most one per request in flight).
    fn recycle(&self, buffer: Vec<u8>) {
        if buffer.capacity() < 64 * 1024 || buffer.capacity() > KEPT_BUFFER {
            return;
        }
        let mut buffers = lock(&self.buffers);
        if buffers.len() < wire::MAX_REQUESTS_IN_FLIGHT {
            buffers.push(buffer);
        }
    }

    /// Waits until fewer than `limit` requests run.
    fn wait_below(&self, limit: usize) {
        let mut running = lock(&self.running);
        while running.count >= limit {
            running.waiting = true;
            running = self
                .finished
                .wait(running)
                .unwrap_or_else(PoisonError::into_inner);
        }
        running.waiting = false;
    }

    /// `n` requests were answered (their replies written, or dropped on a dead socket).
    fn done(&self, n: usize) {
        let mut running = lock(&self.running);
        running.count -= n;
        if running.waiting {
            self.finished.notify_all();
        }
    }

    /// A worker (leader/follower, as QEMU's request coroutine receives a request, starts the
    /// next receiving coroutine and then runs its own): it takes its turn at reading the
    /// next request, hands the reading to the next free worker (the lock's next waiter), and
    /// runs the request itself, so a request never waits for a hand-over between threads.
    /// While every worker is busy, one more is taken on, up to
    /// [`wire::MAX_REQUESTS_IN_FLIGHT`]: each request can wait on its own I/O, as QEMU's
    /// thread pool lets them. Returns how the connection ended if this worker saw the end.
    fn work(self: &Arc<Self>) -> Option<io::Result<()>> {
        loop {
            let (request, payload) = {
                let mut requests = lock(&self.requests);
                if requests.over {
                    return None;
                }
                match read_request(self, &mut requests.reader) {
                    Ok(Some(job)) => {
                        self.take_on();
                        job
                    }
                    end => {
                        requests.over = true;
                        drop(requests);
                        // Every request answered (its reply written or dropped) and every
                        // other worker let go before the end is reported.
                        self.wait_below(1);
                        lock(&self.workers_alive).take();
                        return Some(end.map(|_| ()));
                    }
                }
            };
            let reply = execute(self, request, payload);
            self.reply(reply);
            lock(&self.crew).free += 1;
        }
    }

    /// This worker turns from free to busy; if none is left free, one more is taken on to
    /// read next (while fewer than the limit serve; called by the reader, so before the end
    /// can be seen). If no thread can be started, the next request is read once a worker is
    /// free again.
    fn take_on(self: &Arc<Self>) {
        let mut crew = lock(&self.crew);
        crew.free -= 1;
        if crew.free > 0 || crew.workers >= wire::MAX_REQUESTS_IN_FLIGHT {
            return;
        }
        crew.workers += 1;
        crew.free += 1;
        drop(crew);
        let assignment = Assignment {
            connection: Arc::clone(self),
            alive: lock(&self.workers_alive).clone(),
        };
        if let Err(error) = hire(assignment) {
            tracing::warn!(%error, "NBD server: cannot start a worker thread");
            let mut crew = lock(&self.crew);
            crew.workers -= 1;
            crew.free -= 1;
        }
    }

    /// Sends `reply`, or leaves it to the worker writing: that one writes every reply queued,
    /// several at once with one `writev` when several are ready (QEMU's server sends each
    /// reply with its own `sendmsg`), so workers never wait for each other's writes.
    fn reply(&self, reply: Vec<u8>) {
        let mut replies = lock(&self.replies);
        replies.queue.push(reply);
        if replies.writing {
            return;
        }
        replies.writing = true;
        let mut batch = Vec::new();
        loop {
            std::mem::swap(&mut batch, &mut replies.queue);
            drop(replies);
            // A failed write means the client is gone (or the connection was stopped): the
            // reader sees it too, and the replies are dropped.
            let _ = write_all_vectored(&self.writer, &batch);
            let n = batch.len();
            for reply in batch.drain(..) {
                self.recycle(reply);
            }
            self.done(n);
            replies = lock(&self.replies);
            if replies.queue.is_empty() {
                replies.writing = false;
                return;
            }
        }
    }
}

/// A worker's job: serving a connection; `alive` goes with it (see
/// [`Connection::workers_alive`]).
struct Assignment {
    connection: Arc<Connection>,
    alive: Option<Outcome>,
}

/// A worker thread between connections, waiting for its next assignment.
struct IdleWorker {
    id: u64,
    assign: std::sync::mpsc::SyncSender<Assignment>,
}

/// Workers of connections that ended, for the next connections: a short connection (an
/// `nbdinfo`, a dirty pull's four) then starts no thread, and no thread stack is mapped,
/// faulted in and unmapped per connection. A worker idle for [`IDLE_KEEP`] exits (tokio's
/// blocking pool keeps its threads the same way).
static IDLE_WORKERS: Mutex<Vec<IdleWorker>> = Mutex::new(Vec::new());

/// How long a worker without a connection waits for one before it exits.
const IDLE_KEEP: std::time::Duration = std::time::Duration::from_secs(10);

/// Hands `assignment` to an idle worker, or to a new thread.
fn hire(mut assignment: Assignment) -> io::Result<()> {
    loop {
        let Some(worker) = lock(&IDLE_WORKERS).pop() else {
            break;
        };
        match worker.assign.send(assignment) {
            Ok(()) => return Ok(()),
            // That worker is gone; its assignment comes back.
            Err(std::sync::mpsc::SendError(back)) => assignment = back,
        }
    }
    std::thread::Builder::new()
        .name("nbd-worker".into())
        .spawn(move || worker(assignment))
        .map(drop)
}

/// A worker thread: serves its connection until the connection ends, then waits in
/// [`IDLE_WORKERS`] for the next one.
fn worker(mut assignment: Assignment) {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let Assignment { connection, alive } = assignment;
        let end = connection.work();
        // The connection (its export, the node) let go before its end is reported.
        drop(connection);
        if let (Some(end), Some(alive)) = (end, &alive) {
            let _ = alive.send(end);
        }
        drop(alive);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (assign, assigned) = std::sync::mpsc::sync_channel(1);
        lock(&IDLE_WORKERS).push(IdleWorker { id, assign });
        assignment = match assigned.recv_timeout(IDLE_KEEP) {
            Ok(next) => next,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let mut idle = lock(&IDLE_WORKERS);
                if let Some(at) = idle.iter().position(|worker| worker.id == id) {
                    idle.swap_remove(at);
                    return;
                }
                drop(idle);
                // Taken from the list as the wait ended: the assignment is on its way.
                match assigned.recv() {
                    Ok(next) => next,
                    Err(_) => return,
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
    }
}

/// Writes every buffer of `replies`, in order, with as few `writev` calls as the socket takes.
fn write_all_vectored(socket: &Socket, replies: &[Vec<u8>]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = replies
        .iter()
        .filter(|reply| !reply.is_empty())
        .map(|reply| io::IoSlice::new(reply))
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let written = match socket {
            Socket::Unix(s) => (&*s).write_vectored(slices),
            Socket::Tcp(s) => (&*s).write_vectored(slices),
        };
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Serves requests on the session's export until the client disconnects (DISC or hang-up),
/// breaks the protocol, or `stop` resolves. Requests already running are completed first
/// (their replies are dropped once stopped), so no backend call outlives the connection.
/// Returns how it ended and the socket's last handle: the caller closes it as the client
/// leaves the export ([`crate::exports::ExportLease::end_with`]), so nobody sees the
/// connection closed while the export still counts it.
pub(crate) async fn serve(
    socket: Socket,
    session: &Session,
    stop: impl Future<Output = ()>,
) -> (io::Result<()>, Option<Socket>) {
    let closer = match socket.try_clone() {
        Ok(closer) => closer,
        Err(error) => return (Err(error), Some(socket)),
    };
    match run(socket, &closer, session, stop).await {
        Ok(result) => (result, Some(closer)),
        Err(error) => (Err(error), Some(closer)),
    }
}

async fn run(
    socket: Socket,
    closer: &Socket,
    session: &Session,
    stop: impl Future<Output = ()>,
) -> io::Result<io::Result<()>> {
    let (alive, mut outcome) = tokio::sync::mpsc::unbounded_channel();
    let connection = Arc::new(Connection {
        entry: session.lease.entry_arc(),
        structured: session.structured,
        contexts: session.contexts.clone(),
        writer: socket.try_clone()?,
        requests: Mutex::new(Requests {
            reader: BufReader::with_capacity(READ_BUFFER, socket),
            over: false,
        }),
        crew: Mutex::new(Crew {
            workers: 1,
            free: 1,
        }),
        replies: Mutex::new(Replies::default()),
        running: Mutex::new(Running::default()),
        finished: Condvar::new(),
        workers_alive: Mutex::new(None),
        buffers: Mutex::new(Vec::new()),
    });
    let first = Assignment {
        connection: Arc::clone(&connection),
        alive: Some(alive.clone()),
    };
    *lock(&connection.workers_alive) = Some(alive);
    drop(connection);
    hire(first)?;
    // Resolves once every worker has let go of the connection: the channel closes.
    let ended = async {
        let mut result = Ok(());
        while let Some(end) = outcome.recv().await {
            result = end;
        }
        result
    };
    tokio::pin!(ended);
    tokio::select! {
        result = &mut ended => return Ok(result),
        () = stop => closer.shutdown(),
    }
    Ok(ended.await)
}

/// Reads the next request (waiting first for a free slot: a client that never reads its
/// replies stalls only here); `None` at the end (a hang-up, DISC, or the socket shut down by
/// a stop), an error when the stream is out of sync. The request counts as running.
fn read_request(
    connection: &Connection,
    reader: &mut BufReader<Socket>,
) -> io::Result<Option<(Request, Vec<u8>)>> {
    connection.wait_below(wire::MAX_REQUESTS_IN_FLIGHT);
    let mut header = [0u8; wire::REQUEST_LEN];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let Some(request) = Request::decode(&header) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request without the request magic",
        ));
    };
    if request.command == wire::CMD_DISC {
        return Ok(None);
    }
    let payload = if request.command == wire::CMD_WRITE {
        if request.length > wire::MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("write of {} bytes is larger than 32 MiB", request.length),
            ));
        }
        let mut payload = vec![0u8; request.length as usize];
        reader.read_exact(&mut payload)?;
        payload
    } else {
        Vec::new()
    };
    lock(&connection.running).count += 1;
    Ok(Some((request, payload)))
}

/// Runs one request; returns the whole reply (header, then data for a successful READ).
fn execute(connection: &Connection, request: Request, payload: Vec<u8>) -> Vec<u8> {
    let cookie = request.cookie;
    let structured = connection.structured;
    let failure = |error: u32| error_reply(structured, cookie, error, "");
    let rule = match check(connection, &request) {
        Ok(rule) => rule,
        Err(error) => return failure(error),
    };
    let export = &connection.entry.export;
    let backend = &export.backend;
    let fua = request.flags & wire::CMD_FLAG_FUA != 0;
    let offset = request.offset;
    let length = u64::from(request.length);

    match rule.command {
        wire::CMD_READ => {
            if structured && length == 0 {
                return wire::chunk(wire::REPLY_TYPE_NONE, cookie, &[]);
            }
            let header_len = if structured {
                wire::CHUNK_HEADER_LEN + 8
            } else {
                wire::SIMPLE_REPLY_LEN
            };
            let mut reply = connection.buffer(header_len + request.length as usize);
            let result = guarded(|| {
                let read = backend.read_at(&mut reply[header_len..], offset);
                read.map(|()| reply)
            });
            match result {
                Ok(mut reply) if structured => {
                    let payload_len = 8 + request.length;
                    wire::encode_chunk_header(
                        &mut reply,
                        wire::REPLY_FLAG_DONE,
                        wire::REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        payload_len,
                    );
                    reply[wire::CHUNK_HEADER_LEN..header_len]
                        .copy_from_slice(&offset.to_be_bytes());
                    reply
                }
                Ok(mut reply) => {
                    wire::encode_simple_reply(&mut reply, 0, cookie);
                    reply
                }
                Err(error) => failure(error),
            }
        }
        wire::CMD_BLOCK_STATUS => {
            let cap = if request.flags & wire::CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                wire::MAX_EXTENTS
            };
            let mut reply = Vec::new();
            let count = connection.contexts.len();
            for (i, &id) in connection.contexts.iter().enumerate() {
                let entry = &connection.entry;
                let extents = guarded(|| collect_extents(entry, id, offset, length, cap));
                let last = i + 1 == count;
                match extents {
                    Ok(extents) => {
                        let flags = if last { wire::REPLY_FLAG_DONE } else { 0 };
                        let payload = encode_extents(id, &extents);
                        reply.extend(wire::chunk_with_flags(
                            flags,
                            wire::REPLY_TYPE_BLOCK_STATUS,
                            cookie,
                            &payload,
                        ));
                    }
                    Err(error) => {
                        reply.extend(error_reply(true, cookie, error, "can't get block status"));
                        break;
                    }
                }
            }
            reply
        }
        command => {
            let writethrough = export.writethrough;
            let fast_zero = request.flags & wire::CMD_FLAG_FAST_ZERO != 0;
            let result = guarded(|| {
                match command {
                    wire::CMD_WRITE => backend.write_at(&payload, offset)?,
                    wire::CMD_TRIM => backend.trim(offset, length)?,
                    wire::CMD_CACHE => backend.cache(offset, length)?,
                    wire::CMD_WRITE_ZEROES if fast_zero => {
                        backend.write_zeroes_fast(offset, length)?
                    }
                    wire::CMD_WRITE_ZEROES => backend.write_zeroes(offset, length)?,
                    _ => {}
                }
                let written = matches!(command, wire::CMD_WRITE | wire::CMD_WRITE_ZEROES);
                if command == wire::CMD_FLUSH || fua || (writethrough && written) {
                    backend.flush()?;
                }
                Ok(())
            });
            match result {
                Ok(()) => simple_reply(0, cookie),
                Err(error) => failure(error),
            }
        }
    }
}

/// An error reply: an error chunk (with `message`) or a simple reply.
fn error_reply(structured: bool, cookie: u64, error: u32, message: &str) -> Vec<u8> {
    if !structured {
        return simple_reply(error, cookie);
    }
    let mut payload = error.to_be_bytes().to_vec();
    // Messages are short constant texts.
    payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
    payload.extend_from_slice(message.as_bytes());
    wire::chunk(wire::REPLY_TYPE_ERROR, cookie, &payload)
}

/// Extents in the making: adjacent runs with the same flags merge (as long as the length
/// fits in 32 bits); at most `cap` runs.
struct ExtentList {
    runs: Vec<(u32, u32)>,
    cap: usize,
}

impl ExtentList {
    /// Appends a run; false when it did not fit (the list is full).
    fn push(&mut self, length: u64, flags: u32) -> bool {
        if length == 0 {
            return true;
        }
        if let Some(last) = self.runs.last_mut()
            && last.1 == flags
            && u64::from(last.0) + length <= u64::from(u32::MAX)
        {
            last.0 += length as u32;
            return true;
        }
        if self.runs.len() >= self.cap {
            return false;
        }
        // Callers cut runs to the request's 32-bit length.
        self.runs.push((length as u32, flags));
        true
    }
}

/// The extents of context `id` over `length` bytes at `offset` (`length` fits in 32 bits):
/// the source is asked again from where its last answer ended until the range is covered or
/// `cap` runs are full; a source that stops answering leaves the rest reported as flags 0.
fn collect_extents(
    entry: &ExportEntry,
    id: u32,
    offset: u64,
    length: u64,
    cap: usize,
) -> io::Result<Vec<(u32, u32)>> {
    let export = &entry.export;
    let source = |at: u64, len: u64| -> io::Result<Vec<StatusExtent>> {
        match id {
            wire::BASE_ALLOCATION_ID => Ok(base_allocation(export.backend.as_ref(), at, len)?),
            _ => export.contexts[id as usize - 1].source.extents(at, len),
        }
    };
    let end = offset + length;
    let mut list = ExtentList {
        runs: Vec::new(),
        cap,
    };
    let mut at = offset;
    'ask: while at < end {
        let before = at;
        for extent in source(at, end - at)? {
            let piece = extent.length.min(end - at);
            if !list.push(piece, extent.flags) {
                break 'ask;
            }
            at += piece;
            if at == end {
                break 'ask;
            }
        }
        if at == before {
            list.push(end - at, 0);
            break;
        }
    }
    Ok(list.runs)
}

/// `base:allocation` as status flags.
fn base_allocation(
    backend: &dyn ExportBackend,
    offset: u64,
    len: u64,
) -> io::Result<Vec<StatusExtent>> {
    Ok(backend
        .allocation(offset, len)?
        .into_iter()
        .map(|extent| StatusExtent {
            length: extent.length,
            flags: if extent.hole { wire::STATE_HOLE } else { 0 }
                | if extent.zero { wire::STATE_ZERO } else { 0 },
        })
        .collect())
}

/// The payload of a BLOCK_STATUS chunk: the context id, then (length, flags) pairs.
fn encode_extents(id: u32, runs: &[(u32, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + 8 * runs.len());
    payload.extend_from_slice(&id.to_be_bytes());
    for (length, flags) in runs {
        payload.extend_from_slice(&length.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    payload
}

/// The rule of `request`'s command, or the error value refusing the request.
fn check(connection: &Connection, request: &Request) -> Result<&'static CommandRule, u32> {
    let export = &connection.entry.export;
    let rule = COMMANDS
        .iter()
        .find(|rule| rule.command == request.command)
        .ok_or(wire::EINVAL)?;
    if request.length > rule.max_length {
        return Err(wire::EINVAL);
    }
    if rule.modifies && !export.writable {
        return Err(wire::EPERM);
    }
    let size = export.backend.size();
    if request.offset > size || u64::from(request.length) > size - request.offset {
        return Err(rule.past_end);
    }
    let mut flags = rule.flags;
    if connection.structured && rule.command == wire::CMD_READ {
        flags |= wire::CMD_FLAG_DF;
    }
    if request.flags & !flags != 0 {
        return Err(wire::EINVAL);
    }
    if rule.command == wire::CMD_BLOCK_STATUS
        && (request.length == 0 || connection.contexts.is_empty())
    {
        return Err(wire::EINVAL);
    }
    Ok(rule)
}

/// Runs a backend call; its error as a protocol error value, and a panicking backend
/// answers `EIO`.
fn guarded<T>(call: impl FnOnce() -> io::Result<T>) -> Result<T, u32> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(wire::errno_of(&error)),
        Err(_) => Err(wire::EIO),
    }
}

fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut reply = vec![0u8; wire::SIMPLE_REPLY_LEN];
    wire::encode_simple_reply(&mut reply, error, cookie);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(cap: usize) -> ExtentList {
        ExtentList {
            runs: Vec::new(),
            cap,
        }
    }

    #[test]
    fn adjacent_runs_with_the_same_flags_merge() {
        let mut extents = list(8);
        assert!(extents.push(100, 0));
        assert!(extents.push(50, 0));
        assert!(extents.push(0, 3));
        assert!(extents.push(10, 3));
        assert_eq!(extents.runs, vec![(150, 0), (10, 3)]);
    }

    #[test]
    fn a_full_list_refuses_a_new_run_but_still_merges() {
        let mut extents = list(1);
        assert!(extents.push(100, 2));
        assert!(extents.push(100, 2));
        assert!(!extents.push(1, 0));
        assert_eq!(extents.runs, vec![(200, 2)]);
    }

    #[test]
    fn runs_past_32_bits_are_not_merged() {
        let mut extents = list(4);
        assert!(extents.push(u64::from(u32::MAX), 0));
        assert!(extents.push(1, 0));
        assert_eq!(extents.runs, vec![(u32::MAX, 0), (1, 0)]);
    }

    #[test]
    fn extents_payload_is_the_context_id_then_pairs() {
        let payload = encode_extents(2, &[(4096, 1)]);
        assert_eq!(payload, [0, 0, 0, 2, 0, 0, 16, 0, 0, 0, 0, 1]);
    }
}
