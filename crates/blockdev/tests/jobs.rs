//! Job commands, queries and backups through `qmp_api::dispatch`, against QSD's transcripts.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

fn completed(id: &str, len: u64, speed: u64) -> String {
    format!(
        r#"BLOCK_JOB_COMPLETED {{"type":"backup","device":"{id}","len":{len},"offset":{len},"speed":{speed}}}"#
    )
}

#[test]
fn query_version_reports_the_qemu_release_we_match_and_our_package() {
    let mut h = Harness::new();
    let v = h.ok("query-version", json!({}));
    assert_eq!(v["qemu"], json!({"major": 10, "minor": 0, "micro": 2}));
    assert_eq!(
        v["package"],
        json!(format!("blockjobd {}", env!("CARGO_PKG_VERSION")))
    );
}

#[test]
fn query_commands_lists_the_generated_command_table() {
    let mut h = Harness::new();
    let v = h.ok("query-commands", json!({}));
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let table: Vec<&str> = qmp_api::COMMANDS.iter().map(|c| c.name).collect();
    assert_eq!(names, table);
}

#[test]
fn query_qmp_schema_is_the_generated_introspection() {
    let mut h = Harness::new();
    assert_eq!(h.ok("query-qmp-schema", json!({})), qmp_api::qmp_schema());
}

#[test]
fn a_default_backup_shows_the_drained_start_then_auto_finalizes_and_disappears() {
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(backup("j1", "src", "tgt"), json!({"speed": 2097152})),
    );
    assert_eq!(
        h.take_events(),
        s(&["j1 created", "j1 running", "j1 paused", "j1 running"])
    );
    h.step();
    let jobs_q = h.ok("query-jobs", json!({}));
    assert_eq!(jobs_q[0]["status"], "running");
    assert_eq!(jobs_q[0]["total-progress"], 4194304);
    let jobs = h.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "running");
    assert_eq!(jobs[0]["len"], 4194304);
    assert_eq!(jobs[0]["speed"], 2097152);
    assert_eq!(jobs[0]["io-status"], "ok");
    assert_eq!(jobs[0]["type"], "backup");
    h.settle();
    assert_eq!(
        h.take_events(),
        s(&[
            "j1 waiting",
            "j1 pending",
            &completed("j1", 4194304, 2097152),
            "j1 concluded",
            "j1 null"
        ])
    );
    assert_eq!(h.ok("query-jobs", json!({})), json!([]));
    assert_eq!(h.ok("query-block-jobs", json!({})), json!([]));
    assert_eq!(h.graph.node("tgt").bytes(), h.graph.node("src").bytes());
}

#[test]
fn manual_finalize_and_dismiss_park_the_job_in_pending_then_concluded() {
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(
            backup("j1", "src", "tgt"),
            json!({"auto-finalize": false, "auto-dismiss": false}),
        ),
    );
    h.take_events();
    h.settle();
    assert_eq!(
        h.take_events(),
        s(&[
            "j1 waiting",
            "j1 pending",
            r#"BLOCK_JOB_PENDING {"type":"backup","id":"j1"}"#
        ])
    );
    let q = h.ok("query-block-jobs", json!({}));
    assert_eq!(
        q,
        json!([{"device": "j1", "len": 4194304, "offset": 4194304, "busy": false,
                "paused": false, "speed": 0, "io-status": "ok", "ready": false,
                "status": "pending", "auto-finalize": false, "auto-dismiss": false,
                "type": "backup"}])
    );
    h.ok("block-job-finalize", json!({"id": "j1"}));
    assert_eq!(
        h.take_events(),
        s(&[&completed("j1", 4194304, 0), "j1 concluded"])
    );
    h.ok("block-job-dismiss", json!({"id": "j1"}));
    assert_eq!(h.take_events(), s(&["j1 null"]));
    assert_eq!(
        h.err("block-job-dismiss", json!({"id": "j1"})),
        "DeviceNotActive: Block job 'j1' not found"
    );
    assert_eq!(
        h.err("job-dismiss", json!({"id": "j1"})),
        "GenericError: Job not found"
    );
}

