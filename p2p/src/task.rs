//! One task: a blob (or manifest) keyed by digest, held in one sparse file cut into pieces.
//!
//! All piece bookkeeping lives under one mutex; bytes live in the file and are read through a
//! shared memory map, so readers never copy them into anonymous memory. Progress is published
//! through a `watch` generation counter that readers wait on.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::Mmap;
use tokio::sync::watch;

use crate::digest::Digest;
use crate::meta::{now_secs, PieceRecord, TaskMeta, META_VERSION};
use crate::metrics::Metrics;
use crate::piece::Layout;
use crate::share::{Direct, Fetcher, StoreEvent};
use crate::source::Source;
use crate::stage::staged_at;
use crate::store::Inner as StoreInner;
use crate::StoreError;

/// A piece read from disk is re-checked against its crc32c when it was last checked longer ago
/// than this: often enough to catch a disk that rots under us, rarely enough that a hot blob is
/// served at memory speed.
const RECHECK_AFTER: Duration = Duration::from_secs(60);
/// Flushing metadata more often than this during a download buys nothing: recovery re-checks.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub(crate) enum Piece {
    Missing,
    Fetching(u64),
    Present { record: PieceRecord, checked: Option<Instant> },
}

pub(crate) struct State {
    pub(crate) pieces: Vec<Piece>,
    pub(crate) verified: bool,
    pub(crate) media_type: Option<String>,
    pub(crate) public_in: BTreeMap<String, u64>,
    pub(crate) supplier: Option<String>,
    /// Contiguous write position of each running fetch.
    pub(crate) fetch_pos: HashMap<u64, u64>,
    /// Fetches that gave up, so that readers waiting on them fail instead of retrying forever.
    pub(crate) failed_fetches: HashMap<u64, String>,
    next_fetch: u64,
    /// The task was discarded (its content failed verification): every reader must abort.
    pub(crate) failed: Option<String>,
    /// The source answered a range request with the whole content once; ask for all of it.
    pub(crate) range_unsupported: bool,
    pub(crate) verifying: bool,
    /// Pieces dropped after failing their check: a stream hash only vouches for the file if
    /// no piece was replaced while the stream ran.
    pub(crate) demotions: u64,
    pub(crate) dirty: bool,
    /// Pieces that arrived from other peers (for the download metrics' `source` label).
    pub(crate) from_peer: Vec<bool>,
    /// The schedulers were told this node holds the whole task.
    announced: bool,
    /// Whole-content hash over the pieces present in order so far (see `verify.rs`).
    pub(crate) ahead: Option<crate::verify::Ahead>,
    pub(crate) ahead_running: bool,
    /// Chunks from running fetches by offset, tagged with the fetch: bytes not yet on disk,
    /// and a short trail of bytes just written (see `stage.rs`).
    pub(crate) staged: BTreeMap<u64, (u64, Bytes)>,
    pub(crate) readers: crate::pace::Readers,
    last_flush: Instant,
    pub(crate) last_access: u64,
}

pub struct Task {
    pub(crate) digest: Digest,
    pub(crate) layout: Layout,
    pub(crate) file: File,
    pub(crate) map: Option<Mmap>,
    pub(crate) meta_path: PathBuf,
    pub(crate) state: Mutex<State>,
    pub(crate) progress: watch::Sender<u64>,
    /// Readers moved on (see `pace.rs`).
    pub(crate) consumed: tokio::sync::Notify,
    pub(crate) pins: AtomicUsize,
    /// A whole-task fill runs (see `reader::fill`).
    pub(crate) filling: std::sync::atomic::AtomicBool,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) store: Weak<StoreInner>,
}

/// What a reader at some offset can do next.
pub(crate) enum Step {
    /// Bytes in this range can be sent; `cached` when they were on disk before the request.
    /// `staged` holds them when they are still in memory (then `range` is what it covers).
    Ready { range: Range<u64>, cached: bool, staged: Option<Bytes> },
    /// The piece must be checked against its crc32c before it is served.
    Check(usize),
    /// A fetch must be started for these pieces.
    Fetch { pieces: Range<usize>, id: u64 },
    /// Nothing to do until progress is published; names the fetch being waited on, if any.
    Wait(watch::Receiver<u64>, Option<u64>),
}

