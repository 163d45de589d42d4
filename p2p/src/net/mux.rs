//! A node's session with one scheduler: all of its downloads there over one `Downloads` stream,
//! opened on first use and again after it broke. A download then costs the scheduler its
//! messages instead of an HTTP/2 stream of its own, with its headers, trailers and tasks, which
//! was about a quarter of the scheduler's core at 11,000 downloads a second.
//!
//! Each download gets a channel of requests and one of responses, as its own stream would give
//! it: closing the first closes the download, and the second ends when the scheduler ends the
//! download (cleanly, or with the status it refused it with) or the session breaks.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use damselfly_proto::v1::session_response::Kind;
use damselfly_proto::v1::{DownloadRequest, DownloadResponse, SessionRequest, SessionResponse};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status, Streaming};

/// A download's responses, whichever stream carries them.
pub(crate) type Responses = Pin<Box<dyn Stream<Item = Result<DownloadResponse, Status>> + Send>>;

type Route = mpsc::UnboundedSender<Result<DownloadResponse, Status>>;

pub(crate) struct Mux {
    tx: mpsc::UnboundedSender<SessionRequest>,
    /// Open downloads by id; `None` once the session ended (no download may start on it).
    routes: Mutex<Option<HashMap<u64, Route>>>,
    next: AtomicU64,
}

impl Mux {
    /// Opens a session; returns once the scheduler took the stream.
    pub async fn open(client: &mut super::schedulers::Client) -> Result<Arc<Mux>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let responses = client.downloads(UnboundedReceiverStream::new(rx)).await?.into_inner();
        let mux = Arc::new(Mux { tx, routes: Mutex::new(Some(HashMap::new())), next: AtomicU64::new(1) });
        tokio::spawn(read(Arc::downgrade(&mux), responses));
        Ok(mux)
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, Route>>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_open(&self) -> bool {
        self.routes().is_some() && !self.tx.is_closed()
    }

    /// Registers a download. The scheduler answers a registration at once, with the
    /// download's first messages or with why it refused it; no answer within `timeout` is a
    /// `DeadlineExceeded`.
    pub async fn open_download(
        self: &Arc<Self>,
        first: DownloadRequest,
        timeout: std::time::Duration,
    ) -> Result<(mpsc::UnboundedSender<DownloadRequest>, Responses), Status> {
        let ended = || Status::unavailable("the scheduler session ended");
        let mut started = self.start(first).ok_or_else(ended)?;
        // Closed unless it is handed on: a caller that gives up on this future (a timeout
        // around it) must not leave the download registered for the life of the session.
        let mut opening = Opening { mux: self, id: started.id, open: true };
        match tokio::time::timeout(timeout, started.responses.recv()).await {
            Ok(Some(Ok(resp))) => {
                opening.open = false;
                Ok((self.requests(started.id), started.into_stream(resp)))
            }
            Ok(Some(Err(status))) => Err(status),
            Ok(None) => Err(ended()),
            Err(_) => Err(Status::deadline_exceeded("timed out")),
        }
    }

    /// Sends `first` (a registration) as a new download. `None`: the session has ended.
    fn start(&self, first: DownloadRequest) -> Option<Started> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (route, rx) = mpsc::unbounded_channel();
        self.routes().as_mut()?.insert(id, route);
        if self.tx.send(SessionRequest { id, request: Some(first) }).is_err() {
            self.forget(id);
            return None;
        }
        Some(Started { id, responses: rx })
    }

    /// The requests of download `id`, as a sender like a stream of its own would take: what
    /// goes in reaches the scheduler in order, and closing it closes the download.
    fn requests(self: &Arc<Self>, id: u64) -> mpsc::UnboundedSender<DownloadRequest> {
        let (tx, mut rx) = mpsc::unbounded_channel::<DownloadRequest>();
        let mux = self.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                if mux.tx.send(SessionRequest { id, request: Some(req) }).is_err() {
                    return;
                }
            }
            mux.close(id);
        });
        tx
    }

    /// Closes download `id`: the scheduler is told, and its responses end here.
    fn close(&self, id: u64) {
        let _ = self.tx.send(SessionRequest { id, request: None });
        self.forget(id);
    }

    fn forget(&self, id: u64) {
        if let Some(routes) = self.routes().as_mut() {
            routes.remove(&id);
        }
    }

    fn deliver(&self, msg: SessionResponse) {
        let mut routes = self.routes();
        let Some(routes) = routes.as_mut() else { return };
        match msg.kind {
            Some(Kind::Response(resp)) => {
                if let Some(route) = routes.get(&msg.id) {
                    let _ = route.send(Ok(resp));
                }
            }
            Some(Kind::Ended(end)) => {
                if let Some(route) = routes.remove(&msg.id) {
                    if end.code != 0 {
                        let _ = route.send(Err(Status::new(Code::from(end.code), end.message)));
                    }
                }
            }
            None => {}
        }
    }

    /// The session ended: every download on it sees its stream break.
    fn ended(&self, status: &Status) {
        let routes = self.routes().take().unwrap_or_default();
        for route in routes.into_values() {
            let _ = route.send(Err(status.clone()));
        }
    }
}

