//! The node's part in a cluster: its identity, its link to the schedulers, the upload server
//! that hands pieces to other peers, and the swarm that takes pieces from them.
//!
//! Flow of a miss: a reader claims missing pieces and [`swarm::run`] fills them. The task's
//! [`download::Download`] (one download stream per task) registers with the scheduler chosen
//! for the digest; its answers say which parents hold which pieces, or to go to the origin.
//! Pieces from parents are verified against the digests the scheduler pinned; pieces from the
//! origin are hashed and their digests reported, which is what lets others take them from here.

mod cache;
mod download;
mod limit;
mod member;
mod mux;
mod peer;
mod schedulers;
mod swarm;
mod tls;
mod upload;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use damselfly_proto::token::{self, KEY_LEN};
use damselfly_proto::v1::{self as proto, download_request, DownloadRequest};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use damselfly_proto::member::OwnerToken;
pub use limit::RateLimit;
pub use upload::parse_path as parse_piece_path;

use crate::digest::Digest;
use crate::share::StoreEvent;
use crate::source::{ByteSource, Source, SourceSpec};
use crate::store::Store;
use crate::task::TaskRef;
use download::{Download, Mode};
use schedulers::Schedulers;

/// Tasks in one announcement, the most recently used first (the scheduler takes up to 10,000).
const MAX_ANNOUNCED: usize = 5_000;

/// How long a task's download stream stays open after its last fetch ended, so that piece
/// digests still being computed reach the scheduler.
const LINGER: Duration = Duration::from_secs(5);
/// A scheduler that refused this host (the seed role, or acting for its host id) is asked
/// again this often: a certificate may be renewed into one that carries the role.
const REFUSED_RETRY: Duration = Duration::from_secs(60);
/// How long a task whose content from peers failed its digest is taken from the origin only.
const POISONED_FOR: Duration = Duration::from_secs(600);
/// Poisoned tasks remembered at once; the oldest is forgotten first.
const MAX_POISONED: usize = 1024;
/// Tasks a scheduler asked for (seed and preheat streams) fetched at once; the rest wait.
const ASKED_FETCHES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    #[error("no scheduler reachable: {0}")]
    NoScheduler(String),
    /// A scheduler refused the call, saying why.
    #[error("{0}")]
    Refused(String),
}

pub use cache::{CacheEntry, CacheKeeper, UrlTask};

/// A way to fetch content from its origin on a scheduler's request (seed peers).
pub trait SeedSource: Send + Sync + 'static {
    fn source(&self, spec: &SourceSpec, digest: &Digest) -> Option<Arc<dyn Source>>;
}

#[derive(Clone)]
pub struct NodeConfig {
    /// gRPC URLs (`http://host:port`, or `https://host:port` with `cluster_tls`) of the
    /// schedulers.
    pub schedulers: Vec<String>,
    pub cluster_tls: Option<ClusterTls>,
    /// Pieces between nodes over mutual TLS with `cluster_tls`'s CA and certificate; the host
    /// announcement says so, and schedulers pair only hosts that agree.
    pub peer_tls: bool,
    /// Send a client's Bearer token with the registration (to TLS schedulers only), for the
    /// seed that fetches the blob.
    pub share_tokens_with_seeds: bool,
    pub host_id: String,
    /// Makes `host_id` this node's at the schedulers: the first owner token to announce an id
    /// owns it. Keep it across restarts (the daemon keeps it in its data dir).
    pub owner: OwnerToken,
    /// The cluster secret membership is proven with; `None` for schedulers that run an
    /// insecure cluster.
    pub cluster_secret: Option<Vec<u8>>,
    /// The address the upload server is bound to and outgoing peer connections come from.
    pub advertise_ip: IpAddr,
    pub upload_port: u16,
    pub idc: String,
    pub location: String,
    pub seed: bool,
    /// Bytes per second; `None` = unlimited.
    pub upload_rate: Option<u64>,
    pub download_rate: Option<u64>,
    pub max_uploads: usize,
    /// No bytes from any parent (and no news) for this long: take the rest from the origin.
    pub stall_timeout: Duration,
    pub seed_source: Option<Arc<dyn SeedSource>>,
    /// The P2P cache on this node, if it runs one.
    pub cache: Option<Arc<dyn CacheKeeper>>,
}

