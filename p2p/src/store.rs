//! The piece store: one sparse file and one metadata file per task under
//! `<data_dir>/tasks/<algorithm>/<hex>`, an index in least-recently-used order, and a quota.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::digest::{Algorithm, Digest};
use crate::meta::{now_secs, TaskMeta, META_VERSION};
use crate::metrics::Metrics;
use crate::piece::Layout;
use crate::share::{Fetcher, Sharing, StoreEvent};
use crate::task::{Task, TaskRef};

/// Free disk space kept untouched: below it, downloads stream through without caching.
const DISK_HEADROOM: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("data directory {0} is in use by another damselfly daemon")]
    Locked(PathBuf),
    /// Not an error for the client: the content is streamed without caching.
    #[error("no room in the cache for {0} bytes")]
    NoSpace(u64),
    /// The digest is cached as content of another media type (a blob asked for as a manifest,
    /// say). The cached task is left alone: a request must not change what others are served.
    #[error("the digest is cached with another media type")]
    OtherType,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub dir: PathBuf,
    pub quota: u64,
    /// Write fetched bytes with `O_DIRECT` where the filesystem allows it (see `stage.rs`).
    pub direct_io: bool,
    /// Tasks kept at most (see [`DEFAULT_MAX_TASKS`]).
    pub max_tasks: usize,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    dir: PathBuf,
    quota: u64,
    max_tasks: usize,
    pub(crate) direct_io: bool,
    index: Mutex<Index>,
    pub(crate) metrics: Arc<Metrics>,
    /// How pieces are fetched and who hears of them, once the store shares its pieces.
    sharing: std::sync::OnceLock<Sharing>,
    /// Held (with an exclusive flock) for the store's lifetime.
    _lock: File,
}

struct Index {
    lru: LruCache<Digest, Entry>,
    used: u64,
    /// Tasks opened since the last count (see `close_idle`).
    opened: usize,
}

impl Index {
    /// What tasks that cannot be evicted now (read or fetched, or kept) count.
    fn in_use(&self) -> u64 {
        self.lru
            .iter()
            .filter(|(_, e)| e.kept || e.task.as_ref().is_some_and(|t| t.is_pinned()))
            .map(|(_, e)| e.charged)
            .sum()
    }
}

/// Tasks kept open (a file descriptor and a memory map each) when nothing uses them. Without
/// a bound, every blob read since start-up held both, and a daemon under the common limit of
/// 1,024 open files ran out of them.
const MAX_OPEN: usize = 256;

/// Whether a lookup is a use of the task (which keeps it from eviction longer) or a look only
/// (the background digest pass must not make every task look recently used).
#[derive(Clone, Copy)]
enum Lookup {
    Use,
    Peek,
}

struct Entry {
    len: u64,
    /// Never evicted (the P2P cache names it).
    kept: bool,
    /// What the task counts against the quota: the bytes it holds, in filesystem blocks, and
    /// a block of metadata (see [`charge_of`]). It follows what arrives, not the length a
    /// registry announced, so a made-up length cannot empty the cache.
    charged: u64,
    task: Option<Arc<Task>>,
}

/// Filesystem block: the least a file costs on disk.
const BLOCK: u64 = 4096;
/// Tasks kept at most unless configured, whatever their size: each costs two inodes and its
/// metadata.
pub const DEFAULT_MAX_TASKS: usize = 200_000;

/// The charge of a task holding `held` bytes: at least one block of data, and one of metadata.
pub(crate) fn charge_of(held: u64) -> u64 {
    held.div_ceil(BLOCK).max(1) * BLOCK + BLOCK
}

