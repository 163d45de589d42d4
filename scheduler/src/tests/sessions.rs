//! Regression tests for download sessions (`Downloads`), served over tonic on loopback.

use futures_util::{FutureExt, StreamExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Server};
use tonic::Code;

use super::*;
use crate::identity::SeedName;
use crate::proto::scheduler_client::SchedulerClient;
use crate::proto::session_response::Kind as SessionKind;
use crate::proto::{Ended, SessionRequest, SessionResponse};
use crate::service::SchedulerService;

const E: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000ab";

/// The scheduler served with a seed name and no TLS: no caller has a seed certificate.
async fn serve(core: &Scheduler) -> (SchedulerClient<Channel>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let name = SeedName::parse("seed.example").expect("name");
    let service = SchedulerService::server(core.clone(), Some(name));
    let incoming = TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        let _ = Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
    (SchedulerClient::connect(url).await.expect("connect"), server)
}

fn register(id: u64, host: &str, digest: &str) -> SessionRequest {
    sized(id, host, digest, u64::from(N) * PS)
}

fn sized(id: u64, host: &str, digest: &str, length: u64) -> SessionRequest {
    let reg = Register { digest: digest.into(), length, ..reg(host) };
    SessionRequest { id, request: Some(DownloadRequest { kind: Some(Req::Register(reg)) }) }
}

async fn next(rx: &mut tonic::Streaming<SessionResponse>) -> SessionResponse {
    let msg = tokio::time::timeout(std::time::Duration::from_secs(5), rx.message()).await.expect("in time");
    msg.expect("ok").expect("a message")
}

#[tokio::test]
async fn the_seed_check_runs_at_every_registration_on_a_session() {
    // Membership is another test's (`members.rs`): these callers prove none.
    let core = sched(|c| c.insecure = true);
    let (mut c, server) = serve(&core).await;
    announce(&core, host("s"), vec![]);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut resp = c.downloads(ReceiverStream::new(rx)).await.expect("session").into_inner();
    tx.send(register(1, "s", D)).await.expect("send");
    assert!(matches!(next(&mut resp).await.kind, Some(SessionKind::Response(_))));
    // The real seed announces itself, with its certificate.
    announce(&core, proto::Host { seed: true, ..host("s") }, vec![]);
    tx.send(register(2, "s", E)).await.expect("send");
    let second = next(&mut resp).await;
    assert!(
        matches!(second.kind, Some(SessionKind::Ended(Ended { code, .. })) if code == Code::PermissionDenied as i32),
        "{second:?}"
    );
    server.abort();
}

#[tokio::test]
async fn a_session_whose_host_does_not_read_holds_a_bounded_backlog() {
    // Membership is another test's (`members.rs`): these callers prove none.
    let core = sched(|c| c.insecure = true);
    // A task with 10,000 pinned pieces: every registration is answered with all their digests.
    let shas: Vec<String> = (0..10_000u32).map(|n| format!("{n:064x}")).collect();
    let info = TaskInfo { digest: D.into(), length: 10_000 * PS, piece_size: PS, piece_sha256: shas };
    announce(&core, host("holder"), vec![info]);
    announce(&core, host("h"), vec![]);
    let requests = (1..=300).map(|id| Ok(sized(id, "h", D, 10_000 * PS)));
    let body = http_body_util::StreamBody::new(
        futures_util::stream::iter(requests)
            .map(|r: Result<SessionRequest, tonic::Status>| r.map(|m| hyper::body::Frame::data(encode(&m))))
            .chain(futures_util::stream::pending()),
    );
    let inbound =
        tonic::Streaming::new_request(tonic_prost::ProstDecoder::<SessionRequest>::default(), body, None, None);
    let mut session = crate::session::SessionStream::new(core.clone(), Box::new(|_| Ok(())), inbound);
    // One poll reads what it may; the host reads nothing.
    assert!(matches!(session.next().now_or_never(), Some(Some(Ok(_)))));
    // It stopped reading requests at its high-water mark instead of queueing their answers
    // (210 MB for 300 registrations), and is still open: the host is slow, not gone.
    let queued = session.queued_bytes();
    assert!(queued <= crate::outbox::SESSION_HIGH_WATER + (1 << 20), "an unread session holds {} MB", queued >> 20);
    assert!(session.is_open());
}

/// A gRPC message frame: flag, length, body.
fn encode(m: &SessionRequest) -> bytes::Bytes {
    use prost::Message;
    let body = m.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}
