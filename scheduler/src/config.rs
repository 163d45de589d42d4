//! What a scheduler is told at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;

/// The shared token secret of several schedulers, kept out of `ps`.
pub const SECRET_ENV: &str = "DAMSELFLY_SCHEDULER_SECRET";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the cluster secret must be at least 16 bytes")]
    Short,
    #[error("the cluster secret is the example's placeholder; generate one (openssl rand -hex 32)")]
    Placeholder,
    #[error("no cluster secret: give one with --secret-file or {SECRET_ENV} (every node and scheduler of the cluster shares it), or run a lab cluster open to anyone who reaches it with --insecure-cluster")]
    Missing,
}

/// Example secrets that ship in `deploy/`: a cluster running on one is open to anyone who has
/// read the example.
const PLACEHOLDERS: &[&str] = &["replace-me"];

/// The cluster secret in `file`, else in the environment (`SECRET_ENV`); `None` if neither
/// names one.
pub fn load_secret(file: Option<&Path>) -> Result<Option<Vec<u8>>, SecretError> {
    secret_from(file, env_secret())
}

pub(crate) fn env_secret() -> Option<Vec<u8>> {
    std::env::var_os(SECRET_ENV).map(|v| v.into_encoded_bytes())
}

/// The secret in `file`, else `env`; trimmed, and refused when shorter than 16 bytes or a
/// placeholder.
pub(crate) fn secret_from(file: Option<&Path>, env: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, SecretError> {
    let secret = match file {
        Some(path) => Some(std::fs::read(path).map_err(|source| SecretError::Read { path: path.to_owned(), source })?),
        None => env,
    };
    let Some(secret) = secret else { return Ok(None) };
    let trimmed = secret.trim_ascii().to_vec();
    if PLACEHOLDERS.iter().any(|p| trimmed.starts_with(p.as_bytes())) {
        return Err(SecretError::Placeholder);
    }
    if trimmed.len() < 16 {
        return Err(SecretError::Short);
    }
    Ok(Some(trimmed))
}

impl SchedulerConfig {
    /// The defaults for a cluster with `secret`; without one only an `insecure` cluster (which
    /// takes calls from anyone who reaches it) may start.
    pub fn for_cluster(secret: Option<Vec<u8>>, insecure: bool) -> Result<SchedulerConfig, SecretError> {
        let mut cfg = SchedulerConfig { insecure, ..SchedulerConfig::default() };
        match secret {
            Some(secret) => cfg.secret = secret,
            None if insecure => {}
            None => return Err(SecretError::Missing),
        }
        Ok(cfg)
    }
}

#[derive(Clone)]
pub struct SchedulerConfig {
    /// The cluster secret: nodes prove membership with it, and upload tokens derive from it
    /// (schedulers that share it accept each other's tokens).
    pub secret: Vec<u8>,
    /// Take calls without a membership proof (a lab): anyone who reaches the port is a member.
    pub insecure: bool,
    /// Peers of one task allowed to fetch from the origin at once (K).
    pub origin_limit: usize,
    /// Parents per `Parents` message.
    pub max_parents: usize,
    /// Never hand out a parent from another idc when the child names its idc.
    pub idc_only: bool,
    /// Told to hosts; a host silent for three of these and without an open stream expires.
    pub announce_interval: Duration,
    /// Lifetime of the upload tokens in `Parents`.
    pub token_ttl: Duration,
    /// Serve gRPC over TLS (the HTTP port for health and metrics stays plain).
    pub tls: Option<ServerTls>,
}

/// The scheduler's certificate, and the CA its clients' certificates must chain to when
/// nodes are to prove who they are (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    /// PEM: the certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// PEM: the private key of the leaf.
    pub key: Vec<u8>,
    /// PEM: roots a client certificate must chain to; `None` asks nodes for none.
    pub client_ca: Option<Vec<u8>>,
    /// With `client_ca`: a host may be a seed (and so receive the credentials nodes share with
    /// seeds) only if its certificate is valid for this DNS name or IP address. `None` lets any
    /// certificate from `client_ca` announce a seed.
    pub seed_name: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        let mut secret = vec![0; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        SchedulerConfig {
            secret,
            insecure: false,
            origin_limit: 1,
            max_parents: 4,
            idc_only: false,
            announce_interval: Duration::from_secs(30),
            token_ttl: Duration::from_secs(600),
            tls: None,
        }
    }
}

impl std::fmt::Debug for SchedulerConfig {
    // The secret mints tokens for every host: keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerConfig")
            .field("secret", &"<redacted>")
            .field("insecure", &self.insecure)
            .field("origin_limit", &self.origin_limit)
            .field("max_parents", &self.max_parents)
            .field("idc_only", &self.idc_only)
            .field("announce_interval", &self.announce_interval)
            .field("token_ttl", &self.token_ttl)
            .field("tls", &self.tls.as_ref().map(|t| if t.client_ca.is_some() { "mutual" } else { "server" }))
            .field("seed_name", &self.tls.as_ref().and_then(|t| t.seed_name.as_deref()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_default_config_has_its_own_secret_and_debug_hides_it() {
        let (a, b) = (SchedulerConfig::default(), SchedulerConfig::default());
        assert_eq!(a.secret.len(), 32);
        assert_ne!(a.secret, b.secret);
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.secret)));
        assert_eq!((a.origin_limit, a.max_parents, a.announce_interval.as_secs()), (1, 4, 30));
    }

    #[test]
    fn a_cluster_needs_a_real_secret_unless_it_is_insecure() {
        assert!(matches!(SchedulerConfig::for_cluster(None, false), Err(SecretError::Missing)));
        let lab = SchedulerConfig::for_cluster(None, true).expect("insecure");
        assert!(lab.insecure);
        let cfg = SchedulerConfig::for_cluster(Some(b"0123456789abcdef".to_vec()), false).expect("secret");
        assert_eq!((cfg.secret.as_slice(), cfg.insecure), (&b"0123456789abcdef"[..], false));
        let example = b"replace-me-with-openssl-rand-hex-32".to_vec();
        assert!(matches!(secret_from(None, Some(example)), Err(SecretError::Placeholder)));
    }
}
