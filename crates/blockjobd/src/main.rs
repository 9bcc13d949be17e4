//! blockjobd: the block-job daemon, a drop-in for qemu-storage-daemon's QMP interface.

fn main() -> std::process::ExitCode {
    blockjobd::main()
}
