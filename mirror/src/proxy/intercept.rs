//! HTTPS interception: a `CONNECT` to a host configured for it is answered with TLS the daemon
//! terminates (a certificate its CA mints for the host), and each HTTP/1.1 request inside is
//! handled as an absolute-form request to `https://host:port`: registry reads matching the
//! rules through the cache, the rest forwarded over TLS to the real host, whose certificate
//! is verified.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use damselfly_serve::{until_idle, Activity, Watched};
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_rustls::TlsAcceptor;

use super::tunnel::{connected, DRAIN_TIMEOUT, IDLE_TIMEOUT};
use super::{Client, Proxy, ProxyError, Target};
use crate::api::response::Body;

/// Request heads inside a tunnel are held to about what the mirror port takes.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Proxy {
    pub(super) async fn intercept<B: Send + 'static>(
        self: Arc<Self>,
        req: Request<B>,
        authority: Authority,
        port: u16,
        client: Client,
    ) -> Result<Response<Body>, ProxyError> {
        let host = authority.host().to_owned();
        // Refused now, not request by request inside: the client learns it from the CONNECT.
        self.reach("https", &host, port, client)?;
        let slot = self.tunnels.take(client.ip)?;
        let ca = self.ca.clone().ok_or_else(|| ProxyError::Intercept(host.clone(), "no CA".to_owned()))?;
        let tls = ca.server_config(&host).map_err(|e| ProxyError::Intercept(host.clone(), e))?;
        let shutdown = self.shutdown.clone();
        let proxy = self.clone();
        self.take_over(req, slot, move |upgraded| async move {
            let activity = Activity::new();
            let io = Watched::new(TokioIo::new(upgraded), activity.clone());
            let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(tls).accept(io)).await;
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%authority, error = %e, "intercepted TLS handshake failed"),
                Err(_) => return tracing::debug!(%authority, "intercepted TLS handshake timed out"),
            };
            let svc = hyper::service::service_fn(move |inner: Request<Incoming>| {
                let (proxy, authority) = (proxy.clone(), authority.clone());
                async move { Ok::<_, Infallible>(proxy.inner(inner, &authority, client).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), svc);
            let drain = |conn: std::pin::Pin<&mut _>| {
                hyper::server::conn::http1::Connection::graceful_shutdown(conn);
                true
            };
            until_idle(std::pin::pin!(conn), &activity, IDLE_TIMEOUT, &shutdown, drain, DRAIN_TIMEOUT).await;
        });
        Ok(connected())
    }

    /// One request inside an intercepted tunnel to `authority`.
    async fn inner(&self, req: Request<Incoming>, authority: &Authority, client: Client) -> Response<Body> {
        let (kind, answer) = self.inner_answer(req, authority, client).await;
        self.respond(kind, answer)
    }

    async fn inner_answer(
        &self,
        mut req: Request<Incoming>,
        authority: &Authority,
        client: Client,
    ) -> (&'static str, Result<Response<Body>, ProxyError>) {
        if req.method() == http::Method::CONNECT {
            return ("refused", Err(ProxyError::NotInTunnel(http::Method::CONNECT)));
        }
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        // The default port is left out, as clients write the URL (and the Host header) too.
        let authority = match authority.port_u16() {
            Some(443) => authority.host(),
            _ => authority.as_str(),
        };
        let Ok(uri) = format!("https://{authority}{target}").parse::<Uri>() else {
            return ("refused", Err(ProxyError::BadRequest("the request's target is not a valid path")));
        };
        *req.uri_mut() = uri;
        match Target::of(req.uri(), true) {
            Ok(target) => self.serve_target(req, target, client).await,
            Err(e) => ("refused", Err(e)),
        }
    }
}
