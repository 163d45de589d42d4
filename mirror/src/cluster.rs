//! Joining a cluster: the node's identity and addresses, and the glue that lets the P2P side
//! ask this mirror for content on a scheduler's request (seed peers).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use damselfly_cache::url::{UrlOrigin, UrlRequest, UrlResponse};
use damselfly_p2p::net::{ClusterTls, NetError, NetMetrics, Node, NodeConfig, OwnerToken, SeedSource};
use damselfly_p2p::{Digest, Source, SourceSpec, Store};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::source::UpstreamSource;
use crate::api::{App, Target};
use crate::config::MirrorConfig;

/// No bytes from any parent for this long: the node takes the rest from the origin.
const STALL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("host id file {path}: {source}")]
    HostId { path: String, source: std::io::Error },
    #[error("cannot tell which address peers reach this node at ({0}); set advertise_ip")]
    AdvertiseIp(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("scheduler TLS: {0}")]
    Tls(String),
    #[error("cluster secret: {0}")]
    Secret(#[from] damselfly_scheduler::SecretError),
    #[error("owner token file {path}: {source}")]
    OwnerToken { path: String, source: std::io::Error },
}

pub struct ClusterParts<'a> {
    /// The scheduler running inside this daemon, if one does.
    pub own_scheduler: Option<OwnScheduler>,
    /// The cluster's CA and this node's certificate, read by [`cluster_tls`].
    pub tls: Option<ClusterTls>,
    /// Read by [`cluster_secret`]; `None` in an insecure cluster.
    pub secret: Option<Vec<u8>>,
    pub config: &'a MirrorConfig,
    pub store: &'a Store,
    pub app: &'a Arc<App>,
    pub upload: TcpListener,
    pub registry: &'a mut Registry,
    pub shutdown: CancellationToken,
    /// The P2P cache on this node: its names are announced, and schedulers ask it for replicas.
    pub cache: Arc<damselfly_cache::Cache>,
}

pub async fn join(parts: ClusterParts<'_>) -> Result<Arc<Node>, ClusterError> {
    let config = parts.config;
    let mut schedulers = config.scheduler_urls()?;
    let upload_addr = parts.upload.local_addr().map_err(|e| ClusterError::AdvertiseIp(e.to_string()))?;
    let advertise_ip = match (config.advertise_ip, schedulers.first()) {
        (Some(ip), _) => ip,
        (None, Some(first)) => advertise_ip(upload_addr, first).await?,
        // Only the scheduler in here: the upload address must say where peers reach us.
        (None, None) if !upload_addr.ip().is_unspecified() => upload_addr.ip(),
        (None, None) => return Err(ClusterError::AdvertiseIp("upload_listen is a wildcard".into())),
    };
    schedulers.extend(parts.own_scheduler.map(|own| own.url(advertise_ip)));
    let host_id = match &config.host_id {
        Some(id) => id.clone(),
        None => host_id(&config.data_dir)?,
    };
    let owner = owner_token(&config.data_dir)?;
    let cfg = NodeConfig {
        schedulers,
        owner,
        cluster_secret: parts.secret,
        cluster_tls: parts.tls,
        peer_tls: config.peer_tls,
        share_tokens_with_seeds: config.share_tokens_with_seeds,
        host_id,
        advertise_ip,
        upload_port: upload_addr.port(),
        idc: config.idc.clone(),
        location: config.location.clone(),
        seed: config.seed,
        upload_rate: config.upload_rate_limit.map(|b| b.0),
        download_rate: config.download_rate_limit.map(|b| b.0),
        max_uploads: config.max_uploads,
        stall_timeout: STALL_TIMEOUT,
        seed_source: Some(Arc::new(Seeder { app: parts.app.clone(), allowed: SeedRegistries::of(config) })),
        cache: Some(parts.cache.clone()),
    };
    if config.seed {
        parts
            .cache
            .set_url_origin(Arc::new(FileOrigin { app: parts.app.clone(), allowed: SeedRegistries::of(config) }));
    }
    tracing::info!(host_id = %cfg.host_id, advertise = %advertise_ip, upload = %upload_addr, seed = cfg.seed, "joining the cluster");
    let metrics = NetMetrics::register(parts.registry);
    Ok(Node::start(cfg, parts.store.clone(), parts.upload, metrics, parts.shutdown)?)
}

