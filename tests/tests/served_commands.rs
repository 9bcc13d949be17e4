//! What blockjobd advertises is what it serves: `query-commands` lists the generated command
//! table, and every command of it is reached with valid arguments in a session that uses
//! them as a client would (jobs run, pause, finish; bitmaps, snapshots, exports come and go)
//! and answers with success. A command added to the schema fails this test until it is
//! exercised here.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// The session: runs commands that must succeed and remembers which were run.
struct Session {
    qmp: Qmp,
    run: BTreeSet<String>,
}

impl Session {
    fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.run.insert(command.to_string());
        match self.qmp.execute(command, arguments.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{command} {arguments}: {e}"),
        }
    }

    fn wait_status(&mut self, id: &str, status: &str) {
        self.qmp.wait_event("JOB_STATUS_CHANGE", WAIT, |d| {
            d["id"] == id && d["status"] == status
        });
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed: install qemu-utils");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qcow2(dir: &Path, name: &str) -> String {
    let path = dir.join(name).to_str().expect("UTF-8 path").to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &path, "4M"]);
    path
}

fn null(name: &str) -> Value {
    json!({"driver": "null-co", "node-name": name, "size": 4 << 20})
}

#[test]
fn every_command_of_the_generated_table_is_served_with_valid_arguments() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = Daemon::spawn(&blockjobd(), dir.path());
    let mut s = Session {
        qmp: daemon.connect(),
        run: BTreeSet::from(["qmp_capabilities".to_string()]),
    };
    let d = dir.path();

    let version = s.ok("query-version", json!({}));
    assert_eq!(version["qemu"]["major"], 10);
    let listed: BTreeSet<String> = s
        .ok("query-commands", json!({}))
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    let table: BTreeSet<String> = qmp_api::COMMANDS
        .iter()
        .map(|c| c.name.to_string())
        .collect();
    assert_eq!(listed, table);
    let schema = s.ok("query-qmp-schema", json!({}));
    assert!(schema.as_array().is_some_and(|a| !a.is_empty()));

    // Nodes and bitmaps.
    for name in ["n1", "n2", "n3", "n4", "n5"] {
        s.ok("blockdev-add", null(name));
    }
    s.ok("blockdev-add", null("gone"));
    s.ok("blockdev-del", json!({"node-name": "gone"}));
    for name in ["b1", "b2"] {
        s.ok(
            "block-dirty-bitmap-add",
            json!({"node": "n1", "name": name}),
        );
    }
    s.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "n1", "name": "b1"}),
    );
    s.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "n1", "name": "b1"}),
    );
    s.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "n1", "name": "b1"}),
    );
    s.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "n1", "target": "b1", "bitmaps": ["b2"]}),
    );
    s.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "n1", "name": "b2"}),
    );
    s.ok(
        "transaction",
        json!({"actions": [{"type": "block-dirty-bitmap-add",
                            "data": {"node": "n1", "name": "b3"}}]}),
    );
    let nodes = s.ok("query-named-block-nodes", json!({"flat": true}));
    assert!(nodes.as_array().is_some_and(|a| a.len() == 5));

    // A backup held back by its speed: the verbs of a running job.
    let slow = |id: &str| {
        json!({"job-id": id, "device": "n1", "target": "n2", "sync": "full", "speed": 1,
               "auto-finalize": false, "auto-dismiss": false})
    };
    s.ok("blockdev-backup", slow("j1"));
    assert_eq!(s.ok("query-jobs", json!({}))[0]["id"], "j1");
    assert_eq!(s.ok("query-block-jobs", json!({}))[0]["device"], "j1");
    s.ok("block-job-set-speed", json!({"device": "j1", "speed": 2}));
    s.ok("block-job-pause", json!({"device": "j1"}));
    s.ok("block-job-resume", json!({"device": "j1"}));
    s.ok("job-pause", json!({"id": "j1"}));
    s.ok("job-resume", json!({"id": "j1"}));
    s.ok("block-job-cancel", json!({"device": "j1", "force": true}));
    s.wait_status("j1", "concluded");
    s.ok("block-job-dismiss", json!({"id": "j1"}));
    s.ok("blockdev-backup", slow("j2"));
    s.ok("job-cancel", json!({"id": "j2"}));
    s.wait_status("j2", "concluded");
    s.ok("job-dismiss", json!({"id": "j2"}));

    // Backups that finish and wait to be finalized.
    let fast = |id: &str| {
        json!({"job-id": id, "device": "n1", "target": "n2", "sync": "full",
               "auto-finalize": false})
    };
    s.ok("blockdev-backup", fast("j3"));
    s.wait_status("j3", "pending");
    s.ok("block-job-finalize", json!({"id": "j3"}));
    s.wait_status("j3", "null");
    s.ok("blockdev-backup", fast("j4"));
    s.wait_status("j4", "pending");
    s.ok("job-finalize", json!({"id": "j4"}));
    s.wait_status("j4", "null");
    let target = d.join("drive.qcow2");
    s.ok(
        "drive-backup",
        json!({"job-id": "j5", "device": "n1", "target": target.to_str(), "format": "qcow2",
               "sync": "full"}),
    );
    s.wait_status("j5", "null");

    // Mirrors, completed both ways.
    for (id, complete) in [("m1", "block-job-complete"), ("m2", "job-complete")] {
        s.ok(
            "blockdev-mirror",
            json!({"job-id": id, "device": "n3", "target": "n4", "sync": "full"}),
        );
        s.wait_status(id, "ready");
        let arguments = if complete == "job-complete" {
            json!({"id": id})
        } else {
            json!({"device": id})
        };
        s.ok(complete, arguments);
        s.wait_status(id, "null");
    }
    let mirror_file = d.join("drive-mirror.qcow2");
    s.ok(
        "drive-mirror",
        json!({"job-id": "m3", "device": "n3", "target": mirror_file.to_str(),
               "format": "qcow2", "node-name": "dm", "sync": "full"}),
    );
    s.wait_status("m3", "ready");
    // Only a mirror's driver has `change` (QSD refuses it for every other job type).
    s.ok(
        "block-job-change",
        json!({"id": "m3", "type": "mirror", "copy-mode": "background"}),
    );
    s.ok("block-job-cancel", json!({"device": "m3"}));
    s.wait_status("m3", "null");

    // Snapshots of qcow2 nodes.
    let file = |path: &str| json!({"driver": "file", "filename": path});
    let base = qcow2(d, "base.qcow2");
    s.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": file(&base)}),
    );
    let top = d.join("top.qcow2");
    s.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "q", "snapshot-file": top.to_str(), "snapshot-node-name": "top",
               "format": "qcow2"}),
    );
    // A stream and a commit of a chain base <- mid <- top, its nodes named.
    let mut backing = Value::Null;
    for layer in ["cb", "cm", "ct"] {
        let path = qcow2(d, &format!("{layer}.qcow2"));
        s.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": layer, "backing": backing,
                   "file": file(&path)}),
        );
        backing = json!(layer);
    }
    s.ok(
        "block-commit",
        json!({"job-id": "c1", "device": "ct", "top-node": "cm", "base-node": "cb"}),
    );
    s.wait_status("c1", "null");
    s.ok("block-stream", json!({"job-id": "s1", "device": "ct"}));
    s.wait_status("s1", "null");
    let overlay = qcow2(d, "overlay.qcow2");
    s.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ov", "backing": null, "file": file(&overlay)}),
    );
    s.ok("blockdev-snapshot", json!({"node": "n5", "overlay": "ov"}));
    let internal = qcow2(d, "internal.qcow2");
    s.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "qi", "file": file(&internal)}),
    );
    s.ok(
        "blockdev-snapshot-internal-sync",
        json!({"device": "qi", "name": "snap0"}),
    );

    // Images created and amended by jobs.
    let created = d.join("created.qcow2");
    s.ok(
        "blockdev-create",
        json!({"job-id": "c1", "options": {"driver": "file", "filename": created.to_str(),
               "size": 0}}),
    );
    s.wait_status("c1", "concluded");
    s.ok("job-dismiss", json!({"id": "c1"}));
    s.ok(
        "blockdev-create",
        json!({"job-id": "c2", "options": {"driver": "qcow2", "file": file(created.to_str().expect("UTF-8")),
               "size": 1 << 20}}),
    );
    s.wait_status("c2", "concluded");
    let jobs = s.ok("query-jobs", json!({}));
    assert!(jobs[0].get("error").is_none(), "{jobs}");
    s.ok("job-dismiss", json!({"id": "c2"}));
    s.ok(
        "x-blockdev-amend",
        json!({"job-id": "a1", "node-name": "qi", "options": {"driver": "qcow2"}}),
    );
    s.wait_status("a1", "concluded");
    s.ok("job-dismiss", json!({"id": "a1"}));

    // Node management and inspection.
    s.ok("block_resize", json!({"node-name": "qi", "size": 8 << 20}));
    s.ok(
        "blockdev-snapshot-delete-internal-sync",
        json!({"device": "qi", "name": "snap0"}),
    );
    s.ok(
        "change-backing-file",
        json!({"device": "ov", "image-node-name": "ov", "backing-file": "renamed"}),
    );
    s.ok(
        "block-set-write-threshold",
        json!({"node-name": "n1", "write-threshold": 1 << 20}),
    );
    s.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "n1", "name": "b1"}),
    );
    s.ok(
        "blockdev-reopen",
        json!({"options": [{"driver": "qcow2", "node-name": "qi",
                            "file": file(&internal), "read-only": true}]}),
    );
    s.ok(
        "blockdev-set-active",
        json!({"node-name": "qi", "active": false}),
    );
    s.ok("blockdev-set-active", json!({"active": true}));
    let graph = s.ok("x-debug-query-block-graph", json!({}));
    assert!(graph["nodes"].as_array().is_some_and(|n| !n.is_empty()));
    let stats = s.ok("query-blockstats", json!({"query-nodes": true}));
    assert!(stats.as_array().is_some_and(|n| !n.is_empty()));

    // An NBD export of a node.
    let socket = d.join("nbd.sock");
    s.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket.to_str()}}}),
    );
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "n1"}),
    );
    assert_eq!(s.ok("query-block-exports", json!({}))[0]["id"], "e1");
    s.ok("block-export-del", json!({"id": "e1"}));
    s.qmp
        .wait_event("BLOCK_EXPORT_DELETED", WAIT, |d| d["id"] == "e1");
    s.ok("nbd-server-add", json!({"device": "n2", "name": "legacy"}));
    s.ok("nbd-server-remove", json!({"name": "legacy"}));
    s.qmp
        .wait_event("BLOCK_EXPORT_DELETED", WAIT, |d| d["id"] == "legacy");
    s.ok("nbd-server-stop", json!({}));

    // Objects, the object tree, a throttle node.
    s.ok("object-add", json!({"qom-type": "iothread", "id": "io0"}));
    s.ok(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 1000}}),
    );
    s.ok(
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "t", "throttle-group": "tg0", "file": "n3"}),
    );
    let props = s.ok("qom-list", json!({"path": "/objects/tg0"}));
    assert!(props.as_array().is_some_and(|p| p.len() == 21));
    s.ok(
        "qom-set",
        json!({"path": "/objects/io0", "property": "poll-max-ns", "value": 0}),
    );
    assert_eq!(
        s.ok("qom-get", json!({"path": "io0", "property": "poll-max-ns"})),
        0
    );
    let types = s.ok("qom-list-types", json!({"implements": "user-creatable"}));
    assert!(types.as_array().is_some_and(|t| t.len() == 3));
    s.ok("qom-list-properties", json!({"typename": "secret"}));
    s.ok("blockdev-del", json!({"node-name": "t"}));
    s.ok("object-del", json!({"id": "tg0"}));
    s.ok("object-del", json!({"id": "io0"}));

    // Chardevs.
    let chardev = d.join("c.sock");
    s.ok(
        "chardev-add",
        json!({"id": "c", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": chardev.to_str()}},
            "server": true, "wait": false}}}),
    );
    s.ok(
        "chardev-add",
        json!({"id": "r", "backend": {"type": "ringbuf", "data": {"size": 8}}}),
    );
    assert_eq!(
        s.ok("query-chardev", json!({})).as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(
        s.ok("query-chardev-backends", json!({}))
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    s.ok("chardev-send-break", json!({"id": "c"}));
    s.ok("ringbuf-write", json!({"device": "r", "data": "abc"}));
    assert_eq!(
        s.ok("ringbuf-read", json!({"device": "r", "size": 8})),
        "abc"
    );
    s.ok(
        "chardev-change",
        json!({"id": "r", "backend": {"type": "null", "data": {}}}),
    );
    s.ok("chardev-remove", json!({"id": "c"}));
    s.ok("chardev-remove", json!({"id": "r"}));
    assert_eq!(s.ok("query-block", json!({})), json!([]));

    s.ok("quit", json!({}));
    let missing: Vec<&String> = table.difference(&s.run).collect();
    assert!(missing.is_empty(), "commands not exercised: {missing:?}");
}
