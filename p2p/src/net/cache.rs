//! The node's side of the P2P cache's names: what it hands the schedulers (puts, stats, drops)
//! and the [`CacheKeeper`] through which the cache above it is told what they ask.

use damselfly_proto::v1 as proto;

use super::{task_info, NetError, Node};
use crate::digest::Digest;

pub use damselfly_proto::v1::{CacheEntry, UrlTask};

/// What the P2P cache keeps on this node, handed to the node by whoever composes it (the cache
/// sits above the node): the entries to announce, and what schedulers ask of it.
pub trait CacheKeeper: Send + Sync + 'static {
    /// Every entry this node keeps, announced with the host.
    fn entries(&self) -> Vec<CacheEntry>;
    /// A scheduler asks this node to keep a replica of `entry`.
    fn keep(&self, entry: CacheEntry);
    /// A scheduler asks this node to drop the entry under `key` (deleted everywhere).
    fn drop_entry(&self, key: &str);
    /// A scheduler asks this seed to fetch a file at a plain URL from its origin and keep it
    /// under the URL's name (a preheat).
    fn fetch_url(&self, task: UrlTask);
}

impl Node {
    /// Tells every scheduler this node keeps `entry`, announcing its content first (so that
    /// the piece digests are pinned before anyone is asked for a replica). Fails when no
    /// scheduler took it, or one refused it (the name stands for other content there); the
    /// others are told all the same.
    pub async fn put_cache_entry(&self, entry: CacheEntry) -> Result<(), NetError> {
        let tasks: Vec<proto::TaskInfo> = Digest::parse(&entry.digest)
            .ok()
            .and_then(|d| self.store.get(&d).ok().flatten())
            .map(|t| t.meta())
            .filter(|m| m.verified)
            .map(task_info)
            .into_iter()
            .collect();
        let mut last = None;
        let mut took = false;
        let mut refused = None;
        for i in 0..self.schedulers.len() {
            if let Err(s) = self.announce_with(i, tasks.clone(), None).await {
                last = Some(NetError::NoScheduler(s.message().to_owned()));
                continue;
            }
            let req = proto::PutCacheEntryRequest { host_id: self.cfg.host_id.clone(), entry: Some(entry.clone()) };
            match self.schedulers.put_cache_entry(i, req).await {
                Ok(()) => took = true,
                Err(s) if s.code() == tonic::Code::FailedPrecondition || s.code() == tonic::Code::InvalidArgument => {
                    refused = Some(NetError::Refused(s.message().to_owned()));
                }
                Err(s) => {
                    self.schedulers.failed(i, &s);
                    last = Some(NetError::NoScheduler(s.message().to_owned()));
                }
            }
        }
        if let Some(refusal) = refused {
            return Err(refusal);
        }
        match (took, last) {
            (true, _) => Ok(()),
            (false, Some(e)) => Err(e),
            (false, None) => Err(NetError::NoScheduler("no scheduler configured".to_owned())),
        }
    }

    /// What the cluster says the entry under `key` is, and which hosts keep it.
    pub async fn stat_cache_entry(&self, key: &str) -> Result<Option<(CacheEntry, Vec<String>)>, NetError> {
        let resp = self.schedulers.stat_cache_entry(key).await?;
        Ok(resp.entry.map(|e| (e, resp.holders)))
    }

    /// Tells the schedulers this seed could not fetch the file a scheduler asked it for (named
    /// `key`), and why.
    pub async fn failed_url_task(&self, key: &str, reason: &str) {
        for i in 0..self.schedulers.len() {
            let req = proto::FailedUrlTaskRequest {
                host_id: self.cfg.host_id.clone(),
                key: key.to_owned(),
                reason: reason.to_owned(),
            };
            if let Err(s) = self.schedulers.failed_url_task(i, req).await {
                self.schedulers.failed(i, &s);
            }
        }
    }

    /// Tells every scheduler this node no longer keeps the entry under `key`; `everywhere`:
    /// asks them to have every holder drop it. Fails when no scheduler heard it.
    pub async fn drop_cache_entry(&self, key: &str, everywhere: bool) -> Result<(), NetError> {
        let mut heard = false;
        let mut last = None;
        for i in 0..self.schedulers.len() {
            let req =
                proto::DropCacheEntryRequest { host_id: self.cfg.host_id.clone(), key: key.to_owned(), everywhere };
            match self.schedulers.drop_cache_entry(i, req).await {
                Ok(()) => heard = true,
                Err(s) => {
                    self.schedulers.failed(i, &s);
                    last = Some(s.message().to_owned());
                }
            }
        }
        if heard {
            Ok(())
        } else {
            Err(NetError::NoScheduler(last.unwrap_or_else(|| "no scheduler configured".to_owned())))
        }
    }
}