#[test]
fn unknown_job_ids_are_device_not_active_for_block_job_verbs_and_job_not_found_for_job_verbs() {
    let mut h = Harness::new();
    for (cmd, key) in [
        ("block-job-cancel", "device"),
        ("block-job-pause", "device"),
        ("block-job-resume", "device"),
        ("block-job-complete", "device"),
        ("block-job-finalize", "id"),
        ("block-job-dismiss", "id"),
    ] {
        assert_eq!(
            h.err(cmd, json!({key: "nope"})),
            "DeviceNotActive: Block job 'nope' not found"
        );
    }
    assert_eq!(
        h.err("block-job-set-speed", json!({"device": "nope", "speed": 0})),
        "DeviceNotActive: Block job 'nope' not found"
    );
    for cmd in [
        "job-cancel",
        "job-pause",
        "job-resume",
        "job-complete",
        "job-finalize",
        "job-dismiss",
    ] {
        assert_eq!(
            h.err(cmd, json!({"id": "nope"})),
            "GenericError: Job not found"
        );
    }
}

#[test]
fn job_ids_are_checked_and_a_target_in_use_is_busy() {
    let mut h = Harness::with_src_tgt();
    h.graph.add("b", MemNode::new("b", 4 * MIB, 1));
    h.graph.add("tb", MemNode::new("tb", 4 * MIB, 0));
    assert_eq!(
        h.err("blockdev-backup", backup("1bad", "b", "tb")),
        "GenericError: Invalid job ID '1bad'"
    );
    assert_eq!(
        h.err(
            "blockdev-backup",
            json!({"device": "b", "target": "tb", "sync": "full"})
        ),
        "GenericError: Invalid job ID ''"
    );
    h.ok(
        "blockdev-backup",
        with(backup("j1", "src", "tgt"), json!({"speed": 1048576})),
    );
    h.step();
    h.ok("block-job-pause", json!({"device": "j1"}));
    h.take_events();
    assert_eq!(
        h.err("blockdev-backup", backup("j1", "b", "tb")),
        "GenericError: Job ID 'j1' already in use"
    );
    assert_eq!(
        h.err("blockdev-backup", backup("j2", "b", "tgt")),
        "GenericError: Node 'tgt' is busy: block device is in use by block job: backup"
    );
    assert_eq!(h.take_events(), Vec::<String>::new());
    h.ok("block-job-cancel", json!({"device": "j1", "force": true}));
    h.settle();
    let ev = h.take_events();
    assert_eq!(&ev[..2], &s(&["j1 running", "j1 aborting"])[..]);
    assert!(ev[2].starts_with(r#"BLOCK_JOB_CANCELLED {"type":"backup","device":"j1""#));
    assert_eq!(&ev[3..], &s(&["j1 concluded", "j1 null"])[..]);
    // The target is free again.
    h.ok("blockdev-backup", backup("j2", "b", "tgt"));
}

#[test]
fn a_busy_target_refusal_pauses_the_sleeping_job_in_both_drains_of_the_transaction() {
    // As QSD: the transaction's drain of everything, then the source's drained section (the
    // job, resumed into its rate-limit delay, is sleeping again for the second).
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(
            backup("j", "src", "tgt"),
            json!({"speed": 1048576, "auto-finalize": false}),
        ),
    );
    h.step();
    h.take_events();
    assert_eq!(
        h.err("blockdev-backup", backup("j", "src", "tgt")),
        "GenericError: Node 'tgt' is busy: block device is in use by block job: backup"
    );
    assert_eq!(
        h.take_events(),
        s(&["j paused", "j running", "j paused", "j running"])
    );
}

#[test]
fn backup_argument_errors_come_in_qemus_order() {
    let mut h = Harness::with_src_tgt();
    h.graph.add("small", MemNode::new("small", MIB, 0));
    h.graph.add_bitmap("src", "bm0", vec![(0, 65536)]);
    let cases = [
        (
            json!({"sync": "incremental"}),
            "must provide a valid bitmap name for 'incremental' sync mode",
        ),
        (
            json!({"sync": "bitmap"}),
            "must provide a valid bitmap name for 'bitmap' sync mode",
        ),
        (
            json!({"sync": "incremental", "bitmap": "bm0", "bitmap-mode": "always"}),
            "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
        ),
        (
            json!({"sync": "bitmap", "bitmap": "nosuch", "bitmap-mode": "always"}),
            "Bitmap 'nosuch' could not be found",
        ),
        (
            json!({"sync": "bitmap", "bitmap": "bm0"}),
            "Bitmap sync mode must be given when providing a bitmap",
        ),
        (
            json!({"sync": "none", "bitmap": "bm0", "bitmap-mode": "always"}),
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ),
        (
            json!({"sync": "full", "bitmap-mode": "always"}),
            "Cannot specify bitmap sync mode without a bitmap",
        ),
        (
            json!({"target": "small"}),
            "Source and target image have different sizes",
        ),
        (
            json!({"device": "nosuch"}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (
            json!({"target": "nosuch"}),
            "Cannot find device='nosuch' nor node-name='nosuch'",
        ),
        (json!({"job-id": "1j"}), "Invalid job ID '1j'"),
        (
            json!({"compress": true}),
            "Compression is not supported for this drive ",
        ),
        (
            json!({"compress": true, "x-perf": {"max-workers": 0}}),
            "Compression is not supported for this drive ",
        ),
        (
            json!({"x-perf": {"max-workers": 0, "max-chunk": -1}}),
            "max-workers must be between 1 and 2147483647",
        ),
        (
            json!({"x-perf": {"max-chunk": -1}}),
            "max-chunk must be zero (which means no limit) or positive",
        ),
        (
            json!({"x-perf": {"max-chunk": 65535}}),
            "Required max-chunk (65535) is less than backup cluster size (65536)",
        ),
        // No copy offloading here: refused by name rather than ignored.
        (
            json!({"x-perf": {"use-copy-range": true}}),
            "Parameter 'x-perf.use-copy-range' cannot be true: copy offloading is not supported",
        ),
    ];
    for (extra, message) in cases {
        let args = with(backup("j", "src", "tgt"), extra);
        assert_eq!(
            h.err("blockdev-backup", args),
            format!("GenericError: {message}")
        );
    }
    assert_eq!(h.take_events(), Vec::<String>::new());
    assert_eq!(
        h.err(
            "blockdev-backup",
            with(backup("j", "src", "tgt"), json!({"speed": -1}))
        ),
        "GenericError: Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(h.take_events(), s(&["j created", "j null"]));
}

#[test]
fn verbs_in_the_wrong_state_are_refused_like_qsd() {
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(backup("j", "src", "tgt"), json!({"speed": 65536})),
    );
    h.step();
    assert_eq!(
        h.err("block-job-resume", json!({"device": "j"})),
        "GenericError: Can't resume a job that was not paused"
    );
    assert_eq!(
        h.err("block-job-complete", json!({"device": "j"})),
        "GenericError: Job 'j' in state 'running' cannot accept command verb 'complete'"
    );
    assert_eq!(
        h.err("block-job-set-speed", json!({"device": "j", "speed": -5})),
        "GenericError: Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(
        h.err("job-finalize", json!({"id": "j"})),
        "GenericError: Job 'j' in state 'running' cannot accept command verb 'finalize'"
    );
    h.take_events();
    h.ok("block-job-pause", json!({"device": "j"}));
    assert_eq!(h.take_events(), s(&["j paused"]));
    assert_eq!(
        h.err("job-pause", json!({"id": "j"})),
        "GenericError: Job is already paused"
    );
    assert_eq!(
        h.err("block-job-cancel", json!({"device": "j"})),
        "GenericError: The block job for device 'j' is currently paused"
    );
    let q = h.ok("query-block-jobs", json!({}));
    assert_eq!(
        (q[0]["paused"].clone(), q[0]["status"].clone()),
        (json!(true), json!("paused"))
    );
    h.ok("block-job-resume", json!({"device": "j"}));
    h.ok("block-job-set-speed", json!({"device": "j", "speed": 0}));
    h.settle();
    let ev = h.take_events();
    assert_eq!(ev.first().map(String::as_str), Some("j running"));
    assert_eq!(ev.last().map(String::as_str), Some("j null"));
}

#[test]
fn job_cancel_is_always_forced_and_the_job_reports_operation_canceled() {
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(
            backup("j2", "src", "tgt"),
            json!({"speed": 1048576, "auto-dismiss": false}),
        ),
    );
    h.step();
    h.take_events();
    h.ok("job-cancel", json!({"id": "j2"}));
    h.settle();
    let ev = h.take_events();
    assert_eq!(ev[0], "j2 aborting");
    assert!(ev[1].starts_with("BLOCK_JOB_CANCELLED"));
    assert_eq!(ev[2], "j2 concluded");
    let q = h.ok("query-jobs", json!({}));
    assert_eq!(q[0]["error"], "Operation canceled");
    h.ok("job-dismiss", json!({"id": "j2"}));
}

#[test]
fn block_job_change_of_a_backup_is_refused_whatever_the_type_as_qsd_does() {
    // QSD 10.0.2: only mirror's driver has `change`; every other job type refuses it.
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(backup("j", "src", "tgt"), json!({"speed": 1})),
    );
    for arguments in [
        json!({"id": "j", "type": "backup"}),
        json!({"id": "j", "type": "mirror", "copy-mode": "write-blocking"}),
    ] {
        assert_eq!(
            h.err("block-job-change", arguments),
            "GenericError: Job type does not support change"
        );
    }
}

#[test]
fn shutdown_cancels_jobs_and_closes_every_node() {
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(backup("j", "src", "tgt"), json!({"speed": 1})),
    );
    h.step();
    h.bd.shutdown().unwrap();
    h.settle();
    assert!(*h.graph.closed.lock().unwrap());
    assert_eq!(h.ok("query-jobs", json!({})), json!([]));
}

