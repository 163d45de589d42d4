//! Talking to upstream registries: which registry a request is for, how to reach it (TLS policy,
//! dockerd's insecure-registry fallback), and with which credentials (`docs/security.md`):
//! the client's own `Authorization`, else the daemon's configured credentials, else the anonymous
//! token flow, else the registry's 401 goes back to the caller to relay to the client.

mod auth;
pub mod challenge;
pub mod guard;
mod select;
mod token;
mod transport;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tokio_rustls::rustls::pki_types::CertificateDer;

pub(crate) use select::canonical_credential_host as canonical_host;
pub(crate) use select::{cidr_contains, parse_cidr};
pub use select::{RegistryEndpoint, RegistryId, RegistryNameError, SchemePolicy, DOCKER_HUB_HOST};

use guard::{AddrClass, AllowList, Reach};
use select::InsecureSet;
use transport::{PreparedRequest, Transport};

/// Whether `host[:port]` names this host or its network by itself (an address literal,
/// `localhost`).
pub fn names_internal(host_port: &str) -> bool {
    match select::host_ip(host_port) {
        Some(ip) => guard::classify(ip) == AddrClass::Internal,
        None => select::is_loopback(host_port),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The registry named by the request (header or `ns`) is unusable: the handler answers 400.
    #[error("bad registry: {0}")]
    BadRegistry(#[from] RegistryNameError),
    #[error("invalid upstream configuration: {0}")]
    Config(String),
    /// The handler asked for something this module refuses to forward.
    #[error("invalid upstream request: {0}")]
    InvalidRequest(String),
    #[error("upstream {host}: {source}")]
    Http {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    /// The token realm refused the request (4xx): bad configured credentials, or no anonymous
    /// access.
    #[error("token realm {realm} refused the request: {status}")]
    TokenRejected { realm: String, status: http::StatusCode },
    #[error("token from {realm}: {reason}")]
    Token { realm: String, reason: String, retryable: bool },
    /// The registry named by the request is not one this daemon may reach (`guard.rs`): the
    /// handler answers 400.
    #[error("registry {0} is not allowed here")]
    NotAllowed(String),
}

impl UpstreamError {
    pub(crate) fn request(host: &str, source: reqwest::Error) -> Self {
        UpstreamError::Http { host: host.to_owned(), source }
    }

    /// Whether the same request may succeed if tried again (transport failures, overload),
    /// as opposed to failures that will repeat (bad input, refused credentials).
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::BadRegistry(_)
            | UpstreamError::Config(_)
            | UpstreamError::InvalidRequest(_)
            | UpstreamError::NotAllowed(_) => false,
            UpstreamError::Http { source, .. } => {
                // `is_request` covers failures while sending, such as a reset connection.
                source.is_connect() || source.is_timeout() || source.is_request()
            }
            UpstreamError::TokenRejected { status, .. } => *status == http::StatusCode::TOO_MANY_REQUESTS,
            UpstreamError::Token { retryable, .. } => *retryable,
        }
    }

    /// The connection (TCP or TLS handshake) could not be made: the trigger for falling back
    /// from HTTPS to HTTP on insecure registries.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Http { source, .. } if source.is_connect())
    }

    /// Asking the realm again will not help, so the registry's 401 is relayed instead.
    pub(crate) fn is_token_rejected(&self) -> bool {
        matches!(self, UpstreamError::TokenRejected { status, .. } if *status != http::StatusCode::TOO_MANY_REQUESTS)
    }
}

/// Whether a response with these headers may come from a shared cache to whoever the origin
/// showed it to: not one the origin keeps out of shared caches, nor one that varies with the
/// request (the `HEAD` carried none of the client's headers but its `Authorization`).
pub fn shared_caches_may_keep(headers: &http::HeaderMap) -> bool {
    let forbidden = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim().to_ascii_lowercase())
        .any(|d| d == "private" || d == "no-store");
    !forbidden && !headers.contains_key(http::header::VARY)
}

