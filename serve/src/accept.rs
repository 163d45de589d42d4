//! Serving HTTP on a bound listener until a shutdown signal: the one loop behind every server
//! of the project (the mirror API, health, metrics, the piece upload server, and the
//! scheduler's HTTP port).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Request heads larger than this are refused (431) before any routing.
const MAX_HEAD_BYTES: usize = 32 << 10;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections still open this long after shutdown was asked for are dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `handler` on `listener` (HTTP/1.1 and HTTP/2) until `shutdown`; then drains open
/// connections for a few seconds and ends the rest.
pub async fn serve<H, F, B>(listener: TcpListener, handler: H, shutdown: CancellationToken)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_with(listener, None, handler, shutdown).await;
}

/// [`serve`], with each connection's TLS handshake (when `tls` is given) done in the
/// connection's own task, so that a slow or silent client holds up nobody else.
pub async fn serve_with<H, F, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set stays as large as the open connections.
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = Conn { tls: tls.clone(), builder: builder.clone(), watcher: graceful.watcher(), peer };
        conns.spawn(conn.serve(stream, svc, shutdown.clone()));
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::info!(open = conns.len(), "dropping connections still open after the drain timeout");
    }
    // Ends whatever is left, so that nothing of the daemon outlives its shutdown.
    conns.shutdown().await;
}

/// One accepted connection, served in its own task: its TLS handshake if any, then HTTP.
struct Conn {
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
    peer: SocketAddr,
}

impl Conn {
    async fn serve<S, B>(self, stream: TcpStream, svc: S, shutdown: CancellationToken)
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Conn { tls, builder, watcher, peer } = self;
        let Some(tls) = tls else {
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
            return log_end(peer, conn.await);
        };
        // A handshake left unfinished neither holds up shutdown nor lasts past its timeout.
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            done = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)) => match done {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            },
        };
        let conn = watcher.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
        log_end(peer, conn.await);
    }
}

fn log_end<E: std::fmt::Display>(peer: SocketAddr, ended: Result<(), E>) {
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