#[test]
fn a_target_error_under_stop_pauses_the_job_with_a_failed_io_status_until_resumed() {
    let mut h = Harness::with_src_tgt();
    h.graph.add("bad", MemNode::failing("bad", 4 * MIB));
    h.ok(
        "blockdev-backup",
        with(
            backup("j", "src", "bad"),
            json!({"on-target-error": "stop"}),
        ),
    );
    h.take_events();
    h.step();
    assert_eq!(
        h.take_events(),
        s(&[
            r#"BLOCK_JOB_ERROR {"device":"j","operation":"write","action":"stop"}"#,
            "j paused"
        ])
    );
    let q = h.ok("query-block-jobs", json!({}));
    assert_eq!(
        (q[0]["io-status"].clone(), q[0]["paused"].clone()),
        (json!("failed"), json!(true))
    );
    h.ok("block-job-resume", json!({"device": "j"}));
    h.step();
    let ev = h.take_events();
    assert_eq!(ev[0], "j running");
    assert_eq!(
        ev[1],
        r#"BLOCK_JOB_ERROR {"device":"j","operation":"write","action":"stop"}"#
    );
    h.ok("block-job-cancel", json!({"device": "j", "force": true}));
    h.settle();
    assert_eq!(h.take_events().last().map(String::as_str), Some("j null"));
}

