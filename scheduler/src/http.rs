//! HTTP beside the gRPC port: `/healthy` for load balancers and `/metrics` for Prometheus.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::scheduler::Scheduler;

/// Connections still open this long after shutdown was asked for are dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) fn route(path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    match path {
        "/healthy" => text(StatusCode::OK, "OK".into()),
        "/metrics" => match metrics.encode() {
            Ok(body) => {
                let mut resp = text(StatusCode::OK, body);
                resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
                resp
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        _ => text(StatusCode::NOT_FOUND, "not found".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Serves `route` on `listener` until `shutdown`, then drains open connections briefly.
pub(crate) async fn serve(listener: TcpListener, scheduler: Scheduler, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set stays as large as the open connections.
        while conns.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let scheduler = scheduler.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let resp = route(req.uri().path(), scheduler.metrics());
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
        conns.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::debug!(open = conns.len(), "dropping http connections open after the drain timeout");
    }
    conns.shutdown().await;
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
    async fn routes_answer_health_metrics_and_not_found() {
        let m = Metrics::new();
        let health = route("/healthy", &m);
        assert_eq!(health.status(), StatusCode::OK);
        assert_eq!(body(health).await, "OK");
        let metrics = route("/metrics", &m);
        assert_eq!(metrics.headers()[CONTENT_TYPE], OPENMETRICS);
        assert!(body(metrics).await.contains("damselfly_scheduler_hosts"));
        assert_eq!(route("/other", &m).status(), StatusCode::NOT_FOUND);
    }
}
