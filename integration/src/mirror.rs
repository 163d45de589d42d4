//! Launchers for the daemon under test: in-process through `damselfly_mirror::daemon::start`
//! (the usual way: fast, and its listeners are bound here, so no port races), or as the
//! `damselfly` binary in a child process (for the CLI smoke test).

use std::fs::OpenOptions;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use damselfly_mirror::config::{ByteSize, MirrorConfig, RegistryAuth};
use damselfly_mirror::daemon::{self, Listeners, Running};
use tempfile::TempDir;

use crate::metrics::Metrics;
use crate::util::{free_loopback_port, http_client, loopback, poll_until};

/// Options for [`Mirror::start`]: a daemon config plus where its data lives.
pub struct MirrorOpts {
    /// Listen addresses are overwritten with the listeners the harness binds; `data_dir` with
    /// [`MirrorOpts::data_dir`] or a fresh temp dir.
    pub config: MirrorConfig,
    pub data_dir: Option<PathBuf>,
    /// The loopback address every listener of the daemon binds (127.0.0.1 unless in a cluster).
    pub ip: IpAddr,
}

impl MirrorOpts {
    /// A daemon whose default upstream (for requests without `ns`/header) is `upstream_url`
    /// (`http://127.0.0.1:PORT`), which is also listed as an insecure (plain HTTP) registry so
    /// that `ns=127.0.0.1:PORT` reaches it over HTTP.
    pub fn new(upstream_url: &str) -> MirrorOpts {
        let config = MirrorConfig {
            registry_mirror: upstream_url.to_owned(),
            insecure_registries: vec![host_of(upstream_url).to_owned()],
            ..MirrorConfig::default()
        };
        MirrorOpts { config, data_dir: None, ip: IpAddr::from([127, 0, 0, 1]) }
    }

    /// A cluster node on its own loopback address `ip` (127.0.0.2, ...), known as `host_id`,
    /// steered by the schedulers at `schedulers` (`http://host:port`).
    pub fn cluster(mut self, ip: IpAddr, schedulers: &[String], host_id: &str) -> MirrorOpts {
        self.ip = ip;
        self.config.schedulers = schedulers.to_vec();
        self.config.host_id = Some(host_id.to_owned());
        self.config.secret_file = Some(crate::cluster::secret_file().to_owned());
        self
    }

    /// Runs a scheduler inside this daemon (on the node's address).
    pub fn with_scheduler(mut self) -> MirrorOpts {
        self.config.scheduler_listen = Some(SocketAddr::new(self.ip, 0));
        self.config.secret_file = Some(crate::cluster::secret_file().to_owned());
        self
    }

    pub fn seed(mut self) -> MirrorOpts {
        self.config.seed = true;
        self
    }

    /// Another registry reachable over plain HTTP (a token-auth front, a fault proxy).
    pub fn insecure_registry(mut self, host: &str) -> MirrorOpts {
        self.config.insecure_registries.push(host.to_owned());
        self
    }

    /// Keeps the cache in `dir` (restart tests reuse it across daemons).
    pub fn data_dir(mut self, dir: &Path) -> MirrorOpts {
        self.data_dir = Some(dir.to_owned());
        self
    }

    pub fn cache_quota(mut self, bytes: u64) -> MirrorOpts {
        self.config.cache_quota = ByteSize(bytes);
        self
    }

    pub fn registry_auth(mut self, host: &str, username: &str, password: &str) -> MirrorOpts {
        self.config.registry_auth.push(RegistryAuth {
            host: host.to_owned(),
            username: username.to_owned(),
            password: password.to_owned(),
        });
        self
    }

    pub fn background_fill(mut self, on: bool) -> MirrorOpts {
        self.config.background_fill = on;
        self
    }

    /// Serve the API over HTTPS with this PEM certificate and key.
    pub fn tls(mut self, cert: &Path, key: &Path) -> MirrorOpts {
        (self.config.tls_cert, self.config.tls_key) = (Some(cert.to_owned()), Some(key.to_owned()));
        self
    }
}

/// `http://127.0.0.1:5000/x` → `127.0.0.1:5000`
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// An in-process daemon. Call [`Mirror::shutdown`] to stop it cleanly (restart tests must, so
/// that the next daemon on the same data dir sees a closed store); dropping it without doing so
/// drops the `Running` handle and leaves the rest to the test runtime's teardown.
pub struct Mirror {
    running: Option<Running>,
    pub api_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The piece upload server, for cluster nodes.
    pub upload_addr: Option<SocketAddr>,
    /// The scheduler running inside this daemon, if asked for.
    pub scheduler_addr: Option<SocketAddr>,
    /// `https` when the API is served over TLS.
    scheme: &'static str,
    data_dir: PathBuf,
    _temp_data: Option<TempDir>,
}

