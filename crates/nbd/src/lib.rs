//! NBD, both ends. The server (fixed newstyle handshake, simple and structured replies,
//! `base:allocation` and the metadata contexts an export adds, e.g. `qemu:dirty-bitmap:NAME`)
//! serves named exports over a unix or TCP socket, as `nbd-server-start` / `block-export-add` /
//! `block-export-del` / `nbd-server-stop` need; exports are [`ExportBackend`] trait objects:
//! the crate knows nothing of the node graph. The client ([`client`]) connects to any NBD
//! server, and reconnects. [`wire`] has the protocol's numbers.
//!
//! ```no_run
//! # async fn example(backend: std::sync::Arc<dyn nbd::ExportBackend>) -> std::io::Result<()> {
//! use nbd::{Export, ListenAddr, NbdServer, RemoveMode, ServerConfig};
//! let server = NbdServer::start(&ListenAddr::Unix("/tmp/nbd.sock".into()), ServerConfig::default()).await?;
//! server.add_export(Export::new("disk", backend).writable(true)).expect("a new name");
//! // … clients connect to nbd+unix:///disk?socket=/tmp/nbd.sock …
//! let deletion = server.remove_export("disk", RemoveMode::Hard).expect("exists");
//! deletion.wait().await; // now emit BLOCK_EXPORT_DELETED
//! server.stop().await;
//! # Ok(()) }
//! ```

pub mod client;
mod exports;
mod handshake;
mod server;
mod transmission;
pub mod wire;

pub use exports::{
    BlockStatus, Export, ExportBackend, ExportDeletion, ExportError, Extent, MetaContext,
    RemoveMode, StatusExtent,
};
pub use server::{BoundAddr, ListenAddr, NbdServer, ServerConfig};
