//! The cluster as a trust boundary, each test written as the attack it holds off: a stranger
//! without the cluster secret, a registry that says yes to everything, a request that asks for
//! a cached blob as a manifest. See docs/security.md for the threat model.

use damselfly_integration::cluster::{node_ip, SECRET};
use damselfly_integration::liar::noise;
use damselfly_integration::{
    fetch, http_client, random_bytes, Claim, Cluster, Liar, Mirror, MirrorOpts, Registry, MIB,
};

const REPO: &str = "test/trust";
const REGISTRY_HEADER: &str = "X-Dragonfly-Registry";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn metric(node: &Mirror, name: &str, filter: &[(&str, &str)]) -> f64 {
    node.metrics().await.unwrap().sum(name, filter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_cluster_secret_gets_nothing_from_the_cluster_and_still_pulls() {
    let origin = Registry::start().await.unwrap();
    let size = 8 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 1, |_, o| o).await.unwrap();
    let url = cluster.node(0).blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);

    // Same scheduler, a secret of its own: every call it makes is refused.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("secret");
    std::fs::write(&wrong, "not the secret of this cluster").unwrap();
    let mut opts = MirrorOpts::new(&origin.url()).cluster(node_ip(5), &[cluster.schedulers[0].url()], "stranger");
    opts.config.secret_file = Some(wrong);
    let stranger = Mirror::start(opts).await.unwrap();
    let url = stranger.blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    assert_eq!(metric(&stranger, "damselfly_download_bytes_total", &[("source", "peer")]).await, 0.0);
    assert_eq!(metric(&stranger, "damselfly_download_bytes_total", &[("source", "origin")]).await, size as f64);
    let sched = damselfly_integration::Metrics::scrape(&cluster.schedulers[0].metrics_url()).await.unwrap();
    assert!(sched.sum("damselfly_scheduler_member_refusals_total", &[("reason", "bad_proof")]) >= 1.0);
    assert_eq!(sched.sum("damselfly_scheduler_hosts", &[]), 1.0, "the stranger is no host of the cluster");
    assert!(!SECRET.is_empty());
    stranger.shutdown().await;
    cluster.shutdown().await;
}

/// `evil` answers 200 to every HEAD and sends its own bytes to every GET. A node that cached a
/// blob, and one that would take it from that node, serve none of it to a client naming `evil`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_content_is_not_read_through_a_registry_that_says_yes_to_everything() {
    let origin = Registry::start().await.unwrap();
    let size = 6 * MIB;
    let data = random_bytes(size as usize);
    let digest = origin.push_blob(REPO, data.clone()).await.unwrap();
    let evil = Liar::start(Claim { len: size, content_type: "application/octet-stream".into() }).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |_, o| o).await.unwrap();
    let url = cluster.node(0).blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    cluster.wait_for_hosts(2.0).await.unwrap();

    for node in [0, 1] {
        let n = cluster.node(node);
        for range in [None, Some("bytes=0-1023"), Some("bytes=4194304-")] {
            let url = format!("{}/v2/other/repo/blobs/{digest}", n.url());
            let mut req = http_client().get(url).header(REGISTRY_HEADER, evil.url());
            if let Some(r) = range {
                req = req.header("Range", r);
            }
            let got = fetch(req, true).await.unwrap();
            let body = got.body.clone().unwrap_or_default();
            let start = range.map_or(0, |r| r[6..].split('-').next().unwrap().parse::<usize>().unwrap());
            let leaked = !body.is_empty() && data[start..].starts_with(&body[..body.len().min(64)]);
            assert!(!leaked, "node {node}, range {range:?}: cached bytes reached a client of a lying registry");
            let liars_own =
                !got.status.is_success() || body.iter().enumerate().all(|(i, &b)| b == noise((start + i) as u64));
            assert!(liars_own, "node {node}, range {range:?}: {:?} carried bytes of neither", got.status);
        }
    }
    assert!(metric(cluster.node(0), "damselfly_access_checks_total", &[("kind", "disproved")]).await >= 1.0);
    // The blob is still there for its own registry's clients.
    let url = cluster.node(0).blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    cluster.shutdown().await;
}

