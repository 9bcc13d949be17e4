//! The generic node options (`cache.direct`, `cache.no-flush`, `detect-zeroes`,
//! `auto-read-only`, `force-share`), and backup's `x-perf.use-copy-range`, act as in
//! qemu-storage-daemon 10.0.2: each test runs the
//! same steps against both daemons and compares what can be seen from outside (replies, the
//! image's map and bytes, the daemon's file descriptors, its system calls, image locks), and
//! checks the expected effect so that two daemons ignoring an option alike would not pass.
//!
//! The temp dirs are under `CARGO_TARGET_TMPDIR` (the repository's file system): `O_DIRECT`
//! and immutable files need a disk file system, which `/tmp` may not be.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp};
use blockjobs_tests::require_tool;
use serde_json::{Value, json};

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

/// `value` with `$DIR` in its strings replaced by `dir`.
fn in_dir(value: Value, dir: &Path) -> Value {
    let text = value
        .to_string()
        .replace("$DIR", &dir.display().to_string());
    serde_json::from_str(&text).expect("json")
}

/// A daemon with an NBD server on `dir/nbd.sock`.
fn start(program: &Path, dir: &Path) -> (Daemon, Qmp) {
    let nbd = format!(
        "addr.type=unix,addr.path={}",
        dir.join("nbd.sock").display()
    );
    let daemon = Daemon::spawn_with(program, dir, &["--nbd-server".to_string(), nbd]);
    let qmp = daemon.connect();
    (daemon, qmp)
}

/// The reply as text: `ok` or the error's description (the temp dir written `$DIR`).
fn said(reply: Result<Value, Value>, dir: &Path) -> String {
    match reply {
        Ok(_) => "ok".to_string(),
        Err(e) => e["desc"]
            .as_str()
            .unwrap_or_default()
            .replace(&dir.display().to_string(), "$DIR"),
    }
}

fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
        + &String::from_utf8_lossy(&out.stderr).replace(&dir.display().to_string(), "$DIR")
}

fn qemu_img(args: &[&str], dir: &Path) -> String {
    run("qemu-img", args, dir)
}

/// qemu-io commands on export `name` over the daemon's NBD socket.
fn qemu_io(name: &str, commands: &[&str], dir: &Path) -> String {
    let mut args = vec![
        "-f".to_string(),
        "raw".to_string(),
        format!("nbd+unix:///{name}?socket=nbd.sock"),
    ];
    for c in commands {
        args.push("-c".to_string());
        args.push((*c).to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args, dir)
}

/// The open flags of the daemon's descriptors on `file` (from `/proc/PID/fdinfo`).
fn fd_flags(pid: u32, file: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir") {
        let entry = entry.expect("fd");
        if std::fs::read_link(entry.path()).ok().as_deref() == Some(file) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ))
            .expect("fdinfo");
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .expect("flags");
            out.push(flags);
        }
    }
    out
}

/// The node's `cache` and `detect_zeroes` in `query-named-block-nodes`.
fn node_cache(qmp: &mut Qmp, node: &str) -> Value {
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .expect("nodes");
    let n = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == node)
        .cloned()
        .unwrap_or_default();
    json!({"cache": n["cache"], "detect_zeroes": n["detect_zeroes"], "ro": n["ro"]})
}

