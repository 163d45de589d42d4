//! The blob path against small in-process registries that misbehave in ways a real one
//! cannot: other bytes for a digest, lengths that lie, silence. Tests are named after the bug.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use damselfly_p2p::{Algorithm, Digest};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::{fake_registry, App, REGISTRY_HEADER};
use crate::upstream::UpstreamConfig;

/// What a registry answers for the one blob it has.
#[derive(Clone)]
struct Reg {
    data: Bytes,
    /// The length its HEAD announces, when it lies.
    head_len: Option<u64>,
    /// Every byte flipped: other content under the same digest.
    corrupt: bool,
    /// Accepts connections and never answers.
    silent: bool,
}

fn honest(data: &Bytes) -> Reg {
    Reg { data: data.clone(), head_len: None, corrupt: false, silent: false }
}

fn answer(r: &Reg, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let data = if r.corrupt { r.data.iter().map(|b| b ^ 0xff).collect::<Vec<u8>>().into() } else { r.data.clone() };
    let mut resp = Response::new(Full::new(Bytes::new()));
    if req.method() == Method::HEAD {
        resp.headers_mut().insert(header::CONTENT_LENGTH, r.head_len.unwrap_or(data.len() as u64).into());
        return resp;
    }
    let Some(range) = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        *resp.body_mut() = Full::new(data);
        return resp;
    };
    // The length it announces, in `Content-Range` as in a HEAD's `Content-Length`.
    let claimed = r.head_len.map_or(data.len(), |l| l as usize);
    let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap_or(("0", ""));
    let a: usize = a.parse().unwrap_or(0);
    if a >= claimed.min(data.len()) {
        *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
        let value = format!("bytes */{claimed}");
        resp.headers_mut().insert(header::CONTENT_RANGE, value.parse().expect("header"));
        return resp;
    }
    let b = b.parse::<usize>().map_or(data.len() - 1, |b| b.min(data.len() - 1));
    *resp.body_mut() = Full::new(data.slice(a..b + 1));
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    let value = format!("bytes {a}-{b}/{claimed}");
    resp.headers_mut().insert(header::CONTENT_RANGE, value.parse().expect("header"));
    resp
}

async fn serve(r: Reg) -> SocketAddr {
    fake_registry::serve(move |req: &Request<Incoming>| (!r.silent).then(|| answer(&r, req))).await
}

fn app(dir: &std::path::Path, quota: u64, upstream: UpstreamConfig) -> Arc<App> {
    fake_registry::app(dir, quota, upstream)
}

fn blob(len: usize, seed: u8) -> (Bytes, Digest) {
    let v: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let d = Digest::of(Algorithm::Sha256, &v);
    (Bytes::from(v), d)
}

type Got = (StatusCode, http::HeaderMap, Result<Bytes, String>);

async fn get(app: &Arc<App>, registry: SocketAddr, digest: &Digest, range: Option<&str>) -> Got {
    let mut b = Request::builder()
        .uri(format!("/v2/lib/app/blobs/{digest}"))
        .header(REGISTRY_HEADER, format!("http://{registry}"));
    if let Some(r) = range {
        b = b.header(header::RANGE, r);
    }
    let (parts, body) = app.clone().handle(b.body(()).expect("request")).await.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).map_err(|e| e.to_string());
    (parts.status, parts.headers, body)
}

#[tokio::test]
async fn unverified_range_bytes_serve_only_the_registry_that_supplied_them() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path(), 1 << 30, UpstreamConfig::default());
    let (data, digest) = blob(12 << 20, 1);
    let good = serve(honest(&data)).await;
    let evil = serve(Reg { corrupt: true, ..honest(&data) }).await;
    let (status, _, body) = get(&app, evil, &digest, Some("bytes=0-1023")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_ne!(body.expect("body"), data.slice(0..1024));
    for range in ["bytes=0-1023", "bytes=5000000-5001023"] {
        let (status, headers, body) = get(&app, good, &digest, Some(range)).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        let start: usize = range[6..].split('-').next().and_then(|s| s.parse().ok()).expect("start");
        assert_eq!(body.expect("body"), data.slice(start..start + 1024), "{range}");
        assert!(headers.get(header::CONTENT_RANGE).is_some());
    }
    // The first registry still reads what it supplied; once verified, the content is anyone's.
    let (status, _, _) = get(&app, evil, &digest, Some("bytes=0-1023")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
}

#[tokio::test]
async fn an_open_range_from_zero_holds_back_its_last_byte_for_the_digest() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path(), 1 << 30, UpstreamConfig::default());
    let (data, digest) = blob(3 << 20, 2);
    let evil = serve(Reg { corrupt: true, ..honest(&data) }).await;
    let (status, _, body) = get(&app, evil, &digest, Some("bytes=0-")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert!(body.is_err(), "content that fails its digest must abort the body");
    let good = serve(honest(&data)).await;
    let (status, _, body) = get(&app, good, &digest, Some("bytes=0-")).await;
    assert_eq!((status, body.expect("body")), (StatusCode::PARTIAL_CONTENT, data));
}

#[tokio::test]
async fn a_range_of_a_blob_too_big_to_cache_passes_through_as_a_206_range() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path(), 1 << 20, UpstreamConfig::default());
    let (data, digest) = blob(2 << 20, 4);
    let good = serve(honest(&data)).await;
    let (status, headers, body) = get(&app, good, &digest, Some("bytes=1048576-1049599")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body.expect("body"), data.slice(1048576..1049600));
    let range = headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok());
    assert_eq!(range, Some("bytes 1048576-1049599/2097152"));
    let (status, _, _) = get(&app, good, &digest, Some("bytes=3000000-")).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    let (status, _, body) = get(&app, good, &digest, None).await;
    assert_eq!((status, body.expect("body")), (StatusCode::OK, data));
}

#[tokio::test]
async fn an_origin_saying_zero_bytes_for_a_digest_blocked_it_for_good() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path(), 1 << 30, UpstreamConfig::default());
    let (data, digest) = blob(1 << 20, 3);
    let zero = serve(Reg { head_len: Some(0), ..honest(&data) }).await;
    let (status, _, _) = get(&app, zero, &digest, None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let good = serve(honest(&data)).await;
    let (status, _, body) = get(&app, good, &digest, None).await;
    assert_eq!((status, body.expect("body")), (StatusCode::OK, data));
}

#[tokio::test]
async fn a_silent_origin_times_out() {
    let dir = tempfile::tempdir().expect("dir");
    let upstream = UpstreamConfig { read_timeout: Duration::from_millis(500), ..Default::default() };
    let app = app(dir.path(), 1 << 30, upstream);
    let (data, digest) = blob(1 << 20, 5);
    let silent = serve(Reg { silent: true, ..honest(&data) }).await;
    let got = tokio::time::timeout(Duration::from_secs(10), get(&app, silent, &digest, None)).await;
    assert_eq!(got.expect("answered in time").0, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn an_origin_announcing_a_longer_length_blocked_the_digest_for_everyone() {
    let dir = tempfile::tempdir().expect("dir");
    let app = app(dir.path(), 1 << 30, UpstreamConfig::default());
    let (data, digest) = blob(5 << 20, 6);
    let liar = serve(Reg { head_len: Some(6 << 20), ..honest(&data) }).await;
    let (_, _, body) = get(&app, liar, &digest, None).await;
    assert!(body.is_err(), "a body short of its Content-Length must abort");
    let good = serve(honest(&data)).await;
    let (status, headers, body) = get(&app, good, &digest, None).await;
    assert_eq!(headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()), Some("5242880"));
    assert_eq!((status, body.expect("body")), (StatusCode::OK, data));
}
