//! The P2P cache on one node: its names ([`Index`]) over the store's tasks, what the admin
//! socket asks of it, and what schedulers ask of it (replicas to keep, names to drop).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use damselfly_p2p::import::Placement;
use damselfly_p2p::net::{CacheEntry, CacheKeeper, Node, UrlTask};
use damselfly_p2p::source::SourceError;
use damselfly_p2p::{Delivery, ReadError, Source, SourceResponse, Store, TaskRef};
use damselfly_proto::cache_name::{now_ms, CacheName, MAX_REPLICAS, URL_ID_PREFIX};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::CacheError;
use crate::index::{Claim, Entry, Index};
use crate::protocol::{EntryInfo, Phase, Reply};
use crate::url::{incoming_dir, UrlOrigin};

/// How long an import waits for its replicas before it reports how many there are so far
/// (the schedulers go on placing them).
const REPLICA_WAIT: Duration = Duration::from_secs(300);
/// Entries fetched at once on a scheduler's request (replicas, preheated files); the others
/// wait.
const FETCHES: usize = 4;
/// Rounds in a row that brought no new piece before an export gives up.
const MAX_STUCK: u32 = 5;
/// How long a round that brought no new piece waits before the next.
const STUCK_WAIT: Duration = Duration::from_secs(1);
/// How often progress is reported.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Asks taken at once (fetching or waiting to); more are declined, and a scheduler asks
/// another host, or again.
const MAX_FETCH_ASKS: usize = 256;
/// Replicas other nodes' imports ask of this one are kept while all kept content stays within
/// this share of the cache quota: a member cannot fill every node's disk with its content.
const REPLICA_SHARE: (u64, u64) = (1, 2);

/// Where progress lines go while a request runs.
pub type ProgressTx = mpsc::Sender<Reply>;

/// What an export hands the client.
pub enum Exported {
    /// Content this node held: a read-only descriptor.
    Held(File, EntryInfo),
    /// Content from peers, written into the client's file.
    Written(EntryInfo),
}

/// An entry's content as it is read out (see [`Cache::read_key`]).
pub type ContentStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, ReadError>> + Send>>;

pub struct Cache {
    me: Weak<Cache>,
    store: Store,
    index: Index,
    /// The node, once the daemon joined a cluster (it holds this cache, so weakly).
    node: OnceLock<Weak<Node>>,
    /// Keys of entries being fetched (replicas, preheated files), so that a repeated ask is
    /// taken once.
    fetching: Mutex<HashSet<String>>,
    fetch_slots: Arc<Semaphore>,
    /// Held while a name is given to content (claimed and its content kept) and while content
    /// no name holds is let go, so that neither happens in the middle of the other.
    naming: Mutex<()>,
    /// How preheated files are fetched from their origins, on seeds.
    origin: OnceLock<Arc<dyn UrlOrigin>>,
    /// Where preheated files arrive before they are imported.
    incoming: PathBuf,
}

/// The source of content that has none: what peers do not deliver cannot be had.
struct NoOrigin;

impl Source for NoOrigin {
    fn fetch(&self, _: Option<std::ops::Range<u64>>) -> BoxFuture<'static, Result<SourceResponse, SourceError>> {
        Box::pin(async { Err(SourceError::fatal("P2P cache content has no origin; only peers hold it")) })
    }
}

impl Cache {
    /// The cache over `store`, its names read from `data_dir`. Names whose content is gone are
    /// dropped, and kept content that no name holds any more may be evicted again.
    pub fn open(store: Store, data_dir: &Path) -> Result<Arc<Cache>, CacheError> {
        let index = Index::open(&data_dir.join("cache").join("entries"))?;
        for e in index.list() {
            let held = store.get(&e.digest)?.is_some_and(|t| t.is_verified());
            if !held {
                tracing::warn!(id = %e.id, tag = %e.tag, "the content of a cache entry is gone; dropping the entry");
                index.remove(&e.key());
            } else {
                store.keep(&e.digest, true)?;
            }
        }
        for digest in store.kept() {
            if !index.names(&digest) {
                store.keep(&digest, false)?;
            }
        }
        let incoming = incoming_dir(data_dir);
        let _ = std::fs::remove_dir_all(&incoming);
        std::fs::create_dir_all(&incoming)?;
        Ok(Arc::new_cyclic(|me| Cache {
            me: me.clone(),
            store,
            index,
            node: OnceLock::new(),
            fetching: Mutex::new(HashSet::new()),
            fetch_slots: Arc::new(Semaphore::new(FETCHES)),
            naming: Mutex::new(()),
            origin: OnceLock::new(),
            incoming,
        }))
    }

