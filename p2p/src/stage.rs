//! Write-behind for a fetch: bytes from the source are copied into aligned blocks that a
//! writer thread puts on disk with `O_DIRECT`, while readers are served the source's own
//! chunks from memory (`Task::stage`, kept in `task/staged.rs`).
//!
//! Why: through the page cache, a cold blob cost the daemon a second copy of every byte plus the
//! filesystem's per-page bookkeeping, on the thread that also receives and serves, and it filled
//! memory with pages nobody reads again soon (the client keeps its own copy). A direct write
//! costs the writer thread a system call per block. Where the filesystem refuses `O_DIRECT`
//! (tmpfs), or a write is not aligned (the head of a resumed fetch, the tail of the content),
//! the same blocks go through the page cache instead.
//!
//! A piece becomes present only after its last block is on disk, and chunks leave the task's
//! memory only after they are on disk, so a reader always finds every byte below the fetch's
//! position in one place or the other.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::digest::{Algorithm, Hasher};
use crate::meta::PieceRecord;
use crate::source::SourceError;
use crate::task::TaskRef;

/// Bytes per block: divides every piece size, so piece ends fall on block ends.
pub(crate) const BLOCK: usize = 1 << 20;
/// Offsets, lengths and buffer addresses of direct writes are multiples of this.
const ALIGN: usize = 4096;
/// Blocks per fetch, being filled, queued or written: the write-behind bound.
const POOL: usize = 4;
/// Chunks already on disk stay in memory this far behind the write position, for readers
/// slightly behind the fetch.
pub(crate) const KEEP_BEHIND: u64 = 8 << 20;

/// A reusable buffer with room for one aligned block wherever in a page its content starts.
struct Buf(Vec<u8>);

impl Buf {
    fn new() -> Self {
        Buf(vec![0; BLOCK + 2 * ALIGN])
    }

    /// The window holding bytes from file offset `start`: its address has the same remainder
    /// modulo [`ALIGN`] as `start`, so aligned file ranges are aligned in memory too.
    fn window(&mut self, start: u64) -> &mut [u8] {
        let to_aligned = (ALIGN - self.0.as_ptr() as usize % ALIGN) % ALIGN;
        let base = to_aligned + (start as usize % ALIGN);
        &mut self.0[base..base + BLOCK]
    }
}

struct Job {
    buf: Buf,
    start: u64,
    len: usize,
    /// The piece whose last byte is the last byte of this block.
    ends_piece: Option<usize>,
}

/// The fetch's side: fills blocks, hands them to the writer, recycles them.
pub(crate) struct Stage {
    task: TaskRef,
    id: u64,
    jobs: Option<mpsc::Sender<Job>>,
    free: mpsc::Receiver<Buf>,
    made: usize,
    cur: Option<Job>,
    writer: Option<std::thread::JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
}

impl Stage {
    /// Starts the writer of fetch `id`.
    pub(crate) fn start(task: &TaskRef, id: u64) -> Result<Self, SourceError> {
        if let Some(why) = task.failure() {
            return Err(SourceError::fatal(why));
        }
        let (jobs_tx, jobs_rx) = mpsc::channel(POOL);
        let (free_tx, free_rx) = mpsc::channel(POOL);
        let error = Arc::new(Mutex::new(None));
        let writer = Writer::new(task.clone(), id, error.clone());
        let handle = std::thread::Builder::new()
            .name("cache-writer".into())
            .spawn(move || writer.run(jobs_rx, free_tx))
            .map_err(|e| SourceError::fatal(format!("cannot start the cache writer: {e}")))?;
        Ok(Stage {
            task: task.clone(),
            id,
            jobs: Some(jobs_tx),
            free: free_rx,
            made: 0,
            cur: None,
            writer: Some(handle),
            error,
        })
    }

