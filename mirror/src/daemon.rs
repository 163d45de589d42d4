//! The node daemon as a library: given a config and bound listeners, run the mirror API, the
//! health endpoint and the metrics endpoint until shut down. `main` and the tests both use it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use damselfly_p2p::{Metrics as StoreMetrics, Store, StoreConfig, StoreError};
use http::{Request, Response};
use http_body_util::Full;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::api::metrics::ApiMetrics;
use crate::api::App;
use crate::config::MirrorConfig;
use crate::proxy::{InterceptCa, Proxy, ProxyConfig};
use crate::upstream::{RegistryCredential, Upstream, UpstreamConfig, UpstreamError};
use damselfly_serve::{serve, serve_with};

/// Dragonfly's dfdaemon answers health checks at `/server/ping`; `/healthy` is the project's own.
const HEALTH_PATHS: &[&str] = &["/server/ping", "/healthy"];

pub struct Listeners {
    pub api: TcpListener,
    pub health: TcpListener,
    pub metrics: TcpListener,
    /// The piece upload server's; bound only when the node is part of a cluster.
    pub upload: Option<TcpListener>,
    /// An in-process scheduler's gRPC listener (`scheduler_listen`).
    pub scheduler: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &MirrorConfig) -> std::io::Result<Listeners> {
        Ok(Listeners {
            api: TcpListener::bind(config.listen).await?,
            health: TcpListener::bind(config.health_listen).await?,
            metrics: TcpListener::bind(config.metrics_listen).await?,
            upload: match config.in_cluster() {
                true => Some(TcpListener::bind(config.upload_listen).await?),
                false => None,
            },
            scheduler: match config.scheduler_listen {
                Some(addr) => Some(TcpListener::bind(addr).await?),
                None => None,
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("in-process scheduler: {0}")]
    Scheduler(#[from] damselfly_scheduler::SchedulerError),
    #[error("in-process scheduler: {0}")]
    SchedulerSecret(#[from] damselfly_scheduler::SecretError),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("mirror TLS: {0}")]
    Tls(String),
    #[error("P2P cache: {0}")]
    Cache(#[from] damselfly_cache::CacheError),
    #[error("P2P cache socket: {0}")]
    CacheSocket(std::io::Error),
}

pub struct Running {
    pub api_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Where other peers fetch pieces, in a cluster.
    pub upload_addr: Option<SocketAddr>,
    /// The in-process scheduler's gRPC address, when one runs.
    pub scheduler_addr: Option<SocketAddr>,
    scheduler: Option<damselfly_scheduler::Running>,
    node: Option<Arc<damselfly_p2p::net::Node>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    proxy: Arc<Proxy>,
    store: Store,
}

pub async fn start(config: MirrorConfig, listeners: Listeners) -> Result<Running, DaemonError> {
    let mut registry = Registry::default();
    let store_metrics = Arc::new(StoreMetrics::register(&mut registry));
    let store = Store::open(
        StoreConfig {
            dir: config.data_dir.clone(),
            quota: config.cache_quota.0,
            direct_io: config.cache_direct_io,
            max_tasks: damselfly_p2p::DEFAULT_MAX_TASKS,
        },
        store_metrics,
    )?;
    // The store's lock is held now: no other daemon serves this data directory's socket.
    let cache = damselfly_cache::Cache::open(store.clone(), &config.data_dir)?;
    let admin = damselfly_cache::server::bind(&config.data_dir).map_err(DaemonError::CacheSocket)?;
    let extra_roots = match &config.upstream_ca_file {
        Some(file) => read_certificates(file)?,
        None => Vec::new(),
    };
    let upstream = Upstream::new(UpstreamConfig {
        default_registry: config.registry_mirror.clone(),
        insecure_registries: config.insecure_registries.clone(),
        credentials: config
            .registry_auth
            .iter()
            .map(|a| RegistryCredential {
                host: a.host.clone(),
                username: a.username.clone(),
                password: a.password.clone(),
            })
            .collect(),
        allow_registries: config.allow_registries.clone(),
        extra_roots: extra_roots.clone(),
        connect_timeout: Duration::from_secs(5),
        read_timeout: crate::upstream::READ_TIMEOUT,
        internal_by_address: true,
    })?;
    let app = Arc::new(App {
        upstream,
        store: store.clone(),
        access: Default::default(),
        tags: Default::default(),
        metrics: ApiMetrics::register(&mut registry),
        // A seed is there to hold whole blobs for the others: a range read fills the rest.
        background_fill: config.background_fill || config.seed,
        registry_in_path: config.registry_in_path,
    });
    let shutdown = CancellationToken::new();
    let upload_addr = listeners.upload.as_ref().map(|l| l.local_addr()).transpose()?;
    if let Some(var) = proxy_env_naming(listeners.api.local_addr()?, |v| std::env::var(v).ok()) {
        return Err(DaemonError::Proxy(format!(
            "{var} names this daemon's own port: its requests to registries would go round through itself; \
             unset it for the daemon (or add the registries to NO_PROXY)"
        )));
    }
    let api_tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let read =
                |p: &std::path::Path| std::fs::read(p).map_err(|e| DaemonError::Tls(format!("{}: {e}", p.display())));
            let acceptor = damselfly_serve::server_tls(&read(cert)?, &read(key)?);
            Some(acceptor.map_err(|e| DaemonError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?)
        }
        _ => None,
    };
    let tls = match config.in_cluster() {
        true => crate::cluster::cluster_tls(&config)?,
        false => None,
    };
    let secret = match config.in_cluster() {
        true => crate::cluster::cluster_secret(&config)?,
        false => None,
    };
    let seed_name = config.scheduler_seed_name.as_deref();
    let (scheduler, own_scheduler) =
        start_scheduler(listeners.scheduler, tls.as_ref(), seed_name, secret.clone()).await?;
    let scheduler_addr = scheduler.as_ref().map(|s| s.grpc_addr);
    let node = match listeners.upload {
        Some(upload) => {
            let parts = crate::cluster::ClusterParts {
                own_scheduler,
                tls,
                secret,
                config: &config,
                store: &store,
                app: &app,
                upload,
                registry: &mut registry,
                shutdown: shutdown.clone(),
                cache: cache.clone(),
            };
            let node = crate::cluster::join(parts).await?;
            cache.attach(&node);
            Some(node)
        }
        None => None,
    };
    let registry = Arc::new(Mutex::new(registry));
    let sched_metrics = scheduler.as_ref().map(|s| s.scheduler().clone());
    let addrs = (listeners.api.local_addr()?, listeners.health.local_addr()?, listeners.metrics.local_addr()?);
    let ca = match config.proxy_intercept.is_empty() {
        true => None,
        false => {
            let (cert, key) = (config.proxy_ca_cert.as_deref(), config.proxy_ca_key.as_deref());
            Some(Arc::new(InterceptCa::load_or_create(cert, key, &config.data_dir).map_err(DaemonError::Proxy)?))
        }
    };
    let proxy_config = ProxyConfig {
        rules: config.proxy_rules.clone(),
        allow: config.proxy_allow.clone(),
        intercept: config.proxy_intercept.clone(),
        ca,
        extra_roots,
        files: Some(cache.clone()),
    };
    let proxy = {
        let mut registry = registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Proxy::new(app.clone(), &proxy_config, &mut registry, shutdown.clone()).map_err(DaemonError::Proxy)?
    };
    let proxy = Arc::new(proxy);
    let proxy_handle = proxy.clone();
    let api = {
        let app = app.clone();
        move |req: Request<hyper::body::Incoming>| {
            let (app, proxy) = (app.clone(), proxy.clone());
            async move {
                match Proxy::claims(&req) {
                    true => proxy.handle(req).await,
                    false => app.handle(req).await,
                }
            }
        }
    };
    let metrics = move |req: Request<hyper::body::Incoming>| {
        let registry = registry.clone();
        let sched = sched_metrics.clone();
        async move { metrics_response(&req, &registry, sched.as_ref()) }
    };
    let tasks = vec![
        tokio::spawn(serve_with(listeners.api, api_tls, api, shutdown.clone())),
        tokio::spawn(serve(
            listeners.health,
            |req| async move { damselfly_serve::health(req.uri().path(), HEALTH_PATHS) },
            shutdown.clone(),
        )),
        tokio::spawn(serve(listeners.metrics, metrics, shutdown.clone())),
        tokio::spawn(damselfly_cache::server::serve(cache.clone(), admin, shutdown.clone())),
        tokio::spawn(cache.expire(shutdown.clone())),
    ];
    tracing::info!(api = %addrs.0, health = %addrs.1, metrics = %addrs.2, data_dir = %config.data_dir.display(), "damselfly mirror started");
    Ok(Running {
        api_addr: addrs.0,
        health_addr: addrs.1,
        metrics_addr: addrs.2,
        upload_addr,
        scheduler_addr,
        scheduler,
        node,
        shutdown,
        tasks,
        proxy: proxy_handle,
        store,
    })
}

impl Running {
    /// Stops accepting, drains open connections briefly, and persists the cache's metadata.
    pub async fn shutdown(self) {
        if let Some(node) = &self.node {
            // Before the upload server stops, so that no scheduler sends children here.
            node.leave().await;
        }
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.proxy.closed().await;
        if let Some(s) = self.scheduler {
            s.shutdown().await;
        }
        self.store.flush_all();
    }

    /// Stops at once, as a crash would as far as peers can tell: the schedulers are not told,
    /// open connections are cut. The cache metadata is still persisted.
    pub async fn kill(self) {
        if let Some(node) = &self.node {
            node.abort_uploads();
        }
        self.shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.proxy.closed().await;
        if let Some(s) = self.scheduler {
            s.shutdown().await;
        }
        self.store.flush_all();
    }
}

/// Starts the in-process scheduler, if asked for; returns it and where this node reaches it.
/// With `cluster_cert` it serves TLS (mutual, with `cluster_ca`) under the node's certificate.
async fn start_scheduler(
    listener: Option<TcpListener>,
    tls: Option<&damselfly_p2p::net::ClusterTls>,
    seed_name: Option<&str>,
    secret: Option<Vec<u8>>,
) -> Result<(Option<damselfly_scheduler::Running>, Option<crate::cluster::OwnScheduler>), DaemonError> {
    let Some(listener) = listener else { return Ok((None, None)) };
    // The node's own secret: it and the others it serves prove membership with it, or with
    // their certificates when this scheduler requires them. Without either the node was
    // started insecure (`cluster_secret` refuses it otherwise), and so is its scheduler.
    let tls = crate::cluster::own_scheduler_tls(tls, seed_name);
    let mut config = match secret {
        Some(secret) => damselfly_scheduler::SchedulerConfig::for_cluster(Some(secret), false)?,
        None => damselfly_scheduler::SchedulerConfig { insecure: tls.is_none(), ..Default::default() },
    };
    config.tls = tls;
    let tls = config.tls.is_some();
    let running = damselfly_scheduler::start(config, listener, None).await?;
    tracing::info!(grpc = %running.grpc_addr, tls, "in-process scheduler started");
    let own = crate::cluster::OwnScheduler { addr: running.grpc_addr, tls };
    Ok((Some(running), Some(own)))
}

/// The daemon's metrics, and those of the scheduler it runs in-process if it does.
fn metrics_response<B>(
    req: &Request<B>,
    registry: &Mutex<Registry>,
    scheduler: Option<&damselfly_scheduler::Scheduler>,
) -> Response<Full<Bytes>> {
    damselfly_serve::metrics(req.uri().path(), |out| {
        let registry = registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode_registry(out, &registry)?;
        scheduler.map_or(Ok(()), |s| s.metrics().encode_families(out))
    })
}

/// The proxy variable (`HTTPS_PROXY` and the like, read with `env`) that names `api`, the
/// daemon's own mirror port, if one does.
fn proxy_env_naming(api: SocketAddr, env: impl Fn(&str) -> Option<String>) -> Option<&'static str> {
    const VARS: [&str; 6] = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"];
    VARS.into_iter().find(|var| {
        let Some(url) = env(var).and_then(|v| url::Url::parse(&v).ok()) else { return false };
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => std::net::IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => std::net::IpAddr::V6(v6),
            Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => std::net::IpAddr::from([127, 0, 0, 1]),
            _ => return false,
        };
        let same_ip = ip == api.ip() || (api.ip().is_unspecified() && ip.is_loopback());
        url.port_or_known_default() == Some(api.port()) && same_ip
    })
}

/// The PEM certificates in `file`, at least one.
fn read_certificates(file: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, DaemonError> {
    let fail = |e: &dyn std::fmt::Display| DaemonError::Tls(format!("{}: {e}", file.display()));
    let pem = std::fs::read(file).map_err(|e| fail(&e))?;
    damselfly_serve::pem_certificates(&pem).map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_variable_naming_the_daemons_own_port_is_found() {
        let api: SocketAddr = "127.0.0.1:65001".parse().expect("addr");
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |var: &str| pairs.iter().find(|(k, _)| *k == var).map(|(_, v)| v.to_string())
        };
        assert_eq!(proxy_env_naming(api, env(&[("HTTPS_PROXY", "http://127.0.0.1:65001")])), Some("HTTPS_PROXY"));
        assert_eq!(proxy_env_naming(api, env(&[("http_proxy", "http://localhost:65001/")])), Some("http_proxy"));
        assert_eq!(proxy_env_naming(api, env(&[("HTTPS_PROXY", "http://127.0.0.1:3128")])), None);
        assert_eq!(proxy_env_naming(api, env(&[("HTTPS_PROXY", "http://proxy.corp:65001")])), None);
        let any: SocketAddr = "0.0.0.0:65001".parse().expect("addr");
        assert_eq!(proxy_env_naming(any, env(&[("ALL_PROXY", "http://127.0.0.1:65001")])), Some("ALL_PROXY"));
    }
}
