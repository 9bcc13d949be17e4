//! The ecosystem's NBD servers as test fixtures (`qemu-nbd`, `nbdkit`), the tools that check
//! images, and a writer that keeps writing to an export while a test does something else.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd::client::{Connector, ServerAddr};

/// The Debian package a tool comes from, for the failure message when it is missing.
fn package_of(program: &str) -> &'static str {
    match program {
        "nbdkit" => "nbdkit",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        _ => "qemu-utils",
    }
}

/// Runs a tool to completion and returns its standard output; the test fails if the tool is
/// missing (saying what to install) or fails.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{program}: {e} (install it with `apt-get install {}`)",
                package_of(program)
            )
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server process that forks once it listens (`qemu-nbd --fork`, `nbdkit`), on a unix
/// socket; killed through its pid file when dropped.
pub struct ServerProcess {
    pub socket: PathBuf,
    pid_file: PathBuf,
    /// The export name (`None`: the default export).
    pub export: Option<String>,
}

impl ServerProcess {
    /// `qemu-nbd` serving `image` (of `format`) as export `disk`, writable unless `extra`
    /// says `-r`, for up to 8 clients at once.
    pub fn qemu_nbd(dir: &Path, tag: &str, image: &Path, format: &str, extra: &[&str]) -> Self {
        let socket = dir.join(format!("{tag}.sock"));
        let pid_file = dir.join(format!("{tag}.pid"));
        let mut args = vec![
            "--fork".to_string(),
            format!("--pid-file={}", pid_file.display()),
            "-k".into(),
            socket.display().to_string(),
            "-f".into(),
            format.into(),
            "-x".into(),
            "disk".into(),
            "-t".into(),
            "-e".into(),
            "8".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(image.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool("qemu-nbd", &args);
        ServerProcess {
            socket,
            pid_file,
            export: Some("disk".into()),
        }
    }

    /// `nbdkit` with `plugin_and_parameters` (and filters before them) on a unix socket.
    pub fn nbdkit(dir: &Path, tag: &str, plugin_and_parameters: &[&str]) -> Self {
        let socket = dir.join(format!("{tag}.sock"));
        let pid_file = dir.join(format!("{tag}.pid"));
        let mut args = vec![
            "-U".to_string(),
            socket.display().to_string(),
            "-P".into(),
            pid_file.display().to_string(),
        ];
        args.extend(plugin_and_parameters.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool("nbdkit", &args);
        ServerProcess {
            socket,
            pid_file,
            export: None,
        }
    }

    /// The `server` member of an `nbd` node's options.
    pub fn server(&self) -> serde_json::Value {
        serde_json::json!({"type": "unix", "path": self.socket.to_str().expect("UTF-8 path")})
    }

    /// The export's URI.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export.as_deref().unwrap_or(""),
            self.socket.display()
        )
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub fn kill(&self) {
        let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        else {
            return;
        };
        // SAFETY: plain syscalls on a process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let start = Instant::now();
        while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.pid_file);
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A qcow2 image of `size` (e.g. `4M`) made by qemu-img.
pub fn qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size],
    );
    path
}

/// Runs qemu-io commands on an image (`format`, or an NBD URI with `-f raw`).
pub fn qemu_io(target: &str, format: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", format];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(target);
    tool("qemu-io", &args)
}

/// `qemu-img compare` of two images (any formats qemu-img probes, or `json:` names).
pub fn assert_same_image(a: &str, b: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", a, b])
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "{a} and {b} differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` of a qcow2 image: no corruption (leaked clusters, which a server killed
/// mid-write may leave, are not corruption).
pub fn assert_consistent(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", image.to_str().expect("UTF-8 path")])
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    // 0: clean; 3: leaked clusters only. 1 and 2 are errors and corruption.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `json:` image name that reads `path` (of `format`) without taking its lock (the daemon
/// holding it may still have it open).
pub fn unlocked(path: &Path, format: &str) -> String {
    format!(
        "json:{{\"driver\":\"{format}\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\",\"locking\":\"off\"}}}}",
        path.display()
    )
}

/// Keeps writing 4 KiB blocks of changing patterns at spread offsets to an NBD export until
/// stopped, each one a separate request (so many writes land while a test runs).
pub struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Writer {
    /// Starts writing to export `export` of the server at unix socket `socket`, anywhere.
    pub fn start(socket: &Path, export: &str) -> Writer {
        Writer::start_within(socket, export, u64::MAX)
    }

    /// Starts writing to export `export`, within its first `span` bytes.
    pub fn start_within(socket: &Path, export: &str, span: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let connector = Connector::new(ServerAddr::Unix(socket.into()), export);
        let (flag, count) = (stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let client = connector.connect().await.map_err(|e| e.to_string())?;
                let blocks = client.info().size.min(span) / 4096;
                let mut n: u64 = 0;
                while !flag.load(Ordering::Relaxed) {
                    let block = n.wrapping_mul(2_654_435_761) % blocks;
                    let data = vec![(n % 250 + 3) as u8; 4096];
                    client
                        .write(block * 4096, &data, false)
                        .await
                        .map_err(|e| e.to_string())?;
                    n += 1;
                    count.store(n, Ordering::Relaxed);
                }
                client.disconnect().await;
                Ok(())
            })
        });
        Writer {
            stop,
            writes,
            thread: Some(thread),
        }
    }

    /// Writes done so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more writes than now have been done.
    pub fn wait_for_writes(&mut self, n: u64) {
        let target = self.writes() + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.writes() < target {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let result = self.thread.take().map(|t| t.join());
                panic!("the writer stopped: {result:?}");
            }
            assert!(Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops writing; returns how many writes were done. Fails the test if a write failed.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .expect("writer thread")
                .unwrap_or_else(|e| panic!("a write failed: {e}"));
        }
        self.writes()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
