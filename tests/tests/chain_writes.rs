//! Stream and commit (intermediate and active) while a client writes: the guest-visible content
//! afterwards is the chain as it was plus every write made during the job. The client is qemu-io writing through an
//! NBD export of the node the guest uses, in batches, while a speed-limited job copies; the
//! same writes go to a flat copy of the chain made before the job (`qemu-img convert`), and
//! `qemu-img compare` judges. `qemu-img check` must find every image clean.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp, qcow2_node};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
const SIZE_MIB: u64 = 16;

fn tool(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (install qemu-utils)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// base <- mid <- top <- top2 in `dir`, 16 MiB, each layer with data over part of the ones
/// below; added as named nodes.
fn chain(dir: &Path, qmp: &mut Qmp) {
    let layers = [
        ("base", None, "write -P 0x11 0 12M"),
        ("mid", Some("base.qcow2"), "write -P 0x22 4M 6M"),
        ("top", Some("mid.qcow2"), "write -P 0x33 8M 6M"),
        ("top2", Some("top.qcow2"), "write -P 0x44 15M 512k"),
    ];
    for (layer, below, write) in layers {
        let file = format!("{layer}.qcow2");
        let size = format!("{SIZE_MIB}M");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some(b) = below {
            args.extend(["-b", b, "-F", "qcow2"]);
        }
        args.extend([file.as_str(), size.as_str()]);
        tool("qemu-img", &args, dir);
        tool("qemu-io", &["-f", "qcow2", "-c", write, &file], dir);
    }
    let mut backing = Value::Null;
    for (layer, _, _) in layers {
        let file = format!("{layer}.qcow2");
        let mut node = qcow2_node(layer, &dir.join(&file));
        node["backing"] = backing;
        qmp.execute("blockdev-add", node)
            .unwrap_or_else(|e| panic!("blockdev-add {layer}: {e}"));
        backing = json!(layer);
    }
}

/// Batches of qemu-io write commands over the whole image: random 4-64 KiB writes at random
/// sector-aligned offsets, each with its own pattern byte.
fn write_batches(batches: usize, per_batch: usize) -> Vec<Vec<String>> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..batches)
        .map(|b| {
            (0..per_batch)
                .map(|i| {
                    let len = 4096 * (1 + next() % 16);
                    let offset = (next() % (SIZE_MIB * MIB - len)) / 512 * 512;
                    let pattern = 0x50 + ((b * per_batch + i) % 160) as u64;
                    format!("write -P {pattern:#x} {offset} {len}")
                })
                .collect()
        })
        .collect()
}

fn qemu_io_batch(dir: &Path, format: &str, target: &str, batch: &[String]) {
    let mut args = vec!["-f", format];
    for command in batch {
        args.extend(["-c", command.as_str()]);
    }
    args.push(target);
    tool("qemu-io", &args, dir);
}

/// How the job ends, and which image the guest reads afterwards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// It completes by itself; the guest still reads `node`.
    Completes,
    /// An active commit into `base`: it gets READY (more writes then), `block-job-complete`
    /// pivots the export onto the base (more writes then, which reach the base only).
    PivotsOnto(&'static str),
}

