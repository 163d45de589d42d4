//! The gRPC port's connections: how many are open at once, and how long one may say nothing.
//! Nodes keep one connection per scheduler open for good, and the server pings each every 30 s
//! (a live peer answers, which is a read); a connection that sends nothing for
//! [`IDLE_TIMEOUT`], a stranger's that never starts HTTP/2 included, is closed, so that idle
//! connections cannot hold the places of members.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// gRPC connections open at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 8192;
/// A connection that sent nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Connections accepted while fewer than [`MAX_CONNECTIONS`] are open.
pub(crate) fn limited(listener: TcpListener) -> impl futures_util::Stream<Item = io::Result<Limited>> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    futures_util::stream::unfold((listener, slots), |(listener, slots)| async move {
        let permit = slots.clone().acquire_owned().await.ok()?;
        let accepted = listener.accept().await.map(|(stream, _)| {
            // Decisions are small messages that must not wait for more to fill a segment.
            let _ = stream.set_nodelay(true);
            Limited::new(stream, permit, IDLE_TIMEOUT)
        });
        Some((accepted, (listener, slots)))
    })
}

/// A connection holding its place among the [`MAX_CONNECTIONS`], closed (its reads fail) once
/// it sent nothing for its idle timeout.
pub(crate) struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Limited {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        Limited { stream, _permit: permit, idle, deadline: Box::pin(tokio::time::sleep(idle)) }
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::Connected::connect_info(&self.stream)
    }
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let next = Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection"))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_connection_that_says_nothing_is_closed_and_one_that_talks_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let slots = Arc::new(Semaphore::new(2));
        let idle = Duration::from_millis(200);
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn = Limited::new(stream, slots.clone().acquire_owned().await.expect("slot"), idle);
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await.expect("in time");
        assert_eq!(read.expect_err("timed out").kind(), io::ErrorKind::TimedOut);

        let mut talker = TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn = Limited::new(stream, slots.acquire_owned().await.expect("slot"), idle);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tokio::io::AsyncWriteExt::write_all(&mut talker, b"x").await.expect("write");
            assert_eq!(conn.read(&mut buf).await.expect("a byte"), 1);
        }
    }
}
