//! From a job's URL to the blobs to preheat: the registry and repository it names, then (for
//! an image) its manifest, an index resolved to the platforms asked for, and each manifest's
//! config and layers. Manifests are read with `oci-spec`'s types; a manifest named by digest
//! must hash to it. The registry is reached through the node's upstream rules (allow-list,
//! addresses never reached), so a job cannot point the scheduler anywhere a pull could not.

use std::collections::{BTreeMap, HashSet};

use damselfly_mirror::upstream::{RegistryEndpoint, SchemePolicy, Upstream, UpstreamError, UpstreamRequest};
use damselfly_proto::cache_name::UrlVersion;
use futures_util::StreamExt;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, ETAG, LAST_MODIFIED};
use http::{HeaderMap, Method, StatusCode};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

use crate::job::{BlobProgress, Target};

/// Manifests larger than this are refused.
const MAX_MANIFEST: usize = 4 << 20;
/// Manifests of one index followed at most.
const MAX_PLATFORMS: usize = 64;

const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the URL {0:?} cannot be preheated: {1}")]
    Url(String, &'static str),
    #[error("the origin shows neither a strong ETag nor a Last-Modified date for {0}: nobody could tell the cluster's copy from a newer file")]
    NoVersion(String),
    #[error("the origin answered {status} for {url}")]
    FileStatus { status: StatusCode, url: String },
    #[error("the origin keeps {0} out of shared caches (Cache-Control private or no-store, or Vary)")]
    NotShareable(String),
    #[error("the registry cannot be used: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("the registry answered {status} for {what}")]
    Status { status: StatusCode, what: String },
    #[error("reading {what}: {reason}")]
    Body { what: String, reason: String },
    #[error("{what} is not a manifest this preheat understands: {reason}")]
    Manifest { what: String, reason: String },
    #[error("{what} does not match its digest")]
    Digest { what: String },
    #[error("the index has no manifest for {wanted} (it has: {has})")]
    NoPlatform { wanted: String, has: String },
}

/// What a job's URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: RegistryEndpoint,
    pub repository: String,
    /// A tag or digest for an image; a digest for a blob.
    pub reference: String,
}

impl ImageRef {
    /// Reads `url` (`scheme://host[:port]/v2/<repo>/manifests/<ref>`, or `/blobs/<digest>` for
    /// a file in a registry; see [`plain_file`] for others) and picks its registry by the
    /// upstream rules.
    pub fn parse(url: &str, target: Target, upstream: &Upstream) -> Result<ImageRef, ResolveError> {
        let (authority, repository, reference) = split(url, target)?;
        let registry = upstream.select(Some(&authority), None)?;
        Ok(ImageRef { registry, repository, reference })
    }

    /// The registry as seeds are told it: a base URL.
    pub fn registry_url(&self) -> String {
        match self.registry.scheme {
            SchemePolicy::Http => format!("http://{}", self.registry.host),
            SchemePolicy::Https | SchemePolicy::InsecureHttpsThenHttp => format!("https://{}", self.registry.host),
        }
    }

    /// Whether seeds reach it over plain HTTP or unverified TLS.
    pub fn insecure(&self) -> bool {
        self.registry.scheme != SchemePolicy::Https
    }
}

/// Whether `url` reads as a job of `target` may name it, before any registry is chosen: what
/// the API checks when a job is created.
pub fn check_url(url: &str, target: Target) -> Result<(), ResolveError> {
    match target {
        Target::Image => split(url, target).map(drop),
        Target::File => split(url, target).map(drop).or_else(|_| parse_http(url).map(drop)),
    }
}

/// The URL of a file job that names no registry blob, in its canonical spelling (the one its
/// name in the P2P cache is made of); `None` for an image or a registry blob.
pub fn plain_file(url: &str, target: Target) -> Result<Option<String>, ResolveError> {
    if target != Target::File {
        return Ok(None);
    }
    let parsed = parse_http(url)?;
    // Meant for a registry: its errors stand.
    if parsed.path().starts_with("/v2/") && parsed.path().contains("/blobs/") {
        return split(url, target).map(|_| None);
    }
    Ok(Some(parsed.to_string()))
}

