//! The reference itself: our recorded scenarios must still reproduce on qemu-storage-daemon, so
//! a transcript that drifted from QEMU's behaviour (or a broken scenario file) is caught here.

use blockjobs_tests::{own_oracle, run_oracle};
use std::path::Path;

#[test]
fn qemu_storage_daemon_reproduces_our_recorded_scenarios() {
    let own = own_oracle();
    let run = run_oracle(
        Path::new("qemu-storage-daemon"),
        &own.join("scenarios"),
        &own.join("expected"),
        &[],
    );
    assert!(run.success, "{}", run.output);
    assert!(run.output.contains(" 0 failed"), "{}", run.output);
}