impl Mirror {
    /// Binds the API, health and metrics listeners (and the upload listener of a cluster node)
    /// on port 0 of the node's loopback address and starts the daemon on them.
    pub async fn start(opts: MirrorOpts) -> Result<Mirror> {
        let MirrorOpts { mut config, data_dir, ip } = opts;
        let (data_dir, temp) = match data_dir {
            Some(dir) => (dir, None),
            None => {
                let t = tempfile::Builder::new().prefix("damselfly-data-").tempdir()?;
                (t.path().to_owned(), Some(t))
            }
        };
        let bind = || tokio::net::TcpListener::bind(SocketAddr::new(ip, 0));
        let upload = match config.in_cluster() {
            true => Some(bind().await?),
            false => None,
        };
        let scheduler = match config.scheduler_listen {
            Some(_) => Some(bind().await?),
            None => None,
        };
        let listeners =
            Listeners { api: bind().await?, health: bind().await?, metrics: bind().await?, upload, scheduler };
        config.listen = listeners.api.local_addr()?;
        config.health_listen = listeners.health.local_addr()?;
        config.metrics_listen = listeners.metrics.local_addr()?;
        config.data_dir = data_dir.clone();
        let scheme = if config.tls_cert.is_some() { "https" } else { "http" };
        let running = daemon::start(config, listeners).await.map_err(|e| anyhow!("daemon::start: {e}"))?;
        Ok(Mirror {
            upload_addr: running.upload_addr,
            scheduler_addr: running.scheduler_addr,
            api_addr: running.api_addr,
            health_addr: running.health_addr,
            metrics_addr: running.metrics_addr,
            running: Some(running),
            scheme,
            data_dir,
            _temp_data: temp,
        })
    }

    /// `http://127.0.0.1:PORT` of the pull API (`https://` when it serves TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.api_addr)
    }

    /// `127.0.0.1:PORT` of the pull API.
    pub fn host(&self) -> String {
        self.api_addr.to_string()
    }

    pub fn health_url(&self) -> String {
        format!("http://{}", self.health_addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub async fn metrics(&self) -> Result<Metrics> {
        Metrics::scrape(&self.metrics_url()).await
    }

    /// Blob URL on the mirror with `?ns=<registry_host>`, as containerd would ask.
    pub fn blob_url_ns(&self, repo: &str, digest: &str, registry_host: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}?ns={registry_host}", self.url())
    }

    /// Stops the daemon the way a crash would: no goodbye to the schedulers, connections cut.
    pub async fn kill(mut self) {
        if let Some(running) = self.running.take() {
            running.kill().await;
        }
    }

    /// Stops the daemon and waits until it has shut down.
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Runs the `damselfly` binary (built next to the test executable by
    /// `cargo build -p damselfly`, which scripts/test.sh does) as
    /// `damselfly mirror --listen .. --health-listen .. --metrics-listen .. --data-dir .. ARGS`
    /// on free loopback ports, and waits until its health endpoint answers.
    pub async fn spawn_binary(args: &[&str]) -> Result<MirrorProcess> {
        let binary = damselfly_binary()?;
        let dir = tempfile::Builder::new().prefix("damselfly-bin-").tempdir()?;
        let mut last_err = anyhow!("no attempt");
        // The ports are free when picked; another process may take one before the daemon binds
        // it, in which case the daemon exits and we retry on new ports.
        for attempt in 0..3 {
            let (api, health, metrics) =
                (loopback(free_loopback_port()), loopback(free_loopback_port()), loopback(free_loopback_port()));
            let data_dir = dir.path().join(format!("data-{attempt}"));
            let log_path = dir.path().join(format!("damselfly-{attempt}.log"));
            let log = OpenOptions::new().create(true).append(true).open(&log_path)?;
            let mut child = Command::new(&binary)
                .arg("mirror")
                .args(["--listen", &api.to_string()])
                .args(["--health-listen", &health.to_string()])
                .args(["--metrics-listen", &metrics.to_string()])
                .arg("--data-dir")
                .arg(&data_dir)
                .args(args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning {}", binary.display()))?;
            let client = http_client();
            let ping = format!("http://{health}/server/ping");
            let ready = poll_until("damselfly binary health /server/ping", Duration::from_secs(30), || {
                let exited = child.try_wait();
                let (client, ping, log_path) = (&client, &ping, &log_path);
                async move {
                    if let Ok(Some(status)) = exited {
                        bail!(
                            "damselfly exited with {status}: {}",
                            std::fs::read_to_string(log_path).unwrap_or_default()
                        );
                    }
                    Ok(client.get(ping).send().await.is_ok_and(|r| r.status().is_success()).then_some(()))
                }
            })
            .await;
            match ready {
                Ok(()) => {
                    return Ok(MirrorProcess {
                        child,
                        api_addr: api,
                        health_addr: health,
                        metrics_addr: metrics,
                        data_dir,
                        log_path,
                        _dir: dir,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }
}

/// `target/<profile>/damselfly`: the test executable is `target/<profile>/deps/<test>-<hash>`.
pub fn damselfly_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable location")?;
    let binary = profile_dir.join("damselfly");
    if !binary.is_file() {
        bail!("{} not found: build it first with `cargo build -p damselfly` (scripts/test.sh does)", binary.display());
    }
    Ok(binary)
}

/// The `damselfly` binary running as a child process; killed on drop.
pub struct MirrorProcess {
    child: Child,
    pub api_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    _dir: TempDir,
}

impl MirrorProcess {
    pub fn url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    pub fn health_url(&self) -> String {
        format!("http://{}", self.health_addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for MirrorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
