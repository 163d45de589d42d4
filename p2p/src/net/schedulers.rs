//! The node's link to its schedulers: one lazily connected gRPC channel per scheduler, a task
//! routed to a scheduler by rendezvous hashing of its digest (every node computes the same
//! order, so all peers of a task meet at one scheduler), the next one on error.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use damselfly_proto::v1::scheduler_client::SchedulerClient;
use damselfly_proto::v1::{self as proto, DownloadRequest};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Identity};
use tonic::{Code, Streaming};

use super::member::Membership;
use super::mux::{Mux, Responses};
use super::{ClusterTls, NetError};

/// Largest message taken from a scheduler: the digests of a 100,000-piece task are 7 MB.
const MAX_MESSAGE: usize = 64 << 20;
/// Connecting to a scheduler takes longer than this only when it is gone.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Unary calls and the opening of a download stream.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a scheduler that timed out or could not be reached is passed over by new
/// downloads. A hung one (its port still accepts) costs every download that tries it a
/// timeout; after this they try it again.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// A scheduler client whose every call carries this node's membership.
pub(crate) type Client = SchedulerClient<InterceptedService<Channel, Membership>>;

pub(crate) struct Schedulers {
    endpoints: Vec<Endpoint>,
}

struct Endpoint {
    url: String,
    client: Client,
    /// The scheduler knows this host (as far as we can tell): cleared on transport errors so
    /// that the next use announces first, which is how a restarted scheduler learns of us.
    announced: AtomicBool,
    /// Reached over TLS: a registration's credential may go here.
    tls: bool,
    /// Passed over by new downloads until then (see `DOWN_FOR`).
    down_until: Mutex<Option<Instant>>,
    /// The host's session with this scheduler, carrying its downloads there.
    session: tokio::sync::Mutex<Option<Arc<Mux>>>,
    /// The scheduler answered that it has no sessions: a stream per download.
    no_sessions: AtomicBool,
}

impl Endpoint {
    fn is_down(&self) -> bool {
        self.down_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t)
    }

    fn set_down(&self, down: bool) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = down.then(|| Instant::now() + DOWN_FOR);
    }
}

/// An open download.
pub(crate) struct DownloadStream {
    pub responses: Responses,
    pub scheduler: String,
}

fn timed_out() -> tonic::Status {
    tonic::Status::deadline_exceeded("timed out")
}

fn client_tls(tls: &ClusterTls) -> ClientTlsConfig {
    let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
    match &tls.identity {
        Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
        None => config,
    }
}

/// The registration as it may travel to a scheduler: a credential only over TLS.
fn for_endpoint(first: &DownloadRequest, tls: bool) -> DownloadRequest {
    let mut first = first.clone();
    if !tls {
        if let Some(proto::download_request::Kind::Register(reg)) = &mut first.kind {
            if let Some(source) = &mut reg.source {
                source.credential.clear();
            }
        }
    }
    first
}

