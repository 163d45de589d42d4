//! Manifests and blob metadata through the mirror: tag lookups shared between concurrent
//! clients, `Accept` lines forwarded intact, `HEAD` without downloads, manifests by digest
//! verified and cached, OCI error codes clients rely on, and upstream selection by header.
//!
//! Every test asserts on what reached the origin (its access log) and on the daemon's metrics,
//! not only on the answers the client got: a client that falls back to the origin would succeed
//! either way.
//!
//! What docker-registry 2.8 does with `Accept` (checked with curl against the packaged binary):
//! it does not convert between formats. An OCI image manifest is served (200, `Content-Type:
//! application/vnd.oci.image.manifest.v1+json`) only when some `Accept` value, on any of the
//! request's `Accept` lines or comma-separated within one, is that media type; otherwise it
//! answers 404 `MANIFEST_UNKNOWN` ("OCI manifest found, but accept header does not support OCI
//! manifests") — by tag and by digest alike. So a mirror that dropped or mangled an `Accept`
//! line shows up as a 404.

use std::net::SocketAddr;
use std::sync::Arc;

use damselfly_integration::util::free_loopback_port;
use damselfly_integration::{
    http_client, random_bytes, raw_http, sha256_digest, FaultProxy, Image, Metrics, Mirror, MirrorOpts, RawResponse,
    Registry, Times,
};
use reqwest::StatusCode;
use tokio::sync::Barrier;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `GET|HEAD path` written verbatim, one `Accept:` line per entry of `accept` (nothing on the
/// client side may fold them into one line), plus `extra` header lines.
fn raw_request(method: &str, path: &str, host: &str, accept: &[&str], extra: &str) -> Vec<u8> {
    let accept: String = accept.iter().map(|a| format!("Accept: {a}\r\n")).collect();
    format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{accept}{extra}Connection: close\r\n\r\n").into_bytes()
}

async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    raw_http(addr, request).await.unwrap().expect("the mirror closed the connection without answering")
}

fn describe(r: &RawResponse) -> String {
    format!("{} {:?} {}", r.status, r.headers, String::from_utf8_lossy(&r.body[..r.body.len().min(400)]))
}

/// Asserts a 200 carrying exactly the manifest of `image` with clean headers: `Content-Type`
/// the bare media type, `Docker-Content-Digest` the hash of the body, exact `Content-Length`.
fn assert_manifest(what: &str, r: &RawResponse, image: &Image, media_type: &str) {
    assert_eq!(r.status, 200, "{what}: {}", describe(r));
    assert_eq!(r.header("content-type"), Some(media_type), "{what}: {}", describe(r));
    assert_eq!(sha256_digest(&r.body), image.manifest_digest, "{what}: body hash");
    assert_eq!(r.header("docker-content-digest"), Some(image.manifest_digest.as_str()), "{what}: {}", describe(r));
    assert_eq!(r.body.len() as u64, image.manifest_size, "{what}: body length");
    assert_eq!(r.header("content-length"), Some(image.manifest_size.to_string().as_str()), "{what}: {}", describe(r));
}

/// Upstream requests the daemon says it made, of one kind (`manifest`, `blob_head`, ...).
fn origin_requests(m: &Metrics, kind: &str) -> f64 {
    m.sum("damselfly_origin_requests_total", &[("kind", kind)])
}

