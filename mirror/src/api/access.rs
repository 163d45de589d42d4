//! Who may read cached content. A digest is a content address, not a permission: content is
//! served from the cache only to a client the origin would serve it to, and only after that
//! origin showed it holds the content (`proof.rs`): it is public in that repository, or the
//! origin served the client's credentials the content itself (remembered briefly).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use damselfly_p2p::{Digest, TaskRef};
use lru::LruCache;
use sha2::Digest as _;

use super::error::ApiError;
use super::proof::{probe_blob, prove_manifest, window_offset, Probe};
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

/// How a requester is let read cached content.
pub enum Access {
    /// Its registry showed it holds the content before (it is public there, or it served the
    /// requester's credentials recently).
    Granted,
    /// Its registry sent these first bytes of the span asked for: the response must start with
    /// them (`proof::matching`), and the grant is remembered once it did.
    Window(Probe),
}

/// Whether the requester may read `span` of cached `task`, or why not.
pub async fn authorize(
    app: &App,
    target: &Target,
    task: &TaskRef,
    kind: ContentKind,
    span: std::ops::Range<u64>,
) -> Result<Access, ApiError> {
    let repo = target.origin_repo();
    let public_age = task.public_age(&repo);
    if public_age.is_some_and(|age| age < PUBLIC_TTL.as_secs()) {
        app.metrics.access("public");
        return Ok(Access::Granted);
    }
    let key = (repo, target.digest.clone(), identity(&target.client_auth));
    if app.access.allowed(&key) {
        app.metrics.access("remembered");
        return Ok(Access::Granted);
    }
    app.metrics.origin("access_check");
    let checked = match kind {
        ContentKind::Blob => probe_blob(app, target, window_offset(task, &span)).await.map(Access::Window),
        ContentKind::Manifest => {
            // Registries answer 404 to a manifest request whose Accept does not list its type.
            let mut accept = http::HeaderMap::new();
            for t in task.media_type().iter().map(String::as_str).chain(MANIFEST_TYPES) {
                if let Ok(v) = http::HeaderValue::from_str(t) {
                    accept.append(http::header::ACCEPT, v);
                }
            }
            prove_manifest(app, target, accept).await.map(|credential| {
                remember(app, target, task, credential);
                Access::Granted
            })
        }
    };
    match checked {
        Ok(access) => {
            app.metrics.access("checked");
            Ok(access)
        }
        // Content the origin served to anyone is still served while the origin cannot be
        // asked: nothing says it changed, and a mirror must not fail a pull the cache can serve.
        Err(ApiError::Origin(e)) if public_age.is_some() => {
            tracing::info!(error = %e, "origin unreachable; serving content last seen public");
            app.metrics.access("public_stale");
            Ok(Access::Granted)
        }
        Err(e) => {
            let outcome = match &e {
                ApiError::Disproved(_) => "disproved",
                ApiError::Origin(_) => "unavailable",
                _ => "denied",
            };
            app.metrics.access(outcome);
            tracing::info!(digest = %target.digest, repo = %target.repo, registry = %target.registry.host, error = %e, "cached content refused");
            Err(e)
        }
    }
}
