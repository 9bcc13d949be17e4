//! Our NBD server, the ecosystem's clients: every tool's view of blockjobd's export of an image
//! is compared with its view of qemu-storage-daemon's export of the same image, set up by the
//! same QMP commands, live in the same test. Tools: `qemu-img` and `qemu-io` (QEMU), `nbdinfo`
//! and `nbdcopy` (libnbd-bin), over `nbd+unix://` and `nbd://127.0.0.1`.
//!
//! The image: a qcow2 overlay over a qcow2 base (data from both layers, a zero cluster, holes),
//! written through a writable export so that bitmap `b0` records exactly those writes, then
//! exported read-only as `r` with `bitmaps: [b0]`, `allocation-depth` and a description.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use blockjobs_tests::blockjobd;
use blockjobs_tests::qmp::{Daemon, Qmp, qcow2_node};
use serde_json::json;

/// Runs a tool to completion; a missing tool fails the test with what to install.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                let package = match program {
                    "nbdinfo" | "nbdcopy" => "libnbd-bin",
                    _ => "qemu-utils",
                };
                panic!("{program} is missing: install it with `apt-get install {package}`")
            }
            _ => panic!("{program}: {e}"),
        })
}

/// A tool's standard output; the test fails if the tool fails.
fn stdout_of(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A free TCP port on loopback (bound, then released for the daemon to take).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// The shared image: base (1 MiB of data) under top (1 MiB of data over it, one zero cluster),
/// 4 MiB. Returns the overlay's path; each daemon gets its own copy of both.
fn make_image(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let (base_s, top_s) = (base.to_str().unwrap(), top.to_str().unwrap());
    stdout_of("qemu-img", &["create", "-q", "-f", "qcow2", base_s, "4M"]);
    stdout_of("qemu-io", &["-c", "write -P 1 0 1M", base_s]);
    stdout_of(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", base_s, "-F", "qcow2", top_s,
        ],
    );
    stdout_of(
        "qemu-io",
        &["-c", "write -P 2 512k 1M", "-c", "write -z 3M 64k", top_s],
    );
    top
}

/// One daemon exporting its copy of the image: `w` (writable, used to dirty `b0`) and `r`.
struct Served {
    _daemon: Daemon,
    qmp: Qmp,
    dir: PathBuf,
    /// `nbd+unix:///?socket=…` without the export name, and the TCP equivalent.
    unix_base: String,
    tcp_base: String,
    /// The daemon's own copy of the overlay.
    image: PathBuf,
}

