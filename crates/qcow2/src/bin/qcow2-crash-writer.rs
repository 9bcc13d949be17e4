//! Test helper for crash safety: writes, zeroes, discards and flushes an image at random and
//! prints one line per operation, until killed (or after a bounded number of operations).
//!
//! Usage: qcow2-crash-writer IMAGE SEED

use std::io::Write;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(seed)) = (args.next(), args.next()) else {
        eprintln!("usage: qcow2-crash-writer IMAGE SEED");
        std::process::exit(2);
    };
    let mut state: u64 = seed.parse::<u64>().unwrap_or(1) | 1;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let img = match qcow2::Image::open_file(&path, false) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("open: {e}");
            std::process::exit(1);
        }
    };
    let size = img.size();
    let mut out = std::io::stdout();
    for op in 0..20_000u64 {
        let len = (rand() % (256 << 10)).max(1);
        let off = rand() % (size - len);
        let r = match rand() % 10 {
            0 => img.flush(),
            1 => img.write_zeroes(off, len),
            2 => img.discard(off, len),
            _ => img.write_at(&vec![(op % 251) as u8 | 1; len as usize], off),
        };
        if let Err(e) = r {
            eprintln!("operation {op}: {e}");
            std::process::exit(1);
        }
        if writeln!(out, "{op}").and_then(|_| out.flush()).is_err() {
            std::process::exit(1);
        }
    }
}
