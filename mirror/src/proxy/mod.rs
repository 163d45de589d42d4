//! The mirror port as an HTTP forward proxy, for clients configured with a proxy rather than a
//! mirror (nydusd's `proxy` backend, dockerd and others with `HTTP_PROXY`).
//!
//! - An absolute-form request (`GET http://registry/v2/<repo>/blobs/<digest>`) names its
//!   registry in the request line. Registry API paths that match the rules (regular
//!   expressions, default `blobs/sha256.*`) are answered by the mirror API as if the client had
//!   named that registry in `X-Dragonfly-Registry`: the same piece cache, peers, access checks
//!   and verification. Anything else is forwarded as it is, streaming both ways ([`forward`]).
//! - `CONNECT host:port` is tunnelled untouched ([`tunnel`]), except to hosts configured for
//!   interception (`proxy_intercept`): the daemon answers TLS itself there with a certificate
//!   its CA mints for the host ([`ca`]), and handles the requests inside as absolute-form
//!   requests to `https://host:port` ([`intercept`]), so HTTPS registries are cached too. The
//!   upstream's certificate is verified (the bundled roots and `upstream_ca_file`).
//!
//! Not an open relay: only clients on loopback, or in the `proxy_allow` networks, are served,
//! and destinations follow the upstream rules (`upstream::guard`: the allow-list, addresses
//! never reached). A destination on this host or its network is reached for a client on this
//! host, or when the operator named it, since a forward proxy reaches any path there.
//!
//! HTTP/2 requests always carry an authority and never are proxy requests; HTTP/1 requests in
//! origin form go to the mirror API.

