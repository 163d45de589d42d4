//! Choosing the upstream registry for a request and normalising registry host names.

use std::net::IpAddr;

use url::{Host, Url};

use super::UpstreamError;

/// Why a registry name (a URL, containerd's `ns`, a configured host) names no usable registry.
/// Messages quote the input, which is never a secret: credentials in URLs are refused first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryNameError {
    #[error("{0:?} is not a URL: {1}")]
    NotUrl(String, String),
    #[error("{0:?}: unsupported scheme {1:?}")]
    Scheme(String, String),
    #[error("{0:?}: credentials in the registry URL are not accepted")]
    Credentials(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?}: bad port")]
    BadPort(String),
    #[error("{0:?}: bad host name")]
    BadHost(String),
    #[error("{0:?}: {1}")]
    Host(String, String),
    #[error("{0:?}: unclosed '['")]
    UnclosedBracket(String),
    #[error("{0:?}: junk after IPv6 address")]
    JunkAfterIpv6(String),
}

/// The host every Docker Hub spelling maps to, so that cache keys and credentials never split
/// between `docker.io`, `index.docker.io` and `registry-1.docker.io` (`https://docker.io/v2/`
/// is not even a registry API: it redirects to an HTML page).
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", DOCKER_HUB_HOST];

/// How to reach an upstream registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegistryEndpoint {
    /// `host[:port]`, lowercase; `registry-1.docker.io` for Docker Hub.
    pub host: String,
    pub scheme: SchemePolicy,
}

impl RegistryEndpoint {
    /// Who this registry is (see [`RegistryId`]).
    pub fn id(&self) -> RegistryId {
        match self.scheme {
            SchemePolicy::Http => RegistryId(format!("http://{}", self.host)),
            SchemePolicy::Https | SchemePolicy::InsecureHttpsThenHttp => RegistryId(self.host.clone()),
        }
    }
}

/// Who a registry is, wherever the node keys a decision on it: whose bytes an unverified task
/// holds, whose word says who may read what, which requests may share one upstream answer. It
/// is the endpoint's `host[:port]` (Docker Hub as its API host), except that a registry named
/// with an `http://` URL (header or default) is `http://host[:port]`, another registry than the
/// same host over TLS: anyone on the path can answer for it. Named by `ns` or an `https://`
/// URL, insecure-listed and loopback hosts keep their host's name, though they may be reached
/// over plain HTTP too: the operator vouched for them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegistryId(String);

impl RegistryId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RegistryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchemePolicy {
    Https,
    Http,
    /// Docker's insecure-registry meaning: TLS without certificate verification, falling back to
    /// plain HTTP when the TLS connection cannot be made.
    InsecureHttpsThenHttp,
}

/// The `insecure_registries` list: exact `host[:port]` entries plus CIDR ranges for IP literals,
/// as dockerd accepts both.
#[derive(Debug, Default)]
pub(crate) struct InsecureSet {
    hosts: Vec<String>,
    nets: Vec<(IpAddr, u8)>,
}

impl InsecureSet {
    pub(crate) fn new(entries: &[String]) -> Result<Self, UpstreamError> {
        let mut set = InsecureSet::default();
        for raw in entries {
            if let Some(net) = parse_cidr(raw.trim()) {
                set.nets.push(net);
            } else {
                let host = parse_host_port(strip_scheme_and_path(raw.trim()))
                    .map_err(|e| UpstreamError::Config(format!("insecure registry {raw:?}: {e}")))?;
                set.hosts.push(host);
            }
        }
        Ok(set)
    }

    pub(crate) fn contains(&self, host_port: &str) -> bool {
        if self.hosts.iter().any(|h| h == host_port) {
            return true;
        }
        match host_ip(host_port) {
            Some(ip) => self.nets.iter().any(|&(net, bits)| cidr_contains(net, bits, ip)),
            None => false,
        }
    }
}

/// Parses a registry given as a URL (`X-Dragonfly-Registry`, `--registry-mirror`): only the
/// scheme and authority matter, a path is ignored.
pub(crate) fn endpoint_from_url(raw: &str, insecure: &InsecureSet) -> Result<RegistryEndpoint, RegistryNameError> {
    let url = Url::parse(raw.trim()).map_err(|e| RegistryNameError::NotUrl(raw.to_owned(), e.to_string()))?;
    let secure = match url.scheme() {
        "https" => true,
        "http" => false,
        other => return Err(RegistryNameError::Scheme(raw.to_owned(), other.to_owned())),
    };
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a header would end up in logs and cache keys; they belong in the config.
        return Err(RegistryNameError::Credentials(raw.to_owned()));
    }
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| RegistryNameError::NoHost(raw.to_owned()))?;
    // `Url::port` is None for the scheme's default port, so `https://h:443` and `https://h` agree.
    let host = join_port(host, url.port());
    if let Some(hub) = docker_hub(&host) {
        return Ok(hub);
    }
    let scheme = if !secure {
        SchemePolicy::Http
    } else if insecure.contains(&host) {
        SchemePolicy::InsecureHttpsThenHttp
    } else {
        SchemePolicy::Https
    };
    Ok(RegistryEndpoint { host, scheme })
}

