//! Filling a run of pieces from a [`Source`]: one streaming request, resumed by range after a
//! failure, handing each byte to the write-behind stage (`stage.rs`), which puts it at its
//! offset and checksums the pieces, and hashing the whole content when the stream covers it.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use tracing::Instrument;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::source::{Source, SourceError, SourceResponse};
use crate::stage::Stage;
use crate::task::TaskRef;

/// Consecutive failed attempts (without a byte of progress) before a fetch gives up.
const MAX_ATTEMPTS: u32 = 5;
/// A source that sends nothing for this long is treated as broken and asked again.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Readers are woken at most once per this many bytes (and at every piece end).
const NOTIFY_EVERY: u64 = 128 << 10;

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
    /// Where readers were last woken; `None` until the first bytes, which wake them at once.
    notified_at: Option<u64>,
    stage: Stage,
    /// The source ended its content cleanly before the task's length.
    short: bool,
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
    let stage = match Stage::start(task, id) {
        Ok(stage) => stage,
        Err(e) => return (Err(e), false),
    };
    let whole = (start == 0 && end == layout.len).then(|| StreamHasher::start(task.digest().algorithm()));
    let demotions = if whole.is_some() { task.begin_streaming_verify() } else { 0 };
    let mut fill = Fill {
        stage,
        task: task.clone(),
        id,
        pos: start,
        end,
        whole,
        demotions,
        wrote_all: true,
        notified_at: None,
        short: false,
    };
    let span = tracing::debug_span!("fetch", digest = %fill.task.digest(), start, end);
    // A panic must not leave pieces claimed by a fetch that no longer runs: readers would wait
    // on them for ever. It ends the fetch like any other failure.
    let mut result = AssertUnwindSafe(fill.run(source).instrument(span))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(SourceError::fatal("fetch panicked")));
    // Whatever happened, what was staged goes to disk before the fetch ends: its pieces become
    // present, and readers that were told of its bytes find them there.
    if let Err(e) = fill.stage.finish().await {
        result = result.and(Err(e));
    }
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
    if fill.short {
        // The length the task was made with is wrong: kept, it would fail every later reader
        // of this digest, whichever registry they pull from.
        fill.task.abandon("the source's content is shorter than its announced length");
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
                // A connection that breaks is an error of the body; a clean end is the source
                // saying its content ends here, short of the length it announced.
                Ok(None) => {
                    self.short = true;
                    return Err(SourceError::fatal("the source's content ended before its announced length"));
                }
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
        self.task.metrics.fetched(crate::ByteSource::Origin, chunk.len() as u64);
        if let Some(h) = &self.whole {
            h.update(chunk.clone()).await?;
        }
        let mut at = 0;
        while at < chunk.len() {
            let i = layout.piece_of(self.pos);
            let piece = layout.piece_range(i);
            let n = (chunk.len() - at).min((piece.end - self.pos) as usize);
            let owned = self.task.owns(self.id, i);
            self.wrote_all &= owned;
            let ends = self.pos + n as u64 == piece.end;
            if owned {
                self.stage.put(self.pos, chunk.slice(at..at + n), ends.then_some(i)).await?;
            }
            self.pos += n as u64;
            at += n;
            if ends {
                // The piece's bytes are all staged: readers may take them up to its end.
                self.task.advance(self.id, self.pos);
                self.notified_at = Some(self.pos);
            }
        }
        let due = self.notified_at.is_none_or(|at| self.pos.saturating_sub(at) >= NOTIFY_EVERY);
        if due || self.pos == self.end {
            self.task.advance(self.id, self.pos);
            self.notified_at = Some(self.pos);
        }
        if self.pos < self.end {
            // Against what readers were told of: a reader waiting for more is at that position.
            self.task.pace(self.notified_at.unwrap_or(self.pos)).await;
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