fn assert_metric_exposed(m: &Metrics, name: &str) {
    assert!(m.has(name), "metric {name} not exposed: {:#?}", m.with_prefix("damselfly_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lookups_share_one_upstream_request() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/tags", "shared", 0).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let tag_path = format!("/v2/test/tags/manifests/shared?ns={}", origin.host());
    let tag_uri = "/v2/test/tags/manifests/shared";
    let before = origin.settled_access_log().await.count("GET", tag_uri);

    // Twelve clients, same tag, same Accept set, released together.
    let request =
        Arc::new(raw_request("GET", &tag_path, &mirror.host(), &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX], ""));
    let barrier = Arc::new(Barrier::new(12));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let (request, barrier, addr) = (request.clone(), barrier.clone(), mirror.api_addr);
        clients.spawn(async move {
            barrier.wait().await;
            raw(addr, &request).await
        });
    }
    let mut bodies = Vec::new();
    while let Some(r) = clients.join_next().await {
        let r = r.unwrap();
        assert_manifest("concurrent tag GET", &r, &image, OCI_MANIFEST);
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "clients got different bodies");

    let log = origin.settled_access_log().await;
    let tag_gets = log.count("GET", tag_uri) - before;
    // One shared flight would mean exactly 1. The daemon drops a flight from its table as soon
    // as a waiter has its answer, so a request that arrives just after that (12 clients on two
    // shared cores do not all land within one origin round trip) starts a second one. Twelve
    // GETs would mean no sharing at all.
    assert!(
        (1..=2).contains(&tag_gets),
        "{tag_gets} origin GETs of the tag for 12 concurrent lookups: {:#?}",
        log.matching("/manifests/")
    );
    let metrics = mirror.metrics().await.unwrap();
    assert_metric_exposed(&metrics, "damselfly_origin_requests_total");
    assert_eq!(
        origin_requests(&metrics, "manifest"),
        tag_gets as f64,
        "daemon's count of origin manifest requests disagrees with the origin log: {:#?}",
        metrics.with_prefix("damselfly_origin")
    );

    // The tag lookup verified and cached the manifest under its digest: fetching it by digest
    // needs no origin request.
    let by_digest = raw(
        mirror.api_addr,
        &raw_request(
            "GET",
            &format!("/v2/test/tags/manifests/{}?ns={}", image.manifest_digest, origin.host()),
            &mirror.host(),
            &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX],
            "",
        ),
    )
    .await;
    assert_manifest("GET by digest after the tag", &by_digest, &image, OCI_MANIFEST);
    let log = origin.settled_access_log().await;
    assert_eq!(log.count("GET", tag_uri) - before, tag_gets, "tag fetched again: {:#?}", log.matching("/manifests/"));
    assert_eq!(
        log.count("GET", &format!("/manifests/{}", image.manifest_digest)),
        0,
        "manifest by digest went to the origin although the tag lookup had it: {:#?}",
        log.matching("/manifests/")
    );
    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(origin_requests(&metrics, "manifest"), tag_gets as f64);
    assert_eq!(
        metrics.sum("damselfly_http_requests_total", &[("route", "manifest"), ("method", "GET"), ("status", "200")]),
        13.0,
        "{:#?}",
        metrics.with_prefix("damselfly_http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_accept_lines_survive() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/accept", "v1", 0).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let path = format!("/v2/test/accept/manifests/v1?ns={}", origin.host());
    let tag_uri = "/v2/test/accept/manifests/v1";

    // Control, straight at the origin: the first line alone does not get the OCI manifest.
    let direct = raw(origin.addr(), &raw_request("GET", tag_uri, &origin.host(), &[DOCKER_LIST], "")).await;
    assert_eq!(direct.status, 404, "origin with only {DOCKER_LIST}: {}", describe(&direct));
    assert_eq!(direct.oci_error_code().as_deref(), Some("MANIFEST_UNKNOWN"));

    // The OCI type only on the second of two Accept lines: the origin answers 200 only if the
    // mirror forwarded that line.
    let r = raw(mirror.api_addr, &raw_request("GET", &path, &mirror.host(), &[DOCKER_LIST, OCI_MANIFEST], "")).await;
    assert_manifest("second Accept line", &r, &image, OCI_MANIFEST);

    // And through the mirror, the first line alone is relayed as the origin's 404 (a distinct
    // Accept set, so no shared flight can answer it), not as a 200 from some cache.
    let only_first = raw(mirror.api_addr, &raw_request("GET", &path, &mirror.host(), &[DOCKER_LIST], "")).await;
    assert_eq!(only_first.status, 404, "{}", describe(&only_first));
    assert_eq!(only_first.oci_error_code().as_deref(), Some("MANIFEST_UNKNOWN"));

    let log = origin.settled_access_log().await;
    let gets: Vec<_> =
        log.entries.iter().filter(|e| e.method == "GET" && e.uri.contains(tag_uri)).map(|e| e.status).collect();
    // Direct control 404, mirrored 200, mirrored 404: the mirror really asked each time.
    assert_eq!(gets, [404, 200, 404], "origin GETs of the tag: {:#?}", log.matching(tag_uri));
    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(origin_requests(&metrics, "manifest"), 2.0, "{:#?}", metrics.with_prefix("damselfly_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_blob_does_not_download() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/head", "v1", 1).await.unwrap();
    let (digest, size) = image.largest_blob();
    assert!(size >= 1 << 20);
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let client = http_client();
    let tag_uri = "/v2/test/head/manifests/v1";
    // push_image checks the pushed tag with a HEAD of its own.
    let tag_heads_before = origin.settled_access_log().await.count("HEAD", tag_uri);

    let resp = client.head(mirror.blob_url_ns("test/head", &digest, &origin.host())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.headers());
    let h = resp.headers();
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(header("content-length"), Some(size.to_string().as_str()), "{h:?}");
    assert_eq!(header("docker-content-digest"), Some(digest.as_str()), "{h:?}");
    assert_eq!(header("accept-ranges"), Some("bytes"), "{h:?}");

    // HEAD of the manifest by tag: the length of what a GET would send.
    let resp = client
        .head(format!("{}/v2/test/head/manifests/v1?ns={}", mirror.url(), origin.host()))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.headers());
    let h = resp.headers();
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(header("content-length"), Some(image.manifest_size.to_string().as_str()), "{h:?}");
    assert_eq!(header("docker-content-digest"), Some(image.manifest_digest.as_str()), "{h:?}");
    assert_eq!(header("content-type"), Some(OCI_MANIFEST), "{h:?}");

    let log = origin.settled_access_log().await;
    let blob_uri = format!("/v2/test/head/blobs/{digest}");
    assert!(log.count("HEAD", &blob_uri) >= 1, "the blob HEAD did not reach the origin: {:#?}", log.matching(&digest));
    assert_eq!(
        log.count("GET", &blob_uri),
        0,
        "a HEAD through the mirror downloaded the blob: {:#?}",
        log.matching(&digest)
    );
    assert_eq!(log.count("GET", tag_uri), 0, "a manifest HEAD became a GET: {:#?}", log.matching("/manifests/"));
    assert_eq!(log.count("HEAD", tag_uri) - tag_heads_before, 1, "{:#?}", log.matching("/manifests/"));

    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(origin_requests(&metrics, "blob"), 0.0, "{:#?}", metrics.with_prefix("damselfly_"));
    assert_eq!(origin_requests(&metrics, "blob_range"), 0.0);
    assert_eq!(origin_requests(&metrics, "blob_head"), 1.0);
    assert_eq!(origin_requests(&metrics, "manifest_head"), 1.0);
    assert_eq!(
        metrics.sum("damselfly_download_bytes_total", &[]),
        0.0,
        "bytes were served for HEAD requests: {:#?}",
        metrics.with_prefix("damselfly_download")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_by_digest_is_verified() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/bydigest", "v1", 0).await.unwrap();
    let bad_image = origin.push_image("test/bydigest", "v2", 0).await.unwrap();
    // The mirror reaches the origin through a proxy that can corrupt what the origin sends.
    let proxy = FaultProxy::start(origin.addr()).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&proxy.url())).await.unwrap();
    let get = |digest: &str| {
        raw_request(
            "GET",
            &format!("/v2/test/bydigest/manifests/{digest}?ns={}", proxy.host()),
            &mirror.host(),
            &[OCI_MANIFEST],
            "",
        )
    };

    // Twice by digest: the second comes from the cache.
    for round in ["first", "second"] {
        let r = raw(mirror.api_addr, &get(&image.manifest_digest)).await;
        assert_manifest(&format!("{round} GET by digest"), &r, &image, OCI_MANIFEST);
    }
    let by_digest = format!("/manifests/{}", image.manifest_digest);
    let log = origin.settled_access_log().await;
    assert_eq!(
        log.count("GET", &by_digest),
        1,
        "manifest by digest fetched from the origin more than once: {:#?}",
        log.matching("/manifests/")
    );

    // Wrong bytes from the origin for a digest: refused (never relayed, never cached).
    proxy.corrupt(&bad_image.manifest_digest, Times::Once);
    let r = raw(mirror.api_addr, &get(&bad_image.manifest_digest)).await;
    assert_eq!(proxy.fired(&bad_image.manifest_digest), 1, "{:#?}", proxy.requests());
    assert!(
        r.status >= 500 || sha256_digest(&r.body) == bad_image.manifest_digest,
        "a corrupted manifest was relayed: {}",
        describe(&r)
    );
    assert_eq!(r.status, 502, "{}", describe(&r));
    // Next time the origin is honest, and the right manifest is served and then cached.
    for round in ["after the corruption", "cached after the corruption"] {
        let r = raw(mirror.api_addr, &get(&bad_image.manifest_digest)).await;
        assert_manifest(round, &r, &bad_image, OCI_MANIFEST);
    }

    // A digest that does not exist.
    let missing = sha256_digest(&random_bytes(32));
    let r = raw(mirror.api_addr, &get(&missing)).await;
    assert_eq!(r.status, 404, "{}", describe(&r));
    assert_eq!(r.oci_error_code().as_deref(), Some("MANIFEST_UNKNOWN"), "{}", describe(&r));

    let log = origin.settled_access_log().await;
    assert_eq!(log.count("GET", &by_digest), 1, "{:#?}", log.matching("/manifests/"));
    assert_eq!(
        log.count("GET", &format!("/manifests/{}", bad_image.manifest_digest)),
        2,
        "corrupted fetch + one honest fetch, then the cache: {:#?}",
        log.matching("/manifests/")
    );
    assert_eq!(log.count("GET", &format!("/manifests/{missing}")), 1);
    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(origin_requests(&metrics, "manifest"), 4.0, "{:#?}", metrics.with_prefix("damselfly_"));
    assert_eq!(
        metrics.sum("damselfly_http_requests_total", &[("route", "manifest"), ("method", "GET"), ("status", "200")]),
        4.0,
        "{:#?}",
        metrics.with_prefix("damselfly_http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_blob_is_404_with_blob_unknown() {
    let origin = Registry::start().await.unwrap();
    // The repository exists; the blob does not.
    origin.push_blob("test/unknown", random_bytes(1000)).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let missing = sha256_digest(&random_bytes(32));

    let resp = http_client().get(mirror.blob_url_ns("test/unknown", &missing, &origin.host())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{:?}", resp.headers());
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN", "{body}");

    let log = origin.settled_access_log().await;
    let statuses: Vec<_> = log.matching(&missing).iter().map(|e| (e.method.clone(), e.status)).collect();
    assert!(
        !statuses.is_empty() && statuses.iter().all(|(_, s)| *s == 404),
        "the origin was not asked, or did not say 404: {statuses:?}"
    );
    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(
        metrics.sum("damselfly_http_requests_total", &[("route", "blob"), ("method", "GET"), ("status", "404")]),
        1.0,
        "{:#?}",
        metrics.with_prefix("damselfly_")
    );
    assert_eq!(metrics.sum("damselfly_download_bytes_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dragonfly_header_selects_upstream() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/header", "v1", 0).await.unwrap();
    let (blob, blob_size) = image.blobs[0].clone();
    // Nothing listens on these: the default upstream and the `ns` of the last requests.
    let dead_default = format!("127.0.0.1:{}", free_loopback_port());
    let dead_ns = format!("127.0.0.1:{}", free_loopback_port());
    let mirror = Mirror::start(MirrorOpts::new(&format!("http://{dead_default}"))).await.unwrap();
    let header = format!("X-Dragonfly-Registry: {}\r\n", origin.url());
    let manifest_path = "/v2/test/header/manifests/v1";
    let blob_path = format!("/v2/test/header/blobs/{blob}");

    // Controls: without the header the requests go to dead registries and fail, so a success
    // below can only come from the header.
    for path in [manifest_path.to_owned(), format!("{manifest_path}?ns={dead_ns}")] {
        let r = raw(mirror.api_addr, &raw_request("GET", &path, &mirror.host(), &[OCI_MANIFEST], "")).await;
        assert_eq!(r.status, 502, "{path} without the header: {}", describe(&r));
    }
    let origin_gets = |log: &damselfly_integration::AccessLog| log.count("GET", manifest_path);
    assert_eq!(origin_gets(&origin.settled_access_log().await), 0);

    // Header only (no ns, the default upstream is dead).
    let r = raw(mirror.api_addr, &raw_request("GET", manifest_path, &mirror.host(), &[OCI_MANIFEST], &header)).await;
    assert_manifest("header, no ns", &r, &image, OCI_MANIFEST);
    assert_eq!(origin_gets(&origin.settled_access_log().await), 1);

    // Header and ns both: the header wins. Different Accept lines than before, so this is a
    // fresh tag lookup and not a shared flight.
    let r = raw(
        mirror.api_addr,
        &raw_request(
            "GET",
            &format!("{manifest_path}?ns={dead_ns}"),
            &mirror.host(),
            &[OCI_MANIFEST, OCI_INDEX],
            &header,
        ),
    )
    .await;
    assert_manifest("header and ns", &r, &image, OCI_MANIFEST);
    let r =
        raw(mirror.api_addr, &raw_request("GET", &format!("{blob_path}?ns={dead_ns}"), &mirror.host(), &[], &header))
            .await;
    assert_eq!(r.status, 200, "blob with header and ns: {}", describe(&r));
    assert_eq!(r.body.len() as u64, blob_size);
    assert_eq!(sha256_digest(&r.body), blob);

    let log = origin.settled_access_log().await;
    assert_eq!(origin_gets(&log), 2, "{:#?}", log.matching("/manifests/"));
    assert!(log.count("HEAD", &blob_path) >= 1, "{:#?}", log.matching(&blob));
    assert_eq!(log.blob_get_bytes(&blob), blob_size, "{:#?}", log.matching(&blob));
    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(
        metrics.sum("damselfly_http_requests_total", &[("route", "manifest"), ("method", "GET"), ("status", "200")]),
        2.0,
        "{:#?}",
        metrics.with_prefix("damselfly_")
    );
    assert_eq!(
        metrics.sum("damselfly_http_requests_total", &[("route", "manifest"), ("method", "GET"), ("status", "502")]),
        2.0
    );
}