/// How this node verifies `https://` schedulers, and the certificate it shows those that
/// ask for one.
#[derive(Clone)]
pub struct ClusterTls {
    /// PEM CA certificates.
    pub ca: Vec<u8>,
    /// PEM certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn task_info(m: crate::meta::TaskMeta) -> proto::TaskInfo {
    proto::TaskInfo {
        digest: m.digest.to_string(),
        length: m.len,
        piece_size: m.piece_size,
        piece_sha256: m.pieces.into_iter().filter_map(|p| p.and_then(|r| r.sha256)).collect(),
    }
}

/// Metrics of the cluster side, registered into the daemon's registry.
#[derive(Default)]
pub struct NetMetrics {
    pub upload_bytes: Counter,
    pub upload_refused: Counter,
    pub fallbacks: Counter,
    pub scheduler_errors: Counter,
    pub poisoned: Counter,
}

impl NetMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = NetMetrics::default();
        registry.register("damselfly_upload_bytes", "Piece bytes sent to other peers", m.upload_bytes.clone());
        registry.register(
            "damselfly_upload_refused",
            "Piece requests refused for a missing or invalid token",
            m.upload_refused.clone(),
        );
        registry.register(
            "damselfly_peer_fallbacks",
            "Fetches that stopped waiting for peers and went to the origin",
            m.fallbacks.clone(),
        );
        registry.register(
            "damselfly_scheduler_errors",
            "Downloads that found no scheduler and went to the origin",
            m.scheduler_errors.clone(),
        );
        registry.register(
            "damselfly_poisoned_tasks",
            "Tasks whose content from peers failed its digest (their suppliers were reported)",
            m.poisoned.clone(),
        );
        m
    }
}

/// A task whose content from peers failed its digest here.
struct Poisoned {
    /// Taken from the origin only until then: the client's retry must not meet the same pieces.
    until: std::time::Instant,
    /// The download stream carried the report, which ends the peer at its scheduler: the
    /// withdrawal that follows is not sent, since it could arrive first and leave the report
    /// unheard.
    reported: bool,
}

/// Which task stream asked for a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    /// The seed stream: the cluster waits for this seed to fetch from the origin.
    Seed,
    /// The preheat stream: a preheat wants every node to hold the task.
    Preheat,
}

