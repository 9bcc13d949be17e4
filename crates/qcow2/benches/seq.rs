//! Sequential throughput: write 1 GiB in 1 MiB requests to a new image, read it back, write
//! another new image from 4 threads at once (like a block job with 4 requests in flight), and
//! one in 64 KiB requests. Buffers are page-aligned, as a block layer's are (the kernel copies
//! from unaligned memory several times slower).
//! Run with `cargo bench -p qcow2 --bench seq` (release). QCOW2_BENCH_MIB sets the size,
//! QCOW2_BENCH_DIR the directory (default: the system temp dir).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::sync::Arc;
use std::time::Instant;

use qcow2::{Image, Storage, create};

/// A page-aligned buffer.
struct Buffer(*mut u8, usize);

impl Buffer {
    fn new(len: usize) -> Buffer {
        let p = unsafe { alloc_zeroed(Layout::from_size_align(len, 4096).expect("layout")) };
        assert!(!p.is_null());
        Buffer(p, len)
    }
    fn get(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
    fn view(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.0, self.1) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        unsafe {
            dealloc(
                self.0,
                Layout::from_size_align(self.1, 4096).expect("layout"),
            )
        }
    }
}

unsafe impl Sync for Buffer {}

fn new_image(
    dir: &std::path::Path,
    name: &str,
    mib: u64,
) -> Result<Image, Box<dyn std::error::Error>> {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    create(&file, mib << 20, 65536, None)?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    Ok(Image::open(storage, false, None)?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::var("QCOW2_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = match std::env::var("QCOW2_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d)?,
        Err(_) => tempfile::tempdir()?,
    };
    let mb = (mib << 20) as f64 / 1e6;
    let mut buf = Buffer::new(1 << 20);
    for (i, b) in buf.get().iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }

    let img = new_image(dir.path(), "seq.qcow2", mib)?;
    let t = Instant::now();
    for i in 0..mib {
        buf.get()[0] = i as u8;
        img.write_at(buf.view(), i << 20)?;
    }
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    img.flush()?;
    let f = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..mib {
        img.read_at(buf.get(), i << 20)?;
        assert_eq!(buf.get()[0], i as u8);
    }
    let r = t.elapsed().as_secs_f64();
    img.close()?;
    drop(img);
    std::fs::remove_file(dir.path().join("seq.qcow2"))?;

    let img = new_image(dir.path(), "par.qcow2", mib)?;
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..4u64 {
            let (img, buf) = (&img, &buf);
            s.spawn(move || {
                for i in (th..mib).step_by(4) {
                    img.write_at(buf.view(), i << 20).expect("write");
                }
            });
        }
    });
    let p = t.elapsed().as_secs_f64();
    img.close()?;
    drop(img);
    std::fs::remove_file(dir.path().join("par.qcow2"))?;

    let img = new_image(dir.path(), "small.qcow2", mib)?;
    let t = Instant::now();
    for i in 0..mib * 16 {
        img.write_at(&buf.view()[..65536], i << 16)?;
    }
    img.flush()?;
    let k = t.elapsed().as_secs_f64();
    img.close()?;
    drop(img);
    std::fs::remove_file(dir.path().join("small.qcow2"))?;

    println!(
        "qcow2 seq write, 1 MiB requests:          {:.0} MB/s ({mib} MiB in {w:.3}s)",
        mb / w
    );
    println!("qcow2 flush after writing (incl. fsync):  {f:.3}s");
    println!(
        "qcow2 seq read, 1 MiB requests:           {:.0} MB/s ({mib} MiB in {r:.3}s)",
        mb / r
    );
    println!(
        "qcow2 write, 1 MiB requests, 4 threads:   {:.0} MB/s ({mib} MiB in {p:.3}s)",
        mb / p
    );
    println!(
        "qcow2 seq write, 64 KiB requests (+flush): {:.0} MB/s ({mib} MiB in {k:.3}s)",
        mb / k
    );
    Ok(())
}
