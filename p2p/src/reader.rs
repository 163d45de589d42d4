//! Streaming a byte range of a task to a client: bytes on disk go out at once, missing pieces
//! are fetched (or waited for, when another request already fetches them) and go out as they
//! land. Frames borrow the task's memory map, so nothing is copied into anonymous memory.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, Stream};

use crate::source::{ByteSource, Source};
use crate::task::{Step, StepError, TaskRef};

/// Largest frame handed to the HTTP layer: big enough for few wake-ups, small enough that
/// a slow client does not pin much of the map at once.
const MAX_FRAME: u64 = 512 << 10;
/// Longest wait for a progress signal before the reader re-examines the task by itself.
const RESTEP_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a read ended before its range did. The response it feeds must be aborted: the client
/// sees a broken transfer, never a short or wrong one.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The task can serve nothing more: its content proved wrong, it was evicted, or a write
    /// to it failed (the reason).
    #[error("{0}")]
    TaskFailed(String),
    /// The fetch this read waited on gave up (its reason).
    #[error("{0}")]
    FetchFailed(String),
    /// A piece this read already sent was dropped since: it failed its check.
    #[error("content changed while it was being read")]
    Changed,
    /// The check of a stored piece could not run.
    #[error("piece check failed: {0}")]
    Check(String),
    /// Passing through: the source failed (its message).
    #[error("{0}")]
    Source(String),
    /// Passing through: the source sent more than the announced length.
    #[error("source sent more bytes than announced")]
    TooLong,
    /// Passing through: the source ended short of the announced length.
    #[error("source ended after {seen} of {len} bytes")]
    TooShort { seen: u64, len: u64 },
    /// Passing through: the whole content does not match its digest.
    #[error("content does not match its digest")]
    DigestMismatch,
    /// The range asked for is not within the task (a caller's length disagrees with the
    /// task's own).
    #[error("range {start}..{end} is outside the task's {len} bytes")]
    OutOfRange { start: u64, end: u64, len: u64 },
}

impl From<StepError> for ReadError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::TaskFailed(why) => ReadError::TaskFailed(why),
            StepError::FetchFailed(why) => ReadError::FetchFailed(why),
            StepError::Changed => ReadError::Changed,
        }
    }
}

/// A slice of a task's map that keeps the task pinned while the HTTP layer holds it.
pub(crate) struct MapSlice {
    pub(crate) task: TaskRef,
    pub(crate) range: Range<u64>,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.task.bytes(self.range.clone())
    }
}

struct Cursor {
    task: TaskRef,
    /// This reader's id in the task's reader positions (`pace.rs`).
    id: u64,
    pos: u64,
    end: u64,
    full: bool,
    source: Arc<dyn Source>,
    waited_on: Option<u64>,
    /// Bytes below this offset arrived while this reader waited for them: they count as
    /// fetched, not cached, even if the piece is complete by the time they are sent.
    fetched_until: u64,
    /// A client receives the bytes (they count as sent).
    to_client: bool,
}

/// What a read delivers to its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The whole content as one response: its last byte is held back until the content
    /// matched its digest, so a client never completes a response with wrong bytes.
    Whole,
    /// A part (a range), which no digest covers.
    Part,
    /// Nobody: the bytes only fill the cache (`fill`), and are not counted as sent.
    Fill,
}

