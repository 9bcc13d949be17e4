//! monitor: the QMP server — QEMU's JSON stream dialect and limits, capabilities negotiation,
//! dispatch to a pluggable command backend, and event broadcast, over unix, TCP and stdio.
//!
//! The daemon plugs in a [`QmpBackend`] (its commands), builds a [`MonitorServer`], adds
//! monitors with [`MonitorServer::listen`], hands [`MonitorServer::events`] (the
//! [`Broadcast`] of generated `qmp_api::Event`s) to whatever emits events, and awaits
//! [`MonitorServer::run`], which returns after `quit` or a [`ShutdownHandle::request`]; the
//! daemon then does its own shutdown work (flushing images). The monitor's own command
//! (`qmp_capabilities`) and its greeting use the generated types (`QmpCapabilitiesArguments`,
//! `QMPCapability`, `VersionInfo`).

pub mod backend;
pub mod events;
pub mod json_stream;
pub mod qdict_order;
pub mod server;
pub mod session;
pub mod wire;

pub use backend::{ErrorClass, QmpBackend, QmpError};
pub use events::{Broadcast, Polling};
pub use server::{Bound, Endpoint, MonitorServer, ServerConfig, ShutdownHandle, ShutdownReason};
