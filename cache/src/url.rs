//! Preheated files: a file at a plain URL that a seed fetches from its origin on a scheduler's
//! request (a preheat job of type `file`), and keeps in the P2P cache under the URL's name
//! (`UrlVersion::name`: the URL and the version its origin showed the scheduler). The other
//! nodes of the job take replicas from peers like any entry's, and the HTTP proxy serves the
//! URL from them while the origin still shows that version.
//!
//! How the origin is reached is the daemon's business ([`UrlOrigin`], handed in): the cache
//! knows nothing of HTTP clients or the upstream rules.

use std::fs::File;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use damselfly_p2p::net::UrlTask;
use damselfly_proto::cache_name::{now_ms, UrlVersion};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use crate::error::CacheError;
use crate::index::{Claim, Entry};
use crate::keeper::Cache;

/// A GET of a plain URL, with the preconditions that pin the version asked for.
#[derive(Clone, Debug)]
pub struct UrlRequest {
    pub url: String,
    /// Sent as it is (`Authorization`).
    pub authorization: Option<String>,
    /// `If-Match` (a strong ETag), or else `If-Unmodified-Since`.
    pub if_match: Option<String>,
    pub if_unmodified_since: Option<String>,
}

/// The origin's answer: its status, its validators and length, and the body.
pub struct UrlResponse {
    pub status: u16,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub length: Option<u64>,
    pub body: BoxStream<'static, Result<Bytes, String>>,
}

/// How the daemon fetches a file at a plain URL from its origin (its upstream rules: the
/// allow-list, addresses never reached).
pub trait UrlOrigin: Send + Sync + 'static {
    fn get(&self, req: UrlRequest) -> BoxFuture<'static, Result<UrlResponse, String>>;
}

/// Where files arrive before they are imported: removed at start, each one after its import.
pub(crate) fn incoming_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cache").join("incoming")
}

impl Cache {
    /// Takes a scheduler's request to fetch `task.url` (seeds only; the node checks): the file
    /// is fetched unless this node keeps that version already, and either way the schedulers
    /// hear that it does.
    pub(crate) fn fetch_url_asked(&self, task: UrlTask) {
        let Some(version) = UrlVersion::of_task(&task) else {
            tracing::warn!(url = %task.url, "a scheduler asked for a file without a version");
            return;
        };
        let key = version.name(&task.url).key();
        if self.held_entry(&key).is_some() {
            // Preheated again: kept for as long as this job asks.
            match self.renew(&key, task.expires_ms) {
                Ok(Some(e)) => self.tell_schedulers(e),
                Ok(None) => {}
                Err(e) => tracing::warn!(url = %task.url, error = %e, "cannot renew a preheated file"),
            }
            return;
        }
        let Some(me) = self.me() else { return };
        let refusal = match self.url_origin() {
            None => Some("this node fetches no files from origins".to_owned()),
            Some(_) if !self.room_for_replica(task.length) => {
                Some(format!("{} bytes would take kept content past half this node's cache quota", task.length))
            }
            Some(_) => None,
        };
        if let Some(why) = refusal {
            tracing::warn!(url = %task.url, reason = %why, "declining to preheat a file");
            tokio::spawn(async move { me.report_failure(&key, &why).await });
            return;
        }
        if !self.start_fetch(&key) {
            return;
        }
        tokio::spawn(async move {
            if let (Ok(_slot), Some(origin)) = (me.fetch_slot().await, me.url_origin()) {
                match me.preheat_file(&*origin, &task, &version).await {
                    Ok(entry) => {
                        tracing::info!(url = %task.url, digest = %entry.digest, "preheated a file from its origin");
                        me.tell_schedulers(entry);
                    }
                    Err(e) => {
                        tracing::warn!(url = %task.url, error = %e, "cannot preheat a file");
                        me.report_failure(&key, &e.to_string()).await;
                    }
                }
            }
            me.end_fetch(&key);
        });
    }

    /// Tells the schedulers why the file named `key` was not fetched, for the job's reason.
    async fn report_failure(&self, key: &str, why: &str) {
        if let Some(node) = self.node() {
            node.failed_url_task(key, why).await;
        }
    }

