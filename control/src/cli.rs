//! Two subcommands: `damselfly scheduler` (the scheduler's flags beside the control plane's,
//! and the process's life: bind, serve until asked to stop, shut down), and `damselfly
//! preheat` (a preheat from a terminal through the JSON API, `preheat.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use damselfly_mirror::upstream::UpstreamConfig;
use damselfly_scheduler::cli::{SchedulerArgs as CoreArgs, SchedulerArgsError};
use tokio::net::TcpListener;

use crate::auth::{self, CredentialError, Credentials};
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
    /// instead of the SQLite file in --data-dir. The environment keeps its password out of
    /// the process list.
    #[arg(long, value_name = "URL", env = "DAMSELFLY_JOB_STORE", hide_env_values = true)]
    pub job_store: Option<String>,
    /// File holding the Bearer token the preheat API, notifications and console ask for
    /// (Harbor's OAUTH auth mode); or DAMSELFLY_PREHEAT_TOKEN.
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
    /// How long nodes keep a file preheated from a plain URL (a job of type `file`): a number
    /// and a unit (s, m, h, d).
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = damselfly_proto::cache_name::parse_ttl)]
    pub preheat_file_ttl: Duration,
    /// Which peers a registry's push notification has preheat the pushed image.
    #[arg(long, value_enum, value_name = "SCOPE", default_value = "single_seed_peer")]
    pub notification_scope: Scope,
    /// Serve the preheat API, notifications and the console without any credential, to
    /// whoever reaches --http-listen (a lab on a closed network only).
    #[arg(long)]
    pub insecure_preheat_api: bool,
}

/// The preheat token from the environment, when no file names one.
pub const PREHEAT_TOKEN_ENV: &str = "DAMSELFLY_PREHEAT_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Args(#[from] SchedulerArgsError),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{from}: {source}")]
    Credential { from: String, source: CredentialError },
    #[error(
        "the preheat API needs a credential (--preheat-token-file, --preheat-basic-auth-file, \
         --preheat-header-file or DAMSELFLY_PREHEAT_TOKEN), or --insecure-preheat-api to serve it to anyone"
    )]
    NoCredential,
    #[error("the preheat token is still the example's placeholder: replace it (e.g. openssl rand -hex 32)")]
    PlaceholderToken,
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
        self.control_config_with(forward_credentials, std::env::var(PREHEAT_TOKEN_ENV).ok())
    }

    fn control_config_with(
        &self,
        forward_credentials: bool,
        env_token: Option<String>,
    ) -> Result<ControlConfig, RunError> {
        let text = |path: &Option<PathBuf>| -> Result<Option<String>, RunError> {
            path.as_deref().map(|p| read(p).map(|b| String::from_utf8_lossy(&b).into_owned())).transpose()
        };
        // A bad credential is named by where it came from.
        let bad = |path: &Option<PathBuf>, env: &str| {
            let from = path.as_ref().map_or_else(|| env.to_owned(), |p| p.display().to_string());
            move |source| RunError::Credential { from, source }
        };
        let token = text(&self.preheat_token_file)?.or(env_token);
        let credentials = Credentials {
            bearer: auth::read_bearer(token.as_deref()).map_err(bad(&self.preheat_token_file, PREHEAT_TOKEN_ENV))?,
            basic: auth::read_basic(text(&self.preheat_basic_auth_file)?.as_deref())
                .map_err(bad(&self.preheat_basic_auth_file, ""))?,
            header: auth::read_header(text(&self.preheat_header_file)?.as_deref())
                .map_err(bad(&self.preheat_header_file, ""))?,
        };
        if credentials.bearer.as_deref().is_some_and(|t| t.starts_with("replace-me")) {
            return Err(RunError::PlaceholderToken);
        }
        if credentials.is_open() && !self.insecure_preheat_api {
            return Err(RunError::NoCredential);
        }
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
                ..crate::control_upstream()
            },
            notification_scope: self.notification_scope,
            lease: DEFAULT_LEASE,
            forward_credentials,
            file_ttl: self.preheat_file_ttl,
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
        let (token, basic, good_basic) = (file("token", "tok\n"), file("basic", "nocolon"), file("b2", "a:b"));
        let parse = |argv: &[&str]| {
            let all: Vec<&str> = ["scheduler", "--insecure-cluster"].iter().chain(argv).copied().collect();
            Cli::try_parse_from(all).expect("parses").args
        };
        let config = parse(&["--preheat-token-file", &token]).control_config_with(false, None).expect("config");
        assert_eq!(config.credentials.bearer.as_deref(), Some("tok"));
        let both = parse(&["--preheat-token-file", &token, "--preheat-basic-auth-file", &good_basic]);
        let both = both.control_config_with(false, None).expect("config").credentials;
        assert!(both.bearer.is_some() && both.basic.is_some());
        let err = parse(&["--preheat-token-file", &token, "--preheat-basic-auth-file", &basic])
            .control_config_with(false, None)
            .map(drop)
            .expect_err("bad basic");
        assert!(err.to_string().contains("user:password") && err.to_string().contains("basic"), "{err}");
        let err = parse(&["--preheat-token-file", "/nonexistent"])
            .control_config_with(false, None)
            .map(drop)
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent"), "{err}");
        let placeholder = parse(&[]).control_config_with(false, Some("replace-me-with-openssl-rand-hex-32".into()));
        assert!(matches!(placeholder.map(drop), Err(RunError::PlaceholderToken)));
        let from_env = parse(&[]).control_config_with(false, Some("env-token".into())).expect("env");
        assert_eq!(from_env.credentials.bearer.as_deref(), Some("env-token"));
        let defaults = parse(&[]);
        assert_eq!(defaults.notification_scope, Scope::SingleSeedPeer);
        assert!(defaults.data_dir().ends_with("scheduler"));
    }

    #[test]
    fn the_preheat_api_is_open_only_when_asked_to_be() {
        let parse = |argv: &[&str]| {
            let all: Vec<&str> = ["scheduler", "--insecure-cluster"].iter().chain(argv).copied().collect();
            Cli::try_parse_from(all).expect("parses").args
        };
        let err = parse(&[]).control_config_with(false, None).map(drop).expect_err("no credential");
        assert!(err.to_string().contains("--insecure-preheat-api"), "{err}");
        let open = parse(&["--insecure-preheat-api"]).control_config_with(false, None).expect("open");
        assert!(open.credentials.is_open());
        assert!(!open.upstream.internal_by_address, "jobs reach internal addresses only where named");
    }
}
