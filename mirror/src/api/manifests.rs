//! `HEAD|GET /v2/<name>/manifests/<reference>`. Tags are resolved at the origin (concurrent
//! identical lookups share one request); manifests by digest are verified, cached and then
//! served from the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use damselfly_p2p::{Algorithm, Delivery, Digest, TaskRef};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use http::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Response, StatusCode};

use super::access::{authorize, identity, remember, MANIFEST_TYPES};
use super::error::ApiError;
use super::response::{full, Body, CONTENT_DIGEST};
use super::{App, ClientRepo};
use crate::oci::{ContentKind, Reference};
use crate::upstream::{CredentialKind, UpstreamRequest};

/// containerd's manifest size limit (4·1048·1048 bytes, slightly over 4 MiB); the mirror buffers
/// manifests, so it refuses larger ones too.
pub(super) const MAX_MANIFEST: usize = 4 * 1048 * 1048;

/// An upstream manifest answer, shareable between the requests that waited for it.
#[derive(Clone)]
pub struct Fetched {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    credential: CredentialKind,
}

type Flight = Shared<BoxFuture<'static, Result<Fetched, String>>>;

#[derive(Default)]
pub struct TagFlights {
    inflight: Mutex<HashMap<String, Flight>>,
}

pub struct ManifestRequest {
    pub repo: ClientRepo,
    pub reference: Reference,
    pub method: Method,
    pub accept: Vec<HeaderValue>,
}

pub async fn handle(app: Arc<App>, req: ManifestRequest) -> Result<Response<Body>, ApiError> {
    if let Reference::Digest(digest) = &req.reference {
        match app.store.get(digest) {
            Ok(Some(task)) if task.is_verified() && task.media_type().is_some() => {
                let target = req.repo.target(digest.clone());
                authorize(&app, &target, &task, ContentKind::Manifest, 0..task.len()).await?;
                return from_cache(&req, digest, &task).await;
            }
            _ => {}
        }
        // Through the cluster only on the word (a HEAD) of a registry the operator named: a
        // registry any client can name must show the manifest itself.
        if req.method == Method::GET && app.store.is_shared() && app.upstream.is_configured(&req.repo.registry) {
            if let Some(answer) = through_cluster(&app, &req, digest).await {
                return answer;
            }
        }
    }
    let fetched = fetch_shared(app.clone(), &req).await.map_err(ApiError::Origin)?;
    respond(&app, &req, fetched)
}

/// Joins an identical request in flight, or starts one.
async fn fetch_shared(app: Arc<App>, req: &ManifestRequest) -> Result<Fetched, String> {
    let accept: Vec<&str> = req.accept.iter().filter_map(|v| v.to_str().ok()).collect();
    let key = format!(
        "{}|{}|{}|{}|{}|{}",
        req.repo.registry.id(),
        req.repo.repo,
        req.reference,
        req.method,
        accept.join(","),
        identity(&req.repo.client_auth)
    );
    let flight = {
        let mut map = app.tags.inflight.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key) {
            Some(f) => f.clone(),
            None => {
                let flight = fetch(app.clone(), upstream_request(req)).boxed().shared();
                map.insert(key.clone(), flight.clone());
                // The flight runs to its end even if every waiter goes away, and then leaves
                // the map itself (unless a newer flight took its place), so no later request
                // joins a stale or abandoned one.
                let (app, driver) = (app.clone(), flight.clone());
                tokio::spawn(async move {
                    let _ = driver.clone().await;
                    let mut map = app.tags.inflight.lock().unwrap_or_else(|e| e.into_inner());
                    if map.get(&key).is_some_and(|f| f.ptr_eq(&driver)) {
                        map.remove(&key);
                    }
                });
                flight
            }
        }
    };
    flight.await
}

