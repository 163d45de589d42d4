//! Manifests against small in-process registries (see `fake_registry.rs`). Tests are named
//! after the bug.

use std::net::SocketAddr;

use bytes::Bytes;
use damselfly_p2p::{Algorithm, Digest};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::{fake_registry, App, REGISTRY_HEADER};
use crate::upstream::UpstreamConfig;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry holding one manifest (or blob) body, answering with `content_type`.
#[derive(Clone)]
struct Reg {
    body: Bytes,
    content_type: &'static str,
    /// Answers `HEAD` with 405, as some registries and proxies do.
    no_head: bool,
}

fn answer(r: &Reg, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let digest = Digest::of(Algorithm::Sha256, &r.body).to_string();
    let mut resp = Response::new(Full::new(Bytes::new()));
    if req.method() == Method::HEAD && r.no_head {
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return resp;
    }
    // `bytes=a-b`, as the proof of a cached blob asks.
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
        let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
        Some(a..b.min(r.body.len() - 1) + 1)
    });
    let body = match &range {
        Some(span) => r.body.slice(span.clone()),
        None => r.body.clone(),
    };
    if let Some(span) = range {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let value = format!("bytes {}-{}/{}", span.start, span.end - 1, r.body.len());
        resp.headers_mut().insert(header::CONTENT_RANGE, value.parse().expect("header"));
    }
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, r.content_type.parse().expect("header"));
    h.insert("docker-content-digest", digest.parse().expect("header"));
    h.insert(header::CONTENT_LENGTH, body.len().into());
    if req.method() == Method::GET {
        *resp.body_mut() = Full::new(body);
    }
    resp
}

async fn serve(r: Reg) -> SocketAddr {
    fake_registry::serve(move |req: &Request<Incoming>| Some(answer(&r, req))).await
}

async fn call(
    app: &std::sync::Arc<App>,
    method: Method,
    path: &str,
    registry: SocketAddr,
    auth: Option<&str>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(REGISTRY_HEADER, format!("http://{registry}"))
        .header(header::ACCEPT, format!("{OCI_MANIFEST}, */*"));
    if let Some(a) = auth {
        b = b.header(header::AUTHORIZATION, a);
    }
    let (parts, body) = app.clone().handle(b.body(()).expect("request")).await.into_parts();
    (parts.status, parts.headers, body.collect().await.expect("body").to_bytes())
}

