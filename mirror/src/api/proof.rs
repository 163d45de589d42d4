//! A registry proves it holds content before content from elsewhere (this node's cache, or
//! other nodes) is served on its word. Anyone can run a registry that answers `200` to every
//! `HEAD`, and name it in a request (`?ns=`, `X-Dragonfly-Registry`): a `HEAD` proves nothing.
//!
//! For a blob, the registry sends the first bytes of the span the client asks for (up to
//! [`WINDOW`]), with the requester's credentials; the response's first bytes must be those
//! same bytes, or it is aborted before any byte leaves. The window must carry enough
//! different byte values ([`MIN_DISTINCT`]) to be unguessable: a run of zeros (tar padding)
//! proves nothing, and such a span is served from the client's own registry instead. For a
//! manifest, the registry sends the manifest itself, whose digest must match.

use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::error::ApiError;
use super::{App, Target};
use crate::oci::ContentKind;
use crate::upstream::CredentialKind;

/// Bytes a registry shows of a blob: enough to be unguessable, small next to any transfer.
pub const WINDOW: u64 = 4 << 10;
/// Distinct byte values a window needs to prove anything (compressed data has all 256).
const MIN_DISTINCT: usize = 32;

/// What a registry answered to a request for the first bytes of a span.
pub struct Probe {
    /// Where the window starts.
    pub start: u64,
    /// The blob's length as the registry gave it.
    pub len: u64,
    pub credential: CredentialKind,
    /// The registry's bytes from the span's start (at most [`WINDOW`]).
    pub window: Bytes,
}

impl Probe {
    /// Whether the window is worth anything as a proof: unguessable, or all the client asked for.
    pub fn proves(&self, span: &Range<u64>) -> bool {
        let whole_span = self.start == span.start && self.window.len() as u64 >= span.end - span.start;
        whole_span || distinct_bytes(&self.window) >= MIN_DISTINCT
    }

    /// The window cut to `span`'s end: what a response of that span is compared with.
    pub fn within(&self, span: &Range<u64>) -> Bytes {
        let room = span.end.saturating_sub(self.start) as usize;
        self.window.slice(..self.window.len().min(room))
    }

    /// Whether the window is the whole blob (which then needs no other fetch).
    pub fn is_whole(&self) -> bool {
        self.start == 0 && self.window.len() as u64 == self.len
    }
}

/// Where in `span` a registry is asked to show a window of a cached blob: a random place this
/// node holds the bytes of (so the requester cannot choose what is compared), else the span's
/// start.
pub fn window_offset(task: &damselfly_p2p::TaskRef, span: &Range<u64>) -> u64 {
    let room = (span.end - span.start).saturating_sub(WINDOW);
    for _ in 0..4 {
        let at = span.start + if room == 0 { 0 } else { rand::random::<u64>() % (room + 1) };
        if task.holds(at..(at + WINDOW).min(span.end)) {
            return at;
        }
    }
    span.start
}

fn distinct_bytes(b: &[u8]) -> usize {
    let mut seen = [false; 256];
    b.iter().for_each(|&x| seen[usize::from(x)] = true);
    seen.iter().filter(|&&s| s).count()
}

/// Asks the registry for the bytes at `start` (up to [`WINDOW`]) of the blob, with the
/// requester's credentials: its length, and the window. A `start` past the end is not an
/// error here: the window is then empty, and the length says why.
pub async fn probe_blob(app: &App, target: &Target, start: u64) -> Result<Probe, ApiError> {
    app.metrics.origin("blob_probe");
    let mut headers = HeaderMap::new();
    let range = format!("bytes={start}-{}", start + WINDOW - 1);
    headers.insert(RANGE, HeaderValue::from_str(&range).map_err(|_| ApiError::BadRange)?);
    let req = target.request(Method::GET, ContentKind::Blob, headers);
    let reply = app.upstream.send(req).await.map_err(|e| ApiError::origin(format!("origin unreachable: {e}")))?;
    let status = reply.response.status();
    let h = reply.response.headers();
    let (len, skip) = match status {
        StatusCode::PARTIAL_CONTENT => (total_of(h.get(CONTENT_RANGE)), 0),
        // The range was ignored: the whole blob follows, the window `start` bytes into it.
        StatusCode::OK => (h.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()), start),
        // Past the end: the registry says how long the blob is.
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let len = total_of(h.get(CONTENT_RANGE));
            let len = len.ok_or_else(|| ApiError::origin("origin did not say how long the blob is"))?;
            return Ok(Probe { start, len, credential: reply.credential, window: Bytes::new() });
        }
        _ => return Err(ApiError::refused(status, h, ContentKind::Blob)),
    };
    let len = len.ok_or_else(|| ApiError::origin("origin did not say how long the blob is"))?;
    let want = WINDOW.min(len.saturating_sub(start)) as usize;
    let credential = reply.credential;
    let mut body = reply.response.bytes_stream();
    let (mut skipped, mut window) = (0u64, BytesMut::with_capacity(want));
    // Skipping through a blob to reach the window is bounded: a registry that ignores ranges
    // gets a window at the start of the span only when the span starts early.
    let max_skip = 16 * WINDOW;
    if skip > max_skip {
        return Err(ApiError::origin("origin ignores Range requests; cannot check it holds this blob"));
    }
    while window.len() < want {
        let Some(chunk) = body.next().await else { break };
        let mut chunk = chunk.map_err(|e| ApiError::origin(format!("origin body failed: {e}")))?;
        if skipped < skip {
            let n = (skip - skipped).min(chunk.len() as u64);
            skipped += n;
            chunk = chunk.slice(n as usize..);
        }
        let take = chunk.len().min(want - window.len());
        window.extend_from_slice(&chunk[..take]);
    }
    if window.len() < want {
        return Err(ApiError::origin("origin ended the blob early"));
    }
    Ok(Probe { start, len, credential, window: window.freeze() })
}

