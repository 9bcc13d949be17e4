//! A mirror flushes its target while it copies (every 64 MiB), so that the disk writes back
//! during the copy rather than all at once before READY. A failure of such a flush is kept: the
//! job meets it where QEMU meets a failing flush, before READY, under `on-target-error`.

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

fn raw_image(dir: &Path, name: &str, size: u64, fill: u8) -> String {
    let path = dir.join(name);
    std::fs::write(&path, vec![fill; size as usize]).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_flush_failing_during_the_copy_fails_the_job_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let size = 128 * MIB;
    let src = raw_image(dir.path(), "src.raw", size, 0x11);
    let tgt = raw_image(dir.path(), "tgt.raw", size, 0);
    let mut h = Harness::block_layer();
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src",
               "file": {"driver": "file", "filename": src}}),
    );
    // The first flush of the target fails, once: the one after the first 64 MiB.
    h.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tgt", "file": {"driver": "blkdebug",
               "inject-error": [{"event": "none", "iotype": "flush", "errno": 5, "once": true}],
               "image": {"driver": "file", "filename": tgt}}}),
    );
    h.ok(
        "blockdev-mirror",
        json!({"job-id": "jm", "device": "src", "target": "tgt", "sync": "full"}),
    );
    h.take_events();
    h.settle();
    let events = h.take_events();
    assert!(
        events.contains(
            &r#"BLOCK_JOB_ERROR {"device":"jm","operation":"write","action":"report"}"#.to_string()
        ),
        "{events:?}"
    );
    assert!(!events.contains(&"jm ready".to_string()), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("BLOCK_JOB_COMPLETED") && e.contains("Input/output error")),
        "{events:?}"
    );
}
