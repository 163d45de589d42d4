//! Filling a run of pieces from a [`Source`]: one streaming request, resumed by range after a
//! failure, writing each byte at its offset, checksumming pieces as they complete and hashing
//! the whole content when the stream covers it.

use std::ops::Range;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use tracing::Instrument;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::meta::PieceRecord;
use crate::source::{Source, SourceError, SourceResponse};
use crate::task::TaskRef;

/// Consecutive failed attempts (without a byte of progress) before a fetch gives up.
const MAX_ATTEMPTS: u32 = 5;
/// A source that sends nothing for this long is treated as broken and asked again.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Readers are woken at most once per this many bytes (and at every piece end).
const NOTIFY_EVERY: u64 = 128 << 10;
/// Buffer of the piece hasher thread.
const HASH_BUF: usize = 1 << 20;

struct Fill {
    task: TaskRef,
    id: u64,
    /// Next offset expected from the source.
    pos: u64,
    end: u64,
    /// Hash of bytes `0..pos` when this fetch streams the content from its start.
    whole: Option<StreamHasher>,
    /// Piece demotions seen when the stream hash started (see `Task::streamed_verified`).
    demotions: u64,
    /// Every piece the stream passed through was written by this fetch.
    wrote_all: bool,
    piece_crc: u32,
    /// Where readers were last woken; `None` until the first bytes, which wake them at once.
    notified_at: Option<u64>,
    shas: mpsc::Sender<usize>,
}

pub(crate) async fn run(task: TaskRef, id: u64, pieces: Range<usize>, source: Arc<dyn Source>) {
    let (result, hashing) = fill(&task, id, pieces, &*source).await;
    task.finish_fetch(id, hashing, result.err().map(|e| e.message));
}

/// Fills the run `pieces` (claimed by fetch `id`) from `source` without ending the fetch.
/// Returns whether the run was streamed through the content hash (the caller hands that to
/// [`crate::Task::finish_fetch`]).
pub(crate) async fn fill(
    task: &TaskRef,
    id: u64,
    pieces: Range<usize>,
    source: &dyn Source,
) -> (Result<(), SourceError>, bool) {
    let layout = task.layout();
    let start = layout.piece_range(pieces.start).start;
    let end = layout.piece_range(pieces.end - 1).end;
    let whole = (start == 0 && end == layout.len).then(|| StreamHasher::start(task.digest().algorithm()));
    let demotions = if whole.is_some() { task.begin_streaming_verify() } else { 0 };
    let mut fill = Fill {
        shas: spawn_piece_hasher(task),
        task: task.clone(),
        id,
        pos: start,
        end,
        whole,
        demotions,
        wrote_all: true,
        piece_crc: 0,
        notified_at: None,
    };
    let span = tracing::debug_span!("fetch", digest = %fill.task.digest(), start, end);
    // A panic must not leave pieces claimed by a fetch that no longer runs: readers would wait
    // on them for ever. It ends the fetch like any other failure.
    let result = AssertUnwindSafe(fill.run(source).instrument(span))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(SourceError::fatal("fetch panicked")));
    let hashing = fill.whole.is_some();
    match &result {
        Ok(()) => {
            if let Some(h) = fill.whole.take() {
                if h.finish().await.as_ref() == Some(fill.task.digest()) {
                    fill.task.streamed_verified(fill.wrote_all, fill.demotions);
                } else {
                    fill.task.discard("content from the source does not match its digest");
                }
            }
        }
        Err(e) => tracing::warn!(digest = %fill.task.digest(), error = %e, "fetch failed"),
    }
    (result, hashing)
}

impl Fill {
    async fn run(&mut self, source: &dyn Source) -> Result<(), SourceError> {
        let mut failures = 0;
        loop {
            let before = self.pos;
            let err = match self.attempt(source).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if self.pos > before {
                failures = 0;
            }
            failures += 1;
            if !err.retryable || failures >= MAX_ATTEMPTS {
                return Err(err);
            }
            self.task.metrics.fetch_retries.inc();
            tracing::info!(error = %err, pos = self.pos, attempt = failures, "source failed; resuming by range");
            tokio::time::sleep(Duration::from_millis(50 << failures)).await;
        }
    }

    async fn attempt(&mut self, source: &dyn Source) -> Result<(), SourceError> {
        let len = self.task.len();
        let range = (self.pos != 0 || self.end != len).then_some(self.pos..self.end);
        let SourceResponse { range_honoured, mut body } =
            tokio::time::timeout(STALL_TIMEOUT, source.fetch(range.clone()))
                .await
                .map_err(|_| SourceError::retryable("source sent no response headers in time"))??;
        // Offset of the next byte the body yields.
        let mut at = self.pos;
        if range.is_some() && !range_honoured {
            at = 0;
            if self.pos == self.task.layout().piece_range(self.task.layout().piece_of(self.pos)).start
                && self.whole.is_none()
            {
                // First bytes of a range fetch from a source that ignores ranges: the whole
                // content is coming anyway, so take all of it and verify it as one stream.
                tracing::info!("source ignores Range; reading the whole content once");
                self.task.claim_all_missing(self.id);
                self.end = len;
                self.pos = 0;
                self.whole = Some(StreamHasher::start(self.task.digest().algorithm()));
                self.demotions = self.task.begin_streaming_verify();
                self.notified_at = None;
            }
        }
        while self.pos < self.end {
            let chunk = match tokio::time::timeout(STALL_TIMEOUT, body.next()).await {
                Err(_) => return Err(SourceError::retryable("source stalled")),
                Ok(None) => return Err(SourceError::retryable("source ended early")),
                Ok(Some(chunk)) => chunk?,
            };
            let chunk_end = at + chunk.len() as u64;
            // Bytes before `pos` were already taken in an earlier attempt.
            if chunk_end > self.pos {
                let skip = (self.pos - at.min(self.pos)) as usize;
                let take = (chunk.len() - skip).min((self.end - self.pos) as usize);
                self.accept(chunk.slice(skip..skip + take)).await?;
            }
            at = chunk_end;
        }
        Ok(())
    }