/// Parses containerd's `ns` parameter (`host[:port]`, no scheme). As in dockerd, HTTPS is the
/// default and insecure registries and loopback hosts get the TLS-then-plain-HTTP treatment.
pub(crate) fn endpoint_from_ns(raw: &str, insecure: &InsecureSet) -> Result<RegistryEndpoint, RegistryNameError> {
    let host = parse_host_port(raw)?;
    if let Some(hub) = docker_hub(&host) {
        return Ok(hub);
    }
    let scheme = if insecure.contains(&host) || is_loopback(&host) {
        SchemePolicy::InsecureHttpsThenHttp
    } else {
        SchemePolicy::Https
    };
    Ok(RegistryEndpoint { host, scheme })
}

/// The default registry may be configured with or without a scheme; without one it is read the
/// way `ns` is.
pub(crate) fn endpoint_from_default(raw: &str, insecure: &InsecureSet) -> Result<RegistryEndpoint, RegistryNameError> {
    if raw.contains("://") {
        endpoint_from_url(raw, insecure)
    } else {
        endpoint_from_ns(raw, insecure)
    }
}

/// Normalises a configured credential's registry (`docker.io`, `https://index.docker.io/v1/`,
/// `myreg:5000`) to the `host[:port]` that [`RegistryEndpoint::host`] uses.
pub(crate) fn canonical_credential_host(raw: &str) -> Result<String, RegistryNameError> {
    let host = parse_host_port(strip_scheme_and_path(raw.trim()))?;
    Ok(match docker_hub(&host) {
        Some(hub) => hub.host,
        None => host,
    })
}

