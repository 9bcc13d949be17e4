#![no_main]
//! Fuzz target `qapi_schema`: see `fuzz_targets::qapi_schema`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::qapi_schema::run(data));