/// Where the scheduler inside this daemon listens.
pub struct OwnScheduler {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl OwnScheduler {
    /// The URL this node reaches it at: over TLS at the advertised address, which the node's
    /// certificate names; otherwise at its own address, or loopback for a wildcard.
    fn url(&self, advertise_ip: IpAddr) -> String {
        let unspecified = self.addr.ip().is_unspecified();
        if self.tls {
            let ip = if unspecified { advertise_ip } else { self.addr.ip() };
            return format!("https://{}", SocketAddr::new(ip, self.addr.port()));
        }
        let ip = if unspecified { IpAddr::from([127, 0, 0, 1]) } else { self.addr.ip() };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }
}

/// TLS for the scheduler inside this daemon: the node's certificate, with client
/// certificates from the cluster's CA required. None without a certificate.
pub fn own_scheduler_tls(tls: Option<&ClusterTls>, seed_name: Option<&str>) -> Option<damselfly_scheduler::ServerTls> {
    let (tls, (cert, key)) = tls.and_then(|t| Some((t, t.identity.as_ref()?)))?;
    Some(damselfly_scheduler::ServerTls {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: Some(tls.ca.clone()),
        seed_name: seed_name.map(str::to_owned),
    })
}

/// Reads the PEM files named in the config, once at start (validated already: a CA whenever
/// a scheduler is `https://` or this daemon's scheduler serves TLS, a certificate only with its
/// key). The PEM is parsed here so that a wrong file stops the daemon at start instead of
/// turning every scheduler call into a failed handshake.
pub fn cluster_tls(config: &MirrorConfig) -> Result<Option<ClusterTls>, ClusterError> {
    let Some(ca) = &config.cluster_ca else { return Ok(None) };
    let identity = match (&config.cluster_cert, &config.cluster_key) {
        (Some(cert), Some(key)) => Some((read_pem(cert, Pem::Certificates)?, read_pem(key, Pem::Key)?)),
        _ => None,
    };
    Ok(Some(ClusterTls { ca: read_pem(ca, Pem::Certificates)?, identity }))
}

enum Pem {
    Certificates,
    Key,
}

fn read_pem(path: &Path, what: Pem) -> Result<Vec<u8>, ClusterError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let fail = |e: &dyn std::fmt::Display| ClusterError::Tls(format!("{}: {e}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| fail(&e))?;
    match what {
        Pem::Certificates => {
            damselfly_serve::pem_certificates(&bytes).map_err(|e| fail(&e))?;
        }
        Pem::Key => {
            PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| fail(&e))?;
        }
    }
    Ok(bytes)
}

/// The upload address when it is a specific one; otherwise the local address the kernel
/// would use to reach the first scheduler.
async fn advertise_ip(upload: SocketAddr, scheduler: &str) -> Result<IpAddr, ClusterError> {
    if !upload.ip().is_unspecified() {
        return Ok(upload.ip());
    }
    let fail = |e: &dyn std::fmt::Display| ClusterError::AdvertiseIp(e.to_string());
    let url = url::Url::parse(scheduler).map_err(|e| fail(&e))?;
    let host = url.host_str().ok_or_else(|| fail(&"scheduler URL without a host"))?;
    let port = url.port_or_known_default().unwrap_or(8002);
    let target = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| fail(&e))?
        .next()
        .ok_or_else(|| fail(&"scheduler host does not resolve"))?;
    let bind: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    // A connected UDP socket sends nothing; it only asks the routing table for a source address.
    let sock = std::net::UdpSocket::bind(bind).map_err(|e| fail(&e))?;
    sock.connect(target).map_err(|e| fail(&e))?;
    Ok(sock.local_addr().map_err(|e| fail(&e))?.ip())
}

/// The cluster secret (`secret_file`, else the environment), read once at start. A node
/// without one joins only schedulers that require its certificate, or an insecure cluster.
pub fn cluster_secret(config: &MirrorConfig) -> Result<Option<Vec<u8>>, ClusterError> {
    let secret = damselfly_scheduler::load_secret(config.secret_file.as_deref())?;
    match secret {
        Some(secret) => Ok(Some(secret)),
        None if config.insecure_cluster => {
            tracing::warn!(
                "insecure cluster: this node proves no membership, and only schedulers that take anyone take it"
            );
            Ok(None)
        }
        // Its certificate proves membership to schedulers that require one.
        None if config.cluster_cert.is_some() => Ok(None),
        None => Err(damselfly_scheduler::SecretError::Missing.into()),
    }
}

