//! `cargo xtask bench codegen`: our parse + check + generate + write of QEMU's complete
//! schema, timed in one run beside QEMU 10.0's own generator (`scripts/qapi-gen.py`) and
//! the crates.io `qapi-codegen` 0.11.3, on the same schema files.
//!
//! Rows:
//! - **blockjobs, as used**: what `cargo xtask codegen --schema F --out DIR` does: read,
//!   parse, check, emit tokens, print them with prettyplease, write the crate's files to a
//!   temporary directory (through temporary files and renames);
//! - **qapi-gen.py (QEMU 10.0)**: `python3 scripts/qapi-gen.py -o TMP -b SCHEMA`, as QEMU's
//!   build runs it (a process of its own, so interpreter start-up counts, as it does in a
//!   build): C types, visitors, commands, events, introspection, features, 391 files;
//! - **qapi-codegen 0.11.3**: read, parse, generate unformatted types, written to a file;
//! - informative: ours without the disk, and `qapi_model::load` alone.
//!
//! Fairness: every contender gets warm-up runs, then the timed runs alternate (ours,
//! QEMU's, theirs, …) so a busy machine slows all alike. Wall time and CPU time (ours:
//! this process's; qapi-gen.py: the child's) are both printed: ours uses one thread per
//! core, the others one. The goal is ours ≤ 0.1 × qapi-gen.py (median wall time).
//!
//! QEMU's source is not part of this repository: the bench looks for QEMU 10.0's
//! `scripts/qapi-gen.py` in `--qemu-src`, `$QEMU_SRC` or `target/qemu-source/qemu-10.0*`,
//! and says how to get it when it is missing.

use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, ValueEnum)]
pub enum Bench {
    /// Schema → code for QEMU's complete schema: ours vs qapi-gen.py (QEMU 10.0) and
    /// qapi-codegen 0.11.3.
    Codegen,
}

#[derive(Args)]
pub struct BenchArgs {
    bench: Bench,
    /// Timed runs per contender (the fastest and the median are printed).
    #[arg(long, default_value_t = 11)]
    runs: usize,
    /// Untimed runs per contender before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// QEMU 10.0's source tree (with `scripts/qapi-gen.py`); default `$QEMU_SRC`, then
    /// `target/qemu-source/qemu-10.0*`.
    #[arg(long)]
    qemu_src: Option<PathBuf>,
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    match args.bench {
        Bench::Codegen => codegen(args),
    }
}

/// What to do when QEMU 10.0's source is missing.
const HOW_TO_GET_QEMU: &str = "\
QEMU 10.0's source is needed to time its scripts/qapi-gen.py (it is not part of this repository).
Get it from Debian into target/qemu-source/ (the bench looks there):
  echo 'deb-src http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/qemu-src.list
  apt-get update && mkdir -p target/qemu-source && cd target/qemu-source && apt-get source qemu
  (if only qemu_10.0*.orig.tar.xz arrives: tar xJf qemu_10.0*.orig.tar.xz)
or check out QEMU's v10.0.x tag anywhere and pass --qemu-src DIR (or set QEMU_SRC=DIR).";

/// QEMU 10.0's source tree: `--qemu-src`, `$QEMU_SRC`, or `target/qemu-source/qemu-10.0*`.
fn qemu_source(args: &BenchArgs) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match (&args.qemu_src, std::env::var_os("QEMU_SRC")) {
        (Some(dir), _) => vec![dir.clone()],
        (None, Some(dir)) => vec![PathBuf::from(dir)],
        (None, None) => {
            let root = crate::codegen::workspace_root().join("target/qemu-source");
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with("qemu-10.0"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            dirs.sort();
            dirs
        }
    };
    for dir in &candidates {
        let version = std::fs::read_to_string(dir.join("VERSION")).unwrap_or_default();
        if dir.join("scripts/qapi-gen.py").is_file() && version.trim().starts_with("10.0") {
            return Ok(dir.clone());
        }
    }
    let looked = candidates
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(format!(
        "no QEMU 10.0 source tree found (looked in: {}).\n{HOW_TO_GET_QEMU}",
        if looked.is_empty() {
            "target/qemu-source/qemu-10.0*"
        } else {
            &looked
        }
    ))
}

/// CPU time used so far by every thread of this process (`RUSAGE_SELF`), or by every
/// waited-for child (`RUSAGE_CHILDREN`).
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call's duration.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_usec).unwrap_or(0) * 1000,
        )
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Wall and CPU time of each run of one contender.
#[derive(Default)]
struct Timings {
    wall: Vec<Duration>,
    cpu: Vec<Duration>,
}