#[test]
fn a_target_error_under_ignore_is_retried_without_failing_the_job() {
    let mut h = Harness::with_src_tgt();
    h.graph.add("bad", MemNode::failing("bad", 4 * MIB));
    h.ok(
        "blockdev-backup",
        with(
            backup("j", "src", "bad"),
            json!({"on-target-error": "ignore"}),
        ),
    );
    h.take_events();
    for _ in 0..3 {
        h.exec.step();
    }
    let ev = h.take_events();
    assert!(ev.len() >= 2, "{ev:?}");
    assert!(ev.iter().all(|e| e == r#"BLOCK_JOB_ERROR {"device":"j","operation":"write","action":"ignore"}"#));
    assert_eq!(h.ok("query-jobs", json!({}))[0]["status"], "running");
    h.ok("job-cancel", json!({"id": "j"}));
    h.settle();
    assert_eq!(h.take_events().last().map(String::as_str), Some("j null"));
}

#[test]
fn blockdev_is_send_for_the_daemons_threads() {
    fn send<T: Send>() {}
    send::<blockdev::Blockdev>();
}

#[test]
fn the_shared_blockdev_answers_the_schemas_commands_and_reports_the_rest_as_not_found() {
    let h = Harness::with_src_tgt();
    let shared = blockdev::SharedBlockdev::new(h.bd);
    let e = shared.execute("x-no-such-command", None).unwrap_err();
    assert_eq!(e.desc, "The command x-no-such-command has not been found");
    assert_eq!(shared.execute("query-jobs", None).unwrap(), json!([]));
}

#[test]
fn drive_backup_records_the_backing_each_sync_mode_needs() {
    let mut h = Harness::new();
    let src = MemNode::new("src", 4 * MIB, 1);
    let src = std::sync::Arc::new(MemNode {
        backing: Some(blockdev::ImageRef {
            filename: "/mem/base.qcow2".into(),
            format: "qcow2".into(),
        }),
        ..std::sync::Arc::into_inner(src).unwrap()
    });
    h.graph.add("src", src);
    for (sync, file) in [
        ("full", "/t/f.qcow2"),
        ("top", "/t/t.qcow2"),
        ("none", "/t/n.qcow2"),
    ] {
        h.ok(
            "drive-backup",
            json!({"job-id": format!("j{sync}"), "device": "src", "target": file, "sync": sync, "speed": 1}),
        );
    }
    let created = h.graph.created.lock().unwrap().clone();
    let backings: Vec<Option<String>> = created
        .iter()
        .map(|(_, _, b)| b.as_ref().map(|b| b.filename.clone()))
        .collect();
    assert_eq!(
        backings,
        [
            None,
            Some("/mem/base.qcow2".into()),
            Some("/mem/src.qcow2".into())
        ]
    );
    assert!(
        created
            .iter()
            .all(|(image, size, _)| image.format == "qcow2" && *size == 4 * MIB)
    );
}

#[test]
fn a_sync_none_backup_copies_nothing_and_runs_until_cancelled() {
    let mut h = Harness::with_src_tgt();
    h.ok(
        "blockdev-backup",
        with(backup("j", "src", "tgt"), json!({"sync": "none"})),
    );
    h.settle();
    assert_eq!(h.ok("query-jobs", json!({}))[0]["status"], "running");
    assert!(h.graph.node("tgt").writes.lock().unwrap().is_empty());
    h.ok("block-job-cancel", json!({"device": "j"}));
    h.settle();
    let ev = h.take_events();
    assert!(
        ev.iter().any(|e| e.starts_with("BLOCK_JOB_CANCELLED")),
        "{ev:?}"
    );
}

#[test]
fn a_sync_top_backup_copies_only_what_the_top_layer_allocates() {
    let mut h = Harness::new();
    let src = MemNode::new("src", 4 * MIB, 0x7);
    let src = std::sync::Arc::new(MemNode {
        allocated: Some(vec![(MIB, 65536), (3 * MIB, 131072)]),
        ..std::sync::Arc::into_inner(src).unwrap()
    });
    h.graph.add("src", src);
    h.graph.add("tgt", MemNode::new("tgt", 4 * MIB, 0));
    h.ok(
        "blockdev-backup",
        with(backup("j", "src", "tgt"), json!({"sync": "top"})),
    );
    h.settle();
    let writes = h.graph.node("tgt").writes.lock().unwrap().clone();
    assert_eq!(writes, [(MIB, 65536), (3 * MIB, 131072)]);
}

/// Issue 10, item 5: at 1 byte/s, a backup copies its first request and then waits out the
/// limit whatever wakes it meanwhile: user pause/resume, the drains of `transaction`s (an
/// empty one, and one refused by a busy target), set-speed to the same speed.
#[test]
fn the_speed_limit_holds_whatever_wakes_the_job() {
    let mut h = Harness::new();
    h.graph.add("src", MemNode::new("src", 16 * MIB, 0xab));
    h.graph.add("tgt", MemNode::new("tgt", 16 * MIB, 0));
    h.graph.add("other", MemNode::new("other", 16 * MIB, 0));
    h.ok(
        "blockdev-backup",
        with(backup("j", "src", "tgt"), json!({"speed": 1})),
    );
    h.step();
    let offset = |h: &mut Harness| h.ok("query-block-jobs", json!({}))[0]["offset"].clone();
    assert_eq!(
        offset(&mut h),
        json!(MIB),
        "the first request goes unlimited"
    );
    for _ in 0..50 {
        h.ok("block-job-pause", json!({"device": "j"}));
        h.step();
        h.ok("block-job-resume", json!({"device": "j"}));
        h.step();
        h.ok("transaction", json!({"actions": []}));
        h.step();
        let refused = h.cmd("blockdev-backup", backup("k", "other", "tgt"));
        assert!(refused.is_err(), "{refused:?} {:?}", h.take_events());
        h.step();
        h.ok("block-job-set-speed", json!({"device": "j", "speed": 1}));
        h.step();
    }
    assert_eq!(offset(&mut h), json!(MIB));
    // The clock, only, ends the delay: a MiB at 1 byte/s.
    h.advance(Duration::from_secs(MIB));
    h.step();
    assert_eq!(offset(&mut h), json!(2 * MIB));
}

#[test]
fn a_backup_whose_target_cannot_be_flushed_fails_instead_of_completing() {
    let mut h = Harness::with_src_tgt();
    h.graph.add(
        "full",
        MemNode::failing_flush("full", 4 * MIB, 1, 28 /* ENOSPC */),
    );
    h.ok("blockdev-backup", backup("j", "src", "full"));
    h.take_events();
    h.settle();
    let ev = h.take_events();
    assert!(
        ev.contains(
            &r#"BLOCK_JOB_ERROR {"device":"j","operation":"write","action":"report"}"#.to_string()
        ),
        "{ev:?}"
    );
    let completed = ev
        .iter()
        .find(|e| e.starts_with("BLOCK_JOB_COMPLETED"))
        .unwrap();
    assert!(
        completed.contains(r#""error":"No space left on device""#),
        "{completed}"
    );
    assert_eq!(ev.last().map(String::as_str), Some("j null"));
}

#[test]
fn a_target_flush_out_of_space_under_enospc_pauses_and_completes_once_resumed() {
    let mut h = Harness::with_src_tgt();
    let full = MemNode::failing_flush("full", 4 * MIB, 1, 28 /* ENOSPC */);
    h.graph.add("full", full.clone());
    h.ok(
        "blockdev-backup",
        with(
            backup("j", "src", "full"),
            json!({"on-target-error": "enospc"}),
        ),
    );
    h.take_events();
    h.settle();
    let ev = h.take_events();
    assert_eq!(
        ev[ev.len() - 2..],
        s(&[
            r#"BLOCK_JOB_ERROR {"device":"j","operation":"write","action":"stop"}"#,
            "j paused"
        ])
    );
    h.ok("block-job-resume", json!({"device": "j"}));
    h.settle();
    let ev = h.take_events();
    assert!(ev.contains(&completed("j", 4 * MIB, 0)), "{ev:?}");
    assert_eq!(
        *full.flushes.lock().unwrap(),
        2,
        "flushed again after the pause"
    );
    assert_eq!(full.bytes(), vec![0xab; 4 * MIB as usize]);
}
