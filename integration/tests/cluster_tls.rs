//! TLS in a cluster. Nodes reach their scheduler over TLS: they verify it against the
//! cluster's CA, and a scheduler that asks for client certificates turns away a node whose
//! certificate another CA signed (that node still pulls, from the origin). With `peer_tls`,
//! pieces travel between nodes over mutual TLS too.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use damselfly_integration::token_auth::{PASSWORD, USER};
use damselfly_integration::{
    fetch, http_client, poll_until, random_bytes, Metrics, Mirror, MirrorOpts, Registry, TestCa as Ca, TokenAuthFront,
    MIB,
};
use damselfly_proto::v1::{self as proto, scheduler_client::SchedulerClient};
use damselfly_scheduler::{Running, SchedulerConfig, ServerTls};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const REPO: &str = "test/tls";

async fn metric(node: &Mirror, name: &str, filter: &[(&str, &str)]) -> f64 {
    node.metrics().await.unwrap().sum(name, filter)
}

/// A scheduler on 127.0.0.1 serving gRPC over TLS with a certificate from `ca`, asking nodes
/// for certificates from `ca` too; returns it with its `https://` URL.
async fn tls_scheduler(ca: &Ca) -> (Running, String) {
    tls_scheduler_seeding(ca, None).await
}

/// The same, taking as seeds only nodes whose certificate is valid for `seed_name`.
async fn tls_scheduler_seeding(ca: &Ca, seed_name: Option<&str>) -> (Running, String) {
    let (cert, key) = ca.issue("scheduler", &["127.0.0.1"]);
    let read = |p: &Path| std::fs::read(p).unwrap();
    let tls = ServerTls {
        cert: read(&cert),
        key: read(&key),
        client_ca: Some(read(&ca.path(&ca.file))),
        seed_name: seed_name.map(str::to_owned),
    };
    let config = SchedulerConfig {
        secret: b"scheduler tls test secret".to_vec(),
        announce_interval: Duration::from_secs(2),
        tls: Some(tls),
        ..SchedulerConfig::default()
    };
    let bind = || tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)));
    let running = damselfly_scheduler::start(config, bind().await.unwrap(), Some(bind().await.unwrap())).await.unwrap();
    let url = format!("https://{}", running.grpc_addr);
    (running, url)
}

/// Node `i` on 127.0.0.(2+i), reaching the scheduler at `url` with a certificate from `issuer`
/// that names its address.
fn tls_node(opts: MirrorOpts, i: u8, url: &str, ca: &Ca, issuer: &Ca) -> MirrorOpts {
    tls_node_named(opts, i, url, ca, issuer, &[])
}

/// The same, with `more` names in its certificate.
fn tls_node_named(opts: MirrorOpts, i: u8, url: &str, ca: &Ca, issuer: &Ca, more: &[&str]) -> MirrorOpts {
    let id = format!("tls-node-{i}");
    let ip = IpAddr::from([127, 0, 0, 2 + i]);
    let mut opts = opts.cluster(ip, &[url.to_owned()], &id);
    let ip = ip.to_string();
    let names: Vec<&str> = [id.as_str(), ip.as_str()].into_iter().chain(more.iter().copied()).collect();
    let (cert, key) = issuer.issue(&id, &names);
    opts.config.cluster_ca = Some(ca.path(&ca.file));
    (opts.config.cluster_cert, opts.config.cluster_key) = (Some(cert), Some(key));
    opts
}