mod ca;
mod forward;
mod intercept;
mod preheated;
mod rules;
mod tunnel;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use damselfly_serve::PeerAddr;
use http::header::{HeaderValue, VIA};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Body as HttpBody;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::response::{full, Body};
use crate::api::{App, REGISTRY_HEADER};
use crate::oci::{parse_route, RouteKind};
use crate::upstream::guard::Reach;
use crate::upstream::UpstreamError;
pub use ca::InterceptCa;
pub use rules::{Rules, DEFAULT_RULE};
use tokio_rustls::rustls::pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("this proxy serves clients on loopback and in the configured networks only; {0} is neither")]
    ClientNotAllowed(IpAddr),
    #[error("{0}")]
    Destination(UpstreamError),
    #[error("bad proxy request: {0}")]
    BadRequest(&'static str),
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, std::io::Error),
    #[error("the upstream connection failed: {0}")]
    Upstream(hyper::Error),
    #[error("too many tunnels open")]
    Busy,
    #[error("HTTPS interception of {0}: {1}")]
    Intercept(String, String),
    #[error("this request already went through a damselfly proxy: a loop")]
    Loop,
    #[error("this proxy does not take {0} inside an intercepted tunnel")]
    NotInTunnel(Method),
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::ClientNotAllowed(_) => StatusCode::FORBIDDEN,
            ProxyError::Destination(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unreachable(_, e) if e.kind() == std::io::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ProxyError::Unreachable(_, e) if e.kind() == std::io::ErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable(..) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Intercept(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Loop => StatusCode::LOOP_DETECTED,
            ProxyError::NotInTunnel(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The one place a proxy error becomes a response: plain text, as proxies answer.
    fn into_response(self) -> Response<Body> {
        let mut resp = Response::new(full(format!("{self}\n")));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        resp
    }
}

/// What the proxy is configured with (`proxy_rules`, `proxy_allow`, `proxy_intercept`).
#[derive(Clone, Default)]
pub struct ProxyConfig {
    /// Regular expressions; an absolute-form registry API request whose URL matches one goes
    /// through the cache.
    pub rules: Vec<String>,
    /// Networks (`CIDR` or a single address) whose clients may use the proxy, besides loopback.
    pub allow: Vec<String>,
    /// Hosts whose `CONNECT` tunnels are intercepted (`*`: every host).
    pub intercept: Vec<String>,
    /// The CA that signs for intercepted hosts; needed when `intercept` names any.
    pub ca: Option<Arc<InterceptCa>>,
    /// DER certificates trusted for upstream TLS besides the bundled roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// The P2P cache, where plain URLs matching a rule are looked for among preheated files.
    pub files: Option<Arc<damselfly_cache::Cache>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    kind: &'static str,
    status: u16,
}

pub struct Proxy {
    app: Arc<App>,
    rules: Rules,
    allow: Vec<(IpAddr, u8)>,
    intercept: Intercept,
    ca: Option<Arc<InterceptCa>>,
    upstream_tls: forward::UpstreamTls,
    files: Option<Arc<damselfly_cache::Cache>>,
    tunnels: tunnel::TunnelSlots,
    /// The tunnels and intercepted connections running, so that shutdown waits for them.
    running: TaskTracker,
    requests: Family<Labels, Counter>,
    shutdown: CancellationToken,
}

impl Proxy {
    pub fn new(
        app: Arc<App>,
        config: &ProxyConfig,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Result<Proxy, String> {
        let rules = Rules::new(&config.rules)?;
        let allow = parse_allow(&config.allow)?;
        let intercept = Intercept::new(&config.intercept)?;
        if intercept != Intercept::None && config.ca.is_none() {
            return Err("interception needs a CA".to_owned());
        }
        let upstream_tls = forward::UpstreamTls::new(&config.extra_roots)?;
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "damselfly_proxy_requests",
            "HTTP proxy requests by how they were served (cache, preheated, forward, tunnel, refused) and status",
            requests.clone(),
        );
        Ok(Proxy {
            app,
            rules,
            allow,
            intercept,
            ca: config.ca.clone(),
            upstream_tls,
            files: config.files.clone(),
            tunnels: tunnel::TunnelSlots::default(),
            running: TaskTracker::new(),
            requests,
            shutdown,
        })
    }

    /// Waits, after the shutdown signal, for the tunnels and intercepted connections to end
    /// (they drain for a few seconds), so that nothing they started outlives the daemon's
    /// shutdown.
    pub async fn closed(&self) {
        self.running.close();
        if tokio::time::timeout(Duration::from_secs(10), self.running.wait()).await.is_err() {
            tracing::warn!(open = self.running.len(), "proxy tunnels still open after shutdown");
        }
    }

    /// Whether `req` is for the proxy rather than the mirror API.
    pub fn claims<B>(req: &Request<B>) -> bool {
        req.version() < Version::HTTP_2 && (req.method() == Method::CONNECT || req.uri().authority().is_some())
    }

    /// Answers a proxy request (see [`Proxy::claims`]).
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (kind, answer) = self.clone().dispatch(req).await;
        self.respond(kind, answer)
    }

    /// The one place an answer (served as `kind`) becomes a response, and is counted.
    fn respond(&self, kind: &'static str, answer: Result<Response<Body>, ProxyError>) -> Response<Body> {
        let (kind, resp) = match answer {
            Ok(resp) => (kind, resp),
            Err(e) => {
                tracing::debug!(error = %e, "proxy request refused");
                ("refused", e.into_response())
            }
        };
        self.requests.get_or_create(&Labels { kind, status: resp.status().as_u16() }).inc();
        resp
    }

    async fn dispatch<B>(self: Arc<Self>, req: Request<B>) -> (&'static str, Result<Response<Body>, ProxyError>)
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        let client = match self.client_allowed(peer) {
            Ok(client) => client,
            Err(e) => return ("refused", Err(e)),
        };
        // A request that already went through a damselfly proxy is one this daemon would send
        // round in a circle (its own HTTP_PROXY naming itself, or two daemons naming each other).
        let via = req.headers().get_all(VIA).iter().filter_map(|v| v.to_str().ok()).any(|v| v.contains("damselfly"));
        if via {
            return ("refused", Err(ProxyError::Loop));
        }
        if req.method() == Method::CONNECT {
            return self.connect(req, client).await;
        }
        match Target::of(req.uri(), false) {
            Ok(target) => self.serve_target(req, target, client).await,
            Err(e) => ("refused", Err(e)),
        }
    }

    /// An absolute-form request (or one inside an intercepted tunnel): through the cache when
    /// the rules say so, else forwarded.
    async fn serve_target<B>(
        &self,
        req: Request<B>,
        target: Target,
        client: Client,
    ) -> (&'static str, Result<Response<Body>, ProxyError>)
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if self.through_cache(&req) {
            // The mirror API would reach a registry named by an internal address for anyone;
            // through the proxy, only clients on this host may (or the operator named it).
            let reach = match self.reach(target.scheme.as_str(), &target.host, target.port, client) {
                Ok(r) => r,
                Err(e) => return ("refused", Err(e)),
            };
            if reach == Reach::Public && crate::upstream::names_internal(&target.host) {
                let refused = UpstreamError::NotAllowed(target.authority.to_string());
                return ("refused", Err(ProxyError::Destination(refused)));
            }
            return ("cache", Ok(self.cached(req, &target).await));
        }
        if let Some(resp) = self.preheated(&req, &target, client).await {
            return ("preheated", Ok(resp));
        }
        ("forward", self.forward(req, target, client).await)
    }

    /// Whether `peer` may use the proxy, and whether it is on this host.
    fn client_allowed(&self, peer: Option<IpAddr>) -> Result<Client, ProxyError> {
        let Some(ip) = peer else {
            return Err(ProxyError::ClientNotAllowed(IpAddr::from([0, 0, 0, 0])));
        };
        let ip = ip.to_canonical();
        if ip.is_loopback() {
            return Ok(Client { ip, local: true });
        }
        match self.allow.iter().any(|&(net, bits)| crate::upstream::cidr_contains(net, bits, ip)) {
            true => Ok(Client { ip, local: false }),
            false => Err(ProxyError::ClientNotAllowed(ip)),
        }
    }

    /// A registry API read (GET or HEAD of a blob or manifest) whose path matches a rule.
    fn through_cache<B>(&self, req: &Request<B>) -> bool {
        let readable = matches!(*req.method(), Method::GET | Method::HEAD);
        let api = parse_route(req.uri().path(), req.uri().query())
            .is_ok_and(|r| matches!(r.kind, RouteKind::Blob { .. } | RouteKind::Manifest { .. }));
        readable && api && self.rules.matches(req.uri().path())
    }

    /// Serves the request through the mirror API, with the registry the request line names.
    async fn cached<B>(&self, req: Request<B>, target: &Target) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let registry = format!("{}://{}", target.scheme, target.authority);
        parts.uri = target.origin_form.clone();
        // The request line decides; a header naming another registry would be a second answer.
        parts.headers.remove(REGISTRY_HEADER);
        if let Ok(value) = HeaderValue::from_str(&registry) {
            parts.headers.insert(REGISTRY_HEADER, value);
        }
        self.app.clone().handle(Request::from_parts(parts, body)).await
    }

    /// Where `client` may reach at `host:port` (a `CONNECT` counts as `https`).
    fn reach(&self, scheme: &str, host: &str, port: u16, client: Client) -> Result<Reach, ProxyError> {
        self.app.upstream.proxy_reach(scheme, host, port, client.local).map_err(ProxyError::Destination)
    }
}

