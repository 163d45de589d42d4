//! Downloading one piece from a parent's upload server: a plain HTTP GET with the
//! scheduler-issued token, written straight to the piece's place in the task file, and
//! verified against the pinned digest before anybody may read it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;

use super::Node;
use crate::digest::{Algorithm, Hasher};
use crate::meta::PieceRecord;
use crate::task::TaskRef;

pub(crate) struct PieceJob {
    pub task: TaskRef,
    pub number: usize,
    /// Pinned lower-case hex sha256 of the piece.
    pub sha256: String,
    pub parent: String,
    pub addr: SocketAddr,
    pub token: String,
    /// Shared with the swarm: when the last byte from any parent arrived.
    pub last_byte: Arc<AtomicU64>,
    pub epoch: Instant,
    /// When this piece's download started, for the cost reported to the scheduler.
    pub started: Instant,
}

pub(crate) type JobFuture = BoxFuture<'static, (PieceJob, Result<PieceRecord, PieceError>)>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PieceError {
    #[error("parent unreachable: {0}")]
    Connect(String),
    #[error("parent answered {0}")]
    Status(u16),
    /// The parent's upload slots are full: not a fault, try others for a moment.
    #[error("parent is busy")]
    Busy,
    #[error("parent stopped sending")]
    Stalled,
    #[error("parent sent {got} bytes of {want}")]
    Length { got: u64, want: u64 },
    #[error("piece does not match its pinned digest")]
    Corrupt,
    #[error("cannot write to the cache: {0}")]
    Write(String),
}

impl PieceError {
    pub fn is_corrupt(&self) -> bool {
        matches!(self, PieceError::Corrupt | PieceError::Length { .. })
    }

    /// The parent says it does not hold the piece.
    pub fn is_gone(&self) -> bool {
        matches!(self, PieceError::Status(404))
    }

    /// Label for `damselfly_piece_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            PieceError::Connect(_) | PieceError::Status(_) => "peer_unreachable",
            PieceError::Busy => "peer_busy",
            PieceError::Stalled => "peer_stalled",
            PieceError::Length { .. } | PieceError::Corrupt => "peer_corrupt",
            PieceError::Write(_) => "write",
        }
    }
}

pub(crate) fn download(node: Arc<Node>, job: PieceJob) -> JobFuture {
    Box::pin(async move {
        let result = fetch(&node, &job).await;
        (job, result)
    })
}

async fn fetch(node: &Node, job: &PieceJob) -> Result<PieceRecord, PieceError> {
    let range = job.task.layout().piece_range(job.number);
    let want = range.end - range.start;
    let scheme = if node.cfg.peer_tls { "https" } else { "http" };
    let url = format!("{scheme}://{}/pieces/{}/{}", job.addr, job.task.digest(), job.number);
    let stall = node.cfg.stall_timeout;
    let send = node.http.get(&url).bearer_auth(&job.token).send();
    let resp = tokio::time::timeout(stall, send)
        .await
        .map_err(|_| PieceError::Stalled)?
        .map_err(|e| PieceError::Connect(e.to_string()))?;
    if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return Err(PieceError::Busy);
    }
    if resp.status() != reqwest::StatusCode::OK {
        return Err(PieceError::Status(resp.status().as_u16()));
    }
    let mut body = resp.bytes_stream();
    let mut sha = Hasher::new(Algorithm::Sha256);
    let mut crc = 0u32;
    let mut pos = range.start;
    loop {
        let chunk = match tokio::time::timeout(stall, body.next()).await {
            Err(_) => return Err(PieceError::Stalled),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(PieceError::Connect(e.to_string())),
            Ok(Some(Ok(c))) => c,
        };
        if pos + chunk.len() as u64 > range.end {
            return Err(PieceError::Length { got: pos + chunk.len() as u64 - range.start, want });
        }
        // Bytes arrived: progress, whatever the rate limit makes this wait below.
        job.last_byte.store(job.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        super::limit::take(&node.download_limit, chunk.len()).await;
        // The piece is claimed by this node's fetch: nobody reads these bytes until the whole
        // piece matched its digest and is marked present.
        job.task.write_at(&chunk, pos).map_err(|e| PieceError::Write(e.to_string()))?;
        sha.update(&chunk);
        crc = crc32c::crc32c_append(crc, &chunk);
        pos += chunk.len() as u64;
        job.last_byte.store(job.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    if pos != range.end {
        return Err(PieceError::Length { got: pos - range.start, want });
    }
    let hex = sha.finish().hex().to_owned();
    if hex != job.sha256 {
        return Err(PieceError::Corrupt);
    }
    Ok(PieceRecord { crc32c: crc, sha256: Some(hex) })
}