impl Task {
    pub(crate) fn from_meta(
        meta: TaskMeta,
        file: File,
        meta_path: PathBuf,
        metrics: Arc<Metrics>,
        store: Weak<StoreInner>,
    ) -> Result<Task, StoreError> {
        let layout = Layout::with_piece_size(meta.len, meta.piece_size);
        let map = map_file(&file, meta.len)?;
        let pieces = meta
            .pieces
            .into_iter()
            .map(|p| match p {
                // Nothing read back from disk is trusted until checked again.
                Some(record) => Piece::Present { record, checked: None },
                None => Piece::Missing,
            })
            .collect();
        let count = layout.count();
        let state = State {
            from_peer: vec![false; count],
            announced: false,
            ahead: None,
            ahead_running: false,
            staged: BTreeMap::new(),
            readers: Default::default(),
            pieces,
            verified: meta.verified,
            media_type: meta.media_type,
            public_in: meta.public_in,
            supplier: meta.supplier,
            fetch_pos: HashMap::new(),
            failed_fetches: HashMap::new(),
            next_fetch: 1,
            failed: None,
            range_unsupported: false,
            verifying: false,
            demotions: 0,
            dirty: false,
            last_flush: Instant::now(),
            last_access: meta.last_access,
        };
        Ok(Task {
            digest: meta.digest,
            layout,
            file,
            map,
            meta_path,
            state: Mutex::new(state),
            progress: watch::channel(0).0,
            consumed: tokio::sync::Notify::new(),
            pins: AtomicUsize::new(0),
            filling: Default::default(),
            metrics,
            store,
        })
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn len(&self) -> u64 {
        self.layout.len
    }

    pub fn is_empty(&self) -> bool {
        self.layout.len == 0
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug elsewhere; the state itself stays
        // consistent piece by piece, so keep serving rather than poisoning every reader.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_verified(&self) -> bool {
        self.lock().verified
    }

    pub fn is_complete(&self) -> bool {
        self.lock().pieces.iter().all(|p| matches!(p, Piece::Present { .. }))
    }

    pub fn media_type(&self) -> Option<String> {
        self.lock().media_type.clone()
    }

    pub(crate) fn notify(&self) {
        self.progress.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Bytes of the task's file in `range`, backed by the shared map.
    pub(crate) fn bytes(&self, range: Range<u64>) -> &[u8] {
        match &self.map {
            Some(m) => &m[range.start as usize..range.end as usize],
            None => &[],
        }
    }

    /// A copy of the task's file in `range`, read with `pread`: for readers that touch the
    /// bytes in user space (rustls encrypting them), where a mapped page whose disk read fails
    /// is a SIGBUS that kills the daemon, and here an error.
    pub(crate) fn read_copy(&self, range: Range<u64>) -> std::io::Result<Bytes> {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.file.read_exact_at(&mut buf, range.start)?;
        Ok(Bytes::from(buf))
    }

    /// Decides what a reader at `pos` (reading up to `end`) does next. `full` readers send the
    /// whole content and so must not receive its last byte before the digest matched.
    pub(crate) fn step(
        self: &Arc<Self>,
        pos: u64,
        end: u64,
        full: bool,
        waited_on: Option<u64>,
    ) -> Result<Step, String> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(why.clone());
        }
        let i = self.layout.piece_of(pos);
        let piece_end = self.layout.piece_range(i).end.min(end);
        let mut fetch = None;
        let (mut ready, cached) = match &st.pieces[i] {
            Piece::Present { checked, .. } => {
                let in_memory = staged_at(&st.staged, pos).is_some();
                if !in_memory && checked.is_none_or(|t| t.elapsed() > RECHECK_AFTER) {
                    return Ok(Step::Check(i));
                }
                (piece_end, true)
            }
            Piece::Fetching(id) => {
                fetch = Some(*id);
                let written = st.fetch_pos.get(id).copied().unwrap_or(0);
                (written.min(piece_end), false)
            }
            Piece::Missing => {
                if let Some(why) = waited_on.and_then(|id| st.failed_fetches.get(&id)) {
                    return Err(why.clone());
                }
                let (pieces, id) = self.plan_fetch(&mut st, i, end);
                return Ok(Step::Fetch { pieces, id });
            }
        };
        // Hold back the final byte of a whole-content response until the digest matched.
        if full && !st.verified && ready == self.layout.len {
            ready -= 1;
            if !st.verifying && ready == pos {
                if st.pieces.iter().any(|p| matches!(p, Piece::Missing)) {
                    // A piece this reader already sent was found corrupt and dropped since.
                    return Err("content changed while it was being read".to_owned());
                }
                if st.pieces.iter().all(|p| matches!(p, Piece::Present { .. })) {
                    // Subscribe first: a small task may be verified before this returns.
                    let rx = self.progress.subscribe();
                    drop(st);
                    self.verify_ahead();
                    return Ok(Step::Wait(rx, None));
                }
            }
        }
        if ready > pos {
            st.last_access = now_secs();
            let staged = staged_at(&st.staged, pos).map(|(at, chunk)| {
                let end = ready.min(at + chunk.len() as u64);
                ready = end;
                chunk.slice((pos - at) as usize..(end - at) as usize)
            });
            return Ok(Step::Ready { range: pos..ready, cached, staged });
        }
        Ok(Step::Wait(self.progress.subscribe(), fetch))
    }