impl Store {
    /// Opens (creating) the store under `cfg.dir` and indexes what an earlier run left. Nothing
    /// read back is trusted: every piece is re-checked before it is first served.
    pub fn open(cfg: StoreConfig, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        for algo in [Algorithm::Sha256, Algorithm::Sha512] {
            fs::create_dir_all(cfg.dir.join("tasks").join(algo.name()))?;
        }
        let lock = lock_dir(&cfg.dir)?;
        let mut found = Vec::new();
        for algo in [Algorithm::Sha256, Algorithm::Sha512] {
            scan(&cfg.dir.join("tasks").join(algo.name()), &mut found)?;
        }
        found.sort_by_key(|m| m.last_access);
        let mut index = Index { lru: LruCache::unbounded(), used: 0, opened: 0 };
        for meta in found {
            let charged = charge_of(meta.stored_bytes());
            index.used += charged;
            index.lru.put(meta.digest.clone(), Entry { len: meta.len, kept: meta.kept, charged, task: None });
        }
        metrics.cache_bytes.set(index.used as i64);
        metrics.cache_tasks.set(index.lru.len() as i64);
        tracing::info!(dir = %cfg.dir.display(), tasks = index.lru.len(), bytes = index.used, "piece store opened");
        let inner = Inner {
            dir: cfg.dir,
            quota: cfg.quota,
            max_tasks: cfg.max_tasks.max(1),
            direct_io: cfg.direct_io,
            index: Mutex::new(index),
            metrics,
            sharing: Default::default(),
            _lock: lock,
        };
        Ok(Store { inner: Arc::new(inner) })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Bytes cached tasks count against the quota (what they hold, in blocks, and their
    /// metadata).
    pub fn used(&self) -> u64 {
        self.inner.index().used
    }

    /// The task for `digest`, pinned, if the store has it (complete or not).
    pub fn get(&self, digest: &Digest) -> Result<Option<TaskRef>, StoreError> {
        self.lookup(digest, Lookup::Use)
    }

    /// Like [`Store::get`], counting as a use for eviction or not.
    fn lookup(&self, digest: &Digest, how: Lookup) -> Result<Option<TaskRef>, StoreError> {
        let mut index = self.inner.index();
        let found = match how {
            Lookup::Use => index.lru.get_mut(digest),
            Lookup::Peek => index.lru.peek_mut(digest),
        };
        let Some(entry) = found else { return Ok(None) };
        if let Some(task) = &entry.task {
            return Ok(Some(TaskRef::pin(task.clone())));
        }
        match self.inner.load(digest) {
            Ok(task) => {
                let task = Arc::new(task);
                entry.task = Some(task.clone());
                let pinned = TaskRef::pin(task);
                close_idle(&mut index);
                Ok(Some(pinned))
            }
            // Out of file descriptors or memory, say: the files are fine, only not now.
            Err(e) if !unreadable(&e) => Err(e),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "dropping unreadable task");
                let charged = entry.charged;
                index.lru.pop(digest);
                index.used -= charged;
                self.inner.delete_files(digest);
                self.inner.publish(&index);
                Ok(None)
            }
        }
    }

    /// The task for `digest`, creating an empty one of `len` bytes if needed (evicting
    /// least-recently-used tasks to stay under the quota). `NoSpace` means: stream it through.
    /// A verified task is returned whatever `len` says: read it by its own length. With a
    /// `media_type`, a task cached with another one (or with none, a blob) is `OtherType`.
    pub fn get_or_create(&self, digest: &Digest, len: u64, media_type: Option<&str>) -> Result<TaskRef, StoreError> {
        let other_type = |task: &TaskRef| media_type.is_some() && task.media_type().as_deref() != media_type;
        if let Some(task) = self.get(digest)? {
            if other_type(&task) {
                return Err(StoreError::OtherType);
            }
            if task.len() == len {
                return Ok(task);
            }
            // The origin now says another length for the same digest: one of them is wrong,
            // and the stored one has not been proven right yet unless it was verified.
            if task.is_verified() {
                return Ok(task);
            }
            task.abandon("the origin now announces another length");
        }
        let mut index = self.inner.index();
        if let Some(entry) = index.lru.get(digest) {
            if let Some(task) = &entry.task {
                let task = TaskRef::pin(task.clone());
                return if other_type(&task) { Err(StoreError::OtherType) } else { Ok(task) };
            }
        }
        // Too big for the cache or the disk, or for what the tasks in use leave of the cache:
        // stream it through. Nothing is evicted for a length yet, only for bytes that arrive.
        let in_use = index.in_use();
        let disk_full = free_disk(&self.inner.dir).is_some_and(|free| free < len + DISK_HEADROOM);
        if len > self.inner.quota.saturating_sub(in_use) || disk_full {
            return Err(StoreError::NoSpace(len));
        }
        let charged = charge_of(0);
        self.inner.make_room(&mut index, charged, true)?;
        let task = Arc::new(self.inner.create(digest, len, media_type)?);
        index.used += charged;
        index.lru.put(digest.clone(), Entry { len, kept: false, charged, task: Some(task.clone()) });
        let pinned = TaskRef::pin(task);
        close_idle(&mut index);
        self.inner.publish(&index);
        Ok(pinned)
    }