pub struct UpstreamConfig {
    /// The `--registry-mirror` URL, e.g. `https://index.docker.io`.
    pub default_registry: String,
    /// `host[:port]` entries (or CIDR ranges): TLS without verification, falling back to HTTP.
    pub insecure_registries: Vec<String>,
    pub credentials: Vec<RegistryCredential>,
    pub connect_timeout: Duration,
    /// Registries clients may name (`*`, `host[:port]`, `*.domain`); empty: any. Those the
    /// operator named elsewhere are always allowed.
    pub allow_registries: Vec<String>,
    /// Longest wait for any read from an upstream connection (response heads and bodies):
    /// an origin that accepts and then says nothing must not hang a pull. Blob fetches have
    /// their own, shorter stall timer; this bounds everything else (HEADs, manifests, tokens,
    /// pass-through bodies).
    pub read_timeout: Duration,
    /// CA certificates trusted for TLS besides the bundled public roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Whether a registry named by an internal address (an address literal of this host or
    /// its network, `localhost`) is reached there though the operator did not name it: so for
    /// the node daemon, whose clients are on the node; not for the scheduler's control plane,
    /// whose callers may be anywhere on the network.
    pub internal_by_address: bool,
}

pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            default_registry: "https://index.docker.io".into(),
            insecure_registries: Vec::new(),
            credentials: Vec::new(),
            allow_registries: Vec::new(),
            extra_roots: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: READ_TIMEOUT,
            internal_by_address: true,
        }
    }
}

/// Configured credentials cross plain HTTP only to hosts the operator named insecure (or
/// loopback): a client naming `http://` for a registry must not get its password sent in the
/// clear.
fn configured_credentials_may_go(endpoint: &RegistryEndpoint, insecure: &InsecureSet) -> bool {
    endpoint.scheme != SchemePolicy::Http || insecure.contains(&endpoint.host) || select::is_loopback(&endpoint.host)
}

/// Credentials configured on the daemon for one registry. They act for every client of the
/// daemon, as in any pull-through cache.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    /// `host[:port]`; a scheme and path are tolerated (`https://index.docker.io/v1/`).
    pub host: String,
    pub username: String,
    pub password: String,
}

/// Keeps passwords out of logs and panic messages.
impl fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

pub struct UpstreamRequest {
    pub registry: RegistryEndpoint,
    /// An already validated repository name, e.g. `library/alpine`.
    pub repo: String,
    /// GET or HEAD.
    pub method: http::Method,
    /// Relative to `/v2/<repo>/`, e.g. `manifests/latest`.
    pub path: String,
    /// Headers to forward (every `Accept` value, `Range`, ...). Host, Authorization, hop-by-hop
    /// headers and Accept-Encoding are dropped here regardless.
    pub headers: http::HeaderMap,
    /// The client's own `Authorization`, forwarded as-is when present.
    pub client_auth: Option<http::HeaderValue>,
    /// Never use the daemon's configured credentials (a seed fetching for strangers).
    pub anonymous: bool,
}

pub struct UpstreamReply {
    /// The final response after auth and redirects. A 401 is meant to be relayed to the client
    /// with its `WWW-Authenticate`.
    pub response: reqwest::Response,
    pub credential: CredentialKind,
}

/// What authorized the final request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// No credentials, or an anonymous token: the content is public.
    Anonymous,
    /// The daemon's configured credentials.
    Configured,
    /// The client's own `Authorization`.
    Client,
}

/// Shared by all handlers (wrap in an `Arc`): holds the HTTP clients, token cache and the
/// per-registry memos.
pub struct Upstream {
    insecure: InsecureSet,
    default: RegistryEndpoint,
    credentials: HashMap<String, RegistryCredential>,
    allow: AllowList,
    transport: Transport,
    auth: auth::Authenticator,
    connect_timeout: Duration,
    internal_by_address: bool,
}