fn manifest(with_media_type: bool) -> (Bytes, Digest) {
    let config = format!(
        r#""config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[]"#,
        "a".repeat(64)
    );
    let body = if with_media_type {
        format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",{config}}}"#)
    } else {
        format!(r#"{{"schemaVersion":2,{config}}}"#)
    };
    let d = Digest::of(Algorithm::Sha256, body.as_bytes());
    (Bytes::from(body), d)
}

#[tokio::test]
async fn a_cached_manifest_keeps_the_media_type_its_body_names() {
    let dir = tempfile::tempdir().expect("dir");
    let app = fake_registry::app(dir.path(), 1 << 30, UpstreamConfig::default());
    for with_media_type in [true, false] {
        let (body, d) = manifest(with_media_type);
        let evil = serve(Reg { body: body.clone(), content_type: "text/html", no_head: false }).await;
        let good = serve(Reg { body: body.clone(), content_type: OCI_MANIFEST, no_head: false }).await;
        let (status, _, _) = call(&app, Method::GET, &format!("/v2/x/y/manifests/{d}"), evil, None).await;
        assert_eq!(status, StatusCode::OK);
        let (status, headers, _) = call(&app, Method::HEAD, &format!("/v2/lib/app/manifests/{d}"), good, None).await;
        assert_eq!(status, StatusCode::OK);
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        assert_eq!(content_type, Some(OCI_MANIFEST), "with mediaType in the body: {with_media_type}");
    }
}

#[tokio::test]
async fn a_cached_manifest_is_served_where_the_origin_answers_no_head() {
    let dir = tempfile::tempdir().expect("dir");
    let app = fake_registry::app(dir.path(), 1 << 30, UpstreamConfig::default());
    let (body, d) = manifest(true);
    let reg = serve(Reg { body: body.clone(), content_type: OCI_MANIFEST, no_head: true }).await;
    let path = format!("/v2/lib/app/manifests/{d}");
    let (status, _, got) = call(&app, Method::GET, &path, reg, Some("Bearer alice")).await;
    assert_eq!((status, got), (StatusCode::OK, body.clone()));
    let (status, _, got) = call(&app, Method::GET, &path, reg, Some("Bearer bob")).await;
    assert_eq!((status, got), (StatusCode::OK, body), "the origin serves bob's GET");
    // A cached blob's access check asks for bytes, not a HEAD.
    let blob = Bytes::from(vec![7u8; 1000]);
    let bd = Digest::of(Algorithm::Sha256, &blob);
    let reg = serve(Reg { body: blob.clone(), content_type: "application/octet-stream", no_head: false }).await;
    let (status, _, _) = call(&app, Method::GET, &format!("/v2/lib/app/blobs/{bd}"), reg, Some("Bearer alice")).await;
    assert_eq!(status, StatusCode::OK);
    let reg = serve(Reg { body: blob.clone(), content_type: "application/octet-stream", no_head: true }).await;
    let (status, _, got) = call(&app, Method::GET, &format!("/v2/lib/app/blobs/{bd}"), reg, Some("Bearer bob")).await;
    assert_eq!((status, got), (StatusCode::OK, blob));
}

#[tokio::test]
async fn a_task_remembers_a_bounded_number_of_public_repositories() {
    let dir = tempfile::tempdir().expect("dir");
    let app = fake_registry::app(dir.path(), 1 << 30, UpstreamConfig::default());
    let body = Bytes::from(vec![7u8; 1000]);
    let d = Digest::of(Algorithm::Sha256, &body);
    let reg = serve(Reg { body: body.clone(), content_type: "application/octet-stream", no_head: false }).await;
    let (status, _, got) = call(&app, Method::GET, &format!("/v2/r0/blobs/{d}"), reg, None).await;
    assert_eq!((status, got), (StatusCode::OK, body));
    let n = 500;
    for i in 1..n {
        let (status, _, _) = call(&app, Method::HEAD, &format!("/v2/r{i}/blobs/{d}"), reg, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let task = app.store.get(&d).expect("store").expect("task");
    // The test names its registry over plain HTTP, a repository apart from the same host over TLS.
    let kept = (0..n).filter(|i| task.public_age(&format!("http://{reg}/r{i}")).is_some()).count();
    assert!(kept <= 64, "{kept} public repositories kept for one task");
    assert!(task.public_age(&format!("http://{reg}/r{}", n - 1)).is_some(), "the newest is kept");
}

#[tokio::test]
async fn a_manifest_naming_no_media_type_is_served_with_the_type_its_structure_says() {
    let dir = tempfile::tempdir().expect("dir");
    let app = fake_registry::app(dir.path(), 1 << 30, UpstreamConfig::default());
    let (body, d) = manifest(false);
    // This registry calls every manifest an index; containerd fails an image pull on that.
    let index = "application/vnd.oci.image.index.v1+json";
    let wrong = serve(Reg { body: body.clone(), content_type: index, no_head: false }).await;
    let right = serve(Reg { body: body.clone(), content_type: OCI_MANIFEST, no_head: false }).await;
    let path = format!("/v2/lib/app/manifests/{d}");
    let (status, _, _) = call(&app, Method::GET, &path, wrong, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, got) = call(&app, Method::GET, &path, right, None).await;
    assert_eq!((status, got), (StatusCode::OK, body));
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    assert_eq!(content_type, Some(OCI_MANIFEST), "another registry's word reached this registry's client");
}

#[tokio::test]
async fn a_repository_starting_with_a_registry_is_read_from_that_registry() {
    let dir = tempfile::tempdir().expect("dir");
    let app = fake_registry::app(dir.path(), 1 << 30, UpstreamConfig::default());
    let (body, d) = manifest(true);
    let reg = Reg { body: body.clone(), content_type: OCI_MANIFEST, no_head: false };
    let at = fake_registry::serve(move |req: &Request<Incoming>| {
        let mut resp = answer(&reg, req);
        if req.headers().contains_key(header::AUTHORIZATION) {
            *resp.status_mut() = StatusCode::IM_A_TEAPOT;
        }
        if !req.uri().path().starts_with("/v2/lib/app/") {
            *resp.status_mut() = StatusCode::NOT_FOUND;
        }
        Some(resp)
    })
    .await;
    let prefixed = format!("/v2/127.0.0.1_{}/lib/app/manifests/{d}", at.port());
    let get = |path: String, header: Option<String>| {
        // Credentials meant for whatever registry the client thinks it is talking to.
        let mut b = Request::builder()
            .uri(path)
            .header(header::ACCEPT, OCI_MANIFEST)
            .header(header::AUTHORIZATION, "Bearer theirs");
        if let Some(h) = header {
            b = b.header(REGISTRY_HEADER, h);
        }
        let app = app.clone();
        async move {
            let (parts, body) = app.handle(b.body(()).expect("request")).await.into_parts();
            (parts.status, body.collect().await.expect("body").to_bytes())
        }
    };
    assert_eq!(get(prefixed.clone(), None).await, (StatusCode::OK, body), "the client's credentials went along");
    // A request that names its registry keeps the whole path as its repository.
    let (status, _) = get(prefixed, Some(format!("http://{at}"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