    /// Stores small content already verified by the caller (a manifest) as a complete task.
    pub fn put_verified(&self, digest: &Digest, bytes: &[u8], media_type: Option<&str>) -> Result<TaskRef, StoreError> {
        let task = self.get_or_create(digest, bytes.len() as u64, media_type)?;
        if task.is_verified() {
            return Ok(task);
        }
        task.fill_verified(bytes)?;
        Ok(task)
    }

    /// Keeps the task of `digest` from eviction (`true`), or lets it be evicted again. False
    /// when the store does not hold it.
    pub fn keep(&self, digest: &Digest, kept: bool) -> Result<bool, StoreError> {
        let Some(task) = self.get(digest)? else { return Ok(false) };
        task.set_kept(kept);
        if let Some(entry) = self.inner.index().lru.peek_mut(digest) {
            entry.kept = kept;
        }
        Ok(true)
    }

    /// The digests of every kept task.
    pub fn kept(&self) -> Vec<Digest> {
        self.inner.index().lru.iter().filter(|(_, e)| e.kept).map(|(d, _)| d.clone()).collect()
    }

    /// Deletes the task of `digest`: its readers fail, its files go, and whoever the store
    /// shares pieces with hears it was withdrawn. False when the store does not hold it.
    pub fn remove(&self, digest: &Digest) -> bool {
        let mut index = self.inner.index();
        let removed = self.inner.forget(&mut index, digest, Some("deleted"));
        self.inner.publish(&index);
        removed
    }

    /// Lets go of a task the P2P cache kept: deleted, unless a registry's client read it too
    /// (its provenance says so), in which case it is only evictable again like any cached blob.
    pub fn release(&self, digest: &Digest) {
        let from_registry = self.lookup(digest, Lookup::Peek).ok().flatten().is_some_and(|t| {
            let m = t.meta();
            m.supplier.is_some() || !m.public_in.is_empty() || m.media_type.is_some()
        });
        if from_registry {
            let _ = self.keep(digest, false);
        } else {
            self.remove(digest);
        }
    }

    /// Bytes kept tasks count against the quota, and the quota.
    pub fn kept_bytes(&self) -> (u64, u64) {
        let index = self.inner.index();
        (index.lru.iter().filter(|(_, e)| e.kept).map(|(_, e)| e.charged).sum(), self.inner.quota)
    }

    /// A new read-only descriptor of the verified content of `digest`, to copy it out;
    /// `None` when the store does not hold it whole and verified.
    pub fn open_verified(&self, digest: &Digest) -> Result<Option<(File, u64)>, StoreError> {
        let Some(task) = self.get(digest)? else { return Ok(None) };
        if !task.is_verified() {
            return Ok(None);
        }
        let file = File::open(self.inner.paths(digest).0)?;
        Ok(Some((file, task.len())))
    }

