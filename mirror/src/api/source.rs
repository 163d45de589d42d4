//! A blob in an upstream registry as a [`Source`] for the piece store, fetched with the
//! credentials of the request that started the fetch.

use std::ops::Range;
use std::sync::Arc;

use damselfly_p2p::{Source, SourceError, SourceResponse};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{HeaderValue, CONTENT_RANGE, RANGE};
use http::{HeaderMap, Method, StatusCode};

use super::{App, Target};

pub struct UpstreamBlob {
    pub app: Arc<App>,
    pub target: Target,
}

impl UpstreamBlob {
    async fn get(app: Arc<App>, target: Target, range: Option<Range<u64>>) -> Result<SourceResponse, SourceError> {
        let mut headers = HeaderMap::new();
        if let Some(r) = &range {
            let v = format!("bytes={}-{}", r.start, r.end - 1);
            headers.insert(RANGE, HeaderValue::from_str(&v).map_err(|e| SourceError::fatal(e.to_string()))?);
        }
        app.metrics.origin(if range.is_some() { "blob_range" } else { "blob" });
        let req = target.request(Method::GET, "blobs", headers);
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

impl Source for UpstreamBlob {
    fn fetch(&self, range: Option<Range<u64>>) -> BoxFuture<'static, Result<SourceResponse, SourceError>> {
        Box::pin(Self::get(self.app.clone(), self.target.clone(), range))
    }
}
