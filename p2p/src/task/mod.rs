//! One task: a blob (or manifest) keyed by digest, held in one sparse file cut into pieces.
//!
//! What changes lives under one mutex, in parts that each keep their own invariants in their
//! own file: the piece map and the fetches' claims on it (`pieces.rs`), whether the content is
//! verified and the hash passes that decide it (`verify.rs`), where the content came from and
//! who may read it (`provenance.rs`), fetched bytes held in memory for readers (`staged.rs`),
//! and where the readers are (`pace.rs`). This file holds what a reader asks of the whole
//! ([`Task::step`]), the task's life (failed, abandoned, flushed) and its metadata.
//!
//! Bytes live in the file and are read through a shared memory map, so readers never copy them
//! into anonymous memory. Progress is published through a `watch` generation counter that
//! readers wait on.

mod pace;
mod pieces;
mod provenance;
mod staged;
mod verify;

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::Mmap;
use tokio::sync::watch;

use crate::digest::{Algorithm, Digest};
use crate::meta::{now_secs, PieceRecord, TaskMeta, META_VERSION};
use crate::metrics::Metrics;
use crate::piece::Layout;
use crate::share::{Direct, Fetcher, StoreEvent};
use crate::source::Source;
use crate::store::Inner as StoreInner;
use crate::StoreError;
use pieces::{Piece, PieceMap};
use provenance::Provenance;
use staged::Staged;
use verify::Verification;

#[cfg(test)]
pub(crate) use pace::AHEAD;

/// Flushing metadata more often than this during a download buys nothing: recovery re-checks.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Everything about a task that changes, under one lock. Each part keeps its own invariants
/// in its own file; what crosses parts (a demotion unverifies the task) is decided here.
struct TaskState {
    /// Which pieces are present, and which running fetch claims which (`pieces.rs`).
    pieces: PieceMap,
    /// Whether the content is its digest's, and the hash passes that find out (`verify.rs`).
    verification: Verification,
    /// Media type, public repositories, supplier (`provenance.rs`).
    provenance: Provenance,
    /// Fetched bytes held in memory for readers (`staged.rs`).
    staged: Staged,
    /// Where each open reader is, for pacing fetches (`pace.rs`).
    readers: pace::Readers,
    /// The task was discarded (its content failed verification, it was evicted or abandoned):
    /// every reader must abort.
    failed: Option<String>,
    /// Whoever the store shares pieces with was told this node holds the whole task.
    announced: bool,
    /// The metadata on disk is older than this state.
    dirty: bool,
    last_flush: Instant,
    last_access: u64,
    /// Never evicted (see `TaskMeta::kept`).
    kept: bool,
}

impl TaskState {
    /// Drops present piece `i`: it is fetched again, and the task verified again once it is
    /// back.
    fn demote(&mut self, i: usize) -> bool {
        if !self.pieces.demote(i) {
            return false;
        }
        self.verification.unverify();
        self.dirty = true;
        true
    }
}

/// One task: a blob or manifest keyed by digest, held in one sparse file cut into pieces.
pub struct Task {
    digest: Digest,
    layout: Layout,
    file: File,
    map: Option<Mmap>,
    meta_path: PathBuf,
    state: Mutex<TaskState>,
    progress: watch::Sender<u64>,
    /// Readers moved on (see `pace.rs`).
    consumed: tokio::sync::Notify,
    pins: AtomicUsize,
    /// Bytes of pieces that arrived (a piece fetched again counts again; the store's charge
    /// stops at the task's length).
    held: AtomicU64,
    /// A whole-task fill runs (see `reader::fill`).
    pub(crate) filling: std::sync::atomic::AtomicBool,
    pub(crate) metrics: Arc<Metrics>,
    store: Weak<StoreInner>,
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

/// Why a reader cannot go on.
#[derive(Debug)]
pub(crate) enum StepError {
    /// The task failed (why).
    TaskFailed(String),
    /// The fetch the reader waited on gave up (why).
    FetchFailed(String),
    /// A piece the reader already sent was dropped since.
    Changed,
}

/// Whether a piece can be handed to another peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Uploadable {
    /// Present and checked recently.
    Ready,
    /// Present, but it must be checked against its crc32c first.
    AfterCheck,
    /// Not here (or the task failed).
    Absent,
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
        let held = AtomicU64::new(meta.stored_bytes());
        let state = TaskState {
            pieces: PieceMap::new(layout, meta.pieces),
            verification: Verification::new(meta.verified),
            provenance: Provenance::new(meta.media_type, meta.public_in, meta.supplier),
            staged: Staged::default(),
            readers: Default::default(),
            failed: None,
            announced: false,
            dirty: false,
            last_flush: Instant::now(),
            last_access: meta.last_access,
            kept: meta.kept,
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
            held,
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

    fn lock(&self) -> MutexGuard<'_, TaskState> {
        // A panic while holding this lock would be a bug elsewhere; the state itself stays
        // consistent piece by piece, so keep serving rather than poisoning every reader.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_verified(&self) -> bool {
        self.lock().verification.is_verified()
    }

