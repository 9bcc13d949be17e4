//! Random operations checked against a plain in-memory model of the disk, and the result
//! checked by qemu-img: the write path, snapshots and backing files working together.

mod common;
use common::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_writes_zeroes_snapshots_and_reopens_match_a_model() {
    let s = Scratch::in_memory();
    let size: u64 = 8 << 20;
    let base = s.path("base.raw");
    let base_data = pattern(size as usize, 77);
    std::fs::write(&base, &base_data).unwrap();
    for (seed, cluster) in [(1u64, 4096u32), (2, 65536), (3, 512)] {
        let path = s.path(&format!("model{seed}.qcow2"));
        create_file(&path, size, cluster, Some(("base.raw", "raw")));
        let mut rng = Rng(seed * 0x9e37_79b9 + 1);
        let mut model = base_data.clone();
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let mut img = open_rw(&path);
        for op in 0..150u64 {
            let len = 1 + rng.below(300_000);
            let off = rng.below(size - len);
            match rng.below(20) {
                0..=11 => {
                    let data = vec![(op % 250) as u8 + 1; len as usize];
                    img.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                12..=14 => {
                    img.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                15 => {
                    let name = format!("s{op}");
                    img.create_snapshot(&name).unwrap();
                    snaps.push((name, model.clone()));
                }
                16 if !snaps.is_empty() => {
                    let (name, _) = snaps.remove(rng.below(snaps.len() as u64) as usize);
                    img.delete_snapshot(&name).unwrap();
                }
                17 => img.flush().unwrap(),
                18 => {
                    img.close().unwrap();
                    drop(img);
                    img = open_rw(&path);
                }
                _ => {
                    let mut buf = vec![0u8; len as usize];
                    img.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf == model[off as usize..(off + len) as usize],
                        "seed {seed} op {op}: read differs"
                    );
                }
            }
        }
        assert!(our_contents(&img) == model, "seed {seed}: contents differ");
        for (name, expected) in &snaps {
            let mut buf = vec![0u8; size as usize];
            img.read_snapshot(name, &mut buf, 0).unwrap();
            assert!(&buf == expected, "seed {seed}: snapshot {name} differs");
        }
        img.close().unwrap();
        drop(img);
        assert_check_clean(&path);
        let raw = s.path("model.raw");
        std::fs::write(&raw, &model).unwrap();
        let (code, out) = run_status(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", p(&path), p(&raw)],
        );
        assert_eq!(code, 0, "seed {seed}: {out}");
        if let Some((name, expected)) = snaps.first() {
            run("qemu-img", &["snapshot", "-a", name, p(&path)]);
            std::fs::write(&raw, expected).unwrap();
            let (code, out) = run_status(
                "qemu-img",
                &["compare", "-f", "qcow2", "-F", "raw", p(&path), p(&raw)],
            );
            assert_eq!(code, 0, "seed {seed}: after applying {name}: {out}");
            assert_check_clean(&path);
        }
    }
}
