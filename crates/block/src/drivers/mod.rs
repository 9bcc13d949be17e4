//! The built-in drivers.

pub mod blkdebug;
pub mod file;
pub mod null;
pub mod qcow2;
pub mod raw;

use crate::driver::DriverSpec;

/// Drivers every graph knows.
pub const BUILTIN: &[DriverSpec] = &[
    file::SPEC,
    raw::SPEC,
    null::SPEC,
    blkdebug::SPEC,
    qcow2::SPEC,
];
