//! `CONNECT host:port`: the upstream connection is made (within the destination rules) before
//! the client is told 200, then bytes flow both ways untouched until either side closes, the
//! tunnel moves nothing for the idle timeout, or the daemon shuts down. Hosts configured for
//! interception go to `intercept.rs` instead.

use std::sync::Arc;
use std::time::Duration;

use damselfly_serve::{Activity, Watched};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{Proxy, ProxyError};
use crate::api::response::{empty, Body};

/// A tunnel that moves no byte for this long is closed, as idle connections are.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

impl Proxy {
    /// A `CONNECT`: intercepted for the hosts configured so, else tunnelled.
    pub(super) async fn connect<B: Send + 'static>(
        self: Arc<Self>,
        req: Request<B>,
        local: bool,
    ) -> (&'static str, Result<Response<Body>, ProxyError>) {
        let authority = match connect_target(&req) {
            Ok(a) => a,
            Err(e) => return ("refused", Err(e)),
        };
        match self.intercept.covers(authority.host()) {
            true => ("intercept", self.intercept(req, authority, local).await),
            false => ("tunnel", self.tunnel(req, authority, local).await),
        }
    }

    async fn tunnel<B: Send + 'static>(
        &self,
        req: Request<B>,
        authority: Authority,
        local: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let port = authority.port_u16().ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
        let host = authority.host().to_owned();
        let slot = self.tunnels.clone().try_acquire_owned().map_err(|_| ProxyError::Busy)?;
        let reach = self.reach(&host, port, local)?;
        let upstream = self
            .app
            .upstream
            .connect(&host, port, reach)
            .await
            .map_err(|e| ProxyError::Unreachable(authority.to_string(), e))?;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
            };
            let activity = Activity::new();
            let mut upstream = Watched::new(upstream, activity.clone());
            let mut client = TokioIo::new(upgraded);
            let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
            let mut copy = std::pin::pin!(copy);
            loop {
                let left = IDLE_TIMEOUT.saturating_sub(activity.idle());
                if left.is_zero() {
                    return tracing::debug!(%authority, "closing an idle tunnel");
                }
                tokio::select! {
                    done = copy.as_mut() => {
                        if let Err(e) = done {
                            tracing::debug!(%authority, error = %e, "tunnel ended with an error");
                        }
                        return;
                    }
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(left) => {}
                }
            }
        });
        Ok(connected())
    }
}

/// `CONNECT host:port`'s authority; a port is required and nothing else is allowed.
fn connect_target<B>(req: &Request<B>) -> Result<Authority, ProxyError> {
    let authority = req.uri().authority().cloned().ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    authority.port_u16().ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    if req.uri().path_and_query().is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty()) {
        return Err(ProxyError::BadRequest("CONNECT takes host:port only"));
    }
    Ok(authority)
}

/// The answer that hands the connection over to the tunnel.
pub(super) fn connected() -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}