/// A cluster node asked for a cached blob's digest as a manifest, by a registry that says every
/// manifest exists (4 MiB exactly, the size that once indexed past a task's end): the answer
/// is the registry's, and the cached blob stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_request_never_touches_a_cached_blob_of_the_same_digest() {
    let origin = Registry::start().await.unwrap();
    let size = 4 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let mut liars = Vec::new();
    for len in [size + 7, size, 10] {
        liars.push(Liar::start(Claim { len, content_type: OCI_MANIFEST.into() }).await.unwrap());
    }
    let cluster = Cluster::start(&origin, 1, 1, |_, mut o| {
        for liar in &liars {
            o = o.insecure_registry(&liar.host());
        }
        o
    })
    .await
    .unwrap();
    let node = cluster.node(0);
    let url = node.blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(&url), false).await.unwrap().assert_blob(&digest, size);
    for evil in &liars {
        let manifest = format!("{}/v2/{REPO}/manifests/{digest}?ns={}", node.url(), evil.host());
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            fetch(http_client().get(manifest).header("Accept", OCI_MANIFEST), false),
        )
        .await
        .expect("answered, not hung")
        .unwrap();
        assert_ne!(got.digest, digest, "the blob was served as a manifest");
    }
    // Still cached, still served without asking the origin for its bytes again.
    let before = origin.settled_access_log().await.blob_get_bytes(&digest);
    fetch(http_client().get(&url), false).await.unwrap().assert_blob(&digest, size);
    let after = origin.settled_access_log().await.blob_get_bytes(&digest);
    assert_eq!(after, before, "the cached blob was fetched again");
    cluster.shutdown().await;
}

/// A manifest by digest that one node cached, asked of another node by a client naming a
/// registry that says every manifest exists: the bytes must come from that registry, which
/// has none to show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_manifest_is_not_read_through_a_registry_that_says_yes_to_everything() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image(REPO, "v1", 1).await.unwrap();
    let claim = Claim { len: image.manifest_size, content_type: OCI_MANIFEST.into() };
    let evil = Liar::start(claim).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |_, o| o).await.unwrap();
    let by_digest = |node: &Mirror| format!("{}/v2/{REPO}/manifests/{}", node.url(), image.manifest_digest);
    let own = format!("{}?ns={}", by_digest(cluster.node(0)), origin.host());
    let got = fetch(http_client().get(own).header("Accept", OCI_MANIFEST), false).await.unwrap();
    got.assert_blob(&image.manifest_digest, image.manifest_size);
    cluster.wait_for_hosts(2.0).await.unwrap();
    for node in [0, 1] {
        let req = http_client().get(by_digest(cluster.node(node))).header("Accept", OCI_MANIFEST);
        let got = fetch(req.header(REGISTRY_HEADER, evil.url()), false).await.unwrap();
        assert_ne!(got.digest, image.manifest_digest, "node {node} served the manifest on a liar's word");
        assert!(!got.status.is_success(), "node {node}: {}", got.status);
    }
    cluster.shutdown().await;
}

