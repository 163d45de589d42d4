//! `CONNECT host:port`: the upstream connection is made (within the destination rules) before
//! the client is told 200, then bytes flow both ways untouched until either side closes, the
//! tunnel moves nothing for the idle timeout, or the daemon shuts down. Hosts configured for
//! interception go to `intercept.rs` instead.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use damselfly_serve::{until_idle, Activity, Watched};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use super::{Client, Proxy, ProxyError};
use crate::api::response::{empty, Body};

/// A tunnel that moves no byte for this long is closed, as idle connections are.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// What a tunnel asked to finish at shutdown gets before it is dropped, as connections get.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Tunnels open at once; more are refused (503).
const MAX_TUNNELS: usize = 1024;
/// Tunnels one client address may hold open at once.
const MAX_TUNNELS_PER_CLIENT: usize = 64;

impl Proxy {
    /// A `CONNECT`: intercepted for the hosts configured so, else tunnelled.
    pub(super) async fn connect<B: Send + 'static>(
        self: Arc<Self>,
        req: Request<B>,
        client: Client,
    ) -> (&'static str, Result<Response<Body>, ProxyError>) {
        let (authority, port) = match connect_target(&req) {
            Ok(a) => a,
            Err(e) => return ("refused", Err(e)),
        };
        match self.intercept.covers(authority.host()) {
            true => ("intercept", self.intercept(req, authority, port, client).await),
            false => ("tunnel", self.tunnel(req, authority, port, client).await),
        }
    }

    async fn tunnel<B: Send + 'static>(
        &self,
        req: Request<B>,
        authority: Authority,
        port: u16,
        client: Client,
    ) -> Result<Response<Body>, ProxyError> {
        let host = authority.host().to_owned();
        let slot = self.tunnels.take(client.ip)?;
        let reach = self.reach("https", &host, port, client)?;
        let upstream = self
            .app
            .upstream
            .connect(&host, port, reach)
            .await
            .map_err(|e| ProxyError::Unreachable(authority.to_string(), e))?;
        let shutdown = self.shutdown.clone();
        self.take_over(req, slot, move |upgraded| async move {
            let activity = Activity::new();
            let mut upstream = Watched::new(upstream, activity.clone());
            let mut client = TokioIo::new(upgraded);
            let copy = std::pin::pin!(tokio::io::copy_bidirectional(&mut client, &mut upstream));
            // At shutdown a tunnel has nothing to finish: it ends at once.
            let ended = until_idle(copy, &activity, IDLE_TIMEOUT, &shutdown, |_| false, DRAIN_TIMEOUT).await;
            if let Some(Err(e)) = ended {
                tracing::debug!(%authority, error = %e, "tunnel ended with an error");
            }
        });
        Ok(connected())
    }
}

/// Tunnels open at once, by client address (the total is their sum).
#[derive(Default)]
pub(super) struct TunnelSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open tunnel, given back when dropped.
pub(super) struct Slot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl TunnelSlots {
    /// A slot for a tunnel of `ip`, or `Busy` when all of them, or all of its own, are taken.
    pub(super) fn take(&self, ip: IpAddr) -> Result<Slot, ProxyError> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        let own = open.entry(ip).or_insert(0);
        if total >= MAX_TUNNELS || *own >= MAX_TUNNELS_PER_CLIENT {
            return Err(ProxyError::Busy);
        }
        *own += 1;
        Ok(Slot { ip, open: self.0.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(own) = open.get_mut(&self.ip) {
            *own -= 1;
            if *own == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Proxy {
    /// Once the 200 is sent, hands the client's connection to `work`, in a task of its own
    /// (tracked, for shutdown) that holds `slot` until it ends.
    pub(super) fn take_over<B, F, Fut>(&self, req: Request<B>, slot: Slot, work: F)
    where
        B: Send + 'static,
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.running.spawn(async move {
            let _slot = slot;
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => work(upgraded).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
    }
}

/// `CONNECT host:port`'s authority and port; a port is required and nothing else is allowed.
fn connect_target<B>(req: &Request<B>) -> Result<(Authority, u16), ProxyError> {
    let authority = req.uri().authority().cloned().ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    let port = authority.port_u16().ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    if req.uri().path_and_query().is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty()) {
        return Err(ProxyError::BadRequest("CONNECT takes host:port only"));
    }
    Ok((authority, port))
}

/// The answer that hands the connection over to the tunnel.
pub(super) fn connected() -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_holds_at_most_its_share_of_tunnels() {
        let slots = TunnelSlots::default();
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let mut held: Vec<Slot> = (0..MAX_TUNNELS_PER_CLIENT).map(|_| slots.take(a).expect("slot")).collect();
        assert!(matches!(slots.take(a), Err(ProxyError::Busy)));
        assert!(slots.take(b).is_ok(), "another client is served");
        held.pop();
        assert!(slots.take(a).is_ok(), "a closed tunnel gives its slot back");
    }
}
