//! `/healthy` and `/metrics`, answered alike on every port that has them.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;
use prometheus_client::encoding::text::encode_eof;

/// The content type of the OpenMetrics text format `prometheus-client` writes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A health check at one of `paths`: 200 `OK`; anything else is 404.
pub fn health(path: &str, paths: &[&str]) -> Response<Full<Bytes>> {
    match paths.contains(&path) {
        true => text(StatusCode::OK, "OK"),
        false => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `/metrics`: what `encode` writes (metric families, without the end marker), in the
/// OpenMetrics text format; any other path is 404.
pub fn metrics(path: &str, encode: impl FnOnce(&mut String) -> std::fmt::Result) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let mut out = String::new();
    if let Err(e) = encode(&mut out).and_then(|()| encode_eof(&mut out)) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    let mut resp = Response::new(Full::new(Bytes::from(out)));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    resp
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(resp: Response<Full<Bytes>>) -> String {
        let bytes = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn health_answers_its_paths_only() {
        let ok = health("/healthy", &["/healthy", "/server/ping"]);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(body(ok).await, "OK");
        assert_eq!(health("/server/ping", &["/healthy", "/server/ping"]).status(), StatusCode::OK);
        assert_eq!(health("/metrics", &["/healthy"]).status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text_with_an_end_marker() {
        let resp = metrics("/metrics", |out| {
            out.push_str("# TYPE x counter\n");
            Ok(())
        });
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], OPENMETRICS);
        assert_eq!(body(resp).await, "# TYPE x counter\n# EOF\n");
        assert_eq!(metrics("/other", |_| Ok(())).status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_failing_encoder_is_a_server_error() {
        let resp = metrics("/metrics", |_| Err(std::fmt::Error));
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