/// In a cluster, a manifest by digest comes from peers like a blob: a thousand nodes starting
/// one image must not cost the registry a thousand manifest GETs (Docker Hub counts each as a
/// pull). The origin, one the operator configured, answers a `HEAD` (which says the requester
/// may read it and gives its length and media type); the bytes come through the piece store
/// and are verified against the digest before the response.
/// `None`: the origin did not answer the HEAD usefully; fetch directly.
async fn through_cluster(
    app: &Arc<App>,
    req: &ManifestRequest,
    digest: &Digest,
) -> Option<Result<Response<Body>, ApiError>> {
    let head = ManifestRequest {
        repo: req.repo.clone(),
        reference: req.reference.clone(),
        method: Method::HEAD,
        accept: req.accept.clone(),
    };
    let f = fetch_shared(app.clone(), &head).await.ok()?;
    if matches!(f.status, StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED) {
        // No HEAD here: the direct GET works where a client's would.
        return None;
    }
    if !f.status.is_success() {
        return Some(Err(refusal(&f)));
    }
    let media_type = media_type(&f.headers).filter(|t| MANIFEST_TYPES.contains(&t.as_str()))?;
    let len = content_length(&f.headers).filter(|&l| l > 0 && l <= MAX_MANIFEST as u64)?;
    // A task of this digest cached as a blob, or with another length, is left alone: the
    // direct path serves this request without touching what others are served.
    let task = app.store.get_or_create(digest, len, Some(&media_type)).ok().filter(|t| t.len() == len)?;
    let target = req.repo.target(digest.clone());
    remember(app, &target, &task, f.credential);
    let source = Arc::new(super::source::UpstreamSource::manifest(app.clone(), target, req.accept.clone()));
    let mut out = Vec::with_capacity(len as usize);
    let mut s = std::pin::pin!(damselfly_p2p::read(task.clone(), 0..len, Delivery::Whole, source));
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => out.extend_from_slice(&c),
            // Nothing was sent yet: the direct path may still serve it.
            Err(e) => {
                tracing::info!(error = %e, "manifest through the cluster failed; fetching it directly");
                return None;
            }
        }
    }
    if task.media_type().is_none_or(|t| checked_type(&out, &t).as_deref() != Some(t.as_str())) {
        // The type this task was made with is not the one its body names or has.
        task.abandon("manifest media type does not match its body");
        return None;
    }
    Some(Ok(manifest_response(full(Bytes::from(out)), Some(&media_type), Some(digest), Some(len))))
}

/// The media type a cached manifest is served with: the one its body names, or, when it names
/// none (OCI makes `mediaType` optional), the one its structure says. A registry's
/// `Content-Type` is only that registry's word, and a cached manifest answers clients of every
/// registry: a wrong type fails containerd's pull, which does not fall back after a 200.
/// `claimed` must still be a manifest type: a registry that calls the body something else is
/// not serving a manifest.
fn checked_type(body: &[u8], claimed: &str) -> Option<String> {
    if !MANIFEST_TYPES.contains(&claimed) {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
        config: Option<serde::de::IgnoredAny>,
        layers: Option<serde::de::IgnoredAny>,
    }
    let shape = serde_json::from_slice::<Shape>(body).ok()?;
    let t = match (shape.media_type, shape.manifests, shape.config, shape.layers) {
        (Some(named), ..) => named,
        (None, Some(_), None, None) => OCI_INDEX.to_owned(),
        (None, None, Some(_), Some(_)) => OCI_MANIFEST.to_owned(),
        // Neither shape: nothing says what it is.
        _ => return None,
    };
    MANIFEST_TYPES.contains(&t.as_str()).then_some(t)
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn upstream_request(req: &ManifestRequest) -> UpstreamRequest {
    let mut headers = HeaderMap::new();
    for v in &req.accept {
        headers.append(ACCEPT, v.clone());
    }
    let path = format!("{}/{}", ContentKind::Manifest.path_segment(), req.reference);
    req.repo.request(req.method.clone(), path, headers)
}

async fn fetch(app: Arc<App>, ureq: UpstreamRequest) -> Result<Fetched, String> {
    app.metrics.origin(if ureq.method == Method::HEAD { "manifest_head" } else { "manifest" });
    let reply = app.upstream.send(ureq).await.map_err(|e| format!("origin unreachable: {e}"))?;
    let status = reply.response.status();
    let headers = reply.response.headers().clone();
    let mut body = Vec::new();
    let mut stream = reply.response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("origin body failed: {e}"))?;
        if body.len() + chunk.len() > MAX_MANIFEST {
            return Err("manifest is larger than 4 MiB".to_owned());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched { status, headers, body: Bytes::from(body), credential: reply.credential })
}

