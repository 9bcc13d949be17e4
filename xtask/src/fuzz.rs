//! `cargo xtask fuzz TARGET --time S`: builds the fuzz targets of `fuzz/` with libFuzzer's
//! coverage instrumentation on stable rustc and runs one; `cargo xtask fuzz --smoke S` runs
//! every target for S seconds (CI). The working corpus is `target/fuzz/corpus/TARGET/`,
//! seeded from the committed `fuzz/corpus/TARGET/` and run-time seeds (`fuzz_targets::seeds`);
//! crashes land in `target/fuzz/artifacts/TARGET/`. Prints executions and coverage.

use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Coverage instrumentation as cargo-fuzz sets it, minus the sanitizer (nightly only).
const RUSTFLAGS: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing";

/// The host triple: with `--target`, RUSTFLAGS reach the targets but not build scripts.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

#[derive(Args)]
pub struct FuzzArgs {
    /// The target to run (see `fuzz/fuzz_targets/`); omit with --smoke.
    target: Option<String>,
    /// Seconds to run.
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Run every target for this many seconds each.
    #[arg(long, conflicts_with = "target")]
    smoke: Option<u64>,
    /// Extra arguments for libFuzzer (e.g. `-- -jobs=2`).
    #[arg(last = true)]
    libfuzzer: Vec<String>,
}

/// What a run reported.
struct Figures {
    executions: u64,
    coverage: u64,
    features: u64,
    corpus: u64,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn targets() -> Vec<&'static str> {
    fuzz_targets::TARGETS
        .iter()
        .map(|(name, _)| *name)
        .collect()
}

fn build() -> Result<(), String> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--bins",
            "--target",
            TRIPLE,
            "--manifest-path",
        ])
        .arg(root().join("fuzz/Cargo.toml"))
        .env("RUSTFLAGS", RUSTFLAGS)
        .env("CARGO_TARGET_DIR", root().join("target/fuzz/build"))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err("building the fuzz targets failed".into())
    }
}

/// Fills the working corpus with the committed and run-time seeds.
fn seed(target: &str, corpus: &Path) -> Result<(), String> {
    std::fs::create_dir_all(corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    let committed = root().join("fuzz/corpus").join(target);
    if let Ok(entries) = std::fs::read_dir(&committed) {
        for e in entries.flatten() {
            let to = corpus.join(e.file_name());
            if !to.exists() {
                std::fs::copy(e.path(), &to).map_err(|err| format!("{}: {err}", to.display()))?;
            }
        }
    }
    let qemu = qapi_testdata::qemu_schema_dir().ok();
    for (name, bytes) in fuzz_targets::seeds::generated(target, &root(), qemu.as_deref()) {
        let to = corpus.join(format!("seed-{name}"));
        if !to.exists() {
            std::fs::write(&to, bytes).map_err(|e| format!("{}: {e}", to.display()))?;
        }
    }
    Ok(())
}

/// The last `#N ... cov: C ft: F corp: K/...` status line libFuzzer printed.
fn figures(log: &str) -> Option<Figures> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains("cov: "))?;
    let field = |key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let executions = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| field("#"))?;
    Some(Figures {
        executions,
        coverage: field("cov:")?,
        features: field("ft:")?,
        corpus: field("corp:")?,
    })
}

fn run_one(target: &str, seconds: u64, extra: &[String]) -> Result<(), String> {
    let work = root().join("target/fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    seed(target, &corpus)?;
    std::fs::create_dir_all(&artifacts).map_err(|e| format!("{}: {e}", artifacts.display()))?;
    let binary = work.join("build").join(TRIPLE).join("release").join(target);
    let log_path = work.join(format!("{target}.log"));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    eprintln!(
        "== fuzz {target} for {seconds} s (log: {})",
        log_path.display()
    );
    let status = Command::new(&binary)
        .arg(&corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=30")
        .arg("-rss_limit_mb=4096")
        .arg("-max_len=1048576")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    match figures(&text) {
        Some(f) => println!(
            "{target}: {} executions in {seconds} s, coverage {} edges, {} features, corpus {} inputs",
            f.executions, f.coverage, f.features, f.corpus
        ),
        None => println!("{target}: libFuzzer printed no status line (see the log)"),
    }
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{target}: the fuzzer stopped with {status}: a crash (input in {}), see {}",
            artifacts.display(),
            log_path.display()
        ))
    }
}

pub fn run(args: &FuzzArgs) -> Result<(), String> {
    let selected: Vec<&str> = match (&args.target, args.smoke) {
        (Some(t), None) => {
            if !targets().contains(&t.as_str()) {
                return Err(format!(
                    "unknown fuzz target '{t}' (targets: {})",
                    targets().join(", ")
                ));
            }
            vec![t.as_str()]
        }
        (None, Some(_)) => targets(),
        _ => {
            return Err(format!(
                "name a target ({}) or give --smoke SECONDS",
                targets().join(", ")
            ));
        }
    };
    build()?;
    let seconds = args.smoke.unwrap_or(args.time);
    let mut failed = Vec::new();
    for target in selected {
        if let Err(e) = run_one(target, seconds, &args.libfuzzer) {
            eprintln!("{e}");
            failed.push(target);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz targets that crashed: {}", failed.join(", ")))
    }
}