/// A download being opened on a session; closed if dropped while `open`.
struct Opening<'a> {
    mux: &'a Mux,
    id: u64,
    open: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.open {
            self.mux.close(self.id);
        }
    }
}

/// A download just started on a session.
struct Started {
    id: u64,
    responses: mpsc::UnboundedReceiver<Result<DownloadResponse, Status>>,
}

impl Started {
    /// The responses as a stream, `first` (already read) ahead of the rest.
    fn into_stream(self, first: DownloadResponse) -> Responses {
        let rest = UnboundedReceiverStream::new(self.responses);
        Box::pin(futures_util::StreamExt::chain(futures_util::stream::iter([Ok(first)]), rest))
    }
}

/// Routes the session's responses until it ends. Holds the mux weakly: once no download and no
/// endpoint holds it, the requests end and so does the session.
async fn read(mux: std::sync::Weak<Mux>, mut responses: Streaming<SessionResponse>) {
    let status = loop {
        match responses.message().await {
            Ok(Some(msg)) => match mux.upgrade() {
                Some(mux) => mux.deliver(msg),
                None => return,
            },
            Ok(None) => break Status::unavailable("the scheduler ended the session"),
            Err(status) => break status,
        }
    };
    tracing::debug!(error = %status, "scheduler session ended");
    if let Some(mux) = mux.upgrade() {
        mux.ended(&status);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use damselfly_proto::v1::scheduler_server::{Scheduler as Service, SchedulerServer};
    use damselfly_proto::v1::{self as proto, download_request};
    use damselfly_scheduler::{Scheduler, SchedulerConfig, SchedulerService};
    use tonic::{Request, Response};

    use super::*;
    use crate::net::schedulers::Schedulers;

    const D: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000ee";
    const E: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000ef";

    type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    /// A scheduler from before sessions: everything but `Downloads`.
    struct Older(SchedulerService);

    #[tonic::async_trait]
    impl Service for Older {
        async fn announce_host(
            &self,
            r: Request<proto::AnnounceHostRequest>,
        ) -> Result<Response<proto::AnnounceHostResponse>, Status> {
            self.0.announce_host(r).await
        }

        type DownloadStream = Boxed<DownloadResponse>;

        async fn download(
            &self,
            r: Request<Streaming<DownloadRequest>>,
        ) -> Result<Response<Self::DownloadStream>, Status> {
            self.0.download(r).await
        }

        type DownloadsStream = Boxed<SessionResponse>;

        async fn downloads(
            &self,
            _: Request<Streaming<SessionRequest>>,
        ) -> Result<Response<Self::DownloadsStream>, Status> {
            Err(Status::unimplemented("no sessions here"))
        }

        async fn stat_task(
            &self,
            r: Request<proto::StatTaskRequest>,
        ) -> Result<Response<proto::StatTaskResponse>, Status> {
            self.0.stat_task(r).await
        }

        async fn withdraw_task(
            &self,
            r: Request<proto::WithdrawTaskRequest>,
        ) -> Result<Response<proto::Empty>, Status> {
            self.0.withdraw_task(r).await
        }

        async fn leave_host(&self, r: Request<proto::LeaveHostRequest>) -> Result<Response<proto::Empty>, Status> {
            self.0.leave_host(r).await
        }

        async fn delete_task(&self, r: Request<proto::DeleteTaskRequest>) -> Result<Response<proto::Empty>, Status> {
            self.0.delete_task(r).await
        }

        type SeedTasksStream = Boxed<proto::SeedTask>;

        async fn seed_tasks(
            &self,
            r: Request<proto::SeedTasksRequest>,
        ) -> Result<Response<Self::SeedTasksStream>, Status> {
            self.0.seed_tasks(r).await
        }

        type PreheatTasksStream = Boxed<proto::HoldTask>;

        async fn preheat_tasks(
            &self,
            r: Request<proto::PreheatTasksRequest>,
        ) -> Result<Response<Self::PreheatTasksStream>, Status> {
            self.0.preheat_tasks(r).await
        }

        async fn put_cache_entry(
            &self,
            r: Request<proto::PutCacheEntryRequest>,
        ) -> Result<Response<proto::Empty>, Status> {
            self.0.put_cache_entry(r).await
        }

        async fn stat_cache_entry(
            &self,
            r: Request<proto::StatCacheEntryRequest>,
        ) -> Result<Response<proto::StatCacheEntryResponse>, Status> {
            self.0.stat_cache_entry(r).await
        }

        async fn drop_cache_entry(
            &self,
            r: Request<proto::DropCacheEntryRequest>,
        ) -> Result<Response<proto::Empty>, Status> {
            self.0.drop_cache_entry(r).await
        }

        async fn failed_url_task(
            &self,
            r: Request<proto::FailedUrlTaskRequest>,
        ) -> Result<Response<proto::Empty>, Status> {
            self.0.failed_url_task(r).await
        }
    }

    /// Opens downloads of `D` and `E` for host `h` through `urls`' first scheduler; returns
    /// the first response of each, and what keeps the downloads open.
    async fn open_two(urls: &[String]) -> (Vec<DownloadResponse>, Vec<mpsc::UnboundedSender<DownloadRequest>>) {
        let member = super::super::schedulers::tests::member();
        let s = Schedulers::new(urls, IpAddr::from([127, 0, 0, 1]), None, member).expect("schedulers");
        let announce = |i| {
            let s = &s;
            async move {
                let host = proto::Host { id: "h".into(), ip: "127.0.0.1".into(), upload_port: 1, ..Default::default() };
                let _ = s.announce(i, proto::AnnounceHostRequest { host: Some(host), ..Default::default() }).await;
            }
        };
        let (mut firsts, mut open) = (Vec::new(), Vec::new());
        for digest in [D, E] {
            let reg = proto::Register { host_id: "h".into(), digest: digest.into(), ..Default::default() };
            let first = DownloadRequest { kind: Some(download_request::Kind::Register(reg)) };
            let (tx, mut stream) = s.open_download(digest, first, announce).await.expect("opened");
            let resp = futures_util::StreamExt::next(&mut stream.responses).await;
            firsts.push(resp.expect("a response").expect("not an error"));
            open.push(tx);
        }
        (firsts, open)
    }

    #[tokio::test]
    async fn a_scheduler_without_sessions_gets_a_stream_per_download() {
        let core = Scheduler::new(SchedulerConfig { secret: b"s".to_vec(), ..Default::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let service = SchedulerServer::new(Older(SchedulerService::new(core.clone())));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server =
            tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        let (firsts, _open) = open_two(&[format!("http://{addr}")]).await;
        assert_eq!(firsts.len(), 2);
        let text = core.metrics().encode().expect("metrics");
        assert!(text.contains("damselfly_scheduler_streams{kind=\"download\"} 2"), "{text}");
        server.abort();
    }

    #[tokio::test]
    async fn downloads_of_one_host_share_its_session_with_a_scheduler() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cfg = SchedulerConfig { secret: b"s".to_vec(), ..Default::default() };
        let running = damselfly_scheduler::start(cfg, listener, None).await.expect("scheduler");
        let (firsts, _open) = open_two(&[format!("http://{}", running.grpc_addr)]).await;
        assert_eq!(firsts.len(), 2);
        let text = running.scheduler().metrics().encode().expect("metrics");
        assert!(text.contains("damselfly_scheduler_streams{kind=\"session\"} 1"), "{text}");
        assert!(!text.contains("kind=\"download\"} 1"), "{text}");
        running.shutdown().await;
    }
}