    /// Fetches the file into `incoming/`, imports it and names it.
    async fn preheat_file(
        &self,
        origin: &dyn UrlOrigin,
        task: &UrlTask,
        version: &UrlVersion,
    ) -> Result<Entry, CacheError> {
        let name = version.name(&task.url);
        let req = UrlRequest {
            url: task.url.clone(),
            authorization: Some(task.authorization.clone()).filter(|a| !a.is_empty()),
            if_match: version.etag.clone(),
            if_unmodified_since: version.last_modified.clone().filter(|_| version.etag.is_none()),
        };
        let resp = origin.get(req).await.map_err(CacheError::Fetch)?;
        if resp.status != 200 {
            return Err(CacheError::Fetch(format!("the origin answered {}", resp.status)));
        }
        // An origin that ignores preconditions shows what it sent in its validators.
        let sent = UrlVersion::from_headers(resp.etag.as_deref(), resp.last_modified.as_deref(), version.length);
        if sent.as_ref() != Some(version) || resp.length.is_some_and(|n| n != version.length) {
            return Err(CacheError::Fetch("the file changed at its origin since the preheat began".into()));
        }
        let path = self.incoming().join(format!("{}.part", name.key()));
        let imported = self.receive_and_import(&path, resp.body, version.length).await;
        // Imported, the store has its own name for the bytes (a hard link of this file, which
        // is the daemon's and nobody else's, or a copy); either way this one goes.
        let _ = std::fs::remove_file(&path);
        let imported = imported?;
        let now = now_ms();
        let entry = Entry {
            id: name.id().to_owned(),
            tag: name.tag().to_owned(),
            digest: imported.task.digest().clone(),
            length: imported.task.len(),
            created_ms: now,
            expires_ms: task.expires_ms,
            replicas: 1,
            url: task.url.clone(),
        };
        drop(imported.task);
        let digest = entry.digest.clone();
        match self.name_content(entry, now) {
            Ok(Claim::New(e) | Claim::Held(e)) => Ok(e),
            Ok(Claim::Taken(e)) => {
                self.let_go(&digest);
                Err(CacheError::Conflict(format!("the name is {} here", e.digest)))
            }
            Err(e) => {
                self.let_go(&digest);
                Err(e)
            }
        }
    }

    async fn receive_and_import(
        &self,
        path: &Path,
        body: BoxStream<'static, Result<Bytes, String>>,
        length: u64,
    ) -> Result<damselfly_p2p::import::Imported, CacheError> {
        let file = receive(path, body, length).await?;
        let store = self.store().clone();
        tokio::task::spawn_blocking(move || store.import(&file, &|_| {}))
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(e)))?
            .map_err(CacheError::from)
    }
}

/// Writes `body` into a new file at `path` (owner-only), refusing more or fewer than `length`
/// bytes; returns it open for reading.
async fn receive(
    path: &Path,
    mut body: BoxStream<'static, Result<Bytes, String>>,
    length: u64,
) -> Result<File, CacheError> {
    use tokio::io::AsyncWriteExt;
    let _ = std::fs::remove_file(path);
    let mut out = tokio::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path).await?;
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| CacheError::Fetch(format!("reading the file from its origin: {e}")))?;
        got += chunk.len() as u64;
        if got > length {
            return Err(CacheError::Fetch(format!("the origin sent more than the {length} bytes it announced")));
        }
        out.write_all(&chunk).await?;
    }
    if got != length {
        return Err(CacheError::Fetch(format!("the origin sent {got} of {length} bytes")));
    }
    out.flush().await?;
    Ok(out.into_std().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: &[&'static [u8]]) -> BoxStream<'static, Result<Bytes, String>> {
        futures_util::stream::iter(chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect::<Vec<_>>()).boxed()
    }

    #[tokio::test]
    async fn a_body_longer_or_shorter_than_announced_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.part");
        assert!(receive(&p, body(&[b"abc", b"de"]), 5).await.is_ok());
        assert!(receive(&p, body(&[b"abc", b"def"]), 5).await.is_err());
        assert!(receive(&p, body(&[b"abc"]), 5).await.is_err());
        let failing = futures_util::stream::iter(vec![Ok(Bytes::from_static(b"a")), Err("reset".to_owned())]).boxed();
        assert!(receive(&p, failing, 5).await.is_err());
    }
}
