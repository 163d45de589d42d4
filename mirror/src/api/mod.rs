//! The registry mirror API: the pull half of the OCI distribution spec, served from the piece
//! store and the origin. Requests flow `handle` → route → `manifests` | `blobs`, which consult
//! `access` for cached content and `source` for bytes the store lacks. Handlers return an
//! [`ApiError`], which becomes a response in one place, here (`error.rs` says how).

mod access;
#[cfg(test)]
mod blob_tests;
mod blobs;
mod error;
#[cfg(test)]
pub(crate) mod fake_registry;
#[cfg(test)]
mod manifest_tests;
mod manifests;
pub mod metrics;
mod proof;
pub mod response;
pub mod source;

use std::sync::Arc;

use damselfly_p2p::{Digest, Store};
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response};
use tracing::Instrument;

use crate::oci::{parse_route, registry_prefix, ContentKind, RouteKind};
use crate::upstream::{RegistryEndpoint, Upstream, UpstreamRequest};
pub use access::AccessCache;
pub use manifests::TagFlights;
use metrics::{ApiMetrics, RequestLabels};
/// Bytes of a blob a cluster node asks the client's registry to show before serving bytes that
/// come from elsewhere (see `proof.rs`).
pub use proof::WINDOW as PROOF_WINDOW;
use response::{full, Body, API_VERSION};

pub use error::ApiError;

/// The header Dragonfly-era configs use to name the upstream registry (a URL with scheme).
pub const REGISTRY_HEADER: &str = "X-Dragonfly-Registry";

/// Everything a request needs, shared by all requests.
pub struct App {
    pub upstream: Upstream,
    pub store: Store,
    pub access: AccessCache,
    pub tags: TagFlights,
    pub metrics: ApiMetrics,
    pub background_fill: bool,
    /// Take the registry from the repository's first component when a request names none
    /// otherwise (`oci::registry_prefix`).
    pub registry_in_path: bool,
}

/// A repository at an upstream registry, as one requester sees it (with its credentials).
#[derive(Clone)]
pub struct ClientRepo {
    pub registry: RegistryEndpoint,
    pub repo: String,
    pub client_auth: Option<HeaderValue>,
}

/// One piece of content in a [`ClientRepo`], by digest.
#[derive(Clone)]
pub struct Target {
    pub registry: RegistryEndpoint,
    pub repo: String,
    pub client_auth: Option<HeaderValue>,
    pub digest: Digest,
}

impl ClientRepo {
    pub fn target(&self, digest: Digest) -> Target {
        Target {
            registry: self.registry.clone(),
            repo: self.repo.clone(),
            client_auth: self.client_auth.clone(),
            digest,
        }
    }

    /// A request for `path` (below `/v2/<repo>/`) upstream, with this requester's credentials.
    pub fn request(&self, method: Method, path: String, headers: HeaderMap) -> UpstreamRequest {
        upstream_request(&self.registry, &self.repo, &self.client_auth, method, path, headers)
    }
}

impl Target {
    /// A request for this content upstream.
    pub fn request(&self, method: Method, kind: ContentKind, headers: HeaderMap) -> UpstreamRequest {
        let path = format!("{}/{}", kind.path_segment(), self.digest);
        upstream_request(&self.registry, &self.repo, &self.client_auth, method, path, headers)
    }

    /// `registry/repository`: the unit in which the origin decides who may read what, the
    /// registry named by its [`RegistryId`](crate::upstream::RegistryId).
    pub fn origin_repo(&self) -> String {
        format!("{}/{}", self.registry.id(), self.repo)
    }
}

impl App {
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Body> {
        let method = req.method().clone();
        let (route, answer) = self.clone().dispatch(req).await;
        let mut resp = answer.unwrap_or_else(ApiError::into_response);
        resp.headers_mut().insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
        if method == Method::HEAD {
            // HEAD answers carry the length of what a GET would send; the body stays empty.
            *resp.body_mut() = response::empty();
        }
        let labels = RequestLabels { route, method: method.as_str().to_owned(), status: resp.status().as_u16() };
        self.metrics.requests.get_or_create(&labels).inc();
        resp
    }

    /// Routes the request; returns the route's metric label and the answer.
    async fn dispatch<B>(self: Arc<Self>, req: Request<B>) -> (&'static str, Result<Response<Body>, ApiError>) {
        let method = req.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return ("other", Err(ApiError::Method));
        }
        let route = match parse_route(req.uri().path(), req.uri().query()) {
            Ok(r) => r,
            Err(e) => return ("invalid", Err(e.into())),
        };
        let (name, reference) = match route.kind {
            RouteKind::Base => return ("base", Ok(base())),
            RouteKind::Manifest { name, reference } => (name, Ok(reference)),
            RouteKind::Blob { name, digest } => (name, Err(digest)),
        };
        let header = req.headers().get(REGISTRY_HEADER).and_then(|v| v.to_str().ok());
        let mut client_auth = req.headers().get(AUTHORIZATION).cloned();
        let (host_port, repo) = match (header, route.ns) {
            (None, None) if self.registry_in_path => match registry_prefix::split(&name) {
                Some((host_port, repo)) => {
                    // The client's credentials were meant for the registry it thought it was
                    // asking (it sees the daemon, and a repository path): they never go to a
                    // registry read from that path. Its configured credentials do.
                    client_auth = None;
                    (Some(host_port), repo.to_owned())
                }
                None => (None, name),
            },
            (_, ns) => (ns, name),
        };
        let registry = match self.upstream.select(header, host_port.as_deref()) {
            Ok(r) => r,
            Err(e) => return ("invalid", Err(ApiError::Registry(e))),
        };
        let client_repo = ClientRepo { registry, repo, client_auth };
        match reference {
            Ok(reference) => {
                let span = tracing::info_span!("manifest", registry = %client_repo.registry.host, repo = %client_repo.repo, reference = %reference);
                let accept = req.headers().get_all(ACCEPT).iter().cloned().collect();
                let mreq = manifests::ManifestRequest { repo: client_repo, reference, method, accept };
                ("manifest", manifests::handle(self, mreq).instrument(span).await)
            }
            Err(digest) => {
                let span = tracing::info_span!("blob", registry = %client_repo.registry.host, repo = %client_repo.repo, digest = %digest);
                let target = client_repo.target(digest);
                ("blob", blobs::handle(self, target, &method, req.headers()).instrument(span).await)
            }
        }
    }
}

fn upstream_request(
    registry: &RegistryEndpoint,
    repo: &str,
    client_auth: &Option<HeaderValue>,
    method: Method,
    path: String,
    headers: HeaderMap,
) -> UpstreamRequest {
    UpstreamRequest {
        registry: registry.clone(),
        repo: repo.to_owned(),
        method,
        path,
        headers,
        client_auth: client_auth.clone(),
        anonymous: false,
    }
}

fn base() -> Response<Body> {
    let mut resp = Response::new(full("{}"));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(2));
    resp
}
