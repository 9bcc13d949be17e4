//! `cargo xtask bench codegen`: our parse + check + generate of QEMU's
//! complete schema, timed beside the crates.io `qapi-codegen` 0.11.3 on the same files.
//!
//! Fairness: both read the same schema directory; each contender gets warm-up
//! runs, then the timed runs alternate (ours, theirs, ours, …) so a busy
//! machine slows both alike. Two pairs of rows:
//!
//! - without the disk: ours is `qapi_model::load` (read, parse, check) and
//!   `qapi_codegen::generate` (the formatted Rust of types, commands, events
//!   and introspection) into strings in memory; theirs is
//!   `qapi_codegen::codegen` (read, parse, generate unformatted types),
//!   which can only write to a file, writing to `/dev/null`;
//! - as used: ours is what `cargo xtask codegen --schema F --out DIR` does
//!   (the crate's files written to a temporary directory through temporary
//!   files and renames), theirs writes a temporary file.
//!
//! Our figures include printing: the generator's tokens are printed by
//! prettyplease, as `cargo xtask codegen` writes them. Wall time and process
//! CPU time are both printed: ours uses one thread per core, theirs one.

use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, ValueEnum)]
pub enum Bench {
    /// Schema → Rust for QEMU's complete schema, ours vs qapi-codegen 0.11.3.
    Codegen,
}

#[derive(Args)]
pub struct BenchArgs {
    bench: Bench,
    /// Timed runs per contender (the fastest and the median are printed).
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// Untimed runs per contender before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    match args.bench {
        Bench::Codegen => codegen(args),
    }
}

/// CPU time used so far by every thread of this process.
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Wall and CPU time of each run of one contender.
#[derive(Default)]
struct Timings {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Timings {
    fn measure(&mut self, run: &mut dyn FnMut() -> Result<(), String>) -> Result<(), String> {
        let (cpu0, wall0) = (process_cpu_time(), Instant::now());
        run()?;
        self.wall.push(wall0.elapsed());
        self.cpu.push(process_cpu_time().saturating_sub(cpu0));
        Ok(())
    }

    fn min_median(times: &[Duration]) -> (f64, f64) {
        let mut sorted = times.to_vec();
        sorted.sort();
        let ms = |d: Option<&Duration>| d.map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0);
        (ms(sorted.first()), ms(sorted.get(sorted.len() / 2)))
    }

    fn wall(&self) -> (f64, f64) {
        Self::min_median(&self.wall)
    }

    fn cpu(&self) -> (f64, f64) {
        Self::min_median(&self.cpu)
    }
}

fn row(name: &str, t: &Timings, bytes: usize) {
    let (wall_min, wall_med) = t.wall();
    let (cpu_min, cpu_med) = t.cpu();
    println!(
        "{name:<40} {wall_min:>9.1} {wall_med:>9.1} {cpu_min:>9.1} {cpu_med:>9.1} {:>11}",
        bytes
    );
}

fn codegen(args: &BenchArgs) -> Result<(), String> {
    if cfg!(debug_assertions) {
        println!(
            "note: debug build; for real figures run `cargo run --release -p xtask -- bench codegen`"
        );
    }
    let schema = qapi_testdata::qemu_schema()?;
    let dir = schema
        .parent()
        .ok_or("schema has no directory")?
        .to_path_buf();
    let sink = PathBuf::from("/dev/null");
    let their_out = if sink.exists() {
        sink
    } else {
        std::env::temp_dir().join("xtask-bench-qapi-codegen-0.11.3.rs")
    };

    let ours = || -> Result<usize, String> {
        let model = qapi_model::load(&schema).map_err(|d| d.to_string())?;
        let files = qapi_codegen::generate(&model).map_err(|e| e.to_string())?;
        Ok(files.iter().map(|f| f.contents.len()).sum())
    };
    let out_dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let runtime = crate::codegen::runtime_dependency(out_dir.path())?;
    let ours_to_disk = || -> Result<(), String> {
        let model = qapi_model::load(&schema).map_err(|d| d.to_string())?;
        let files = qapi_codegen::generate_crate(&model, "qemu-qapi", &runtime)
            .map_err(|e| e.to_string())?;
        for f in &files {
            crate::codegen::write_file(&out_dir.path().join(&f.path), &f.contents)?;
        }
        Ok(())
    };
    let mut load_only = || -> Result<(), String> {
        qapi_model::load(&schema)
            .map(drop)
            .map_err(|d| d.to_string())
    };
    let theirs = |out: &Path| -> Result<(), String> {
        qapi_codegen_crates_io::codegen(&dir, out, "QmpCommand".into())
            .map(drop)
            .map_err(|e| format!("qapi-codegen 0.11.3: {e}"))
    };

    // Output sizes (and a check that both work) from one untimed run each.
    let our_bytes = ours()?;
    let size_probe = tempfile::NamedTempFile::new().map_err(|e| format!("temp file: {e}"))?;
    theirs(size_probe.path())?;
    let their_bytes = std::fs::metadata(size_probe.path())
        .map(|m| m.len())
        .map_err(|e| format!("qapi-codegen 0.11.3 output: {e}"))?;
    let their_bytes = usize::try_from(their_bytes).unwrap_or(usize::MAX);

    for _ in 0..args.warmup {
        ours()?;
        theirs(&their_out)?;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut our_t, mut load_t, mut their_t, mut their_file_t) = Default::default();
    let mut our_file_t = Timings::default();
    for _ in 0..args.runs.max(1) {
        Timings::measure(&mut our_t, &mut || ours().map(drop))?;
        Timings::measure(&mut their_t, &mut || theirs(&their_out))?;
        Timings::measure(&mut load_t, &mut load_only)?;
        Timings::measure(&mut our_file_t, &mut || ours_to_disk())?;
        Timings::measure(&mut their_file_t, &mut || theirs(size_probe.path()))?;
    }

    println!("QEMU schema: {}", schema.display());
    println!(
        "{} timed runs each after {} warm-up runs, interleaved; ours on {threads} thread(s), theirs on 1",
        args.runs.max(1),
        args.warmup
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "(ms)", "wall min", "wall med", "cpu min", "cpu med", "bytes out"
    );
    row("blockjobs: load + generate, in memory", &our_t, our_bytes);
    row("  of which qapi_model::load", &load_t, 0);
    row("qapi-codegen 0.11.3, to /dev/null", &their_t, their_bytes);
    row(
        "blockjobs: crate written to a temp dir",
        &our_file_t,
        our_bytes,
    );
    row("qapi-codegen 0.11.3, temp file", &their_file_t, their_bytes);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let (our_min, our_med) = our_t.wall();
    let (their_min, their_med) = their_t.wall();
    let (our_cpu, _) = our_t.cpu();
    let (their_cpu, _) = their_t.cpu();
    let (our_file_min, our_file_med) = our_file_t.wall();
    let (their_file_min, their_file_med) = their_file_t.wall();
    println!(
        "ours / theirs, in memory: wall min {:.2}x, wall median {:.2}x, cpu min {:.2}x; output {:.2}x the bytes",
        ratio(our_min, their_min),
        ratio(our_med, their_med),
        ratio(our_cpu, their_cpu),
        ratio(our_bytes as f64, their_bytes as f64)
    );
    println!(
        "ours / theirs, written to disk: wall min {:.2}x, wall median {:.2}x",
        ratio(our_file_min, their_file_min),
        ratio(our_file_med, their_file_med),
    );
    Ok(())
}
