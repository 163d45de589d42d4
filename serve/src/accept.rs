//! Serving HTTP on a bound listener until a shutdown signal: the one loop behind every server
//! of the project (the mirror API, health, metrics, the piece upload server, and the
//! scheduler's HTTP port). Each request carries its client's address ([`PeerAddr`]), and a
//! handler may take over an HTTP/1 connection (`CONNECT`) with `hyper::upgrade::on`; what it
//! does with the upgraded stream is its own to stop at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::activity::{until_idle, Activity, Limits, Watched};

/// Request heads larger than this are refused (431) before any routing.
const MAX_HEAD_BYTES: usize = 32 << 10;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections still open this long after shutdown was asked for are dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The address of the client that sent a request, in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Serves `handler` on `listener` (HTTP/1.1 and HTTP/2) until `shutdown`; then drains open
/// connections for a few seconds and ends the rest, within the default [`Limits`].
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
    serve_limited(listener, tls, Limits::default(), handler, shutdown).await;
}

/// [`serve_with`] within `limits`.
pub async fn serve_limited<H, F, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
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
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set stays as large as the open connections.
        while conns.try_join_next().is_some() {}
        // At the cap, new connections wait in the backlog: the daemon keeps its descriptors.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
        let svc = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let conn = Conn { tls: tls.clone(), builder: builder.clone(), peer, permit, idle: limits.idle_timeout };
        conns.spawn(conn.serve(stream, svc, shutdown.clone()));
    }
    drop(listener);
    // Each connection finishes what it is answering on its own (see `Conn::serve`).
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(open = conns.len(), "dropping connections still open after the drain timeout");
    }
    // Ends whatever is left, so that nothing of the daemon outlives its shutdown.
    conns.shutdown().await;
}

/// One accepted connection, served in its own task: its TLS handshake if any, then HTTP.
struct Conn {
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    peer: SocketAddr,
    /// Held while the connection is open (see [`Limits`]).
    permit: OwnedSemaphorePermit,
    idle: Duration,
}

impl Conn {
    async fn serve<S, B>(self, stream: TcpStream, svc: S, shutdown: CancellationToken)
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Conn { tls, builder, peer, permit: _permit, idle } = self;
        let activity = Activity::new();
        let stream = Watched::new(stream, activity.clone());
        let Some(tls) = tls else {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            return log_end(peer, run(std::pin::pin!(conn), &activity, idle, &shutdown).await);
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
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        log_end(peer, run(std::pin::pin!(conn), &activity, idle, &shutdown).await);
    }
}

/// Serves `conn` until it ends or sits idle; at `shutdown` it finishes what it is answering
/// and takes nothing new, for at most the drain timeout.
async fn run<I, S, B>(
    conn: Pin<&mut auto::UpgradeableConnection<'_, I, S, TokioExecutor>>,
    activity: &Activity,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let drain = |conn: Pin<&mut auto::UpgradeableConnection<'_, I, S, TokioExecutor>>| {
        conn.graceful_shutdown();
        true
    };
    until_idle(conn, activity, idle, shutdown, drain, DRAIN_TIMEOUT).await.unwrap_or(Ok(()))
}

fn log_end<E: std::fmt::Display>(peer: SocketAddr, ended: Result<(), E>) {
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let stop = CancellationToken::new();
        let handler = |_req: Request<Incoming>| async { Response::new(http_body_util::Full::new(Bytes::from("ok"))) };
        tokio::spawn(serve_limited(listener, None, limits, handler, stop.clone()));
        (addr, stop)
    }

    async fn get(stream: &mut TcpStream) -> String {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (addr, stop) = start(Limits { max_connections: 8, idle_timeout: Duration::from_millis(300) }).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        assert!(get(&mut c).await.starts_with("HTTP/1.1 200"));
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("closed in time");
        assert_eq!(closed.expect("clean close"), 0);
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_one_to_close() {
        let (addr, stop) = start(Limits { max_connections: 2, idle_timeout: Duration::from_secs(60) }).await;
        let mut first = TcpStream::connect(addr).await.expect("connect");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        assert!(get(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(get(&mut second).await.starts_with("HTTP/1.1 200"));
        let mut third = TcpStream::connect(addr).await.expect("the backlog takes it");
        let waiting = tokio::time::timeout(Duration::from_millis(300), get(&mut third)).await;
        assert!(waiting.is_err(), "a third connection was served past the cap");
        drop(first);
        let served = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = vec![0u8; 1024];
            let n = third.read(&mut buf).await.expect("read");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert!(served.await.expect("served once a slot freed").starts_with("HTTP/1.1 200"));
        stop.cancel();
    }
}
