//! Character devices (`chardev-add`, `chardev-remove`, `query-chardev`, `ringbuf-*`), kept
//! under `/chardevs` in QEMU's object tree.
//!
//! qemu-storage-daemon has no command that puts a monitor on a chardev at run time (no
//! `monitor-add`); monitors come from `--monitor` and their chardevs are registered here by
//! the daemon ([`Chardevs::register_monitor`]) so that they are listed and cannot be removed.
//! A socket chardev added at run time has no user: it listens, accepts one client at a time and
//! holds the connection until the client leaves (QEMU reads nothing from it then; we read and
//! drop what comes, which only serves to see the client leave). A ring buffer keeps the last
//! `size` bytes written; a null chardev has no data.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use qmp_api::{
    ChardevBackend, ChardevBackendBranch, ChardevInfo, ChardevSocket, DataFormat, QmpError,
    SocketAddressLegacyBranch,
};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// QEMU's default ring buffer size.
const RINGBUF_DEFAULT: i64 = 64 * 1024;

/// Where a socket chardev listens.
#[derive(Debug, Clone)]
enum Listening {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl Listening {
    /// QEMU's `SocketAddress` text of a listening socket (`query-chardev`'s `filename`).
    fn text(&self) -> String {
        match self {
            Listening::Unix(path) => format!("unix:{},server=on", path.display()),
            Listening::Tcp { host, port } => format!("tcp:{host}:{port},server=on"),
        }
    }

