#![no_main]
//! Fuzz target `qmp_input`: see `fuzz_targets::qmp_input`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::qmp_input::run(data));
