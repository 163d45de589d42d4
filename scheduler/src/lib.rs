//! Damselfly's scheduler: soft state about hosts, tasks and the peers downloading them, and
//! the rules that tell each download where to get its pieces.
//!
//! [`Scheduler`] is the core, callable in-process; [`start`] serves it over gRPC (with the
//! standard health service) and HTTP `/healthy` and `/metrics`.

pub mod proto {
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
pub mod token;

mod config;
mod decide;
mod download;
mod error;
mod hosts;
mod http;
mod identity;
mod metrics;
mod outbox;
mod pieces;
mod scheduler;
mod select;
mod server;
mod service;
mod session;
mod state;
#[cfg(test)]
mod tests;

pub use config::{SchedulerConfig, ServerTls};
pub use download::DownloadHandle;
pub use error::SchedulerError;
pub use metrics::{DecisionKind, Metrics};
pub use scheduler::{Scheduler, SeedSubscription};
pub use server::{start, Running};
pub use service::SchedulerService;