async fn wait_for_hosts(scheduler: &Running, hosts: f64) {
    wait_for_metric(scheduler, "damselfly_scheduler_hosts", &[], hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_pieces_through_a_scheduler_reached_over_mutual_tls() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let stranger_ca = Ca::new(dir.path(), "stranger-ca");
    let (scheduler, url) = tls_scheduler(&ca).await;
    let node = |i: u8, issuer: &Ca| Mirror::start(tls_node(MirrorOpts::new(&origin.url()), i, &url, &ca, issuer));
    let nodes = [node(0, &ca).await.unwrap(), node(1, &ca).await.unwrap(), node(2, &stranger_ca).await.unwrap()];
    for n in &nodes {
        let url = n.blob_url_ns(REPO, &digest, &origin.host());
        fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    }

    let from_peers = metric(&nodes[1], "damselfly_download_bytes_total", &[("source", "peer")]).await;
    assert_eq!(from_peers, size as f64, "node 1 took the blob from node 0, steered over TLS");
    let refused = &nodes[2];
    assert_eq!(metric(refused, "damselfly_download_bytes_total", &[("source", "peer")]).await, 0.0);
    assert_eq!(metric(refused, "damselfly_download_bytes_total", &[("source", "origin")]).await, size as f64);
    assert!(
        metric(refused, "damselfly_scheduler_errors_total", &[]).await > 0.0,
        "a node with a stranger's certificate is refused by the scheduler"
    );
    let log = origin.settled_access_log().await;
    // Besides each node's proof window (`PROOF_WINDOW`), which every node's first request asks for.
    let proofs = 3 * damselfly_mirror::api::PROOF_WINDOW;
    assert_eq!(log.blob_get_bytes(&digest), 2 * size + proofs, "node 0 and the refused node read the origin");
    for n in nodes {
        n.shutdown().await;
    }
    scheduler.shutdown().await;
}

/// Private content: the client's token (short-lived, scoped to the repository) goes with the
/// registration over TLS, and the scheduler hands it to the seed it asks to fetch the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_fetches_private_content_with_the_token_of_the_client_that_asked() {
    let origin = Registry::start().await.unwrap();
    let front = TokenAuthFront::start(&origin.url()).await.unwrap();
    let repo = "private/tls";
    let size = 16 * MIB;
    let digest = origin.push_blob(repo, random_bytes(size as usize)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let (scheduler, url) = tls_scheduler(&ca).await;
    let opts = || MirrorOpts::new(&origin.url()).insecure_registry(&front.host());
    let seed = Mirror::start(tls_node(opts(), 0, &url, &ca, &ca).seed()).await.unwrap();
    let mut sharing = tls_node(opts(), 1, &url, &ca, &ca);
    sharing.config.share_tokens_with_seeds = true;
    let node = Mirror::start(sharing).await.unwrap();
    wait_for_hosts(&scheduler, 2.0).await;
    // The seed takes tasks once its seed stream is open.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let token = front.fetch_token(&format!("repository:{repo}:pull"), Some((USER, PASSWORD))).await.unwrap();
    let request = http_client().get(node.blob_url_ns(repo, &digest, &front.host())).bearer_auth(token);
    fetch(request, false).await.unwrap().assert_blob(&digest, size);
    let seed_fetched = metric(&seed, "damselfly_fetched_bytes_total", &[("source", "origin")]).await;
    assert_eq!(seed_fetched, size as f64, "the seed fetched the private blob with the client's token");
    assert_eq!(metric(&node, "damselfly_download_bytes_total", &[("source", "peer")]).await, size as f64);
    origin.settled_access_log().await.assert_copies_at_most(&[(digest, size)], 1.1);

    // A node that did not opt in keeps its client's token: the seed cannot fetch the next
    // private blob, and the node fetches it from the origin itself.
    let other = origin.push_blob(repo, random_bytes(size as usize)).await.unwrap();
    let keeping = Mirror::start(tls_node(opts(), 2, &url, &ca, &ca)).await.unwrap();
    wait_for_hosts(&scheduler, 3.0).await;
    let token = front.fetch_token(&format!("repository:{repo}:pull"), Some((USER, PASSWORD))).await.unwrap();
    let request = http_client().get(keeping.blob_url_ns(repo, &other, &front.host())).bearer_auth(token);
    fetch(request, false).await.unwrap().assert_blob(&other, size);
    assert_eq!(metric(&seed, "damselfly_fetched_bytes_total", &[("source", "origin")]).await, size as f64);
    assert_eq!(metric(&keeping, "damselfly_download_bytes_total", &[("source", "origin")]).await, size as f64);
    for n in [node, seed, keeping] {
        n.shutdown().await;
    }
    scheduler.shutdown().await;
}

/// A scheduler metric, summed over the series that match `filter`.
async fn scheduler_metric(scheduler: &Running, name: &str, filter: &[(&str, &str)]) -> f64 {
    let url = format!("http://{}/metrics", scheduler.http_addr.unwrap());
    Metrics::scrape(&url).await.map(|m| m.sum(name, filter)).unwrap_or(0.0)
}

async fn wait_for_metric(scheduler: &Running, name: &'static str, filter: &[(&str, &str)], at_least: f64) {
    poll_until(name, Duration::from_secs(15), || async move {
        Ok((scheduler_metric(scheduler, name, filter).await >= at_least).then_some(()))
    })
    .await
    .unwrap();
}

/// A gRPC client of the scheduler at `url`, showing the certificate `cert`/`key` from `ca`.
async fn grpc_as(url: &str, ca: &Ca, cert: &Path, key: &Path) -> SchedulerClient<Channel> {
    let read = |p: &Path| std::fs::read(p).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&ca.path(&ca.file))))
        .identity(Identity::from_pem(read(cert), read(key)))
        .domain_name("127.0.0.1");
    let channel = Channel::from_shared(url.to_owned()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    SchedulerClient::new(channel)
}