    /// The daemon joined a cluster: names go to its schedulers, content comes from its peers.
    pub fn attach(&self, node: &Arc<Node>) {
        let _ = self.node.set(Arc::downgrade(node));
    }

    /// This daemon fetches preheated files from their origins through `origin` (seeds).
    pub fn set_url_origin(&self, origin: Arc<dyn UrlOrigin>) {
        let _ = self.origin.set(origin);
    }

    pub(crate) fn node(&self) -> Option<Arc<Node>> {
        self.node.get()?.upgrade()
    }

    pub(crate) fn me(&self) -> Option<Arc<Cache>> {
        self.me.upgrade()
    }

    pub(crate) fn url_origin(&self) -> Option<Arc<dyn UrlOrigin>> {
        self.origin.get().cloned()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn incoming(&self) -> &Path {
        &self.incoming
    }

    /// Imports `file` under `name`: hashed once, placed in the store without a copy where the
    /// filesystem allows, kept, and told to the cluster, which places `replicas − 1` more.
    pub async fn import(
        &self,
        name: CacheName,
        file: File,
        replicas: u32,
        ttl: Option<Duration>,
        progress: &ProgressTx,
    ) -> Result<(EntryInfo, Placement), CacheError> {
        if name.id().starts_with(URL_ID_PREFIX) {
            return Err(CacheError::BadRequest(format!(
                "ids starting with {URL_ID_PREFIX:?} name preheated files; choose another"
            )));
        }
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(CacheError::BadRequest(format!("replicas must be 1 to {MAX_REPLICAS}")));
        }
        let node = self.node();
        if replicas > 1 && node.is_none() {
            return Err(CacheError::BadRequest("replicas need a cluster, and this daemon runs alone".into()));
        }
        let total = file.metadata()?.len();
        let store = self.store.clone();
        let tx = progress.clone();
        let imported = tokio::task::spawn_blocking(move || {
            let last = Mutex::new(Instant::now());
            store.import(&file, &|done| {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= PROGRESS_EVERY {
                    *last = Instant::now();
                    let _ = tx.try_send(Reply::Progress { phase: Phase::Hashing, done, total });
                }
            })
        })
        .await
        .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        let digest = imported.task.digest().clone();
        let key = name.key();
        let now = now_ms();
        let entry = Entry {
            id: name.id().to_owned(),
            tag: name.tag().to_owned(),
            digest: digest.clone(),
            length: imported.task.len(),
            created_ms: now,
            expires_ms: ttl.map_or(0, |t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))),
            replicas,
            url: String::new(),
        };
        drop(imported.task);
        let entry = match self.name_content(entry, now) {
            Ok(Claim::New(e)) => e,
            // The same content under the same name: the first import's terms stand.
            Ok(Claim::Held(e)) => e,
            Ok(Claim::Taken(e)) => {
                self.let_go(&digest);
                return Err(CacheError::Conflict(format!(
                    "{name} names other content here ({}); delete it first",
                    e.digest
                )));
            }
            Err(e) => {
                self.let_go(&digest);
                return Err(e);
            }
        };
        let Some(node) = node else { return Ok((entry.info(None), imported.placement)) };
        match node.put_cache_entry(entry.to_proto()).await {
            Ok(()) => {}
            Err(e @ damselfly_p2p::net::NetError::Refused(_)) => {
                self.drop_local(&key);
                return Err(e.into());
            }
            // Kept here all the same; the next announcement tells the schedulers.
            Err(e) => tracing::warn!(error = %e, entry = %name, "no scheduler heard of the import yet"),
        }
        let holders = if replicas > 1 { self.wait_for_replicas(&node, &entry, progress).await } else { None };
        Ok((entry.info(holders), imported.placement))
    }

    /// Waits until the cluster says `entry` has its replicas (or for [`REPLICA_WAIT`]);
    /// returns the holders last heard of.
    async fn wait_for_replicas(&self, node: &Node, entry: &Entry, progress: &ProgressTx) -> Option<Vec<String>> {
        let deadline = Instant::now() + REPLICA_WAIT;
        let key = entry.key();
        let mut holders = None;
        loop {
            if let Ok(Some((_, h))) = node.stat_cache_entry(&key).await {
                let reply =
                    Reply::Progress { phase: Phase::Replicas, done: h.len() as u64, total: entry.replicas.into() };
                let _ = progress.try_send(reply);
                let done = h.len() >= entry.replicas as usize;
                holders = Some(h);
                if done {
                    return holders;
                }
            }
            if Instant::now() >= deadline {
                return holders;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Gives `entry` its name unless the name is taken, and keeps its content, which must
    /// still be here: content no name held could have been let go since it arrived.
    pub(crate) fn name_content(&self, entry: Entry, now_ms: u64) -> Result<Claim, CacheError> {
        let _naming = self.naming.lock().unwrap_or_else(|e| e.into_inner());
        let claim = self.index.claim(entry, now_ms)?;
        if let Claim::New(e) | Claim::Held(e) = &claim {
            if !self.store.keep(&e.digest, true)? {
                self.index.remove(&e.key());
                return Err(CacheError::Fetch("the content was let go as it arrived; try again".into()));
            }
        }
        Ok(claim)
    }

    /// The content `name` names, for an export into `out` (the client's file): a read-only
    /// descriptor of it if this node holds it, for the client to clone or copy; else written
    /// into `out` as peers deliver it.
    pub async fn export(
        &self,
        name: &CacheName,
        out: Option<File>,
        progress: &ProgressTx,
    ) -> Result<Exported, CacheError> {
        let what = name.to_string();
        let entry = self.find(&name.key(), &what).await?;
        if let Some((file, _)) = self.store.open_verified(&entry.digest)? {
            return Ok(Exported::Held(file, entry.info(None)));
        }
        let out = out.ok_or_else(|| CacheError::BadRequest("an export passes the file to write into".into()))?;
        if self.node().is_none() {
            return Err(CacheError::NotFound(what));
        }
        if entry.length == 0 {
            // Nothing to read, so nothing a digest would be checked on.
            return Err(CacheError::Cluster(format!("the cluster's entry for {what} is empty")));
        }
        // Opened anew each time: a fetch that gave up may have been followed by an eviction.
        let open = |from: u64| {
            let task = self.store.get_or_create(&entry.digest, entry.length, None)?;
            Ok(from_peers(task, from..entry.length))
        };
        crate::write_out::write_out(open, out, entry.length, progress).await?;
        self.keep_if_named(&entry)?;
        Ok(Exported::Written(entry.info(None)))
    }

    /// Keeps content that arrived for an entry this node names (its content was lost, say).
    fn keep_if_named(&self, entry: &Entry) -> Result<(), CacheError> {
        if self.index.get(&entry.key()).is_some_and(|e| e.digest == entry.digest) {
            self.store.keep(&entry.digest, true)?;
        }
        Ok(())
    }

    /// The content of the entry under `key` (a preheated file's, for the HTTP proxy) as it
    /// can be read now: from this node's store, or from peers as they deliver it, every piece
    /// checked against its pinned digest and the last byte held until the whole matched its
    /// digest. `None` when neither this node nor the cluster has such an entry.
    pub async fn read_key(&self, key: &str) -> Result<Option<(EntryInfo, ContentStream)>, CacheError> {
        let entry = match self.find(key, key).await {
            Ok(e) => e,
            Err(CacheError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let task = self.store.get_or_create(&entry.digest, entry.length, None)?;
        if !task.is_verified() && self.node().is_none() {
            return Ok(None);
        }
        Ok(Some((entry.info(None), from_peers(task, 0..entry.length))))
    }

    /// The entry under `key` (called `what` in errors): this node's, or the cluster's.
    async fn find(&self, key: &str, what: &str) -> Result<Entry, CacheError> {
        if let Some(e) = self.index.get(key).filter(|e| !e.expired(now_ms())) {
            return Ok(e);
        }
        let node = self.node().ok_or_else(|| CacheError::NotFound(what.to_owned()))?;
        let (entry, _) = node.stat_cache_entry(key).await?.ok_or_else(|| CacheError::NotFound(what.to_owned()))?;
        let entry = Entry::from_proto(&entry)
            .map_err(|e| CacheError::Cluster(format!("the scheduler's entry for {what}: {e}")))?;
        match entry.key() == key {
            true => Ok(entry),
            false => Err(CacheError::Cluster(format!("the scheduler answered another entry for {what}"))),
        }
    }

    /// Takes the content of `entry` from peers into the store, every piece verified against
    /// the digests pinned for it and the whole against its digest.
    async fn fetch(&self, entry: &Entry) -> Result<TaskRef, CacheError> {
        let mut stuck = 0;
        let mut last = None;
        loop {
            let task = self.store.get_or_create(&entry.digest, entry.length, None)?;
            if task.is_verified() {
                return Ok(task);
            }
            damselfly_p2p::reader::fill(task.clone(), Arc::new(NoOrigin)).await;
            if task.is_verified() {
                return Ok(task);
            }
            if task.is_complete() {
                // Hashed as a whole after the last piece: wait for the verdict.
                task.verdict().await;
                if task.is_verified() {
                    return Ok(task);
                }
            }
            let now = held(&task);
            if last == Some(now) {
                stuck += 1;
            } else {
                (stuck, last) = (0, Some(now));
            }
            if stuck >= MAX_STUCK {
                return Err(CacheError::Fetch(format!(
                    "no peer delivered the rest of {}: {now} of {} bytes arrived",
                    entry.digest, entry.length
                )));
            }
            // Another fill of the same task (a replica, a second export) may be running: it
            // is not stuck while pieces arrive.
            tokio::time::sleep(STUCK_WAIT).await;
        }
    }

    /// What `name` is: as this node keeps it (`local`, or with no cluster), or as the cluster
    /// says, with its holders.
    pub async fn stat(&self, name: &CacheName, local: bool) -> Result<EntryInfo, CacheError> {
        let key = name.key();
        let node = self.node().filter(|_| !local);
        let Some(node) = node else {
            let e = self.index.get(&key).filter(|e| !e.expired(now_ms()));
            let e = e.ok_or_else(|| CacheError::NotFound(name.to_string()))?;
            // Its content failed a check and was dropped since: the name goes too.
            if !self.store.get(&e.digest)?.is_some_and(|t| t.is_verified()) {
                self.drop_local(&key);
                return Err(CacheError::NotFound(name.to_string()));
            }
            return Ok(e.info(None));
        };
        let (entry, holders) =
            node.stat_cache_entry(&key).await?.ok_or_else(|| CacheError::NotFound(name.to_string()))?;
        let entry = Entry::from_proto(&entry).map_err(CacheError::Cluster)?;
        Ok(entry.info(Some(holders)))
    }

    /// Drops `name` here, and with `all` on every node that keeps it.
    pub async fn delete(&self, name: &CacheName, all: bool) -> Result<(), CacheError> {
        let key = name.key();
        let here = self.index.get(&key).is_some();
        let node = self.node();
        if all {
            let node =
                node.ok_or_else(|| CacheError::BadRequest("--all needs a cluster, and this daemon runs alone".into()))?;
            if !here && node.stat_cache_entry(&key).await?.is_none() {
                return Err(CacheError::NotFound(name.to_string()));
            }
            node.drop_cache_entry(&key, true).await?;
            self.drop_local(&key);
            return Ok(());
        }
        if !here {
            return Err(CacheError::NotFound(format!("{name} on this node")));
        }
        self.drop_local(&key);
        if let Some(node) = node {
            if let Err(e) = node.drop_cache_entry(&key, false).await {
                tracing::warn!(error = %e, entry = %name, "no scheduler heard the entry was dropped here");
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<EntryInfo> {
        let now = now_ms();
        self.index.list().into_iter().filter(|e| !e.expired(now)).map(|e| e.info(None)).collect()
    }

    /// Forgets the name under `key` here, and its content if no other name holds it.
    fn drop_local(&self, key: &str) {
        if let Some(e) = self.index.remove(key) {
            self.let_go(&e.digest);
        }
    }

    /// Lets go of `digest` unless a name holds it (`Store::release`: deleted, or only evictable
    /// again if a registry's client read it too). Under the naming lock, so that content being
    /// named meanwhile is not let go.
    pub(crate) fn let_go(&self, digest: &damselfly_p2p::Digest) {
        let _naming = self.naming.lock().unwrap_or_else(|e| e.into_inner());
        if !self.index.names(digest) {
            self.store.release(digest);
        }
    }

    /// Drops entries as their time runs out, until `shutdown`.
    pub async fn expire(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            for e in self.index.expired(now_ms()) {
                tracing::info!(id = %e.id, tag = %e.tag, "cache entry expired; dropping it");
                self.drop_local(&e.key());
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Whether this node has room for a replica of `length` bytes (see [`REPLICA_SHARE`]).
    pub(crate) fn room_for_replica(&self, length: u64) -> bool {
        let (kept, quota) = self.store.kept_bytes();
        kept.saturating_add(length) <= quota / REPLICA_SHARE.1 * REPLICA_SHARE.0
    }

    /// Marks the entry under `key` as being fetched (a replica from peers, a preheated file
    /// from its origin); false when it is already, or too many are.
    pub(crate) fn start_fetch(&self, key: &str) -> bool {
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        fetching.len() < MAX_FETCH_ASKS && fetching.insert(key.to_owned())
    }

    pub(crate) fn end_fetch(&self, key: &str) {
        self.fetching.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// One of the slots entries asked for are fetched in.
    pub(crate) async fn fetch_slot(&self) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
        self.fetch_slots.clone().acquire_owned().await
    }

    /// See [`Index::renew`].
    pub(crate) fn renew(&self, key: &str, expires_ms: u64) -> Result<Option<Entry>, CacheError> {
        Ok(self.index.renew(key, expires_ms)?)
    }

    /// The live entry under `key` here, if its content is held.
    pub(crate) fn held_entry(&self, key: &str) -> Option<Entry> {
        let e = self.index.get(key).filter(|e| !e.expired(now_ms()))?;
        self.store.get(&e.digest).ok().flatten().is_some_and(|t| t.is_verified()).then_some(e)
    }

    /// Tells the schedulers this node keeps `entry` (in the background).
    pub(crate) fn tell_schedulers(&self, entry: Entry) {
        if let Some(node) = self.node() {
            tokio::spawn(async move {
                if let Err(e) = node.put_cache_entry(entry.to_proto()).await {
                    tracing::warn!(error = %e, id = %entry.id, "no scheduler took the cache entry yet");
                }
            });
        }
    }

    /// Fetches a replica a scheduler asked for, keeps it and says so.
    async fn replicate(self: Arc<Self>, entry: Entry) {
        let key = entry.key();
        if let Ok(_slot) = self.fetch_slot().await {
            match self.fetch(&entry).await {
                Ok(task) => {
                    let kept = match self.name_content(entry.clone(), now_ms()) {
                        Ok(Claim::New(_) | Claim::Held(_)) => Ok(()),
                        Ok(Claim::Taken(e)) => Err(CacheError::Conflict(format!("the name is {} here", e.digest))),
                        Err(e) => Err(e),
                    };
                    drop(task);
                    match (kept, self.node()) {
                        (Ok(()), Some(node)) => {
                            tracing::info!(id = %entry.id, tag = %entry.tag, "keeping a replica of a cache entry");
                            if let Err(e) = node.put_cache_entry(entry.to_proto()).await {
                                tracing::warn!(error = %e, id = %entry.id, "no scheduler heard of the replica yet");
                            }
                        }
                        (Err(e), _) => tracing::warn!(error = %e, id = %entry.id, "cannot keep a replica"),
                        (Ok(()), None) => {}
                    }
                }
                Err(e) => tracing::warn!(error = %e, id = %entry.id, "cannot fetch a replica"),
            }
        }
        self.end_fetch(&key);
    }
}

/// `range` of a task's content as a whole-content read: what the store holds, the rest as
/// peers deliver it (there is no origin), the last byte held until the whole matched.
fn from_peers(task: TaskRef, range: std::ops::Range<u64>) -> ContentStream {
    Box::pin(damselfly_p2p::read(task, range, Delivery::Whole, Arc::new(NoOrigin)))
}

/// Bytes of `task` present.
fn held(task: &TaskRef) -> u64 {
    let layout = task.layout();
    task.present_pieces().iter().map(|&i| layout.piece_range(i as usize)).map(|r| r.end - r.start).sum()
}

impl CacheKeeper for Cache {
    fn entries(&self) -> Vec<CacheEntry> {
        let now = now_ms();
        self.index.list().into_iter().filter(|e| !e.expired(now)).map(|e| e.to_proto()).collect()
    }

    fn keep(&self, entry: CacheEntry) {
        let entry = match Entry::from_proto(&entry) {
            Ok(e) if !e.expired(now_ms()) => e,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "a scheduler asked to keep a malformed cache entry");
                return;
            }
        };
        let Some(me) = self.me.upgrade() else { return };
        let key = entry.key();
        if self.index.get(&key).is_some_and(|e| e.digest == entry.digest) {
            // Held already: the scheduler may have missed the put, and a preheated file asked
            // for again is kept as long as the new job asks.
            match self.renew(&key, entry.expires_ms) {
                Ok(Some(e)) => self.tell_schedulers(e),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot renew a cache entry"),
            }
            return;
        }
        if !self.room_for_replica(entry.length) {
            tracing::warn!(id = %entry.id, length = entry.length, "declining a replica: kept content would pass half the cache quota");
            return;
        }
        if self.start_fetch(&key) {
            tokio::spawn(me.replicate(entry));
        }
    }

    fn fetch_url(&self, task: UrlTask) {
        self.fetch_url_asked(task);
    }

    fn drop_entry(&self, key: &str) {
        if self.index.get(key).is_some() {
            tracing::info!(key, "a scheduler asked to drop a cache entry deleted everywhere");
            self.drop_local(key);
        }
    }
}