    /// Takes bytes at `self.pos`: writes the parts of owned pieces, checksums, publishes progress.
    async fn accept(&mut self, chunk: Bytes) -> Result<(), SourceError> {
        let layout = self.task.layout();
        self.task
            .metrics
            .fetched_bytes
            .get_or_create(&crate::metrics::SourceLabel { source: crate::Origin::Origin.label() })
            .inc_by(chunk.len() as u64);
        if let Some(h) = &self.whole {
            h.update(chunk.clone()).await?;
        }
        let mut data = &chunk[..];
        while !data.is_empty() {
            let i = layout.piece_of(self.pos);
            let piece = layout.piece_range(i);
            let n = data.len().min((piece.end - self.pos) as usize);
            let (part, rest) = data.split_at(n);
            let owned = self.task.owns(self.id, i);
            self.wrote_all &= owned;
            if owned {
                if let Err(e) = self.task.write_at(part, self.pos) {
                    let why = format!("cannot write to the cache: {e}");
                    tracing::warn!(error = %e, "cache write failed; dropping the task so retries stream through");
                    self.task.metrics.piece_failed("write");
                    self.task.abandon(&why);
                    return Err(SourceError::fatal(why));
                }
                self.piece_crc = crc32c::crc32c_append(self.piece_crc, part);
            }
            self.pos += n as u64;
            data = rest;
            if self.pos == piece.end {
                if owned {
                    // Present before readers are woken, so none sees the end of a piece that is
                    // neither being fetched nor done.
                    self.task.piece_done(self.id, i, PieceRecord { crc32c: self.piece_crc, sha256: None });
                    self.task.advance(self.id, self.pos);
                    let _ = self.shas.send(i);
                }
                self.piece_crc = 0;
                self.notified_at = Some(self.pos);
            }
        }
        let due = self.notified_at.is_none_or(|at| self.pos.saturating_sub(at) >= NOTIFY_EVERY);
        if due || self.pos == self.end {
            self.task.advance(self.id, self.pos);
            self.notified_at = Some(self.pos);
        }
        Ok(())
    }
}

/// Hashes the whole content on a blocking thread, so that receiving, writing and serving never
/// wait for SHA rounds: the stream costs max(network, hash) instead of their sum. The bounded
/// queue keeps memory flat when the network outruns the hash.
struct StreamHasher {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    done: tokio::task::JoinHandle<Digest>,
}

/// Chunks queued for the content hasher: with hyper's reads of up to ~400 KiB, a few MiB at most.
const HASH_QUEUE: usize = 16;

impl StreamHasher {
    fn start(algorithm: Algorithm) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(HASH_QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            let mut h = Hasher::new(algorithm);
            while let Some(b) = rx.blocking_recv() {
                h.update(&b);
            }
            h.finish()
        });
        StreamHasher { tx, done }
    }

    async fn update(&self, bytes: Bytes) -> Result<(), SourceError> {
        self.tx.send(bytes).await.map_err(|_| SourceError::fatal("content hasher stopped"))
    }

    async fn finish(self) -> Option<Digest> {
        drop(self.tx);
        self.done.await.ok()
    }
}

/// Per-piece sha256 is computed beside the stream, reading each finished piece back from the
/// page cache on a thread of its own at idle priority: the stream pays only for the
/// whole-content hash, and the piece hashes use whatever CPU the stream leaves over.
fn spawn_piece_hasher(task: &TaskRef) -> mpsc::Sender<usize> {
    let (tx, rx) = mpsc::channel::<usize>();
    // Unpinned: a lagging hasher must not keep the task from being evicted.
    let task = task.task().clone();
    // In a cluster the piece digests are what other peers wait for before they can take a piece
    // from this one: there the hasher keeps normal priority.
    let idle = !task.store_has_network();
    let spawned = std::thread::Builder::new().name("piece-sha256".into()).spawn(move || {
        if idle {
            lower_priority();
        }
        // Read with pread, not through the map: this thread may outlive the daemon that
        // started it, and a file changed under a map is a SIGBUS, under pread a short read.
        let mut buf = vec![0u8; HASH_BUF];
        while let Ok(i) = rx.recv() {
            if let Some(sha) = hash_piece(&task, i, &mut buf) {
                task.set_piece_sha(i, sha);
            }
        }
    });
    if let Err(e) = spawned {
        // Without the thread the pieces simply keep no sha256 until a later pass computes it.
        tracing::warn!(error = %e, "cannot start the piece hasher");
    }
    tx
}

fn hash_piece(task: &crate::Task, i: usize, buf: &mut [u8]) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let range = task.layout().piece_range(i);
    let mut h = Hasher::new(crate::Algorithm::Sha256);
    let mut pos = range.start;
    while pos < range.end {
        let n = buf.len().min((range.end - pos) as usize);
        task.file.read_exact_at(&mut buf[..n], pos).ok()?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Some(h.finish().hex().to_owned())
}

fn lower_priority() {
    // SAFETY: plain syscall on the calling thread with a valid, zeroed sched_param.
    unsafe {
        let param: libc::sched_param = std::mem::zeroed();
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}
