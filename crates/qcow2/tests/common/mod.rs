//! Shared test fixtures: temp dirs, qemu-img/qemu-io runners, data patterns.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use qcow2::{Image, Storage};

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    /// In memory (tmpfs) where available: for tests that flush thousands of times.
    pub fn in_memory() -> Scratch {
        match tempfile::tempdir_in("/dev/shm") {
            Ok(dir) => Scratch { dir },
            Err(_) => Scratch::new(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Run a program; panic with its output if it fails. Returns stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run a program and return (exit code, stdout + stderr).
pub fn run_status(prog: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(prog).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "qemu-io: {out}"
    );
}

/// `qemu-img check` must report no corruption (exit 0); returns its output.
pub fn assert_check_clean(path: &Path) -> String {
    let (code, out) = run_status("qemu-img", &["check", p(path)]);
    assert_eq!(code, 0, "qemu-img check: {out}");
    out
}

pub fn json(prog: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run(prog, args)).unwrap()
}

/// The guest contents of an image, as qemu-img sees them.
pub fn qemu_contents(path: &Path, scratch: &Scratch) -> Vec<u8> {
    let raw = scratch.path(&format!(
        "{}.raw",
        path.file_name().unwrap().to_str().unwrap()
    ));
    run("qemu-img", &["convert", "-O", "raw", p(path), p(&raw)]);
    std::fs::read(raw).unwrap()
}

/// The guest contents of an image, as this crate reads them.
pub fn our_contents(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    // Odd-sized chunks exercise partial clusters.
    let mut off = 0;
    while off < buf.len() {
        let n = (buf.len() - off).min(300_001);
        img.read_at(&mut buf[off..off + n], off as u64).unwrap();
        off += n;
    }
    buf
}

pub fn open_rw(path: &Path) -> Image {
    Image::open_file(path, false).unwrap()
}

pub fn open_ro(path: &Path) -> Image {
    Image::open_file(path, true).unwrap()
}

/// Create an image with this crate at `path`.
pub fn create_file(path: &Path, size: u64, cluster: u32, backing: Option<(&str, &str)>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    qcow2::create(&f, size, cluster, backing).unwrap();
}

pub fn storage(path: &Path, write: bool) -> Arc<dyn Storage> {
    Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap(),
    )
}

/// Deterministic non-trivial bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + i / 4096) as u8).wrapping_add(seed) | 1)
        .collect()
}
