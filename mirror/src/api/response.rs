//! Building responses: bodies that stream or abort, and OCI error JSON (which errors get it is
//! decided in `error.rs`).

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::oci::{error_body, ErrorCode};

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