impl Timings {
    /// Times `run`; `child` counts the CPU time of the processes it waited for instead of ours.
    fn measure(
        &mut self,
        child: bool,
        run: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<(), String> {
        let who = if child {
            libc::RUSAGE_CHILDREN
        } else {
            libc::RUSAGE_SELF
        };
        let (cpu0, wall0) = (cpu_time(who), Instant::now());
        run()?;
        self.wall.push(wall0.elapsed());
        self.cpu.push(cpu_time(who).saturating_sub(cpu0));
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

fn row(name: &str, t: &Timings, bytes: u64) {
    let (wall_min, wall_med) = t.wall();
    let (cpu_min, cpu_med) = t.cpu();
    println!(
        "{name:<42} {wall_min:>9.1} {wall_med:>9.1} {cpu_min:>9.1} {cpu_med:>9.1} {bytes:>11}"
    );
}

/// Bytes of every file under `dir`.
fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => tree_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

fn codegen(args: &BenchArgs) -> Result<(), String> {
    if cfg!(debug_assertions) {
        println!(
            "note: debug build; for real figures run `cargo run --release -p xtask -- bench codegen`"
        );
    }
    let qemu_src = qemu_source(args)?;
    let schema = qapi_testdata::qemu_schema()?;
    let dir = schema
        .parent()
        .ok_or("schema has no directory")?
        .to_path_buf();

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
    let ours_in_memory = || -> Result<(), String> {
        let model = qapi_model::load(&schema).map_err(|d| d.to_string())?;
        qapi_codegen::generate(&model)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let load_only = || -> Result<(), String> {
        qapi_model::load(&schema)
            .map(drop)
            .map_err(|d| d.to_string())
    };
    let qemu_out = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let qapi_gen = || -> Result<(), String> {
        let output = Command::new("python3")
            .arg(qemu_src.join("scripts/qapi-gen.py"))
            .arg("-o")
            .arg(qemu_out.path())
            .arg("-b")
            .arg(&schema)
            .output()
            .map_err(|e| format!("cannot run python3 (install python3): {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "qapi-gen.py failed on {}:\n{}",
                schema.display(),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    };
    let their_out = tempfile::NamedTempFile::new().map_err(|e| format!("temp file: {e}"))?;
    let theirs = || -> Result<(), String> {
        qapi_codegen_crates_io::codegen(&dir, their_out.path(), "QmpCommand".into())
            .map(drop)
            .map_err(|e| format!("qapi-codegen 0.11.3: {e}"))
    };

    // Every contender works (and leaves its output to be measured) before any timing.
    ours_to_disk()?;
    qapi_gen()?;
    theirs()?;
    for _ in 1..args.warmup {
        ours_to_disk()?;
        qapi_gen()?;
        theirs()?;
    }
    let mut timings: [Timings; 5] = Default::default();
    let [ours_t, qemu_t, theirs_t, memory_t, load_t] = &mut timings;
    for _ in 0..args.runs.max(1) {
        ours_t.measure(false, &mut { ours_to_disk })?;
        qemu_t.measure(true, &mut { qapi_gen })?;
        theirs_t.measure(false, &mut { theirs })?;
        memory_t.measure(false, &mut { ours_in_memory })?;
        load_t.measure(false, &mut { load_only })?;
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("QEMU schema: {}", schema.display());
    println!("QEMU 10.0's generator: {}", qemu_src.display());
    println!(
        "{} timed runs each after {} warm-up run(s), interleaved; ours on {threads} thread(s), the others on 1",
        args.runs.max(1),
        args.warmup.max(1)
    );
    println!(
        "{:<42} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "(ms)", "wall min", "wall med", "cpu min", "cpu med", "bytes out"
    );
    let our_bytes = tree_size(out_dir.path());
    row("blockjobs: parse+check+generate+write", ours_t, our_bytes);
    row(
        "qapi-gen.py (QEMU 10.0), C to a temp dir",
        qemu_t,
        tree_size(qemu_out.path()),
    );
    row(
        "qapi-codegen 0.11.3, to a temp file",
        theirs_t,
        std::fs::metadata(their_out.path()).map_or(0, |m| m.len()),
    );
    row("  blockjobs without the disk", memory_t, our_bytes);
    row("  of which qapi_model::load", load_t, 0);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let (ours_min, ours_med) = ours_t.wall();
    let (ours_cpu, _) = ours_t.cpu();
    let (qemu_min, qemu_med) = qemu_t.wall();
    let (qemu_cpu, _) = qemu_t.cpu();
    let (theirs_min, theirs_med) = theirs_t.wall();
    let (theirs_cpu, _) = theirs_t.cpu();
    let vs_qemu = ratio(ours_med, qemu_med);
    println!(
        "blockjobs / qapi-gen.py: wall median {vs_qemu:.3}x, wall min {:.3}x, cpu min {:.3}x (goal: at most 0.1x: {})",
        ratio(ours_min, qemu_min),
        ratio(ours_cpu, qemu_cpu),
        if vs_qemu <= 0.1 { "met" } else { "NOT met" }
    );
    println!(
        "blockjobs / qapi-codegen 0.11.3: wall median {:.2}x, wall min {:.2}x, cpu min {:.2}x",
        ratio(ours_med, theirs_med),
        ratio(ours_min, theirs_min),
        ratio(ours_cpu, theirs_cpu),
    );
    Ok(())
}
