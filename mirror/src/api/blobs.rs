//! `HEAD|GET /v2/<name>/blobs/<digest>`: through the piece store, with ranges.

use std::sync::Arc;

use damselfly_p2p::{passthrough, Delivery, StoreError, TaskRef};
use futures_util::StreamExt;
use http::header::{HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use http::{HeaderMap, Method, Response, StatusCode};

use super::access::{authorize, remember, Access};
use super::error::ApiError;
use super::proof::{self, probe_blob};
use super::response::{empty, stream, Body, CONTENT_DIGEST};
use super::source::UpstreamSource;
use super::{App, Target};
use crate::oci::{content_range, parse_range, ContentKind, RangeSpec};
use crate::upstream::CredentialKind;

pub async fn handle(
    app: Arc<App>,
    target: Target,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    let range = match headers.get(RANGE) {
        None => None,
        Some(v) => v.to_str().ok().and_then(|s| parse_range(s).ok()).ok_or(ApiError::BadRange)?,
    };
    let (task, access) = match app.store.get(&target.digest) {
        Ok(Some(task)) => {
            let span = range.and_then(|spec| spec.resolve(task.len())).unwrap_or(0..task.len());
            let access = authorize(&app, &target, &task, ContentKind::Blob, span).await?;
            (task, access)
        }
        // A HEAD of an uncached blob asks the origin and reserves nothing: clients that only
        // check for existence must not evict what others are using.
        Ok(None) if *method == Method::HEAD => return pass_through_unknown(app, target, method, range).await,
        Ok(None) => match cold(&app, &target, range).await? {
            Cold::Cached(task, access) => (task, access),
            Cold::PassThrough(len) => return pass_through(app, target, method, len, range).await,
        },
        Err(e) => {
            tracing::error!(error = %e, "piece store failed");
            return pass_through_unknown(app, target, method, range).await;
        }
    };
    if !task.claim_supplier(target.registry.id().as_str()) {
        // Unverified bytes another registry supplied: this client gets its own registry's.
        tracing::debug!(digest = %target.digest, registry = %target.registry.host, "cached bytes are another registry's and unverified; passing through");
        // Its length too is only that registry's word: ask this one.
        drop(task);
        return pass_through_unknown(app, target, method, range).await;
    }
    serve(app, target, task, access, method, range).await
}

enum Cold {
    /// A task made for the blob, and how the requester may read it.
    Cached(TaskRef, Access),
    PassThrough(u64),
}

/// Where a span starts when it can be told without the blob's length.
fn start_hint(range: Option<RangeSpec>) -> u64 {
    match range {
        Some(RangeSpec::FromTo(start, _) | RangeSpec::From(start)) => start,
        Some(RangeSpec::Suffix(_)) | None => 0,
    }
}

/// A blob the store does not have: its length, which also proves the requester may read it,
/// and room for it. Alone, the bytes then come from that registry (checked against the digest
/// on the way), and its `HEAD` is enough. In a cluster they may come from other nodes: the
/// registry shows a window of the span first ([`proof`]).
async fn cold(app: &App, target: &Target, range: Option<RangeSpec>) -> Result<Cold, ApiError> {
    let (len, access) = match app.store.is_shared() {
        false => {
            let (len, credential) = head_len(app, target).await?;
            (len, Err(credential))
        }
        true => {
            let probe = probe_blob(app, target, start_hint(range)).await?;
            (probe.len, Ok(probe))
        }
    };
    if len == 0 && !is_empty_digest(&target.digest) {
        // Caching it would answer every later request for the digest with this error.
        return Err(zero_length_refused());
    }
    let made = match &access {
        // A blob no bigger than a window came whole: no node need fetch it again.
        Ok(probe)
            if probe.is_whole()
                && damselfly_p2p::Digest::of(target.digest.algorithm(), &probe.window) == target.digest =>
        {
            app.store.put_verified(&target.digest, &probe.window, None)
        }
        _ => app.store.get_or_create(&target.digest, len, None),
    };
    match (made, access) {
        (Ok(task), Err(credential)) => {
            remember(app, target, &task, credential);
            Ok(Cold::Cached(task, Access::Granted))
        }
        (Ok(task), Ok(probe)) if task.is_verified() && probe.is_whole() => {
            remember(app, target, &task, probe.credential);
            Ok(Cold::Cached(task, Access::Granted))
        }
        (Ok(task), Ok(probe)) => Ok(Cold::Cached(task, Access::Window(probe))),
        (Err(StoreError::NoSpace(_)), _) => Ok(Cold::PassThrough(len)),
        (Err(e), _) => {
            tracing::warn!(error = %e, "cannot cache; streaming through");
            Ok(Cold::PassThrough(len))
        }
    }
}

/// `HEAD` of the blob at the origin with the requester's credentials: its length, and with
/// which credentials the origin agreed to serve it. For content this node then takes from
/// that origin itself.
async fn head_len(app: &App, target: &Target) -> Result<(u64, CredentialKind), ApiError> {
    app.metrics.origin("blob_head");
    let req = target.request(Method::HEAD, ContentKind::Blob, HeaderMap::new());
    let reply = app.upstream.send(req).await.map_err(|e| ApiError::origin(format!("origin unreachable: {e}")))?;
    if reply.response.status() != StatusCode::OK {
        return Err(ApiError::refused(reply.response.status(), reply.response.headers(), ContentKind::Blob));
    }
    let len = reply
        .response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .ok_or_else(|| ApiError::origin("origin did not say how long the blob is"))?;
    Ok((len, reply.credential))
}

async fn serve(
    app: Arc<App>,
    target: Target,
    task: TaskRef,
    access: Access,
    method: &Method,
    range: Option<RangeSpec>,
) -> Result<Response<Body>, ApiError> {
    let len = task.len();
    if len == 0 {
        if !is_empty_digest(&target.digest) {
            task.abandon("zero length for a non-empty digest");
        }
        return zero_length(&target);
    }
    let (status, span) = match range {
        None => (StatusCode::OK, 0..len),
        Some(spec) => match spec.resolve(len) {
            Some(r) => (StatusCode::PARTIAL_CONTENT, r),
            None => return Err(ApiError::Unsatisfiable { len }),
        },
    };
    let window = match access {
        Access::Granted => None,
        Access::Window(probe) => {
            if probe.len != len {
                // Not the blob cached here: the client gets what its registry has, checked
                // against the digest on the way.
                tracing::info!(digest = %target.digest, registry = %target.registry.host, "the registry's blob has another length than the cached one; passing through");
                drop(task);
                return pass_through(app, target, method, probe.len, range).await;
            }
            if !probe.proves(&span) {
                // Bytes anyone could guess (a run of zeros) prove nothing: the span comes from
                // the client's own registry, and a HEAD says only what that registry said.
                app.metrics.access("unproven");
                drop(task);
                return pass_through(app, target, method, len, range).await;
            }
            let shown = probe.within(&span);
            match task.present_copy(probe.start..probe.start + shown.len() as u64) {
                Some(cached) if cached == shown => {
                    remember(&app, &target, &task, probe.credential);
                    None
                }
                Some(_) => {
                    app.metrics.access("disproved");
                    tracing::warn!(digest = %target.digest, registry = %target.registry.host, "the registry's bytes are not the cached ones");
                    return Err(ApiError::Disproved(ContentKind::Blob));
                }
                // Nothing of the window here: a HEAD says what the registry said.
                None if *method == Method::HEAD => None,
                // The bytes will come from the registry itself or from other nodes: the
                // response's first bytes must be the registry's.
                None => {
                    let probe = match probe.start == span.start {
                        true => probe,
                        false => probe_blob(&app, &target, span.start).await?,
                    };
                    if probe.len != len || !probe.proves(&span) {
                        app.metrics.access("unproven");
                        drop(task);
                        return pass_through(app, target, method, len, range).await;
                    }
                    Some((probe.within(&span), probe.credential))
                }
            }
        }
    };
    let source = Arc::new(UpstreamSource::blob(app.clone(), target.clone()));
    let body = if *method == Method::HEAD {
        empty()
    } else {
        if status == StatusCode::PARTIAL_CONTENT && app.background_fill {
            fill_in_background(task.clone(), source.clone());
        }
        // `bytes=0-` (how containerd opens a blob) is the whole content too: its last byte
        // waits for the digest like a plain GET's.
        let delivery = if span == (0..len) { Delivery::Whole } else { Delivery::Part };
        let bytes = damselfly_p2p::read(task.clone(), span.clone(), delivery, source);
        match window {
            None => stream(bytes),
            Some((shown, credential)) => {
                let fallback = from_own_registry(app.clone(), target.clone(), task.clone(), span.clone(), delivery);
                let (app, target) = (app.clone(), target.clone());
                let proven = Box::new(move || remember(&app, &target, &task, credential));
                stream(proof::matching(bytes, shown, proven, Some(fallback)))
            }
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    blob_headers(h, &target, span.end - span.start);
    if status == StatusCode::PARTIAL_CONTENT {
        insert(h, CONTENT_RANGE.as_str(), &content_range(&span, len));
    }
    Ok(resp)
}

/// The span from the client's own registry, for a response whose first bytes (from the cache
/// or from other nodes) were not that registry's: the client gets what it would get from its
/// registry directly, a whole blob checked against the digest on the way. A registry the
/// operator named is believed: the task's bytes are dropped, and reported if other nodes
/// supplied them. Any other registry may be the one lying, and the task is left alone.
fn from_own_registry(
    app: Arc<App>,
    target: Target,
    task: TaskRef,
    span: std::ops::Range<u64>,
    delivery: Delivery,
) -> proof::Fallback {
    let len = task.len();
    Box::new(move || {
        Box::pin(async move {
            app.metrics.access("disproved");
            tracing::warn!(digest = %target.digest, registry = %target.registry.host, "the bytes at hand are not the registry's; serving the registry's own");
            if app.upstream.is_configured(&target.registry) {
                task.contradict("a registry the operator named holds other bytes");
            }
            drop(task);
            use damselfly_p2p::Source as _;
            let source = UpstreamSource::blob(app.clone(), target.clone());
            let whole = delivery == Delivery::Whole;
            let r = source.fetch((!whole).then(|| span.clone())).await.map_err(|e| e.message)?;
            if whole {
                let body = passthrough::verify(target.digest.clone(), len, r.body, app.store.metrics().clone());
                return Ok(body.map(|r| r.map_err(|e| e.to_string())).boxed());
            }
            if !r.range_honoured {
                return Err("origin ignored the Range".to_owned());
            }
            Ok(r.body.map(|r| r.map_err(|e| e.message)).boxed())
        })
    })
}

fn blob_headers(h: &mut HeaderMap, target: &Target, content_len: u64) {
    h.insert(CONTENT_LENGTH, HeaderValue::from(content_len));
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert(h, CONTENT_DIGEST, &target.digest.to_string());
}

fn insert(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

fn is_empty_digest(digest: &damselfly_p2p::Digest) -> bool {
    *digest == damselfly_p2p::Digest::of(digest.algorithm(), b"")
}

/// The empty blob, whose digest is the digest of nothing; any other digest of zero length is
/// the origin's mistake.
fn zero_length(target: &Target) -> Result<Response<Body>, ApiError> {
    if !is_empty_digest(&target.digest) {
        return Err(zero_length_refused());
    }
    let mut resp = Response::new(empty());
    blob_headers(resp.headers_mut(), target, 0);
    Ok(resp)
}

fn zero_length_refused() -> ApiError {
    ApiError::origin("origin says a non-empty digest has zero length")
}

/// After a cold range read, fetch the rest so the next reader finds the whole blob.
fn fill_in_background(task: TaskRef, source: Arc<UpstreamSource>) {
    tokio::spawn(damselfly_p2p::reader::fill(task, source));
}

/// Streams straight from the origin when the blob cannot be cached (or the cache holds another
/// registry's unverified bytes): a whole blob verified, a range as the origin sends it, which
/// is what the client would get from the origin itself.
async fn pass_through(
    app: Arc<App>,
    target: Target,
    method: &Method,
    len: u64,
    range: Option<RangeSpec>,
) -> Result<Response<Body>, ApiError> {
    if len == 0 {
        return zero_length(&target);
    }
    let span = match range.map(|spec| spec.resolve(len)) {
        None => None,
        Some(Some(span)) if span == (0..len) => None,
        Some(Some(span)) => Some(span),
        Some(None) => return Err(ApiError::Unsatisfiable { len }),
    };
    if *method == Method::HEAD {
        let mut resp = Response::new(empty());
        blob_headers(resp.headers_mut(), &target, len);
        return Ok(resp);
    }
    if let Some(span) = span {
        return pass_through_range(app, target, span, len).await;
    }
    let source = UpstreamSource::blob(app.clone(), target.clone());
    use damselfly_p2p::Source as _;
    let r = source.fetch(None).await.map_err(|e| ApiError::Origin(e.message))?;
    let body = passthrough::verify(target.digest.clone(), len, r.body, app.store.metrics().clone());
    let mut resp = Response::new(stream(body));
    blob_headers(resp.headers_mut(), &target, len);
    Ok(resp)
}

async fn pass_through_range(
    app: Arc<App>,
    target: Target,
    span: std::ops::Range<u64>,
    len: u64,
) -> Result<Response<Body>, ApiError> {
    let source = UpstreamSource::blob(app.clone(), target.clone());
    use damselfly_p2p::Source as _;
    let r = source.fetch(Some(span.clone())).await.map_err(|e| ApiError::Origin(e.message))?;
    if !r.range_honoured {
        // Skipping to the range through the whole blob is the origin's job, not a pass-through's.
        return Err(ApiError::origin("origin ignored the Range of a blob that cannot be cached"));
    }
    let mut resp = Response::new(stream(r.body));
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    blob_headers(resp.headers_mut(), &target, span.end - span.start);
    insert(resp.headers_mut(), CONTENT_RANGE.as_str(), &content_range(&span, len));
    Ok(resp)
}

async fn pass_through_unknown(
    app: Arc<App>,
    target: Target,
    method: &Method,
    range: Option<RangeSpec>,
) -> Result<Response<Body>, ApiError> {
    let (len, _) = head_len(&app, &target).await?;
    pass_through(app, target, method, len, range).await
}
