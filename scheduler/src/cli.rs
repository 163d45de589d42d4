//! The scheduler's flags of `damselfly scheduler` and their translation into its
//! configuration. The subcommand itself (these flags beside the control plane's, and the
//! process's life) is `damselfly-control`'s, which composes the scheduler with its HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use damselfly_serve::LogFormat;

use crate::config::{env_secret, secret_from, SchedulerConfig, SecretError, ServerTls};

#[derive(Debug, Clone, Args)]
pub struct SchedulerArgs {
    /// gRPC address node daemons connect to.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8002")]
    pub listen: SocketAddr,
    /// HTTP address of /healthy, /metrics, the preheat API and the console.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// File holding the cluster secret (or DAMSELFLY_SCHEDULER_SECRET): nodes prove they
    /// belong to the cluster with it, and upload tokens derive from it. Every node and
    /// scheduler of the cluster shares it.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Run without a cluster secret: anyone who reaches the gRPC port is taken as a member
    /// (a lab on a closed network only).
    #[arg(long)]
    pub insecure_cluster: bool,
    /// Peers of one task that may fetch from the origin at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub origin_limit: usize,
    /// Parents handed to a download at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub max_parents: usize,
    /// Never pick a parent from another idc than the child's.
    #[arg(long)]
    pub idc_only: bool,
    /// Seconds between host announcements; silent hosts expire after three.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub announce_interval: u64,
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: nodes must present a certificate that chains to one (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Only nodes whose certificate is valid for this DNS name or IP address may be seeds (and
    /// receive the tokens nodes share with seeds); others announcing `--seed` are taken as
    /// ordinary nodes. Without it, any certificate from --tls-client-ca may seed.
    #[arg(long, value_name = "NAME", requires = "tls_client_ca")]
    pub tls_seed_name: Option<String>,
    /// Log output format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "human")]
    pub log_format: LogFormat,
    /// Log filter in EnvFilter syntax; RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerArgsError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

impl SchedulerArgs {
    pub fn to_config(&self) -> Result<SchedulerConfig, SchedulerArgsError> {
        self.to_config_with(env_secret())
    }

    fn to_config_with(&self, env_secret: Option<Vec<u8>>) -> Result<SchedulerConfig, SchedulerArgsError> {
        let secret = secret_from(self.secret_file.as_deref(), env_secret)?;
        let mut cfg = match (secret, self.insecure_cluster, self.tls_client_ca.is_some()) {
            // Members prove themselves by certificate; upload keys come from a random secret.
            (None, false, true) => SchedulerConfig::default(),
            (secret, insecure, _) => SchedulerConfig::for_cluster(secret, insecure)?,
        };
        for (name, v) in [("origin-limit", self.origin_limit), ("max-parents", self.max_parents)] {
            if v == 0 {
                return Err(SchedulerArgsError::Zero(name));
            }
        }
        if self.announce_interval == 0 {
            return Err(SchedulerArgsError::Zero("announce-interval"));
        }
        cfg.origin_limit = self.origin_limit;
        cfg.max_parents = self.max_parents;
        cfg.idc_only = self.idc_only;
        cfg.announce_interval = Duration::from_secs(self.announce_interval);
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.tls = Some(ServerTls {
                cert: read(cert)?,
                key: read(key)?,
                client_ca: self.tls_client_ca.as_deref().map(read).transpose()?,
                seed_name: self.tls_seed_name.clone(),
            });
        }
        Ok(cfg)
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, SchedulerArgsError> {
    std::fs::read(path).map_err(|source| SchedulerArgsError::Read { path: path.to_owned(), source })
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

    fn args(extra: &[&str]) -> SchedulerArgs {
        let argv = ["scheduler"].iter().chain(extra);
        Cli::try_parse_from(argv).expect("parses").args
    }

    #[test]
    fn defaults_follow_the_documented_ports() {
        let a = args(&["--insecure-cluster"]);
        assert_eq!((a.listen.port(), a.http_listen.port()), (8002, 8080));
        let cfg = a.to_config_with(None).expect("config");
        assert_eq!((cfg.origin_limit, cfg.max_parents, cfg.idc_only), (1, 4, false));
    }

    #[test]
    fn a_scheduler_without_a_secret_refuses_to_start_unless_insecure() {
        let err = args(&[]).to_config_with(None).expect_err("no secret");
        assert!(err.to_string().contains("--insecure-cluster"), "{err}");
        assert!(args(&["--insecure-cluster"]).to_config_with(None).expect("lab").insecure);
        let secured = args(&[]).to_config_with(Some(b"0123456789abcdef".to_vec())).expect("secret");
        assert!(!secured.insecure);
    }

    #[test]
    fn a_shared_secret_comes_from_the_file_or_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        std::fs::write(&file, "0123456789abcdef0123\n").expect("write");
        let a = args(&["--secret-file", file.to_str().expect("utf-8"), "--origin-limit", "2", "--idc-only"]);
        let cfg = a.to_config_with(Some(b"ignored-because-a-file-is-given".to_vec())).expect("config");
        assert_eq!(cfg.secret, b"0123456789abcdef0123");
        assert_eq!((cfg.origin_limit, cfg.idc_only), (2, true));
        let env = args(&[]).to_config_with(Some(b"from-the-environment".to_vec())).expect("config");
        assert_eq!(env.secret, b"from-the-environment");
        assert!(args(&[]).to_config_with(Some(b"short".to_vec())).is_err());
        assert!(args(&["--max-parents", "0", "--insecure-cluster"]).to_config_with(None).is_err());
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key() {
        let argv = |extra: &[&str]| {
            let all = ["scheduler"].iter().chain(extra).copied().collect::<Vec<_>>();
            Cli::try_parse_from(all).map(drop)
        };
        assert!(argv(&["--tls-cert", "c.pem"]).is_err());
        assert!(argv(&["--tls-key", "k.pem"]).is_err());
        assert!(argv(&["--tls-client-ca", "ca.pem"]).is_err());
        assert!(argv(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-seed-name", "seed"]).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "cert").expect("write");
        std::fs::write(&key, "key").expect("write");
        let (c, k) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
        let lab = Some(b"0123456789abcdef".to_vec());
        let tls =
            args(&["--tls-cert", c, "--tls-key", k]).to_config_with(lab.clone()).expect("config").tls.expect("tls");
        assert_eq!((tls.cert.as_slice(), tls.key.as_slice(), tls.client_ca), (&b"cert"[..], &b"key"[..], None));
        let seeds = args(&["--tls-cert", c, "--tls-key", k, "--tls-client-ca", c, "--tls-seed-name", "seed.internal"]);
        let tls = seeds.to_config_with(lab.clone()).expect("config").tls.expect("tls");
        assert_eq!(tls.seed_name.as_deref(), Some("seed.internal"));
        let missing = args(&["--tls-cert", c, "--tls-key", k, "--tls-client-ca", "/nonexistent/ca.pem"]);
        assert!(missing.to_config_with(lab).is_err());
    }
}
