//! The `blockjobctl` binary: see the crate docs.

fn main() -> std::process::ExitCode {
    blockjobctl::main()
}