/// With a seed name, the seed role is written into certificates. A node whose certificate
/// lacks the name is an ordinary node however it announces itself: it is sent no seed tasks,
/// and so none of the tokens nodes share with seeds, and it cannot act for a seed's host id.
/// A node whose certificate has the name seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_node_with_a_certificate_for_the_seed_name_is_taken_as_a_seed() {
    const SEED_NAME: &str = "seed.damselfly.test";
    let origin = Registry::start().await.unwrap();
    let front = TokenAuthFront::start(&origin.url()).await.unwrap();
    let repo = "private/seeds";
    let size = 8 * MIB;
    let first = origin.push_blob(repo, random_bytes(size as usize)).await.unwrap();
    let second = origin.push_blob(repo, random_bytes(size as usize)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let (scheduler, url) = tls_scheduler_seeding(&ca, Some(SEED_NAME)).await;
    let opts = || MirrorOpts::new(&origin.url()).insecure_registry(&front.host());
    let impostor = tls_node(opts(), 0, &url, &ca, &ca).seed();
    let impostor_cert = (impostor.config.cluster_cert.clone().unwrap(), impostor.config.cluster_key.clone().unwrap());
    let impostor = Mirror::start(impostor).await.unwrap();
    let mut sharing = tls_node(opts(), 1, &url, &ca, &ca);
    sharing.config.share_tokens_with_seeds = true;
    let node = Mirror::start(sharing).await.unwrap();
    // The impostor asked for seed tasks and was turned away.
    wait_for_metric(&scheduler, "damselfly_scheduler_seed_refusals_total", &[("call", "seed_tasks")], 1.0).await;
    wait_for_hosts(&scheduler, 2.0).await;
    let scope = format!("repository:{repo}:pull");
    let pull = |digest| {
        let token = front.fetch_token(&scope, Some((USER, PASSWORD)));
        let url = node.blob_url_ns(repo, digest, &front.host());
        async move { fetch(http_client().get(url).bearer_auth(token.await.unwrap()), false).await.unwrap() }
    };
    pull(&first).await.assert_blob(&first, size);
    let origin_bytes = |n| metric(n, "damselfly_fetched_bytes_total", &[("source", "origin")]);
    assert_eq!(origin_bytes(&impostor).await, 0.0, "the impostor was not asked to seed, nor given the token");
    assert_eq!(origin_bytes(&node).await, size as f64, "with no seed, the node fetched the blob itself");
    assert_eq!(scheduler_metric(&scheduler, "damselfly_scheduler_seeds", &[]).await, 0.0);

    let seed_opts = tls_node_named(opts(), 2, &url, &ca, &ca, &[SEED_NAME]).seed();
    let seed_id = seed_opts.config.host_id.clone().unwrap();
    let seed = Mirror::start(seed_opts).await.unwrap();
    wait_for_metric(&scheduler, "damselfly_scheduler_seeds", &[], 1.0).await;
    // Host ids are not in certificates: the impostor names the seed's, and is refused, so it
    // can neither demote the seed by announcing it as an ordinary host nor make it leave.
    let mut as_impostor = grpc_as(&url, &ca, &impostor_cert.0, &impostor_cert.1).await;
    let host = proto::Host { id: seed_id.clone(), ip: "127.0.0.2".into(), upload_port: 1, ..Default::default() };
    let announce = as_impostor
        .announce_host(proto::AnnounceHostRequest { host: Some(host), tasks: vec![], ..Default::default() })
        .await;
    assert_eq!(announce.unwrap_err().code(), tonic::Code::PermissionDenied);
    let withdraw = proto::WithdrawTaskRequest { host_id: seed_id.clone(), digest: first.clone() };
    assert_eq!(as_impostor.withdraw_task(withdraw).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let leave = as_impostor.leave_host(proto::LeaveHostRequest { host_id: seed_id.clone() }).await;
    assert_eq!(leave.unwrap_err().code(), tonic::Code::PermissionDenied);
    // Nor can it make every node forget a task.
    let delete = as_impostor.delete_task(proto::DeleteTaskRequest { digest: first.clone() }).await;
    assert_eq!(delete.unwrap_err().code(), tonic::Code::PermissionDenied);
    assert_eq!(scheduler_metric(&scheduler, "damselfly_scheduler_seeds", &[]).await, 1.0);

    pull(&second).await.assert_blob(&second, size);
    assert_eq!(origin_bytes(&seed).await, size as f64, "the seed with the name fetched with the client's token");
    assert_eq!(origin_bytes(&impostor).await, 0.0);
    assert_eq!(metric(&node, "damselfly_download_bytes_total", &[("source", "peer")]).await, size as f64);

    // A whole node started under the seed's host id without the name: the id belongs to the
    // seed (another owner token announced it first), so the scheduler refuses it, and its
    // pulls still work, from the origin.
    let mut twin = tls_node(opts(), 3, &url, &ca, &ca);
    twin.config.host_id = Some(seed_id);
    let twin = Mirror::start(twin).await.unwrap();
    let third = origin.push_blob("test/twin", random_bytes(size as usize)).await.unwrap();
    let url_twin = twin.blob_url_ns("test/twin", &third, &origin.host());
    fetch(http_client().get(url_twin), false).await.unwrap().assert_blob(&third, size);
    assert_eq!(metric(&twin, "damselfly_download_bytes_total", &[("source", "origin")]).await, size as f64);
    let not_owner = [("reason", "not_owner")];
    assert!(scheduler_metric(&scheduler, "damselfly_scheduler_member_refusals_total", &not_owner).await >= 1.0);
    assert_eq!(scheduler_metric(&scheduler, "damselfly_scheduler_seeds", &[]).await, 1.0, "the seed kept its stream");
    for n in [impostor, node, seed, twin] {
        n.shutdown().await;
    }
    scheduler.shutdown().await;
}

/// Pieces travel between nodes over mutual TLS: a parent serves a child the cluster's CA vouches
/// for, and turns away plain HTTP and clients without a certificate before any token is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_travel_between_nodes_over_mutual_tls() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let (scheduler, url) = tls_scheduler(&ca).await;
    let node = |i: u8| {
        let mut opts = tls_node(MirrorOpts::new(&origin.url()), i, &url, &ca, &ca);
        opts.config.peer_tls = true;
        Mirror::start(opts)
    };
    let nodes = [node(0).await.unwrap(), node(1).await.unwrap()];
    for n in &nodes {
        let url = n.blob_url_ns(REPO, &digest, &origin.host());
        fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    }
    let from_peers = metric(&nodes[1], "damselfly_download_bytes_total", &[("source", "peer")]).await;
    assert_eq!(from_peers, size as f64, "node 1 took the blob from node 0 over TLS");
    origin.settled_access_log().await.assert_copies_at_most(&[(digest.clone(), size)], 1.1);

    // A node without peer TLS (a cluster half way to TLS) is not sent to the TLS nodes, whose
    // upload servers it could not talk to: it goes to the origin at once, with no failed piece.
    let plain = Mirror::start(tls_node(MirrorOpts::new(&origin.url()), 2, &url, &ca, &ca)).await.unwrap();
    let plain_url = plain.blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(plain_url), false).await.unwrap().assert_blob(&digest, size);
    assert_eq!(metric(&plain, "damselfly_download_bytes_total", &[("source", "origin")]).await, size as f64);
    assert_eq!(metric(&plain, "damselfly_piece_failures_total", &[]).await, 0.0);
    plain.shutdown().await;

    let upload = nodes[0].upload_addr.expect("upload server");
    let piece = format!("/pieces/{digest}/0");
    assert!(http_client().get(format!("http://{upload}{piece}")).send().await.is_err(), "plain HTTP is refused");
    let ca_pem = std::fs::read(ca.path(&ca.file)).unwrap();
    let trusting = || {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
            .no_proxy()
    };
    let anonymous = trusting().build().unwrap();
    assert!(anonymous.get(format!("https://{upload}{piece}")).send().await.is_err(), "a client without a certificate");
    let (cert, key) = ca.issue("tester", &["tester"]);
    let identity = reqwest::Identity::from_pem(&[std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()].concat());
    let vouched = trusting().identity(identity.unwrap()).build().unwrap();
    let resp = vouched.get(format!("https://{upload}{piece}")).send().await.expect("a handshake with a certificate");
    assert_eq!(resp.status(), 403, "past TLS, the scheduler's token is still required");
    for n in nodes {
        n.shutdown().await;
    }
    scheduler.shutdown().await;
}