/// Which hosts' tunnels are intercepted.
#[derive(Debug, PartialEq, Eq)]
enum Intercept {
    None,
    All,
    Hosts(Vec<String>),
}

impl Intercept {
    fn new(entries: &[String]) -> Result<Intercept, String> {
        let mut hosts = Vec::new();
        for e in entries {
            let e = e.trim().to_ascii_lowercase();
            if e == "*" {
                return Ok(Intercept::All);
            }
            let bracketed = e.starts_with('[') && e.ends_with(']');
            if e.is_empty() || e.contains(['/', '@', ' ']) || (e.contains(':') && !bracketed) {
                return Err(format!("proxy_intercept entry {e:?} is neither a host nor *"));
            }
            hosts.push(e);
        }
        Ok(if hosts.is_empty() { Intercept::None } else { Intercept::Hosts(hosts) })
    }

    fn covers(&self, host: &str) -> bool {
        match self {
            Intercept::None => false,
            Intercept::All => true,
            Intercept::Hosts(hosts) => hosts.iter().any(|h| h.eq_ignore_ascii_case(host)),
        }
    }
}

/// The `proxy_allow` networks: a CIDR range, or one address.
pub fn parse_allow(entries: &[String]) -> Result<Vec<(IpAddr, u8)>, String> {
    let parse = |entry: &String| match entry.trim().parse::<IpAddr>() {
        Ok(ip) => Some((ip, if ip.is_ipv4() { 32 } else { 128 })),
        Err(_) => crate::upstream::parse_cidr(entry.trim()),
    };
    entries
        .iter()
        .map(|e| parse(e).ok_or_else(|| format!("proxy_allow entry {e:?} is neither an address nor a CIDR range")))
        .collect()
}

/// Who sent a proxy request: its address, and whether that is this host.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Client {
    ip: IpAddr,
    local: bool,
}

/// Where an absolute-form request (or a CONNECT) goes.
struct Target {
    scheme: Scheme,
    authority: Authority,
    host: String,
    port: u16,
    /// The request's path and query, as the origin gets them.
    origin_form: Uri,
}

impl Target {
    /// The whole URL, as the rules are matched against.
    fn url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.origin_form)
    }

    /// The target of `uri`; `https` only inside an intercepted tunnel (clients send https
    /// URLs to a proxy with CONNECT).
    fn of(uri: &Uri, intercepted: bool) -> Result<Target, ProxyError> {
        let authority = uri.authority().cloned().ok_or(ProxyError::BadRequest("no host in the request line"))?;
        let scheme = uri.scheme().cloned().ok_or(ProxyError::BadRequest("no scheme in the request line"))?;
        if scheme != Scheme::HTTP && !(intercepted && scheme == Scheme::HTTPS) {
            return Err(ProxyError::BadRequest("only http:// URLs are forwarded; https goes through CONNECT"));
        }
        if authority.as_str().contains('@') {
            return Err(ProxyError::BadRequest("credentials in the request line"));
        }
        let port = authority.port_u16().unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
        let origin_form: Uri = uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .map_err(|_| ProxyError::BadRequest("the request line's path is not a valid origin-form target"))?;
        Ok(Target { host: authority.host().to_owned(), scheme, authority, port, origin_form })
    }
}

#[cfg(test)]
mod tests;
