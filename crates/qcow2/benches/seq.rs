//! Sequential throughput: write 1 GiB in 1 MiB requests to a new image, then read it back.
//! Run with `cargo bench -p qcow2 --bench seq` (release). Set QCOW2_BENCH_MIB to change the size.

use std::sync::Arc;
use std::time::Instant;

use qcow2::{Image, Storage, create};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::var("QCOW2_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.qcow2");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    create(&file, mib << 20, 65536, None)?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    let img = Image::open(storage, false, None)?;
    let mut buf = vec![0u8; 1 << 20];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    let t = Instant::now();
    for i in 0..mib {
        buf[0] = i as u8;
        img.write_at(&buf, i << 20)?;
    }
    img.flush()?;
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..mib {
        img.read_at(&mut buf, i << 20)?;
        assert_eq!(buf[0], i as u8);
    }
    let r = t.elapsed().as_secs_f64();
    img.close()?;
    let mb = (mib << 20) as f64 / 1e6;
    println!(
        "qcow2 seq write 1MiB requests: {:.0} MB/s ({mib} MiB in {w:.3}s)",
        mb / w
    );
    println!(
        "qcow2 seq read  1MiB requests: {:.0} MB/s ({mib} MiB in {r:.3}s)",
        mb / r
    );
    Ok(())
}
