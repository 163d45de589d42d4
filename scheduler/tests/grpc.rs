//! The scheduler served over real tonic and hyper on loopback, used as nodes and Prometheus do.

use std::time::Duration;

use damselfly_proto::token;
use damselfly_proto::v1::download_request::Kind as Req;
use damselfly_proto::v1::download_response::Kind;
use damselfly_proto::v1::scheduler_client::SchedulerClient;
use damselfly_proto::v1::{self as proto, DownloadRequest, DownloadResponse};
use damselfly_scheduler::{start, Running, SchedulerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const D: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000bb";
const SECRET: &[u8] = b"grpc test secret";
const WAIT: Duration = Duration::from_secs(5);

/// Membership is checked in `src/tests/members.rs`: these clients prove none.
async fn serve() -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = SchedulerConfig { secret: SECRET.to_vec(), insecure: true, ..Default::default() };
    start(config, grpc, Some(http)).await.expect("start")
}

async fn client(r: &Running) -> SchedulerClient<Channel> {
    SchedulerClient::connect(format!("http://{}", r.grpc_addr)).await.expect("connect")
}

async fn announce(c: &mut SchedulerClient<Channel>, id: &str) -> proto::AnnounceHostResponse {
    let host =
        proto::Host { id: id.into(), ip: "127.0.0.1".into(), upload_port: 4000, upload_slots: 4, ..Default::default() };
    c.announce_host(proto::AnnounceHostRequest { host: Some(host), tasks: vec![], ..Default::default() })
        .await
        .expect("announce")
        .into_inner()
}

fn req(kind: Req) -> DownloadRequest {
    DownloadRequest { kind: Some(kind) }
}

fn register(host: &str) -> DownloadRequest {
    req(Req::Register(proto::Register {
        host_id: host.into(),
        digest: D.into(),
        length: 8 << 20,
        piece_size: 4 << 20,
        ..Default::default()
    }))
}

async fn open(
    c: &mut SchedulerClient<Channel>,
    first: DownloadRequest,
) -> Result<(mpsc::Sender<DownloadRequest>, Streaming<DownloadResponse>), tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.expect("queue");
    let resp = c.download(ReceiverStream::new(rx)).await?;
    Ok((tx, resp.into_inner()))
}

async fn next(s: &mut Streaming<DownloadResponse>) -> Kind {
    let msg = tokio::time::timeout(WAIT, s.message()).await.expect("in time").expect("message");
    msg.and_then(|m| m.kind).expect("a response")
}

#[tokio::test]
async fn two_hosts_exchange_pieces_over_download_streams() {
    let r = serve().await;
    let mut c = client(&r).await;
    let key = announce(&mut c, "a").await;
    assert_eq!(key.upload_key, token::upload_key(SECRET, "a").to_vec());
    announce(&mut c, "b").await;
    let (a_tx, mut a) = open(&mut c, register("a")).await.expect("a");
    assert!(matches!(next(&mut a).await, Kind::BackToSource(_)));
    let (b_tx, mut b) = open(&mut c, register("b")).await.expect("b");
    let Kind::Parents(p) = next(&mut b).await else { panic!("parents expected") };
    assert_eq!((p.length, p.piece_size, p.parents.len()), (8 << 20, 4 << 20, 1));
    let key: [u8; 32] = key.upload_key.try_into().expect("key length");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert_eq!(token::verify(&[key], &p.parents[0].token, D, now), Ok("b".to_owned()));

    let sha = "ab".repeat(32);
    let piece = proto::PieceFinished { number: 1, parent_id: String::new(), sha256: sha.clone(), cost_micros: 10 };
    a_tx.send(req(Req::PieceFinished(piece))).await.expect("send");
    let Kind::PieceDigests(d) = next(&mut b).await else { panic!("digests expected") };
    assert_eq!(d.digests[0].sha256, sha);
    let Kind::PieceAvailable(av) = next(&mut b).await else { panic!("available expected") };
    assert_eq!((av.host_id.as_str(), av.pieces.as_slice()), ("a", &[1][..]));

    a_tx.send(req(Req::Finished(proto::Finished {}))).await.expect("send");
    drop(a_tx);
    // Closing the request side ends the response stream.
    assert!(tokio::time::timeout(WAIT, a.message()).await.expect("in time").expect("ok").is_none());
    let stat = c.stat_task(proto::StatTaskRequest { digest: D.into() }).await.expect("stat").into_inner();
    assert_eq!((stat.known, stat.piece_count, stat.quarantined), (true, 2, false));
    let a_stat = stat.peers.iter().find(|p| p.host_id == "a").expect("a");
    assert_eq!((a_stat.pieces, a_stat.finished), (2, true));
    drop(b_tx);
    r.shutdown().await;
}

