//! The P2P cache's names: which content an (id, tag) names, which hosts keep it, and which
//! others are asked to keep a replica until the entry's replica count is met. Soft like the
//! rest of the state: holders announce their entries again after a restart.
//!
//! Every scheduler a node knows hears every put, so every one of them may place replicas;
//! they pick hosts in one order (seeds first, then by a hash of the key and the host id), so
//! that several schedulers ask the same hosts instead of one each.

use std::time::{Duration, Instant};

pub(crate) use damselfly_proto::cache_name::now_ms;
use damselfly_proto::cache_name::{is_key, label, later_expiry, url_agrees, CacheName, UrlVersion, MAX_REPLICAS};
use sha2::{Digest as _, Sha256};

use crate::download::check_digest;
use crate::error::SchedulerError;
use crate::proto::{hold_task, CacheEntry, HoldTask, UrlTask};
use crate::state::{Id, Map, PeerState, Set, SoftState};

/// Entries one scheduler keeps; more are refused until some expire or are deleted.
const MAX_ENTRIES: usize = 100_000;
/// How long asks to fetch a file, and seeds' reports of failing to, are remembered; and how
/// many at most.
const URL_ASKS_FOR: Duration = Duration::from_secs(600);
const MAX_URL_ASKS: usize = 1024;
/// Longest reason a seed may give.
const MAX_REASON: usize = 512;
/// Longest URL a preheated file's entry may carry.
const MAX_URL: usize = 4096;
/// Entries one host may keep here.
const MAX_HOST_ENTRIES: usize = 10_000;
/// Entries lacking replicas looked at per round, in turn: the rest wait for the next rounds.
const PLACE_PER_ROUND: usize = 32;
/// Entries deleted everywhere, remembered so that a holder that missed the drop and announces
/// the entry again is told to drop it.
const MAX_DELETED: usize = 10_000;
const DELETED_FOR: Duration = Duration::from_secs(24 * 3600);
/// A host asked for a replica counts as one for this long before it holds it.
const ASK_PATIENCE: Duration = Duration::from_secs(30);
/// A host that was asked and did not come is not asked again for this long.
const ASK_AGAIN: Duration = Duration::from_secs(300);

#[derive(Default)]
pub(crate) struct CacheEntries {
    records: Map<String, Record>,
    /// Key → the creation time of the entry deleted, and when.
    deleted: Map<String, (u64, Instant)>,
    /// Keys each host keeps, so that a host's leaving or full announcement costs its own
    /// entries, not a scan of all.
    held: Map<Id, Set<String>>,
    /// Entries that may lack replicas: the only ones a round looks at.
    short: Short,
    /// Files at plain URLs a seed was asked to fetch: key → the seed, and when.
    url_asks: Map<String, (Id, Instant)>,
    /// Why the seed asked could not: key → the seed, its reason, and when it said so.
    url_failures: Map<String, UrlFailure>,
}

/// A seed's report that it could not fetch a file it was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlFailure {
    pub host: String,
    pub reason: String,
    pub at: Instant,
}

/// Keys in turn: each round takes the next few, and puts back those still lacking replicas.
#[derive(Default)]
struct Short {
    set: Set<String>,
    queue: std::collections::VecDeque<String>,
}

impl Short {
    fn insert(&mut self, key: &str) {
        if self.set.insert(key.to_owned()) {
            self.queue.push_back(key.to_owned());
        }
    }

    fn remove(&mut self, key: &str) {
        // Its place in the queue is skipped when it comes up.
        self.set.remove(key);
    }

    /// Up to `n` keys, taken off the queue.
    fn take(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            let Some(key) = self.queue.pop_front() else { break };
            if self.set.remove(&key) {
                out.push(key);
            }
        }
        out
    }
}

struct Record {
    entry: CacheEntry,
    holders: Vec<Id>,
    /// Hosts asked for a replica, and when.
    asked: Vec<(Id, Instant)>,
}

/// What a scheduler says of an entry.
pub(crate) struct Stat {
    pub entry: CacheEntry,
    pub holders: Vec<String>,
}

