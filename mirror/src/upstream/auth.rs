//! The mirror's own upstream authentication: the daemon's configured credentials, else the
//! anonymous token flow; a 401 that survives both goes back to the caller so the client can
//! authenticate itself (`docs/security.md`, upstream credentials).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use base64::Engine as _;
use http::header::{HeaderValue, WWW_AUTHENTICATE};
use http::StatusCode;
use url::Url;

use super::challenge::{self, Challenge};
use super::guard;
use super::token::{self, Identity, TokenCache, TokenKey};
use super::transport::{PreparedRequest, Transport};
use super::{CredentialKind, RegistryCredential, RegistryEndpoint, SchemePolicy, UpstreamError, UpstreamReply};

/// The challenge memo holds one entry per registry host; this only bounds a flood of bogus hosts.
const MAX_KNOWN_HOSTS: usize = 1024;

/// What a registry asked for last time, so later requests attach credentials up front instead
/// of paying a 401 round trip each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KnownAuth {
    Bearer { realm: Url, service: Option<String> },
    Basic,
}

impl KnownAuth {
    /// Bearer is preferred over Basic when both are offered: the password then goes only to
    /// the realm, and the registry sees a scoped, expiring token.
    pub(crate) fn from_challenges(list: &[Challenge]) -> Option<Self> {
        list.iter().find_map(bearer).or_else(|| list.iter().any(|c| c.is_scheme("basic")).then_some(KnownAuth::Basic))
    }
}

fn bearer(c: &Challenge) -> Option<KnownAuth> {
    if !c.is_scheme("bearer") {
        return None;
    }
    let realm = Url::parse(c.param("realm")?).ok()?;
    matches!(realm.scheme(), "http" | "https")
        .then(|| KnownAuth::Bearer { realm, service: c.param("service").map(str::to_owned) })
}

/// An `Authorization` value about to be sent, and what it proves.
struct Attached {
    header: HeaderValue,
    kind: CredentialKind,
    /// The bearer token inside `header`, to invalidate it if the registry refuses it.
    token: Option<String>,
}

struct Ctx<'a> {
    transport: &'a Transport,
    prepared: &'a PreparedRequest,
    scope: String,
    cred: Option<&'a RegistryCredential>,
}

#[derive(Default)]
pub(crate) struct Authenticator {
    pub(crate) tokens: TokenCache,
    known: Mutex<HashMap<String, KnownAuth>>,
}

impl Authenticator {
    /// Sends `prepared` with the daemon's own credentials or anonymously. Request bodies are empty
    /// (GET/HEAD), so resending after a 401 is always safe.
    pub(crate) async fn send(
        &self,
        transport: &Transport,
        prepared: &PreparedRequest,
        repo: &str,
        cred: Option<&RegistryCredential>,
    ) -> Result<UpstreamReply, UpstreamError> {
        let ctx = Ctx { transport, prepared, scope: format!("repository:{repo}:pull"), cred };
        let host = &prepared.endpoint.host;
        let sent = match self.known(host) {
            Some(known) => self.pre_attach(&ctx, &known).await?,
            None => None,
        };
        let first = transport.execute(prepared, sent.as_ref().map(|a| &a.header)).await?;
        let sent_kind = sent.as_ref().map_or(CredentialKind::Anonymous, |a| a.kind);
        let done = |response: reqwest::Response| -> Result<UpstreamReply, UpstreamError> {
            Ok(UpstreamReply { response, credential: sent_kind })
        };
        if first.status() != StatusCode::UNAUTHORIZED {
            return done(first);
        }
        let mut first = first;
        let mut challenges = challenge::parse_all(first.headers().get_all(WWW_AUTHENTICATE));
        if challenges.is_empty() {
            // Some registries challenge only at `/v2/` and answer everything else a bare 401,
            // as docker's client learns it: ask there. The client gets the challenge too, so
            // that it can authenticate itself.
            if let Some(learned) = self.challenge_at_root(transport, prepared).await {
                challenges = challenge::parse(learned.to_str().unwrap_or_default());
                first.headers_mut().insert(WWW_AUTHENTICATE, learned);
            }
        }
        let Some(known) = KnownAuth::from_challenges(&challenges) else {
            return done(first);
        };
        self.remember(host, known.clone());
        let sent_token = sent.as_ref().and_then(|a| a.token.as_deref());
        if sent_token.is_some() && challenges.iter().any(|c| c.param("error") == Some("insufficient_scope")) {
            // The token was valid but does not cover this repository (private, or absent):
            // a fresh token for the same identity would be refused the same way.
            return done(first);
        }
        let next = match self.authorization(&ctx, &known, sent_token).await {
            Ok(Some(next)) => next,
            Ok(None) => return done(first),
            Err(e) if e.is_token_rejected() => {
                tracing::warn!(%host, error = %e, "token refused; relaying the registry's 401");
                return done(first);
            }
            Err(e) => return Err(e),
        };
        if sent.as_ref().is_some_and(|a| a.header == next.header) {
            return done(first);
        }
        let response = transport.execute(prepared, Some(&next.header)).await?;
        Ok(UpstreamReply { response, credential: next.kind })
    }

