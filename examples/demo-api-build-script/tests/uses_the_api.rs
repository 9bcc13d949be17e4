//! What a downstream crate does with the API this crate generates (build-script way).

use demo_api_build_script as api;

include!("../../demo-schema/uses_the_api.rs");
