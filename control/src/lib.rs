//! Damselfly's control plane, on the scheduler's HTTP port: Harbor-compatible preheat (both of
//! Harbor's provider protocols), registry push notifications, the job store (SQLite embedded,
//! PostgreSQL shared) and the runner that has the cluster's peers fetch each job's blobs.
//!
//! It sits above the scheduler: [`start`] takes a running [`Scheduler`] and serves its
//! `/healthy` and `/metrics` beside the API. `damselfly scheduler` composes the two (`cli.rs`).

pub mod api;
pub mod auth;
pub mod cli;
pub mod job;
mod preheat;
pub mod resolve;
pub mod runner;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use damselfly_mirror::upstream::{Upstream, UpstreamConfig, UpstreamError};
use damselfly_scheduler::Scheduler;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::job::Scope;
use crate::runner::Runner;
use crate::store::JobStore;

/// How long a runner's claim on a job lasts without renewal: after a runner dies, its jobs
/// wait this long for another.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// How long the nodes keep a file preheated from a plain URL, unless told otherwise.
pub const DEFAULT_FILE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct ControlConfig {
    pub credentials: Credentials,
    /// Which registries jobs may name, and how they are reached.
    pub upstream: UpstreamConfig,
    pub notification_scope: Scope,
    pub lease: Duration,
    /// Whether a job's `Authorization` may go to seeds (the gRPC port requires client
    /// certificates).
    pub forward_credentials: bool,
    /// How long the nodes keep a file preheated from a plain URL.
    pub file_ttl: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            credentials: Credentials::default(),
            upstream: control_upstream(),
            notification_scope: Scope::SingleSeedPeer,
            lease: DEFAULT_LEASE,
            forward_credentials: false,
            file_ttl: DEFAULT_FILE_TTL,
        }
    }
}

/// The upstream rules of the control plane: the mirror's, except that a registry named by an
/// internal address is reached there only if the operator named it (`--allow-registry`), as
/// a job's URL may come from anyone who reaches the API.
pub fn control_upstream() -> UpstreamConfig {
    UpstreamConfig { internal_by_address: false, ..UpstreamConfig::default() }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct Running {
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    store: JobStore,
}

/// Serves the API on `http` and runs jobs from `store` on `scheduler`'s cluster.
pub async fn start(
    config: ControlConfig,
    scheduler: Scheduler,
    store: JobStore,
    http: TcpListener,
) -> Result<Running, ControlError> {
    let http_addr = http.local_addr()?;
    let upstream = Arc::new(Upstream::new(config.upstream)?);
    let shutdown = CancellationToken::new();
    let place = place(http_addr);
    let runner = Runner::new(
        store.clone(),
        Arc::new(scheduler.clone()),
        upstream,
        &place,
        config.lease,
        config.forward_credentials,
        config.file_ttl,
    );
    let api = Arc::new(api::Api {
        store: store.clone(),
        scheduler,
        credentials: config.credentials,
        notification_scope: config.notification_scope,
        address: place,
    });
    if api.credentials.is_open() {
        tracing::warn!("the preheat API takes requests without credentials (see --preheat-token-file)");
    }
    let tasks = vec![tokio::spawn(api::serve(http, api, shutdown.clone())), tokio::spawn(runner.run(shutdown.clone()))];
    tracing::info!(http = %http_addr, "control plane started");
    Ok(Running { http_addr, shutdown, tasks, store })
}

/// How this scheduler names itself in job claims and the console: its HTTP address, or the
/// host's name and the port when it listens on every address (as in a container).
fn place(addr: SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0;
    let host = ok
        .then(|| std::ffi::CStr::from_bytes_until_nul(&name).ok().and_then(|c| c.to_str().ok()).map(str::to_owned))
        .flatten()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| addr.ip().to_string());
    format!("{host}:{}", addr.port())
}

impl Running {
    /// Stops serving and running jobs (releasing them for any scheduler to resume).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for mut task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
            }
        }
        self.store.close().await;
    }

    /// Stops at once, as a crash would: claims are left to lapse.
    pub fn kill(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}
