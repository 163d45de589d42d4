//! Files preheated from plain URLs (a preheat job of type `file`, `damselfly_cache::url`)
//! served to proxy clients from the P2P cache.
//!
//! A plain `GET` whose URL matches a proxy rule is looked up by the version its origin shows
//! this client now: a `HEAD` with the client's own `Authorization` says whether the client may
//! read it and which version it is (ETag or Last-Modified, and length). Only that version's
//! entry is served, from this node or its peers, verified piece by piece; anything else (no
//! entry, another version, a `HEAD` the origin refuses, a range or conditional request) is
//! forwarded as any request is. So the cluster never serves a stale file or one the client
//! could not read from its origin.

use std::fs::File;

use bytes::Bytes;
use damselfly_proto::cache_name::UrlVersion;
use http::header::{
    HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE, VIA,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::AsyncReadExt;

use super::{Client, Proxy, Target};
use crate::api::response::{stream, Body};
use crate::upstream::guard::Reach;

/// Requests that ask for part of a file, or for it only under a condition: the origin answers.
const FORWARDED: [http::header::HeaderName; 6] =
    [RANGE, IF_RANGE, IF_MATCH, IF_NONE_MATCH, IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE];

/// Bytes read from the file per body frame.
const CHUNK: usize = 256 << 10;

impl Proxy {
    /// Whether a plain request is one to look for among preheated files: a whole `GET` whose
    /// URL matches a rule.
    pub(super) fn may_be_preheated<B>(&self, req: &Request<B>, target: &Target) -> bool {
        self.files.is_some()
            && req.method() == Method::GET
            && !FORWARDED.iter().any(|h| req.headers().contains_key(h))
            && self.rules.matches(&target.url())
    }

    /// The file from the P2P cache, if a preheat put there the version the origin shows this
    /// client; `None`: forward the request.
    pub(super) async fn preheated<B>(
        &self,
        req: &Request<B>,
        target: &Target,
        client: Client,
    ) -> Option<Response<Body>> {
        let files = self.files.as_ref()?;
        // As forwarding would: internal destinations only for clients that may reach them.
        let reach = self.reach(target.scheme.as_str(), &target.host, target.port, client).ok()?;
        if reach == Reach::Public && crate::upstream::names_internal(&target.host) {
            return None;
        }
        let url = url::Url::parse(&target.url()).ok()?.to_string();
        let auth = req.headers().get(AUTHORIZATION);
        let head = match self.app.upstream.send_url(Method::HEAD, &url, HeaderMap::new(), auth).await {
            Ok(head) if head.status() == StatusCode::OK => head,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(%url, error = %e, "no HEAD for a proxied file; forwarding it");
                return None;
            }
        };
        let text = |name| head.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
        let length: u64 = text(CONTENT_LENGTH)?.parse().ok()?;
        let version = UrlVersion::from_headers(text(ETAG), text(LAST_MODIFIED), length)?;
        let key = version.name(&url).key();
        let (file, entry) = match files.open_key(&key).await {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(%url, error = %e, "a preheated file could not be had from the cluster; forwarding");
                return None;
            }
        };
        if entry.length != length || file.metadata().ok()?.len() != length {
            return None;
        }
        tracing::debug!(%url, digest = %entry.digest, "serving a preheated file from the P2P cache");
        let mut resp = Response::new(stream(chunks(file)));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        for name in [ETAG, LAST_MODIFIED, CONTENT_TYPE] {
            if let Some(v) = head.headers().get(&name) {
                headers.insert(name, v.clone());
            }
        }
        headers.insert(VIA, HeaderValue::from_static(super::forward::VIA_VALUE));
        Some(resp)
    }
}

/// The file's bytes from its start, in chunks.
fn chunks(file: File) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let file = tokio::fs::File::from_std(file);
    futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0; CHUNK];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), file)))
    })
}