    /// The `addr` property (`SocketAddress`, flat).
    fn address(&self) -> Value {
        match self {
            Listening::Unix(path) => json!({"type": "unix", "path": path.display().to_string()}),
            Listening::Tcp { host, port } => {
                json!({"type": "inet", "host": host, "port": port.to_string()})
            }
        }
    }
}

/// A listening socket with no user.
struct SocketChardev {
    at: Listening,
    connected: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for SocketChardev {
    fn drop(&mut self) {
        self.task.abort();
        // QEMU removes the socket file of a listener it closes.
        if let Listening::Unix(path) = &self.at {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Kind {
    /// A monitor's chardev from the command line: in use, `filename` as QEMU shows it with a
    /// client connected.
    Monitor {
        filename: String,
    },
    Socket(SocketChardev),
    Ringbuf {
        size: usize,
        data: VecDeque<u8>,
    },
    Null,
}

impl Kind {
    fn type_name(&self) -> &'static str {
        match self {
            Kind::Monitor { .. } | Kind::Socket(_) => "chardev-socket",
            Kind::Ringbuf { .. } => "chardev-ringbuf",
            Kind::Null => "chardev-null",
        }
    }
}

/// The chardevs by id, in creation order.
#[derive(Default)]
pub(crate) struct Chardevs {
    list: Vec<(String, Kind)>,
    runtime: Option<Handle>,
}

impl Chardevs {
    pub(crate) fn set_runtime(&mut self, runtime: Handle) {
        self.runtime = Some(runtime);
    }

    /// A `--monitor`'s chardev.
    pub(crate) fn register_monitor(&mut self, id: &str, filename: &str) {
        self.list.push((
            id.to_string(),
            Kind::Monitor {
                filename: filename.to_string(),
            },
        ));
    }

    fn find(&self, id: &str) -> Option<&Kind> {
        self.list.iter().find(|(i, _)| i == id).map(|(_, k)| k)
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.list.iter().map(|(i, k)| (i.as_str(), k.type_name()))
    }

    /// QOM type of a chardev.
    pub(crate) fn type_name(&self, id: &str) -> Option<&'static str> {
        self.find(id).map(Kind::type_name)
    }

    /// The properties QSD lists for a chardev (`qom-list`).
    pub(crate) fn properties(&self, id: &str) -> &'static [(&'static str, &'static str)] {
        match self.find(id) {
            Some(Kind::Monitor { .. } | Kind::Socket(_)) => &[
                ("type", "string"),
                ("connected", "bool"),
                ("addr", "SocketAddress"),
            ],
            _ => &[("type", "string")],
        }
    }

    /// A chardev's property (`qom-get`).
    pub(crate) fn get(&self, id: &str, property: &str) -> Option<Value> {
        let kind = self.find(id)?;
        match (kind, property) {
            (_, "type") => Some(json!(kind.type_name())),
            (Kind::Monitor { .. }, "connected") => Some(json!(true)),
            (Kind::Monitor { filename }, "addr") => {
                let path = filename.strip_prefix("unix:")?.strip_suffix(",server=on")?;
                Some(json!({"type": "unix", "path": path}))
            }
            (Kind::Socket(s), "connected") => Some(json!(s.connected.load(Ordering::Acquire))),
            (Kind::Socket(s), "addr") => Some(s.at.address()),
            _ => None,
        }
    }

    pub(crate) fn query(&self) -> Vec<ChardevInfo> {
        self.list
            .iter()
            .map(|(id, kind)| {
                let (filename, frontend_open) = match kind {
                    Kind::Monitor { filename } => (filename.clone(), true),
                    Kind::Socket(s) => {
                        let prefix = if s.connected.load(Ordering::Acquire) {
                            ""
                        } else {
                            "disconnected:"
                        };
                        (format!("{prefix}{}", s.at.text()), false)
                    }
                    Kind::Ringbuf { .. } => ("ringbuf".into(), false),
                    Kind::Null => ("null".into(), false),
                };
                ChardevInfo {
                    label: id.clone(),
                    filename,
                    frontend_open,
                }
            })
            .collect()
    }

    /// `chardev-add`.
    pub(crate) fn add(&mut self, id: String, backend: ChardevBackend) -> Result<(), QmpError> {
        if self.find(&id).is_some() {
            return Err(QmpError::generic(format!(
                "Chardev with id '{id}' already exists"
            )));
        }
        let failed = |e: String| QmpError::generic(format!("Failed to add chardev '{id}': {e}"));
        let kind = match backend.branch {
            ChardevBackendBranch::Null(w) => {
                refuse_log(w.data.logfile.as_deref())?;
                Kind::Null
            }
            ChardevBackendBranch::Ringbuf(w) => {
                refuse_log(w.data.logfile.as_deref())?;
                let size = w.data.size.unwrap_or(RINGBUF_DEFAULT);
                if size <= 0 || size & (size - 1) != 0 {
                    return Err(failed(
                        "size of ringbuf chardev must be power of two".into(),
                    ));
                }
                Kind::Ringbuf {
                    size: size as usize,
                    data: VecDeque::new(),
                }
            }
            ChardevBackendBranch::Socket(w) => Kind::Socket(self.socket(&w.data).map_err(failed)?),
        };
        self.list.push((id, kind));
        Ok(())
    }

    fn socket(&self, options: &ChardevSocket) -> Result<SocketChardev, String> {
        refuse_log(options.logfile.as_deref()).map_err(|e| e.desc)?;
        // Options that change what the socket does; blockjobd has none of them.
        #[allow(deprecated)] // `reconnect` is refused like `reconnect-ms`
        let refused = [
            ("tls-creds", options.tls_creds.is_some()),
            ("tls-authz", options.tls_authz.is_some()),
            ("telnet", options.telnet == Some(true)),
            ("tn3270", options.tn3270 == Some(true)),
            ("websocket", options.websocket == Some(true)),
            ("reconnect", options.reconnect.is_some()),
            ("reconnect-ms", options.reconnect_ms.is_some()),
        ];
        if let Some((name, _)) = refused.iter().find(|(_, given)| *given) {
            return Err(format!("'{name}' is not supported by blockjobd"));
        }
        if options.server == Some(false) {
            return Err(
                "only server sockets are supported (blockjobd does not connect out)".into(),
            );
        }
        // `wait` only delays the start of a chardev's user; a chardev added at run time has
        // none, so QEMU does not wait either. `nodelay` has no effect without a user's data.
        let runtime = self
            .runtime
            .clone()
            .ok_or_else(|| "no runtime to serve sockets on".to_string())?;
        let _entered = runtime.enter();
        let connected = Arc::new(AtomicBool::new(false));
        let (at, task) = match &options.addr.branch {
            SocketAddressLegacyBranch::Unix(w) => {
                let path = PathBuf::from(&w.data.path);
                if w.data.r#abstract == Some(true) {
                    return Err("'abstract' is not supported by blockjobd".into());
                }
                let _ = std::fs::remove_file(&path);
                let listener = std::os::unix::net::UnixListener::bind(&path)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(tokio::net::UnixListener::from_std)
                    .map_err(|e| {
                        format!(
                            "Failed to bind socket to {}: {}",
                            path.display(),
                            job::strerror(&e)
                        )
                    })?;
                let c = Arc::clone(&connected);
                let task = tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        hold(stream, &c).await;
                    }
                });
                (Listening::Unix(path), task)
            }
            SocketAddressLegacyBranch::Inet(w) => {
                let host = w.data.host.clone();
                let port: u16 = w
                    .data
                    .port
                    .parse()
                    .map_err(|_| format!("Port '{}' is not a number", w.data.port))?;
                let listener = std::net::TcpListener::bind((host.as_str(), port))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(|l| {
                        let port = l.local_addr()?.port();
                        tokio::net::TcpListener::from_std(l).map(|l| (l, port))
                    });
                let (listener, port) = listener.map_err(|e| {
                    format!(
                        "Failed to bind socket to {host}:{port}: {}",
                        job::strerror(&e)
                    )
                })?;
                let c = Arc::clone(&connected);
                let task = tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        hold(stream, &c).await;
                    }
                });
                (Listening::Tcp { host, port }, task)
            }
            SocketAddressLegacyBranch::Vsock(_) | SocketAddressLegacyBranch::Fd(_) => {
                return Err("only unix and inet sockets are supported by blockjobd".into());
            }
        };
        Ok(SocketChardev {
            at,
            connected,
            task,
        })
    }

    /// `chardev-change`: QEMU's case of a chardev without a user (the old one goes, then the
    /// new one is added; a failed add leaves neither); a monitor's cannot be changed.
    pub(crate) fn change(&mut self, id: String, backend: ChardevBackend) -> Result<(), QmpError> {
        let Some(at) = self.list.iter().position(|(i, _)| *i == id) else {
            return Err(QmpError::generic(format!("Chardev '{id}' does not exist")));
        };
        if matches!(self.list[at].1, Kind::Monitor { .. }) {
            return Err(QmpError::generic(
                "Chardev user does not support chardev hotswap",
            ));
        }
        self.list.remove(at);
        self.add(id, backend)
    }

    /// `chardev-remove`.
    pub(crate) fn remove(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(at) = self.list.iter().position(|(i, _)| i == id) else {
            return Err(QmpError::generic(format!("Chardev '{id}' not found")));
        };
        if matches!(self.list[at].1, Kind::Monitor { .. }) {
            return Err(QmpError::generic(format!("Chardev '{id}' is busy")));
        }
        self.list.remove(at);
        Ok(())
    }

    /// `chardev-send-break`: a break goes to the chardev's user; a monitor ignores it, and
    /// the others have none.
    pub(crate) fn send_break(&self, id: &str) -> Result<(), QmpError> {
        self.find(id)
            .map(|_| ())
            .ok_or_else(|| QmpError::generic(format!("Chardev '{id}' not found")))
    }

    fn ringbuf(&mut self, device: &str) -> Result<(usize, &mut VecDeque<u8>), QmpError> {
        match self.list.iter_mut().find(|(i, _)| i == device) {
            None => Err(QmpError::generic(format!("Device '{device}' not found"))),
            Some((_, Kind::Ringbuf { size, data })) => Ok((*size, data)),
            Some(_) => Err(QmpError::generic(format!(
                "{device} is not a ringbuf device"
            ))),
        }
    }

    /// `ringbuf-write`: the oldest bytes make room.
    pub(crate) fn ringbuf_write(
        &mut self,
        device: &str,
        data: &str,
        format: Option<DataFormat>,
    ) -> Result<(), QmpError> {
        let (size, buf) = self.ringbuf(device)?;
        let bytes = match format.unwrap_or(DataFormat::Utf8) {
            DataFormat::Utf8 => data.as_bytes().to_vec(),
            DataFormat::Base64 => crate::objects::decode_base64(data.as_bytes())?,
        };
        for b in bytes {
            if buf.len() == size {
                buf.pop_front();
            }
            buf.push_back(b);
        }
        Ok(())
    }

    /// `ringbuf-read`: what is read leaves the buffer.
    pub(crate) fn ringbuf_read(
        &mut self,
        device: &str,
        size: i64,
        format: Option<DataFormat>,
    ) -> Result<String, QmpError> {
        if size <= 0 {
            return Err(QmpError::generic("size must be greater than zero"));
        }
        let (_, buf) = self.ringbuf(device)?;
        let n = buf.len().min(usize::try_from(size).unwrap_or(usize::MAX));
        let bytes: Vec<u8> = buf.drain(..n).collect();
        Ok(match format.unwrap_or(DataFormat::Utf8) {
            DataFormat::Utf8 => String::from_utf8_lossy(&bytes).into_owned(),
            DataFormat::Base64 => base64::engine::general_purpose::STANDARD.encode(&bytes),
        })
    }
}

/// `logfile` copies a chardev's traffic to a file; blockjobd's chardevs carry none.
fn refuse_log(logfile: Option<&str>) -> Result<(), QmpError> {
    match logfile {
        Some(_) => Err(QmpError::generic(
            "Parameter 'logfile' is not supported by blockjobd",
        )),
        None => Ok(()),
    }
}

/// Holds a client's connection until it leaves.
async fn hold<S: tokio::io::AsyncRead + Unpin>(mut stream: S, connected: &AtomicBool) {
    connected.store(true, Ordering::Release);
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    connected.store(false, Ordering::Release);
}