impl Served {
    fn start(program: &Path, tag: &str, root: &Path, template: &Path) -> Served {
        let dir = root.join(tag);
        std::fs::create_dir_all(&dir).expect("daemon dir");
        // Copies keep the relative backing file name, so each overlay finds its own base.
        for file in ["base.qcow2", "top.qcow2"] {
            std::fs::copy(template.with_file_name(file), dir.join(file)).expect("copy image");
        }
        let image = dir.join("top.qcow2");
        let daemon = Daemon::spawn(program, &dir);
        let mut qmp = daemon.connect();
        let port = free_port();
        let sock = dir.join("nbd.sock");
        qmp.execute("blockdev-add", qcow2_node("top", &image))
            .expect("blockdev-add");
        qmp.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
        )
        .expect("nbd-server-start");
        Served {
            _daemon: daemon,
            qmp,
            dir,
            unix_base: format!("nbd+unix:///{{}}?socket={}", sock.display()),
            tcp_base: format!("nbd://127.0.0.1:{port}/{{}}"),
            image,
        }
    }

    fn unix(&self, export: &str) -> String {
        self.unix_base.replace("{}", export)
    }

    fn tcp(&self, export: &str) -> String {
        self.tcp_base.replace("{}", export)
    }

    /// Writes through a writable export with `b0` recording, then exports `r` read-only with
    /// the (now disabled) bitmap and the allocation depth.
    fn set_up_exports(&mut self) {
        let qmp = &mut self.qmp;
        qmp.execute(
            "block-dirty-bitmap-add",
            json!({"node": "top", "name": "b0", "granularity": 65536}),
        )
        .expect("bitmap add");
        qmp.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "w", "node-name": "top", "writable": true, "name": "w"}),
        )
        .expect("writable export");
        let uri = self.unix_base.replace("{}", "w");
        stdout_of(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 3 100k 8k",
                "-c",
                "write -P 3 2M 128k",
                &uri,
            ],
        );
        let qmp = &mut self.qmp;
        // qemu-io has gone, but the server may not have seen it yet: hard mode does not race.
        qmp.execute("block-export-del", json!({"id": "w", "mode": "hard"}))
            .expect("export del");
        qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10), |data| {
            data["id"] == "w"
        });
        qmp.execute(
            "block-dirty-bitmap-disable",
            json!({"node": "top", "name": "b0"}),
        )
        .expect("bitmap disable");
        qmp.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "r", "node-name": "top", "name": "r",
                   "bitmaps": ["b0"], "allocation-depth": true, "description": "the disk"}),
        )
        .expect("read-only export with bitmap");
    }

    /// Replaces this daemon's socket path and port in a tool's output.
    fn normalise(&self, text: &str) -> String {
        let port = self
            .tcp_base
            .trim_start_matches("nbd://127.0.0.1:")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        text.replace(self.dir.to_str().unwrap(), "DIR")
            .replace(&format!(":{port}/"), ":PORT/")
    }
}

/// blockjobd and qemu-storage-daemon, each serving its own copy of the same image.
struct Pair {
    _root: tempfile::TempDir,
    ours: Served,
    reference: Served,
}

impl Pair {
    fn start() -> Pair {
        let root = tempfile::tempdir().expect("temp dir");
        let template = make_image(root.path());
        let mut ours = Served::start(&blockjobd(), "ours", root.path(), &template);
        let mut reference = Served::start(
            Path::new("qemu-storage-daemon"),
            "reference",
            root.path(),
            &template,
        );
        ours.set_up_exports();
        reference.set_up_exports();
        Pair {
            _root: root,
            ours,
            reference,
        }
    }

    /// Like [`Pair::start`], with each daemon's NBD server on a loopback TCP port instead.
    fn start_tcp() -> Pair {
        let root = tempfile::tempdir().expect("temp dir");
        let template = make_image(root.path());
        let mut pair = Vec::new();
        for (program, tag) in [
            (blockjobd(), "ours"),
            (PathBuf::from("qemu-storage-daemon"), "reference"),
        ] {
            let mut served = Served::start(&program, tag, root.path(), &template);
            served
                .qmp
                .execute("nbd-server-stop", json!({}))
                .expect("nbd-server-stop");
            let port = served
                .tcp_base
                .trim_start_matches("nbd://127.0.0.1:")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            served
                .qmp
                .execute(
                    "nbd-server-start",
                    json!({"addr": {"type": "inet",
                                    "data": {"host": "127.0.0.1", "port": port}}}),
                )
                .expect("nbd-server-start on TCP");
            served.unix_base = served.tcp_base.clone();
            served.set_up_exports();
            pair.push(served);
        }
        let reference = pair.pop().expect("reference");
        let ours = pair.pop().expect("ours");
        Pair {
            _root: root,
            ours,
            reference,
        }
    }

