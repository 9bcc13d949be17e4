//! QEMU's official Python client (`qemu.qmp` from PyPI, installed into a venv under the target
//! directory) drives blockjobd: negotiation, a grouped transaction with manual finalize, its
//! events, finalize and dismiss, a scripted `qmp-shell` session, and `quit`.

use blockjobs_tests::{blockjobd, python_with_qemu_qmp, repo_root};
use std::path::Path;
use std::process::Command;

#[test]
fn qemu_qmp_client_runs_a_grouped_transaction_with_manual_finalize() {
    let python = python_with_qemu_qmp(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let out = Command::new(python)
        .arg(repo_root().join("tests/python/client_grouped_finalize.py"))
        .arg(blockjobd())
        .output()
        .expect("run the Python client script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("13 passed, 0 failed"), "{text}");
}
