//! Test helper for crash safety: writes, zeroes, discards and flushes an image at random from
//! one or more threads, printing one line per completed operation, until killed (or after a
//! bounded number of operations).
//!
//! Usage: `qcow2-crash-writer IMAGE SEED [THREADS]`

use std::io::Write;
use std::sync::Mutex;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: qcow2-crash-writer IMAGE SEED [THREADS]");
        std::process::exit(2);
    }
    let seed = args[1].parse::<u64>().unwrap_or(1) | 1;
    let threads = args
        .get(2)
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1)
        .clamp(1, 16);
    let img = match qcow2::Image::open_file(&args[0], false) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("open: {e}");
            std::process::exit(1);
        }
    };
    let size = img.size();
    let out = Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (img, out) = (&img, &out);
            s.spawn(move || {
                let mut state = seed.wrapping_mul(t + 1) | 1;
                for op in 0..10_000u64 {
                    let len = (xorshift(&mut state) % (256 << 10)).max(1);
                    let off = xorshift(&mut state) % (size - len);
                    let r = match xorshift(&mut state) % 10 {
                        0 => img.flush(),
                        1 => img.write_zeroes(off, len),
                        2 => img.discard(off, len),
                        _ => img.write_at(&vec![(op % 251) as u8 | 1; len as usize], off),
                    };
                    if let Err(e) = r {
                        eprintln!("thread {t} operation {op}: {e}");
                        std::process::exit(1);
                    }
                    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                    if writeln!(o, "{t} {op}").and_then(|_| o.flush()).is_err() {
                        std::process::exit(1);
                    }
                }
            });
        }
    });
}