    /// Takes `part`, the bytes at `pos` of a piece this fetch owns; `piece_end` names the piece
    /// when `part` finishes it.
    pub(crate) async fn put(&mut self, pos: u64, part: Bytes, piece_end: Option<usize>) -> Result<(), SourceError> {
        self.task.stage(self.id, pos, part.clone());
        // The stream moved (a piece it passed became another fetch's, or a source that ignores
        // ranges restarted it): the block so far goes to disk as it is.
        if let Some(job) = self.cur.take_if(|job| job.start + job.len as u64 != pos) {
            self.send(job).await?;
        }
        let mut data = &part[..];
        let mut at = pos;
        while !data.is_empty() {
            let mut job = match self.cur.take() {
                Some(job) => job,
                None => Job { buf: self.buf().await?, start: at, len: 0, ends_piece: None },
            };
            let block_end = (job.start / BLOCK as u64 + 1) * BLOCK as u64;
            let n = data.len().min((block_end - at) as usize);
            let from = job.len;
            job.buf.window(job.start)[from..from + n].copy_from_slice(&data[..n]);
            job.len += n;
            at += n as u64;
            data = &data[n..];
            if at == block_end {
                if data.is_empty() {
                    job.ends_piece = piece_end;
                }
                self.send(job).await?;
            } else {
                self.cur = Some(job);
            }
        }
        if let Some(i) = piece_end {
            // The content's last piece ends inside a block.
            if let Some(mut job) = self.cur.take() {
                job.ends_piece = Some(i);
                self.send(job).await?;
            }
        }
        Ok(())
    }

    /// Writes what is staged and waits until the writer is done: after this, every piece the
    /// fetch finished is present and no chunk of it is left in the task's memory (but those
    /// past a write that failed, whose task is then abandoned).
    pub(crate) async fn finish(&mut self) -> Result<(), SourceError> {
        if let Some(job) = self.cur.take() {
            // A partial block of an unfinished piece: the bytes are right, and readers may
            // have been told about them, so they go to disk like any other.
            let _ = self.send(job).await;
        }
        self.jobs = None;
        if let Some(h) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(why) => Err(SourceError::fatal(why)),
            None => Ok(()),
        }
    }

    async fn buf(&mut self) -> Result<Buf, SourceError> {
        if let Ok(b) = self.free.try_recv() {
            return Ok(b);
        }
        if self.made < POOL {
            self.made += 1;
            return Ok(Buf::new());
        }
        self.free.recv().await.ok_or_else(|| self.failed())
    }

    async fn send(&mut self, job: Job) -> Result<(), SourceError> {
        let tx = self.jobs.as_ref().ok_or_else(|| SourceError::fatal("cache writer closed"))?;
        if tx.send(job).await.is_err() {
            return Err(self.failed());
        }
        Ok(())
    }

    fn failed(&self) -> SourceError {
        let why = self.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        SourceError::fatal(why.unwrap_or_else(|| "cache writer stopped".to_owned()))
    }
}

/// The writer thread's side: writes blocks in order, checksums pieces, marks them present.
struct Writer {
    task: TaskRef,
    id: u64,
    /// The task file opened again with `O_DIRECT`, while direct writes work.
    direct: Option<File>,
    crc: u32,
    sha: Option<Hasher>,
    /// Where the bytes summed in `crc` and `sha` start: a piece is done only if they start
    /// at the piece's start (a restarted stream can leave a piece's blocks out of order).
    summed_from: Option<u64>,
    /// End of the last block written.
    written_until: u64,
    error: Arc<Mutex<Option<String>>>,
}

impl Writer {
    fn new(task: TaskRef, id: u64, error: Arc<Mutex<Option<String>>>) -> Self {
        let direct = task.direct_io().then(|| reopen_direct(task.file())).flatten();
        // Piece digests are what other nodes verify pieces by; a store that shares nothing has
        // no use for them, so it does not spend a second hash over every byte.
        let sha = task.is_shared().then(|| Hasher::new(Algorithm::Sha256));
        Writer { task, id, direct, crc: 0, sha, summed_from: None, written_until: 0, error }
    }