/// Streams `range` of the task to a client receiving it as `delivery`. The stream ends with an
/// error (and the caller must abort the response) if the bytes cannot be had or fail
/// verification.
pub fn read(
    task: TaskRef,
    range: Range<u64>,
    delivery: Delivery,
    source: Arc<dyn Source>,
) -> impl Stream<Item = Result<Bytes, ReadError>> + Send {
    let len = task.len();
    let start = if range.start <= range.end && range.end <= len {
        let id = task.reader_open(range.start);
        let full = delivery == Delivery::Whole;
        let to_client = delivery != Delivery::Fill;
        Ok(Cursor {
            task,
            id,
            pos: range.start,
            end: range.end,
            full,
            source,
            waited_on: None,
            fetched_until: 0,
            to_client,
        })
    } else {
        Err(ReadError::OutOfRange { start: range.start, end: range.end, len })
    };
    stream::unfold(Some(start), |state| async move {
        let mut c = match state? {
            Ok(c) => c,
            Err(e) => return Some((Err(e), None)),
        };
        if c.pos >= c.end {
            return None;
        }
        match c.next_frame().await {
            Ok(bytes) => Some((Ok(bytes), Some(Ok(c)))),
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Reads the whole task through the usual fetch path and drops the bytes: fills the cache (a
/// background fill after a range read, a seed fetching for the cluster). Stops at the first
/// error; the task keeps whatever pieces arrived. A complete task, or one another fill is
/// filling, is left alone: a range reader that asks for a fill after every range (nydusd
/// reads a blob in hundreds of them) must not start hundreds of walks over the whole task.
pub async fn fill(task: TaskRef, source: Arc<dyn Source>) {
    use futures_util::StreamExt;
    use std::sync::atomic::Ordering;
    if task.is_complete() || task.filling.swap(true, Ordering::SeqCst) {
        return;
    }
    // Cleared however the fill ends, dropped half-way included.
    struct Filling(TaskRef);
    impl Drop for Filling {
        fn drop(&mut self) {
            self.0.filling.store(false, Ordering::SeqCst);
        }
    }
    let _filling = Filling(task.clone());
    let len = task.len();
    let mut s = std::pin::pin!(read(task, 0..len, Delivery::Fill, source));
    while let Some(r) = s.next().await {
        if r.is_err() {
            break;
        }
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        self.task.reader_close(self.id);
    }
}

impl Cursor {
    async fn next_frame(&mut self) -> Result<Bytes, ReadError> {
        loop {
            match self.task.task().step(self.pos, self.end, self.full, self.waited_on)? {
                Step::Ready { range, cached, staged } => {
                    let range = range.start..range.end.min(range.start + MAX_FRAME);
                    self.pos = range.end;
                    self.task.reader_at(self.id, self.pos);
                    let n = range.end - range.start;
                    let from = if cached && range.start >= self.fetched_until {
                        ByteSource::Cache
                    } else if self.task.is_from_peer(self.task.layout().piece_of(range.start)) {
                        ByteSource::Peer
                    } else {
                        ByteSource::Origin
                    };
                    if self.to_client {
                        self.task.metrics.sent(from, n);
                    }
                    if let Some(chunk) = staged {
                        return Ok(chunk.slice(..n as usize));
                    }
                    return Ok(Bytes::from_owner(MapSlice { task: self.task.clone(), range }));
                }
                Step::Check(i) => {
                    let task = self.task.clone();
                    tokio::task::spawn_blocking(move || task.check_piece(i))
                        .await
                        .map_err(|e| ReadError::Check(e.to_string()))?;
                }
                Step::Fetch { pieces, id } => {
                    self.waited_on = Some(id);
                    self.fetched_until = self.task.layout().piece_range(pieces.end - 1).end;
                    self.task.task().spawn_fetch(id, pieces, self.source.clone());
                }
                Step::Wait(mut rx, fetch) => {
                    if fetch.is_some() {
                        self.waited_on = fetch;
                        let piece = self.task.layout().piece_of(self.pos);
                        self.fetched_until = self.fetched_until.max(self.task.layout().piece_range(piece).end);
                    }
                    // The sender lives in the task, which this cursor pins: it cannot close.
                    // The bound is a safety net: a reader looks at the task again at least
                    // this often, so a missed wake-up costs a moment, never a hung response.
                    if tokio::time::timeout(RESTEP_AFTER, rx.changed()).await.is_err() {
                        tracing::debug!(pos = self.pos, "no progress signal; looking again");
                    }
                }
            }
        }
    }
}
