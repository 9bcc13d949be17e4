//! xtask: repository chores — `cargo xtask codegen [--check]`, `cargo xtask codegen --schema FILE --out DIR`,
//! `cargo xtask bench codegen`, `cargo xtask fuzz TARGET --time S`.

mod bench;
mod codegen;
mod fuzz;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "xtask", about = "Repository chores for blockjobs")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Generate crates/qmp-api/src/generated/ from qapi-schema/qapi-schema.json,
    /// or a self-contained crate from any schema with --schema/--out.
    Codegen(codegen::CodegenArgs),
    /// Benchmarks (`cargo xtask bench codegen`).
    Bench(bench::BenchArgs),
    /// Coverage-guided fuzzing (`cargo xtask fuzz TARGET --time S`, `--smoke S` for all).
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Codegen(args) => codegen::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
