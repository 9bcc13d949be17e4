//! Data safety end to end, through the daemon beside qemu-storage-daemon (issue 10, items
//! 1-3): backups into damaged qcow2 images, backups onto a nearly full disk (a small tmpfs
//! at many fill levels), and backing chains that loop. Images are made by qemu-img/qemu-io
//! and damaged with a few byte edits, as QEMU's iotests do; `qemu-img check` judges them.

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp, qcow2_node};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const QSD: &str = "qemu-storage-daemon";

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` exit code: 0 clean, 3 leaks only, 2 corruption.
fn check(path: &Path) -> i32 {
    Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(path)
        .output()
        .expect("qemu-img (install qemu-utils)")
        .status
        .code()
        .unwrap_or(-1)
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn source(dir: &Path, size: &str) -> PathBuf {
    let path = dir.join("src.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size],
    );
    run(
        "qemu-io",
        &[
            "-c",
            &format!("write -P 0x11 0 {size}"),
            path.to_str().unwrap(),
        ],
    );
    path
}

/// What a backup of `src` into `tgt` showed: BLOCK_IMAGE_CORRUPTED data (if any) and the
/// BLOCK_JOB_COMPLETED error (if any), then the daemon's answer to opening `tgt` again.
struct Outcome {
    corrupted: Option<Value>,
    error: Option<String>,
    reopen: Result<Value, Value>,
}

fn backup(program: &Path, dir: &Path, src: &Path, tgt: &Path) -> Outcome {
    let (mut daemon, mut qmp): (Daemon, Qmp) = Daemon::spawn_connected(program, dir, &[], None);
    qmp.execute("blockdev-add", qcow2_node("src", src)).unwrap();
    qmp.execute("blockdev-add", qcow2_node("tgt", tgt)).unwrap();
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
    )
    .unwrap();
    let events = qmp.events_until("BLOCK_JOB_COMPLETED", Duration::from_secs(60));
    let corrupted = events
        .iter()
        .find(|e| e["event"] == "BLOCK_IMAGE_CORRUPTED")
        .map(|e| e["data"].clone());
    let done = events.last().cloned().unwrap_or_default();
    qmp.execute("blockdev-del", json!({"node-name": "tgt"}))
        .ok();
    let reopen = qmp.execute("blockdev-add", qcow2_node("again", tgt));
    qmp.send("quit", json!({}));
    let _ = daemon.wait_exit(Duration::from_secs(10));
    Outcome {
        corrupted,
        error: done["data"]["error"].as_str().map(str::to_string),
        reopen,
    }
}

/// A damage: what it does to a fresh image's bytes.
type Damage = fn(&mut Vec<u8>);

/// The damaged images of issue 10 that QSD also meets with BLOCK_IMAGE_CORRUPTED.
const DAMAGES: &[(&str, Damage)] = &[
    ("an L2 entry pointing at the L1 table", |b| {
        let l1 = be64(b, 40);
        let l2 = be64(b, l1) & 0x00ff_ffff_ffff_fe00;
        b[l2 as usize..l2 as usize + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    }),
    ("an L2 entry pointing at the refcount table", |b| {
        let (l1, rt) = (be64(b, 40), be64(b, 48));
        let l2 = be64(b, l1) & 0x00ff_ffff_ffff_fe00;
        b[l2 as usize..l2 as usize + 8].copy_from_slice(&(rt | 1 << 63).to_be_bytes());
    }),
    ("a zeroed refcount table entry", |b| {
        let rt = be64(b, 48) as usize;
        b[rt..rt + 8].fill(0);
    }),
];

#[test]
fn backups_into_damaged_images_are_refused_like_qemu_storage_daemon_refuses_them() {
    for (what, damage) in DAMAGES {
        let mut seen = Vec::new();
        for program in [blockjobd(), PathBuf::from(QSD)] {
            let dir = tempfile::tempdir().unwrap();
            let src = source(dir.path(), "1M");
            let tgt = dir.path().join("tgt.qcow2");
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", tgt.to_str().unwrap(), "1M"],
            );
            run(
                "qemu-io",
                &["-c", "write -P 0x22 0 64k", tgt.to_str().unwrap()],
            );
            let mut bytes = std::fs::read(&tgt).unwrap();
            damage(&mut bytes);
            std::fs::write(&tgt, &bytes).unwrap();
            let outcome = backup(&program, dir.path(), &src, &tgt);
            let after = std::fs::read(&tgt).unwrap();
            // The header (but its corrupt bit), L1 and refcount tables are as they were.
            let (l1, rt) = (be64(&bytes, 40) as usize, be64(&bytes, 48) as usize);
            let mut header = bytes[..512].to_vec();
            header[79] |= 2;
            if program == blockjobd() {
                assert_eq!(after[..512], header[..], "{what}: header");
                assert_eq!(after[l1..l1 + 8], bytes[l1..l1 + 8], "{what}: L1 table");
                assert_eq!(
                    after[rt..rt + 8],
                    bytes[rt..rt + 8],
                    "{what}: refcount table"
                );
            }
            assert!(
                after[79] & 2 != 0,
                "{what}: {}: not marked corrupt",
                program.display()
            );
            seen.push((outcome.corrupted, outcome.error, outcome.reopen));
        }
        assert!(seen[0].0.is_some(), "{what}: no BLOCK_IMAGE_CORRUPTED");
        assert_eq!(seen[0].1.as_deref(), Some("Input/output error"), "{what}");
        assert_eq!(
            seen[0].2,
            Err(json!({"class": "GenericError",
                "desc": "qcow2: Image is corrupt; cannot be opened read/write"})),
            "{what}"
        );
        assert_eq!(seen[0], seen[1], "{what}: ours, then qemu-storage-daemon's");
    }
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount (util-linux)");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the file system until `free` bytes are left.
    fn leave_free(&self, free: u64) {
        let _ = std::fs::remove_file(self.path().join("fill"));
        let stat = nix_statvfs(self.path());
        let fill = stat.saturating_sub(free);
        let f = std::fs::File::create(self.path().join("fill")).unwrap();
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        let block = vec![0xffu8; 4096];
        let mut left = fill;
        while left > 0 {
            let n = left.min(4096) as usize;
            if w.write_all(&block[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = w.flush();
    }
}

/// Bytes free on the file system at `path` (`df`'s available column).
fn nix_statvfs(path: &Path) -> u64 {
    let out = run("df", &["-B1", "--output=avail", path.to_str().unwrap()]);
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// A backup of 4 MiB onto a tmpfs with `free` bytes left: (succeeded, error, quit exit code,
/// qemu-img check exit code, same as the source).
fn backup_onto_full_disk(
    program: &Path,
    disk: &Tmpfs,
    src: &Path,
    free: u64,
) -> (bool, Option<String>, Option<i32>, i32, bool) {
    let tgt = disk.path().join("tgt.qcow2");
    let _ = std::fs::remove_file(&tgt);
    let _ = std::fs::remove_file(disk.path().join("fill"));
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", tgt.to_str().unwrap(), "4M"],
    );
    disk.leave_free(free);
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("stderr");
    // Started beside qemu-storage-daemon ~38 times each: QSD's known start-up failure
    // (Daemon::spawn_connected) restarts that QSD run.
    let (mut daemon, mut qmp) = Daemon::spawn_connected(program, work.path(), &[], Some(&log));
    qmp.execute("blockdev-add", qcow2_node("src", src)).unwrap();
    qmp.execute("blockdev-add", qcow2_node("tgt", &tgt))
        .unwrap();
    qmp.execute(
        "blockdev-backup",
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
    )
    .unwrap();
    let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |_| true);
    qmp.send("quit", json!({}));
    let code = daemon.wait_exit_code(Duration::from_secs(10));
    let stderr = std::fs::read_to_string(work.path().join("stderr")).unwrap_or_default();
    let _ = std::fs::remove_file(disk.path().join("fill"));
    let error = done["data"]["error"].as_str().map(str::to_string);
    assert!(
        !stderr.contains("closing images"),
        "{}: {stderr}",
        program.display()
    );
    let same = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(src)
        .arg(&tgt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    (error.is_none(), error, code, check(&tgt), same)
}

#[test]
fn a_backup_onto_a_nearly_full_disk_fails_its_job_or_succeeds_whole_at_every_fill_level() {
    let disk = Tmpfs::mount("8M");
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "4M");
    let mut table = Vec::new();
    // From too little room for the data to enough for data and metadata, in 16 KiB steps
    // (a qcow2 cluster of 64 KiB spans four of them).
    for free in (3900..4500).step_by(16).map(|k| k * 1024) {
        let ours = backup_onto_full_disk(&blockjobd(), &disk, &src, free);
        let theirs = backup_onto_full_disk(Path::new(QSD), &disk, &src, free);
        let (ok, error, code, checked, same) = ours.clone();
        assert_eq!(code, Some(0), "free {free}: quit");
        assert!(
            matches!(checked, 0 | 3),
            "free {free}: qemu-img check exit {checked}"
        );
        if ok {
            assert!(
                same,
                "free {free}: the job succeeded but the target differs"
            );
        } else {
            assert_eq!(
                error.as_deref(),
                Some("No space left on device"),
                "free {free}"
            );
        }
        table.push((free, ours.0, theirs.0));
    }
    for (free, ours, theirs) in &table {
        eprintln!(
            "free {:>4} KiB: blockjobd {}, qemu-storage-daemon {}",
            free / 1024,
            if *ours { "succeeded" } else { "failed" },
            if *theirs { "succeeded" } else { "failed" }
        );
    }
    // Both fail with too little room and succeed with enough; the levels where the two
    // daemons disagree are few and next to the boundary (allocation orders differ a little).
    assert!(!table[0].1 && !table[0].2, "{table:?}");
    assert!(table.last().is_some_and(|t| t.1 && t.2), "{table:?}");
    let disagree = table.iter().filter(|t| t.1 != t.2).count();
    assert!(
        disagree <= 8,
        "ours and QSD's outcomes differ at {disagree} levels: {table:?}"
    );
}

fn open_error(program: &Path, path: &Path, read_only: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, mut qmp) = Daemon::spawn_connected(program, dir.path(), &[], None);
    let mut node = qcow2_node("top", path);
    node["read-only"] = json!(read_only);
    let e = qmp
        .execute("blockdev-add", node)
        .expect_err("a looping chain opens");
    qmp.send("quit", json!({}));
    daemon.wait_exit(Duration::from_secs(10));
    e["desc"].as_str().unwrap_or_default().to_string()
}

#[test]
fn backing_chains_that_loop_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let (b, c) = (dir.path().join("b.qcow2"), dir.path().join("c.qcow2"));
    for p in [&a, &b, &c] {
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1M"],
        );
    }
    let rebase = |img: &Path, backing: &str| {
        run(
            "qemu-img",
            &[
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                backing,
                img.to_str().unwrap(),
            ],
        );
    };
    rebase(&a, "a.qcow2");
    rebase(&b, "c.qcow2");
    rebase(&c, "b.qcow2");
    let self_loop = format!(
        "Could not open backing file: Backing file '{}' creates an infinite loop",
        a.display()
    );
    // qemu-storage-daemon opens a read-only loop forever (thousands of descriptors, no
    // answer): only ours is asked. Read-write, QSD's image locks stop it; we name the loop.
    assert_eq!(open_error(&blockjobd(), &a, true), self_loop);
    assert_eq!(open_error(&blockjobd(), &a, false), self_loop);
    assert_eq!(
        open_error(&blockjobd(), &b, true),
        format!(
            "Could not open backing file: Could not open backing file: Backing file '{}' \
             creates an infinite loop",
            b.display()
        )
    );
    assert!(open_error(Path::new(QSD), &a, false).contains("lock"));
}
