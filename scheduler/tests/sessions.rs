//! Downloads over a host's session stream (`Downloads`), served over real tonic on loopback.

use std::time::Duration;

use damselfly_proto::v1::download_request::Kind as Req;
use damselfly_proto::v1::download_response::Kind;
use damselfly_proto::v1::scheduler_client::SchedulerClient;
use damselfly_proto::v1::session_response::Kind as SessionKind;
use damselfly_proto::v1::{self as proto, DownloadRequest, Ended, SessionRequest, SessionResponse};
use damselfly_scheduler::{start, Running, SchedulerConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const D: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000cc";
const E: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000dd";
const WAIT: Duration = Duration::from_secs(5);

async fn serve() -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    // Membership is checked in `src/tests/members.rs`: these clients prove none.
    let config = SchedulerConfig { secret: b"session test secret".to_vec(), insecure: true, ..Default::default() };
    start(config, grpc, None).await.expect("start")
}

async fn client(r: &Running) -> SchedulerClient<Channel> {
    let mut c = SchedulerClient::connect(format!("http://{}", r.grpc_addr)).await.expect("connect");
    for id in ["a", "b"] {
        let host = proto::Host { id: id.into(), ip: "127.0.0.1".into(), upload_port: 4000, ..Default::default() };
        c.announce_host(proto::AnnounceHostRequest { host: Some(host), tasks: vec![], ..Default::default() })
            .await
            .expect("announce");
    }
    c
}

struct Session {
    tx: mpsc::Sender<SessionRequest>,
    rx: Streaming<SessionResponse>,
}

impl Session {
    async fn open(c: &mut SchedulerClient<Channel>) -> Session {
        let (tx, rx) = mpsc::channel(64);
        let rx = c.downloads(ReceiverStream::new(rx)).await.expect("session").into_inner();
        Session { tx, rx }
    }

    async fn send(&self, id: u64, kind: Option<Req>) {
        let request = kind.map(|k| DownloadRequest { kind: Some(k) });
        self.tx.send(SessionRequest { id, request }).await.expect("queue");
    }

    async fn register(&self, id: u64, host: &str, digest: &str) {
        let reg = proto::Register {
            host_id: host.into(),
            digest: digest.into(),
            length: 8 << 20,
            piece_size: 4 << 20,
            ..Default::default()
        };
        self.send(id, Some(Req::Register(reg))).await;
    }

    async fn next(&mut self) -> (u64, SessionKind) {
        let msg = tokio::time::timeout(WAIT, self.rx.message()).await.expect("in time").expect("ok").expect("message");
        (msg.id, msg.kind.expect("a kind"))
    }

    /// Nothing arrives for a while.
    async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await.is_err()
    }
}

fn decision(kind: SessionKind) -> Kind {
    match kind {
        SessionKind::Response(r) => r.kind.expect("a response"),
        other => panic!("a response expected, got {other:?}"),
    }
}

#[tokio::test]
async fn one_session_carries_several_downloads_each_answered_under_its_own_id() {
    let r = serve().await;
    let mut c = client(&r).await;
    let mut a = Session::open(&mut c).await;
    a.register(1, "a", D).await;
    a.register(2, "a", E).await;
    let mut firsts = vec![a.next().await, a.next().await];
    firsts.sort_by_key(|(id, _)| *id);
    for (id, kind) in firsts {
        assert!(matches!(decision(kind), Kind::BackToSource(_)), "download {id}");
    }
    // Another host's download of D is sent to a, in its own session.
    let mut b = Session::open(&mut c).await;
    b.register(7, "b", D).await;
    let (id, kind) = b.next().await;
    let Kind::Parents(p) = decision(kind) else { panic!("parents expected") };
    assert_eq!((id, p.parents[0].host_id.as_str()), (7, "a"));
    // a's piece of D reaches b's download as news; E's download hears nothing of it.
    let piece = proto::PieceFinished { number: 0, sha256: "ab".repeat(32), ..Default::default() };
    a.send(1, Some(Req::PieceFinished(piece))).await;
    let (id, kind) = b.next().await;
    assert!(id == 7 && matches!(decision(kind), Kind::PieceDigests(_)));
    let (id, kind) = b.next().await;
    assert!(id == 7 && matches!(decision(kind), Kind::PieceAvailable(_)));
    assert!(a.quiet().await, "nothing is sent back to the reporter");
    // Closing a download is not answered; the session and its other download go on.
    a.send(1, Some(Req::Finished(proto::Finished {}))).await;
    a.send(1, None).await;
    assert!(a.quiet().await);
    a.send(2, Some(Req::Reschedule(proto::Reschedule { stalled: vec![] }))).await;
    let (id, _) = a.next().await;
    assert_eq!(id, 2);
    let stat = c.stat_task(proto::StatTaskRequest { digest: D.into() }).await.expect("stat").into_inner();
    assert!(stat.peers.iter().any(|p| p.host_id == "a" && p.finished));
    r.shutdown().await;
}

