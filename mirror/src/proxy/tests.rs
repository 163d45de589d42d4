//! The proxy's policy and routing against small in-process registries (`api/fake_registry.rs`),
//! with the client's address set as the server would set it: a client on another host cannot
//! be made on a test machine's loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use damselfly_p2p::{Algorithm, Digest};
use damselfly_serve::PeerAddr;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{Proxy, ProxyConfig};
use crate::api::fake_registry;
use crate::upstream::UpstreamConfig;

/// A registry with one blob, answering anything else with 200 "other".
async fn registry(blob: Bytes) -> SocketAddr {
    let digest = Digest::of(Algorithm::Sha256, &blob).to_string();
    fake_registry::serve(move |req: &Request<Incoming>| {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"other")));
        if req.uri().path().ends_with(&digest) {
            *resp.body_mut() = Full::new(blob.clone());
            resp.headers_mut().insert(header::CONTENT_LENGTH, blob.len().into());
            resp.headers_mut().insert("docker-content-digest", digest.parse().expect("header"));
        }
        let via = req.headers().get(header::VIA).cloned();
        if let Some(via) = via {
            resp.headers_mut().insert("x-seen-via", via);
        }
        Some(resp)
    })
    .await
}

fn proxy(dir: &std::path::Path, allow: &[&str]) -> Arc<Proxy> {
    let app = fake_registry::app(dir, 1 << 30, UpstreamConfig::default());
    let config = ProxyConfig { allow: allow.iter().map(|s| s.to_string()).collect(), ..ProxyConfig::default() };
    Arc::new(Proxy::new(app, &config, &mut Registry::default(), CancellationToken::new()).expect("proxy"))
}

async fn get(proxy: &Arc<Proxy>, from: [u8; 4], url: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut req = Request::builder().method(Method::GET).uri(url).body(Empty::<Bytes>::new()).expect("request");
    req.extensions_mut().insert(PeerAddr(SocketAddr::from((from, 40000))));
    assert!(Proxy::claims(&req));
    let (parts, body) = proxy.clone().handle(req).await.into_parts();
    (parts.status, parts.headers, body.collect().await.expect("body").to_bytes())
}

#[tokio::test]
async fn only_loopback_and_allowed_clients_are_served() {
    let dir = tempfile::tempdir().expect("dir");
    let blob = Bytes::from(vec![3u8; 5000]);
    let at = registry(blob.clone()).await;
    let url = format!("http://{at}/v2/team/app/blobs/{}", Digest::of(Algorithm::Sha256, &blob));
    let closed = proxy(dir.path(), &[]);
    assert_eq!(get(&closed, [10, 1, 2, 3], &url).await.0, StatusCode::FORBIDDEN);
    assert_eq!(get(&closed, [127, 0, 0, 1], &url).await.2, blob);
    drop(closed);
    let open = proxy(dir.path(), &["10.0.0.0/8"]);
    assert_eq!(get(&open, [192, 168, 1, 1], &url).await.0, StatusCode::FORBIDDEN);
    // An allowed client elsewhere is served, but not from this host's own addresses.
    assert_eq!(get(&open, [10, 1, 2, 3], &url).await.0, StatusCode::FORBIDDEN, "a remote client read loopback");
    assert_eq!(get(&open, [127, 0, 0, 1], &url).await.2, blob);
}

#[tokio::test]
async fn a_request_that_went_through_a_damselfly_proxy_is_a_loop() {
    let dir = tempfile::tempdir().expect("dir");
    let proxy = proxy(dir.path(), &[]);
    let mut req = Request::builder().uri("http://registry.example/v2/").header(header::VIA, "1.1 damselfly");
    req = req.extension(PeerAddr(SocketAddr::from(([127, 0, 0, 1], 1))));
    let resp = proxy.clone().handle(req.body(Empty::<Bytes>::new()).expect("request")).await;
    assert_eq!(resp.status(), StatusCode::LOOP_DETECTED);
}

#[tokio::test]
async fn a_forwarded_request_reaches_this_hosts_addresses_only_for_a_client_on_this_host() {
    let dir = tempfile::tempdir().expect("dir");
    let at = registry(Bytes::from_static(b"blob")).await;
    let proxy = proxy(dir.path(), &["10.0.0.0/8"]);
    let url = format!("http://{at}/v2/team/app/manifests/v1");
    let (status, headers, body) = get(&proxy, [127, 0, 0, 1], &url).await;
    assert_eq!((status, body), (StatusCode::OK, Bytes::from_static(b"other")));
    assert_eq!(headers.get("x-seen-via").and_then(|v| v.to_str().ok()), Some("1.1 damselfly"));
    assert_eq!(get(&proxy, [10, 1, 2, 3], &url).await.0, StatusCode::FORBIDDEN, "a remote client reached loopback");
    let metadata = "http://169.254.169.254/latest/meta-data/";
    assert_eq!(get(&proxy, [127, 0, 0, 1], metadata).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_request_that_names_another_registry_in_a_header_is_read_from_the_request_line() {
    let dir = tempfile::tempdir().expect("dir");
    let blob = Bytes::from(vec![9u8; 3000]);
    let at = registry(blob.clone()).await;
    let elsewhere = registry(Bytes::from_static(b"nothing")).await;
    let proxy = proxy(dir.path(), &[]);
    let url = format!("http://{at}/v2/team/app/blobs/{}", Digest::of(Algorithm::Sha256, &blob));
    let mut req = Request::builder().uri(&url).header("X-Dragonfly-Registry", format!("http://{elsewhere}"));
    req = req.extension(PeerAddr(SocketAddr::from(([127, 0, 0, 1], 1))));
    let resp = proxy.clone().handle(req.body(Empty::<Bytes>::new()).expect("request")).await;
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), blob);
}

#[test]
fn origin_form_and_http2_requests_are_the_mirror_apis() {
    let origin = Request::builder().uri("/v2/a/blobs/sha256:00").body(()).expect("request");
    assert!(!Proxy::claims(&origin));
    let h2 = Request::builder().uri("http://x/v2/").version(http::Version::HTTP_2).body(()).expect("request");
    assert!(!Proxy::claims(&h2));
    let connect = Request::builder().method(Method::CONNECT).uri("x:443").body(()).expect("request");
    assert!(Proxy::claims(&connect));
}