    /// A refused token here is not final: the request goes out bare and the 401 path decides.
    async fn pre_attach(&self, ctx: &Ctx<'_>, known: &KnownAuth) -> Result<Option<Attached>, UpstreamError> {
        match self.authorization(ctx, known, None).await {
            Err(e) if e.is_token_rejected() => Ok(None),
            other => other,
        }
    }

    async fn authorization(
        &self,
        ctx: &Ctx<'_>,
        known: &KnownAuth,
        stale: Option<&str>,
    ) -> Result<Option<Attached>, UpstreamError> {
        let (realm, service) = match known {
            KnownAuth::Basic => return Ok(ctx.cred.map(basic)),
            KnownAuth::Bearer { realm, service } => (realm, service.as_deref()),
        };
        let endpoint = &ctx.prepared.endpoint;
        let cred = ctx.cred.filter(|_| may_receive_credentials(realm, endpoint));
        if ctx.cred.is_some() && cred.is_none() {
            tracing::debug!(host = %endpoint.host, %realm, "realm not trusted with credentials; anonymous token");
        }
        let identity = cred.map_or(Identity::Anonymous, |c| Identity::Configured { username: c.username.clone() });
        let key = TokenKey { host: endpoint.host.clone(), scope: ctx.scope.clone(), identity };
        // A realm is as trusted as its registry: it may send the daemon where the registry may.
        guard::check_url(realm, ctx.prepared.reach).map_err(|reason| UpstreamError::Token {
            realm: realm.to_string(),
            reason,
            retryable: false,
        })?;
        let client = ctx.transport.realm_client(realm, endpoint, ctx.prepared.reach);
        let token =
            self.tokens.get_or_fetch(key, stale, || token::fetch(client, realm, service, &ctx.scope, cred)).await?;
        let header = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| UpstreamError::Token {
            realm: realm.to_string(),
            reason: "token is not a valid header value".into(),
            retryable: false,
        })?;
        let kind = if cred.is_some() { CredentialKind::Configured } else { CredentialKind::Anonymous };
        Ok(Some(Attached { header, kind, token: Some(token) }))
    }

    fn known(&self, host: &str) -> Option<KnownAuth> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).get(host).cloned()
    }

    /// The challenge the registry answers `GET /v2/` with, if it answers one.
    async fn challenge_at_root(&self, transport: &Transport, prepared: &PreparedRequest) -> Option<HeaderValue> {
        let root = transport.execute(&prepared.api_root(), None).await.ok()?;
        if root.status() != StatusCode::UNAUTHORIZED {
            return None;
        }
        root.headers().get(WWW_AUTHENTICATE).cloned()
    }

    fn remember(&self, host: &str, known: KnownAuth) {
        let mut map = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_KNOWN_HOSTS && !map.contains_key(host) {
            map.clear();
        }
        map.insert(host.to_owned(), known);
    }
}

