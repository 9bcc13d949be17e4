//! `blockjobctl` exactly as its binary runs it (`blockjobctl::main`), built as a binary of
//! this package so that the end-to-end tests always run what they were built with.

fn main() -> std::process::ExitCode {
    blockjobctl::main()
}
