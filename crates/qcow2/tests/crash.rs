//! A writer killed with SIGKILL at any point leaves an image with leaks at worst.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// `qemu-img check` exit codes: 0 clean, 3 leaked clusters only.
fn assert_no_corruption(path: &std::path::Path, run: usize) {
    let (code, out) = run_status("qemu-img", &["check", p(path)]);
    assert!(
        code == 0 || code == 3,
        "run {run}: qemu-img check found corruption:\n{out}"
    );
}

#[test]
fn killing_a_writer_at_twenty_points_leaves_only_leaked_clusters() {
    let s = Scratch::new();
    for run in 0..20usize {
        let path = s.path(&format!("crash{run}.qcow2"));
        let cluster = [4096u32, 65536, 512][run % 3];
        create_file(&path, 64 << 20, cluster, None);
        let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2-crash-writer"))
            .args([
                p(&path),
                &(run as u64 * 7919 + 1).to_string(),
                &(1 + run % 3).to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill after a varying number of completed operations (from 1 to 3 writer threads),
        // mid-way through the next ones.
        let target = 3 + run * 11;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..target {
            lines.next().unwrap().unwrap();
        }
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        child.wait().unwrap();
        assert_no_corruption(&path, run);
        // The crashed image stays usable.
        let img = open_rw(&path);
        img.write_at(&[5; 70_000], 1_000_000).unwrap();
        img.close().unwrap();
        drop(img);
        assert_no_corruption(&path, run);
        qemu_io(&path, "qcow2", &["read -P 5 1000000 70000"]);
    }
}
