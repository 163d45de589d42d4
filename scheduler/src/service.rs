//! The gRPC service: a thin adapter from tonic to [`Scheduler`], and the edge where callers
//! are checked: membership (`damselfly_proto::member`), host ownership and the seed role.

use std::pin::Pin;
use std::task::{Context, Poll};

use damselfly_proto::member::{JoinKey, MemberError, Owner, OwnerToken, HOST_HEADER, OWNER_HEADER, PROOF_HEADER};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::download::DownloadHandle;
use crate::error::SchedulerError;
use crate::identity::SeedName;
use crate::metrics::OpenStream;
use crate::proto::download_request::Kind as Req;
use crate::proto::scheduler_server::{self, SchedulerServer};
use crate::proto::{self, DownloadRequest, DownloadResponse, HoldTask, SeedTask, SessionRequest, SessionResponse};
use crate::scheduler::Scheduler;
use crate::session::{ActFor, SessionStream};

/// Largest message accepted: an announcement of many tasks with their piece digests.
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone)]
pub struct SchedulerService {
    core: Scheduler,
    /// Set: only hosts whose client certificate is valid for this name may be seeds.
    seed_name: Option<SeedName>,
    /// Checks membership proofs; `None` in an insecure cluster.
    join: Option<JoinKey>,
    /// Client certificates are required and verified against the cluster's CA: one proves
    /// membership as well as a proof does.
    mutual_tls: bool,
}

/// Who makes a call, as far as it proved it.
struct Caller {
    /// Its client certificate names a seed (or no seed name is configured).
    may_seed: bool,
    /// The host id it says it is: the one its membership proof is for when `proven`.
    host: Option<String>,
    /// Its membership rests on a proof for `host` (not on a certificate, which names no host
    /// id, nor on an insecure cluster's trust).
    proven: bool,
    owner: Option<Owner>,
}

impl SchedulerService {
    pub fn new(core: Scheduler) -> Self {
        let join = (!core.config().insecure).then(|| JoinKey::new(&core.config().secret));
        let mutual_tls = core.config().tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        SchedulerService { core, seed_name: None, join, mutual_tls }
    }

    /// The service ready to add to a tonic router.
    pub(crate) fn server(core: Scheduler, seed_name: Option<SeedName>) -> SchedulerServer<SchedulerService> {
        let service = SchedulerService { seed_name, ..SchedulerService::new(core) };
        SchedulerServer::new(service).max_decoding_message_size(MAX_MESSAGE)
    }

