//! Streaming content straight from a source to a client when it cannot be cached (quota or
//! disk full). The same trust rule holds: the whole content is hashed on the way and the last
//! chunk is held back until the digest matched.

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};

use crate::digest::{Digest, Hasher};
use crate::metrics::Metrics;
use crate::reader::ReadError;
use crate::source::SourceError;

struct Verify {
    body: BoxStream<'static, Result<Bytes, SourceError>>,
    hasher: Option<Hasher>,
    digest: Digest,
    len: u64,
    seen: u64,
    held: Option<Bytes>,
    metrics: std::sync::Arc<Metrics>,
}

/// Wraps the whole-content `body` of `digest` (`len` bytes) so that it ends in an error, not a
/// clean end, unless every byte arrived and matched.
pub fn verify(
    digest: Digest,
    len: u64,
    body: BoxStream<'static, Result<Bytes, SourceError>>,
    metrics: std::sync::Arc<Metrics>,
) -> impl Stream<Item = Result<Bytes, ReadError>> + Send {
    metrics.passthrough.inc();
    let hasher = Some(Hasher::new(digest.algorithm()));
    let state = Verify { body, hasher, digest, len, seen: 0, held: None, metrics };
    stream::unfold(Some(state), |state| async move {
        let mut v = state?;
        match v.next().await {
            Ok(Some(b)) => Some((Ok(b), Some(v))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
}

impl Verify {
    async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    self.seen += chunk.len() as u64;
                    if self.seen > self.len {
                        return Err(ReadError::TooLong);
                    }
                    if let Some(h) = &mut self.hasher {
                        h.update(&chunk);
                    }
                    self.metrics.fetched(crate::ByteSource::Origin, chunk.len() as u64);
                    if let Some(prev) = self.held.replace(chunk) {
                        self.metrics.sent(crate::ByteSource::Origin, prev.len() as u64);
                        return Ok(Some(prev));
                    }
                }
                Some(Err(e)) => return Err(ReadError::Source(e.message)),
                None => return self.finish(),
            }
        }
    }

    fn finish(&mut self) -> Result<Option<Bytes>, ReadError> {
        let Some(h) = self.hasher.take() else { return Ok(None) };
        if self.seen != self.len {
            return Err(ReadError::TooShort { seen: self.seen, len: self.len });
        }
        if h.finish() != self.digest {
            self.metrics.verify_failures.inc();
            return Err(ReadError::DigestMismatch);
        }
        let last = self.held.take();
        if let Some(b) = &last {
            self.metrics.sent(crate::ByteSource::Origin, b.len() as u64);
        }
        Ok(last)
    }
}
