//! Bounds on connections: how many a server holds at once, and how long one may sit idle. A
//! connection is idle when no byte moved either way: a response streaming a blob is busy, a
//! keep-alive connection (HTTP/1 or HTTP/2) nobody uses is not, and neither is a client that
//! stopped reading. [`until_idle`] drives a connection (or a tunnel) under that rule and the
//! shutdown signal.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// How many connections a server holds at once (more wait in the kernel's backlog until one
/// closes), and how long one may move no byte before it is closed.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 4096, idle_timeout: Duration::from_secs(120) }
    }
}

/// When the connection last moved a byte, in milliseconds since `epoch`.
#[derive(Clone)]
pub struct Activity {
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity { epoch: Instant::now(), last: Arc::new(AtomicU64::new(0)) }
    }

    fn touch(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last byte moved.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// An I/O object that records its activity.
pub struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        Watched { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Drives `work` until it ends (its output), or until it moved no byte for `idle` (by
/// `activity`): `None`. At `shutdown`, `drain` is called once and says whether to let `work`
/// finish what it is doing (for at most `drain_for` more) or to drop it at once.
pub async fn until_idle<F: Future>(
    mut work: Pin<&mut F>,
    activity: &Activity,
    idle: Duration,
    shutdown: &CancellationToken,
    mut drain: impl FnMut(Pin<&mut F>) -> bool,
    drain_for: Duration,
) -> Option<F::Output> {
    let mut draining: Option<Instant> = None;
    loop {
        let mut left = idle.saturating_sub(activity.idle());
        if let Some(since) = draining {
            left = left.min(drain_for.saturating_sub(since.elapsed()));
        }
        if left.is_zero() {
            tracing::debug!(draining = draining.is_some(), "closing an idle connection");
            return None;
        }
        tokio::select! {
            done = work.as_mut() => return Some(done),
            _ = shutdown.cancelled(), if draining.is_none() => {
                if !drain(work.as_mut()) {
                    return None;
                }
                draining = Some(Instant::now());
            }
            _ = tokio::time::sleep(left) => {}
        }
    }
}