fn strip_scheme_and_path(raw: &str) -> &str {
    let rest = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

fn docker_hub(host_port: &str) -> Option<RegistryEndpoint> {
    let host = host_port.strip_suffix(":443").unwrap_or(host_port);
    DOCKER_HUB_ALIASES
        .contains(&host)
        .then(|| RegistryEndpoint { host: DOCKER_HUB_HOST.to_owned(), scheme: SchemePolicy::Https })
}

fn join_port(host: &str, port: Option<u16>) -> String {
    match port {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// Strictly validates `host[:port]` (hostname, IPv4, or bracketed IPv6) and returns it in
/// canonical form: lowercase, IP literals normalised by the URL host parser.
pub(crate) fn parse_host_port(raw: &str) -> Result<String, RegistryNameError> {
    let (host, port) = split_host_port(raw)?;
    let port = match port {
        None => None,
        Some(p) => Some(parse_port(p).ok_or_else(|| RegistryNameError::BadPort(raw.to_owned()))?),
    };
    if !host.starts_with('[') && !is_hostname(host) {
        return Err(RegistryNameError::BadHost(raw.to_owned()));
    }
    let parsed = Host::parse(host).map_err(|e| RegistryNameError::Host(raw.to_owned(), e.to_string()))?;
    Ok(join_port(&parsed.to_string().to_ascii_lowercase(), port))
}

fn split_host_port(raw: &str) -> Result<(&str, Option<&str>), RegistryNameError> {
    if raw.starts_with('[') {
        let end = raw.find(']').ok_or_else(|| RegistryNameError::UnclosedBracket(raw.to_owned()))?;
        let (host, rest) = raw.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(RegistryNameError::JunkAfterIpv6(raw.to_owned())),
            },
        };
    }
    Ok(match raw.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (raw, None),
    })
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

fn is_hostname(host: &str) -> bool {
    // Underscores are not legal in DNS host names but do occur in internal registry names.
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !host.is_empty() && host.len() <= 253 && host.split('.').all(label_ok)
}

pub(crate) fn host_ip(host_port: &str) -> Option<IpAddr> {
    let host = split_host_port(host_port).ok()?.0;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.parse().ok()
}

/// dockerd treats 127.0.0.0/8 as insecure by default; `localhost` never resolves elsewhere.
pub(crate) fn is_loopback(host_port: &str) -> bool {
    if let Some(ip) = host_ip(host_port) {
        return ip.is_loopback();
    }
    let host = split_host_port(host_port).map_or(host_port, |(h, _)| h);
    host == "localhost" || host.ends_with(".localhost")
}

pub(crate) fn parse_cidr(entry: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = entry.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((addr, bits))
}

pub(crate) fn cidr_contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    let (net, ip, width) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(u32::from(n)), u128::from(u32::from(i)), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    // A /0 would shift by the full width, which overflows for IPv6.
    shift >= 128 || (net >> shift) == (ip >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &[&str]) -> InsecureSet {
        InsecureSet::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ep(host: &str, scheme: SchemePolicy) -> RegistryEndpoint {
        RegistryEndpoint { host: host.into(), scheme }
    }

    #[test]
    fn docker_hub_spellings_are_one_host() {
        let s = set(&[]);
        let hub = ep(DOCKER_HUB_HOST, SchemePolicy::Https);
        for url in
            ["https://docker.io", "https://index.docker.io", "https://registry-1.docker.io/v2/", "http://docker.io"]
        {
            assert_eq!(endpoint_from_url(url, &s).unwrap(), hub, "{url}");
        }
        for ns in ["docker.io", "index.docker.io", "registry-1.docker.io", "DOCKER.IO", "docker.io:443"] {
            assert_eq!(endpoint_from_ns(ns, &s).unwrap(), hub, "{ns}");
        }
        assert_eq!(canonical_credential_host("https://index.docker.io/v1/").unwrap(), DOCKER_HUB_HOST);
        assert_eq!(canonical_credential_host("docker.io").unwrap(), DOCKER_HUB_HOST);
    }

    #[test]
    fn ns_with_port_and_policy() {
        let s = set(&["myreg.local:5000", "10.1.0.0/16"]);
        assert_eq!(endpoint_from_ns("ghcr.io", &s).unwrap(), ep("ghcr.io", SchemePolicy::Https));
        assert_eq!(endpoint_from_ns("Quay.IO:8443", &s).unwrap(), ep("quay.io:8443", SchemePolicy::Https));
        let insecure = SchemePolicy::InsecureHttpsThenHttp;
        assert_eq!(endpoint_from_ns("myreg.local:5000", &s).unwrap(), ep("myreg.local:5000", insecure));
        assert_eq!(endpoint_from_ns("myreg.local", &s).unwrap(), ep("myreg.local", SchemePolicy::Https));
        assert_eq!(endpoint_from_ns("10.1.2.3:5000", &s).unwrap(), ep("10.1.2.3:5000", insecure));
        assert_eq!(endpoint_from_ns("10.2.2.3", &s).unwrap().scheme, SchemePolicy::Https);
    }

    #[test]
    fn loopback_is_insecure() {
        let s = set(&[]);
        let insecure = SchemePolicy::InsecureHttpsThenHttp;
        for ns in ["127.0.0.1:5000", "127.3.4.5", "localhost:5000", "[::1]:5000", "[::1]"] {
            assert_eq!(endpoint_from_ns(ns, &s).unwrap().scheme, insecure, "{ns}");
        }
        assert_eq!(endpoint_from_ns("[::1]:5000", &s).unwrap().host, "[::1]:5000");
        // An explicit https:// URL is honoured even for loopback.
        assert_eq!(endpoint_from_url("https://127.0.0.1:5000", &s).unwrap().scheme, SchemePolicy::Https);
    }

    #[test]
    fn url_schemes() {
        let s = set(&["insecure.example:443", "plain.example"]);
        assert_eq!(endpoint_from_url("http://r.example:5000/x", &s).unwrap(), ep("r.example:5000", SchemePolicy::Http));
        assert_eq!(endpoint_from_url("https://R.example:443", &s).unwrap(), ep("r.example", SchemePolicy::Https));
        assert_eq!(endpoint_from_url("https://plain.example", &s).unwrap().scheme, SchemePolicy::InsecureHttpsThenHttp);
        assert_eq!(endpoint_from_url("http://plain.example", &s).unwrap().scheme, SchemePolicy::Http);
        assert_eq!(endpoint_from_default("ghcr.io", &s).unwrap(), ep("ghcr.io", SchemePolicy::Https));
    }

    #[test]
    fn bad_input_is_rejected() {
        let s = set(&[]);
        for url in ["", "docker.io", "ftp://x.example", "https://", "https://u:p@x.example", "not a url", "file:///etc"]
        {
            assert!(endpoint_from_url(url, &s).is_err(), "{url:?}");
        }
        for ns in [
            "",
            "a..b",
            "x.example:",
            "x.example:0",
            "x.example:65536",
            "x.example:80:80",
            "x/y",
            "[::1",
            "[::1]x",
            "[zz]",
            "x y",
            "é.example",
            "-",
        ] {
            let res = endpoint_from_ns(ns, &s);
            assert!(res.is_err(), "{ns:?} -> {res:?}");
        }
        assert!(InsecureSet::new(&["bad host!".to_string()]).is_err());
    }

    #[test]
    fn ipv4_literals_are_normalised() {
        let s = set(&[]);
        assert_eq!(endpoint_from_ns("0x7f.1", &s).unwrap(), ep("127.0.0.1", SchemePolicy::InsecureHttpsThenHttp));
    }

    #[test]
    fn cidr_edges() {
        let any = set(&["0.0.0.0/0", "::/0"]);
        assert!(any.contains("8.8.8.8"));
        assert!(any.contains("[2001:db8::1]:5000"));
        assert!(!any.contains("example.com"));
    }
}