/// `bytes a-b/total` → total.
fn total_of(v: Option<&HeaderValue>) -> Option<u64> {
    v?.to_str().ok()?.rsplit_once('/')?.1.trim().parse().ok()
}

/// Bytes from the client's own registry for the span, when the first bytes from elsewhere
/// turn out not to be its registry's.
pub type Fallback =
    Box<dyn FnOnce() -> BoxFuture<'static, Result<BoxStream<'static, Result<Bytes, String>>, String>> + Send>;

/// Passes `inner` on once its first bytes equal `window`: until then, frames are held (at most
/// one window plus a frame). `proven` runs once the bytes matched. On a mismatch nothing was
/// passed on yet: the response continues with `fallback` (the span from the client's own
/// registry, which is what the client would get from it directly), or ends with an error.
pub fn matching<S, E>(
    inner: S,
    window: Bytes,
    proven: Box<dyn FnOnce() + Send>,
    fallback: Option<Fallback>,
) -> Matching<S, E>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let state = State::Checking { held: BytesMut::new(), proven, fallback };
    Matching { inner: Some(Box::pin(inner)), window, state }
}

pub struct Matching<S, E> {
    /// Dropped when the registry takes over, so that the read lets go of the task.
    inner: Option<Pin<Box<S>>>,
    window: Bytes,
    state: State<E>,
}

enum State<E> {
    /// The first bytes are being held and compared.
    Checking {
        held: BytesMut,
        proven: Box<dyn FnOnce() + Send>,
        fallback: Option<Fallback>,
    },
    /// They matched: `inner` streams on.
    Passing,
    /// They did not: the client's own registry is asked.
    Opening(BoxFuture<'static, Result<BoxStream<'static, Result<Bytes, String>>, String>>),
    FromRegistry(BoxStream<'static, Result<Bytes, String>>),
    Done(std::marker::PhantomData<E>),
}

/// Why a response was ended.
#[derive(Debug, thiserror::Error)]
pub enum ProofError<E> {
    #[error("the registry named by the request does not hold this content")]
    Disproved,
    /// Asking the client's own registry instead failed.
    #[error("{0}")]
    Fallback(String),
    #[error(transparent)]
    Inner(E),
}

impl<S, E> Stream for Matching<S, E>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Unpin,
{
    type Item = Result<Bytes, ProofError<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done(_) => return Poll::Ready(None),
                State::Passing => {
                    let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
                    return inner.as_mut().poll_next(cx).map(|o| o.map(|r| r.map_err(ProofError::Inner)));
                }
                State::FromRegistry(body) => {
                    return match body.poll_next_unpin(cx) {
                        Poll::Ready(Some(Err(e))) => {
                            this.state = State::Done(std::marker::PhantomData);
                            Poll::Ready(Some(Err(ProofError::Fallback(e))))
                        }
                        other => other.map(|o| o.map(|r| r.map_err(ProofError::Fallback))),
                    };
                }
                State::Opening(opening) => match opening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(body)) => this.state = State::FromRegistry(body),
                    Poll::Ready(Err(e)) => {
                        this.state = State::Done(std::marker::PhantomData);
                        return Poll::Ready(Some(Err(ProofError::Fallback(e))));
                    }
                },
                State::Checking { held, .. } if held.len() >= this.window.len() => {
                    let matched = held[..this.window.len()] == this.window[..];
                    let held = std::mem::take(held).freeze();
                    let State::Checking { proven, fallback, .. } =
                        std::mem::replace(&mut this.state, State::Done(std::marker::PhantomData))
                    else {
                        unreachable!("matched above")
                    };
                    if matched {
                        proven();
                        this.state = State::Passing;
                        return Poll::Ready(Some(Ok(held)));
                    }
                    this.inner = None;
                    match fallback {
                        Some(open) => this.state = State::Opening(open()),
                        None => return Poll::Ready(Some(Err(ProofError::Disproved))),
                    }
                }
                State::Checking { held, fallback, .. } => {
                    let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
                    match inner.as_mut().poll_next(cx) {
                        Poll::Ready(Some(Ok(chunk))) => held.extend_from_slice(&chunk),
                        Poll::Ready(Some(Err(e))) => {
                            this.state = State::Done(std::marker::PhantomData);
                            return Poll::Ready(Some(Err(ProofError::Inner(e))));
                        }
                        // Shorter than the window: nothing was passed on, and nothing proven.
                        Poll::Ready(None) => match fallback.take() {
                            Some(open) => {
                                this.inner = None;
                                this.state = State::Opening(open());
                            }
                            None => {
                                this.state = State::Done(std::marker::PhantomData);
                                return Poll::Ready(Some(Err(ProofError::Disproved)));
                            }
                        },
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }
}

