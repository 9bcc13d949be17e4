#![no_main]
//! Fuzz target `qcow2_image`: see `fuzz_targets::qcow2_image`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::qcow2_image::run(data));
