//! Every fuzz input we keep, replayed without instrumentation: the corpus in
//! `fuzz/corpus/TARGET/` (real inputs and what the fuzzer kept), the run-time seeds
//! (`fuzz_targets::seeds`: our schema and QEMU's, the oracle transcripts' requests) and every
//! crash found, kept in `fuzz/regressions/TARGET/` once fixed. Each must run through its target without a panic.
//! qcow2 images are also written as the target writes them and judged by `qemu-img check`:
//! an image that was consistent (exit 0 or 3) must stay consistent after our writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use fuzz_targets::qcow2_image::{MemoryFile, Outcome, exercise};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["fuzz/corpus", "fuzz/regressions"] {
        let Ok(entries) = std::fs::read_dir(root().join(dir).join(target)) else {
            continue;
        };
        out.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        }));
    }
    out.sort();
    out
}

fn replay(target: &str) {
    let (_, body) = fuzz_targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let mut all: Vec<(String, Vec<u8>)> = inputs(target)
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    let qemu = qapi_testdata::qemu_schema_dir().ok();
    all.extend(fuzz_targets::seeds::generated(
        target,
        &root(),
        qemu.as_deref(),
    ));
    assert!(!all.is_empty(), "no inputs for {target}");
    for (name, data) in all {
        let result = std::panic::catch_unwind(|| body(&data));
        assert!(result.is_ok(), "{target} panics on {name}");
    }
}

#[test]
fn the_qapi_schema_corpus_replays() {
    replay("qapi_schema");
}

#[test]
fn the_qmp_input_corpus_replays() {
    replay("qmp_input");
}

#[test]
fn the_nbd_server_corpus_replays() {
    replay("nbd_server");
}

#[test]
fn the_qcow2_image_corpus_replays() {
    replay("qcow2_image");
}

/// `qemu-img check`'s exit code for `bytes` written to a file.
fn check(dir: &Path, bytes: &[u8]) -> i32 {
    let path = dir.join("image.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&path)
        .output()
        .expect("qemu-img (install qemu-utils)");
    out.status.code().unwrap_or(-1)
}

#[test]
fn images_written_from_the_corpus_pass_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut written = 0;
    for path in inputs("qcow2_image") {
        let data = std::fs::read(&path).unwrap();
        let before = check(dir.path(), &data);
        let file = Arc::new(MemoryFile::new(&data));
        let outcome = exercise(&file);
        let after_bytes = file.bytes();
        if after_bytes == data || !matches!(outcome, Outcome::Written { .. }) {
            continue;
        }
        let corrupt_bit = after_bytes.get(79).is_some_and(|b| b & 2 != 0);
        if matches!(before, 0 | 3) && !corrupt_bit {
            written += 1;
            let after = check(dir.path(), &after_bytes);
            assert!(
                matches!(after, 0 | 3),
                "{}: consistent before (exit {before}), qemu-img check exit {after} after our writes",
                path.display()
            );
        }
    }
    assert!(
        written >= 5,
        "only {written} consistent images were written"
    );
}
