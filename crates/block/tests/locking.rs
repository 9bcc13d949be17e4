//! Image locking interoperates with QEMU's tools (qemu-io, qemu-img from QEMU 10) both ways.

mod common;
use common::AddJson;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use block::{BlockGraph, Perm};
use serde_json::json;

fn qcow2_image(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("img.qcow2");
    let path = path.to_str().unwrap().to_string();
    assert!(run(&["qemu-img", "create", "-q", "-f", "qcow2", &path, "1M"]).0);
    path
}

fn image(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("img.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    path.to_str().unwrap().to_string()
}

/// Runs a QEMU tool; returns (success, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Permissions a writable format node takes on its image file (as qcow2 does in QSD: locks
/// bytes 100, 101, 103, 201, 203).
const WRITER: (Perm, Perm) = (
    Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE),
    Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED),
);

struct QemuIo {
    child: Child,
    /// Kept open: qemu-io stays until its input ends.
    _stdin: std::process::ChildStdin,
}

impl QemuIo {
    /// An interactive qemu-io holding `path` open (read-write unless `read_only`), returned
    /// once it has completed a read (so its locks are in place).
    fn open(path: &str, format: &str, read_only: bool) -> QemuIo {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", format]);
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("qemu-io exited").unwrap();
            if line.contains("read 512/512 bytes") {
                break;
            }
        }
        QemuIo {
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn qemu_io_cannot_write_while_we_hold_write() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let _grant = n.take_perm("node 'q'", "file", WRITER.0, WRITER.1).unwrap();
    let (ok, err) = run(&["qemu-io", "-f", "raw", "-c", "write 0 512", &f]);
    assert!(!ok);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    assert!(
        err.contains(&format!("Is another process using the image [{f}]?")),
        "{err}"
    );
}

#[test]
fn qemu_img_info_of_qcow2_needs_shared_write_while_we_hold_write() {
    let d = tempfile::tempdir().unwrap();
    let f = qcow2_image(&d);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let _grant = n.take_perm("node 'q'", "file", WRITER.0, WRITER.1).unwrap();
    let (ok, err) = run(&["qemu-img", "info", &f]);
    assert!(!ok);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    assert!(run(&["qemu-img", "info", "-U", &f]).0);
}

#[test]
fn releasing_write_lets_qemu_io_write() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let grant = n.take_perm("node 'q'", "file", WRITER.0, WRITER.1).unwrap();
    drop(grant);
    let (ok, err) = run(&["qemu-io", "-f", "raw", "-c", "write 0 512", &f]);
    assert!(ok, "{err}");
}

#[test]
fn node_without_users_takes_no_locks() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let mut g = BlockGraph::new();
    g.blockdev_add_json(&json!({"driver": "raw", "node-name": "r",
        "file": {"driver": "file", "filename": f}}))
        .unwrap();
    let (ok, err) = run(&["qemu-io", "-f", "raw", "-c", "write 0 512", &f]);
    assert!(ok, "{err}");
}

#[test]
fn locking_off_takes_no_locks() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(
            &json!({"driver": "file", "node-name": "f", "filename": f, "locking": "off"}),
        )
        .unwrap();
    let _grant = n.take_perm("node 'q'", "file", WRITER.0, WRITER.1).unwrap();
    assert!(run(&["qemu-io", "-f", "raw", "-c", "write 0 512", &f]).0);
}

#[test]
fn we_cannot_take_write_while_qemu_io_holds_a_qcow2_image() {
    let d = tempfile::tempdir().unwrap();
    let f = qcow2_image(&d);
    let _qemu = QemuIo::open(&f, "qcow2", false);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let e = n
        .take_perm("node 'q'", "file", Perm::WRITE, Perm::ALL)
        .err()
        .unwrap();
    assert_eq!(e.desc(), "Failed to get \"write\" lock");
    // A failed attempt leaves no lock behind: a sharing reader still gets in.
    assert!(
        n.take_perm("reader", "file", Perm::CONSISTENT_READ, Perm::ALL)
            .is_ok()
    );
}

#[test]
fn we_must_share_write_while_qemu_io_writes_a_raw_image() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let _qemu = QemuIo::open(&f, "raw", false);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": f}))
        .unwrap();
    let e = n
        .take_perm("node 'q'", "file", WRITER.0, WRITER.1)
        .err()
        .unwrap();
    assert_eq!(e.desc(), "Failed to get shared \"write\" lock");
    assert!(
        n.take_perm("node 'q'", "file", Perm::WRITE, Perm::ALL)
            .is_ok()
    );
}

#[test]
fn read_only_user_refusing_to_share_write_fails_while_qemu_io_writes() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let _qemu = QemuIo::open(&f, "raw", false);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(
            &json!({"driver": "file", "node-name": "f", "filename": f, "read-only": true}),
        )
        .unwrap();
    let e = n
        .take_perm(
            "node 'q'",
            "file",
            Perm::CONSISTENT_READ,
            !(Perm::WRITE | Perm::RESIZE),
        )
        .err()
        .unwrap();
    assert_eq!(e.desc(), "Failed to get shared \"write\" lock");
}

#[test]
fn readers_coexist_with_a_read_only_qemu_io() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let _qemu = QemuIo::open(&f, "raw", true);
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add_json(
            &json!({"driver": "file", "node-name": "f", "filename": f, "read-only": true}),
        )
        .unwrap();
    assert!(
        n.take_perm(
            "node 'q'",
            "file",
            Perm::CONSISTENT_READ,
            !(Perm::WRITE | Perm::RESIZE)
        )
        .is_ok()
    );
}

#[test]
fn two_nodes_on_one_file_in_one_process_conflict_like_two_processes() {
    let d = tempfile::tempdir().unwrap();
    let f = image(&d);
    let mut g = BlockGraph::new();
    let a = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "a", "filename": f}))
        .unwrap();
    let b = g
        .blockdev_add_json(&json!({"driver": "file", "node-name": "b", "filename": f}))
        .unwrap();
    let _ga = a
        .take_perm("node 'qa'", "file", WRITER.0, WRITER.1)
        .unwrap();
    let e = b
        .take_perm("node 'qb'", "file", WRITER.0, WRITER.1)
        .err()
        .unwrap();
    assert_eq!(e.desc(), "Failed to get \"write\" lock");
}
