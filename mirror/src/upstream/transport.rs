//! HTTP transport to registries: the two reqwest clients, request building, and dockerd's
//! insecure-registry scheme fallback.
//!
//! Redirects: reqwest follows up to 10 and itself drops `Authorization` (and cookies) when a
//! redirect changes host or port (`reqwest::redirect::remove_sensitive_headers`), which is what
//! the distribution spec asks of clients: Docker Hub answers blob GETs with a 307 to a signed
//! CDN URL that must not see the registry token. A test below pins that behaviour. Where a
//! request, its redirects and its realm may go is the registry's reach (`guard.rs`): each
//! reach has its own clients, whose resolver and redirect policy enforce it.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use tokio_rustls::rustls::pki_types::CertificateDer;
use url::Url;

use super::guard::{self, Reach};
use super::{RegistryEndpoint, SchemePolicy, UpstreamError};

const MAX_REDIRECTS: usize = 10;

/// A validated request, rebuilt for each attempt (auth retry, scheme fallback).
#[derive(Debug)]
pub(crate) struct PreparedRequest {
    pub endpoint: RegistryEndpoint,
    pub method: Method,
    /// `/v2/<repo>/<path>[?query]`
    pub path: String,
    pub headers: HeaderMap,
    /// Where it may go; public addresses only until the upstream says otherwise.
    pub reach: Reach,
}

impl PreparedRequest {
    pub(crate) fn new(
        endpoint: RegistryEndpoint,
        method: Method,
        repo: &str,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Self, UpstreamError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(UpstreamError::InvalidRequest(format!("method {method} is not forwarded")));
        }
        let full = format!("/v2/{repo}/{path}");
        check_path(&full)?;
        Ok(PreparedRequest { endpoint, method, path: full, headers: forwardable(headers), reach: Reach::Public })
    }

    /// A request for a file at a plain URL's `path` (with its query), as `url::Url` spells it:
    /// already free of dot segments.
    pub(crate) fn plain(
        endpoint: RegistryEndpoint,
        method: Method,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Self, UpstreamError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(UpstreamError::InvalidRequest(format!("method {method} is not forwarded")));
        }
        if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) || path.contains(['#', '\\']) {
            return Err(UpstreamError::InvalidRequest(format!("{path:?}: not a plain URL's path")));
        }
        Ok(PreparedRequest {
            endpoint,
            method,
            path: path.to_owned(),
            headers: forwardable(headers),
            reach: Reach::Public,
        })
    }

    /// `GET /v2/` of the same registry, with the same reach: where a registry that keeps
    /// its challenge off its other answers says how to authenticate.
    pub(crate) fn api_root(&self) -> PreparedRequest {
        PreparedRequest {
            endpoint: self.endpoint.clone(),
            method: Method::GET,
            path: "/v2/".to_owned(),
            headers: HeaderMap::new(),
            reach: self.reach,
        }
    }

    fn url(&self, scheme: &str) -> Result<Url, UpstreamError> {
        let raw = format!("{scheme}://{}{}", self.endpoint.host, self.path);
        Url::parse(&raw).map_err(|e| UpstreamError::InvalidRequest(format!("{raw}: {e}")))
    }
}

/// Rejects anything the URL parser would rewrite (dot segments, fragments, backslashes) so the
/// upstream sees exactly the repository and path the handler validated.
fn check_path(full: &str) -> Result<(), UpstreamError> {
    let bad = |why: &str| Err(UpstreamError::InvalidRequest(format!("{full:?}: {why}")));
    let path = full.split('?').next().unwrap_or(full);
    if !full.bytes().all(|b| b.is_ascii_graphic()) || full.contains(['#', '\\']) {
        return bad("illegal character");
    }
    if path.split('/').skip(1).any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return bad("empty or dot segment");
    }
    // Names, tags and digests never hold a `%`; the URL parser would decode `%2e%2e` into a
    // dot segment and resolve it away from `/v2/`.
    if path.contains('%') {
        return bad("percent-encoding in the path");
    }
    Ok(())
}

