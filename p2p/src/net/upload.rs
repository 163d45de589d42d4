//! The upload server: other peers fetch pieces here with `GET /pieces/<digest>/<number>` and
//! a token the scheduler issued them for this host. Only pieces that are present and checked
//! are served, straight from the task's memory map, to any number of children at once within
//! the upload slots and rate limit.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Node;
use crate::digest::Digest;
use crate::reader::MapSlice;
use crate::task::{TaskRef, Uploadable};

type Body = BoxBody<Bytes, std::io::Error>;

/// Frames of a piece handed to the connection: big enough for few wake-ups, small enough for
/// the rate limiter to pace smoothly.
const FRAME: u64 = 256 << 10;

pub(crate) async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let handler = move |req| handle(node.clone(), req);
    damselfly_serve::serve_with(listener, tls, handler, shutdown).await;
}

async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let Some((digest, number)) = parse_path(req.uri().path()) else {
        return plain(StatusCode::NOT_FOUND, "no such piece path");
    };
    let token = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let child = match token.map(|t| node.check_token(t, &digest)) {
        Some(Ok(child)) => child,
        Some(Err(e)) => {
            node.metrics.upload_refused.inc();
            return plain(StatusCode::FORBIDDEN, &e.to_string());
        }
        None => {
            node.metrics.upload_refused.inc();
            return plain(StatusCode::FORBIDDEN, "an upload token from the scheduler is required");
        }
    };
    let span = tracing::debug_span!("upload", %digest, piece = number, %child);
    let _enter = span.enter();
    let Some(task) = node.store.get(&digest).ok().flatten() else {
        return plain(StatusCode::NOT_FOUND, "task not here");
    };
    if number >= task.layout().count() || !ready(&task, number).await {
        return plain(StatusCode::NOT_FOUND, "piece not here");
    }
    let Ok(permit) = node.upload_slots.clone().try_acquire_owned() else {
        let mut resp = plain(StatusCode::SERVICE_UNAVAILABLE, "upload slots full");
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    };
    piece_response(node, task, number, permit)
}

/// Whether piece `number` is present and passes its at-rest check.
async fn ready(task: &TaskRef, number: usize) -> bool {
    match task.uploadable(number) {
        Uploadable::Ready => true,
        Uploadable::AfterCheck => {
            let t = task.clone();
            let _ = tokio::task::spawn_blocking(move || t.check_piece(number)).await;
            task.uploadable(number) == Uploadable::Ready
        }
        Uploadable::Absent => false,
    }
}

fn piece_response(node: Arc<Node>, task: TaskRef, number: usize, permit: OwnedSemaphorePermit) -> Response<Body> {
    let range = task.layout().piece_range(number);
    let len = range.end - range.start;
    let frames = stream::unfold((range.start, permit), move |(pos, permit)| {
        let node = node.clone();
        let task = task.clone();
        async move {
            if pos >= range.end {
                return None;
            }
            let frame = match &node.upload_limit {
                // Uploads sharing a limit take turns in chunks small enough to keep each one
                // moving (see `RateLimit::chunk`).
                Some(limit) => {
                    limit.chunk(node.cfg.max_uploads.saturating_sub(node.upload_slots.available_permits()), FRAME)
                }
                None => FRAME,
            };
            let end = range.end.min(pos + frame);
            super::limit::take(&node.upload_limit, (end - pos) as usize).await;
            match frame_bytes(&task, pos..end, node.cfg.peer_tls).await {
                Ok(bytes) => {
                    node.metrics.upload_bytes.inc_by(end - pos);
                    Some((Ok(Frame::data(bytes)), (end, permit)))
                }
                Err(e) => {
                    tracing::warn!(digest = %task.digest(), error = %e, "piece unreadable; upload cut");
                    // The child sees the body end early and takes the piece elsewhere.
                    Some((Err(e), (range.end, permit)))
                }
            }
        }
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed());
    resp.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp
}

/// The bytes of a frame. Plain HTTP hands the task's map to the kernel, where a page whose
/// disk read fails is an error of the write. Over TLS rustls reads the frame in user space to
/// encrypt it, where the same page would be a SIGBUS that kills the daemon: the frame is read
/// with `pread` instead, for one copy more than the encryption makes anyway.
async fn frame_bytes(task: &TaskRef, range: std::ops::Range<u64>, tls: bool) -> std::io::Result<Bytes> {
    if !tls {
        return Ok(Bytes::from_owner(MapSlice { task: task.clone(), range }));
    }
    let task = task.clone();
    tokio::task::spawn_blocking(move || task.read_copy(range)).await.map_err(std::io::Error::other)?
}

/// `/pieces/<algorithm>:<hex>/<number>`, strictly.
pub fn parse_path(path: &str) -> Option<(Digest, usize)> {
    let rest = path.strip_prefix("/pieces/")?;
    let (digest, number) = rest.split_once('/')?;
    // Canonical numbers only (no sign, no leading zeros): one piece, one spelling.
    let canonical = number == "0" || !number.starts_with('0');
    if number.is_empty() || number.len() > 9 || !canonical || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((Digest::parse(digest).ok()?, number.parse().ok()?))
}

fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{msg}\n"))).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

#[cfg(test)]
mod tests {
    use super::{frame_bytes, parse_path};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_piece_served_over_tls_from_a_file_cut_short_is_an_error_not_a_sigbus() {
        use crate::tests::{blob, collect, data_file, open, Faults, MemSource};
        const MIB: usize = 1 << 20;
        let dir = tempfile::tempdir().expect("dir");
        let store = open(dir.path(), 1 << 30);
        let (data, d) = blob(9 * MIB);
        let src = MemSource::new(data.clone(), Faults::default());
        let t = store.get_or_create(&d, data.len() as u64, None).expect("task");
        assert!(collect(t.clone(), 0..data.len() as u64, crate::Delivery::Whole, src).await.expect("read") == data);
        let whole = frame_bytes(&t, 0..MIB as u64, true).await.expect("readable");
        assert_eq!(&whole[..], &data[..MIB]);
        // What a disk read error does to a mapped page: rustls reading it would be a SIGBUS.
        let file = std::fs::OpenOptions::new().write(true).open(data_file(dir.path(), &d)).expect("open");
        file.set_len(0).expect("cut");
        let cut = frame_bytes(&t, 0..MIB as u64, true).await;
        // Touch every byte, as encrypting them would.
        assert!(cut.map(|b| b.iter().map(|&x| u64::from(x)).sum::<u64>()).is_err());
    }

    #[test]
    fn piece_paths_are_parsed_strictly() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(parse_path(&format!("/pieces/{d}/3")).map(|(_, n)| n), Some(3));
        assert_eq!(parse_path(&format!("/pieces/{d}/0")).map(|(_, n)| n), Some(0));
        assert_eq!(parse_path(&format!("/pieces/{d}/10")).map(|(_, n)| n), Some(10));
        for bad in [
            format!("/pieces/{d}/"),
            format!("/pieces/{d}/-1"),
            format!("/pieces/{d}/1/2"),
            format!("/pieces/{d}/+1"),
            format!("/pieces/{d}/00"),
            format!("/pieces/{d}/01"),
            format!("/pieces/{d}/9999999999"),
            format!("/pieces/sha256:{}/1", "A".repeat(64)),
            "/pieces/../1".to_owned(),
            format!("/piece/{d}/1"),
        ] {
            assert!(parse_path(&bad).is_none(), "{bad}");
        }
    }
}