/// Runs `job` (a block-stream or block-commit of `node`'s chain, speed-limited) while writing
/// through an NBD export of `node`, then checks the content and the images.
fn job_under_writes(node: &str, job: (&str, Value), end: End) {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let daemon = Daemon::spawn(&blockjobd(), d);
    let mut qmp = daemon.connect();
    chain(d, &mut qmp);
    // The reference: the guest's view as it is now, flat, to which the writes are applied too.
    tool(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "qcow2",
            &format!("{node}.qcow2"),
            "ref.qcow2",
        ],
        d,
    );
    let socket = d.join("nbd.sock");
    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket.to_str()}}}),
    )
    .expect("nbd-server-start");
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": node, "writable": true}),
    )
    .expect("block-export-add");
    let (command, arguments) = job;
    qmp.execute(command, arguments)
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    let uri = format!("nbd+unix:///{node}?socket={}", socket.display());
    for batch in write_batches(8, 40) {
        qemu_io_batch(d, "raw", &uri, &batch);
        qemu_io_batch(d, "qcow2", "ref.qcow2", &batch);
    }
    // The job was still running for the writes (it is speed-limited): let it finish now.
    let jobs = qmp.execute("query-block-jobs", json!({})).expect("query");
    assert_eq!(
        jobs[0]["device"], "j",
        "the job ended before the writes: {jobs}"
    );
    qmp.execute("block-job-set-speed", json!({"device": "j", "speed": 0}))
        .expect("set-speed");
    let mut guest = node.to_string();
    let done = if let End::PivotsOnto(base) = end {
        qmp.wait_event("BLOCK_JOB_READY", WAIT, |e| e["device"] == "j");
        for batch in write_batches(2, 40) {
            qemu_io_batch(d, "raw", &uri, &batch);
            qemu_io_batch(d, "qcow2", "ref.qcow2", &batch);
        }
        qmp.execute("block-job-complete", json!({"device": "j"}))
            .expect("block-job-complete");
        let done = qmp.wait_event("BLOCK_JOB_COMPLETED", WAIT, |e| e["device"] == "j");
        // What the old active layer must still read: everything up to the pivot.
        tool(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-O",
                "qcow2",
                "ref.qcow2",
                "ref-pivot.qcow2",
            ],
            d,
        );
        for batch in write_batches(3, 20).into_iter().skip(2) {
            qemu_io_batch(d, "raw", &uri, &batch);
            qemu_io_batch(d, "qcow2", "ref.qcow2", &batch);
        }
        guest = base.to_string();
        done
    } else {
        qmp.wait_event("BLOCK_JOB_COMPLETED", WAIT, |e| e["device"] == "j")
    };
    assert!(done["data"].get("error").is_none(), "job failed: {done}");
    qmp.execute("block-export-del", json!({"id": "e"}))
        .expect("block-export-del");
    qmp.execute("quit", json!({})).expect("quit");
    let mut daemon = daemon;
    assert!(
        daemon.wait_exit(Duration::from_secs(30)),
        "blockjobd did not quit"
    );
    let mut expected = vec![(guest, "ref.qcow2")];
    if end != End::Completes {
        expected.push((node.to_string(), "ref-pivot.qcow2"));
    }
    for (image, reference) in expected {
        let compare = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(format!("{image}.qcow2"))
            .arg(reference)
            .current_dir(d)
            .output()
            .expect("qemu-img compare");
        assert!(
            compare.status.success(),
            "{image} does not read as {reference} (the chain plus the writes): {}{}",
            String::from_utf8_lossy(&compare.stdout),
            String::from_utf8_lossy(&compare.stderr)
        );
    }
    for image in ["base", "mid", "top", "top2"] {
        tool("qemu-img", &["check", &format!("{image}.qcow2")], d);
    }
}

#[test]
fn a_stream_under_concurrent_writes_keeps_every_write_and_streams_the_rest() {
    // 512 KiB/s: the 16 MiB chain would take half a minute; the writes land while it copies.
    job_under_writes(
        "top2",
        (
            "block-stream",
            json!({"job-id": "j", "device": "top2", "speed": MIB / 2}),
        ),
        End::Completes,
    );
}

#[test]
fn an_intermediate_commit_under_writes_to_the_active_layer_keeps_the_guests_view() {
    job_under_writes(
        "top2",
        (
            "block-commit",
            json!({"job-id": "j", "device": "top2", "top-node": "top", "base-node": "base",
                   "speed": MIB / 2}),
        ),
        End::Completes,
    );
}

#[test]
fn an_active_commit_under_writes_pivots_onto_a_base_holding_the_chain_and_every_write() {
    // The export of top2 follows the pivot onto base: writes after it land in base only, and
    // top2 keeps what it read at the pivot.
    job_under_writes(
        "top2",
        (
            "block-commit",
            json!({"job-id": "j", "device": "top2", "speed": MIB / 2}),
        ),
        End::PivotsOnto("base"),
    );
}
