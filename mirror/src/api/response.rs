//! Building responses: the one place where errors become HTTP statuses and OCI error JSON.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::oci::{error_body, ContentKind, ErrorCode};

/// An error inside a response body: hyper aborts the connection instead of ending the body, so
/// the client sees a broken transfer, never a clean short or wrong one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

pub type Body = UnsyncBoxBody<Bytes, BodyError>;

pub const API_VERSION: &str = "Docker-Distribution-Api-Version";
pub const CONTENT_DIGEST: &str = "Docker-Content-Digest";
const JSON: &str = "application/json; charset=utf-8";

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body fed by a stream of frames; an error item aborts the connection.
pub fn stream<S, E>(s: S) -> Body
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let frames = s.map(|r| r.map(Frame::data).map_err(|e| BodyError(e.to_string())));
    BodyExt::boxed_unsync(StreamBody::new(frames))
}

pub fn oci_error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    let body = error_body(code, message);
    let mut resp = Response::new(full(body.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}

/// The status to send when the origin answered `status` to us: what clients need in order to
/// authenticate themselves (401 with the challenge) or to fall back (404, 5xx).
pub fn code_for_upstream(status: StatusCode, kind: ContentKind) -> ErrorCode {
    match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Denied,
        StatusCode::NOT_FOUND => match kind {
            ContentKind::Manifest => ErrorCode::ManifestUnknown,
            ContentKind::Blob => ErrorCode::BlobUnknown,
        },
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::TooManyRequests,
        _ => ErrorCode::Unavailable,
    }
}

/// Relays an upstream refusal: its status and every `WWW-Authenticate` challenge (so that
/// containerd and docker fetch a token themselves and come back), with an OCI error body.
pub fn relay_refusal(upstream: &reqwest::Response, kind: ContentKind) -> Response<Body> {
    let status = upstream.status();
    // Statuses the client could mistake for success or a redirect must not pass through.
    let status = if status.is_client_error() || status.is_server_error() { status } else { StatusCode::BAD_GATEWAY };
    let code = code_for_upstream(status, kind);
    let mut resp = oci_error(status, code, &format!("origin answered {}", upstream.status()));
    for v in upstream.headers().get_all(WWW_AUTHENTICATE) {
        resp.headers_mut().append(WWW_AUTHENTICATE, v.clone());
    }
    if let Some(v) = upstream.headers().get("retry-after") {
        resp.headers_mut().insert("retry-after", v.clone());
    }
    resp
}

/// The origin could not be reached or misbehaved: 502, which every client (nydusd's mirror
/// mode included) treats as "try the next source".
pub fn bad_gateway(message: &str) -> Response<Body> {
    oci_error(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, message)
}