/// The owner token kept in the data dir (owner-only), created on first use: what makes this
/// node's host id its own at the schedulers, across restarts.
fn owner_token(data_dir: &Path) -> Result<OwnerToken, ClusterError> {
    let path = data_dir.join("owner-token");
    let err = |source| ClusterError::OwnerToken { path: path.display().to_string(), source };
    let hex = kept(&path, 0o600, || OwnerToken::new(rand::random()).to_hex()).map_err(err)?;
    OwnerToken::parse(&hex)
        .ok_or_else(|| err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not 64 hex digits")))
}

/// The host id kept in the data dir, created on first use.
fn host_id(data_dir: &Path) -> Result<String, ClusterError> {
    let path = data_dir.join("host-id");
    kept(&path, 0o644, || format!("host-{:016x}", rand::random::<u64>()))
        .map_err(|source| ClusterError::HostId { path: path.display().to_string(), source })
}

/// The value in the one-line file at `path`, or a new one from `make`, written there (with
/// `mode`, through a temporary file) for the next start.
fn kept(path: &Path, mode: u32, make: impl FnOnce() -> String) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(v) if !v.trim().is_empty() => return Ok(v.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let value = make();
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    file.write_all(format!("{value}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(value)
}

/// Fetches content for the cluster from the registry a scheduler named, never with its own
/// credentials (the task was registered by some node of the cluster, and a seed must not lend
/// it its credentials): anonymously, or with the short-lived token the registering node's
/// client read the blob with, when the scheduler passed one on.
struct Seeder {
    app: Arc<App>,
    allowed: SeedRegistries,
}

/// The registries a seed fetches from for the cluster. Anyone who can reach a scheduler can
/// register a download naming any registry: without a limit, a seed would send requests
/// wherever a stranger pointed it.
#[derive(Debug, PartialEq)]
enum SeedRegistries {
    Any,
    /// Hosts as the upstream names them (`host[:port]`, Docker Hub as its API host).
    Hosts(std::collections::HashSet<String>),
}

impl SeedRegistries {
    fn of(config: &MirrorConfig) -> Self {
        if config.seed_registries.iter().any(|h| h == "*") {
            return SeedRegistries::Any;
        }
        let named: Vec<&str> = if config.seed_registries.is_empty() {
            let auth = config.registry_auth.iter().map(|a| a.host.as_str());
            let insecure = config.insecure_registries.iter().map(String::as_str);
            std::iter::once(config.registry_mirror.as_str()).chain(insecure).chain(auth).collect()
        } else {
            config.seed_registries.iter().map(String::as_str).collect()
        };
        SeedRegistries::Hosts(named.into_iter().filter_map(|h| crate::upstream::canonical_host(h).ok()).collect())
    }

    fn allows(&self, host: &str) -> bool {
        match self {
            SeedRegistries::Any => true,
            SeedRegistries::Hosts(hosts) => hosts.contains(host),
        }
    }
}

impl SeedSource for Seeder {
    fn source(&self, spec: &SourceSpec, digest: &Digest) -> Option<Arc<dyn Source>> {
        // Any node can register a download naming any repository: only a well-formed name
        // becomes a path at the registry.
        if !crate::oci::route::is_valid_name(&spec.repository) {
            tracing::warn!(repository = %spec.repository, %digest, "not seeding a malformed repository name");
            return None;
        }
        let registry = self.app.upstream.select(Some(&spec.registry), None).ok()?;
        if !self.allowed.allows(&registry.host) {
            tracing::warn!(registry = %registry.host, %digest, "not seeding from a registry outside seed_registries");
            return None;
        }
        // A credential came from the node whose client could read the blob (over TLS, through
        // the scheduler); without one the seed asks as anyone would.
        let client_auth = spec.credential.as_deref().and_then(credential);
        let target = Target { registry, repo: spec.repository.clone(), client_auth, digest: digest.clone() };
        Some(Arc::new(UpstreamSource::for_seed(self.app.clone(), target)))
    }
}

/// A credential the scheduler passed on, as a header value kept out of logs.
fn credential(value: &str) -> Option<http::HeaderValue> {
    let mut v = http::HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// How a seed fetches a preheated file from its origin: through the upstream rules, from the
/// hosts it seeds from only (`seed_registries`), with the job's credential if the scheduler
/// passed one on, never the daemon's configured ones.
struct FileOrigin {
    app: Arc<App>,
    allowed: SeedRegistries,
}

impl UrlOrigin for FileOrigin {
    fn get(&self, req: UrlRequest) -> BoxFuture<'static, Result<UrlResponse, String>> {
        let app = self.app.clone();
        let host = app.upstream.select_url(&req.url).ok().map(|(endpoint, _)| endpoint);
        let allowed = host.as_ref().is_some_and(|h| self.allowed.allows(&h.host));
        Box::pin(async move {
            let Some(host) = host else { return Err(format!("{}: not a URL this node may fetch", req.url)) };
            if !allowed {
                return Err(format!("{} is outside seed_registries", host.host));
            }
            let mut headers = http::HeaderMap::new();
            let mut put = |name: http::header::HeaderName, value: &Option<String>| {
                if let Some(v) = value.as_deref().and_then(|v| http::HeaderValue::from_str(v).ok()) {
                    headers.insert(name, v);
                }
            };
            put(http::header::IF_MATCH, &req.if_match);
            put(http::header::IF_UNMODIFIED_SINCE, &req.if_unmodified_since);
            let auth = req.authorization.as_deref().and_then(credential);
            let resp = app
                .upstream
                .send_url(http::Method::GET, &req.url, headers, auth.as_ref(), None)
                .await
                .map_err(|e| e.to_string())?;
            let text =
                |name| resp.headers().get(name).and_then(|v: &http::HeaderValue| v.to_str().ok()).map(str::to_owned);
            let (etag, last_modified) = (text(http::header::ETAG), text(http::header::LAST_MODIFIED));
            let status = resp.status().as_u16();
            let length = resp.content_length();
            let body = resp.bytes_stream().map(|c| c.map_err(|e| e.to_string())).boxed();
            Ok(UrlResponse { status, etag, last_modified, length, body })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_tls_files_are_checked_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p
        };
        let cert = write("cert.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let key = write("key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let junk = write("junk.pem", "not a certificate");
        let config = |ca: &Path, key: &Path| MirrorConfig {
            schedulers: vec!["https://s:1".into()],
            cluster_ca: Some(ca.to_owned()),
            cluster_cert: Some(cert.clone()),
            cluster_key: Some(key.to_owned()),
            ..MirrorConfig::default()
        };
        let tls = cluster_tls(&config(&cert, &key)).expect("valid").expect("tls");
        assert!(tls.identity.is_some());
        assert!(cluster_tls(&config(&junk, &key)).is_err(), "a CA file without certificates");
        assert!(cluster_tls(&config(&cert, &cert)).is_err(), "a certificate where the key belongs");
        assert!(cluster_tls(&config(&dir.path().join("missing.pem"), &key)).is_err());
        assert!(cluster_tls(&MirrorConfig::default()).expect("no tls").is_none());
    }

    #[test]
    fn the_host_id_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = host_id(dir.path()).expect("created");
        assert!(a.starts_with("host-") && a.len() == 21, "{a}");
        assert_eq!(host_id(dir.path()).expect("read back"), a);
        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(host_id(other.path()).expect("created"), a);
    }

    #[test]
    fn seeds_fetch_only_from_the_registries_they_are_told_of() {
        let mut config = MirrorConfig { insecure_registries: vec!["Reg.local:5000".into()], ..Default::default() };
        let default = SeedRegistries::of(&config);
        // The default upstream, https://index.docker.io, is Docker Hub's API host.
        assert!(default.allows(crate::upstream::DOCKER_HUB_HOST));
        assert!(default.allows("reg.local:5000"));
        assert!(!default.allows("reg.local"));
        assert!(!default.allows("169.254.169.254"));
        config.seed_registries = vec!["ghcr.io".into(), "docker.io".into()];
        let listed = SeedRegistries::of(&config);
        assert!(listed.allows("ghcr.io") && listed.allows(crate::upstream::DOCKER_HUB_HOST));
        assert!(!listed.allows("reg.local:5000"), "a list replaces the default");
        config.seed_registries.push("*".into());
        assert_eq!(SeedRegistries::of(&config), SeedRegistries::Any);
    }

    #[tokio::test]
    async fn a_specific_upload_address_is_advertised_as_is() {
        let ip = advertise_ip("127.0.0.7:65002".parse().expect("addr"), "http://10.1.1.1:8002").await;
        assert_eq!(ip.expect("ip"), IpAddr::from([127, 0, 0, 7]));
        let routed = advertise_ip("0.0.0.0:65002".parse().expect("addr"), "http://127.0.0.1:8002").await;
        assert_eq!(routed.expect("ip"), IpAddr::from([127, 0, 0, 1]));
    }
}