impl Upstream {
    pub fn new(cfg: UpstreamConfig) -> Result<Self, UpstreamError> {
        if cfg.connect_timeout.is_zero() || cfg.read_timeout.is_zero() {
            return Err(UpstreamError::Config("connect and read timeouts must be positive".into()));
        }
        let insecure = InsecureSet::new(&cfg.insecure_registries)?;
        let default = select::endpoint_from_default(&cfg.default_registry, &insecure)
            .map_err(|e| UpstreamError::Config(format!("default registry: {e}")))?;
        let mut credentials = HashMap::new();
        for cred in cfg.credentials {
            let host = select::canonical_credential_host(&cred.host)
                .map_err(|e| UpstreamError::Config(format!("credentials: {e}")))?;
            // docker.io and index.docker.io are one registry: two different logins for it are
            // a configuration mistake, not something to resolve silently.
            if credentials
                .get(&host)
                .is_some_and(|c: &RegistryCredential| c.username != cred.username || c.password != cred.password)
            {
                return Err(UpstreamError::Config(format!("conflicting credentials for {host}")));
            }
            credentials.insert(host.clone(), RegistryCredential { host, ..cred });
        }
        let allow = AllowList::new(&cfg.allow_registries).map_err(UpstreamError::Config)?;
        Ok(Upstream {
            insecure,
            default,
            credentials,
            allow,
            transport: Transport::new(cfg.connect_timeout, cfg.read_timeout, &cfg.extra_roots)?,
            connect_timeout: cfg.connect_timeout,
            auth: auth::Authenticator::default(),
            internal_by_address: cfg.internal_by_address,
        })
    }

    /// The registry used when a request names none.
    pub fn default_registry(&self) -> &RegistryEndpoint {
        &self.default
    }

    /// Whether the operator named this registry (the default, an insecure registry, or one
    /// with credentials), as opposed to one only a client named.
    pub fn is_configured(&self, registry: &RegistryEndpoint) -> bool {
        registry.host == self.default.host
            || self.insecure.contains(&registry.host)
            || self.credentials.contains_key(&registry.host)
    }

    /// Picks the upstream: the `X-Dragonfly-Registry` header (a URL with scheme), else a
    /// `host[:port]` the request names (containerd's `ns`, already percent-decoded, or the
    /// repository's first component), else the default. Refused: a registry at an address
    /// never reached (`guard.rs`), or one outside `allow_registries`.
    pub fn select(&self, header: Option<&str>, host_port: Option<&str>) -> Result<RegistryEndpoint, UpstreamError> {
        let endpoint = match (header, host_port) {
            (Some(url), _) => select::endpoint_from_url(url, &self.insecure)?,
            (None, Some(host_port)) => select::endpoint_from_ns(host_port, &self.insecure)?,
            (None, None) => return Ok(self.default.clone()),
        };
        let forbidden = select::host_ip(&endpoint.host).is_some_and(|ip| guard::classify(ip) == AddrClass::Forbidden);
        if forbidden || !(self.allow.allows(&endpoint.host) || self.is_configured(&endpoint)) {
            return Err(UpstreamError::NotAllowed(endpoint.host));
        }
        Ok(endpoint)
    }

    /// Which addresses requests for `registry` may reach: internal ones only for a registry
    /// that is internal itself (an address literal, `localhost`, unless `internal_by_address`
    /// is off) or that the operator named.
    fn reach_of(&self, registry: &RegistryEndpoint) -> Reach {
        let by_address = self.internal_by_address && names_internal(&registry.host);
        match by_address || self.operator_named(registry) {
            true => Reach::Private,
            false => Reach::Public,
        }
    }

    /// Whether the operator named this registry anywhere, `allow_registries` included.
    fn operator_named(&self, registry: &RegistryEndpoint) -> bool {
        (!self.allow.is_open() && self.allow.allows(&registry.host)) || self.is_configured(registry)
    }

