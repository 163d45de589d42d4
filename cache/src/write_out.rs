//! An export of content taken from peers, written into the client's file as it arrives: the
//! bytes are on their way to the disk while the rest is still fetched, instead of the whole
//! being fetched into the store first and copied out afterwards. The client's file is written
//! by one blocking thread fed through a short queue (memory stays bounded whatever the disk
//! does), which asks the kernel to start writing back every few MiB so that the final sync
//! has little left to do. The content stream holds its last byte until the whole matched its
//! digest, so a file that ends whole was verified; the client renames it into place only then.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::error::CacheError;
use crate::keeper::{ContentStream, ProgressTx, PROGRESS_EVERY};
use crate::protocol::{Phase, Reply};

/// Chunks queued for the writer thread.
const QUEUE: usize = 16;
/// Bytes after which writeback of what was written is started.
const WRITEBACK_EVERY: u64 = 16 << 20;

/// Writes `content` (`total` bytes) into `out` from its start, then syncs it.
pub(crate) async fn write_out(
    mut content: ContentStream,
    out: File,
    total: u64,
    progress: &ProgressTx,
) -> Result<(), CacheError> {
    check_writable(&out)?;
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let writer = tokio::task::spawn_blocking(move || write_all(out, rx));
    let mut done = 0u64;
    let mut last = std::time::Instant::now();
    let read = async {
        while let Some(chunk) = content.next().await {
            let chunk = chunk.map_err(|e| CacheError::Fetch(e.to_string()))?;
            done += chunk.len() as u64;
            if tx.send(chunk).await.is_err() {
                // The writer stopped: its error says why.
                return Ok(());
            }
            if last.elapsed() >= PROGRESS_EVERY {
                last = std::time::Instant::now();
                let _ = progress.try_send(Reply::Progress { phase: Phase::Fetching, done, total });
            }
        }
        Ok(())
    };
    let read: Result<(), CacheError> = read.await;
    drop(tx);
    let written = writer.await.map_err(|e| CacheError::Io(std::io::Error::other(e)))?;
    read?;
    let written = written?;
    if written != total {
        return Err(CacheError::Fetch(format!("{written} of {total} bytes arrived")));
    }
    Ok(())
}

/// The client's file must be a regular file open for writing, and empty.
fn check_writable(out: &File) -> Result<(), CacheError> {
    let meta = out.metadata()?;
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(out.as_raw_fd(), libc::F_GETFL) };
    let writable = flags >= 0 && matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR);
    if !meta.is_file() || !writable || meta.len() != 0 {
        return Err(CacheError::BadRequest("an export passes an empty regular file open for writing".into()));
    }
    Ok(())
}

/// The writer thread: writes what arrives in order, starts writeback as it goes, and syncs
/// once the queue closes. Returns the bytes written.
fn write_all(out: File, mut rx: mpsc::Receiver<Bytes>) -> Result<u64, CacheError> {
    let mut pos = 0u64;
    let mut flushed = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        out.write_all_at(&chunk, pos)?;
        pos += chunk.len() as u64;
        if pos - flushed >= WRITEBACK_EVERY {
            start_writeback(&out, flushed, pos - flushed);
            flushed = pos;
        }
    }
    out.sync_all()?;
    Ok(pos)
}

/// Asks the kernel to start writing `len` bytes at `offset` back to disk, without waiting.
fn start_writeback(out: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on a descriptor we own; a failure only means the final sync
    // does the work.
    unsafe {
        libc::sync_file_range(
            out.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunks: Vec<Result<Bytes, damselfly_p2p::ReadError>>) -> ContentStream {
        Box::pin(futures_util::stream::iter(chunks))
    }

    #[tokio::test]
    async fn the_content_lands_in_the_clients_file_whole() {
        let (tx, _rx) = mpsc::channel(64);
        let out = tempfile::tempfile().unwrap();
        let chunks = (0..40u8).map(|i| Ok(Bytes::from(vec![i; 1 << 20]))).collect();
        write_out(stream(chunks), out.try_clone().unwrap(), 40 << 20, &tx).await.unwrap();
        let mut back = vec![0u8; 40 << 20];
        out.read_exact_at(&mut back, 0).unwrap();
        assert!(back.chunks(1 << 20).enumerate().all(|(i, c)| c.iter().all(|&b| usize::from(b) == i)));
    }

    #[tokio::test]
    async fn a_short_or_failed_stream_and_an_unwritable_file_are_errors() {
        let (tx, _rx) = mpsc::channel(64);
        let short = stream(vec![Ok(Bytes::from_static(b"abc"))]);
        assert!(write_out(short, tempfile::tempfile().unwrap(), 5, &tx).await.is_err());
        let failed =
            stream(vec![Ok(Bytes::from_static(b"abc")), Err(damselfly_p2p::ReadError::TaskFailed("bad".into()))]);
        assert!(write_out(failed, tempfile::tempfile().unwrap(), 5, &tx).await.is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let read_only = File::open(dir.path().join("f")).unwrap();
        assert!(matches!(write_out(stream(vec![]), read_only, 0, &tx).await, Err(CacheError::BadRequest(_))));
    }
}