impl Schedulers {
    pub fn new(urls: &[String], local: IpAddr, tls: Option<&ClusterTls>, member: Membership) -> Result<Self, NetError> {
        let endpoints = urls
            .iter()
            .map(|url| {
                let fail = |e: &dyn std::fmt::Display| NetError::Config(format!("scheduler address {url}: {e}"));
                let mut ep = TonicEndpoint::from_shared(url.clone()).map_err(|e| fail(&e))?;
                let https = url.starts_with("https://");
                if https {
                    let tls = tls.ok_or_else(|| fail(&"https needs the CA to verify the scheduler against"))?;
                    ep = ep.tls_config(client_tls(tls)).map_err(|e| fail(&e))?;
                }
                let ep = ep
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .local_address((!local.is_unspecified()).then_some(local));
                Ok(Endpoint {
                    tls: https,
                    url: url.clone(),
                    // As large as the scheduler takes: one download's pinned digests arrive in
                    // one message, and on a session a message too large would end every
                    // download on it.
                    client: SchedulerClient::with_interceptor(ep.connect_lazy(), member.clone())
                        .max_decoding_message_size(MAX_MESSAGE),
                    announced: AtomicBool::new(false),
                    down_until: Mutex::new(None),
                    session: tokio::sync::Mutex::new(None),
                    no_sessions: AtomicBool::new(false),
                })
            })
            .collect::<Result<Vec<_>, NetError>>()?;
        Ok(Schedulers { endpoints })
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn url(&self, i: usize) -> &str {
        &self.endpoints[i].url
    }

    /// Endpoint indices in the order a task with this key tries them.
    fn ranked(&self, key: &str) -> Vec<usize> {
        let mut scored: Vec<(u64, usize)> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| {
                let h = Sha256::new().chain_update(ep.url.as_bytes()).chain_update(b"|").chain_update(key).finalize();
                (u64::from_be_bytes(h[..8].try_into().unwrap_or_default()), i)
            })
            .collect();
        scored.sort_unstable_by(|a, b| b.cmp(a));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    /// Announces the host to scheduler `i`; returns the upload key and the interval it asks for.
    pub async fn announce(
        &self,
        i: usize,
        req: proto::AnnounceHostRequest,
    ) -> Result<proto::AnnounceHostResponse, tonic::Status> {
        let ep = &self.endpoints[i];
        let mut client = ep.client.clone();
        let resp = tokio::time::timeout(CALL_TIMEOUT * 5, client.announce_host(req)).await.map_err(|_| {
            ep.set_down(true);
            tonic::Status::deadline_exceeded("announce timed out")
        })??;
        ep.announced.store(true, Ordering::SeqCst);
        ep.set_down(false);
        Ok(resp.into_inner())
    }

    pub fn is_announced(&self, i: usize) -> bool {
        self.endpoints[i].announced.load(Ordering::SeqCst)
    }

    fn forget(&self, i: usize) {
        self.endpoints[i].announced.store(false, Ordering::SeqCst);
    }

    /// Opens a download for `key` on the first scheduler (in the key's order) that takes it.
    /// `announce` is called for schedulers that may not know the host yet. The requests sent
    /// on the returned sender (after the registration) go to whichever scheduler answered.
    pub async fn open_download<A, F>(
        &self,
        key: &str,
        first: DownloadRequest,
        announce: A,
    ) -> Result<(mpsc::UnboundedSender<DownloadRequest>, DownloadStream), NetError>
    where
        A: Fn(usize) -> F,
        F: std::future::Future<Output = ()>,
    {
        let mut last = None;
        // Schedulers found down recently are passed over: the task goes to the next one in its
        // order, or, with none left, to the origin at once rather than after a timeout.
        for i in self.ranked(key).into_iter().filter(|&i| !self.endpoints[i].is_down()) {
            for _attempt in 0..2 {
                if !self.is_announced(i) {
                    announce(i).await;
                    if self.endpoints[i].is_down() {
                        last = Some("announce failed".to_owned());
                        break;
                    }
                }
                let first = for_endpoint(&first, self.endpoints[i].tls);
                match self.try_open(i, first).await {
                    Ok((tx, responses)) => {
                        self.endpoints[i].set_down(false);
                        return Ok((tx, DownloadStream { responses, scheduler: self.url(i).to_owned() }));
                    }
                    // The scheduler does not know this host (it restarted): announce, retry once.
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        self.forget(i);
                        last = Some(s.message().to_owned());
                    }
                    Err(s) if s.code() == Code::DeadlineExceeded => {
                        self.forget(i);
                        self.endpoints[i].set_down(true);
                        last = Some("timed out".to_owned());
                        break;
                    }
                    Err(s) => {
                        self.failed(i, &s);
                        last = Some(s.message().to_owned());
                        break;
                    }
                }
            }
        }
        let none = if self.endpoints.is_empty() { "no scheduler configured" } else { "every scheduler is down" };
        Err(NetError::NoScheduler(last.unwrap_or_else(|| none.to_owned())))
    }

