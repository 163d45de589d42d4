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
use damselfly_p2p::ReadError;

/// Chunks queued for the writer thread: frames of at most 512 KiB, so a few MiB per export
/// whatever the disk does.
const QUEUE: usize = 16;
/// Bytes after which writeback of what was written is started.
const WRITEBACK_EVERY: u64 = 16 << 20;
/// Reads in a row that ended with a fetch that gave up, without a byte more, before the export
/// does; and the pause before the next.
const MAX_STUCK: u32 = 5;
const STUCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the writer thread is sent.
enum Msg {
    Data(Bytes),
    /// Everything was sent: sync. A queue closed without it is an abort: no sync.
    End,
}

/// Writes the content (`total` bytes) into `out` from its start, then syncs it. `open(offset)`
/// reads it from `offset` on; a read that ends because the fetch it waited on gave up (peers
/// stalled) is opened again where it stopped, until one in a row brought nothing
/// [`MAX_STUCK`] times.
pub(crate) async fn write_out(
    mut open: impl FnMut(u64) -> Result<ContentStream, CacheError>,
    out: File,
    total: u64,
    progress: &ProgressTx,
) -> Result<(), CacheError> {
    check_writable(&out)?;
    let (tx, rx) = mpsc::channel::<Msg>(QUEUE);
    let writer = tokio::task::spawn_blocking(move || write_all(out, rx));
    let mut done = 0u64;
    let mut stuck = 0;
    let mut last = std::time::Instant::now();
    let read = async {
        loop {
            let before = done;
            let mut content = open(done)?;
            let ended = loop {
                let Some(chunk) = content.next().await else { break Ok(()) };
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => break Err(e),
                };
                done += chunk.len() as u64;
                if tx.send(Msg::Data(chunk)).await.is_err() {
                    // The writer stopped: its error says why.
                    return Ok(());
                }
                if last.elapsed() >= PROGRESS_EVERY {
                    last = std::time::Instant::now();
                    let _ = progress.try_send(Reply::Progress { phase: Phase::Fetching, done, total });
                }
            };
            match ended {
                Ok(()) => break,
                Err(ReadError::FetchFailed(why)) => {
                    stuck = if done == before { stuck + 1 } else { 0 };
                    if stuck >= MAX_STUCK {
                        return Err(CacheError::Fetch(format!("{why}: {done} of {total} bytes arrived")));
                    }
                    tokio::time::sleep(STUCK_WAIT).await;
                }
                Err(e) => return Err(CacheError::Fetch(e.to_string())),
            }
        }
        let _ = tx.send(Msg::End).await;
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
/// once told everything was sent. Returns the bytes written.
fn write_all(out: File, mut rx: mpsc::Receiver<Msg>) -> Result<u64, CacheError> {
    let mut pos = 0u64;
    let mut flushed = 0u64;
    loop {
        match rx.blocking_recv() {
            Some(Msg::Data(chunk)) => {
                out.write_all_at(&chunk, pos).map_err(CacheError::Output)?;
                pos += chunk.len() as u64;
                if pos - flushed >= WRITEBACK_EVERY {
                    start_writeback(&out, flushed, pos - flushed);
                    flushed = pos;
                }
            }
            Some(Msg::End) => break,
            // Aborted: the file is the client's to remove, not worth a sync.
            None => return Ok(pos),
        }
    }
    out.sync_all().map_err(CacheError::Output)?;
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

    fn stream(chunks: Vec<Result<Bytes, ReadError>>) -> ContentStream {
        Box::pin(futures_util::stream::iter(chunks))
    }

    /// Opens `chunks` once; a second open is a test failure.
    fn once(chunks: Vec<Result<Bytes, ReadError>>) -> impl FnMut(u64) -> Result<ContentStream, CacheError> {
        let mut chunks = Some(chunks);
        move |_| Ok(stream(chunks.take().expect("opened once")))
    }

    #[tokio::test]
    async fn the_content_lands_in_the_clients_file_whole() {
        let (tx, _rx) = mpsc::channel(64);
        let out = tempfile::tempfile().unwrap();
        let chunks = (0..40u8).map(|i| Ok(Bytes::from(vec![i; 1 << 20]))).collect();
        write_out(once(chunks), out.try_clone().unwrap(), 40 << 20, &tx).await.unwrap();
        let mut back = vec![0u8; 40 << 20];
        out.read_exact_at(&mut back, 0).unwrap();
        assert!(back.chunks(1 << 20).enumerate().all(|(i, c)| c.iter().all(|&b| usize::from(b) == i)));
    }

    #[tokio::test]
    async fn a_short_or_failed_stream_and_an_unwritable_file_are_errors() {
        let (tx, _rx) = mpsc::channel(64);
        let short = once(vec![Ok(Bytes::from_static(b"abc"))]);
        assert!(write_out(short, tempfile::tempfile().unwrap(), 5, &tx).await.is_err());
        let failed = once(vec![Ok(Bytes::from_static(b"abc")), Err(ReadError::TaskFailed("bad".into()))]);
        assert!(write_out(failed, tempfile::tempfile().unwrap(), 5, &tx).await.is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let read_only = File::open(dir.path().join("f")).unwrap();
        assert!(matches!(write_out(once(vec![]), read_only, 0, &tx).await, Err(CacheError::BadRequest(_))));
    }

    #[tokio::test]
    async fn a_read_whose_fetch_gave_up_goes_on_where_it_stopped() {
        let (tx, _rx) = mpsc::channel(64);
        let out = tempfile::tempfile().unwrap();
        let mut opened = Vec::new();
        let open = |at: u64| {
            opened.push(at);
            Ok(stream(match at {
                0 => vec![Ok(Bytes::from_static(b"abc")), Err(ReadError::FetchFailed("peers stalled".into()))],
                _ => vec![Ok(Bytes::from_static(b"de"))],
            }))
        };
        write_out(open, out.try_clone().unwrap(), 5, &tx).await.unwrap();
        assert_eq!(opened, [0, 3]);
        let mut back = [0u8; 5];
        out.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"abcde");
    }
}
