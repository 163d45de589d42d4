//! Content in an upstream registry (a blob, or a manifest by digest) as a [`Source`] for the
//! piece store, fetched with the credentials of the request that started the fetch.

use std::ops::Range;
use std::sync::Arc;

use damselfly_p2p::{Source, SourceError, SourceResponse, SourceSpec};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{HeaderValue, CONTENT_RANGE, RANGE};
use http::{HeaderMap, Method, StatusCode};

use super::{App, Target};
use crate::oci::ContentKind;

/// A blob or manifest in an upstream registry, as a [`Source`] for the piece store.
pub struct UpstreamSource {
    pub app: Arc<App>,
    pub target: Target,
    pub fetching: Fetching,
}

/// What an [`UpstreamSource`] fetches, and with whose credentials.
#[derive(Clone)]
pub enum Fetching {
    /// A blob, for a client, with its credentials (or the daemon's configured ones).
    Blob,
    /// A blob, for whichever node registered the task (a seed's fetch): only what the origin
    /// gives anyone, so that a stranger cannot make a seed pull private content with its
    /// credentials.
    SeedBlob,
    /// A manifest by digest, for a client, with the media types it accepts.
    Manifest { accept: Vec<HeaderValue> },
}

impl UpstreamSource {
    pub fn blob(app: Arc<App>, target: Target) -> Self {
        UpstreamSource { app, target, fetching: Fetching::Blob }
    }

    pub fn for_seed(app: Arc<App>, target: Target) -> Self {
        UpstreamSource { app, target, fetching: Fetching::SeedBlob }
    }

    pub fn manifest(app: Arc<App>, target: Target, accept: Vec<HeaderValue>) -> Self {
        UpstreamSource { app, target, fetching: Fetching::Manifest { accept } }
    }

    async fn get(
        app: Arc<App>,
        target: Target,
        fetching: Fetching,
        range: Option<Range<u64>>,
    ) -> Result<SourceResponse, SourceError> {
        let mut headers = HeaderMap::new();
        if let Fetching::Manifest { accept } = &fetching {
            for v in accept {
                headers.append(http::header::ACCEPT, v.clone());
            }
        }
        if let Some(r) = &range {
            let v = format!("bytes={}-{}", r.start, r.end - 1);
            headers.insert(RANGE, HeaderValue::from_str(&v).map_err(|e| SourceError::fatal(e.to_string()))?);
        }
        let kind = match fetching {
            Fetching::Manifest { .. } => ContentKind::Manifest,
            Fetching::Blob | Fetching::SeedBlob => ContentKind::Blob,
        };
        app.metrics.origin(match (kind, range.is_some()) {
            (ContentKind::Manifest, _) => "manifest",
            (ContentKind::Blob, true) => "blob_range",
            (ContentKind::Blob, false) => "blob",
        });
        let mut req = target.request(Method::GET, kind, headers);
        req.anonymous = matches!(fetching, Fetching::SeedBlob);
        let reply = app
            .upstream
            .send(req)
            .await
            .map_err(|e| SourceError { retryable: e.is_retryable(), message: format!("origin request failed: {e}") })?;
        let resp = reply.response;
        let range_honoured = match resp.status() {
            StatusCode::OK => false,
            StatusCode::PARTIAL_CONTENT => {
                let want = range.as_ref().map(|r| format!("bytes {}-", r.start));
                let got = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok());
                if want.is_none() || !got.is_some_and(|g| g.starts_with(want.as_deref().unwrap_or(""))) {
                    return Err(SourceError::fatal(format!("origin answered a range we did not ask for: {got:?}")));
                }
                true
            }
            s => {
                let retryable =
                    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT;
                return Err(SourceError { retryable, message: format!("origin answered {s}") });
            }
        };
        let body = resp.bytes_stream().map_err(|e| SourceError::retryable(format!("origin body failed: {e}"))).boxed();
        Ok(SourceResponse { range_honoured, body })
    }
}

impl Source for UpstreamSource {
    fn fetch(&self, range: Option<Range<u64>>) -> BoxFuture<'static, Result<SourceResponse, SourceError>> {
        Box::pin(Self::get(self.app.clone(), self.target.clone(), self.fetching.clone(), range))
    }

    fn supplier(&self) -> Option<String> {
        Some(self.target.registry.id().to_string())
    }

    fn describe(&self) -> Option<SourceSpec> {
        use crate::upstream::SchemePolicy;
        // Seeds fetch blobs; a manifest is small and its node fetches it from the origin itself.
        if let Fetching::Manifest { .. } = self.fetching {
            return None;
        }
        let r = &self.target.registry;
        let (scheme, insecure) = match r.scheme {
            SchemePolicy::Https => ("https", false),
            SchemePolicy::Http => ("http", true),
            SchemePolicy::InsecureHttpsThenHttp => ("https", true),
        };
        let credential = self.target.client_auth.as_ref().and_then(short_lived);
        Some(SourceSpec {
            registry: format!("{scheme}://{}", r.host),
            repository: self.target.repo.clone(),
            insecure,
            credential,
        })
    }
}

/// The client's `Authorization` if a seed may have it: only a Bearer token, which is scoped to
/// one repository and expires within minutes, where a Basic header would hand out a password.
fn short_lived(auth: &HeaderValue) -> Option<String> {
    let v = auth.to_str().ok()?;
    let scheme = v.get(..7)?;
    (scheme.eq_ignore_ascii_case("bearer ") && v.len() > 7).then(|| v.to_owned())
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    #[test]
    fn only_bearer_tokens_are_passed_to_seeds() {
        let v = |s: &str| HeaderValue::from_str(s).expect("header");
        assert_eq!(short_lived(&v("Bearer abc")).as_deref(), Some("Bearer abc"));
        assert_eq!(short_lived(&v("bearer abc")).as_deref(), Some("bearer abc"));
        assert_eq!(short_lived(&v("Basic YWxpY2U6c2VjcmV0")), None);
        assert_eq!(short_lived(&v("Bearer ")), None);
        assert_eq!(short_lived(&v("Bear")), None);
    }
}
