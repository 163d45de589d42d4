//! The mirror port as an HTTP forward proxy, against the real registry: registry blob reads in
//! absolute form come from the cache (the request line names the registry, whatever the
//! daemon's default), other requests are forwarded, CONNECT is tunnelled (or intercepted, for a
//! TLS registry), and destinations the daemon never reaches are refused.

use std::time::Duration;

use damselfly_integration::{raw_http, sha256_digest, Mirror, MirrorOpts, Registry, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that sends everything through the daemon as its HTTP proxy.
fn through(mirror: &Mirror) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(mirror.url()).expect("proxy url"))
        .user_agent("proxy-test/1")
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_blob_reads_come_from_the_cache_and_other_requests_are_forwarded() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("team/proxied", "v1", 4).await.unwrap();
    // The daemon's own default is another registry: only the request line can name the right one.
    let elsewhere = Registry::start().await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&elsewhere.url())).await.unwrap();
    let client = through(&mirror);
    let (big, size) = image.largest_blob();
    let url = origin.blob_url("team/proxied", &big);
    for _ in 0..2 {
        let body = client.get(&url).send().await.unwrap().error_for_status().unwrap().bytes().await.unwrap();
        assert_eq!((body.len() as u64, sha256_digest(&body)), (size, big.clone()));
    }
    let ranged = client.get(&url).header("Range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap().len(), 1000);

    let manifest = client
        .get(format!("{}/v2/team/proxied/manifests/v1", origin.url()))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200, "the manifest by tag is forwarded");

    let log = origin.settled_access_log().await;
    log.assert_copies_at_most(&[(big.clone(), size)], 1.05);
    let blob_gets = log.gets(&big);
    assert!(blob_gets.iter().all(|e| e.user_agent.starts_with("damselfly/")), "{blob_gets:#?}");
    let forwarded = log.matching("/manifests/v1");
    assert!(forwarded.iter().any(|e| e.user_agent == "proxy-test/1"), "{forwarded:#?}");
    assert_eq!(elsewhere.settled_access_log().await.count("GET", "/blobs/"), 0);

    let metrics = mirror.metrics().await.unwrap();
    assert!(metrics.sum("damselfly_proxy_requests_total", &[("kind", "cache")]) >= 3.0);
    assert!(metrics.sum("damselfly_proxy_requests_total", &[("kind", "forward")]) >= 1.0);
    assert!(metrics.sum("damselfly_download_bytes_total", &[("source", "cache")]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_to_the_registry_and_never_to_what_the_daemon_must_not_reach() {
    let origin = Registry::start().await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let addr = mirror.url().trim_start_matches("http://").parse().unwrap();

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.host());
    stream.write_all(connect.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Inside the tunnel, the registry itself answers.
    stream.write_all(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut inner = String::new();
    stream.read_to_string(&mut inner).await.unwrap();
    assert!(inner.starts_with("HTTP/1.1 200") && inner.to_ascii_lowercase().contains("registry/2.0"), "{inner}");
    assert!(!inner.to_ascii_lowercase().contains("via:"), "the tunnel changed the bytes: {inner}");

    for refused in [
        "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n",
        "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
        "CONNECT [fe80::1]:443 HTTP/1.1\r\nHost: [fe80::1]:443\r\n\r\n",
    ] {
        let resp = raw_http(addr, refused.as_bytes()).await.unwrap().expect("an answer");
        assert_eq!(resp.status, 403, "{refused}: {resp:?}");
    }
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "closed before the end of the head: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A client that sends everything, HTTPS included, through the daemon, and trusts only `ca`.
fn trusting(mirror: &Mirror, ca: &std::path::Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(mirror.url()).expect("proxy url"))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .user_agent("proxy-test/1")
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// A registry serving TLS with a certificate of its own CA: through an intercepting daemon, a
/// client that trusts only the daemon's CA reads its blobs from the cache, and its other
/// requests are forwarded over TLS, verified against the registry's CA (and refused by a
/// daemon that does not trust it, unless the registry is listed as insecure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intercepted_tls_registry_is_read_through_the_cache() {
    let work = tempfile::tempdir().unwrap();
    let registry_ca = TestCa::new(work.path(), "registry-ca");
    let (cert, key) = registry_ca.issue("registry", &["127.0.0.1"]);
    let origin = Registry::start_tls(&cert, &key).await.unwrap();
    let image = origin.push_image("team/intercepted", "v1", 4).await.unwrap();
    let elsewhere = Registry::start().await.unwrap();
    let mut opts = MirrorOpts::new(&elsewhere.url());
    opts.config.proxy_intercept = vec!["127.0.0.1".into()];
    opts.config.upstream_ca_file = Some(registry_ca.cert_path());
    let mirror = Mirror::start(opts).await.unwrap();
    let daemon_ca = mirror.data_dir().join("proxy-ca.pem");
    let client = trusting(&mirror, &daemon_ca);

    let (big, size) = image.largest_blob();
    let url = origin.blob_url("team/intercepted", &big);
    assert!(url.starts_with("https://"));
    for _ in 0..2 {
        let body = client.get(&url).send().await.unwrap().error_for_status().unwrap().bytes().await.unwrap();
        assert_eq!((body.len() as u64, sha256_digest(&body)), (size, big.clone()));
    }
    let manifest = format!("{}/v2/team/intercepted/manifests/v1", origin.url());
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let resp = client.get(&manifest).header("Accept", accept).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the manifest by tag is forwarded over verified TLS");

    let log = origin.settled_access_log().await;
    log.assert_copies_at_most(&[(big.clone(), size)], 1.05);
    let gets = log.gets(&big);
    assert!(gets.iter().all(|e| e.user_agent.starts_with("damselfly/")), "{gets:#?}");
    assert!(log.matching("/manifests/v1").iter().any(|e| e.user_agent == "proxy-test/1"));
    let metrics = mirror.metrics().await.unwrap();
    assert!(metrics.sum("damselfly_proxy_requests_total", &[("kind", "cache")]) >= 2.0);
    assert!(metrics.sum("damselfly_proxy_requests_total", &[("kind", "intercept")]) >= 1.0);

    // A daemon that does not trust the registry's CA forwards nothing to it.
    let mut opts = MirrorOpts::new(&elsewhere.url());
    opts.config.proxy_intercept = vec!["*".into()];
    let doubting = Mirror::start(opts).await.unwrap();
    let client = trusting(&doubting, &doubting.data_dir().join("proxy-ca.pem"));
    let resp = client.get(&manifest).header("Accept", accept).send().await.unwrap();
    assert_eq!(resp.status(), 502, "an unverified upstream was forwarded to");

    // One that lists the registry as insecure takes its certificate unverified, as docker does.
    let mut opts = MirrorOpts::new(&elsewhere.url());
    opts.config.proxy_intercept = vec!["*".into()];
    opts.config.insecure_registries.push(origin.host());
    let trusting_all = Mirror::start(opts).await.unwrap();
    let client = trusting(&trusting_all, &trusting_all.data_dir().join("proxy-ca.pem"));
    let resp = client.get(&manifest).header("Accept", accept).send().await.unwrap();
    assert_eq!(resp.status(), 200, "an insecure registry's certificate was checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_ends_with_the_daemons_shutdown() {
    let origin = Registry::start().await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let addr: std::net::SocketAddr = mirror.url().trim_start_matches("http://").parse().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.host());
    stream.write_all(connect.as_bytes()).await.unwrap();
    assert!(read_head(&mut stream).await.starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), mirror.shutdown()).await.expect("shutdown waited on the tunnel");
    let mut buf = [0u8; 16];
    let ended =
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.expect("the tunnel is closed");
    assert!(matches!(ended, Ok(0) | Err(_)), "the tunnel still carries bytes: {ended:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}