#[tokio::test]
async fn bad_streams_end_with_the_status_nodes_act_on() {
    let r = serve().await;
    let mut c = client(&r).await;
    let not_register = req(Req::Finished(proto::Finished {}));
    assert_eq!(open(&mut c, not_register).await.err().map(|s| s.code()), Some(Code::InvalidArgument));
    assert_eq!(open(&mut c, register("stranger")).await.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    announce(&mut c, "a").await;
    let (tx, mut a) = open(&mut c, register("a")).await.expect("a");
    assert!(matches!(next(&mut a).await, Kind::BackToSource(_)));
    let piece = proto::PieceFinished { number: 99, ..Default::default() };
    tx.send(req(Req::PieceFinished(piece))).await.expect("send");
    let end = tokio::time::timeout(WAIT, a.message()).await.expect("in time");
    assert_eq!(end.err().map(|s| s.code()), Some(Code::InvalidArgument));
    let not_seed = c.seed_tasks(proto::SeedTasksRequest { host_id: "a".into() }).await.err();
    assert_eq!(not_seed.map(|s| s.code()), Some(Code::FailedPrecondition));
    r.shutdown().await;
}

#[tokio::test]
async fn the_health_service_reports_serving() {
    let r = serve().await;
    let channel =
        Channel::from_shared(format!("http://{}", r.grpc_addr)).expect("uri").connect().await.expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "damselfly.scheduler.v1.Scheduler"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.expect("check").into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "{service:?}");
    }
    r.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await.expect("in time").expect("read");
    out
}

#[tokio::test]
async fn http_serves_healthy_and_metrics() {
    let r = serve().await;
    let addr = r.http_addr.expect("http");
    let healthy = http_get(addr, "/healthy").await;
    assert!(healthy.starts_with("HTTP/1.1 200 OK\r\n") && healthy.ends_with("\r\n\r\nOK"), "{healthy}");
    let mut c = client(&r).await;
    announce(&mut c, "a").await;
    let (_tx, mut a) = open(&mut c, register("a")).await.expect("a");
    next(&mut a).await;
    let metrics = http_get(addr, "/metrics").await;
    let ct = "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n";
    assert!(metrics.to_lowercase().contains(ct), "{metrics}");
    for line in [
        "damselfly_scheduler_hosts 1",
        "damselfly_scheduler_peers 1",
        "damselfly_scheduler_decisions_total{kind=\"back_to_source\"} 1",
        "damselfly_scheduler_decision_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from {metrics}");
    }
    assert!(http_get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    // An open download does not hold up shutdown.
    tokio::time::timeout(Duration::from_secs(3), r.shutdown()).await.expect("prompt shutdown");
}

#[tokio::test]
async fn a_scheduler_with_a_broken_certificate_does_not_start() {
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls = damselfly_scheduler::ServerTls {
        cert: b"junk".to_vec(),
        key: b"junk".to_vec(),
        client_ca: None,
        seed_name: None,
    };
    let config = SchedulerConfig { tls: Some(tls), insecure: true, ..Default::default() };
    assert!(start(config, grpc, None).await.is_err());
}

#[tokio::test]
async fn a_seed_name_without_client_certificates_or_that_is_no_name_does_not_start() {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params").self_signed(&key).expect("cert");
    let tls = |client_ca: Option<Vec<u8>>, seed_name: &str| damselfly_scheduler::ServerTls {
        cert: cert.pem().into_bytes(),
        key: key.serialize_pem().into_bytes(),
        client_ca,
        seed_name: Some(seed_name.to_owned()),
    };
    let ca = Some(cert.pem().into_bytes());
    for (tls, starts) in
        [(tls(None, "seed.internal"), false), (tls(ca.clone(), "not a name"), false), (tls(ca, "seed.internal"), true)]
    {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let config = SchedulerConfig { tls: Some(tls), insecure: true, ..Default::default() };
        match start(config, grpc, None).await {
            Ok(running) => {
                assert!(starts, "started");
                running.shutdown().await;
            }
            Err(e) => assert!(!starts, "did not start: {e}"),
        }
    }
}