/// An `http` or `https` URL with a host and no credentials, within the length a job may have.
fn parse_http(url: &str) -> Result<url::Url, ResolveError> {
    let bad = |why| ResolveError::Url(url.chars().take(200).collect(), why);
    if url.len() > crate::store::MAX_URL {
        return Err(bad("the URL is too long"));
    }
    let parsed = url::Url::parse(url).map_err(|_| bad("not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("credentials go in the headers, not the URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    let mut parsed = parsed;
    // Never sent to a server.
    parsed.set_fragment(None);
    Ok(parsed)
}

/// A job URL's `scheme://host[:port]`, repository and reference.
fn split(url: &str, target: Target) -> Result<(String, String, String), ResolveError> {
    let bad = |why| ResolveError::Url(url.chars().take(200).collect(), why);
    let parsed = parse_http(url)?;
    let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
    let authority = match parsed.port() {
        Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
        None => format!("{}://{host}", parsed.scheme()),
    };
    let (kind, shape) = match target {
        Target::Image => ("/manifests/", "an image URL names /v2/<repository>/manifests/<reference>"),
        Target::File => ("/blobs/", "a registry blob's URL names /v2/<repository>/blobs/<digest>"),
    };
    let path = parsed.path().strip_prefix("/v2/").ok_or_else(|| bad(shape))?;
    let (repository, reference) = path.rsplit_once(kind).ok_or_else(|| bad(shape))?;
    if !damselfly_mirror::oci::route::is_valid_name(repository) {
        return Err(bad("the repository name is not valid"));
    }
    let reference_ok = match target {
        Target::Image => is_tag(reference) || damselfly_proto::Digest::parse(reference).is_ok(),
        Target::File => damselfly_proto::Digest::parse(reference).is_ok(),
    };
    if !reference_ok {
        return Err(bad("the reference is neither a tag nor a sha256 digest"));
    }
    Ok((authority, repository.to_owned(), reference.to_owned()))
}

fn is_tag(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The `Authorization` among a job's headers, which is all of them the registry is sent.
pub fn authorization(headers: &BTreeMap<String, String>) -> Option<HeaderValue> {
    let value = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(AUTHORIZATION.as_str()))?.1;
    let mut v = HeaderValue::from_str(value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// A file at a plain URL, as its origin shows it to the job's credential: the version a
/// preheat keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHead {
    pub url: String,
    pub version: UrlVersion,
}

/// Asks the origin of a plain URL (a `HEAD`, with the job's `Authorization`) for the file's
/// length and version.
pub async fn head_file(upstream: &Upstream, url: &str, auth: Option<HeaderValue>) -> Result<FileHead, ResolveError> {
    let response = upstream.send_url(Method::HEAD, url, HeaderMap::new(), auth.as_ref(), None).await?;
    if response.status() != StatusCode::OK {
        return Err(ResolveError::FileStatus { status: response.status(), url: url.to_owned() });
    }
    if !damselfly_mirror::upstream::shared_caches_may_keep(response.headers()) {
        return Err(ResolveError::NotShareable(url.to_owned()));
    }
    let text = |name| response.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let length = text(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok()).filter(|&n| n > 0);
    let Some(length) = length else {
        return Err(ResolveError::Body { what: url.to_owned(), reason: "no usable Content-Length".to_owned() });
    };
    let version = UrlVersion::from_headers(text(ETAG), text(LAST_MODIFIED), length)
        .ok_or_else(|| ResolveError::NoVersion(url.to_owned()))?;
    Ok(FileHead { url: url.to_owned(), version })
}

/// The blobs `image` stands for: a file's one blob, or an image's configs and layers for the
/// platforms asked for (all when `platforms` is empty), each once.
pub async fn resolve(
    upstream: &Upstream,
    image: &ImageRef,
    target: Target,
    auth: Option<HeaderValue>,
    platforms: &[String],
) -> Result<Vec<BlobProgress>, ResolveError> {
    let reader = Reader { upstream, image, auth };
    if target == Target::File {
        let length = reader.blob_length(&image.reference).await?;
        let blob = BlobProgress { digest: image.reference.clone(), length, ..BlobProgress::default() };
        return Ok(vec![blob]);
    }
    let (bytes, media_type) = reader.manifest(&image.reference).await?;
    let mut blobs = Vec::new();
    match read_manifest(&bytes, &media_type, &image.reference, platforms)? {
        Manifest::Index(chosen) => {
            for (platform, digest) in chosen {
                let (bytes, media_type) = reader.manifest(&digest).await?;
                match read_manifest(&bytes, &media_type, &digest, &[])? {
                    Manifest::Image(found) => {
                        blobs.extend(found.into_iter().map(|b| BlobProgress { platform: platform.clone(), ..b }))
                    }
                    Manifest::Index(_) => {
                        let what = format!("the manifest {digest}");
                        return Err(ResolveError::Manifest { what, reason: "an index inside an index".to_owned() });
                    }
                }
            }
        }
        Manifest::Image(found) => blobs.extend(found),
    }
    let mut seen = HashSet::new();
    blobs.retain(|b: &BlobProgress| seen.insert(b.digest.clone()));
    Ok(blobs)
}

/// What a manifest's bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Manifest {
    /// An index: the manifests chosen for the platforms asked for, as (`os/arch[/variant]`,
    /// digest).
    Index(Vec<(String, String)>),
    /// An image: its config and layers.
    Image(Vec<BlobProgress>),
}

/// Reads a manifest or index a registry sent for `reference` (`media_type` from its
/// `Content-Type`), choosing an index's manifests for `platforms` (all when empty).
pub fn read_manifest(
    bytes: &[u8],
    media_type: &str,
    reference: &str,
    platforms: &[String],
) -> Result<Manifest, ResolveError> {
    if is_index(media_type, bytes) {
        let what = format!("the index {reference}");
        let index =
            ImageIndex::from_reader(bytes).map_err(|e| ResolveError::Manifest { what, reason: e.to_string() })?;
        return Ok(Manifest::Index(choose(index.manifests(), platforms)?));
    }
    manifest_blobs(bytes, reference, "").map(Manifest::Image)
}

fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    let named = |t: &str| t.contains("image.index") || t.contains("manifest.list");
    if named(media_type) {
        return true;
    }
    // Registries may answer a generic type; the document says what it is.
    let body: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    body.get("mediaType").and_then(|m| m.as_str()).is_some_and(named)
        || (body.get("manifests").is_some() && body.get("layers").is_none())
}

/// The index's manifests for `platforms` (all real platforms when empty), as
/// (`os/arch[/variant]`, digest). `linux/arm64` asks for `linux/arm64/v8` too.
fn choose(manifests: &[Descriptor], platforms: &[String]) -> Result<Vec<(String, String)>, ResolveError> {
    let mut all = Vec::new();
    for d in manifests {
        let Some(p) = d.platform() else { continue };
        let mut name = format!("{}/{}", p.os(), p.architecture());
        if let Some(v) = p.variant() {
            name = format!("{name}/{v}");
        }
        // Build attestations hang off indexes as "unknown/unknown" manifests: not images.
        if name.starts_with("unknown/") {
            continue;
        }
        all.push((name, d.digest().to_string()));
    }
    let chosen: Vec<_> = match platforms.is_empty() {
        true => all.clone(),
        false => all
            .iter()
            .filter(|(name, _)| platforms.iter().any(|w| name == w || name.starts_with(&format!("{w}/"))))
            .cloned()
            .collect(),
    };
    if chosen.is_empty() {
        let has = all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
        let wanted = if platforms.is_empty() { "any platform".to_owned() } else { platforms.join(", ") };
        return Err(ResolveError::NoPlatform { wanted, has });
    }
    Ok(chosen.into_iter().take(MAX_PLATFORMS).collect())
}

fn manifest_blobs(bytes: &[u8], reference: &str, platform: &str) -> Result<Vec<BlobProgress>, ResolveError> {
    let what = format!("the manifest {reference}");
    let manifest = ImageManifest::from_reader(bytes)
        .map_err(|e| ResolveError::Manifest { what: what.clone(), reason: e.to_string() })?;
    if matches!(manifest.media_type(), Some(MediaType::ImageIndex)) {
        return Err(ResolveError::Manifest {
            what,
            reason: "an index where an image manifest was expected".to_owned(),
        });
    }
    let descriptors = std::iter::once(manifest.config()).chain(manifest.layers());
    descriptors
        .map(|d| {
            let digest = d.digest().to_string();
            if damselfly_proto::Digest::parse(&digest).is_err() {
                return Err(ResolveError::Manifest {
                    what: what.clone(),
                    reason: format!("unsupported digest {digest}"),
                });
            }
            Ok(BlobProgress {
                digest,
                length: d.size(),
                media_type: d.media_type().to_string(),
                platform: platform.to_owned(),
                ..BlobProgress::default()
            })
        })
        .collect()
}

struct Reader<'a> {
    upstream: &'a Upstream,
    image: &'a ImageRef,
    auth: Option<HeaderValue>,
}