/// Fetches the manifest `target` names, with the requester's credentials; `Ok` with the
/// credential used when its bytes are the digest's.
pub async fn prove_manifest(app: &App, target: &Target, accept: HeaderMap) -> Result<CredentialKind, ApiError> {
    app.metrics.origin("manifest_proof");
    let req = target.request(Method::GET, ContentKind::Manifest, accept);
    let reply = app.upstream.send(req).await.map_err(|e| ApiError::origin(format!("origin unreachable: {e}")))?;
    let status = reply.response.status();
    if !status.is_success() {
        return Err(ApiError::refused(status, reply.response.headers(), ContentKind::Manifest));
    }
    let credential = reply.credential;
    let mut hasher = damselfly_p2p::Hasher::new(target.digest.algorithm());
    let (mut body, mut seen) = (reply.response.bytes_stream(), 0usize);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::origin(format!("origin body failed: {e}")))?;
        seen += chunk.len();
        if seen > super::manifests::MAX_MANIFEST {
            return Err(ApiError::origin("manifest is larger than 4 MiB"));
        }
        hasher.update(&chunk);
    }
    if hasher.finish() != target.digest {
        return Err(ApiError::Disproved(ContentKind::Manifest));
    }
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    fn frames(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        stream::iter(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect::<Vec<_>>())
    }

    async fn collect<S: Stream<Item = Result<Bytes, ProofError<String>>> + Unpin>(mut s: S) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(item) = s.next().await {
            out.extend_from_slice(&item.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_matching_window_passes_everything_on_and_runs_proven_once() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = ran.clone();
        let proven = Box::new(move || {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let s = matching(frames(&[b"ab", b"cdef", b"gh"]), Bytes::from_static(b"abcd"), proven, None);
        assert_eq!(collect(s).await.expect("matches"), b"abcdefgh");
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_different_window_ends_the_stream_before_any_byte() {
        let mut s = matching(frames(&[b"ab", b"XX", b"ef"]), Bytes::from_static(b"abcd"), Box::new(|| {}), None);
        assert!(matches!(s.next().await, Some(Err(ProofError::Disproved))));
        assert!(s.next().await.is_none());
        let short = matching(frames(&[b"ab"]), Bytes::from_static(b"abcd"), Box::new(|| panic!("not proven")), None);
        assert!(collect(short).await.is_err());
    }

    #[tokio::test]
    async fn a_different_window_hands_the_response_to_the_clients_own_registry() {
        let fallback: Fallback =
            Box::new(|| Box::pin(async { Ok(stream::iter(vec![Ok(Bytes::from_static(b"abcdefgh"))]).boxed()) }));
        let s = matching(frames(&[b"ab", b"XX", b"ef"]), Bytes::from_static(b"abcd"), Box::new(|| {}), Some(fallback));
        assert_eq!(collect(s).await.expect("the registry's bytes"), b"abcdefgh");
    }

    #[test]
    fn a_window_of_zeros_proves_nothing_unless_it_is_all_that_is_asked() {
        let zeros =
            Probe { start: 0, len: 1 << 20, credential: CredentialKind::Anonymous, window: Bytes::from(vec![0; 4096]) };
        assert!(!zeros.proves(&(0..1 << 20)));
        assert!(zeros.proves(&(0..4096)));
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let noise = Probe { window: Bytes::from(noise), ..zeros };
        assert!(noise.proves(&(0..1 << 20)));
        assert_eq!(noise.within(&(0..100)).len(), 100);
    }

    #[test]
    fn the_total_comes_from_content_range() {
        assert_eq!(total_of(Some(&HeaderValue::from_static("bytes 0-9/1234"))), Some(1234));
        assert_eq!(total_of(Some(&HeaderValue::from_static("bytes */99"))), Some(99));
        assert_eq!(total_of(Some(&HeaderValue::from_static("bytes 0-9/*"))), None);
        assert_eq!(total_of(None), None);
    }
}
