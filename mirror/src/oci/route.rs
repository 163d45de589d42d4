//! Strict parsing of OCI distribution request paths and the `ns` query parameter.
//!
//! Everything here comes from the network and later keys caches and upstream URLs, so the
//! parser rejects anything ambiguous (encoded slashes and dots, dot segments, empty segments)
//! instead of normalizing it: two spellings of one path must never name two things.

use std::fmt;
use std::net::Ipv6Addr;

use damselfly_p2p::{Digest, DigestError};
use http::StatusCode;

use super::error::ErrorCode;

pub const MAX_PATH_LEN: usize = 2048;
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_TAG_LEN: usize = 128;
/// A DNS name (253) plus `:65535`, or a bracketed IPv6 address with a port.
const MAX_HOST_PORT_LEN: usize = 261;

#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub kind: RouteKind,
    /// The upstream registry named by `?ns=` (containerd), as `host[:port]`.
    pub ns: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `/v2/` or `/v2`: the API version check.
    Base,
    Manifest {
        name: String,
        reference: Reference,
    },
    Blob {
        name: String,
        digest: Digest,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("not a registry API path")]
    NotFound,
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("path has invalid percent-encoding or is not UTF-8")]
    BadEncoding,
    #[error("path percent-encodes '/', '.', '%', '\\' or NUL")]
    ForbiddenEncoding,
    #[error("path contains a backslash or a control character")]
    ForbiddenChar,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("invalid repository name")]
    InvalidName,
    #[error("invalid tag")]
    InvalidTag,
    #[error("invalid digest: {0}")]
    InvalidDigest(DigestError),
    #[error("ns must be a single HOST[:PORT]")]
    InvalidNs,
    #[error("operation not supported by this mirror")]
    Unsupported,
}

impl RouteError {
    /// Unknown and unsupported paths get 404 because every pull client falls back to the
    /// origin on a 404 (`docs/design.md`, what the clients send), and a mirror has nothing else to offer there.
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        use RouteError::*;
        match self {
            NotFound | Unsupported => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
            TooLong => (StatusCode::URI_TOO_LONG, ErrorCode::NameInvalid),
            BadEncoding | ForbiddenEncoding | ForbiddenChar | EmptySegment | DotSegment | InvalidName | InvalidNs => {
                (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
            }
            InvalidTag => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
            InvalidDigest(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
        }
    }
}

impl From<&RouteError> for (StatusCode, ErrorCode) {
    fn from(e: &RouteError) -> Self {
        e.status_and_code()
    }
}

/// Parses a request's raw (still percent-encoded) path and query.
pub fn parse_route(path: &str, query: Option<&str>) -> Result<Route, RouteError> {
    let kind = parse_path(path)?;
    let ns = match query {
        Some(q) => parse_ns(q)?,
        None => None,
    };
    Ok(Route { kind, ns })
}

fn parse_path(raw: &str) -> Result<RouteKind, RouteError> {
    if raw.len() > MAX_PATH_LEN {
        return Err(RouteError::TooLong);
    }
    let path = decode_path(raw)?;
    let rest = match path.strip_prefix("/v2") {
        Some("" | "/") => return Ok(RouteKind::Base),
        Some(r) => r.strip_prefix('/').ok_or(RouteError::NotFound)?,
        None => return Err(RouteError::NotFound),
    };
    check_segments(rest)?;
    route_rest(rest)
}

/// Decodes percent-escapes, refusing those that could change how the path splits into segments
/// (and `%25`, so nothing is decoded twice by a later layer).
fn decode_path(raw: &str) -> Result<String, RouteError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let hi = bytes.get(i + 1).and_then(|&h| hex_val(h));
        let lo = bytes.get(i + 2).and_then(|&l| hex_val(l));
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(RouteError::BadEncoding);
        };
        let decoded = hi << 4 | lo;
        if matches!(decoded, b'/' | b'.' | b'%' | b'\\' | 0) {
            return Err(RouteError::ForbiddenEncoding);
        }
        out.push(decoded);
        i += 3;
    }
    let path = String::from_utf8(out).map_err(|_| RouteError::BadEncoding)?;
    if path.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(RouteError::ForbiddenChar);
    }
    Ok(path)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A trailing slash is allowed (it leaves an empty last segment); anywhere else an empty
