//! Where upstream requests may go. Clients name registries (`?ns=`, `X-Dragonfly-Registry`),
//! and registries name redirect targets and token realms: none of them may point the daemon at
//! what only it can reach.
//!
//! - Link-local addresses (cloud metadata at 169.254.169.254, `fe80::/10`), unspecified,
//!   multicast and broadcast addresses are never reached.
//! - Loopback and private addresses (RFC 1918, CGNAT, unique-local IPv6) are reached only for a
//!   registry with [`Reach::Private`]: one the request names by such an address itself, or one
//!   the operator named (default, insecure, credentials, `allow_registries`). Its redirects and
//!   its token realm share its reach: a realm is as trusted as its registry.
//!
//! Names are checked when they are resolved (a resolver that drops what the reach forbids), so
//! a name that resolves differently later (DNS rebinding) is checked again; address literals in
//! redirect targets and realms are checked before the request. Behind an HTTP proxy
//! (`HTTPS_PROXY`), the proxy resolves names, and only literals are checked here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use url::{Host, Url};

/// Which addresses a registry's requests may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reach {
    /// Public addresses only.
    Public,
    /// Loopback and private addresses too.
    Private,
}

/// What an address is, for the rules above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AddrClass {
    Public,
    /// Loopback or private: this host or its network.
    Internal,
    /// Never: link-local, unspecified, multicast, broadcast.
    Forbidden,
}

pub(crate) fn classify(ip: IpAddr) -> AddrClass {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_link_local() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || a == 0 {
                AddrClass::Forbidden
            } else if v4.is_loopback() || v4.is_private() || (a == 100 && (64..128).contains(&b)) {
                AddrClass::Internal
            } else {
                AddrClass::Public
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_unspecified() || v6.is_multicast() || (first & 0xffc0) == 0xfe80 {
                AddrClass::Forbidden
            } else if v6.is_loopback() || (first & 0xfe00) == 0xfc00 {
                AddrClass::Internal
            } else {
                AddrClass::Public
            }
        }
    }
}

/// Whether `reach` lets a request go to `ip`.
pub(crate) fn allows(reach: Reach, ip: IpAddr) -> bool {
    match classify(ip) {
        AddrClass::Public => true,
        AddrClass::Internal => reach == Reach::Private,
        AddrClass::Forbidden => false,
    }
}

/// Checks a URL about to be requested (a redirect target, a token realm): its scheme, and its
/// host when it is an address literal. Names are checked when they resolve.
pub(crate) fn check_url(url: &Url, reach: Reach) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{url}: only http and https are followed"));
    }
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(format!("{url}: no host")),
    };
    match allows(reach, ip) {
        true => Ok(()),
        false => Err(format!("{url}: {ip} is not an address this registry may send the daemon to")),
    }
}

/// Resolves names as the system does, keeping only the addresses `reach` allows.
pub(crate) struct GuardedResolver {
    pub reach: Reach,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let reach = self.reach;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = all.iter().copied().filter(|a| allows(reach, a.ip())).collect();
            if kept.is_empty() && !all.is_empty() {
                let why = format!("{host} resolves only to addresses this registry may not send the daemon to");
                return Err(why.into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Connects to `host:port` (a name, or an address literal, bracketed or not) on the first of
/// its addresses that `reach` allows and that answers within `timeout`.
pub(crate) async fn connect(host: &str, port: u16, reach: Reach, timeout: Duration) -> io::Result<TcpStream> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let all: Vec<SocketAddr> = tokio::net::lookup_host((bare, port)).await?.collect();
    let mut last = io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{host} has no address a client may send the daemon to"),
    );
    for addr in all.into_iter().filter(|a| allows(reach, a.ip())) {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr} timed out")),
        }
    }
    Err(last)
}

pub(crate) fn resolver(reach: Reach) -> Arc<GuardedResolver> {
    Arc::new(GuardedResolver { reach })
}

/// `allow_registries` patterns: `*` (any), `host[:port]`, or `*.domain` (any host under it, any
/// port).
#[derive(Debug, Default, Clone)]
pub struct AllowList {
    /// Empty: any registry.
    patterns: Vec<String>,
}