    /// Claims the run of missing pieces from `first` up to the piece holding `end - 1`; with a
    /// source that ignores ranges, every missing piece (it will all arrive in one stream anyway).
    fn plan_fetch(&self, st: &mut State, first: usize, end: u64) -> (Range<usize>, u64) {
        let id = st.next_fetch;
        st.next_fetch += 1;
        let last = if st.range_unsupported { self.layout.count() } else { self.layout.piece_of(end - 1) + 1 };
        let mut stop = first;
        while stop < last && matches!(st.pieces[stop], Piece::Missing) {
            st.pieces[stop] = Piece::Fetching(id);
            stop += 1;
        }
        st.fetch_pos.insert(id, self.layout.piece_range(first).start);
        (first..stop, id)
    }

    /// Records a fetch's contiguous progress (bytes up to `pos` are in the file or staged).
    pub(crate) fn advance(&self, id: u64, pos: u64) {
        self.lock().fetch_pos.insert(id, pos);
        self.notify();
    }

    /// Piece `i`, claimed by fetch `id`, is on disk. `checked` is when its bytes were last
    /// seen to match `record` where readers will read them; `None` makes the first read check.
    pub(crate) fn piece_done(&self, id: u64, i: usize, record: PieceRecord, checked: Option<Instant>) {
        let flush = {
            let mut st = self.lock();
            if matches!(st.pieces[i], Piece::Fetching(f) if f == id) {
                st.pieces[i] = Piece::Present { record, checked };
                st.dirty = true;
            }
            st.last_flush.elapsed() > FLUSH_EVERY
        };
        if flush {
            self.flush();
        }
    }

    pub(crate) fn set_piece_sha(&self, i: usize, sha256: String) {
        {
            let mut st = self.lock();
            let Piece::Present { record, .. } = &mut st.pieces[i] else { return };
            record.sha256 = Some(sha256.clone());
            st.dirty = true;
        }
        // The digest of a piece read from a source is what other nodes verify it by.
        self.emit(StoreEvent::PieceHashed { digest: self.digest.clone(), piece: i, sha256 });
        self.announce_if_ready();
    }

    /// Once the task is verified and every piece digest known, whoever the store shares its
    /// pieces with hears that it holds the whole task.
    fn announce_if_ready(&self) {
        if !self.is_shared() {
            return;
        }
        {
            let mut st = self.lock();
            let ready = st.verified
                && st.pieces.iter().all(|p| matches!(p, Piece::Present { record, .. } if record.sha256.is_some()));
            if st.announced || !ready {
                return;
            }
            st.announced = true;
        }
        self.emit(StoreEvent::TaskReady(self.meta()));
    }

    /// Piece `i`, fetched by `id` from another peer and verified against its pinned digest.
    pub(crate) fn piece_from_peer(&self, id: u64, i: usize, record: PieceRecord) {
        self.lock().from_peer[i] = true;
        self.piece_done(id, i, record, Some(Instant::now()));
        self.notify();
    }