/// segment is `//`.
fn check_segments(rest: &str) -> Result<(), RouteError> {
    let count = rest.split('/').count();
    for (i, seg) in rest.split('/').enumerate() {
        if seg == "." || seg == ".." {
            return Err(RouteError::DotSegment);
        }
        if seg.is_empty() && i + 1 != count {
            return Err(RouteError::EmptySegment);
        }
    }
    Ok(())
}

/// Repository names may themselves contain `manifests` or `blobs` components, so the operation
/// is the last such marker in the path.
fn route_rest(rest: &str) -> Result<RouteKind, RouteError> {
    const MANIFESTS: &str = "/manifests/";
    const BLOBS: &str = "/blobs/";
    let manifest_at = rest.rfind(MANIFESTS);
    let blob_at = rest.rfind(BLOBS);
    let (at, marker) = match (manifest_at, blob_at) {
        (Some(m), Some(b)) if m > b => (m, MANIFESTS),
        (_, Some(b)) => (b, BLOBS),
        (Some(m), None) => (m, MANIFESTS),
        (None, None) => return Err(RouteError::Unsupported),
    };
    let (name, reference) = (&rest[..at], &rest[at + marker.len()..]);
    // `blobs/uploads/...` (push) and anything with further segments are other API operations.
    if reference.is_empty() || reference.contains('/') || (marker == BLOBS && reference == "uploads") {
        return Err(RouteError::Unsupported);
    }
    if !is_valid_name(name) {
        return Err(RouteError::InvalidName);
    }
    let name = name.to_owned();
    if marker == MANIFESTS {
        Ok(RouteKind::Manifest { name, reference: parse_reference(reference)? })
    } else {
        let digest = Digest::parse(reference).map_err(RouteError::InvalidDigest)?;
        Ok(RouteKind::Blob { name, digest })
    }
}

fn parse_reference(s: &str) -> Result<Reference, RouteError> {
    if s.contains(':') {
        return Digest::parse(s).map(Reference::Digest).map_err(RouteError::InvalidDigest);
    }
    if is_valid_tag(s) {
        Ok(Reference::Tag(s.to_owned()))
    } else {
        Err(RouteError::InvalidTag)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('/').all(is_valid_component)
}

fn is_valid_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = component.as_bytes();
    match (b.first(), b.last()) {
        (Some(&first), Some(&last)) if alnum(first) && alnum(last) => {}
        _ => return false,
    }
    // Every maximal run of non-alphanumerics sits between two alphanumerics and must be
    // exactly one separator.
    b.split(|&c| alnum(c))
        .filter(|run| !run.is_empty())
        .all(|run| matches!(run, b"." | b"_" | b"__") || run.iter().all(|&c| c == b'-'))
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    let first_ok = b.first().is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
    first_ok
        && b.len() <= MAX_TAG_LEN
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Finds `ns`, ignoring other parameters. A repeated `ns` is refused: two readers of one
/// query must not pick different upstreams.
fn parse_ns(query: &str) -> Result<Option<String>, RouteError> {
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "ns" {
            continue;
        }
        let value = percent_encoding::percent_decode_str(value).decode_utf8().map_err(|_| RouteError::InvalidNs)?;
        if found.is_some() || !is_host_port(&value) {
            return Err(RouteError::InvalidNs);
        }
        found = Some(value.into_owned());
    }
    Ok(found)
}

/// `host[:port]` where host is a DNS name, an IPv4 address or a bracketed IPv6 address, and
/// the port is 1–65535. No scheme, path, userinfo or whitespace.
pub fn is_host_port(s: &str) -> bool {
    if s.len() > MAX_HOST_PORT_LEN {
        return false;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        return v6.parse::<Ipv6Addr>().is_ok() && (after.is_empty() || after.strip_prefix(':').is_some_and(is_port));
    }
    match s.split_once(':') {
        Some((host, port)) => is_hostname(host) && is_port(port),
        None => is_hostname(s),
    }
}

fn is_port(p: &str) -> bool {
    (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n != 0)
}

fn is_hostname(h: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (1..=253).contains(&h.len()) && h.split('.').all(label_ok)
}

#[cfg(test)]
mod tests;