    fn run(mut self, mut jobs: mpsc::Receiver<Job>, free: mpsc::Sender<Buf>) {
        while let Some(mut job) = jobs.blocking_recv() {
            let range = job.start..job.start + job.len as u64;
            let data = &job.buf.window(job.start)[..job.len];
            if let Err(e) = self.write(data, job.start) {
                let why = format!("cannot write to the cache: {e}");
                tracing::warn!(error = %e, "cache write failed; dropping the task so retries stream through");
                self.task.metrics.piece_failed("write");
                self.task.abandon(&why);
                *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                self.task.unstage(self.id, u64::MAX);
                return;
            }
            if self.written_until != range.start || self.summed_from.is_none() {
                // Not where the last block ended: what was summed belongs to another piece.
                self.crc = 0;
                self.sha = self.sha.take().map(|_| Hasher::new(Algorithm::Sha256));
                self.summed_from = Some(range.start);
            }
            self.written_until = range.end;
            self.crc = crc32c::crc32c_append(self.crc, data);
            if let Some(h) = &mut self.sha {
                h.update(data);
            }
            if let Some(i) = job.ends_piece {
                self.piece_written(i);
            }
            self.task.unstage(self.id, range.end.saturating_sub(KEEP_BEHIND));
            let _ = free.try_send(job.buf);
        }
        // The fetch is over. Its chunks are on disk, unless it was dropped with a block unsent
        // (runtime shutdown): chunks past the last write stay in memory for readers.
        self.task.unstage(self.id, self.written_until);
    }

    fn piece_written(&mut self, i: usize) {
        let sha = self.sha.as_mut().map(|h| std::mem::replace(h, Hasher::new(Algorithm::Sha256)).finish());
        let record = PieceRecord { crc32c: std::mem::take(&mut self.crc), sha256: None };
        let whole = self.summed_from.replace(self.written_until) == Some(self.task.layout().piece_range(i).start);
        if !whole {
            // Its bytes are on disk but were not all summed here: it stays missing, and the
            // fetch's end hands it to the next fetch.
            tracing::debug!(piece = i, "piece written out of order; not marking it present");
            return;
        }
        // A piece written past the page cache is checked against its crc32c when first read
        // back from disk, like a piece found after a restart.
        let checked = self.direct.is_none().then(std::time::Instant::now);
        self.task.piece_done(self.id, i, record, checked);
        if let Some(d) = sha {
            self.task.set_piece_sha(i, d.hex().to_owned());
        }
    }

    /// Writes `data` at `offset`: the aligned middle directly, an unaligned head or tail (and
    /// everything, without `O_DIRECT`) through the page cache.
    fn write(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let Some(direct) = &self.direct else {
            return self.task.write_at(data, offset);
        };
        let span = aligned_span(offset, data.len());
        if span.is_empty() {
            return self.task.write_at(data, offset);
        }
        let (head, rest) = data.split_at(span.start);
        let (body, tail) = rest.split_at(span.len());
        self.task.write_at(head, offset)?;
        if let Err(e) = direct.write_all_at(body, offset + span.start as u64) {
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            // The filesystem wants another alignment: the page cache takes it from here.
            tracing::debug!(error = %e, "direct write refused; writing through the page cache");
            self.direct = None;
            self.task.write_at(body, offset + span.start as u64)?;
        }
        self.task.write_at(tail, offset + span.end as u64)
    }
}

/// `file` opened again with `O_DIRECT`. Through `/proc/self/fd`, not the task's path: a task
/// that was dropped may have a new file at that path by now, and must not write into it.
fn reopen_direct(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// The part of `offset..offset + len`, relative to `offset`, whose file offsets start and end
/// on [`ALIGN`] boundaries (empty when there is none).
fn aligned_span(offset: u64, len: usize) -> Range<usize> {
    let a = ALIGN as u64;
    let start = offset.div_ceil(a) * a;
    let end = (offset + len as u64) / a * a;
    if end <= start {
        return 0..0;
    }
    (start - offset) as usize..(end - offset) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_span_cuts_unaligned_ends() {
        assert_eq!(aligned_span(0, 8192), 0..8192);
        assert_eq!(aligned_span(0, 8191), 0..4096);
        assert_eq!(aligned_span(100, 8192), 3996..8092);
        assert_eq!(aligned_span(100, 4000), 0..0);
        assert_eq!(aligned_span(4096, 10), 0..0);
        assert_eq!(aligned_span(4000, 200), 0..0);
    }

    #[test]
    fn windows_are_aligned_like_their_file_offsets() {
        let mut b = Buf::new();
        for start in [0u64, 1, 4095, 4096, 1 << 20, (1 << 20) + 17] {
            let w = b.window(start);
            assert_eq!(w.len(), BLOCK);
            assert_eq!(w.as_ptr() as usize % ALIGN, start as usize % ALIGN);
        }
    }
}