pub struct Node {
    pub(crate) cfg: NodeConfig,
    pub(crate) store: Store,
    schedulers: Arc<Schedulers>,
    downloads: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Tasks whose content from peers failed its digest here (see [`Poisoned`]).
    poisoned: Mutex<HashMap<Digest, Poisoned>>,
    /// Upload keys from the schedulers this host announced to.
    keys: RwLock<Vec<[u8; KEY_LEN]>>,
    pub(crate) http: reqwest::Client,
    pub(crate) upload_limit: Option<RateLimit>,
    pub(crate) download_limit: Option<RateLimit>,
    pub(crate) upload_slots: Arc<Semaphore>,
    /// Bounds the fetches schedulers ask for ([`ASKED_FETCHES`]).
    asked_fetches: Arc<Semaphore>,
    pub(crate) metrics: NetMetrics,
    shutdown: CancellationToken,
    upload_server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Tasks cached while this node was alone have no piece digests, and the cluster can take
/// them from here only once they do: a thread at idle priority computes them.
fn spawn_backfill(store: Store, stop: CancellationToken) {
    let spawned = std::thread::Builder::new().name("piece-digests".into()).spawn(move || {
        // SAFETY: plain syscall on the calling thread with a valid, zeroed sched_param.
        unsafe {
            let param: libc::sched_param = std::mem::zeroed();
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
        }
        let done = store.backfill_piece_digests(&|| stop.is_cancelled());
        if done > 0 {
            tracing::info!(tasks = done, "piece digests computed for tasks cached before joining the cluster");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the piece digest backfill");
    }
}

impl Node {
    /// Joins the cluster: serves uploads on `upload`, announces to every scheduler (and keeps
    /// doing so), and makes `store` take missing pieces from peers. Stops at `shutdown`.
    pub fn start(
        cfg: NodeConfig,
        store: Store,
        upload: TcpListener,
        metrics: NetMetrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<Node>, NetError> {
        if cfg.schedulers.is_empty() {
            return Err(NetError::Config("no scheduler given".into()));
        }
        let tls = match (cfg.peer_tls, &cfg.cluster_tls) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => return Err(NetError::Config("peer TLS needs the cluster's CA and certificate".into())),
        };
        let mut http = reqwest::Client::builder();
        if let Some(t) = tls {
            http = tls::client(http, t)?;
        }
        let acceptor = tls.map(tls::acceptor).transpose()?;
        let http = http
            .no_proxy()
            .connect_timeout(Duration::from_millis(200))
            .local_address((!cfg.advertise_ip.is_unspecified()).then_some(cfg.advertise_ip))
            .pool_idle_timeout(Duration::from_secs(20))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| NetError::Config(format!("peer HTTP client: {e}")))?;
        let node = Arc::new(Node {
            schedulers: Arc::new(Schedulers::new(
                &cfg.schedulers,
                cfg.advertise_ip,
                cfg.cluster_tls.as_ref(),
                member::Membership::new(&cfg.host_id, &cfg.owner, cfg.cluster_secret.as_deref())?,
            )?),
            downloads: Mutex::new(HashMap::new()),
            poisoned: Mutex::new(HashMap::new()),
            keys: RwLock::new(Vec::new()),
            http,
            upload_limit: cfg.upload_rate.map(RateLimit::new),
            download_limit: cfg.download_rate.map(RateLimit::new),
            upload_slots: Arc::new(Semaphore::new(cfg.max_uploads.max(1))),
            asked_fetches: Arc::new(Semaphore::new(ASKED_FETCHES)),
            metrics,
            shutdown,
            upload_server: Mutex::new(None),
            store: store.clone(),
            cfg,
        });
        // The store's missing pieces now come from the swarm, and this node hears what it
        // must tell the schedulers.
        let events = store
            .share(Arc::new(swarm::SwarmFetcher(Arc::downgrade(&node))))
            .ok_or_else(|| NetError::Config("the store is shared with another node already".into()))?;
        tokio::spawn(node.clone().hear(events));
        spawn_backfill(store, node.shutdown.clone());
        let server = tokio::spawn(upload::serve(node.clone(), upload, acceptor, node.shutdown.clone()));
        *node.upload_server.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
        for i in 0..node.schedulers.len() {
            tokio::spawn(node.clone().announce_loop(i));
            if node.cfg.seed && node.cfg.seed_source.is_some() {
                tokio::spawn(node.clone().task_loop(i, Asked::Seed));
            }
            if node.cfg.seed_source.is_some() || node.cfg.cache.is_some() {
                tokio::spawn(node.clone().task_loop(i, Asked::Preheat));
            }
        }
        Ok(node)
    }

    pub fn host_id(&self) -> &str {
        &self.cfg.host_id
    }

    /// Cuts every upload at once, as a crash would (graceful shutdown drains them instead).
    pub fn abort_uploads(&self) {
        if let Some(server) = self.upload_server.lock().unwrap_or_else(|e| e.into_inner()).take() {
            server.abort();
        }
    }

    /// Tells the schedulers this host is leaving (best effort, bounded).
    pub async fn leave(&self) {
        self.schedulers.leave(&self.cfg.host_id).await;
    }

    fn host(&self) -> proto::Host {
        proto::Host {
            id: self.cfg.host_id.clone(),
            ip: self.cfg.advertise_ip.to_string(),
            upload_port: self.cfg.upload_port.into(),
            idc: self.cfg.idc.clone(),
            location: self.cfg.location.clone(),
            upload_slots: self.cfg.max_uploads as u32,
            seed: self.cfg.seed,
            upload_rate: self.cfg.upload_rate.unwrap_or(0),
            peer_tls: self.cfg.peer_tls,
            served: Some(self.served()),
        }
    }

    fn served(&self) -> proto::ServedBytes {
        let m = self.store.metrics();
        proto::ServedBytes {
            origin: m.sent_from(ByteSource::Origin),
            peer: m.sent_from(ByteSource::Peer),
            cache: m.sent_from(ByteSource::Cache),
        }
    }

    /// Announces the host and every verified task to scheduler `i`. Returns the interval the
    /// scheduler asked for.
    async fn announce(&self, i: usize) -> Result<Duration, tonic::Status> {
        // Reads metadata files of tasks not in memory: off the runtime threads.
        let store = self.store.clone();
        let metas = tokio::task::spawn_blocking(move || store.verified_tasks(MAX_ANNOUNCED)).await.unwrap_or_default();
        let entries = self.cfg.cache.as_ref().map(|c| c.entries());
        self.announce_with(i, metas.into_iter().map(task_info).collect(), entries).await
    }

    /// A task just became complete and verified here: tell the other schedulers now rather
    /// than at the next announcement. The one its download stream runs on learns it there, in
    /// order with the piece reports.
    fn task_ready(self: &Arc<Self>, meta: crate::meta::TaskMeta) {
        let node = self.clone();
        let download = self.downloads.lock().unwrap_or_else(|e| e.into_inner()).get(&meta.digest).cloned();
        if let Some(s) = &download {
            s.finished();
        }
        let streaming_to = download.and_then(|s| s.scheduler());
        let info = task_info(meta);
        tokio::spawn(async move {
            for i in 0..node.schedulers.len() {
                if streaming_to.as_deref() != Some(node.schedulers.url(i)) {
                    let _ = node.announce_tasks(i, vec![info.clone()]).await;
                }
            }
        });
    }

    async fn announce_tasks(&self, i: usize, tasks: Vec<proto::TaskInfo>) -> Result<Duration, tonic::Status> {
        self.announce_with(i, tasks, None).await
    }

    /// Announces the host with `tasks`, and with `cache_entries` when they are every entry
    /// the node keeps.
    async fn announce_with(
        &self,
        i: usize,
        tasks: Vec<proto::TaskInfo>,
        cache_entries: Option<Vec<CacheEntry>>,
    ) -> Result<Duration, tonic::Status> {
        let all_cache_entries = cache_entries.is_some();
        let cache_entries = cache_entries.unwrap_or_default();
        let req = proto::AnnounceHostRequest { host: Some(self.host()), tasks, cache_entries, all_cache_entries };
        match self.schedulers.announce(i, req).await {
            Ok(resp) => {
                if let Ok(key) = <[u8; KEY_LEN]>::try_from(resp.upload_key.as_slice()) {
                    let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                Ok(Duration::from_secs(resp.announce_interval_secs.clamp(1, 3600).into()))
            }
            Err(s) => {
                self.schedulers.failed(i, &s);
                Err(s)
            }
        }
    }

    async fn announce_loop(self: Arc<Self>, i: usize) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match self.announce(i).await {
                Ok(interval) => {
                    backoff = Duration::from_millis(500);
                    interval
                }
                // A refusal (this node's certificate may not act for its host id) does not
                // pass by itself: say so where an operator looks, and do not ask in a loop.
                Err(s) if s.code() == tonic::Code::PermissionDenied => {
                    tracing::warn!(scheduler = %self.schedulers.url(i), error = %s.message(), "announcement refused");
                    REFUSED_RETRY
                }
                Err(_) => {
                    tracing::debug!(scheduler = %self.schedulers.url(i), "announce failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Seed peers: fetch what the scheduler asks for, the usual way, so that others can take
    /// it from here.
    /// Keeps one of scheduler `i`'s task streams open and takes the tasks it sends.
    async fn task_loop(self: Arc<Self>, i: usize, asked: Asked) {
        loop {
            // Until the announcement went through, the scheduler would refuse the stream.
            let mut wait = Duration::from_millis(200);
            if self.schedulers.is_announced(i) {
                wait = Duration::from_secs(1);
                use futures_util::StreamExt;
                type Tasks = futures_util::stream::BoxStream<'static, Result<proto::HoldTask, tonic::Status>>;
                let opened: Result<Tasks, tonic::Status> = match asked {
                    Asked::Seed => self.schedulers.seed_tasks(i, &self.cfg.host_id).await.map(|s| {
                        s.map(|t| t.map(|t| proto::HoldTask { kind: Some(proto::hold_task::Kind::Fetch(t)) })).boxed()
                    }),
                    Asked::Preheat => self.schedulers.preheat_tasks(i, &self.cfg.host_id).await.map(|s| s.boxed()),
                };
                match opened {
                    Ok(mut stream) => {
                        tracing::debug!(scheduler = %self.schedulers.url(i), ?asked, "taking tasks");
                        loop {
                            let next = tokio::select! {
                                _ = self.shutdown.cancelled() => return,
                                next = stream.next() => next,
                            };
                            match next.and_then(Result::ok).and_then(|t| t.kind) {
                                Some(proto::hold_task::Kind::Fetch(t)) => self.fetch_asked(t, asked),
                                Some(proto::hold_task::Kind::Keep(entry)) => {
                                    if let Some(cache) = &self.cfg.cache {
                                        cache.keep(entry);
                                    }
                                }
                                Some(proto::hold_task::Kind::Drop(key)) => {
                                    if let Some(cache) = &self.cfg.cache {
                                        cache.drop_entry(&key);
                                    }
                                }
                                Some(proto::hold_task::Kind::FetchUrl(task)) => {
                                    match (&self.cfg.cache, self.cfg.seed) {
                                        (Some(cache), true) => cache.fetch_url(task),
                                        _ => {
                                            tracing::warn!(url = %task.url, "asked to fetch a file from its origin, which only seeds with a P2P cache do")
                                        }
                                    }
                                }
                                None => break,
                            }
                        }
                    }
                    // A scheduler that binds seeds to certificates: this one has none for the
                    // role. The node still works as an ordinary one; asking every second
                    // would only repeat the refusal.
                    Err(s) if s.code() == tonic::Code::PermissionDenied => {
                        tracing::warn!(scheduler = %self.schedulers.url(i), error = %s.message(), ?asked, "task stream refused");
                        wait = REFUSED_RETRY;
                    }
                    // An older scheduler without preheat streams.
                    Err(s) if s.code() == tonic::Code::Unimplemented => wait = REFUSED_RETRY,
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fetches a task a scheduler asked for through the store, as for a client: a seed's from
    /// the origin (the scheduler sends its own download there), a preheat's from peers first.
    fn fetch_asked(&self, t: proto::SeedTask, asked: Asked) {
        let (Ok(digest), Some(src), Some(seeder)) = (Digest::parse(&t.digest), t.source, &self.cfg.seed_source) else {
            return;
        };
        let credential = (!src.credential.is_empty()).then_some(src.credential);
        let spec =
            SourceSpec { registry: src.registry, repository: src.repository, insecure: src.insecure, credential };
        let Some(source) = seeder.source(&spec, &digest) else { return };
        let task = match self.store.get_or_create(&digest, t.length, None) {
            Ok(task) if t.length > 0 => task,
            _ => return,
        };
        // A blob this node holds unverified bytes of from another registry is left to them.
        if source.supplier().is_some_and(|s| !task.claim_supplier(&s)) {
            return;
        }
        tracing::info!(%digest, ?asked, "fetching on the scheduler's request");
        let slots = self.asked_fetches.clone();
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else { return };
            crate::reader::fill(task, source).await;
        });
    }

    pub(crate) fn check_token(&self, token: &str, digest: &Digest) -> Result<String, token::TokenError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let now = crate::meta::now_secs();
        token::verify(&keys, token, &digest.to_string(), now)
    }

    /// The task's download, opening its download stream if there is none. A task poisoned
    /// here lately gets a download that goes to the origin and tells no scheduler.
    pub(crate) fn download(self: &Arc<Self>, task: &TaskRef, source: &dyn Source) -> Arc<Download> {
        let mut downloads = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = downloads.get(task.digest()) {
            return s.clone();
        }
        let download = Download::new(task.digest().clone(), task.layout().count());
        if self.is_poisoned(task.digest()) {
            download.set_mode(Mode::Origin);
            return download;
        }
        downloads.insert(task.digest().clone(), download.clone());
        drop(downloads);
        let spec = source.describe().unwrap_or_default();
        let register = proto::Register {
            host_id: self.cfg.host_id.clone(),
            digest: task.digest().to_string(),
            length: task.len(),
            piece_size: task.layout().piece_size,
            source: Some(proto::Source {
                registry: spec.registry,
                repository: spec.repository,
                insecure: spec.insecure,
                credential: spec.credential.filter(|_| self.cfg.share_tokens_with_seeds).unwrap_or_default(),
            }),
            pieces: task.present_pieces(),
        };
        tokio::spawn(self.clone().open(download.clone(), register));
        download
    }

    async fn open(self: Arc<Self>, download: Arc<Download>, register: proto::Register) {
        let first = DownloadRequest { kind: Some(download_request::Kind::Register(register)) };
        let key = download.digest.to_string();
        let opened = self
            .schedulers
            .open_download(&key, first, |i| {
                let node = self.clone();
                async move {
                    let _ = node.announce(i).await;
                }
            })
            .await;
        match opened {
            Ok((tx, stream)) => {
                let scheduler = stream.scheduler.clone();
                if !download.connect(tx, &scheduler) {
                    return;
                }
                if !download::pump(download.clone(), stream.responses).await {
                    self.schedulers.stream_failed(&scheduler);
                }
            }
            Err(e) => {
                tracing::info!(digest = %download.digest, error = %e, "no scheduler; fetching from the origin");
                self.metrics.scheduler_errors.inc();
                download.set_mode(Mode::Origin);
            }
        }
        self.forget(&download);
    }

    /// A fetch is done with `download`: once no fetch has used it for a while, close it.
    pub(crate) fn release(self: &Arc<Self>, download: &Arc<Download>) {
        if download.detach() > 0 {
            return;
        }
        let node = self.clone();
        let download = download.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            if download.attached() == 0 {
                let finished = node.store.get(&download.digest).ok().flatten().is_some_and(|t| t.is_verified());
                download.close(finished);
                node.forget(&download);
            }
        });
    }

    fn forget(&self, download: &Arc<Download>) {
        let mut downloads = self.downloads.lock().unwrap_or_else(|e| e.into_inner());
        if downloads.get(&download.digest).is_some_and(|s| Arc::ptr_eq(s, download)) {
            downloads.remove(&download.digest);
        }
    }

    /// Piece `i` of `digest`, read from the origin, hashed to `sha256`: the scheduler pins it
    /// and hands the piece to others.
    fn piece_hashed(&self, digest: &Digest, i: usize, sha256: String) {
        let download = self.downloads.lock().unwrap_or_else(|e| e.into_inner()).get(digest).cloned();
        if let Some(s) = download {
            s.piece_from_origin(i, sha256);
        }
    }

    fn is_poisoned(&self, digest: &Digest) -> bool {
        let mut poisoned = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        poisoned.retain(|_, p| p.until > now);
        poisoned.contains_key(digest)
    }

    /// Content of `digest` assembled with pieces from peers failed its digest: its suppliers
    /// are reported, and the task comes from the origin here for a while.
    fn poisoned(&self, digest: &Digest) {
        tracing::warn!(%digest, "content from peers failed its digest; reporting its suppliers and taking it from the origin");
        self.metrics.poisoned.inc();
        let download = self.downloads.lock().unwrap_or_else(|e| e.into_inner()).get(digest).cloned();
        let reported = download.is_some_and(|d| d.poisoned());
        let mut poisoned = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        if poisoned.len() >= MAX_POISONED {
            let oldest = poisoned.iter().min_by_key(|(_, p)| p.until).map(|(d, _)| d.clone());
            if let Some(d) = oldest {
                poisoned.remove(&d);
            }
        }
        poisoned.insert(digest.clone(), Poisoned { until: std::time::Instant::now() + POISONED_FOR, reported });
    }

    /// The store dropped `digest` (evicted, or discarded).
    fn withdrawn(&self, digest: &Digest) {
        let mut poisoned = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = poisoned.get_mut(digest).filter(|p| p.reported) {
            p.reported = false;
            return;
        }
        drop(poisoned);
        tokio::spawn(self.schedulers.clone().withdraw(self.cfg.host_id.clone(), digest.to_string()));
    }

    /// Passes on what the store says, in order, until shutdown.
    async fn hear(self: Arc<Self>, mut events: UnboundedReceiver<StoreEvent>) {
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                event = events.recv() => event,
            };
            match event {
                Some(StoreEvent::PieceHashed { digest, piece, sha256 }) => self.piece_hashed(&digest, piece, sha256),
                Some(StoreEvent::TaskReady(meta)) => self.task_ready(meta),
                Some(StoreEvent::Poisoned(digest)) => self.poisoned(&digest),
                Some(StoreEvent::Withdrawn(digest)) => self.withdrawn(&digest),
                None => return,
            }
        }
    }
}