/// Runs `scenario` against qemu-storage-daemon and blockjobd, each in a fresh dir; returns
/// (QSD's observations, ours).
fn both(scenario: impl Fn(&Path, &Path) -> Vec<String> + Sync) -> (Vec<String>, Vec<String>) {
    require_tool("qemu-storage-daemon", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let run = |program: PathBuf| {
        let dir = temp_dir();
        scenario(&program, dir.path())
    };
    std::thread::scope(|s| {
        let qsd = s.spawn(|| run(PathBuf::from("qemu-storage-daemon")));
        let ours = s.spawn(|| run(blockjobd()));
        (qsd.join().expect("qsd"), ours.join().expect("ours"))
    })
}

#[test]
fn detect_zeroes_turns_writes_of_zeroes_into_zero_clusters_as_qemu() {
    let (qsd, ours) = both(|program, dir| {
        qemu_img(&["create", "-q", "-f", "qcow2", "on.qcow2", "1M"], dir);
        qemu_img(&["create", "-q", "-f", "qcow2", "unmap.qcow2", "1M"], dir);
        qemu_img(&["create", "-q", "-f", "qcow2", "off.qcow2", "1M"], dir);
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 7 0 256k", "unmap.qcow2"],
            dir,
        );
        let (_daemon, mut qmp) = start(program, dir);
        let mut seen = Vec::new();
        for (node, extra) in [
            ("on", json!({"detect-zeroes": "on"})),
            (
                "unmap",
                json!({"detect-zeroes": "unmap", "discard": "unmap"}),
            ),
            ("off", json!({})),
        ] {
            let mut args = json!({"driver": "qcow2", "node-name": node,
                "file": {"driver": "file", "filename": format!("$DIR/{node}.qcow2")}});
            for (k, v) in extra.as_object().into_iter().flatten() {
                args[k] = v.clone();
            }
            seen.push(said(qmp.execute("blockdev-add", in_dir(args, dir)), dir));
            seen.push(node_cache(&mut qmp, node).to_string());
            let _ = qmp.execute(
                "block-export-add",
                json!({"type": "nbd", "id": node, "node-name": node, "writable": true}),
            );
            qemu_io(
                node,
                &[
                    "write -P 0 0 64k",
                    "write -P 0 64k 4k",
                    "write -P 1 128k 64k",
                    "write -z 192k 64k",
                ],
                dir,
            );
            let _ = qmp.execute("block-export-del", json!({"id": node}));
        }
        let _ = qmp.execute("quit", json!({}));
        // Where clusters land in the file is left out (the allocation order of data and L2
        // tables is not what this test is about, and it splits the map of `off`): `off` is
        // compared by content.
        seen.push(qemu_img(&["compare", "-U", "on.qcow2", "off.qcow2"], dir));
        for node in ["on", "unmap"] {
            let map = qemu_img(
                &["map", "--output=json", "-U", &format!("{node}.qcow2")],
                dir,
            );
            seen.push(
                map.lines()
                    .map(|l| {
                        l.split(", \"offset\"")
                            .next()
                            .unwrap_or(l)
                            .trim_end_matches(['}', ',', ']'])
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
            let check = qemu_img(&["check", "-U", &format!("{node}.qcow2")], dir);
            seen.push(
                check
                    .lines()
                    .map(|l| l.split(", ").next().unwrap_or(l))
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        seen
    });
    assert_eq!(qsd, ours);
    // The effect itself: the first 128 KiB of zeroes are zero clusters with detect-zeroes.
    assert!(
        ours[7].contains(r#""start": 0, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false"#),
        "{}",
        ours[7]
    );
    assert_eq!(ours[6], "Images are identical.\n");
}

#[test]
fn cache_direct_opens_the_file_o_direct_and_serves_unaligned_requests_as_qemu() {
    let (qsd, ours) = both(|program, dir| {
        qemu_img(&["create", "-q", "-f", "raw", "d.raw", "1M"], dir);
        let (daemon, mut qmp) = start(program, dir);
        let mut seen = vec![said(
            qmp.execute(
                "blockdev-add",
                in_dir(
                    json!({"driver": "raw", "node-name": "r", "cache": {"direct": true},
                           "file": {"driver": "file", "node-name": "f",
                                    "filename": "$DIR/d.raw"}}),
                    dir,
                ),
            ),
            dir,
        )];
        // Inherited by the file child.
        seen.push(node_cache(&mut qmp, "r").to_string());
        seen.push(node_cache(&mut qmp, "f").to_string());
        let flags = fd_flags(daemon.pid(), &dir.join("d.raw"));
        seen.push(format!(
            "O_DIRECT on every descriptor: {}",
            !flags.is_empty() && flags.iter().all(|f| f & libc::O_DIRECT as u32 != 0)
        ));
        let _ = qmp.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "r", "node-name": "r", "writable": true}),
        );
        seen.push(
            qemu_io(
                "r",
                &[
                    "write -P 0xab 100 1000",
                    "write -P 0xcd 4000 9000",
                    "write -P 0xef 1047000 1576",
                    "read -P 0xab 100 1000",
                    "read -P 0xcd 4000 9000",
                    "read -P 0 13000 100",
                ],
                dir,
            )
            .lines()
            .filter(|l| !l.contains("ops/sec"))
            .collect::<Vec<_>>()
            .join("\n"),
        );
        let _ = qmp.execute("quit", json!({}));
        let bytes = std::fs::read(dir.join("d.raw")).expect("image");
        seen.push(format!("{} bytes, sha {:x}", bytes.len(), fnv(&bytes)));
        seen
    });
    assert_eq!(qsd, ours);
    assert_eq!(ours[3], "O_DIRECT on every descriptor: true");
    assert!(ours[1].contains(r#""direct":true"#), "{}", ours[1]);
    assert!(ours[2].contains(r#""direct":true"#), "{}", ours[2]);
}

/// FNV-1a of `bytes` (a digest to compare images in a message).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn cache_no_flush_keeps_flushes_from_reaching_the_disk_as_qemu() {
    require_tool("strace", "strace");
    let (qsd, ours) = both(|program, dir| {
        qemu_img(&["create", "-q", "-f", "raw", "a.raw", "1M"], dir);
        qemu_img(&["create", "-q", "-f", "raw", "b.raw", "1M"], dir);
        let (daemon, mut qmp) = start(program, dir);
        let mut seen = Vec::new();
        for (node, no_flush) in [("a", true), ("b", false)] {
            seen.push(said(
                qmp.execute(
                    "blockdev-add",
                    in_dir(
                        json!({"driver": "raw", "node-name": node,
                               "cache": {"no-flush": no_flush},
                               "file": {"driver": "file",
                                        "filename": format!("$DIR/{node}.raw")}}),
                        dir,
                    ),
                ),
                dir,
            ));
            seen.push(node_cache(&mut qmp, node).to_string());
            let _ = qmp.execute(
                "block-export-add",
                json!({"type": "nbd", "id": node, "node-name": node, "writable": true}),
            );
        }
        for node in ["a", "b"] {
            let log = dir.join(format!("strace-{node}"));
            let mut strace = Command::new("strace")
                .args([
                    "-f",
                    "-qq",
                    "-e",
                    "trace=fsync,fdatasync,sync_file_range",
                    "-o",
                ])
                .arg(&log)
                .args(["-p", &daemon.pid().to_string()])
                .stderr(Stdio::null())
                .spawn()
                .expect("strace");
            wait_traced(daemon.pid());
            // The flush's reply leaves after its syncs: they are in the log now.
            qemu_io(node, &["write -P 1 0 4k", "flush"], dir);
            let _ = Command::new("kill")
                .args(["-INT", &strace.id().to_string()])
                .status();
            let _ = strace.wait();
            let calls = std::fs::read_to_string(&log).unwrap_or_default();
            seen.push(format!(
                "{node}: disk syncs during a flush: {}",
                calls.lines().any(|l| l.contains("sync"))
            ));
        }
        let _ = qmp.execute("quit", json!({}));
        seen
    });
    assert_eq!(qsd, ours);
    assert!(ours.contains(&"a: disk syncs during a flush: false".to_string()));
    assert!(ours.contains(&"b: disk syncs during a flush: true".to_string()));
}

/// Waits until every thread of `pid` is traced (strace attached).
fn wait_traced(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .filter_map(Result::ok)
            .all(|t| {
                std::fs::read_to_string(t.path().join("status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
            });
        if all {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn auto_read_only_opens_the_file_read_only_until_a_writer_comes_as_qemu() {
    let (qsd, ours) = both(|program, dir| {
        qemu_img(&["create", "-q", "-f", "raw", "w.raw", "1M"], dir);
        qemu_img(&["create", "-q", "-f", "raw", "locked.raw", "1M"], dir);
        let locked = dir.join("locked.raw");
        make_unwritable(&locked);
        let (daemon, mut qmp) = start(program, dir);
        let mut seen = Vec::new();
        let access = |pid: u32, file: &Path| {
            fd_flags(pid, file)
                .iter()
                .map(|f| (f & libc::O_ACCMODE as u32).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        for (node, file, auto) in [
            ("plain", "locked.raw", false),
            ("auto", "locked.raw", true),
            ("w", "w.raw", true),
        ] {
            seen.push(said(
                qmp.execute(
                    "blockdev-add",
                    in_dir(
                        json!({"driver": "raw", "node-name": node,
                               "file": {"driver": "file", "auto-read-only": auto,
                                        "filename": format!("$DIR/{file}")}}),
                        dir,
                    ),
                ),
                dir,
            ));
        }
        seen.push(node_cache(&mut qmp, "w").to_string());
        seen.push(format!(
            "w before a writer: {}",
            access(daemon.pid(), &dir.join("w.raw"))
        ));
        for node in ["auto", "w"] {
            seen.push(said(
                qmp.execute(
                    "block-export-add",
                    json!({"type": "nbd", "id": node, "node-name": node, "writable": true}),
                ),
                dir,
            ));
        }
        seen.push(format!(
            "w with a writer: {}",
            access(daemon.pid(), &dir.join("w.raw"))
        ));
        let _ = qmp.execute("block-export-del", json!({"id": "w"}));
        let _ = qmp.execute("quit", json!({}));
        make_writable(&locked);
        seen
    });
    assert_eq!(qsd, ours);
    assert!(ours[0].contains("Could not open"), "{}", ours[0]);
    assert_eq!(ours[1], "ok");
    assert_eq!(ours[4], "w before a writer: 0");
    assert!(
        ours[5].contains("Could not open '$DIR/locked.raw'"),
        "{}",
        ours[5]
    );
    assert_eq!(ours[7], "w with a writer: 2");
}

/// Makes `file` unwritable even for root: immutable (root), else mode 0444.
fn make_unwritable(file: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        require_tool("chattr", "e2fsprogs");
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(file)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chattr +i {} failed", file.display());
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    }
}

fn make_writable(file: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let _ = Command::new("chattr").arg("-i").arg(file).status();
    }
}

#[test]
fn force_share_opens_an_image_another_process_writes_as_qemu() {
    let (qsd, ours) = both(|program, dir| {
        qemu_img(&["create", "-q", "-f", "qcow2", "held.qcow2", "1M"], dir);
        // qemu-io holds the image read-write (and unshares writing) while it runs.
        let mut holder = Command::new("qemu-io")
            .args(["-f", "qcow2", "held.qcow2"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let mut stdin = holder.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(holder.stdout.take().expect("stdout"));
        writeln!(stdin, "write -P 5 0 4k").expect("qemu-io command");
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("qemu-io opened the image");
        let (_daemon, mut qmp) = start(program, dir);
        let mut seen = vec![line.trim().to_string()];
        for (node, share) in [("plain", false), ("shared", true)] {
            seen.push(said(
                qmp.execute(
                    "blockdev-add",
                    in_dir(
                        json!({"driver": "qcow2", "node-name": node, "read-only": true,
                               "force-share": share,
                               "file": {"driver": "file", "filename": "$DIR/held.qcow2"}}),
                        dir,
                    ),
                ),
                dir,
            ));
        }
        let _ = qmp.execute("quit", json!({}));
        drop(stdin);
        let _ = holder.wait();
        seen
    });
    assert_eq!(qsd, ours);
    assert!(
        ours[1].contains("Failed to get shared \"write\" lock"),
        "{}",
        ours[1]
    );
    assert_eq!(ours[2], "ok");
}

/// The daemon's `copy_file_range` calls while `during` runs (strace attached first).
fn copy_file_range_calls(pid: u32, log: &Path, during: impl FnOnce()) -> usize {
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=copy_file_range", "-o"])
        .arg(log)
        .args(["-p", &pid.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .expect("strace");
    wait_traced(pid);
    during();
    let _ = Command::new("kill")
        .args(["-INT", &strace.id().to_string()])
        .status();
    let _ = strace.wait();
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("copy_file_range(") && !l.contains("= -1"))
        .count()
}

#[test]
fn use_copy_range_copies_between_raw_files_in_the_kernel_as_qemu() {
    require_tool("strace", "strace");
    let (qsd, ours) = both(|program, dir| {
        qemu_img(&["create", "-q", "-f", "raw", "s.raw", "8M"], dir);
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 7 0 3M",
                "-c",
                "write -P 9 5M 64k",
                "s.raw",
            ],
            dir,
        );
        qemu_img(&["create", "-q", "-f", "raw", "t.raw", "8M"], dir);
        qemu_img(&["convert", "-O", "qcow2", "s.raw", "s.qcow2"], dir);
        qemu_img(&["create", "-q", "-f", "raw", "t2.raw", "8M"], dir);
        let (daemon, mut qmp) = start(program, dir);
        let mut seen = Vec::new();
        for (node, file, fmt) in [
            ("s", "s.raw", "raw"),
            ("t", "t.raw", "raw"),
            ("q", "s.qcow2", "qcow2"),
            ("t2", "t2.raw", "raw"),
        ] {
            seen.push(said(
                qmp.execute(
                    "blockdev-add",
                    in_dir(
                        json!({"driver": fmt, "node-name": node,
                               "file": {"driver": "file", "filename": format!("$DIR/{file}")}}),
                        dir,
                    ),
                ),
                dir,
            ));
        }
        let backup = |qmp: &mut Qmp, job: &str, from: &str, to: &str| {
            let reply = qmp.execute(
                "blockdev-backup",
                json!({"job-id": job, "device": from, "target": to, "sync": "full",
                       "x-perf": {"use-copy-range": true}}),
            );
            let done = qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(30), |d| {
                d["id"] == job && d["status"] == "null"
            });
            format!("{}: {}", said(reply, dir), done["data"]["status"])
        };
        let calls = copy_file_range_calls(daemon.pid(), &dir.join("strace.log"), || {
            seen.push(backup(&mut qmp, "j1", "s", "t"));
        });
        seen.push(format!("raw to raw by the kernel: {}", calls > 0));
        // A qcow2 source: QEMU offloads through its mapping, this block layer copies through
        // memory; both give the same target.
        seen.push(backup(&mut qmp, "j2", "q", "t2"));
        let _ = qmp.execute("quit", json!({}));
        seen.push(qemu_img(&["compare", "-U", "s.raw", "t.raw"], dir));
        seen.push(qemu_img(&["compare", "-U", "s.raw", "t2.raw"], dir));
        seen
    });
    assert_eq!(qsd, ours);
    assert_eq!(ours[5], "raw to raw by the kernel: true");
    assert_eq!(ours[7], "Images are identical.\n");
}

#[test]
fn a_file_below_a_format_defaults_to_discard_unmap_as_qemu() {
    let (qsd, ours) = both(|program, dir| {
        let mut seen = Vec::new();
        for (file, discard) in [
            ("unmap.raw", json!("unmap")),
            ("ignore.raw", json!("ignore")),
        ] {
            qemu_img(&["create", "-q", "-f", "raw", file, "4M"], dir);
            run(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 1 0 4M", file],
                dir,
            );
            let nbd = format!(
                "addr.type=unix,addr.path={}",
                dir.join("nbd.sock").display()
            );
            let daemon = Daemon::spawn_with(
                program,
                dir,
                &[
                    "--blockdev".to_string(),
                    "driver=null-co,node-name=n,size=4194304".to_string(),
                    "--nbd-server".to_string(),
                    nbd,
                ],
            );
            let mut qmp = daemon.connect();
            // The file child is given no discard option: it takes the format's default.
            seen.push(said(
                qmp.execute(
                    "blockdev-add",
                    in_dir(
                        json!({"driver": "raw", "node-name": "r", "discard": discard,
                               "file": {"driver": "file", "filename": format!("$DIR/{file}")}}),
                        dir,
                    ),
                ),
                dir,
            ));
            let _ = qmp.execute(
                "blockdev-backup",
                json!({"job-id": "j", "device": "r", "target": "n", "sync": "full",
                       "discard-source": true}),
            );
            qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(30), |d| {
                d["status"] == "null"
            });
            let _ = qmp.execute("quit", json!({}));
            drop(daemon);
            seen.push(qemu_img(&["map", "-f", "raw", "--output=json", file], dir));
        }
        seen
    });
    assert_eq!(qsd, ours);
    // discard=unmap on the raw node: the copied source's file is punched out.
    assert!(
        ours[1].contains(r#""zero": true, "data": false"#),
        "{}",
        ours[1]
    );
    assert!(
        ours[3].contains(r#""zero": false, "data": true"#),
        "{}",
        ours[3]
    );
}