    /// Where an import places its file before [`Store::adopt`] (a temporary the next start
    /// removes if it is left behind).
    pub(crate) fn import_path(&self) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.inner
            .dir
            .join("tasks")
            .join(Algorithm::Sha256.name())
            .join(format!("import-{}-{n}.tmp", std::process::id()))
    }

    /// Whether `len` more bytes could be kept: within the quota beside what cannot be evicted,
    /// and within the disk's free space.
    pub(crate) fn has_room(&self, len: u64) -> Result<(), StoreError> {
        let in_use = self.inner.index().in_use();
        let disk_full = free_disk(&self.inner.dir).is_some_and(|free| free < len + DISK_HEADROOM);
        if charge_of(len) > self.inner.quota.saturating_sub(in_use) || disk_full {
            return Err(StoreError::NoSpace(len));
        }
        Ok(())
    }

    /// Makes the file at `placed` (in the store's directory, verified by the caller against
    /// `digest`, its pieces recorded in `pieces`) the kept, verified task of `digest`, and
    /// announces it. A verified task of that digest already here is kept instead, and the file
    /// removed; an unverified one is dropped for it.
    pub(crate) fn adopt(
        &self,
        placed: &Path,
        digest: &Digest,
        layout: Layout,
        pieces: Vec<crate::meta::PieceRecord>,
    ) -> Result<TaskRef, StoreError> {
        if let Some(task) = self.get(digest)? {
            if task.is_verified() {
                let _ = fs::remove_file(placed);
                self.keep(digest, true)?;
                return Ok(task);
            }
            task.abandon("replaced by an import of the same content");
        }
        let charged = charge_of(layout.len);
        let mut index = self.inner.index();
        // Another task of this digest may have been made since the look above (a client's
        // fetch): a verified one stands; any other goes, under this same lock.
        if let Some(entry) = index.lru.peek(digest) {
            if entry.task.as_ref().is_some_and(|t| t.is_verified()) {
                let task = entry.task.clone().map(TaskRef::pin);
                drop(index);
                let _ = fs::remove_file(placed);
                self.keep(digest, true)?;
                return task.ok_or(StoreError::Io(io::Error::other("the task went away")));
            }
            if let Some(old) = index.lru.pop(digest) {
                index.used -= old.charged;
                if let Some(task) = old.task {
                    task.fail("replaced by an import of the same content");
                }
            }
        }
        if let Err(e) = self.inner.make_room(&mut index, charged, true) {
            let _ = fs::remove_file(placed);
            return Err(e);
        }
        let (data, meta_path) = self.inner.paths(digest);
        let meta = TaskMeta {
            version: META_VERSION,
            digest: digest.clone(),
            len: layout.len,
            piece_size: layout.piece_size,
            pieces: pieces.into_iter().map(Some).collect(),
            verified: true,
            last_access: now_secs(),
            media_type: None,
            public_in: Default::default(),
            supplier: None,
            kept: true,
        };
        let installed = fs::rename(placed, &data)
            .and_then(|()| meta.store(&meta_path))
            .and_then(|()| OpenOptions::new().read(true).write(true).open(&data))
            .map_err(StoreError::Io)
            .and_then(|file| {
                Task::from_meta(meta, file, meta_path, self.inner.metrics.clone(), Arc::downgrade(&self.inner))
            });
        let task = match installed {
            Ok(task) => Arc::new(task),
            Err(e) => {
                let _ = fs::remove_file(placed);
                self.inner.delete_files(digest);
                return Err(e);
            }
        };
        index.used += charged;
        index.lru.put(digest.clone(), Entry { len: layout.len, kept: true, charged, task: Some(task.clone()) });
        let pinned = TaskRef::pin(task);
        close_idle(&mut index);
        self.inner.publish(&index);
        drop(index);
        pinned.announce_if_ready();
        Ok(pinned)
    }

    /// Shares this store's pieces: from now on `fetcher` fills missing pieces, every piece
    /// written gets its sha256 (what other nodes verify it by), and what others need to hear
    /// goes out on the returned channel. Set once, by whoever composes the node; `None` when
    /// the store is shared already.
    pub(crate) fn share(&self, fetcher: Arc<dyn Fetcher>) -> Option<UnboundedReceiver<StoreEvent>> {
        let (sharing, events) = Sharing::new(fetcher);
        self.inner.sharing.set(sharing).ok()?;
        Some(events)
    }

    /// Whether this store shares its pieces (missing ones may come from other nodes).
    pub fn is_shared(&self) -> bool {
        self.inner.sharing.get().is_some()
    }

    /// Up to `max` verified tasks whose piece digests are all known, kept ones first (a
    /// scheduler takes a P2P cache name only from a host that announced its content), then the
    /// most recently used, for announcing to schedulers. Reads metadata files: call it off the
    /// runtime threads.
    pub fn verified_tasks(&self, max: usize) -> Vec<TaskMeta> {
        let announced = |m: &TaskMeta| m.verified && has_piece_digests(m);
        let kept: Vec<TaskMeta> = self
            .kept()
            .iter()
            .filter_map(|d| self.lookup(d, Lookup::Peek).ok().flatten().map(|t| t.meta()))
            .filter(announced)
            .take(max)
            .collect();
        let rest = max - kept.len();
        let mut metas = kept;
        metas.extend(self.metas().filter(|m| announced(m) && !m.kept).take(rest));
        metas
    }

    /// Gives every verified task that has no piece digests (cached while the node was alone)
    /// its digests, most recently used first, until `stop()`; returns how many it did. Reads
    /// every byte of those tasks: run it on a thread of its own.
    pub fn backfill_piece_digests(&self, stop: &dyn Fn() -> bool) -> usize {
        let missing: Vec<Digest> =
            self.metas().filter(|m| m.verified && !has_piece_digests(m)).map(|m| m.digest).collect();
        let mut done = 0;
        for digest in missing {
            if stop() {
                break;
            }
            if let Ok(Some(task)) = self.lookup(&digest, Lookup::Peek) {
                done += usize::from(task.backfill_piece_digests());
            }
        }
        done
    }

    /// The metadata of every task, most recently used first (from files for tasks not loaded).
    fn metas(&self) -> impl Iterator<Item = TaskMeta> + '_ {
        let entries: Vec<(Digest, Option<Arc<Task>>)> =
            self.inner.index().lru.iter().map(|(d, e)| (d.clone(), e.task.clone())).collect();
        entries.into_iter().filter_map(|(digest, task)| match task {
            Some(t) => Some(t.meta()),
            None => TaskMeta::load(&self.inner.paths(&digest).1).ok(),
        })
    }

    /// Writes every dirty task's metadata: called at shutdown so a clean restart loses nothing.
    pub fn flush_all(&self) {
        let tasks: Vec<Arc<Task>> = self.inner.index().lru.iter().filter_map(|(_, e)| e.task.clone()).collect();
        for t in tasks {
            t.flush();
        }
    }
}

