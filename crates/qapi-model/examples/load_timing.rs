//! Times `qapi_model::load` on a schema (QEMU's complete schema unless a
//! path is given): `cargo run --release -p qapi-model --example load_timing [PATH]`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => PathBuf::from(p),
        None => qapi_testdata::qemu_schema()?,
    };
    let runs = 20;
    let mut times = Vec::with_capacity(runs);
    let mut entities = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let schema = qapi_model::load(&path)?;
        times.push(start.elapsed());
        entities = schema.entities.len();
    }
    times.sort();
    let mean: Duration = times.iter().sum::<Duration>() / runs as u32;
    println!(
        "{}: {entities} entities; load min {:.2} ms, median {:.2} ms, mean {:.2} ms over {runs} runs",
        path.display(),
        times[0].as_secs_f64() * 1e3,
        times[runs / 2].as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3
    );
    Ok(())
}