/// Drops what must never be forwarded even if the caller passed it: hop-by-hop headers, the
/// client's Host and credentials (auth is decided here), and Accept-Encoding, because manifest
/// digests are computed over identity bodies and reqwest does not decode here.
fn forwardable(mut headers: HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named_by_connection {
        headers.remove(name);
    }
    for name in [
        header::HOST,
        header::AUTHORIZATION,
        header::PROXY_AUTHORIZATION,
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::CONTENT_LENGTH,
        header::ACCEPT_ENCODING,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Https,
    Http,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Https => "https",
            Scheme::Http => "http",
        }
    }
}

/// Hosts remembered as speaking plain HTTP.
const MAX_PLAIN_HTTP_HOSTS: usize = 1024;

/// The clients of one reach: certificates verified, or not (insecure registries).
struct Clients {
    verified: reqwest::Client,
    unverified: reqwest::Client,
}

pub(crate) struct Transport {
    public: Clients,
    private: Clients,
    /// Insecure registries found to speak plain HTTP, so later requests skip the TLS attempt.
    plain_http: Mutex<HashSet<String>>,
}

impl Transport {
    pub(crate) fn new(
        connect_timeout: Duration,
        read_timeout: Duration,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<Self, UpstreamError> {
        let roots = extra_roots
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| UpstreamError::Config(format!("upstream CA certificate: {e}")))?;
        let build = |reach: Reach, insecure: bool| {
            let redirects = reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                match guard::check_url(attempt.url(), reach) {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(why),
                }
            });
            let builder = roots.iter().fold(reqwest::Client::builder(), |b, root| b.add_root_certificate(root.clone()));
            builder
                .use_rustls_tls()
                .connect_timeout(connect_timeout)
                .read_timeout(read_timeout)
                .redirect(redirects)
                .dns_resolver(guard::resolver(reach))
                .user_agent(concat!("damselfly/", env!("CARGO_PKG_VERSION")))
                .danger_accept_invalid_certs(insecure)
                .build()
                .map_err(|e| UpstreamError::Config(format!("HTTP client: {e}")))
        };
        let clients = |reach| -> Result<Clients, UpstreamError> {
            Ok(Clients { verified: build(reach, false)?, unverified: build(reach, true)? })
        };
        Ok(Transport {
            public: clients(Reach::Public)?,
            private: clients(Reach::Private)?,
            plain_http: Mutex::default(),
        })
    }

    fn clients(&self, reach: Reach) -> &Clients {
        match reach {
            Reach::Public => &self.public,
            Reach::Private => &self.private,
        }
    }

    /// The client for a token realm, which shares its registry's reach: certificate checks are
    /// skipped only where the registry itself is insecure and the realm lives on that same host.
    pub(crate) fn realm_client(&self, realm: &Url, endpoint: &RegistryEndpoint, reach: Reach) -> &reqwest::Client {
        let same_host = authority(realm).is_some_and(|a| a == endpoint.host);
        let clients = self.clients(reach);
        if same_host && endpoint.scheme == SchemePolicy::InsecureHttpsThenHttp {
            &clients.unverified
        } else {
            &clients.verified
        }
    }

    pub(crate) fn uses_plain_http(&self, host: &str) -> bool {
        self.memo().contains(host)
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The memo is only an optimisation; a poisoned lock still holds a usable map.
        self.plain_http.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the request with the given `Authorization`, choosing the scheme by policy.
    pub(crate) async fn execute(
        &self,
        prepared: &PreparedRequest,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let host = &prepared.endpoint.host;
        let Clients { verified, unverified } = self.clients(prepared.reach);
        match prepared.endpoint.scheme {
            SchemePolicy::Https => self.attempt(verified, Scheme::Https, prepared, auth).await,
            SchemePolicy::Http => self.attempt(verified, Scheme::Http, prepared, auth).await,
            SchemePolicy::InsecureHttpsThenHttp if self.uses_plain_http(host) => {
                let res = self.attempt(unverified, Scheme::Http, prepared, auth).await;
                if matches!(&res, Err(e) if e.is_connect()) {
                    // The registry may have moved (or gained TLS): probe again next time.
                    self.memo().remove(host);
                }
                res
            }
            SchemePolicy::InsecureHttpsThenHttp => {
                match self.attempt(unverified, Scheme::Https, prepared, auth).await {
                    Err(e) if e.is_connect() => {
                        tracing::debug!(%host, error = %e, "TLS attempt failed, trying plain HTTP");
                        let res = self.attempt(unverified, Scheme::Http, prepared, auth).await?;
                        let mut memo = self.memo();
                        // Clients may name any number of loopback names: forgetting them all
                        // costs one TLS attempt each.
                        if memo.len() >= MAX_PLAIN_HTTP_HOSTS {
                            memo.clear();
                        }
                        memo.insert(host.clone());
                        Ok(res)
                    }
                    other => other,
                }
            }
        }
    }

    async fn attempt(
        &self,
        client: &reqwest::Client,
        scheme: Scheme,
        prepared: &PreparedRequest,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = client
            .request(prepared.method.clone(), prepared.url(scheme.as_str())?)
            .build()
            .map_err(|e| UpstreamError::request(&prepared.endpoint.host, e))?;
        // Appending, not inserting, keeps repeated headers (several Accept lines) separate.
        for (name, value) in &prepared.headers {
            req.headers_mut().append(name, value.clone());
        }
        if let Some(auth) = auth {
            let mut auth = auth.clone();
            auth.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, auth);
        }
        let res = client.execute(req).await;
        let status = res.as_ref().map(|r| r.status().as_u16()).ok();
        tracing::debug!(
            method = %prepared.method,
            host = %prepared.endpoint.host,
            scheme = scheme.as_str(),
            path = %prepared.path,
            status,
            "upstream request"
        );
        res.map_err(|e| UpstreamError::request(&prepared.endpoint.host, e))
    }
}

