//! Files preheated from plain URLs (a preheat job of type `file`, `damselfly_cache::url`)
//! served to proxy clients from the P2P cache.
//!
//! A plain `GET` whose URL matches a proxy rule is looked up by the version its origin shows
//! this client now: a `HEAD` with the client's own `Authorization`, sent where forwarding could
//! go for this client, says whether the client may read it and which version it is (`ETag` or
//! `Last-Modified`, and length). Only that version's entry is served, from this node or as its
//! peers deliver it, every piece verified and the last byte held until the whole matched.
//! Anything else is forwarded as any request is: no entry, another version, a `HEAD` the origin
//! refuses, a response a shared cache may not keep (`private`, `no-store`) or that varies with
//! the request (`Vary`), a range or conditional request.

use damselfly_proto::cache_name::UrlVersion;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_TYPE, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED,
    RANGE, VIA,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::{Client, Proxy, Target};
use crate::api::response::{stream, Body};
use crate::upstream::guard::Reach;

/// Requests that ask for part of a file, or for it only under a condition: the origin answers.
const FORWARDED: [HeaderName; 6] = [RANGE, IF_RANGE, IF_MATCH, IF_NONE_MATCH, IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE];

/// What the origin's `HEAD` says that the response carries too.
const COPIED: [HeaderName; 6] =
    [ETAG, LAST_MODIFIED, CONTENT_TYPE, CONTENT_ENCODING, CONTENT_DISPOSITION, CACHE_CONTROL];

impl Proxy {
    /// The file from the P2P cache, if the request is a whole `GET` whose URL matches a rule
    /// and a preheat put there the version the origin shows this client; `None`: forward the
    /// request.
    pub(super) async fn preheated<B>(
        &self,
        req: &Request<B>,
        target: &Target,
        client: Client,
    ) -> Option<Response<Body>> {
        let files = self.files.as_ref()?;
        let url = target.url();
        let candidate = req.method() == Method::GET
            && !FORWARDED.iter().any(|h| req.headers().contains_key(h))
            && self.rules.matches(&url);
        if !candidate {
            return None;
        }
        // Where forwarding would go for this client, and nowhere else.
        let reach = self.reach(target.scheme.as_str(), &target.host, target.port, client).ok()?;
        if reach == Reach::Public && crate::upstream::names_internal(&target.host) {
            return None;
        }
        let mut url = url::Url::parse(&url).ok()?;
        url.set_fragment(None);
        let url = url.to_string();
        let auth = req.headers().get(AUTHORIZATION);
        let head = match self.app.upstream.send_url(Method::HEAD, &url, HeaderMap::new(), auth, Some(reach)).await {
            Ok(head) if head.status() == StatusCode::OK => head,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(%url, error = %e, "no HEAD for a proxied file; forwarding it");
                return None;
            }
        };
        let headers = head.headers();
        if !crate::upstream::shared_caches_may_keep(headers) {
            return None;
        }
        let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
        let length: u64 = text(CONTENT_LENGTH)?.parse().ok()?;
        let version = UrlVersion::from_headers(text(ETAG), text(LAST_MODIFIED), length)?;
        let key = version.name(&url).key();
        let (entry, content) = match files.read_key(&key).await {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(%url, error = %e, "a preheated file could not be had from the cluster; forwarding");
                return None;
            }
        };
        if entry.length != length {
            return None;
        }
        tracing::debug!(%url, digest = %entry.digest, "serving a preheated file from the P2P cache");
        let mut resp = Response::new(stream(content));
        let out = resp.headers_mut();
        out.insert(CONTENT_LENGTH, HeaderValue::from(length));
        for name in COPIED {
            for v in headers.get_all(&name) {
                out.append(name.clone(), v.clone());
            }
        }
        out.insert(VIA, HeaderValue::from_static(super::forward::VIA_VALUE));
        Some(resp)
    }
}