    /// The caller of `req`, refused unless it proves membership: by a client certificate of
    /// the cluster's CA, or by a proof made with the cluster secret.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let md = req.metadata();
        let text = |name: &str| md.get(name).and_then(|v| v.to_str().ok());
        let host = text(HOST_HEADER).map(str::to_owned);
        let token = text(OWNER_HEADER).and_then(OwnerToken::parse);
        // The handshake verified it against the client CA already.
        let certified = self.mutual_tls && req.peer_certs().is_some_and(|c| !c.is_empty());
        if let Some(join) = self.join.as_ref().filter(|_| !certified) {
            let proven = match (&host, &token, text(PROOF_HEADER)) {
                (Some(host), Some(token), Some(proof)) => join.verify(host, token, proof, unix_now()),
                _ => Err(MemberError::Missing),
            };
            if let Err(e) = proven {
                self.core.metrics().member_refused(match e {
                    MemberError::Missing => "missing",
                    MemberError::Malformed => "malformed",
                    MemberError::Stale => "stale",
                    MemberError::BadProof => "bad_proof",
                });
                return Err(Status::unauthenticated(e.to_string()));
            }
        }
        let proven = self.join.is_some() && !certified;
        Ok(Caller { may_seed: self.may_seed(req), host, proven, owner: token.map(|t| t.owner()) })
    }

    fn may_seed<T>(&self, req: &Request<T>) -> bool {
        // Every download asks: without a seed name, leave the request's certificates alone.
        let Some(name) = &self.seed_name else { return true };
        name.admits(req.peer_certs().as_deref().map(Vec::as_slice))
    }

    /// Counts a call refused for want of a seed certificate, and says why to the caller.
    fn refuse(&self, call: &'static str, what: &str) -> Status {
        self.core.metrics().seed_refused(call);
        let name = self.seed_name.as_ref().map(ToString::to_string).unwrap_or_default();
        Status::permission_denied(format!("{what} a client certificate valid for {name}"))
    }

    /// Refuses a call made for host `host_id` by a caller that is not that host: its proof is
    /// for another id, another node owns the id, or the id is a seed's and the connection has
    /// no seed certificate. Host ids are not in certificates, so otherwise any node of the
    /// cluster could announce a seed's id as an ordinary host (ending its seed stream), make
    /// it leave, or take over its downloads. A seed that announces between this check and the
    /// call is demoted once, until its next announcement.
    fn act_for(&self, caller: &Caller, host_id: &str, call: &'static str) -> Result<(), Status> {
        if self.join.is_some() && caller.proven && caller.host.as_deref() != Some(host_id) {
            self.core.metrics().member_refused("other_host");
            let proven = caller.host.as_deref().unwrap_or_default();
            return Err(Status::permission_denied(format!("the membership proof is for {proven}, not {host_id}")));
        }
        if !self.core.may_act_for(host_id, caller.owner.as_ref()) {
            self.core.metrics().member_refused("not_owner");
            return Err(SchedulerError::NotOwner(host_id.to_owned()).into());
        }
        if caller.may_seed || !self.core.is_seed(host_id) {
            return Ok(());
        }
        Err(self.refuse(call, &format!("{host_id} is a seed: acting for it needs")))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl scheduler_server::Scheduler for SchedulerService {
    async fn announce_host(
        &self,
        req: Request<proto::AnnounceHostRequest>,
    ) -> Result<Response<proto::AnnounceHostResponse>, Status> {
        let caller = self.caller(&req)?;
        let mut announce = req.into_inner();
        if let Some(host) = announce.host.as_mut() {
            self.act_for(&caller, &host.id, "announce_host")?;
            if host.seed && !caller.may_seed {
                // Still a host like any other: its own pulls go on through the cluster.
                tracing::warn!(host = %host.id, seed_name = ?self.seed_name, "a host without a seed certificate announced itself a seed; taken as an ordinary host");
                self.core.metrics().seed_refused("announce_host");
                host.seed = false;
            }
        }
        let announced = self.core.announce_host_by(announce, caller.owner);
        if let Err(SchedulerError::NotOwner(_)) = &announced {
            self.core.metrics().member_refused("not_owner");
        }
        Ok(Response::new(announced?))
    }

    type DownloadStream = BoxStream<DownloadResponse>;

    async fn download(
        &self,
        req: Request<Streaming<DownloadRequest>>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let caller = self.caller(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty download stream"))?;
        let Some(Req::Register(reg)) = first.kind else {
            return Err(Status::invalid_argument("the first message must be Register"));
        };
        self.act_for(&caller, &reg.host_id, "download")?;
        let (handle, rx) = self.core.download(reg)?;
        let _open = self.core.metrics().stream_open("download");
        Ok(Response::new(Box::pin(DownloadStream {
            handle: Some(handle),
            inbound: Some(inbound),
            rx,
            error: None,
            _open,
        })))
    }

    type DownloadsStream = BoxStream<SessionResponse>;

    async fn downloads(
        &self,
        req: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::DownloadsStream>, Status> {
        let caller = self.caller(&req)?;
        let me = self.clone();
        let act_for: ActFor = Box::new(move |host_id: &str| me.act_for(&caller, host_id, "download"));
        Ok(Response::new(Box::pin(SessionStream::new(self.core.clone(), act_for, req.into_inner()))))
    }

    async fn stat_task(
        &self,
        req: Request<proto::StatTaskRequest>,
    ) -> Result<Response<proto::StatTaskResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(self.core.stat_task(req.get_ref())?))
    }

    async fn withdraw_task(&self, req: Request<proto::WithdrawTaskRequest>) -> Result<Response<proto::Empty>, Status> {
        self.act_for(&self.caller(&req)?, &req.get_ref().host_id, "withdraw_task")?;
        self.core.withdraw_task(req.get_ref())?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn leave_host(&self, req: Request<proto::LeaveHostRequest>) -> Result<Response<proto::Empty>, Status> {
        self.act_for(&self.caller(&req)?, &req.get_ref().host_id, "leave_host")?;
        self.core.leave_host(req.get_ref())?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn delete_task(&self, req: Request<proto::DeleteTaskRequest>) -> Result<Response<proto::Empty>, Status> {
        // Forgetting a task for every node (its pinned digests, its holders) is not one node's
        // to decide: with a seed name, only a certificate valid for it may.
        let caller = self.caller(&req)?;
        if self.seed_name.is_some() && !caller.may_seed {
            return Err(self.refuse("delete_task", "deleting a task for the whole cluster needs"));
        }
        self.core.delete_task(req.get_ref())?;
        Ok(Response::new(proto::Empty {}))
    }

    type SeedTasksStream = BoxStream<SeedTask>;

    async fn seed_tasks(
        &self,
        req: Request<proto::SeedTasksRequest>,
    ) -> Result<Response<Self::SeedTasksStream>, Status> {
        let caller = self.caller(&req)?;
        if !caller.may_seed {
            return Err(self.refuse("seed_tasks", "a seed needs"));
        }
        self.act_for(&caller, &req.get_ref().host_id, "seed_tasks")?;
        let sub = self.core.seed_tasks(req.get_ref())?;
        Ok(Response::new(Box::pin(sub.map(Ok))))
    }

    type PreheatTasksStream = BoxStream<HoldTask>;

    async fn preheat_tasks(
        &self,
        req: Request<proto::PreheatTasksRequest>,
    ) -> Result<Response<Self::PreheatTasksStream>, Status> {
        let caller = self.caller(&req)?;
        self.act_for(&caller, &req.get_ref().host_id, "preheat_tasks")?;
        let sub = self.core.preheat_tasks(req.get_ref())?;
        Ok(Response::new(Box::pin(sub.map(Ok))))
    }

    async fn put_cache_entry(
        &self,
        req: Request<proto::PutCacheEntryRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        self.act_for(&self.caller(&req)?, &req.get_ref().host_id, "put_cache_entry")?;
        self.core.put_cache_entry(req.into_inner())?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn stat_cache_entry(
        &self,
        req: Request<proto::StatCacheEntryRequest>,
    ) -> Result<Response<proto::StatCacheEntryResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(self.core.stat_cache_entry(req.get_ref())?))
    }

    async fn drop_cache_entry(
        &self,
        req: Request<proto::DropCacheEntryRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        // Any member may drop a name everywhere, as any may import one: names are the
        // cluster's (docs/security.md).
        self.act_for(&self.caller(&req)?, &req.get_ref().host_id, "drop_cache_entry")?;
        self.core.drop_cache_entry(req.get_ref())?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn failed_url_task(
        &self,
        req: Request<proto::FailedUrlTaskRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        self.act_for(&self.caller(&req)?, &req.get_ref().host_id, "failed_url_task")?;
        self.core.failed_url_task(req.get_ref())?;
        Ok(Response::new(proto::Empty {}))
    }
}

/// One download stream: applies the client's requests and yields the responses they queue.
/// Both directions are driven from this one stream (no task of its own) so that a request and
/// its answer cost one wake-up. The download closes when the client stops sending, a request
/// is refused (the stream then ends with its status after what was queued) or this is dropped.
struct DownloadStream {
    handle: Option<DownloadHandle>,
    inbound: Option<Streaming<DownloadRequest>>,
    rx: mpsc::Receiver<DownloadResponse>,
    error: Option<Status>,
    _open: OpenStream,
}

impl DownloadStream {
    /// Closing the download drops its response sender, so `rx` ends after what is queued.
    fn close(&mut self, error: Option<Status>) {
        self.inbound = None;
        self.handle = None;
        self.error = error;
    }
}

impl Stream for DownloadStream {
    type Item = Result<DownloadResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Every request that is ready first: each may queue responses.
        while let (Some(inbound), Some(handle)) = (this.inbound.as_mut(), this.handle.as_mut()) {
            match Pin::new(inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(req))) => {
                    if let Err(e) = handle.send(req) {
                        tracing::debug!(digest = %handle.digest(), host = %handle.host_id(), error = %e, "download request refused");
                        this.close(Some(e.into()));
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(error = %status, "download stream broke");
                    this.close(None);
                }
                Poll::Ready(None) => this.close(None),
                Poll::Pending => break,
            }
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(msg)) => Poll::Ready(Some(Ok(msg))),
            Poll::Ready(None) => Poll::Ready(this.error.take().map(Err)),
            Poll::Pending => Poll::Pending,
        }
    }
}