/// A member of the cluster gone bad: it holds the cluster secret, announces a blob nobody has
/// yet with piece digests of its own, and serves its own bytes for them. No byte of it reaches
/// a client as the blob (the client's pull is served from its registry instead); the node that
/// assembled it reports it, the scheduler drops those digests and blocks the member, and the
/// next node takes nothing from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_announcing_digests_of_its_own_is_found_out_and_cleared() {
    use damselfly_proto::member::{JoinKey, OwnerToken, HOST_HEADER, OWNER_HEADER, PROOF_HEADER};
    use damselfly_proto::v1::scheduler_client::SchedulerClient;
    use damselfly_proto::v1::{AnnounceHostRequest, Host, TaskInfo};

    let origin = Registry::start().await.unwrap();
    let size = 12 * MIB;
    let data = random_bytes(size as usize);
    let digest = origin.push_blob(REPO, data.clone()).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |_, o| o).await.unwrap();

    // The member's bytes: as long as the blob, with their own piece digests.
    let piece = damselfly_integration::piece_size(size);
    let evil: Vec<u8> = (0..size).map(damselfly_integration::liar::noise).collect();
    let list: Vec<String> =
        evil.chunks(piece as usize).map(|c| damselfly_integration::sha256_digest(c)[7..].to_owned()).collect();
    let upload = tokio::net::TcpListener::bind((node_ip(7), 0)).await.unwrap();
    let upload_addr = upload.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (evil_bytes, count) = (bytes::Bytes::from(evil), served.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = upload.accept().await {
            let (evil_bytes, count) = (evil_bytes.clone(), count.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let n: u64 = req.uri().path().rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let start = (n * piece).min(evil_bytes.len() as u64) as usize;
                    let end = ((n + 1) * piece).min(evil_bytes.len() as u64) as usize;
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = http_body_util::Full::new(evil_bytes.slice(start..end));
                    std::future::ready(Ok::<_, std::convert::Infallible>(hyper::Response::new(body)))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    let mut member = SchedulerClient::connect(cluster.schedulers[0].url()).await.unwrap();
    let announce = || {
        let host = Host {
            id: "member-gone-bad".into(),
            ip: upload_addr.ip().to_string(),
            upload_port: u32::from(upload_addr.port()),
            upload_slots: 8,
            ..Default::default()
        };
        let task = TaskInfo { digest: digest.clone(), length: size, piece_size: piece, piece_sha256: list.clone() };
        let mut req =
            tonic::Request::new(AnnounceHostRequest { host: Some(host), tasks: vec![task], ..Default::default() });
        let owner = OwnerToken::new([9; 32]);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let md = req.metadata_mut();
        md.insert(HOST_HEADER, "member-gone-bad".parse().unwrap());
        md.insert(OWNER_HEADER, owner.to_hex().parse().unwrap());
        md.insert(PROOF_HEADER, JoinKey::new(SECRET).prove("member-gone-bad", &owner, now).parse().unwrap());
        req
    };
    member.announce_host(announce()).await.expect("a member is heard");

    // Whatever the first pulls get, never the member's bytes as the blob, and never a clean
    // wrong body; the node reports what it assembled, and a retry gets the blob.
    let node = cluster.node(0);
    let url = node.blob_url_ns(REPO, &digest, &origin.host());
    let mut pulled = false;
    for _ in 0..40 {
        let got = fetch(http_client().get(&url), true).await.unwrap();
        assert!(!got.is_clean_but_wrong(&digest, size), "a clean body with other bytes");
        let body = got.body.clone().unwrap_or_default();
        let from_member = body.len() >= 64 && body.iter().take(64).enumerate().all(|(i, &b)| b == noise(i as u64));
        assert!(!(got.status.is_success() && from_member), "the member's bytes reached a client");
        if got.is_complete() && got.status.is_success() {
            got.assert_blob(&digest, size);
            pulled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(pulled, "the blob never came through the node");
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) > 0, "the attack was not tried");
    // The node finishes assembling what it took from the member, finds it wrong, and says so.
    let sched_url = cluster.schedulers[0].metrics_url();
    damselfly_integration::poll_until("the poison reported", std::time::Duration::from_secs(30), || {
        let sched_url = sched_url.clone();
        async move {
            let m = damselfly_integration::Metrics::scrape(&sched_url).await?;
            Ok((m.sum("damselfly_scheduler_poison_reports_total", &[]) >= 1.0).then_some(()))
        }
    })
    .await
    .unwrap();
    assert_eq!(metric(node, "damselfly_poisoned_tasks_total", &[]).await, 1.0);

    // The member announces again; the other node takes nothing from it.
    let _ = member.announce_host(announce()).await;
    let before = served.load(std::sync::atomic::Ordering::SeqCst);
    let url = cluster.node(1).blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), before, "the blocked member was asked for pieces");
    cluster.shutdown().await;
}