fn respond(app: &App, req: &ManifestRequest, f: Fetched) -> Result<Response<Body>, ApiError> {
    if !f.status.is_success() {
        return Err(refusal(&f));
    }
    let media_type = media_type(&f.headers);
    let is_get = req.method == Method::GET;
    let digest = if is_get {
        let algo = match &req.reference {
            Reference::Digest(d) => d.algorithm(),
            Reference::Tag(_) => Algorithm::Sha256,
        };
        let actual = Digest::of(algo, &f.body);
        let claimed = header_digest(&f.headers);
        let expected = match &req.reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => claimed.filter(|c| c.algorithm() == algo),
        };
        if expected.is_some_and(|e| e != actual) {
            tracing::error!(reference = %req.reference, "origin manifest does not match its digest");
            return Err(ApiError::origin("manifest from the origin does not match its digest"));
        }
        cache(app, req, &actual, &f, media_type.as_deref());
        Some(actual)
    } else {
        header_digest(&f.headers)
    };
    let len = if is_get { Some(f.body.len() as u64) } else { content_length(&f.headers) };
    let body = if is_get { full(f.body.clone()) } else { super::response::empty() };
    Ok(manifest_response(body, media_type.as_deref(), digest.as_ref(), len))
}

fn cache(app: &App, req: &ManifestRequest, digest: &Digest, f: &Fetched, media_type: Option<&str>) {
    let Some(media_type) = media_type.and_then(|t| checked_type(&f.body, t)) else { return };
    match app.store.put_verified(digest, &f.body, Some(&media_type)) {
        Ok(task) => {
            let target = req.repo.target(digest.clone());
            remember(app, &target, &task, f.credential);
        }
        Err(e) => tracing::debug!(error = %e, "manifest not cached"),
    }
}

async fn from_cache(req: &ManifestRequest, digest: &Digest, task: &TaskRef) -> Result<Response<Body>, ApiError> {
    let media_type = task.media_type();
    let len = task.len();
    let body = match req.method == Method::HEAD {
        true => super::response::empty(),
        false => full(read_all(task).await.map_err(ApiError::Origin)?),
    };
    Ok(manifest_response(body, media_type.as_deref(), Some(digest), Some(len)))
}

/// Reads a small complete task; a piece that fails its check makes this fail (the caller then
/// answers 502 and the client asks the origin).
async fn read_all(task: &TaskRef) -> Result<Bytes, String> {
    let source = Arc::new(NoSource);
    let mut out = Vec::with_capacity(task.len() as usize);
    let mut s = std::pin::pin!(damselfly_p2p::read(task.clone(), 0..task.len(), Delivery::Whole, source));
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    Ok(Bytes::from(out))
}

/// Cached manifests are complete: a read that needs the origin means the cache went bad.
struct NoSource;

impl damselfly_p2p::Source for NoSource {
    fn fetch(
        &self,
        _: Option<std::ops::Range<u64>>,
    ) -> BoxFuture<'static, Result<damselfly_p2p::SourceResponse, damselfly_p2p::SourceError>> {
        Box::pin(async { Err(damselfly_p2p::SourceError::fatal("cached manifest is damaged")) })
    }
}

fn manifest_response(
    body: Body,
    media_type: Option<&str>,
    digest: Option<&Digest>,
    len: Option<u64>,
) -> Response<Body> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Some(v) = media_type.and_then(|m| HeaderValue::from_str(m).ok()) {
        h.insert(CONTENT_TYPE, v);
    }
    if let Some(v) = digest.and_then(|d| HeaderValue::from_str(&d.to_string()).ok()) {
        h.insert(CONTENT_DIGEST, v);
    }
    if let Some(len) = len {
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

fn refusal(f: &Fetched) -> ApiError {
    ApiError::refused(f.status, &f.headers, ContentKind::Manifest)
}

/// The media type without parameters, as clients compare it verbatim.
fn media_type(h: &HeaderMap) -> Option<String> {
    let v = h.get(CONTENT_TYPE)?.to_str().ok()?;
    let m = v.split(';').next()?.trim();
    (!m.is_empty()).then(|| m.to_owned())
}

fn header_digest(h: &HeaderMap) -> Option<Digest> {
    Digest::parse(h.get(CONTENT_DIGEST)?.to_str().ok()?).ok()
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