impl Reader<'_> {
    fn request(&self, method: Method, path: String) -> UpstreamRequest {
        let mut headers = HeaderMap::new();
        for t in MANIFEST_TYPES {
            headers.append(ACCEPT, HeaderValue::from_static(t));
        }
        UpstreamRequest {
            registry: self.image.registry.clone(),
            repo: self.image.repository.clone(),
            method,
            path,
            headers,
            client_auth: self.auth.clone(),
            anonymous: true,
        }
    }

    /// The manifest's bytes and media type, checked against `reference` when it is a digest.
    async fn manifest(&self, reference: &str) -> Result<(Vec<u8>, String), ResolveError> {
        let what = format!("{}/{}:{reference}", self.image.registry.host, self.image.repository);
        let reply = self.upstream.send(self.request(Method::GET, format!("manifests/{reference}"))).await?;
        let response = reply.response;
        if response.status() != StatusCode::OK {
            return Err(ResolveError::Status { status: response.status(), what });
        }
        let media_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ResolveError::Body { what: what.clone(), reason: e.to_string() })?;
            if body.len() + chunk.len() > MAX_MANIFEST {
                return Err(ResolveError::Body { what, reason: format!("larger than {MAX_MANIFEST} bytes") });
            }
            body.extend_from_slice(&chunk);
        }
        if let Ok(digest) = damselfly_proto::Digest::parse(reference) {
            let actual = format!("sha256:{:x}", Sha256::digest(&body));
            if actual != digest.to_string() {
                return Err(ResolveError::Digest { what });
            }
        }
        Ok((body, media_type))
    }

    async fn blob_length(&self, digest: &str) -> Result<u64, ResolveError> {
        let what = format!("{}/{}@{digest}", self.image.registry.host, self.image.repository);
        let reply = self.upstream.send(self.request(Method::HEAD, format!("blobs/{digest}"))).await?;
        let response = reply.response;
        if response.status() != StatusCode::OK {
            return Err(ResolveError::Status { status: response.status(), what });
        }
        let length = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        match length {
            Some(n) if n > 0 => Ok(n),
            _ => Err(ResolveError::Body { what, reason: "no usable Content-Length".to_owned() }),
        }
    }
}

#[cfg(test)]
mod tests;
