//! Who may read cached content. A digest is a content address, not a permission: content is
//! served from the cache only to a client the origin would serve it to — it is public in that
//! repository, or the client's credentials pass an upstream `HEAD` (remembered briefly).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use damselfly_p2p::{Digest, TaskRef};
use http::{Method, StatusCode};
use lru::LruCache;
use sha2::Digest as _;

use super::error::ApiError;
use super::{App, Target};
use crate::oci::ContentKind;
use crate::upstream::CredentialKind;

/// How long a successful check with a client's credentials is trusted.
const GRANT_TTL: Duration = Duration::from_secs(300);
/// How long "the origin serves this to anyone" is trusted before it is asked again, so that a
/// repository made private (or content deleted) stops being served from the cache.
const PUBLIC_TTL: Duration = Duration::from_secs(3600);
const MAX_GRANTS: usize = 16 * 1024;

type GrantKey = (String, Digest, String);

/// The manifest types a pull client accepts, for access checks of cached manifests.
pub(super) const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

pub struct AccessCache {
    grants: Mutex<LruCache<GrantKey, Instant>>,
}

impl Default for AccessCache {
    fn default() -> Self {
        let cap = NonZeroUsize::new(MAX_GRANTS).unwrap_or(NonZeroUsize::MIN);
        AccessCache { grants: Mutex::new(LruCache::new(cap)) }
    }
}

impl AccessCache {
    fn allowed(&self, key: &GrantKey) -> bool {
        let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        g.get(key).is_some_and(|until| *until > Instant::now())
    }

    fn grant(&self, key: GrantKey) {
        let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        g.put(key, Instant::now() + GRANT_TTL);
    }
}

/// Identifies the credentials a request acts with, without keeping the secret itself.
pub fn identity(client_auth: &Option<http::HeaderValue>) -> String {
    match client_auth {
        Some(v) => {
            let h = sha2::Sha256::digest(v.as_bytes());
            h.iter().take(16).map(|b| format!("{b:02x}")).collect()
        }
        None => "daemon".to_owned(),
    }
}

/// Records what a successful origin fetch proved about who may read this content.
pub fn remember(app: &App, target: &Target, task: &TaskRef, credential: CredentialKind) {
    if credential == CredentialKind::Anonymous {
        task.mark_public(&target.origin_repo());
    } else {
        app.access.grant((target.origin_repo(), target.digest.clone(), identity(&target.client_auth)));
    }
}

/// `Ok` when the requester may read cached `task`; otherwise why not.
pub async fn authorize(app: &App, target: &Target, task: &TaskRef, kind: ContentKind) -> Result<(), ApiError> {
    let repo = target.origin_repo();
    let public_age = task.public_age(&repo);
    if public_age.is_some_and(|age| age < PUBLIC_TTL.as_secs()) {
        app.metrics.access("public");
        return Ok(());
    }
    let key = (repo, target.digest.clone(), identity(&target.client_auth));
    if app.access.allowed(&key) {
        app.metrics.access("remembered");
        return Ok(());
    }
    app.metrics.origin("access_check");
    let mut headers = http::HeaderMap::new();
    if kind == ContentKind::Manifest {
        // Registries answer 404 to a manifest HEAD whose Accept does not list its type.
        for t in task.media_type().iter().map(String::as_str).chain(MANIFEST_TYPES) {
            if let Ok(v) = http::HeaderValue::from_str(t) {
                headers.append(http::header::ACCEPT, v);
            }
        }
    }
    let req = target.request(Method::HEAD, kind, headers.clone());
    let reply = match app.upstream.send(req).await {
        // Some registries and proxies answer no HEAD; a client would GET. One byte of a blob,
        // or the (small) manifest, says as much.
        Ok(r) if matches!(r.response.status(), StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED) => {
            if kind == ContentKind::Blob {
                headers.insert(http::header::RANGE, http::HeaderValue::from_static("bytes=0-0"));
            }
            app.upstream.send(target.request(Method::GET, kind, headers)).await
        }
        r => r,
    };
    let reply = match reply {
        Ok(r) => r,
        // Content the origin served to anyone is still served while the origin cannot be
        // asked: nothing says it changed, and a mirror must not fail a pull the cache can serve.
        Err(e) if public_age.is_some() => {
            tracing::info!(error = %e, "origin unreachable; serving content last seen public");
            app.metrics.access("public_stale");
            return Ok(());
        }
        Err(e) => {
            app.metrics.access("unavailable");
            return Err(ApiError::origin(format!("cannot check access with the origin: {e}")));
        }
    };
    if matches!(reply.response.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
        app.metrics.access("checked");
        remember(app, target, task, reply.credential);
        return Ok(());
    }
    app.metrics.access("denied");
    tracing::info!(digest = %target.digest, repo = %target.repo, status = %reply.response.status(), "cached content refused");
    Err(ApiError::refused(reply.response.status(), reply.response.headers(), kind))
}
