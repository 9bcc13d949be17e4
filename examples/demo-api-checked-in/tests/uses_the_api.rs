//! What a downstream crate does with the API this crate generates (checked-in way).

use demo_api_checked_in as api;

include!("../../demo-schema/uses_the_api.rs");
