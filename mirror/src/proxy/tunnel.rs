//! `CONNECT host:port`: the upstream connection is made (within the destination rules) before
//! the client is told 200, then bytes flow both ways untouched until either side closes, the
//! tunnel moves nothing for the idle timeout, or the daemon shuts down. Hosts configured for
//! interception go to `intercept.rs` instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use damselfly_serve::{Activity, Watched};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{Proxy, ProxyError};
use crate::api::response::{empty, Body};

/// A tunnel that moves no byte for this long is closed, as idle connections are.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

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
        take_over(req, slot, move |upgraded| async move {
            let activity = Activity::new();
            let mut upstream = Watched::new(upstream, activity.clone());
            let mut client = TokioIo::new(upgraded);
            let copy = std::pin::pin!(tokio::io::copy_bidirectional(&mut client, &mut upstream));
            if let Some(Err(e)) = until_idle(copy, &activity, &shutdown, |_| false).await {
                tracing::debug!(%authority, error = %e, "tunnel ended with an error");
            }
        });
        Ok(connected())
    }
}

/// Once the 200 is sent, hands the client's connection to `work`, in a task of its own that
/// holds `slot` (one of the tunnels allowed at once) until it ends.
pub(super) fn take_over<B, F, Fut>(req: Request<B>, slot: OwnedSemaphorePermit, work: F)
where
    B: Send + 'static,
    F: FnOnce(Upgraded) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let _slot = slot;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => work(upgraded).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
}

/// Drives `work` until it ends (its output), or until nothing moved for the idle timeout
/// (`activity`), or the daemon shuts down (`None`). At shutdown `drain` is called once; it
/// says whether to go on driving `work` (to let it finish gracefully) or to drop it now.
pub(super) async fn until_idle<F: Future>(
    mut work: Pin<&mut F>,
    activity: &Activity,
    shutdown: &CancellationToken,
    mut drain: impl FnMut(Pin<&mut F>) -> bool,
) -> Option<F::Output> {
    let mut draining = false;
    loop {
        let left = IDLE_TIMEOUT.saturating_sub(activity.idle());
        if left.is_zero() {
            tracing::debug!("closing an idle tunnel");
            return None;
        }
        tokio::select! {
            done = work.as_mut() => return Some(done),
            _ = shutdown.cancelled(), if !draining => {
                if !drain(work.as_mut()) {
                    return None;
                }
                draining = true;
            }
            _ = tokio::time::sleep(left) => {}
        }
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