/// `host[:port]` of a URL, with the port only when it is not the scheme's default, matching
/// how [`RegistryEndpoint::host`] is written.
pub(crate) fn authority(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> RegistryEndpoint {
        RegistryEndpoint { host: "r.example".into(), scheme: SchemePolicy::Https }
    }

    #[test]
    fn paths_are_checked() {
        let t = |path: &str| PreparedRequest::new(ep(), Method::GET, "library/alpine", path, HeaderMap::new());
        assert_eq!(t("manifests/latest").unwrap().path, "/v2/library/alpine/manifests/latest");
        assert!(t("blobs/sha256:abc").is_ok());
        assert!(t("tags/list?n=10").is_ok());
        for bad in ["../x", "manifests/../../x", "manifests//x", "a b", "x#y", "x\\y", "é", ""] {
            assert!(t(bad).is_err(), "{bad:?}");
        }
        assert!(PreparedRequest::new(ep(), Method::POST, "a", "manifests/x", HeaderMap::new()).is_err());
    }

    #[test]
    fn forbidden_headers_are_dropped_and_repeats_kept() {
        let mut h = HeaderMap::new();
        h.append(header::ACCEPT, HeaderValue::from_static("application/a"));
        h.append(header::ACCEPT, HeaderValue::from_static("application/b"));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-"));
        h.insert(header::HOST, HeaderValue::from_static("evil"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic x"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let t = PreparedRequest::new(ep(), Method::GET, "a", "manifests/x", h).unwrap();
        assert_eq!(t.headers.get_all(header::ACCEPT).iter().count(), 2);
        assert!(t.headers.contains_key(header::RANGE));
        assert_eq!(t.headers.len(), 3);
    }

    #[test]
    fn authority_omits_default_port() {
        let u = |s: &str| authority(&Url::parse(s).unwrap()).unwrap();
        assert_eq!(u("https://a.example:443/x"), "a.example");
        assert_eq!(u("https://a.example:5000/x"), "a.example:5000");
        assert_eq!(u("http://[::1]:80/"), "[::1]");
    }
}