    /// Whether the bytes of piece `i` came from another peer.
    pub(crate) fn is_from_peer(&self, i: usize) -> bool {
        self.lock().from_peer.get(i).copied().unwrap_or(false)
    }

    /// The pieces of `run` still claimed by fetch `id` (not yet present).
    /// Nothing once the task failed: its claims stay until the fetch ends, and a fetch that
    /// kept taking them from parents or the origin would write to a file nobody will read.
    pub(crate) fn claimed(&self, id: u64, run: Range<usize>) -> Vec<usize> {
        let st = self.lock();
        if st.failed.is_some() {
            return Vec::new();
        }
        run.filter(|&i| matches!(st.pieces[i], Piece::Fetching(f) if f == id)).collect()
    }

    /// Numbers of the pieces present now.
    pub fn present_pieces(&self) -> Vec<u32> {
        let st = self.lock();
        (0..st.pieces.len()).filter(|&i| matches!(st.pieces[i], Piece::Present { .. })).map(|i| i as u32).collect()
    }

    /// Whether piece `i` can be handed to another peer: `Ok(true)` when present and checked
    /// recently, `Ok(false)` when it must be checked first, `Err` when it is not here.
    pub(crate) fn uploadable(&self, i: usize) -> Result<bool, ()> {
        let st = self.lock();
        if st.failed.is_some() {
            return Err(());
        }
        match st.pieces.get(i) {
            Some(Piece::Present { checked, .. }) => Ok(checked.is_some_and(|t| t.elapsed() <= RECHECK_AFTER)),
            _ => Err(()),
        }
    }

    /// Whether the store shares its pieces with other nodes (see `share.rs`).
    pub(crate) fn is_shared(&self) -> bool {
        self.store.upgrade().is_some_and(|s| s.sharing().is_some())
    }

    fn emit(&self, event: StoreEvent) {
        if let Some(sharing) = self.store.upgrade().as_deref().and_then(StoreInner::sharing) {
            sharing.emit(event);
        }
    }

    /// Whether piece `i` is this fetch's to write.
    pub(crate) fn owns(&self, id: u64, i: usize) -> bool {
        matches!(self.lock().pieces[i], Piece::Fetching(f) if f == id)
    }

    /// After a source ignored a range: claim every missing piece for the fetch that is now
    /// reading the whole content.
    pub(crate) fn claim_all_missing(&self, id: u64) {
        let mut st = self.lock();
        st.range_unsupported = true;
        // The stream restarts at offset 0: nothing it claims is written yet.
        st.fetch_pos.insert(id, 0);
        for p in st.pieces.iter_mut() {
            if matches!(p, Piece::Missing) {
                *p = Piece::Fetching(id);
            }
        }
    }

    /// Ends fetch `id`: its unclaimed pieces become missing again, and on failure the readers
    /// that waited on it are told why.
    pub(crate) fn finish_fetch(&self, id: u64, hashing: bool, error: Option<String>) {
        {
            let mut st = self.lock();
            if hashing {
                st.verifying = false;
            }
            st.fetch_pos.remove(&id);
            for p in st.pieces.iter_mut() {
                if matches!(p, Piece::Fetching(f) if *f == id) {
                    *p = Piece::Missing;
                }
            }
            if let Some(why) = error {
                if st.failed_fetches.len() > 64 {
                    st.failed_fetches.clear();
                }
                st.failed_fetches.insert(id, why);
            }
        }
        self.flush();
        self.notify();
    }

    /// A fetch that streams the whole content hashes it; no separate verification pass is needed.
    /// Returns the demotion count to hand back to [`Task::streamed_verified`].
    pub(crate) fn begin_streaming_verify(&self) -> u64 {
        let mut st = self.lock();
        st.verifying = true;
        st.demotions
    }

    /// The streamed content matched the digest. It vouches for the file only if the stream
    /// wrote every piece and none was replaced meanwhile; otherwise a full read hashes the file.
    pub(crate) fn streamed_verified(&self, wrote_all: bool, demotions_at_start: u64) {
        let vouches = wrote_all && {
            let st = self.lock();
            st.demotions == demotions_at_start && st.pieces.iter().all(|p| matches!(p, Piece::Present { .. }))
        };
        if vouches {
            self.set_verified();
        } else {
            tracing::debug!(digest = %self.digest, "stream matched, but the file holds other bytes too; verifying on read");
        }
    }

