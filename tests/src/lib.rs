//! blockjobs-tests: support for the workspace-level end-to-end tests in `tests/tests/`.
//!
//! The tests drive real daemons (ours, `blockjobd`, and the reference, `qemu-storage-daemon`)
//! through real sockets, with QEMU's own tools checking the images.

pub mod qmp;
pub mod servers;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The shared oracle: `$BLOCKJOBS_SHARED_ORACLE` if set, else `../shared/oracle/` beside the
/// repository. Panics, saying where it was looked for, if it is not there.
pub fn shared_oracle() -> PathBuf {
    let dir = std::env::var_os("BLOCKJOBS_SHARED_ORACLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/oracle"));
    assert!(
        dir.join("qmp_oracle.py").is_file(),
        "the shared oracle (qmp_oracle.py, scenarios/, expected/) is missing at {}: put it \
         there, or point BLOCKJOBS_SHARED_ORACLE at it",
        dir.display()
    );
    dir
}

/// Our own scenarios and their transcripts recorded from qemu-storage-daemon.
pub fn own_oracle() -> PathBuf {
    repo_root().join("tests/oracle")
}

/// Path of the daemon under test: this package's `blockjobd-e2e` binary, which is `blockjobd::main`
/// (the whole body of the `blockjobd` binary). Cargo builds a package's binaries before running its
/// integration tests, so this is never stale, whichever packages `cargo test` was asked for.
pub fn blockjobd() -> PathBuf {
    // current_exe is target/<profile>/deps/<test>-<hash>; the binary is target/<profile>/.
    let exe = std::env::current_exe().expect("current test executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .join("blockjobd-e2e");
    assert!(
        bin.is_file(),
        "{} is missing: run the end-to-end tests through cargo test",
        bin.display()
    );
    bin
}

/// Path of this package's `blockjobctl-e2e` binary (`blockjobctl::main`).
pub fn blockjobctl() -> PathBuf {
    blockjobd().with_file_name("blockjobctl-e2e")
}

/// The path of `program` found on `PATH`; fails the test, naming the Debian package to
/// install, when it is missing (a missing tool never lets a test pass).
pub fn require_tool(program: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed: apt-get install {package} (.ci/run does)")
        })
}

/// A Python venv in `dir` (pass the test's `CARGO_TARGET_TMPDIR`, so it is reused across runs)
/// with `qemu.qmp` installed; returns its `python` executable.
pub fn python_with_qemu_qmp(dir: &Path) -> PathBuf {
    let venv = dir.join("venv-qemu-qmp");
    let python = venv.join("bin/python");
    let ready = venv.join(".qemu-qmp-installed");
    if !ready.is_file() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("run python3 -m venv");
        assert!(status.success(), "python3 -m venv failed");
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "-q", "qemu.qmp"])
            .status()
            .expect("run pip");
        assert!(status.success(), "pip install qemu.qmp failed");
        std::fs::write(&ready, b"").expect("mark venv ready");
    }
    python
}

/// Output of one run of the oracle harness.
pub struct OracleRun {
    pub success: bool,
    pub output: String,
}

/// Runs `qmp_oracle.py check` with the given daemon on the given scenarios.
pub fn run_oracle(daemon: &Path, scenarios: &Path, expected: &Path, only: &[&str]) -> OracleRun {
    let out_dir = tempfile::tempdir().expect("temp dir for transcripts");
    let mut cmd = Command::new("python3");
    cmd.arg(shared_oracle().join("qmp_oracle.py"))
        .arg("check")
        .arg("--daemon")
        .arg(daemon)
        .arg("--scenarios")
        .arg(scenarios)
        .arg("--expected")
        .arg(expected)
        .arg("--out")
        .arg(out_dir.path());
    if !only.is_empty() {
        cmd.arg("--only").args(only);
    }
    let out = cmd.output().expect("run qmp_oracle.py");
    OracleRun {
        success: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