fn has_piece_digests(m: &TaskMeta) -> bool {
    m.pieces.iter().all(|p| p.as_ref().is_some_and(|r| r.sha256.is_some()))
}

impl Inner {
    pub(crate) fn sharing(&self) -> Option<&Sharing> {
        self.sharing.get()
    }

    /// Tells whoever the store shares its pieces with, if anyone.
    pub(crate) fn emit(&self, event: StoreEvent) {
        if let Some(sharing) = self.sharing() {
            sharing.emit(event);
        }
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paths(&self, digest: &Digest) -> (PathBuf, PathBuf) {
        let base = self.dir.join("tasks").join(digest.algorithm().name()).join(digest.hex());
        (base.with_extension("data"), base.with_extension("meta"))
    }

    fn publish(&self, index: &Index) {
        self.metrics.cache_bytes.set(index.used as i64);
        self.metrics.cache_tasks.set(index.lru.len() as i64);
    }

    fn load(self: &Arc<Self>, digest: &Digest) -> Result<Task, StoreError> {
        let (data, meta_path) = self.paths(digest);
        let meta = TaskMeta::load(&meta_path)?;
        let file = OpenOptions::new().read(true).write(true).open(&data)?;
        if file.metadata()?.len() != meta.len || meta.digest != *digest {
            return Err(StoreError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "task file does not match its metadata",
            )));
        }
        Task::from_meta(meta, file, meta_path, self.metrics.clone(), Arc::downgrade(self))
    }

    fn create(self: &Arc<Self>, digest: &Digest, len: u64, media_type: Option<&str>) -> Result<Task, StoreError> {
        let created = self.create_files(digest, len, media_type);
        if created.is_err() {
            // The data file holds the blob's whole length once allocated: never leave it.
            self.delete_files(digest);
        }
        created
    }

    fn create_files(self: &Arc<Self>, digest: &Digest, len: u64, media_type: Option<&str>) -> Result<Task, StoreError> {
        let (data, meta_path) = self.paths(digest);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&data)?;
        reserve(&file, len)?;
        file.set_len(len)?;
        let layout = Layout::new(len);
        let meta = TaskMeta {
            version: META_VERSION,
            digest: digest.clone(),
            len,
            piece_size: layout.piece_size,
            pieces: vec![None; layout.count()],
            verified: false,
            last_access: now_secs(),
            media_type: media_type.map(str::to_owned),
            public_in: Default::default(),
            supplier: None,
            kept: false,
        };
        meta.store(&meta_path)?;
        Task::from_meta(meta, file, meta_path, self.metrics.clone(), Arc::downgrade(self))
    }

    /// Task `task` of `digest` now holds `held` bytes: its charge follows, and tasks nobody
    /// uses are evicted, least recently used first, to make room. When everything else is in
    /// use the cache runs over its quota for a while (the task is read or fetched, and the
    /// next room made evicts it first once it is not): a pull never fails for want of room.
    /// The disk was asked for the blocks when the task was made (`reserve`): this only counts.
    pub(crate) fn charge(&self, digest: &Digest, task: &Task, held: u64) {
        let mut index = self.index();
        let Some(entry) = index.lru.peek(digest) else { return };
        if !entry.task.as_ref().is_some_and(|t| std::ptr::eq(&**t, task)) {
            return;
        }
        let delta = charge_of(held.min(entry.len)).saturating_sub(entry.charged);
        if delta == 0 {
            return;
        }
        // No room is not an error here: see above.
        let _ = self.make_room(&mut index, delta, false);
        if let Some(entry) = index.lru.peek_mut(digest) {
            entry.charged += delta;
            index.used += delta;
        }
        self.publish(&index);
    }

    /// Evicts unpinned tasks, least recently used first, until `len` more bytes (and, for a
    /// `new_task`, one more task) fit.
    fn make_room(&self, index: &mut Index, len: u64, new_task: bool) -> Result<(), StoreError> {
        if len > self.quota {
            return Err(StoreError::NoSpace(len));
        }
        while index.used + len > self.quota || (new_task && index.lru.len() >= self.max_tasks) {
            let victim = index
                .lru
                .iter()
                .rev()
                .find(|(_, e)| !e.kept && e.task.as_ref().is_none_or(|t| !t.is_pinned()))
                .map(|(d, _)| d.clone());
            let Some(victim) = victim else { return Err(StoreError::NoSpace(len)) };
            self.forget(index, &victim, Some("evicted"));
            self.metrics.evictions.inc();
            tracing::info!(digest = %victim, "evicted from the cache");
        }
        Ok(())
    }

    /// Forgets a discarded task (if the index still points at this very task).
    pub(crate) fn remove_task(&self, digest: &Digest, task: &Task) {
        let mut index = self.index();
        let same = index.lru.peek(digest).and_then(|e| e.task.as_ref()).is_some_and(|t| std::ptr::eq(&**t, task));
        if same {
            // Failed already, with its own reason.
            self.forget(&mut index, digest, None);
            self.publish(&index);
        }
    }

    /// Takes `digest` out of the index and off the disk, failing its readers with `why`, and
    /// tells whoever the store shares pieces with that it is withdrawn. False when the index
    /// does not hold it.
    fn forget(&self, index: &mut Index, digest: &Digest, why: Option<&str>) -> bool {
        let Some(entry) = index.lru.pop(digest) else { return false };
        index.used -= entry.charged;
        if let (Some(task), Some(why)) = (entry.task, why) {
            task.fail(why);
        }
        self.delete_files(digest);
        self.emit(StoreEvent::Withdrawn(digest.clone()));
        true
    }

    fn delete_files(&self, digest: &Digest) {
        let (data, meta) = self.paths(digest);
        // Metadata first: a crash in between leaves an orphan data file, which a scan removes.
        let _ = fs::remove_file(meta);
        let _ = fs::remove_file(data);
    }
}

