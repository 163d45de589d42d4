//! Two subcommands: `damselfly scheduler` (the scheduler's flags beside the control plane's,
//! and the process's life: bind, serve until asked to stop, shut down), and `damselfly
//! preheat` (a preheat from a terminal through the JSON API, `preheat.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use damselfly_mirror::upstream::UpstreamConfig;
use damselfly_scheduler::cli::{SchedulerArgs as CoreArgs, SchedulerArgsError};
use tokio::net::TcpListener;

use crate::auth::{CredentialError, Credentials};
use crate::job::Scope;
use crate::store::{JobStore, StoreError};
use crate::{ControlConfig, ControlError, DEFAULT_LEASE};

pub use crate::preheat::{run as preheat, PreheatArgs, PreheatError};

#[derive(Debug, Clone, Args)]
#[group(id = "control-plane")]
pub struct SchedulerArgs {
    #[command(flatten)]
    pub core: CoreArgs,
    /// Directory of the job store (`jobs.db`, SQLite) [default: <the daemon's data dir>/scheduler].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A PostgreSQL database shared by several schedulers (`postgres://user:pass@host/db`),
    /// instead of the SQLite file in --data-dir.
    #[arg(long, value_name = "URL")]
    pub job_store: Option<String>,
    /// File holding the Bearer token the preheat API, notifications and console ask for
    /// (Harbor's OAUTH auth mode).
    #[arg(long, value_name = "FILE")]
    pub preheat_token_file: Option<PathBuf>,
    /// File holding `user:password` for HTTP Basic (Harbor's BASIC auth mode).
    #[arg(long, value_name = "FILE")]
    pub preheat_basic_auth_file: Option<PathBuf>,
    /// File holding one `Name: value` header (Harbor's CUSTOM auth mode).
    #[arg(long, value_name = "FILE")]
    pub preheat_header_file: Option<PathBuf>,
    /// Registries preheat jobs may name (`host[:port]`, `*.domain`, `*`); repeatable.
    /// Default: any public registry.
    #[arg(long = "allow-registry", value_name = "PATTERN")]
    pub allow_registries: Vec<String>,
    /// Registries reached over TLS without verification or plain HTTP; repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// PEM CA certificates trusted for registries besides the bundled public roots.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// Which peers a registry's push notification has preheat the pushed image.
    #[arg(long, value_enum, value_name = "SCOPE", default_value = "single-seed-peer")]
    pub notification_scope: Scope,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Args(#[from] SchedulerArgsError),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Credential { path: PathBuf, source: CredentialError },
    #[error("--upstream-ca-file {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Scheduler(#[from] damselfly_scheduler::SchedulerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Runs `damselfly scheduler` until `stop` resolves, then shuts down.
pub async fn run(args: SchedulerArgs, stop: impl Future<Output = ()>) -> Result<(), RunError> {
    let config = args.core.to_config()?;
    let forward_credentials = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let control = args.control_config(forward_credentials)?;
    let bind = |addr| async move { TcpListener::bind(addr).await.map_err(|source| RunError::Bind { addr, source }) };
    let grpc = bind(args.core.listen).await?;
    let http = bind(args.core.http_listen).await?;
    let store = match &args.job_store {
        Some(url) => JobStore::open(url).await?,
        None => JobStore::open_in(&args.data_dir()).await?,
    };
    let scheduler = damselfly_scheduler::start(config, grpc, None).await?;
    let control = crate::start(control, scheduler.scheduler().clone(), store, http).await?;
    stop.await;
    tracing::info!("shutting down");
    control.shutdown().await;
    scheduler.shutdown().await;
    Ok(())
}

impl SchedulerArgs {
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| damselfly_mirror::config::default_data_dir().join("scheduler"))
    }

    pub fn control_config(&self, forward_credentials: bool) -> Result<ControlConfig, RunError> {
        let text = |path: &Option<PathBuf>| -> Result<Option<String>, RunError> {
            path.as_deref().map(|p| read(p).map(|b| String::from_utf8_lossy(&b).into_owned())).transpose()
        };
        let (bearer, basic, header) =
            (text(&self.preheat_token_file)?, text(&self.preheat_basic_auth_file)?, text(&self.preheat_header_file)?);
        let credentials =
            Credentials::from_texts(bearer.as_deref(), basic.as_deref(), header.as_deref()).map_err(|source| {
                let path = [&self.preheat_token_file, &self.preheat_basic_auth_file, &self.preheat_header_file]
                    .into_iter()
                    .flatten()
                    .next()
                    .cloned()
                    .unwrap_or_default();
                RunError::Credential { path, source }
            })?;
        let extra_roots = match &self.upstream_ca_file {
            Some(path) => damselfly_serve::pem_certificates(&read(path)?)
                .map_err(|e| RunError::Ca { path: path.clone(), reason: e.to_string() })?,
            None => Vec::new(),
        };
        Ok(ControlConfig {
            credentials,
            upstream: UpstreamConfig {
                allow_registries: self.allow_registries.clone(),
                insecure_registries: self.insecure_registries.clone(),
                extra_roots,
                ..UpstreamConfig::default()
            },
            notification_scope: self.notification_scope,
            lease: DEFAULT_LEASE,
            forward_credentials,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::Read { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SchedulerArgs,
    }

    #[test]
    fn credentials_come_from_their_files_and_bad_ones_stop_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p.to_str().expect("utf-8").to_owned()
        };
        let (token, basic) = (file("token", "tok\n"), file("basic", "nocolon"));
        let parse = |argv: &[&str]| {
            let all: Vec<&str> = ["scheduler", "--insecure-cluster"].iter().chain(argv).copied().collect();
            Cli::try_parse_from(all).expect("parses").args
        };
        let config = parse(&["--preheat-token-file", &token]).control_config(false).expect("config");
        assert_eq!(config.credentials.bearer.as_deref(), Some("tok"));
        let err = parse(&["--preheat-basic-auth-file", &basic]).control_config(false).map(drop).expect_err("bad basic");
        assert!(err.to_string().contains("user:password"), "{err}");
        let err =
            parse(&["--preheat-token-file", "/nonexistent"]).control_config(false).map(drop).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent"), "{err}");
        let defaults = parse(&[]);
        assert_eq!(defaults.notification_scope, Scope::SingleSeedPeer);
        assert!(defaults.data_dir().ends_with("scheduler"));
        assert!(defaults.control_config(false).expect("open").credentials.is_open());
    }
}