    /// One try at opening a download on scheduler `i`: on the host's session with it, or on a
    /// stream of its own where the scheduler has no sessions (an older one).
    async fn try_open(
        &self,
        i: usize,
        first: DownloadRequest,
    ) -> Result<(mpsc::UnboundedSender<DownloadRequest>, Responses), tonic::Status> {
        let ep = &self.endpoints[i];
        if !ep.no_sessions.load(Ordering::Relaxed) {
            match self.session(i).await {
                Ok(mux) => return mux.open_download(first, CALL_TIMEOUT).await,
                Err(s) if s.code() == Code::Unimplemented => {
                    tracing::info!(scheduler = %ep.url, "scheduler has no download sessions; a stream per download");
                    ep.no_sessions.store(true, Ordering::Relaxed);
                }
                Err(s) => return Err(s),
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(first);
        let mut client = ep.client.clone();
        let call = client.download(UnboundedReceiverStream::new(rx));
        let resp = tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| timed_out())??;
        Ok((tx, Box::pin(resp.into_inner())))
    }

    /// The host's open session with scheduler `i`, opened now if it has none (one at a time:
    /// the downloads of an image start together and share it).
    async fn session(&self, i: usize) -> Result<Arc<Mux>, tonic::Status> {
        let ep = &self.endpoints[i];
        let mut slot = ep.session.lock().await;
        if let Some(mux) = slot.as_ref().filter(|m| m.is_open()) {
            return Ok(mux.clone());
        }
        // Downloads that queued behind an opening that timed out go on to the next scheduler
        // now, instead of each waiting out a timeout of its own in turn.
        if ep.is_down() {
            return Err(tonic::Status::unavailable("the scheduler did not answer just now"));
        }
        *slot = None;
        let mut client = ep.client.clone();
        let mux = tokio::time::timeout(CALL_TIMEOUT, Mux::open(&mut client)).await.map_err(|_| timed_out())??;
        *slot = Some(mux.clone());
        Ok(mux)
    }

    /// Notes a failed call: transport-level failures mean the scheduler may have lost us.
    pub fn failed(&self, i: usize, status: &tonic::Status) {
        if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::FailedPrecondition) {
            self.forget(i);
        }
        if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) {
            self.endpoints[i].set_down(true);
        }
        tracing::debug!(scheduler = %self.url(i), error = %status.message(), "scheduler call failed");
    }

    /// Marks the scheduler a stream of `url` ran on as needing a fresh announcement.
    pub fn stream_failed(&self, url: &str) {
        if let Some(i) = self.endpoints.iter().position(|e| e.url == url) {
            self.forget(i);
        }
    }

    /// Tells every scheduler that this host dropped a task. Best effort: a scheduler that
    /// misses it learns at the next failed piece request.
    pub async fn withdraw(self: Arc<Self>, host_id: String, digest: String) {
        for ep in &self.endpoints {
            let req = proto::WithdrawTaskRequest { host_id: host_id.clone(), digest: digest.clone() };
            let _ = tokio::time::timeout(CALL_TIMEOUT, ep.client.clone().withdraw_task(req)).await;
        }
    }

    pub async fn leave(&self, host_id: &str) {
        for ep in &self.endpoints {
            let req = proto::LeaveHostRequest { host_id: host_id.to_owned() };
            let _ = tokio::time::timeout(CALL_TIMEOUT, ep.client.clone().leave_host(req)).await;
        }
    }

    pub async fn seed_tasks(&self, i: usize, host_id: &str) -> Result<Streaming<proto::SeedTask>, tonic::Status> {
        let req = proto::SeedTasksRequest { host_id: host_id.to_owned() };
        let mut client = self.endpoints[i].client.clone();
        let resp = tokio::time::timeout(CALL_TIMEOUT, client.seed_tasks(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("seed stream timed out"))??;
        Ok(resp.into_inner())
    }

    /// Opens scheduler `i`'s stream of what preheats and the P2P cache ask this host to hold.
    pub async fn preheat_tasks(&self, i: usize, host_id: &str) -> Result<Streaming<proto::HoldTask>, tonic::Status> {
        let req = proto::PreheatTasksRequest { host_id: host_id.to_owned() };
        let mut client = self.endpoints[i].client.clone();
        let resp = tokio::time::timeout(CALL_TIMEOUT, client.preheat_tasks(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("preheat stream timed out"))??;
        Ok(resp.into_inner())
    }

    pub async fn put_cache_entry(&self, i: usize, req: proto::PutCacheEntryRequest) -> Result<(), tonic::Status> {
        let mut client = self.endpoints[i].client.clone();
        tokio::time::timeout(CALL_TIMEOUT, client.put_cache_entry(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("cache entry put timed out"))??;
        Ok(())
    }

    /// Asks the schedulers, in the key's order, what `key` names; the first that answers
    /// says (every scheduler hears every put).
    pub async fn stat_cache_entry(&self, key: &str) -> Result<proto::StatCacheEntryResponse, NetError> {
        let mut last = None;
        for i in self.ranked(key).into_iter().filter(|&i| !self.endpoints[i].is_down()) {
            let req = proto::StatCacheEntryRequest { key: key.to_owned() };
            let mut client = self.endpoints[i].client.clone();
            match tokio::time::timeout(CALL_TIMEOUT, client.stat_cache_entry(req)).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(s)) => {
                    self.failed(i, &s);
                    last = Some(s.message().to_owned());
                }
                Err(_) => {
                    self.endpoints[i].set_down(true);
                    last = Some("timed out".to_owned());
                }
            }
        }
        Err(NetError::NoScheduler(last.unwrap_or_else(|| "every scheduler is down".to_owned())))
    }

    pub async fn failed_url_task(&self, i: usize, req: proto::FailedUrlTaskRequest) -> Result<(), tonic::Status> {
        let mut client = self.endpoints[i].client.clone();
        tokio::time::timeout(CALL_TIMEOUT, client.failed_url_task(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("report timed out"))??;
        Ok(())
    }

    pub async fn drop_cache_entry(&self, i: usize, req: proto::DropCacheEntryRequest) -> Result<(), tonic::Status> {
        let mut client = self.endpoints[i].client.clone();
        tokio::time::timeout(CALL_TIMEOUT, client.drop_cache_entry(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("cache entry drop timed out"))??;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A node's membership in the test schedulers' cluster (secret `s`).
    pub(crate) fn member() -> Membership {
        let owner = damselfly_proto::member::OwnerToken::new([7; 32]);
        Membership::new("h", &owner, Some(b"s")).expect("membership")
    }

    fn schedulers(n: usize) -> Schedulers {
        let urls: Vec<String> = (0..n).map(|i| format!("http://10.0.0.{i}:8002")).collect();
        Schedulers::new(&urls, "127.0.0.1".parse().unwrap_or(IpAddr::from([127, 0, 0, 1])), None, member())
            .expect("valid urls")
    }

    #[test]
    fn a_credential_goes_only_to_schedulers_reached_over_tls() {
        let source = proto::Source { credential: "Bearer t".into(), ..Default::default() };
        let reg = proto::Register { source: Some(source), ..Default::default() };
        let first = DownloadRequest { kind: Some(proto::download_request::Kind::Register(reg)) };
        let credential = |r: DownloadRequest| match r.kind {
            Some(proto::download_request::Kind::Register(r)) => r.source.map(|s| s.credential),
            _ => None,
        };
        assert_eq!(credential(for_endpoint(&first, true)).as_deref(), Some("Bearer t"));
        assert_eq!(credential(for_endpoint(&first, false)).as_deref(), Some(""));
    }

    #[tokio::test]
    async fn an_https_scheduler_needs_a_ca() {
        let local = IpAddr::from([127, 0, 0, 1]);
        let urls = ["https://10.0.0.1:8002".to_owned()];
        assert!(matches!(Schedulers::new(&urls, local, None, member()), Err(NetError::Config(_))));
        // Certificates are checked when the connection is made; plain http ignores the CA.
        let tls = ClusterTls { ca: b"not pem".to_vec(), identity: None };
        assert!(Schedulers::new(&urls, local, Some(&tls), member()).is_ok());
        assert!(Schedulers::new(&["http://10.0.0.1:8002".to_owned()], local, Some(&tls), member()).is_ok());
    }

    #[tokio::test]
    async fn every_node_ranks_schedulers_alike_and_tasks_spread() {
        let a = schedulers(3);
        let b = schedulers(3);
        let mut firsts = [0usize; 3];
        for k in 0..300 {
            let key = format!("sha256:{k:064x}");
            let ranked = a.ranked(&key);
            assert_eq!(ranked, b.ranked(&key));
            let mut sorted = ranked.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2]);
            firsts[ranked[0]] += 1;
        }
        assert!(firsts.iter().all(|&n| n > 60), "{firsts:?}");
    }

    /// A scheduler's port that accepts connections and never answers.
    async fn hung_scheduler() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = hung.local_addr().expect("address");
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = hung.accept().await {
                held.push(conn);
            }
        });
        (addr, hold)
    }

    #[tokio::test]
    async fn a_hung_scheduler_is_passed_over_by_new_downloads() {
        // One scheduler accepts connections and never answers; the other works.
        let (hung_addr, _hold) = hung_scheduler().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cfg = damselfly_scheduler::SchedulerConfig { secret: b"s".to_vec(), ..Default::default() };
        let running = damselfly_scheduler::start(cfg, good, None).await.expect("scheduler");
        let urls = [format!("http://{hung_addr}"), format!("http://{}", running.grpc_addr)];
        let s = Schedulers::new(&urls, IpAddr::from([127, 0, 0, 1]), None, member()).expect("schedulers");
        // Tasks whose order starts with the hung scheduler.
        let keys: Vec<String> =
            (0..100).map(|k| format!("sha256:{k:064x}")).filter(|k| s.ranked(k)[0] == 0).take(2).collect();
        let open = |key: String| {
            let host = proto::Host { id: "h".into(), ip: "127.0.0.1".into(), upload_port: 1, ..Default::default() };
            let reg = proto::Register { host_id: "h".into(), digest: key.clone(), ..Default::default() };
            let first = DownloadRequest { kind: Some(proto::download_request::Kind::Register(reg)) };
            let s = &s;
            async move {
                let started = Instant::now();
                let announce = |i| {
                    let req = proto::AnnounceHostRequest { host: Some(host.clone()), ..Default::default() };
                    async move {
                        let _ = s.announce(i, req).await;
                    }
                };
                let opened = s.open_download(&key, first, announce).await;
                (opened.map(|(_, stream)| stream.scheduler), started.elapsed())
            }
        };
        let (first, took) = open(keys[0].clone()).await;
        assert_eq!(first.expect("opened"), urls[1]);
        assert!(took >= CALL_TIMEOUT, "the hung scheduler was not even tried: {took:?}");
        let (second, took) = open(keys[1].clone()).await;
        assert_eq!(second.expect("opened"), urls[1]);
        assert!(took < CALL_TIMEOUT, "the next download waited on the hung scheduler again: {took:?}");
        running.shutdown().await;
    }

    #[tokio::test]
    async fn downloads_starting_together_on_a_hung_scheduler_move_on_together() {
        let (hung_addr, _hold) = hung_scheduler().await;
        let s = Schedulers::new(&[format!("http://{hung_addr}")], IpAddr::from([127, 0, 0, 1]), None, member())
            .expect("ok");
        s.endpoints[0].announced.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let opens = (0..6).map(|k| {
            let key = format!("sha256:{k:064x}");
            let reg = proto::Register { host_id: "h".into(), digest: key.clone(), ..Default::default() };
            let first = DownloadRequest { kind: Some(proto::download_request::Kind::Register(reg)) };
            let s = &s;
            async move { s.open_download(&key, first, |_| async {}).await.is_err() }
        });
        let failed = futures_util::future::join_all(opens).await;
        assert!(failed.iter().all(|&f| f), "nothing opens on a hung scheduler");
        let took = started.elapsed();
        assert!(took < CALL_TIMEOUT * 2, "six downloads took {took:?} to give up on one hung scheduler");
    }

    #[tokio::test]
    async fn removing_a_scheduler_moves_only_its_tasks() {
        let three = schedulers(3);
        let two = schedulers(2);
        for k in 0..200 {
            let key = format!("sha256:{k:064x}");
            let first = three.ranked(&key)[0];
            if first < 2 {
                assert_eq!(two.ranked(&key)[0], first);
            }
        }
    }
}