/// Reads the metadata files in `dir`, removing what cannot be trusted: torn metadata, data
/// files of the wrong length, orphans and temporaries.
fn scan(dir: &Path, found: &mut Vec<TaskMeta>) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "meta" => match TaskMeta::load(&path) {
                Ok(meta) if meta.supplier_predates_its_naming() => {
                    tracing::info!(digest = %meta.digest, "removing an unverified task whose supplier was recorded by host alone");
                    let _ = fs::remove_file(path.with_extension("data"));
                    let _ = fs::remove_file(&path);
                }
                Ok(meta) if data_matches(&path.with_extension("data"), meta.len) => found.push(meta),
                _ => {
                    tracing::warn!(path = %path.display(), "removing an unreadable task");
                    let _ = fs::remove_file(path.with_extension("data"));
                    let _ = fs::remove_file(&path);
                }
            },
            "data" if !path.with_extension("meta").exists() => {
                let _ = fs::remove_file(&path);
            }
            "tmp" => {
                let _ = fs::remove_file(&path);
            }
            _ => {}
        }
    }
    Ok(())
}

fn data_matches(path: &Path, len: u64) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() == len)
}

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StoreError::Locked(dir.to_owned()));
    }
    Ok(file)
}

/// Allocates the task's blocks up front. Other writers on the disk (containerd unpacking
/// layers, say) can fill it while a blob arrives; with its blocks reserved, a task's writes do
/// not fail half way, and a disk too full for the blob is found now, while the request can
/// still stream through uncached. Filesystems without `fallocate` keep the sparse file.
fn reserve(file: &File, len: u64) -> Result<(), StoreError> {
    let Ok(size) = libc::off_t::try_from(len) else { return Err(StoreError::NoSpace(len)) };
    if size == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Err(StoreError::NoSpace(len)),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(StoreError::Io(err)),
    }
}