    /// Runs `program` with `args(served)` against both and asserts equal normalised output.
    fn same_output(&self, program: &str, args: impl Fn(&Served) -> Vec<String>) -> String {
        let view = |served: &Served| {
            let args = args(served);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            served.normalise(&stdout_of(program, &args))
        };
        let (ours, reference) = (view(&self.ours), view(&self.reference));
        assert_eq!(
            ours, reference,
            "{program}: blockjobd (left) and qemu-storage-daemon (right) differ"
        );
        ours
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn nbdinfo_list_json_matches_qemu_storage_daemon() {
    let pair = Pair::start();
    let listing = pair.same_output("nbdinfo", |s| {
        strings(&["--list", "--json", &s.unix("").replace("/?", "?")])
    });
    for needle in [
        "\"export-name\": \"r\"",
        "\"description\": \"the disk\"",
        "\"qemu:allocation-depth\"",
        "\"qemu:dirty-bitmap:b0\"",
        "\"can_multi_conn\": true",
    ] {
        assert!(listing.contains(needle), "{needle} not in {listing}");
    }
}

#[test]
fn nbdinfo_map_of_base_allocation_matches_qemu_storage_daemon() {
    let pair = Pair::start();
    let map = pair.same_output("nbdinfo", |s| {
        strings(&["--map=base:allocation", &s.unix("r")])
    });
    assert!(map.contains("hole,zero"), "{map}");
}

#[test]
fn nbdinfo_map_of_the_dirty_bitmap_matches_qemu_storage_daemon() {
    let pair = Pair::start();
    let map = pair.same_output("nbdinfo", |s| {
        strings(&["--map=qemu:dirty-bitmap:b0", &s.unix("r")])
    });
    // Exactly the two writes, at the bitmap's 64 KiB granularity.
    assert!(map.contains("65536       65536    1  dirty"), "{map}");
    assert!(map.contains("2097152      131072    1  dirty"), "{map}");
}

#[test]
fn nbdinfo_map_of_the_allocation_depth_matches_qemu_storage_daemon() {
    let pair = Pair::start();
    let map = pair.same_output("nbdinfo", |s| {
        strings(&["--map=qemu:allocation-depth", &s.unix("r")])
    });
    for kind in ["local", "backing depth 2", "absent"] {
        assert!(map.contains(kind), "{kind} not in {map}");
    }
}

#[test]
fn nbdinfo_totals_match_qemu_storage_daemon() {
    let pair = Pair::start();
    pair.same_output("nbdinfo", |s| strings(&["--map", "--totals", &s.unix("r")]));
}

#[test]
fn qemu_img_info_and_map_match_qemu_storage_daemon_over_unix() {
    let pair = Pair::start();
    pair.same_output("qemu-img", |s| {
        strings(&["info", "--output=json", "-f", "raw", &s.unix("r")])
    });
    let map = pair.same_output("qemu-img", |s| {
        strings(&["map", "--output=json", "-f", "raw", &s.unix("r")])
    });
    assert!(map.contains("\"zero\": true"), "{map}");
}

#[test]
fn qemu_img_info_and_map_match_qemu_storage_daemon_over_tcp() {
    let pair = Pair::start_tcp();
    pair.same_output("qemu-img", |s| {
        strings(&["info", "--output=json", "-f", "raw", &s.tcp("r")])
    });
    pair.same_output("qemu-img", |s| {
        strings(&["map", "--output=json", "-f", "raw", &s.tcp("r")])
    });
    pair.same_output("nbdinfo", |s| {
        strings(&["--map=qemu:dirty-bitmap:b0", &s.tcp("r")])
    });
}

#[test]
fn qemu_img_compare_finds_each_export_equal_to_its_image_and_to_the_other() {
    let pair = Pair::start();
    for served in [&pair.ours, &pair.reference] {
        let image = served.image.to_str().unwrap();
        // The daemons hold their images: compare with a share-rw read of the file.
        let file = format!(
            "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{image}\",\"locking\":\"off\"}}}}"
        );
        stdout_of(
            "qemu-img",
            &["compare", "-f", "raw", &served.unix("r"), &file],
        );
    }
    stdout_of(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &pair.ours.unix("r"),
            &pair.reference.unix("r"),
        ],
    );
}

#[test]
fn qemu_img_convert_over_tcp_and_nbdcopy_over_unix_pull_the_same_bytes() {
    let pair = Pair::start_tcp();
    let out = pair.ours.dir.join("pulled");
    std::fs::create_dir_all(&out).expect("out dir");
    let mut pulled = Vec::new();
    for (tag, served) in [("ours", &pair.ours), ("reference", &pair.reference)] {
        let converted = out.join(format!("{tag}-convert.qcow2"));
        stdout_of(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                &served.tcp("r"),
                converted.to_str().unwrap(),
            ],
        );
        let copied = out.join(format!("{tag}-nbdcopy.raw"));
        stdout_of("nbdcopy", &[&served.tcp("r"), copied.to_str().unwrap()]);
        pulled.push(converted);
        pulled.push(copied);
    }
    let first = pulled[0].to_str().unwrap().to_string();
    for other in &pulled[1..] {
        stdout_of("qemu-img", &["compare", &first, other.to_str().unwrap()]);
    }
    // The copies equal the image itself (through its backing file).
    let image = pair.reference.image.to_str().unwrap();
    let file = format!(
        "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{image}\",\"locking\":\"off\"}}}}"
    );
    stdout_of("qemu-img", &["compare", &first, &file]);
}

