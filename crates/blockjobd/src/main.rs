//! blockjobd: the block-job daemon, a drop-in for qemu-storage-daemon's QMP interface.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(arg) => {
                eprintln!(
                    "blockjobd: {}: argument is not valid UTF-8",
                    arg.to_string_lossy()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    blockjobd::main_with(&args, blockjobd::backend::block_services)
}