fn free_disk(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Counts a task just opened and, past `MAX_OPEN`, closes the least recently used ones that
/// nobody holds (only the index has them), metadata written first. A closed task is opened
/// again from its files at its next use.
fn close_idle(index: &mut Index) {
    index.opened += 1;
    if index.opened <= MAX_OPEN {
        return;
    }
    let mut open = index.lru.iter().filter(|(_, e)| e.task.is_some()).count();
    for (_, entry) in index.lru.iter_mut().rev() {
        if open <= MAX_OPEN * 3 / 4 {
            break;
        }
        if entry.task.as_ref().is_some_and(|t| Arc::strong_count(t) == 1) {
            if let Some(task) = entry.task.take() {
                task.flush();
            }
            open -= 1;
        }
    }
    index.opened = open;
}

/// A task's files are damaged or gone (not merely unopenable right now): drop them.
fn unreadable(e: &StoreError) -> bool {
    matches!(e, StoreError::Io(e) if matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_cannot_be_opened_for_now_keeps_its_files() {
        let os = |code| StoreError::Io(io::Error::from_raw_os_error(code));
        // EMFILE, ENFILE, ENOMEM, EIO: the files may be fine.
        for code in [24, 23, 12, 5] {
            assert!(!unreadable(&os(code)), "errno {code}");
        }
        assert!(unreadable(&StoreError::Io(io::Error::new(io::ErrorKind::InvalidData, "bad metadata"))));
        assert!(unreadable(&os(2)), "ENOENT: a file is gone");
    }
}
