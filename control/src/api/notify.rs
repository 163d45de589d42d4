//! Registry push notifications: the CNCF distribution envelope `docker-registry` sends to its
//! `notifications.endpoints` (lowercase keys) and Harbor's Kraken provider sends (capitalised
//! keys). A push of a manifest starts a preheat of that manifest; anything else is ignored.
//! The registry gets its 2xx at once; the jobs run like any other.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;

use super::{json, parse, Api, ApiError};
use crate::job::{JobSpec, Origin, Scope, Target, DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT};

/// Events one envelope may start jobs for.
const MAX_EVENTS: usize = 100;

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(alias = "Events", default)]
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(alias = "Action", default)]
    action: String,
    #[serde(alias = "Target", default)]
    target: Option<EventTarget>,
}

#[derive(Debug, Deserialize)]
struct EventTarget {
    #[serde(alias = "MediaType", rename = "mediaType", default)]
    media_type: String,
    #[serde(alias = "Url", default)]
    url: String,
}

/// The jobs an envelope asks for: one per manifest push, at most [`MAX_EVENTS`].
pub(super) fn specs(body: &[u8], scope: Scope) -> Result<Vec<JobSpec>, ApiError> {
    let envelope: Envelope = parse(body)?;
    let pushes = envelope.events.into_iter().take(MAX_EVENTS).filter(|e| e.action == "push");
    // A URL that reads as no manifest is skipped: the registry would only send it again.
    let targets = pushes
        .filter_map(|e| e.target)
        .filter(is_manifest)
        .filter(|t| crate::resolve::check_url(&t.url, Target::Image).is_ok());
    Ok(targets
        .map(|target| JobSpec {
            target: Target::Image,
            url: target.url,
            headers: Default::default(),
            scope,
            platforms: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            origin: Origin::Notification,
        })
        .collect())
}

pub(super) async fn receive(api: &Api, body: Bytes) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut started = Vec::new();
    for spec in specs(&body, api.notification_scope)? {
        // A pending job for the same manifest will preheat it anyway.
        if let Some(previous) = api.store.latest_for(&spec.url, spec.scope).await? {
            if !previous.state.is_done() {
                continue;
            }
        }
        started.push(api.create(&spec).await?.0);
    }
    Ok(json(StatusCode::OK, &serde_json::json!({ "jobs": started })))
}

/// A manifest push: by its media type, or by its URL when the type is missing.
fn is_manifest(target: &EventTarget) -> bool {
    let t = target.media_type.as_str();
    let typed = t.contains("manifest") || t.contains("image.index");
    !target.url.is_empty() && (typed || (t.is_empty() && target.url.contains("/manifests/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_the_envelope_parse() {
        let lower = br#"{"events":[{"id":"1","action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:x","url":"http://r/v2/a/manifests/sha256:x"}}]}"#;
        let upper = br#"{"Events":[{"Id":"1","Action":"push","Target":{"MediaType":"application/vnd.docker.distribution.manifest.v2+json","Url":"https://h/v2/a/manifests/1"},"Request":null,"Actor":null}]}"#;
        for body in [&lower[..], &upper[..]] {
            let e: Envelope = parse(body).expect("parses");
            assert!(e.events[0].target.as_ref().is_some_and(is_manifest));
        }
    }

    #[test]
    fn blob_pushes_and_pulls_start_nothing() {
        let blob =
            EventTarget { media_type: "application/octet-stream".into(), url: "http://r/v2/a/blobs/sha256:x".into() };
        let layer = EventTarget {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            url: "http://r/v2/a/blobs/sha256:x".into(),
        };
        assert!(!is_manifest(&blob) && !is_manifest(&layer));
        let untyped = EventTarget { media_type: String::new(), url: "http://r/v2/a/manifests/1".into() };
        assert!(is_manifest(&untyped));
    }
}