/// Checks an entry as a member sent it.
pub(crate) fn check_entry(e: &CacheEntry) -> Result<(), SchedulerError> {
    let name = CacheName::new(&e.id, &e.tag).map_err(|err| SchedulerError::invalid(format!("cache entry: {err}")))?;
    if name.key() != e.key {
        return Err(SchedulerError::invalid("cache entry: the key is not the one its id and tag give"));
    }
    check_digest(&e.digest)?;
    if !url_agrees(&e.id, &e.url) || e.url.len() > MAX_URL {
        return Err(SchedulerError::invalid("cache entry: a preheated file's id is its URL's, and only its"));
    }
    if e.replicas == 0 || e.replicas > MAX_REPLICAS {
        return Err(SchedulerError::invalid(format!("cache entry: replicas must be 1 to {MAX_REPLICAS}")));
    }
    Ok(())
}

pub(crate) fn check_key(key: &str) -> Result<(), SchedulerError> {
    if is_key(key) {
        Ok(())
    } else {
        Err(SchedulerError::invalid("cache key: not 64 lower-case hex digits"))
    }
}

fn expired(e: &CacheEntry, now_ms: u64) -> bool {
    damselfly_proto::cache_name::expired(e.expires_ms, now_ms)
}

impl SoftState {
    /// `host` keeps `entry` (checked by the caller). An entry another put named with other
    /// content is refused; one deleted everywhere since it was created is dropped at `host`.
    pub(crate) fn put_cache_entry(&mut self, host: &Id, entry: CacheEntry) -> Result<(), SchedulerError> {
        let now_ms = now_ms();
        if expired(&entry, now_ms) {
            return Ok(());
        }
        // A host keeps only content it announced whole and verified, of the entry's length: a
        // name cannot send others after content nobody holds.
        let holds = self.tasks.get(entry.digest.as_str()).is_some_and(|t| {
            t.length == entry.length && t.idx(&**host).is_some_and(|i| t.peers[i].state == PeerState::Finished)
        });
        if !holds {
            return Err(SchedulerError::precondition(format!(
                "{host} has not announced {} ({} bytes) whole and verified",
                entry.digest, entry.length
            )));
        }
        let cache = &mut self.cache;
        if cache.held.get(host).is_some_and(|h| h.len() >= MAX_HOST_ENTRIES && !h.contains(&entry.key)) {
            return Err(SchedulerError::Exhausted(format!("{host} keeps {MAX_HOST_ENTRIES} cache entries here")));
        }
        if cache.deleted.get(&entry.key).is_some_and(|(created, _)| entry.created_ms <= *created) {
            self.ask_host(host, hold_task::Kind::Drop(entry.key));
            return Ok(());
        }
        if let Some(r) = cache.records.get_mut(&entry.key) {
            if expired(&r.entry, now_ms) {
                cache.records.remove(&entry.key);
            } else {
                if r.entry.digest != entry.digest || r.entry.length != entry.length {
                    return Err(SchedulerError::precondition(format!(
                        "{} names other content ({}) in the cluster; delete it everywhere first",
                        name_of(&r.entry),
                        r.entry.digest
                    )));
                }
                if !r.holders.contains(host) {
                    r.holders.push(host.clone());
                }
                r.asked.retain(|(h, _)| h != host);
                cache.held.entry(host.clone()).or_default().insert(entry.key.clone());
                // The first import's terms stand: a replica repeats them, and an older
                // announcement must not shorten them. A preheated file preheated again is kept
                // as long as its seed now says.
                let renewed = !entry.url.is_empty()
                    && later_expiry(r.entry.expires_ms, entry.expires_ms)
                    && self.hosts.get(host).is_some_and(|h| h.seed);
                if renewed {
                    r.entry.expires_ms = entry.expires_ms;
                } else if entry.created_ms < r.entry.created_ms {
                    r.entry = entry;
                }
                return Ok(());
            }
        }
        // What a URL names is only the cluster's word: a member could name its own bytes for a
        // URL that clients fetch through the proxy. So a preheated file is named by a seed,
        // which fetched it from its origin; others may only hold what it named.
        if !entry.url.is_empty() && !self.hosts.get(host).is_some_and(|h| h.seed) {
            return Err(SchedulerError::precondition(format!(
                "{host} is no seed: only a seed names a preheated file ({})",
                entry.url
            )));
        }
        let cache = &mut self.cache;
        if cache.records.len() >= MAX_ENTRIES {
            return Err(SchedulerError::Exhausted(format!("the scheduler holds {MAX_ENTRIES} cache entries")));
        }
        let key = entry.key.clone();
        cache.held.entry(host.clone()).or_default().insert(key.clone());
        if entry.replicas > 1 {
            cache.short.insert(&key);
        }
        cache.records.insert(key, Record { entry, holders: vec![host.clone()], asked: Vec::new() });
        Ok(())
    }