fn basic(c: &RegistryCredential) -> Attached {
    let raw = format!("{}:{}", c.username, c.password);
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
    // Base64 output is always a valid header value.
    let mut header =
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    header.set_sensitive(true);
    Attached { header, kind: CredentialKind::Configured, token: None }
}

/// The daemon's password goes to a token realm only if the realm is the registry's own host or
/// shares its last two DNS labels (`auth.docker.io` for `registry-1.docker.io`), and never over
/// plain HTTP for a registry reached over HTTPS. Two labels is a heuristic for the registrable
/// domain: it is too permissive under multi-label public suffixes (`a.co.uk` vs `b.co.uk`).
pub(crate) fn may_receive_credentials(realm: &Url, endpoint: &RegistryEndpoint) -> bool {
    if realm.scheme() != "https" && endpoint.scheme == SchemePolicy::Https {
        return false;
    }
    let Some(realm_host) = realm.host_str() else {
        return false;
    };
    let registry_host = strip_port(&endpoint.host);
    realm_host == registry_host || same_last_two_labels(realm_host, registry_host)
}

fn strip_port(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        return host_port.find(']').map_or(host_port, |end| &host_port[..=end]);
    }
    host_port.split(':').next().unwrap_or(host_port)
}

fn same_last_two_labels(a: &str, b: &str) -> bool {
    // IP addresses have no DNS labels: 10.0.0.1 and 192.168.0.1 share nothing.
    let is_ip = |h: &str| h.starts_with('[') || h.parse::<IpAddr>().is_ok();
    if is_ip(a) || is_ip(b) {
        return false;
    }
    last_two_labels(a).is_some_and(|t| Some(t) == last_two_labels(b))
}

fn last_two_labels(host: &str) -> Option<Vec<&str>> {
    let labels: Vec<&str> = host.trim_end_matches('.').rsplit('.').take(2).collect();
    (labels.len() == 2 && labels.iter().all(|l| !l.is_empty())).then_some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, scheme: SchemePolicy) -> RegistryEndpoint {
        RegistryEndpoint { host: host.into(), scheme }
    }

    #[test]
    fn realm_trust() {
        let hub = ep("registry-1.docker.io", SchemePolicy::Https);
        let ok = |realm: &str, e: &RegistryEndpoint| may_receive_credentials(&Url::parse(realm).unwrap(), e);
        assert!(ok("https://auth.docker.io/token", &hub));
        assert!(!ok("http://auth.docker.io/token", &hub));
        assert!(!ok("https://auth.evil.io/token", &hub));
        assert!(!ok("https://docker.io.evil.com/token", &hub));
        let local = ep("10.0.0.1:5000", SchemePolicy::Http);
        assert!(ok("http://10.0.0.1:5001/token", &local));
        assert!(!ok("http://192.168.0.1/token", &local));
        let v6 = ep("[::1]:5000", SchemePolicy::InsecureHttpsThenHttp);
        assert!(ok("https://[::1]:9/token", &v6));
        assert!(!ok("https://localhost/token", &ep("io", SchemePolicy::Https)));
    }

    #[test]
    fn bearer_preferred_over_basic() {
        let list = challenge::parse(r#"Basic realm="x", Bearer realm="https://a.example/t",service="s""#);
        assert_eq!(
            KnownAuth::from_challenges(&list),
            Some(KnownAuth::Bearer { realm: Url::parse("https://a.example/t").unwrap(), service: Some("s".into()) })
        );
        let list = challenge::parse(r#"Bearer realm="ftp://a/t", Basic realm="x""#);
        assert_eq!(KnownAuth::from_challenges(&list), Some(KnownAuth::Basic));
        assert_eq!(KnownAuth::from_challenges(&challenge::parse("Negotiate")), None);
    }

    #[test]
    fn basic_header_encoding() {
        let c = RegistryCredential { host: "h".into(), username: "user".into(), password: "pass".into() };
        assert_eq!(basic(&c).header, "Basic dXNlcjpwYXNz");
    }
}
