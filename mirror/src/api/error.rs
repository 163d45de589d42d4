//! Why a request is answered with an error instead of content. Handlers return an [`ApiError`];
//! `App::handle` turns it into a response in one place ([`ApiError::into_response`]), with the
//! status a client acts on and an OCI error body.

use http::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use super::response::{oci_error, Body};
use crate::oci::{unsatisfied_content_range, ContentKind, ErrorCode, RouteError};
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Anything but GET and HEAD.
    #[error("this mirror serves pulls only")]
    Method,
    /// The path or its query is not one the pull API has, or names nothing valid.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The registry the request names cannot be used.
    #[error(transparent)]
    Registry(UpstreamError),
    /// The `Range` header does not parse.
    #[error("malformed Range header")]
    BadRange,
    /// The range lies outside content of `len` bytes.
    #[error("range not satisfiable")]
    Unsatisfiable { len: u64 },
    /// The origin refused; its status, and what the client needs to act on it, are relayed.
    #[error("origin answered {}", .0.status)]
    Refused(Refusal),
    /// The origin could not be reached, or what it said cannot be served: 502, which every
    /// client (nydusd's mirror mode included) treats as "try the next source".
    #[error("{0}")]
    Origin(String),
    /// The registry the request names said it holds the content and failed to show it
    /// (`proof.rs`): to this client the content is unknown there.
    #[error("the registry named by the request does not hold this content")]
    Disproved(ContentKind),
}

/// An origin's refusal, as the client must see it: containerd and docker fetch a token
/// themselves after a 401 with its challenges, and a client told to slow down (429) learns
/// when it may ask again.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    kind: ContentKind,
    challenges: Vec<HeaderValue>,
    retry_after: Option<HeaderValue>,
}

impl ApiError {
    /// The origin answered `status` with `headers` to a request for content of `kind`.
    pub fn refused(status: StatusCode, headers: &HeaderMap, kind: ContentKind) -> Self {
        ApiError::Refused(Refusal {
            status,
            kind,
            challenges: headers.get_all(WWW_AUTHENTICATE).iter().cloned().collect(),
            retry_after: headers.get(RETRY_AFTER).cloned(),
        })
    }

    pub fn origin(message: impl Into<String>) -> Self {
        ApiError::Origin(message.into())
    }

    pub fn into_response(self) -> Response<Body> {
        let message = self.to_string();
        match self {
            ApiError::Method => oci_error(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported, &message),
            ApiError::Route(e) => {
                let (status, code) = e.status_and_code();
                oci_error(status, code, &message)
            }
            ApiError::Registry(_) => oci_error(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, &message),
            ApiError::BadRange => oci_error(StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::RangeInvalid, &message),
            ApiError::Unsatisfiable { len } => {
                let mut resp = oci_error(StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::RangeInvalid, &message);
                if let Ok(v) = HeaderValue::from_str(&unsatisfied_content_range(len)) {
                    resp.headers_mut().insert(CONTENT_RANGE, v);
                }
                resp
            }
            ApiError::Refused(r) => r.into_response(),
            ApiError::Origin(_) => oci_error(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, &message),
            ApiError::Disproved(kind) => {
                oci_error(StatusCode::NOT_FOUND, code_for_upstream(StatusCode::NOT_FOUND, kind), &message)
            }
        }
    }
}

impl Refusal {
    fn into_response(self) -> Response<Body> {
        // Statuses the client could mistake for success or a redirect must not pass through.
        let relayed = self.status.is_client_error() || self.status.is_server_error();
        let status = if relayed { self.status } else { StatusCode::BAD_GATEWAY };
        let code = code_for_upstream(status, self.kind);
        let mut resp = oci_error(status, code, &format!("origin answered {}", self.status));
        for v in self.challenges {
            resp.headers_mut().append(WWW_AUTHENTICATE, v);
        }
        if let Some(v) = self.retry_after {
            resp.headers_mut().insert(RETRY_AFTER, v);
        }
        resp
    }
}

/// The error code for a status the origin answered: what clients need in order to
/// authenticate themselves (401 with the challenge) or to fall back (404, 5xx).
fn code_for_upstream(status: StatusCode, kind: ContentKind) -> ErrorCode {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_its_challenges_and_retry_after() {
        let mut h = HeaderMap::new();
        h.append(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"a\""));
        h.append(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"b\""));
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let resp = ApiError::refused(StatusCode::UNAUTHORIZED, &h, ContentKind::Blob).into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers().get_all(WWW_AUTHENTICATE).iter().count(), 2);
        assert_eq!(resp.headers()[RETRY_AFTER], "7");
    }

    #[test]
    fn an_origin_success_or_redirect_is_never_relayed_as_a_refusal() {
        for status in [StatusCode::OK, StatusCode::TEMPORARY_REDIRECT] {
            let resp = ApiError::refused(status, &HeaderMap::new(), ContentKind::Manifest).into_response();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        }
    }

    #[test]
    fn a_missing_manifest_and_a_missing_blob_have_their_own_codes() {
        assert_eq!(code_for_upstream(StatusCode::NOT_FOUND, ContentKind::Manifest), ErrorCode::ManifestUnknown);
        assert_eq!(code_for_upstream(StatusCode::NOT_FOUND, ContentKind::Blob), ErrorCode::BlobUnknown);
    }

    #[test]
    fn an_unsatisfiable_range_names_the_length() {
        let resp = ApiError::Unsatisfiable { len: 10 }.into_response();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(resp.headers()[CONTENT_RANGE], "bytes */10");
    }
}