    /// A host's full list of entries (in its periodic announcement): those it no longer lists
    /// it no longer keeps.
    pub(crate) fn cache_entries_of(&mut self, host: &Id, listed: &Set<String>) {
        let gone: Vec<String> =
            self.cache.held.get(host).map_or_else(Vec::new, |h| h.difference(listed).cloned().collect());
        for key in gone {
            self.cache_holder_gone(host, &key);
        }
    }

    /// `host` no longer keeps the entry under `key`.
    fn cache_holder_gone(&mut self, host: &str, key: &str) {
        let cache = &mut self.cache;
        if let Some(h) = cache.held.get_mut(host) {
            h.remove(key);
        }
        if let Some(r) = cache.records.get_mut(key) {
            r.holders.retain(|h| &**h != host);
            cache.short.insert(key);
        }
    }

    /// The entry under `key` and its live holders.
    pub(crate) fn stat_cache_entry(&self, key: &str) -> Option<Stat> {
        let r = self.cache.records.get(key).filter(|r| !expired(&r.entry, now_ms()))?;
        let holders = r.holders.iter().filter(|h| self.hosts.get(h).is_some()).map(|h| String::from(&**h)).collect();
        Some(Stat { entry: r.entry.clone(), holders })
    }

    /// `host` no longer keeps the entry under `key`; `everywhere`: nobody does, and every
    /// holder is asked to drop it.
    pub(crate) fn drop_cache_entry(&mut self, host: &str, key: &str, everywhere: bool, now: Instant) {
        if !everywhere {
            self.cache_holder_gone(host, key);
            // It dropped it on purpose: asked again only after a while, like a host that did
            // not come.
            if let (Some(id), Some(r)) = (self.host_id(host), self.cache.records.get_mut(key)) {
                r.asked.push((id, now));
            }
            return;
        }
        let Some(r) = self.cache.records.remove(key) else { return };
        self.cache.short.remove(key);
        for h in &r.holders {
            if let Some(held) = self.cache.held.get_mut(h) {
                held.remove(key);
            }
        }
        if self.cache.deleted.len() >= MAX_DELETED {
            let oldest = self.cache.deleted.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.cache.deleted.remove(&k);
            }
        }
        self.cache.deleted.insert(key.to_owned(), (r.entry.created_ms, now));
        for h in r.holders.iter().chain(r.asked.iter().map(|(h, _)| h)) {
            if &**h != host {
                self.ask_host(h, hold_task::Kind::Drop(key.to_owned()));
            }
        }
    }

    /// A host left: it keeps nothing any more.
    pub(crate) fn cache_host_left(&mut self, host: &str) {
        let keys = self.cache.held.remove(host).unwrap_or_default();
        for key in keys {
            if let Some(r) = self.cache.records.get_mut(&key) {
                r.holders.retain(|h| &**h != host);
                self.cache.short.insert(&key);
            }
        }
    }

    /// Forgets expired entries and old deletions (`expire`), and asks hosts for the replicas
    /// entries lack, a bounded number of entries at a time.
    pub(crate) fn place_replicas(&mut self, now: Instant, expire: bool) {
        let now_ms = now_ms();
        if expire {
            let CacheEntries { records, held, short, deleted, .. } = &mut self.cache;
            records.retain(|key, r| {
                let keep = !expired(&r.entry, now_ms);
                if !keep {
                    short.remove(key);
                    for h in &r.holders {
                        if let Some(set) = held.get_mut(h) {
                            set.remove(key);
                        }
                    }
                }
                keep
            });
            deleted.retain(|_, (_, at)| now.saturating_duration_since(*at) < DELETED_FOR);
        }
        let keys = self.cache.short.take(PLACE_PER_ROUND);
        let mut asks = Vec::new();
        for key in keys {
            let Some(r) = self.cache.records.get_mut(&key) else { continue };
            r.holders.retain(|h| self.hosts.get(h).is_some());
            r.asked.retain(|(_, at)| now.saturating_duration_since(*at) < ASK_AGAIN);
            if r.holders.len() >= r.entry.replicas as usize {
                continue;
            }
            // Looked at again in a later round until it has its replicas.
            self.cache.short.insert(&key);
            let pending = r.asked.iter().filter(|(_, at)| now.saturating_duration_since(*at) < ASK_PATIENCE).count();
            let mut needed = (r.entry.replicas as usize).saturating_sub(r.holders.len() + pending);
            if needed == 0 {
                continue;
            }
            let mut candidates: Vec<(bool, [u8; 8], Id)> = self
                .hosts
                .values()
                .filter(|h| h.preheat_stream.as_ref().is_some_and(|(_, tx)| !tx.is_closed()) && !h.blocked(now))
                .filter(|h| !r.holders.contains(&h.id) && !r.asked.iter().any(|(a, _)| *a == h.id))
                .map(|h| (!h.seed, rank(&r.entry.key, &h.id), h.id.clone()))
                .collect();
            candidates.sort_unstable();
            for (_, _, host) in candidates {
                if needed == 0 {
                    break;
                }
                needed -= 1;
                r.asked.push((host.clone(), now));
                asks.push((host, r.entry.clone()));
            }
        }
        for (host, entry) in asks {
            tracing::info!(%host, entry = %name_of(&entry), "asking for a replica of a cache entry");
            self.ask_host(&host, hold_task::Kind::Keep(entry));
        }
    }

    /// Sends `kind` on `host`'s preheat stream; false when it has none or its queue is full.
    /// Asks seed `host` to fetch a file at a plain URL, and remembers that it did, so that the
    /// seed's report of a failure is taken from it alone.
    pub(crate) fn ask_to_fetch_url(&mut self, host: &str, task: UrlTask, now: Instant) -> bool {
        let Some(id) = self.host_id(host).filter(|_| self.hosts.get(host).is_some_and(|h| h.seed)) else {
            return false;
        };
        let Some(key) = UrlVersion::of_task(&task).map(|v| v.name(&task.url).key()) else { return false };
        let asks = &mut self.cache.url_asks;
        asks.retain(|_, (_, at)| now.duration_since(*at) < URL_ASKS_FOR);
        self.cache.url_failures.retain(|_, f| now.duration_since(f.at) < URL_ASKS_FOR);
        if asks.len() >= MAX_URL_ASKS && !asks.contains_key(&key) {
            return false;
        }
        if !self.ask_host(host, hold_task::Kind::FetchUrl(task)) {
            return false;
        }
        self.cache.url_asks.insert(key, (id, now));
        true
    }

    /// Seed `host` could not fetch the file named `key`: taken only from the seed asked for it.
    pub(crate) fn failed_url_task(&mut self, host: &str, key: &str, reason: &str, now: Instant) {
        let asked = self.cache.url_asks.get(key).is_some_and(|(h, _)| &**h == host);
        if !asked {
            return;
        }
        let reason: String = reason.chars().filter(|c| !c.is_control()).take(MAX_REASON).collect();
        let failure = UrlFailure { host: host.to_owned(), reason, at: now };
        self.cache.url_failures.insert(key.to_owned(), failure);
    }

    pub(crate) fn url_failure(&self, key: &str) -> Option<UrlFailure> {
        self.cache.url_failures.get(key).cloned()
    }

    pub(crate) fn ask_host(&self, host: &str, kind: hold_task::Kind) -> bool {
        let Some((_, tx)) = self.hosts.get(host).and_then(|h| h.preheat_stream.as_ref()) else { return false };
        tx.try_send(HoldTask { kind: Some(kind) }).is_ok()
    }
}

fn rank(key: &str, host: &str) -> [u8; 8] {
    let h = Sha256::new().chain_update(key.as_bytes()).chain_update(b"|").chain_update(host.as_bytes()).finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&h[..8]);
    out
}

fn name_of(e: &CacheEntry) -> String {
    label(&e.id, &e.tag)
}
