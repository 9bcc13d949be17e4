//! `cargo xtask bench codegen`: our parse + check + generate of QEMU's
//! complete schema, timed beside the crates.io `qapi-codegen` 0.11.3 on the same files.

use clap::{Args, ValueEnum};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, ValueEnum)]
pub enum Bench {
    /// Schema → Rust for QEMU's complete schema, ours vs qapi-codegen 0.11.3.
    Codegen,
}

#[derive(Args)]
pub struct BenchArgs {
    bench: Bench,
    /// Runs per contender (the fastest and the median are printed).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn time_runs(
    runs: usize,
    mut run: impl FnMut() -> Result<(), String>,
) -> Result<Vec<Duration>, String> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times)
}

fn report(name: &str, times: &[Duration]) {
    let min = times.first().copied().unwrap_or_default();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    println!(
        "{name:<48} min {:>8.1} ms   median {:>8.1} ms   ({} runs)",
        min.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3,
        times.len()
    );
}

fn write_all(dir: &Path, files: &[qapi_codegen::GeneratedFile]) -> Result<(), String> {
    for f in files {
        std::fs::write(dir.join(&f.path), &f.contents).map_err(|e| format!("{}: {e}", f.path))?;
    }
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    match args.bench {
        Bench::Codegen => codegen(args.runs),
    }
}

fn codegen(runs: usize) -> Result<(), String> {
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
    let out = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    println!("QEMU schema: {}", schema.display());

    let ours = time_runs(runs, || {
        let model = qapi_model::load(&schema).map_err(|d| d.to_string())?;
        let files = qapi_codegen::generate(&model).map_err(|e| e.to_string())?;
        write_all(out.path(), &files)
    })?;
    let bytes: usize =
        qapi_codegen::generate(&qapi_model::load(&schema).map_err(|d| d.to_string())?)
            .map_err(|e| e.to_string())?
            .iter()
            .map(|f| f.contents.len())
            .sum();
    report(
        "blockjobs qapi-model + qapi-codegen (parse+check+gen)",
        &ours,
    );
    let load_only = time_runs(runs, || {
        qapi_model::load(&schema)
            .map(|_| ())
            .map_err(|d| d.to_string())
    })?;
    report("  of which qapi_model::load (parse+check)", &load_only);
    println!("{:<48} {bytes} bytes of Rust", "");

    let theirs_out = out.path().join("qmp.rs");
    let theirs = time_runs(runs, || {
        qapi_codegen_crates_io::codegen(&dir, &theirs_out, "QmpCommand".into())
            .map(|_| ())
            .map_err(|e| format!("qapi-codegen 0.11.3: {e}"))
    })?;
    let their_bytes = std::fs::metadata(&theirs_out).map(|m| m.len()).unwrap_or(0);
    report("crates.io qapi-codegen 0.11.3 (parse+gen)", &theirs);
    println!("{:<48} {their_bytes} bytes of Rust", "");
    Ok(())
}
