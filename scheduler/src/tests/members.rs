//! The gRPC edge as a stranger and as a member acting for another member would use it: a
//! scheduler with a cluster secret takes no call without a membership proof, and a host id
//! belongs to the node that announced it first.

use std::time::{SystemTime, UNIX_EPOCH};

use damselfly_proto::member::{JoinKey, OwnerToken, HOST_HEADER, OWNER_HEADER, PROOF_HEADER};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::proto::scheduler_client::SchedulerClient;
use crate::proto::{self, AnnounceHostRequest};
use crate::{Running, SchedulerConfig};

const SECRET: &[u8] = b"the cluster secret of these tests";

async fn scheduler(insecure: bool) -> (Running, SchedulerClient<Channel>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let cfg = SchedulerConfig { secret: SECRET.to_vec(), insecure, ..SchedulerConfig::default() };
    let running = crate::start(cfg, listener, None).await.expect("scheduler");
    let client = SchedulerClient::connect(format!("http://{}", running.grpc_addr)).await.expect("connect");
    (running, client)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// `msg` as host `host` with owner token `owner` sends it, proven with `secret` at `at`.
fn signed<T>(msg: T, host: &str, owner: u8, secret: Option<&[u8]>, at: u64) -> Request<T> {
    let mut req = Request::new(msg);
    let token = OwnerToken::new([owner; 32]);
    let md = req.metadata_mut();
    md.insert(HOST_HEADER, host.parse().expect("ascii"));
    md.insert(OWNER_HEADER, token.to_hex().parse().expect("ascii"));
    if let Some(secret) = secret {
        md.insert(PROOF_HEADER, JoinKey::new(secret).prove(host, &token, at).parse().expect("ascii"));
    }
    req
}

fn announce_of(id: &str) -> AnnounceHostRequest {
    AnnounceHostRequest { host: Some(super::host(id)), tasks: vec![], ..Default::default() }
}

#[tokio::test]
async fn a_stranger_without_the_cluster_secret_reaches_no_state() {
    let (running, mut client) = scheduler(false).await;
    let bare = client.announce_host(Request::new(announce_of("node-1"))).await.expect_err("no proof");
    assert_eq!(bare.code(), Code::Unauthenticated, "{bare:?}");
    let wrong = signed(announce_of("node-1"), "node-1", 1, Some(b"a secret of another cluster"), now());
    assert_eq!(client.announce_host(wrong).await.expect_err("wrong secret").code(), Code::Unauthenticated);
    let stale = signed(announce_of("node-1"), "node-1", 1, Some(SECRET), now() - 3600);
    assert_eq!(client.announce_host(stale).await.expect_err("stale").code(), Code::Unauthenticated);
    let leave = client.leave_host(Request::new(proto::LeaveHostRequest { host_id: "node-1".into() })).await;
    assert_eq!(leave.expect_err("no proof").code(), Code::Unauthenticated);
    let stat = client.stat_task(Request::new(proto::StatTaskRequest { digest: super::D.into() })).await;
    assert_eq!(stat.expect_err("no proof").code(), Code::Unauthenticated);
    assert!(running.scheduler().lock().hosts.get("node-1").is_none());
    let text = running.scheduler().metrics().encode().expect("metrics");
    assert!(text.contains("damselfly_scheduler_member_refusals_total{reason=\"missing\"} 3"), "{text}");
    assert!(text.contains("damselfly_scheduler_member_refusals_total{reason=\"bad_proof\"} 1"), "{text}");
    running.shutdown().await;
}

#[tokio::test]
async fn a_host_id_and_its_upload_key_belong_to_the_node_that_announced_it_first() {
    let (running, mut client) = scheduler(false).await;
    let first = signed(announce_of("node-1"), "node-1", 1, Some(SECRET), now());
    let key = client.announce_host(first).await.expect("the first claimant").into_inner().upload_key;
    assert_eq!(key.len(), 32);
    // Another member, with a valid proof for the id but its own owner token, gets nothing.
    let second = signed(announce_of("node-1"), "node-1", 2, Some(SECRET), now());
    assert_eq!(client.announce_host(second).await.expect_err("a second claimant").code(), Code::PermissionDenied);
    let leave = signed(proto::LeaveHostRequest { host_id: "node-1".into() }, "node-1", 2, Some(SECRET), now());
    assert_eq!(client.leave_host(leave).await.expect_err("not the owner").code(), Code::PermissionDenied);
    // A member proven as node-2 cannot act for node-1 either.
    let other = signed(proto::LeaveHostRequest { host_id: "node-1".into() }, "node-2", 2, Some(SECRET), now());
    assert_eq!(client.leave_host(other).await.expect_err("another host").code(), Code::PermissionDenied);
    let withdraw = proto::WithdrawTaskRequest { host_id: "node-1".into(), digest: super::D.into() };
    let withdraw = signed(withdraw, "node-2", 2, Some(SECRET), now());
    assert_eq!(client.withdraw_task(withdraw).await.expect_err("another host").code(), Code::PermissionDenied);
    assert!(running.scheduler().lock().hosts.get("node-1").is_some());
    // The owner itself goes on as before, and after it left the id is free again.
    let again = signed(announce_of("node-1"), "node-1", 1, Some(SECRET), now());
    assert_eq!(client.announce_host(again).await.expect("the owner").into_inner().upload_key, key);
    let leave = signed(proto::LeaveHostRequest { host_id: "node-1".into() }, "node-1", 1, Some(SECRET), now());
    client.leave_host(leave).await.expect("the owner leaves");
    let next = signed(announce_of("node-1"), "node-1", 2, Some(SECRET), now());
    client.announce_host(next).await.expect("a free id");
    running.shutdown().await;
}

#[tokio::test]
async fn an_insecure_cluster_takes_calls_without_proof_but_keeps_owners_apart() {
    let (running, mut client) = scheduler(true).await;
    client.announce_host(signed(announce_of("node-1"), "node-1", 1, None, now())).await.expect("no proof needed");
    let second = signed(announce_of("node-1"), "node-1", 2, None, now());
    assert_eq!(client.announce_host(second).await.expect_err("another owner").code(), Code::PermissionDenied);
    let anonymous = client.announce_host(Request::new(announce_of("node-1"))).await.expect_err("no owner");
    assert_eq!(anonymous.code(), Code::PermissionDenied);
    running.shutdown().await;
}

#[tokio::test]
async fn only_a_hosts_owner_opens_its_preheat_stream() {
    let (running, mut client) = scheduler(false).await;
    let open = |host: &str, owner: u8, secret: Option<&[u8]>| {
        signed(proto::PreheatTasksRequest { host_id: "node-1".into() }, host, owner, secret, now())
    };
    let stranger = client.preheat_tasks(Request::new(proto::PreheatTasksRequest { host_id: "node-1".into() })).await;
    assert_eq!(stranger.err().map(|s| s.code()), Some(Code::Unauthenticated));
    // Unknown until announced.
    let early = client.preheat_tasks(open("node-1", 1, Some(SECRET))).await;
    assert_eq!(early.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    client.announce_host(signed(announce_of("node-1"), "node-1", 1, Some(SECRET), now())).await.expect("announce");
    let other = client.preheat_tasks(open("node-1", 2, Some(SECRET))).await;
    assert_eq!(other.err().map(|s| s.code()), Some(Code::PermissionDenied), "another member's owner token");
    let mut stream = client.preheat_tasks(open("node-1", 1, Some(SECRET))).await.expect("the owner").into_inner();
    let task = proto::SeedTask { digest: super::D.into(), length: 5, source: None };
    assert!(running.scheduler().ask_to_hold("node-1", task.clone()));
    let held = proto::HoldTask { kind: Some(proto::hold_task::Kind::Fetch(task.clone())) };
    assert_eq!(stream.message().await.expect("message"), Some(held));
    assert!(!running.scheduler().ask_seed("node-1", task), "not a seed");
    let view = running.scheduler().hosts_view();
    assert!(view[0].preheating && !view[0].seeding, "{view:?}");
    running.shutdown().await;
}
