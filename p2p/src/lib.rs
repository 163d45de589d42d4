//! Damselfly's P2P core. This crate holds the local half: content-addressed tasks split into
//! pieces, stored one file per task with crash-safe metadata, and the fetch engine that fills
//! them from a [`Source`] while any number of readers stream the bytes as they land.

pub mod data_dir;
mod fetch;
pub mod import;
pub mod meta;
pub mod metrics;
pub mod net;
pub mod passthrough;
pub mod piece;
pub mod reader;
mod share;
pub mod source;
mod stage;
pub mod store;
mod task;

pub use damselfly_proto::digest;
pub use damselfly_proto::{Algorithm, Digest, DigestError, Hasher};
pub use metrics::Metrics;
pub use reader::{read, Delivery, ReadError};
pub use source::{ByteSource, Source, SourceError, SourceResponse, SourceSpec};
pub use store::{Store, StoreConfig, StoreError, DEFAULT_MAX_TASKS};
pub use task::{Task, TaskRef};

#[cfg(test)]
mod tests;