#[test]
fn qemu_io_reads_the_same_patterns_from_both_over_unix_and_tcp() {
    let unix = Pair::start();
    let tcp = Pair::start_tcp();
    let reads = [
        "read -P 1 0 64k",
        "read -P 3 100k 8k",
        "read -P 2 512k 1M",
        "read -P 3 2M 128k",
        "read -P 0 3M 64k",
        "read -P 0 1536k 512k",
    ];
    for uri in [
        unix.ours.unix("r"),
        unix.reference.unix("r"),
        tcp.ours.tcp("r"),
        tcp.reference.tcp("r"),
    ] {
        let mut args = vec!["-r", "-f", "raw"];
        for read in &reads {
            args.extend(["-c", read]);
        }
        args.push(&uri);
        let output = stdout_of("qemu-io", &args);
        assert!(!output.contains("failed"), "{uri}: {output}");
        assert_eq!(output.matches("read ").count(), reads.len(), "{output}");
    }
}

#[test]
fn nbdcopy_pulls_a_whole_export_equal_to_qemu_storage_daemons() {
    let pair = Pair::start();
    let mut copies = Vec::new();
    for (tag, served) in [("ours", &pair.ours), ("reference", &pair.reference)] {
        let copy = served.dir.join(format!("{tag}.raw"));
        stdout_of("nbdcopy", &[&served.unix("r"), copy.to_str().unwrap()]);
        copies.push(std::fs::read(&copy).expect("read the copy"));
    }
    assert_eq!(copies[0].len(), 4 << 20);
    assert!(copies[0] == copies[1], "the pulled images differ");
}

#[test]
fn hostile_nbd_clients_neither_crash_blockjobd_nor_stall_its_exports() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let root = tempfile::tempdir().expect("temp dir");
    let template = make_image(root.path());
    let mut ours = Served::start(&blockjobd(), "ours", root.path(), &template);
    ours.set_up_exports();
    let socket = ours.dir.join("nbd.sock");
    let hostile: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\n\r\n",
        // Fixed newstyle, then an option claiming 4 GiB of data.
        &[
            0, 0, 0, 3, b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 3, 255, 255, 255,
            255,
        ],
        // Unknown client flags.
        &[255, 255, 255, 255],
        // Half an option header, then a hang-up.
        &[0, 0, 0, 3, b'I', b'H', b'A'],
    ];
    for bytes in hostile {
        let mut stream = UnixStream::connect(&socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).expect("greeting");
        stream.write_all(bytes).expect("send");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        // The server closes the connection (an error reply may come first; unread bytes
        // make the close a reset), well within the read timeout.
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("not closed by the server: {e}"),
        }
    }
    ours.qmp
        .execute("query-version", json!({}))
        .expect("the daemon still answers");
    let map = stdout_of("nbdinfo", &["--map=qemu:dirty-bitmap:b0", &ours.unix("r")]);
    assert!(map.contains("dirty"), "{map}");
}
