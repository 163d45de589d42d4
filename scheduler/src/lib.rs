//! Damselfly's scheduler: soft state about hosts, tasks and the peers downloading them, and
//! the rules that tell each download where to get its pieces.
//!
//! [`Scheduler`] is the core, callable in-process; [`start`] serves it over gRPC (with the
//! standard health service) and HTTP `/healthy` and `/metrics`. The wire protocol, the upload
//! tokens and the digest type are in `damselfly-proto`, which the nodes share.

// The protocol and the tokens are shared with the nodes (`damselfly-proto`).
use damselfly_proto::{token, v1 as proto};

mod cache;
pub mod cli;
mod config;
mod conn;
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
mod view;

pub use cache::UrlFailure;
pub use config::{load_secret, SchedulerConfig, SecretError, ServerTls, SECRET_ENV};
pub use download::DownloadHandle;
pub use error::SchedulerError;
pub use metrics::{DecisionKind, Metrics};
pub use scheduler::{Scheduler, TaskSubscription};
pub use server::{start, Running};
pub use service::SchedulerService;
pub use view::{Holding, HostView, TaskView};

/// The scheduler's own HTTP routes (`/healthy`, `/metrics`), for a server that adds its own.
pub use http::route as http_route;
