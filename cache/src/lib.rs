//! The P2P cache: content with no registry behind it (a build output, a model, a data set),
//! imported on one node under a name and fetched on others from their peers.
//!
//! The node daemon keeps the names it holds ([`index`]) beside its store and serves them on a
//! unix socket in its data directory ([`server`], owner-only), since it holds the store's lock;
//! `damselfly cache` ([`cli`]) is that socket's client. The socket speaks [`protocol`]: lines
//! of JSON, with the file being imported or exported passed as a descriptor ([`wire`]), so the
//! daemon never opens a path a client names, and an export is a copy (or a clone) by the
//! client into a file of its own.
//!
//! Content is stored by its digest like every task, kept from eviction while a name holds it;
//! in a cluster the schedulers learn each name, place the replicas an import asks for, and
//! have every holder drop it on `delete --all`.

pub mod cli;
mod error;
pub mod index;
mod keeper;
pub mod protocol;
pub mod server;
pub mod url;
pub mod wire;
mod write_out;

pub use error::CacheError;
pub use keeper::{Cache, Exported};
