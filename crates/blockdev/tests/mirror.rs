//! blockdev-mirror against the s22 transcript.

mod common;

use common::*;
use serde_json::json;

fn ready_mirror(h: &mut Harness, id: &str, target: &str) {
    h.graph.add(target, MemNode::new(target, 4 * MIB, 0));
    h.ok(
        "blockdev-mirror",
        json!({"job-id": id, "device": "src", "target": target, "sync": "full"}),
    );
    assert_eq!(
        h.take_events(),
        s(&[&format!("{id} created"), &format!("{id} running")])
    );
    h.settle();
    assert_eq!(
        h.take_events(),
        s(&[
            &format!("{id} ready"),
            &format!(
                r#"BLOCK_JOB_READY {{"type":"mirror","device":"{id}","len":4194304,"offset":4194304,"speed":0}}"#
            ),
        ])
    );
}

#[test]
fn a_mirror_copies_goes_ready_and_reports_actively_synced() {
    let mut h = Harness::with_src_tgt();
    ready_mirror(&mut h, "jm", "m1");
    assert_eq!(h.graph.node("m1").bytes(), h.graph.node("src").bytes());
    let q = h.ok("query-block-jobs", json!({}));
    assert_eq!(
        q,
        json!([{"device": "jm", "len": 4194304, "offset": 4194304, "busy": false,
                "paused": false, "speed": 0, "io-status": "ok", "ready": true,
                "status": "ready", "auto-finalize": true, "auto-dismiss": true,
                "type": "mirror", "actively-synced": false}])
    );
}

#[test]
fn pause_in_ready_is_standby_and_resume_returns_to_ready() {
    let mut h = Harness::with_src_tgt();
    ready_mirror(&mut h, "jm", "m1");
    h.ok("block-job-pause", json!({"device": "jm"}));
    assert_eq!(h.take_events(), s(&["jm standby"]));
    h.ok("block-job-resume", json!({"device": "jm"}));
    assert_eq!(h.take_events(), s(&["jm ready"]));
}

#[test]
fn soft_cancel_of_a_ready_mirror_completes_it() {
    let mut h = Harness::with_src_tgt();
    ready_mirror(&mut h, "jm", "m1");
    h.ok("block-job-cancel", json!({"device": "jm"}));
    h.settle();
    assert_eq!(
        h.take_events(),
        s(&[
            "jm waiting",
            "jm pending",
            r#"BLOCK_JOB_COMPLETED {"type":"mirror","device":"jm","len":4194304,"offset":4194304,"speed":0}"#,
            "jm concluded",
            "jm null",
        ])
    );
}

#[test]
fn forced_cancel_of_a_ready_mirror_is_cancelled() {
    let mut h = Harness::with_src_tgt();
    ready_mirror(&mut h, "jm2", "m2");
    h.ok("block-job-cancel", json!({"device": "jm2", "force": true}));
    h.settle();
    assert_eq!(
        h.take_events(),
        s(&[
            "jm2 aborting",
            r#"BLOCK_JOB_CANCELLED {"type":"mirror","device":"jm2","len":4194304,"offset":4194304,"speed":0}"#,
            "jm2 concluded",
            "jm2 null",
        ])
    );
}

#[test]
fn complete_finishes_a_ready_mirror_and_frees_its_target() {
    let mut h = Harness::with_src_tgt();
    ready_mirror(&mut h, "jm", "m1");
    // Both ends of a mirror are blocked (QEMU's job blocker on its source and target).
    assert_eq!(
        h.err("blockdev-backup", backup("jb", "src", "tgt")),
        "GenericError: Node 'src' is busy: block device is in use by block job: mirror"
    );
    assert_eq!(
        h.err("blockdev-backup", backup("jb", "tgt", "m1")),
        "GenericError: Node 'm1' is busy: block device is in use by block job: mirror"
    );
    h.ok("block-job-complete", json!({"device": "jm"}));
    h.settle();
    let ev = h.take_events();
    assert!(
        ev.iter()
            .any(|e| e.starts_with(r#"BLOCK_JOB_COMPLETED {"type":"mirror""#))
    );
    assert_eq!(ev.last().map(String::as_str), Some("jm null"));
    h.ok("blockdev-backup", backup("jb", "src", "m1"));
}

#[test]
fn complete_before_ready_is_refused_by_the_verb_table() {
    let mut h = Harness::with_src_tgt();
    h.graph.add("m1", MemNode::new("m1", 4 * MIB, 0));
    h.ok(
        "blockdev-mirror",
        json!({"job-id": "jm", "device": "src", "target": "m1", "sync": "full", "speed": 1}),
    );
    assert_eq!(
        h.err("block-job-complete", json!({"device": "jm"})),
        "GenericError: Job 'jm' in state 'running' cannot accept command verb 'complete'"
    );
}
