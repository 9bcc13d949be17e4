//! What a downstream crate does with the API this crate generates (macro way).

use demo_api_macro as api;

include!("../../demo-schema/uses_the_api.rs");
