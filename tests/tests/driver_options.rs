//! No block-driver option is accepted and ignored (issue 10): each `blockdev-add` below goes to
//! qemu-storage-daemon and to blockjobd. Where QEMU refuses, we refuse with its words; where an
//! option acts here, both accept it; where QEMU accepts what this block layer does not do, we
//! refuse naming the option. What the accepted options do is tested in the block crate
//! (`crates/block/tests/act_or_refuse.rs`).

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

const QSD: &str = "qemu-storage-daemon";

/// What blockjobd must answer, given what qemu-storage-daemon answered.
enum Want {
    /// The same: both accept, or both refuse with the same words.
    Same,
    /// QSD accepts; we refuse, naming the option.
    Refused(&'static str),
}

fn cases(dir: &Path) -> Vec<(Value, Want)> {
    let v3 = dir.join("v3.qcow2");
    let v2 = dir.join("v2.qcow2");
    let big = dir.join("big.qcow2");
    for (path, extra, size) in [
        (&v3, None, "64M"),
        (&v2, Some("compat=0.10"), "64M"),
        (&big, None, "100G"),
    ] {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some(o) = extra {
            cmd.args(["-o", o]);
        }
        let ok = cmd
            .arg(path)
            .arg(size)
            .status()
            .expect("qemu-img (install qemu-utils)")
            .success();
        assert!(ok, "qemu-img create {}", path.display());
    }
    let raw = dir.join("raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let qcow2 = |path: &Path, extra: Value| {
        let mut o = json!({"driver": "qcow2",
            "file": {"driver": "file", "filename": path.to_str().unwrap()}});
        if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        o
    };
    let file = |extra: Value| {
        let mut o = json!({"driver": "file", "filename": raw.to_str().unwrap()});
        if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        o
    };
    let blkdebug = |extra: Value| {
        let mut o = json!({"driver": "blkdebug", "image": {"driver": "null-co"}});
        if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        o
    };
    vec![
        // qcow2's caches: QEMU's arithmetic and words; the sizes act (block crate tests).
        (
            qcow2(
                &v3,
                json!({"cache-size": 1 << 20, "l2-cache-size": 65536, "refcount-cache-size": 65536}),
            ),
            Want::Same,
        ),
        (
            qcow2(&v3, json!({"cache-size": 65536, "l2-cache-size": 131072})),
            Want::Same,
        ),
        (
            qcow2(
                &v3,
                json!({"cache-size": 65536, "refcount-cache-size": 131072}),
            ),
            Want::Same,
        ),
        (qcow2(&v3, json!({"cache-size": 1 << 20})), Want::Same),
        (qcow2(&big, json!({"l2-cache-size": 4 << 20})), Want::Same),
        (
            qcow2(&v3, json!({"refcount-cache-size": 1u64 << 20})),
            Want::Same,
        ),
        (qcow2(&v3, json!({"cache-size": -1})), Want::Same),
        (
            qcow2(
                &v3,
                json!({"refcount-cache-size": 1_099_511_627_776_000u64}),
            ),
            Want::Same,
        ),
        (
            qcow2(&v3, json!({"l2-cache-size": 1_099_511_627_776_000_000u64})),
            Want::Same,
        ),
        (qcow2(&v3, json!({"l2-cache-entry-size": 1000})), Want::Same),
        (
            qcow2(&v3, json!({"l2-cache-entry-size": 131072})),
            Want::Same,
        ),
        (
            qcow2(&v3, json!({"cache-size": 1, "l2-cache-entry-size": 1000})),
            Want::Same,
        ),
        (
            qcow2(&v3, json!({"l2-cache-entry-size": 65536})),
            Want::Same,
        ),
        (
            qcow2(&v3, json!({"l2-cache-entry-size": 4096})),
            Want::Refused("l2-cache-entry-size"),
        ),
        (
            qcow2(&v3, json!({"cache-clean-interval": 4_294_967_296u64})),
            Want::Same,
        ),
        (qcow2(&v3, json!({"cache-clean-interval": -1})), Want::Same),
        (qcow2(&v3, json!({"cache-clean-interval": 0})), Want::Same),
        (qcow2(&v3, json!({"cache-clean-interval": 30})), Want::Same),
        // Lazy refcounts and discards: `false` is what happens here; `true` is refused.
        (
            qcow2(&v2, json!({"lazy-refcounts": true, "read-only": true})),
            Want::Same,
        ),
        (qcow2(&v3, json!({"lazy-refcounts": false})), Want::Same),
        (
            qcow2(&v3, json!({"lazy-refcounts": true})),
            Want::Refused("lazy-refcounts"),
        ),
        (
            qcow2(
                &v3,
                json!({"pass-discard-request": false, "pass-discard-snapshot": false, "pass-discard-other": false, "discard-no-unref": false}),
            ),
            Want::Same,
        ),
        (
            qcow2(&v3, json!({"pass-discard-request": true})),
            Want::Refused("pass-discard-request"),
        ),
        (
            qcow2(&v3, json!({"pass-discard-snapshot": true})),
            Want::Refused("pass-discard-snapshot"),
        ),
        (
            qcow2(&v3, json!({"pass-discard-other": true})),
            Want::Refused("pass-discard-other"),
        ),
        (
            qcow2(&v3, json!({"discard-no-unref": true})),
            Want::Refused("discard-no-unref"),
        ),
        // file: requests run as QEMU's aio=threads runs them.
        (
            file(json!({"aio": "threads", "aio-max-batch": 3})),
            Want::Same,
        ),
        (file(json!({"locking": "off"})), Want::Same),
        (file(json!({"aio": "io_uring"})), Want::Refused("aio")),
        (
            file(json!({"aio": "native", "cache": {"direct": true}})),
            Want::Refused("aio"),
        ),
        // blkdebug: QEMU's checks of the request limits, then no limit but 0.
        (blkdebug(json!({"align": 1000})), Want::Same),
        (blkdebug(json!({"align": -1})), Want::Same),
        (
            blkdebug(json!({"align": 4096, "max-transfer": 1000})),
            Want::Same,
        ),
        (blkdebug(json!({"max-transfer": -5})), Want::Same),
        (
            blkdebug(json!({"opt-write-zero": 8192, "max-write-zero": 4096})),
            Want::Same,
        ),
        (blkdebug(json!({"align": 0, "max-transfer": 0})), Want::Same),
        (blkdebug(json!({"align": 4096})), Want::Refused("align")),
        (
            blkdebug(json!({"max-transfer": 65536})),
            Want::Refused("max-transfer"),
        ),
        (
            blkdebug(json!({"opt-discard": 3})),
            Want::Refused("opt-discard"),
        ),
        (
            blkdebug(json!({"take-child-perms": ["resize"], "unshare-child-perms": ["write"]})),
            Want::Same,
        ),
        (
            blkdebug(json!({"inject-error": [{"event": "none", "immediately": true}]})),
            Want::Same,
        ),
    ]
}

/// `blockdev-add` then, if it worked, `blockdev-del`: the error's text, or `None`.
fn add(qmp: &mut Qmp, n: usize, args: &Value) -> Option<String> {
    let mut args = args.clone();
    args["node-name"] = json!(format!("n{n}"));
    match qmp.execute("blockdev-add", args) {
        Ok(_) => {
            qmp.execute("blockdev-del", json!({"node-name": format!("n{n}")}))
                .unwrap();
            None
        }
        Err(e) => Some(e["desc"].as_str().unwrap_or_default().to_string()),
    }
}

#[test]
fn every_driver_option_acts_as_in_qemu_or_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(dir.path());
    let qsd_dir = tempfile::tempdir().unwrap();
    let reference = Daemon::spawn(Path::new(QSD), qsd_dir.path());
    let mut theirs = reference.connect();
    let ours_dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(&blockjobd(), ours_dir.path());
    let mut ours = daemon.connect();
    for (n, (args, want)) in cases.iter().enumerate() {
        let expected = add(&mut theirs, n, args);
        let got = add(&mut ours, n, args);
        match want {
            Want::Same => assert_eq!(got, expected, "blockdev-add {args}"),
            Want::Refused(option) => {
                assert_eq!(expected, None, "qemu-storage-daemon accepts {args}");
                let text = got.unwrap_or_else(|| panic!("accepted without effect: {args}"));
                assert!(
                    text.contains(&format!("Parameter '{option}' is not supported")),
                    "the refusal of {args} names '{option}': {text}"
                );
            }
        }
    }
}