/// The scheduler inside a daemon (`scheduler_listen`) serves mutual TLS under that node's
/// certificate when the node has one: another node reaches it over `https://` and takes pieces
/// steered by it, and a node that tries plain gRPC gets nothing from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_inside_a_daemon_serves_mutual_tls_with_the_nodes_certificate() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster-ca");
    let mut opts =
        MirrorOpts::new(&origin.url()).cluster(IpAddr::from([127, 0, 0, 2]), &[], "tls-host").with_scheduler();
    let (cert, key) = ca.issue("tls-host", &["tls-host", "127.0.0.2"]);
    opts.config.cluster_ca = Some(ca.path(&ca.file));
    (opts.config.cluster_cert, opts.config.cluster_key) = (Some(cert), Some(key));
    opts.config.scheduler_seed_name = Some("seed.damselfly.test".to_owned());
    let host = Mirror::start(opts).await.unwrap();
    let grpc = host.scheduler_addr.expect("in-process scheduler");
    // It asks to be a seed, with a certificate that does not carry the seed name.
    let node_opts = tls_node(MirrorOpts::new(&origin.url()), 1, &format!("https://{grpc}"), &ca, &ca).seed();
    let node = Mirror::start(node_opts).await.unwrap();
    let plain_opts =
        MirrorOpts::new(&origin.url()).cluster(IpAddr::from([127, 0, 0, 4]), &[format!("http://{grpc}")], "plain");
    let plain = Mirror::start(plain_opts).await.unwrap();
    for n in [&host, &node, &plain] {
        let url = n.blob_url_ns(REPO, &digest, &origin.host());
        fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    }
    assert_eq!(metric(&node, "damselfly_download_bytes_total", &[("source", "peer")]).await, size as f64);
    assert_eq!(metric(&plain, "damselfly_download_bytes_total", &[("source", "peer")]).await, 0.0);
    assert!(metric(&plain, "damselfly_scheduler_errors_total", &[]).await > 0.0, "plain gRPC was refused");
    // The scheduler inside the daemon binds seeds to certificates as a scheduler process does.
    poll_until("the seed stream refused", Duration::from_secs(15), || async {
        let refused = metric(&host, "damselfly_scheduler_seed_refusals_total", &[("call", "seed_tasks")]).await;
        Ok((refused >= 1.0).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(metric(&host, "damselfly_scheduler_seeds", &[]).await, 0.0);
    for n in [host, node, plain] {
        n.shutdown().await;
    }
}
