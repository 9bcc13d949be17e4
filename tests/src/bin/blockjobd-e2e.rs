//! The daemon exactly as `blockjobd` runs it (`blockjobd::main`), built as a binary of this
//! package so that `cargo test -p blockjobs-tests` always rebuilds what the end-to-end tests run.

fn main() -> std::process::ExitCode {
    blockjobd::main()
}
