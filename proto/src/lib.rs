//! What a node and a scheduler must agree on, and nothing else: the gRPC protocol
//! (`scheduler.proto`, as [`v1`]), how a node proves it belongs to the cluster ([`member`]), the upload tokens a scheduler mints and a parent checks
//! ([`token`]), the content digest that names every task ([`digest`]), and how the P2P cache
//! names content ([`cache_name`]).

pub mod cache_name;
pub mod digest;
pub mod member;
pub mod token;

pub use digest::{Algorithm, Digest, DigestError, Hasher};

/// The scheduler protocol, generated from `scheduler.proto`.
pub mod v1 {
    tonic::include_proto!("damselfly.scheduler.v1");

    /// Written by hand so that the credential never reaches a log.
    impl std::fmt::Debug for Source {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Source")
                .field("registry", &self.registry)
                .field("repository", &self.repository)
                .field("insecure", &self.insecure)
                .field("credential", &if self.credential.is_empty() { "" } else { "<redacted>" })
                .finish()
        }
    }
}
