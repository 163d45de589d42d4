//! Several node daemons and a scheduler: one origin copy feeds the whole cluster, content is
//! verified piece by piece, and peers without a scheduler-issued token get nothing.

use damselfly_integration::cluster::{node_id, SECRET};
use std::time::Duration;

use damselfly_integration::{fetch, http_client, random_bytes, Cluster, Image, Metrics, Registry, MIB};

const REPO: &str = "test/p2p";

/// Sum of `damselfly_download_bytes_total` with `source` on node `i`.
async fn downloaded(cluster: &Cluster, i: usize, source: &str) -> f64 {
    cluster.metrics(i).await.unwrap().sum("damselfly_download_bytes_total", &[("source", source)])
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Node `i` pulls the image as a client would by digest: the manifest, then every blob.
async fn pull_image(cluster: &Cluster, i: usize, origin: &Registry, image: &Image) {
    let client = http_client();
    let node = cluster.node(i);
    let manifest = format!("{}/v2/{}/manifests/{}?ns={}", node.url(), image.repo, image.manifest_digest, origin.host());
    let got = fetch(client.get(manifest).header("Accept", OCI_MANIFEST), false).await.unwrap();
    got.assert_blob(&image.manifest_digest, image.manifest_size);
    let mut blobs = tokio::task::JoinSet::new();
    for (digest, size) in image.blobs.clone() {
        let request = client.get(node.blob_url_ns(&image.repo, &digest, &origin.host()));
        blobs.spawn(async move { (fetch(request, false).await, digest, size) });
    }
    while let Some(r) = blobs.join_next().await {
        let (fetched, digest, size) = r.unwrap();
        fetched.unwrap().assert_blob(&digest, size);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_pulling_one_image_at_once_cost_the_origin_one_copy() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/p2p", "v1", 64).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 4, |_, o| o).await.unwrap();
    let before = origin.settled_access_log().await;

    let mut pulls = Vec::new();
    for i in 0..4 {
        pulls.push(pull_image(&cluster, i, &origin, &image));
    }
    futures_util::future::join_all(pulls).await;

    let log = origin.settled_access_log().await;
    log.assert_copies_besides_proofs(&image.blobs, 1.1, 4);
    let manifest_gets = log.count("GET", &format!("/manifests/{}", image.manifest_digest))
        - before.count("GET", &format!("/manifests/{}", image.manifest_digest));
    assert!(manifest_gets <= 1, "the origin served the manifest {manifest_gets} times");
    let (_, size) = image.largest_blob();
    let mut from_peers = 0;
    for i in 0..4 {
        let peer = downloaded(&cluster, i, "peer").await;
        eprintln!("node {i}: {peer} bytes from peers, {} from the origin", downloaded(&cluster, i, "origin").await);
        if peer >= size as f64 / 2.0 {
            from_peers += 1;
        }
    }
    assert!(from_peers >= 3, "only {from_peers} of 4 nodes got most bytes from peers");
    // Every node carried its downloads (one per layer) on one session with the scheduler,
    // which it keeps open: not a stream per download.
    let url = format!("http://{}/metrics", cluster.schedulers[0].http_addr);
    let streams = Metrics::scrape(&url).await.unwrap();
    assert_eq!(streams.sum("damselfly_scheduler_streams", &[("kind", "session")]), 4.0);
    assert_eq!(streams.sum("damselfly_scheduler_streams", &[("kind", "download")]), 0.0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_serving_corrupt_pieces_is_blocked_and_no_bad_byte_reaches_the_client() {
    let origin = Registry::start().await.unwrap();
    let size = 24 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |_, o| o).await.unwrap();
    let client = http_client();

    // Node 0 fetches from the origin and serves it once more from its cache, which checks every
    // piece; then its copy rots on disk in every piece (recently checked pieces are served
    // without another check, so it hands out the bad bytes).
    let url0 = cluster.node(0).blob_url_ns(REPO, &digest, &origin.host());
    fetch(client.get(&url0), false).await.unwrap().assert_blob(&digest, size);
    fetch(client.get(&url0), false).await.unwrap().assert_blob(&digest, size);
    let data = damselfly_integration::walk_files(cluster.node(0).data_dir())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .expect("task data file");
    let mut bytes = std::fs::read(&data).unwrap();
    for piece in 0..(size / (4 * MIB)) as usize {
        bytes[piece * 4 * MIB as usize + 100] ^= 0xff;
    }
    std::fs::write(&data, &bytes).unwrap();

    let url1 = cluster.node(1).blob_url_ns(REPO, &digest, &origin.host());
    fetch(client.get(&url1), false).await.unwrap().assert_blob(&digest, size);
    let m1 = cluster.metrics(1).await.unwrap();
    assert!(
        m1.sum("damselfly_piece_failures_total", &[("reason", "peer_corrupt")]) >= 1.0,
        "node 1 never saw a corrupt piece: {:?}",
        m1.with_prefix("damselfly_piece_failures")
    );
    assert_eq!(downloaded(&cluster, 1, "peer").await, 0.0, "a corrupt piece was counted as served");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_servers_refuse_peers_without_a_scheduler_issued_token() {
    let origin = Registry::start().await.unwrap();
    let size = 8 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 1, |_, o| o).await.unwrap();
    let client = http_client();
    let node = cluster.node(0);
    fetch(client.get(node.blob_url_ns(REPO, &digest, &origin.host())), false).await.unwrap().assert_blob(&digest, size);

    let piece = format!("http://{}/pieces/{digest}/0", node.upload_addr.expect("upload server"));
    let key = damselfly_proto::token::upload_key(SECRET, &node_id(0));
    let other_key = damselfly_proto::token::upload_key(b"another cluster's secret", &node_id(0));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let expiry = now + 600;
    let cases = [
        (None, 403),
        (Some(format!("v1.{expiry}.6162.00")), 403),
        (Some(damselfly_proto::token::mint(&other_key, &digest, "stranger", expiry)), 403),
        (Some(damselfly_proto::token::mint(&key, &digest, "stranger", 1)), 403),
        // The lifetime is the parent's to cap, whoever minted the token.
        (Some(damselfly_proto::token::mint(&key, &digest, "child", now + 30 * 24 * 3600)), 403),
        (Some(damselfly_proto::token::mint(&key, &digest, "child", expiry)), 200),
    ];
    for (token, want) in cases {
        let mut req = client.get(&piece);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), want, "token {token:?}");
        let body = resp.bytes().await.unwrap();
        if want == 200 {
            assert_eq!(body.len() as u64, 4 * MIB);
        } else {
            assert!(body.len() < 200, "a refusal carried content");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_task_is_fetched_by_the_seed_and_nodes_take_it_from_the_seed() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |i, o| if i == 0 { o.seed() } else { o }).await.unwrap();
    // The seed takes tasks once it announced itself and opened its seed stream.
    cluster.wait_for_hosts(2.0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let request = http_client().get(cluster.node(1).blob_url_ns(REPO, &digest, &origin.host()));
    fetch(request, false).await.unwrap().assert_blob(&digest, size);
    let seed = cluster.metrics(0).await.unwrap();
    assert_eq!(
        seed.sum("damselfly_fetched_bytes_total", &[("source", "origin")]),
        size as f64,
        "the seed did not fetch it"
    );
    assert_eq!(downloaded(&cluster, 1, "peer").await, size as f64, "the node did not take it from the seed");
    origin.settled_access_log().await.assert_copies_at_most(&[(digest, size)], 1.1);
    cluster.shutdown().await;
}

/// Anyone who can reach a scheduler can name a registry; a seed fetches only from those it was
/// told of, and the node that asked takes the blob from the origin itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_does_not_fetch_from_a_registry_outside_its_list() {
    let origin = Registry::start().await.unwrap();
    let size = 8 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |i, mut o| {
        if i == 0 {
            o.config.seed_registries = vec!["registry.example".into()];
            o.seed()
        } else {
            o
        }
    })
    .await
    .unwrap();
    cluster.wait_for_hosts(2.0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let request = http_client().get(cluster.node(1).blob_url_ns(REPO, &digest, &origin.host()));
    fetch(request, false).await.unwrap().assert_blob(&digest, size);
    let seed = cluster.metrics(0).await.unwrap();
    assert_eq!(seed.sum("damselfly_fetched_bytes_total", &[("source", "origin")]), 0.0, "the seed fetched it");
    assert_eq!(downloaded(&cluster, 1, "origin").await, size as f64);
    origin.settled_access_log().await.assert_copies_at_most(&[(digest, size)], 1.1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_with_its_upload_slots_full_is_asked_again_not_blocked() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 3, |i, mut o| {
        if i == 0 {
            o.config.max_uploads = 1;
            o.config.upload_rate_limit = Some(damselfly_mirror::config::ByteSize(8 * MIB));
        }
        o
    })
    .await
    .unwrap();
    let client = http_client();
    let url0 = cluster.node(0).blob_url_ns(REPO, &digest, &origin.host());
    fetch(client.get(url0), false).await.unwrap().assert_blob(&digest, size);

    let mut pulls = tokio::task::JoinSet::new();
    for i in 1..3 {
        let request = client.get(cluster.node(i).blob_url_ns(REPO, &digest, &origin.host()));
        pulls.spawn(async move { fetch(request, false).await });
    }
    while let Some(result) = pulls.join_next().await {
        result.unwrap().unwrap().assert_blob(&digest, size);
    }
    let mut busy = 0.0;
    for i in 1..3 {
        let m = cluster.metrics(i).await.unwrap();
        busy += m.sum("damselfly_piece_failures_total", &[("reason", "peer_busy")]);
        assert_eq!(downloaded(&cluster, i, "peer").await, size as f64, "node {i} went to the origin");
    }
    assert!(busy >= 1.0, "no request ever found the single upload slot taken");
    origin.settled_access_log().await.assert_copies_at_most(&[(digest, size)], 1.1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_running_the_scheduler_in_process_serves_a_second_node() {
    use damselfly_integration::cluster::node_ip;
    use damselfly_integration::{Mirror, MirrorOpts};
    let origin = Registry::start().await.unwrap();
    let size = 12 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let a = MirrorOpts::new(&origin.url()).cluster(node_ip(0), &[], "a").with_scheduler();
    let a = Mirror::start(a).await.unwrap();
    let scheduler = format!("http://{}", a.scheduler_addr.expect("in-process scheduler"));
    let b = Mirror::start(MirrorOpts::new(&origin.url()).cluster(node_ip(1), &[scheduler], "b")).await.unwrap();
    let client = http_client();
    for node in [&a, &b] {
        let url = node.blob_url_ns(REPO, &digest, &origin.host());
        fetch(client.get(url), false).await.unwrap().assert_blob(&digest, size);
    }
    let from_peers = b.metrics().await.unwrap().sum("damselfly_download_bytes_total", &[("source", "peer")]);
    assert_eq!(from_peers, size as f64, "the second node did not get the blob from the first");
    origin.settled_access_log().await.assert_copies_at_most(&[(digest, size)], 1.1);
    // The in-process scheduler's figures are on the daemon's own /metrics.
    let m = a.metrics().await.unwrap();
    assert_eq!(m.sum("damselfly_scheduler_hosts", &[]), 2.0);
    assert!(m.sum("damselfly_scheduler_decisions_total", &[]) >= 2.0);
    assert!(m.sum("damselfly_download_bytes_total", &[]) >= size as f64);
    a.shutdown().await;
    b.shutdown().await;
}

/// The origin fetch's first piece waits on the origin's first byte, which from a remote
/// registry (token exchange, redirect to a CDN) often takes longer than the stall time. Nodes
/// the scheduler told to wait used to give up after one stall and all fetch from the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_told_to_wait_outlast_a_slow_first_byte_at_the_origin() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let proxy = damselfly_integration::FaultProxy::start(origin.addr()).await.unwrap();
    proxy.delay(&digest, Duration::from_millis(2500), damselfly_integration::Times::Always);
    let cluster = Cluster::start(&origin, 1, 3, |_, o| o).await.unwrap();
    cluster.wait_for_hosts(3.0).await.unwrap();

    let mut pulls = tokio::task::JoinSet::new();
    for i in 0..3 {
        let request = http_client().get(cluster.node(i).blob_url_ns(REPO, &digest, &proxy.host()));
        pulls.spawn(async move { fetch(request, false).await });
    }
    while let Some(r) = pulls.join_next().await {
        r.unwrap().unwrap().assert_blob(&digest, size);
    }
    let gets = proxy.requests().iter().filter(|r| r.method == "GET" && r.target.contains(&digest)).count();
    origin.settled_access_log().await.assert_copies_besides_proofs(&[(digest.clone(), size)], 1.1, 3);
    // One fetch of the blob, and each node's proof window.
    assert!(gets <= 1 + 3, "{:#?}", proxy.requests());
    cluster.shutdown().await;
}
