//! HTTP beside the gRPC port: `/healthy` for load balancers and `/metrics` for Prometheus,
//! served by the project's one serving loop (`damselfly-serve`).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// `/healthy` and `/metrics`; 404 elsewhere.
pub fn route(path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => damselfly_serve::metrics(path, |out| metrics.encode_families(out)),
        _ => damselfly_serve::health(path, &["/healthy"]),
    }
}

/// Serves [`route`] on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, scheduler: Scheduler, shutdown: CancellationToken) {
    let handler = move |req: Request<Incoming>| {
        let resp = route(req.uri().path(), scheduler.metrics());
        async move { resp }
    };
    damselfly_serve::serve(listener, handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONTENT_TYPE;
    use http::StatusCode;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn routes_answer_health_metrics_and_not_found() {
        let m = Metrics::new();
        assert_eq!(route("/healthy", &m).status(), StatusCode::OK);
        let metrics = route("/metrics", &m);
        assert_eq!(metrics.headers()[CONTENT_TYPE], damselfly_serve::OPENMETRICS);
        let text = metrics.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        assert!(String::from_utf8_lossy(&text).contains("damselfly_scheduler_hosts"));
        assert_eq!(route("/other", &m).status(), StatusCode::NOT_FOUND);
    }
}