    pub fn is_complete(&self) -> bool {
        self.lock().pieces.all_present()
    }

    /// Waits until the task is verified, failed, or lacks a piece: after its last piece
    /// landed, the whole is hashed before anyone may say it is verified.
    pub async fn verdict(&self) {
        let mut changed = self.progress.subscribe();
        loop {
            {
                let st = self.lock();
                if st.verification.is_verified() || st.failed.is_some() || !st.pieces.all_present() {
                    return;
                }
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether anyone holds this task pinned (a reader, a fetch): it is not evicted then.
    pub(crate) fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::SeqCst) > 0
    }

    fn notify(&self) {
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

    /// A copy of `range` if every piece it covers is here, for comparing with bytes from
    /// elsewhere; read with `pread` like [`Task::read_copy`].
    pub fn present_copy(&self, range: Range<u64>) -> Option<Bytes> {
        if !self.holds(range.clone()) {
            return None;
        }
        self.read_copy(range).ok()
    }

    /// Whether every piece `range` covers is here (a non-empty range within the task).
    pub fn holds(&self, range: Range<u64>) -> bool {
        if range.start >= range.end || range.end > self.layout.len {
            return false;
        }
        let pieces = self.layout.piece_of(range.start)..=self.layout.piece_of(range.end - 1);
        let st = self.lock();
        pieces.into_iter().all(|i| st.pieces.get(i).is_some_and(|p| p.is_present()))
    }

    pub(crate) fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// The task file, for a writer that opens it again (`O_DIRECT`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Decides what a reader at `pos` (reading up to `end`) does next. `full` readers send the
    /// whole content and so must not receive its last byte before the digest matched.
    pub(crate) fn step(
        self: &Arc<Self>,
        pos: u64,
        end: u64,
        full: bool,
        waited_on: Option<u64>,
    ) -> Result<Step, StepError> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(StepError::TaskFailed(why.clone()));
        }
        let i = self.layout.piece_of(pos);
        let piece_end = self.layout.piece_range(i).end.min(end);
        let mut fetch = None;
        let (mut ready, cached) = match st.pieces.get(i) {
            Some(Piece::Present { .. }) => {
                let in_memory = st.staged.at(pos).is_some();
                if !in_memory && st.pieces.needs_check(i) {
                    return Ok(Step::Check(i));
                }
                (piece_end, true)
            }
            Some(Piece::Claimed(id)) => {
                fetch = Some(*id);
                (st.pieces.fetch_pos(*id).min(piece_end), false)
            }
            _ => {
                if let Some(why) = waited_on.and_then(|id| st.pieces.failure_of(id)) {
                    return Err(StepError::FetchFailed(why.clone()));
                }
                let (pieces, id) = st.pieces.claim(i, end);
                return Ok(Step::Fetch { pieces, id });
            }
        };
        // Hold back the final byte of a whole-content response until the digest matched.
        if full && !st.verification.is_verified() && ready == self.layout.len {
            ready -= 1;
            if !st.verification.is_streaming() && ready == pos {
                if st.pieces.any_missing() {
                    // A piece this reader already sent was found corrupt and dropped since.
                    return Err(StepError::Changed);
                }
                if st.pieces.all_present() {
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
            let staged = st.staged.at(pos).map(|(at, chunk)| {
                let end = ready.min(at + chunk.len() as u64);
                ready = end;
                chunk.slice((pos - at) as usize..(end - at) as usize)
            });
            return Ok(Step::Ready { range: pos..ready, cached, staged });
        }
        Ok(Step::Wait(self.progress.subscribe(), fetch))
    }

    /// Records a fetch's contiguous progress (bytes up to `pos` are in the file or staged).
    pub(crate) fn advance(&self, id: u64, pos: u64) {
        self.lock().pieces.advance(id, pos);
        self.notify();
    }

    /// Piece `i`, claimed by fetch `id`, is on disk. `checked` is when its bytes were last
    /// seen to match `record` where readers will read them; `None` makes the first read check.
    pub(crate) fn piece_done(&self, id: u64, i: usize, record: PieceRecord, checked: Option<Instant>) {
        let (flush, new) = {
            let mut st = self.lock();
            let new = st.pieces.done(id, i, record, checked);
            st.dirty |= new;
            (st.last_flush.elapsed() > FLUSH_EVERY, new)
        };
        if new {
            let range = self.layout.piece_range(i);
            self.hold(range.end - range.start);
        }
        if flush {
            self.flush();
        }
    }

    /// `more` bytes arrived: the store charges the task for them (see `Store::charge`).
    fn hold(&self, more: u64) {
        let held = self.held.fetch_add(more, Ordering::SeqCst) + more;
        if let Some(store) = self.store.upgrade() {
            store.charge(&self.digest, self, held);
        }
    }

    /// Piece `i`, fetched by `id` from another peer and verified against its pinned digest.
    pub(crate) fn piece_from_peer(&self, id: u64, i: usize, record: PieceRecord) {
        self.lock().pieces.mark_from_peer(i);
        self.piece_done(id, i, record, Some(Instant::now()));
        self.notify();
    }

    /// Whether the bytes of piece `i` came from another peer.
    pub(crate) fn is_from_peer(&self, i: usize) -> bool {
        self.lock().pieces.is_from_peer(i)
    }

    pub(crate) fn set_piece_sha(&self, i: usize, sha256: String) {
        {
            let mut st = self.lock();
            if !st.pieces.set_sha(i, sha256.clone()) {
                return;
            }
            st.dirty = true;
        }
        // The digest of a piece read from a source is what other nodes verify it by.
        self.emit(StoreEvent::PieceHashed { digest: self.digest.clone(), piece: i, sha256 });
        self.announce_if_ready();
    }

    /// Once the task is verified and every piece digest known, whoever the store shares its
    /// pieces with hears that it holds the whole task.
    pub(crate) fn announce_if_ready(&self) {
        if !self.is_shared() {
            return;
        }
        {
            let mut st = self.lock();
            let ready = st.verification.is_verified() && st.pieces.all_hashed();
            if st.announced || !ready {
                return;
            }
            st.announced = true;
        }
        self.emit(StoreEvent::TaskReady(self.meta()));
    }

    /// The pieces of `run` still claimed by fetch `id` (not yet present).
    /// Nothing once the task failed: its claims stay until the fetch ends, and a fetch that
    /// kept taking them from parents or the origin would write to a file nobody will read.
    pub(crate) fn claimed(&self, id: u64, run: Range<usize>) -> Vec<usize> {
        let st = self.lock();
        if st.failed.is_some() {
            return Vec::new();
        }
        st.pieces.claimed_by(id, run)
    }

    /// Whether piece `i` is this fetch's to write.
    pub(crate) fn owns(&self, id: u64, i: usize) -> bool {
        self.lock().pieces.owns(id, i)
    }

    /// After a source ignored a range: claim every missing piece for the fetch that is now
    /// reading the whole content (from offset 0: nothing it claims is written yet).
    pub(crate) fn claim_all_missing(&self, id: u64) {
        self.lock().pieces.claim_all_missing(id);
    }

    /// Ends fetch `id`: its unclaimed pieces become missing again, and on failure the readers
    /// that waited on it are told why. `hashing`: the fetch streamed the content through its
    /// own hash.
    pub(crate) fn finish_fetch(&self, id: u64, hashing: bool, error: Option<String>) {
        {
            let mut st = self.lock();
            if hashing {
                st.verification.end_streaming();
            }
            st.pieces.release(id, error);
            // The blocks allocated up front for pieces that did not come go back to the disk
            // (under the lock, so no fetch claims one meanwhile): a length a registry made up
            // holds no disk once its fetch ended.
            for run in st.pieces.idle_missing_runs() {
                punch_hole(&self.file, run);
            }
        }
        self.flush();
        self.notify();
    }

    /// Numbers of the pieces present now.
    pub fn present_pieces(&self) -> Vec<u32> {
        self.lock().pieces.present_numbers()
    }

    /// Whether piece `i` can be handed to another peer.
    pub(crate) fn uploadable(&self, i: usize) -> Uploadable {
        let st = self.lock();
        if st.failed.is_some() || !st.pieces.get(i).is_some_and(Piece::is_present) {
            return Uploadable::Absent;
        }
        match st.pieces.needs_check(i) {
            true => Uploadable::AfterCheck,
            false => Uploadable::Ready,
        }
    }

    /// Whether the store shares its pieces with other nodes (see `share.rs`).
    pub(crate) fn is_shared(&self) -> bool {
        self.store.upgrade().is_some_and(|s| s.sharing().is_some())
    }

    fn emit(&self, event: StoreEvent) {
        if let Some(store) = self.store.upgrade() {
            store.emit(event);
        }
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

    /// Keeps `chunk`, the bytes at `offset` taken by fetch `id`, in memory for readers until
    /// the fetch has written them.
    pub(crate) fn stage(&self, id: u64, offset: u64, chunk: Bytes) {
        self.lock().staged.put(id, offset, chunk);
    }

    /// Forgets the chunks of fetch `id` that end at or below `below`: they are on disk.
    pub(crate) fn unstage(&self, id: u64, below: u64) {
        self.lock().staged.drop_below(id, below);
    }

    /// Whether the store wants fetched bytes written past the page cache.
    pub(crate) fn direct_io(&self) -> bool {
        self.store.upgrade().is_some_and(|s| s.direct_io)
    }

    /// Drops present piece `i` (its state locked by the caller), to be fetched again. A kept
    /// task is never written again (its file may be an imported file's other name): true means
    /// the caller must discard it instead, once it let go of the lock.
    #[must_use]
    fn demote(&self, st: &mut TaskState, i: usize) -> bool {
        if st.kept {
            return true;
        }
        if st.demote(i) {
            self.metrics.piece_failed("corrupt");
        }
        false
    }

    /// Writes all of `bytes` (already verified by the caller) and marks the task complete.
    pub(crate) fn fill_verified(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_at(bytes, 0)?;
        let records = (0..self.layout.count())
            .map(|i| {
                let r = self.layout.piece_range(i);
                let piece = &bytes[r.start as usize..r.end as usize];
                PieceRecord {
                    crc32c: crc32c::crc32c(piece),
                    sha256: Some(Digest::of(Algorithm::Sha256, piece).hex().to_owned()),
                }
            })
            .collect();
        self.lock().pieces.fill(records);
        self.hold(bytes.len() as u64);
        self.set_verified();
        Ok(())
    }

    /// Persists and publishes a verification.
    fn after_verified(&self) {
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

    /// A registry the operator trusts sent other bytes than the ones held here (before the
    /// content was verified): they are dropped, and said to be poisoned if other nodes supplied
    /// any, so that their suppliers are reported.
    pub fn contradict(&self, why: &str) {
        if !self.is_verified() {
            self.discard_wrong(why);
        }
    }

    /// The content here is wrong: it is discarded, after saying it was poisoned if other
    /// nodes supplied any of it (its suppliers are then reported).
    pub(crate) fn discard_wrong(&self, why: &str) {
        if self.lock().pieces.any_from_peer() {
            self.emit(StoreEvent::Poisoned(self.digest.clone()));
        }
        self.discard(why);
    }

    /// Drops the task from the store and fails its readers, freeing its disk space: after a
    /// write error (a full disk), so that the client's retry streams through uncached instead
    /// of meeting the same error, or when what the origin said of it proved wrong.
    pub fn abandon(&self, why: &str) {
        self.fail(why);
        if let Some(store) = self.store.upgrade() {
            store.remove_task(&self.digest, self);
        }
        self.notify();
    }

    /// Fails every reader of the task from now on (the store already let go of it).
    pub(crate) fn fail(&self, why: &str) {
        self.lock().failed = Some(why.to_owned());
    }

    /// Why the task failed, if it did.
    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    pub(crate) fn meta(&self) -> TaskMeta {
        let st = self.lock();
        let (media_type, public_in, supplier) = st.provenance.parts();
        TaskMeta {
            version: META_VERSION,
            digest: self.digest.clone(),
            len: self.layout.len,
            piece_size: self.layout.piece_size,
            pieces: st.pieces.records(),
            verified: st.verification.is_verified(),
            last_access: st.last_access,
            media_type,
            public_in,
            supplier,
            kept: st.kept,
        }
    }

    /// Keeps the task from eviction, or lets it go (the store's index follows: `Store::keep`).
    pub(crate) fn set_kept(&self, kept: bool) {
        let mut st = self.lock();
        if st.kept != kept {
            st.kept = kept;
            st.dirty = true;
        }
        drop(st);
        self.flush();
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

/// Gives the blocks of `range` back to the filesystem, keeping the file's length; where the
/// filesystem cannot, they stay allocated (the file reads zeros there either way).
fn punch_hole(file: &File, range: Range<u64>) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(range.start), libc::off_t::try_from(range.end - range.start))
    else {
        return;
    };
    // SAFETY: fallocate on a descriptor we own; no memory is involved.
    let rc =
        unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot give back a task's unused blocks");
    }
}
