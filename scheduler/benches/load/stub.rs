//! The floor under the scheduler's figures: a service that speaks the same protocol and answers
//! every request at once with a decision of the usual size, making none. Run beside the real
//! scheduler, it shows what tonic, h2 and the kernel cost this machine for the same traffic.

use std::pin::Pin;

use damselfly_proto::v1::download_request::Kind as Req;
use damselfly_proto::v1::download_response::Kind;
use damselfly_proto::v1::scheduler_server::{Scheduler, SchedulerServer};
use damselfly_proto::v1::{self as proto, DownloadRequest, DownloadResponse};
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct TransportOnly;

pub fn server() -> SchedulerServer<TransportOnly> {
    SchedulerServer::new(TransportOnly)
}

/// Four parents with tokens and piece lists, as a real decision for these tasks carries.
fn decision() -> DownloadResponse {
    let parent = |i: u32| proto::Parent {
        host_id: format!("host-{i}"),
        ip: "10.1.0.1".into(),
        port: 4000,
        token: "t".repeat(96),
        pieces: (0..8).collect(),
    };
    let parents = proto::Parents { parents: (0..4).map(parent).collect(), length: 32 << 20, piece_size: 4 << 20 };
    DownloadResponse { kind: Some(Kind::Parents(parents)) }
}

#[tonic::async_trait]
impl Scheduler for TransportOnly {
    async fn announce_host(
        &self,
        _: Request<proto::AnnounceHostRequest>,
    ) -> Result<Response<proto::AnnounceHostResponse>, Status> {
        Ok(Response::new(proto::AnnounceHostResponse { upload_key: vec![0; 32], announce_interval_secs: 30 }))
    }

    type DownloadStream = BoxStream<DownloadResponse>;

    /// A decision for the registration and for every request to decide again.
    async fn download(
        &self,
        req: Request<Streaming<DownloadRequest>>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let answers = req.into_inner().filter_map(|m| async move {
            match m {
                Ok(DownloadRequest { kind: Some(Req::Register(_) | Req::Reschedule(_)) }) => Some(Ok(decision())),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    type DownloadsStream = BoxStream<proto::SessionResponse>;

    /// The same answers on a host's session stream, tagged with their download.
    async fn downloads(
        &self,
        req: Request<Streaming<proto::SessionRequest>>,
    ) -> Result<Response<Self::DownloadsStream>, Status> {
        let answers = req.into_inner().filter_map(|m| async move {
            let m = match m {
                Ok(m) => m,
                Err(e) => return Some(Err(e)),
            };
            match m.request.and_then(|r| r.kind) {
                Some(Req::Register(_) | Req::Reschedule(_)) => Some(Ok(proto::SessionResponse {
                    id: m.id,
                    kind: Some(proto::session_response::Kind::Response(decision())),
                })),
                _ => None,
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn stat_task(&self, _: Request<proto::StatTaskRequest>) -> Result<Response<proto::StatTaskResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn withdraw_task(&self, _: Request<proto::WithdrawTaskRequest>) -> Result<Response<proto::Empty>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn leave_host(&self, _: Request<proto::LeaveHostRequest>) -> Result<Response<proto::Empty>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn delete_task(&self, _: Request<proto::DeleteTaskRequest>) -> Result<Response<proto::Empty>, Status> {
        Err(Status::unimplemented("stub"))
    }

    type SeedTasksStream = BoxStream<proto::SeedTask>;

    async fn seed_tasks(&self, _: Request<proto::SeedTasksRequest>) -> Result<Response<Self::SeedTasksStream>, Status> {
        Err(Status::unimplemented("stub"))
    }

    type PreheatTasksStream = BoxStream<proto::HoldTask>;

    async fn preheat_tasks(
        &self,
        _: Request<proto::PreheatTasksRequest>,
    ) -> Result<Response<Self::PreheatTasksStream>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn put_cache_entry(&self, _: Request<proto::PutCacheEntryRequest>) -> Result<Response<proto::Empty>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn stat_cache_entry(
        &self,
        _: Request<proto::StatCacheEntryRequest>,
    ) -> Result<Response<proto::StatCacheEntryResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn drop_cache_entry(
        &self,
        _: Request<proto::DropCacheEntryRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn failed_url_task(&self, _: Request<proto::FailedUrlTaskRequest>) -> Result<Response<proto::Empty>, Status> {
        Err(Status::unimplemented("stub"))
    }
}
