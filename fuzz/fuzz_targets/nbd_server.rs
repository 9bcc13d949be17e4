#![no_main]
//! Fuzz target `nbd_server`: see `fuzz_targets::nbd_server`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::nbd_server::run(data));