impl AllowList {
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut out = Vec::new();
        for p in patterns {
            let p = p.trim().to_ascii_lowercase();
            let body = p.strip_prefix("*.").unwrap_or(&p);
            if p != "*" && (body.is_empty() || body.contains(['/', '*', '@', ' '])) {
                return Err(format!("allow_registries entry {p:?} is not `*`, HOST[:PORT] or *.DOMAIN"));
            }
            out.push(p);
        }
        if out.iter().any(|p| p == "*") {
            out.clear();
        }
        Ok(AllowList { patterns: out })
    }

    /// Whether any registry may be named.
    pub fn is_open(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `host[:port]` (lowercase) is on the list.
    pub fn allows(&self, host_port: &str) -> bool {
        if self.is_open() {
            return true;
        }
        let host = host_without_port(host_port);
        self.patterns.iter().any(|p| match p.strip_prefix("*.") {
            Some(domain) => {
                host.len() > domain.len() && host.ends_with(domain) && host[..host.len() - domain.len()].ends_with('.')
            }
            None => p == host_port || (!p.contains(':') && p == host),
        })
    }

    /// Whether an entry names `host[:port]` exactly (no wildcard, the same port).
    pub fn names(&self, host_port: &str) -> bool {
        self.patterns.iter().any(|p| p == host_port)
    }
}

fn host_without_port(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn metadata_and_link_local_addresses_are_never_reached() {
        for a in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:169.254.169.254",
            "0.1.2.3",
        ] {
            assert_eq!(classify(ip(a)), AddrClass::Forbidden, "{a}");
            assert!(!allows(Reach::Private, ip(a)), "{a}");
        }
    }

    #[test]
    fn internal_addresses_are_reached_only_for_registries_that_are_internal_themselves() {
        for a in
            ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "::1", "fd00::1", "::ffff:10.0.0.1"]
        {
            assert_eq!(classify(ip(a)), AddrClass::Internal, "{a}");
            assert!(allows(Reach::Private, ip(a)) && !allows(Reach::Public, ip(a)), "{a}");
        }
        for a in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111"] {
            assert!(allows(Reach::Public, ip(a)), "{a}");
        }
    }

    #[test]
    fn redirect_and_realm_literals_are_checked_against_the_registry_reach() {
        let url = |s: &str| Url::parse(s).expect("url");
        assert!(check_url(&url("http://169.254.169.254/latest/meta-data/"), Reach::Private).is_err());
        assert!(check_url(&url("http://127.0.0.1:8080/token"), Reach::Public).is_err());
        assert!(check_url(&url("http://127.0.0.1:8080/token"), Reach::Private).is_ok());
        assert!(check_url(&url("https://[fe80::1]/"), Reach::Private).is_err());
        assert!(check_url(&url("https://auth.docker.io/token"), Reach::Public).is_ok());
        assert!(check_url(&url("file:///etc/passwd"), Reach::Private).is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_not_reached_from_a_public_registry() {
        use reqwest::dns::Resolve;
        let name = || "localhost".parse::<reqwest::dns::Name>().expect("name");
        assert!(resolver(Reach::Public).resolve(name()).await.is_err());
        let addrs: Vec<_> = resolver(Reach::Private).resolve(name()).await.expect("resolves").collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[test]
    fn allow_list_patterns_match_hosts_and_domains() {
        let list =
            AllowList::new(&["registry.internal:5000".into(), "*.example.com".into(), "ghcr.io".into()]).expect("list");
        assert!(list.allows("registry.internal:5000") && !list.allows("registry.internal:5001"));
        assert!(list.allows("a.example.com") && list.allows("b.a.example.com:443"));
        assert!(!list.allows("example.com") && !list.allows("evilexample.com"));
        assert!(list.allows("ghcr.io") && list.allows("ghcr.io:443"));
        assert!(AllowList::new(&["*".into()]).expect("any").allows("anything:1"));
        assert!(AllowList::new(&[]).expect("any").is_open());
        for bad in ["", "*.", "a/b", "*foo"] {
            assert!(AllowList::new(&[bad.into()]).is_err(), "{bad:?}");
        }
    }
}