#[tokio::test]
async fn a_refused_download_ends_with_its_status_and_the_session_goes_on() {
    let r = serve().await;
    let mut c = client(&r).await;
    let mut a = Session::open(&mut c).await;
    // An unknown host is refused as a Download stream would be: the node announces, retries.
    a.register(1, "stranger", D).await;
    let (id, kind) = a.next().await;
    let SessionKind::Ended(Ended { code, .. }) = kind else { panic!("ended expected") };
    assert_eq!((id, Code::from(code)), (1, Code::FailedPrecondition));
    a.register(2, "a", D).await;
    assert!(matches!(decision(a.next().await.1), Kind::BackToSource(_)));
    // An id in use is refused without touching the download open under it.
    a.register(2, "a", E).await;
    let (id, kind) = a.next().await;
    assert!(id == 2 && matches!(kind, SessionKind::Ended(Ended { code: 3, .. })), "{kind:?}");
    // A bad request ends that download only, with its status.
    a.register(3, "a", E).await;
    assert!(matches!(decision(a.next().await.1), Kind::BackToSource(_)));
    let piece = proto::PieceFinished { number: 99, ..Default::default() };
    a.send(3, Some(Req::PieceFinished(piece))).await;
    let (id, kind) = a.next().await;
    assert!(id == 3 && matches!(kind, SessionKind::Ended(Ended { code: 3, .. })), "{kind:?}");
    assert!(a.quiet().await, "a refusal is said once");
    // A session is one host's.
    a.register(4, "b", E).await;
    let (id, kind) = a.next().await;
    assert!(id == 4 && matches!(kind, SessionKind::Ended(Ended { code: 3, .. })), "{kind:?}");
    r.shutdown().await;
}

#[tokio::test]
async fn a_newer_registration_of_the_same_download_ends_the_older_one_cleanly() {
    let r = serve().await;
    let mut c = client(&r).await;
    let mut a = Session::open(&mut c).await;
    a.register(1, "a", D).await;
    assert!(matches!(decision(a.next().await.1), Kind::BackToSource(_)));
    a.register(2, "a", D).await;
    let mut got = [a.next().await, a.next().await];
    got.sort_by_key(|(id, _)| *id);
    assert!(matches!(got[0], (1, SessionKind::Ended(Ended { code: 0, .. }))), "{:?}", got[0]);
    assert!(matches!(got[1], (2, SessionKind::Response(_))), "{:?}", got[1]);
    r.shutdown().await;
}

#[tokio::test]
async fn shutting_down_ends_sessions() {
    let r = serve().await;
    let mut c = client(&r).await;
    let mut a = Session::open(&mut c).await;
    a.register(1, "a", D).await;
    assert!(matches!(decision(a.next().await.1), Kind::BackToSource(_)));
    let stopping = tokio::spawn(r.shutdown());
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match a.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    });
    ended.await.expect("the session ends at shutdown");
    stopping.await.expect("shut down");
}