    pub(crate) fn set_verified(&self) {
        {
            let mut st = self.lock();
            st.verified = true;
            st.verifying = false;
            st.dirty = true;
        }
        self.after_verified();
    }

    /// Persists and publishes a verification made under the state lock.
    pub(crate) fn after_verified(&self) {
        self.flush();
        self.notify();
        self.announce_if_ready();
    }

    /// The content does not match its digest: nothing of it may be served again.
    pub(crate) fn discard(&self, why: &str) {
        tracing::error!(digest = %self.digest, reason = why, "discarding task");
        self.metrics.verify_failures.inc();
        self.abandon(why);
    }

    /// Drops the task from the store and fails its readers, freeing its disk space: after a
    /// write error (a full disk), so that the client's retry streams through uncached instead
    /// of meeting the same error, or when what the origin said of it proved wrong.
    pub fn abandon(&self, why: &str) {
        self.lock().failed = Some(why.to_owned());
        if let Some(store) = self.store.upgrade() {
            store.remove_task(&self.digest, self);
        }
        self.notify();
    }

    pub(crate) fn meta(&self) -> TaskMeta {
        let st = self.lock();
        TaskMeta {
            version: META_VERSION,
            digest: self.digest.clone(),
            len: self.layout.len,
            piece_size: self.layout.piece_size,
            pieces: st
                .pieces
                .iter()
                .map(|p| match p {
                    Piece::Present { record, .. } => Some(record.clone()),
                    _ => None,
                })
                .collect(),
            verified: st.verified,
            last_access: st.last_access,
            media_type: st.media_type.clone(),
            public_in: st.public_in.clone(),
            supplier: st.supplier.clone(),
        }
    }

    /// Persists the metadata if it changed. Errors are logged: the bytes are still served and
    /// recovery re-checks whatever the last good metadata claims.
    pub fn flush(&self) {
        {
            let mut st = self.lock();
            if !st.dirty || st.failed.is_some() {
                return;
            }
            st.dirty = false;
            st.last_flush = Instant::now();
        }
        if let Err(e) = self.meta().store(&self.meta_path) {
            tracing::warn!(digest = %self.digest, error = %e, "could not persist task metadata");
        }
    }

    pub(crate) fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Starts fetch `id` of `pieces` in the background, with the fetcher the store was handed
    /// (from `source` alone, unless the store shares its pieces).
    pub(crate) fn spawn_fetch(self: &Arc<Self>, id: u64, pieces: Range<usize>, source: Arc<dyn Source>) {
        let task = TaskRef::pin(self.clone());
        match self.store.upgrade().as_deref().and_then(StoreInner::sharing) {
            Some(sharing) => sharing.fetcher.fetch(task, id, pieces, source),
            None => Direct.fetch(task, id, pieces, source),
        }
    }
}

fn map_file(file: &File, len: u64) -> Result<Option<Mmap>, StoreError> {
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: the store never truncates a task file while it is mapped: files are created at
    // their full length and only ever unlinked, which keeps existing mappings valid.
    let map = unsafe { Mmap::map(file) }.map_err(StoreError::Io)?;
    Ok(Some(map))
}

/// A pinned task: while any `TaskRef` lives, the task is not evicted.
pub struct TaskRef(Arc<Task>);

impl TaskRef {
    pub(crate) fn pin(task: Arc<Task>) -> Self {
        task.pins.fetch_add(1, Ordering::SeqCst);
        TaskRef(task)
    }

    pub fn task(&self) -> &Arc<Task> {
        &self.0
    }
}

impl Clone for TaskRef {
    fn clone(&self) -> Self {
        TaskRef::pin(self.0.clone())
    }
}

impl Drop for TaskRef {
    fn drop(&mut self) {
        self.0.pins.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::ops::Deref for TaskRef {
    type Target = Task;
    fn deref(&self) -> &Task {
        &self.0
    }
}