    /// Whether an HTTP proxy client may reach `scheme://host:port` (`proxy/`), and where: the
    /// rules for a registry named in the header (allow-list, addresses never reached), except
    /// that the host's and its network's addresses are reached only for a client on this host
    /// (when the destination names such an address itself), or when the operator named this
    /// very host and port (a registry setting, or an `allow_registries` entry that is no
    /// wildcard): a forward proxy reaches any path and any port there, not only a registry API.
    pub fn proxy_reach(&self, scheme: &str, host: &str, port: u16, local_client: bool) -> Result<Reach, UpstreamError> {
        let authority =
            if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
        let endpoint = self.select(Some(&format!("{scheme}://{authority}:{port}")), None)?;
        let named = self.is_configured(&endpoint) || (!self.allow.is_open() && self.allow.names(&endpoint.host));
        let internal_ok = named || (local_client && names_internal(&endpoint.host));
        Ok(if internal_ok { Reach::Private } else { Reach::Public })
    }

    /// Whether the operator listed `host:port` (or `host`, on the default port) in
    /// `insecure_registries`: TLS to it is not verified.
    pub fn is_insecure(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.insecure.contains(&format!("{host}:{port}")) || (port == 443 && self.insecure.contains(&host))
    }

    /// A TCP connection to `host:port` on an address `reach` allows, within the connect timeout.
    pub async fn connect(&self, host: &str, port: u16, reach: Reach) -> std::io::Result<tokio::net::TcpStream> {
        guard::connect(host, port, reach, self.connect_timeout).await
    }

    /// The host a plain URL names, by the rules [`Upstream::select`] applies to a registry
    /// named by that URL's scheme and authority.
    pub fn select_url(&self, url: &str) -> Result<(RegistryEndpoint, url::Url), UpstreamError> {
        let bad = |why: &str| UpstreamError::InvalidRequest(format!("{url:?}: {why}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let authority = transport::authority(&parsed).ok_or_else(|| bad("no host"))?;
        let endpoint = self.select(Some(&format!("{}://{authority}", parsed.scheme())), None)?;
        Ok((endpoint, parsed))
    }

    /// Sends one GET or HEAD for a file at a plain URL (a preheated file) by the rules a
    /// registry named by that URL's scheme and host is reached by: the allow-list, addresses
    /// never reached, and the reach its host gets, or `reach` when the caller decided it (the
    /// proxy, for its client). `auth` is sent as it is; the daemon's configured credentials
    /// never are.
    pub async fn send_url(
        &self,
        method: http::Method,
        url: &str,
        headers: http::HeaderMap,
        auth: Option<&http::HeaderValue>,
        reach: Option<Reach>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let (endpoint, parsed) = self.select_url(url)?;
        let mut prepared = PreparedRequest::plain(endpoint, method, &parsed[url::Position::BeforePath..], headers)?;
        prepared.reach = reach.unwrap_or_else(|| self.reach_of(&prepared.endpoint));
        let literal = select::host_ip(&prepared.endpoint.host);
        if literal.is_some_and(|ip| !guard::allows(prepared.reach, ip)) {
            return Err(UpstreamError::NotAllowed(prepared.endpoint.host));
        }
        self.transport.execute(&prepared, auth).await
    }

    /// Sends one GET/HEAD upstream with the right credentials (see the module docs). Any status,
    /// including 401, is a successful reply; errors are transport, token and input failures.
    pub async fn send(&self, req: UpstreamRequest) -> Result<UpstreamReply, UpstreamError> {
        let mut prepared = PreparedRequest::new(req.registry, req.method, &req.repo, &req.path, req.headers)?;
        prepared.reach = self.reach_of(&prepared.endpoint);
        // The resolver guards names; an address literal is checked here (redirects and realms
        // are checked as they are followed).
        let literal = select::host_ip(&prepared.endpoint.host);
        if literal.is_some_and(|ip| !guard::allows(prepared.reach, ip)) {
            return Err(UpstreamError::NotAllowed(prepared.endpoint.host));
        }
        if let Some(auth) = req.client_auth {
            let response = self.transport.execute(&prepared, Some(&auth)).await?;
            return Ok(UpstreamReply { response, credential: CredentialKind::Client });
        }
        let usable = !req.anonymous && configured_credentials_may_go(&prepared.endpoint, &self.insecure);
        let cred = if usable { self.credentials.get(&prepared.endpoint.host) } else { None };
        self.auth.send(&self.transport, &prepared, &req.repo, cred).await
    }
}
