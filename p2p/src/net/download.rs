//! One download stream per task per node, shared by every fetch of that task: what the
//! scheduler said (parents, pinned piece digests, go to the origin) and what this node reports
//! back (pieces finished or failed).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use damselfly_proto::v1::{self as proto, download_request, download_response, DownloadRequest, DownloadResponse};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::mux::Responses;
use crate::digest::Digest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// No answer from the scheduler yet.
    Pending,
    /// Take pieces from the parents.
    Parents,
    /// Nobody holds the task yet; parents are coming.
    Wait,
    /// Fetch from the origin: told so, the task is quarantined, or no scheduler is reachable.
    Origin,
}

pub(crate) struct Parent {
    pub host_id: String,
    pub addr: SocketAddr,
    pub token: String,
    pub pieces: Vec<bool>,
    pub inflight: usize,
    /// The parent said its upload slots are full: ask others until then.
    pub busy_until: Option<Instant>,
}

pub(crate) struct DownloadState {
    pub mode: Mode,
    pub parents: Vec<Parent>,
    /// Pinned sha256 (hex) per piece, from the scheduler.
    pub digests: Vec<Option<String>>,
    /// Parents this node stopped taking pieces from.
    pub blocked: HashSet<String>,
    /// Parents that supplied pieces: who is reported when the content fails its digest.
    pub suppliers: HashSet<String>,
    /// When the swarm last got news that lets it make progress (new parents or pieces).
    pub news_at: Instant,
}

pub(crate) struct Download {
    pub digest: Digest,
    pieces: usize,
    tx: Mutex<Option<mpsc::UnboundedSender<DownloadRequest>>>,
    /// URL of the scheduler the stream runs on.
    scheduler: Mutex<Option<String>>,
    state: Mutex<DownloadState>,
    changed: watch::Sender<u64>,
    attached: AtomicUsize,
    /// Closed by the node: a stream that opens after this is dropped at once.
    closed: std::sync::atomic::AtomicBool,
    /// `Finished` was sent already.
    finished_sent: std::sync::atomic::AtomicBool,
}

impl Download {
    pub fn new(digest: Digest, pieces: usize) -> Arc<Download> {
        Arc::new(Download {
            digest,
            pieces,
            tx: Mutex::new(None),
            scheduler: Mutex::new(None),
            state: Mutex::new(DownloadState {
                mode: Mode::Pending,
                parents: Vec::new(),
                digests: vec![None; pieces],
                blocked: HashSet::new(),
                suppliers: HashSet::new(),
                news_at: Instant::now(),
            }),
            changed: watch::channel(0).0,
            attached: AtomicUsize::new(0),
            closed: Default::default(),
            finished_sent: Default::default(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, DownloadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
        self.notify();
    }

    pub fn attach(&self) {
        self.attached.fetch_add(1, Ordering::SeqCst);
    }

    /// Returns the number of fetches still attached.
    pub fn detach(&self) -> usize {
        self.attached.fetch_sub(1, Ordering::SeqCst) - 1
    }

    pub fn attached(&self) -> usize {
        self.attached.load(Ordering::SeqCst)
    }

    /// Returns `false` (dropping `tx`, which ends the stream) when the download was closed
    /// while its stream was being opened.
    pub fn connect(&self, tx: mpsc::UnboundedSender<DownloadRequest>, scheduler: &str) -> bool {
        let mut slot = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        *slot = Some(tx);
        drop(slot);
        *self.scheduler.lock().unwrap_or_else(|e| e.into_inner()) = Some(scheduler.to_owned());
        true
    }

    /// The scheduler this download talks to, once connected.
    pub fn scheduler(&self) -> Option<String> {
        self.scheduler.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends the stream: the scheduler keeps this node as a holder of what it reported.
    pub fn close(&self, finished: bool) {
        let tx = {
            let mut slot = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            self.closed.store(true, Ordering::SeqCst);
            slot.take()
        };
        if let (Some(tx), true) = (tx, finished) {
            if !self.finished_sent.swap(true, Ordering::SeqCst) {
                let _ = tx.send(request(download_request::Kind::Finished(proto::Finished {})));
            }
        }
    }

    /// The task is complete and verified here: the scheduler may list all of it at once.
    pub fn finished(&self) {
        if !self.finished_sent.swap(true, Ordering::SeqCst) {
            self.send(download_request::Kind::Finished(proto::Finished {}));
        }
    }

    pub fn send(&self, kind: download_request::Kind) {
        if let Some(tx) = &*self.tx.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(request(kind));
        }
    }

    pub fn piece_from_origin(&self, number: usize, sha256: String) {
        self.send(download_request::Kind::PieceFinished(proto::PieceFinished {
            number: number as u32,
            parent_id: String::new(),
            sha256,
            cost_micros: 0,
        }));
    }

    /// Applies one message from the scheduler.
    pub fn apply(&self, resp: DownloadResponse) {
        let Some(kind) = resp.kind else { return };
        let mut st = self.lock();
        match kind {
            download_response::Kind::Parents(p) => {
                let mut fresh: Vec<Parent> = p.parents.into_iter().filter_map(|p| self.parent(&st, p)).collect();
                // A refreshed set keeps what this node knows of parents it already had.
                for f in fresh.iter_mut() {
                    if let Some(old) = st.parents.iter().find(|o| o.host_id == f.host_id) {
                        f.inflight = old.inflight;
                        f.busy_until = old.busy_until;
                        for (have, had) in f.pieces.iter_mut().zip(&old.pieces) {
                            *have |= *had;
                        }
                    }
                }
                tracing::debug!(
                    digest = %self.digest,
                    parents = ?fresh.iter().map(|p| (p.host_id.as_str(), p.pieces.iter().filter(|&&b| b).count())).collect::<Vec<_>>(),
                    "parents"
                );
                // News is only what lets the swarm move: a holder of a piece it did not know of.
                // The same parent set handed out again is no progress (a download starved by
                // it must still reach its stall timer and go to the origin).
                let gained = fresh.iter().any(|f| {
                    let old = st.parents.iter().find(|o| o.host_id == f.host_id);
                    f.pieces.iter().enumerate().any(|(i, &has)| has && !old.is_some_and(|o| o.pieces[i]))
                });
                if gained {
                    st.news_at = Instant::now();
                }
                st.parents = fresh;
                st.mode = if st.parents.is_empty() { Mode::Wait } else { Mode::Parents };
            }
            download_response::Kind::BackToSource(b) => {
                tracing::debug!(digest = %self.digest, reason = %b.reason, "scheduler: fetch from the origin");
                st.mode = Mode::Origin;
            }
            download_response::Kind::Wait(_) => {
                if st.mode == Mode::Pending {
                    st.mode = Mode::Wait;
                }
            }
            download_response::Kind::PieceDigests(d) => {
                let mut pinned = false;
                for pd in d.digests {
                    if let Some(slot) = st.digests.get_mut(pd.number as usize) {
                        if slot.is_none() && valid_sha(&pd.sha256) {
                            *slot = Some(pd.sha256);
                            pinned = true;
                        }
                    }
                }
                if pinned {
                    st.news_at = Instant::now();
                }
            }
            download_response::Kind::PieceAvailable(a) => {
                tracing::trace!(digest = %self.digest, host = %a.host_id, pieces = ?a.pieces, "pieces available");
                if let Some(parent) = st.parents.iter_mut().find(|p| p.host_id == a.host_id) {
                    let mut gained = false;
                    for n in a.pieces {
                        if let Some(slot) = parent.pieces.get_mut(n as usize) {
                            gained |= !*slot;
                            *slot = true;
                        }
                    }
                    if gained {
                        st.news_at = Instant::now();
                    }
                }
            }
            download_response::Kind::Quarantined(q) => {
                tracing::warn!(digest = %self.digest, reason = %q.reason, "task quarantined; taking nothing from peers");
                st.mode = Mode::Origin;
                st.parents.clear();
            }
        }
        drop(st);
        self.notify();
    }

    fn parent(&self, st: &DownloadState, p: proto::Parent) -> Option<Parent> {
        if st.blocked.contains(&p.host_id) {
            return None;
        }
        let ip: std::net::IpAddr = p.ip.parse().ok()?;
        let port = u16::try_from(p.port).ok()?;
        let mut pieces = vec![false; self.pieces];
        for n in p.pieces {
            if let Some(slot) = pieces.get_mut(n as usize) {
                *slot = true;
            }
        }
        Some(Parent {
            host_id: p.host_id,
            addr: SocketAddr::new(ip, port),
            token: p.token,
            pieces,
            inflight: 0,
            busy_until: None,
        })
    }

    /// Stops taking pieces from `host_id` and tells the scheduler why.
    pub fn block(&self, host_id: &str, number: usize, e: &super::peer::PieceError) {
        {
            let mut st = self.lock();
            st.blocked.insert(host_id.to_owned());
            st.parents.retain(|p| p.host_id != host_id);
        }
        self.send(download_request::Kind::PieceFailed(proto::PieceFailed {
            number: number as u32,
            parent_id: host_id.to_owned(),
            reason: e.to_string(),
            corrupt: e.is_corrupt(),
            gone: e.is_gone(),
        }));
        self.notify();
    }

    /// The content assembled with pieces from this download's parents failed its digest:
    /// every parent that supplied a piece is reported, then the download, which holds nothing
    /// any more, ends as poisoned (the scheduler drops the digests it pinned).
    /// Returns whether the report went out (the download has a stream).
    pub fn poisoned(&self) -> bool {
        let suppliers: Vec<String> = self.lock().suppliers.drain().collect();
        if self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return false;
        }
        for parent_id in suppliers {
            self.send(download_request::Kind::PieceFailed(proto::PieceFailed {
                number: 0,
                parent_id,
                reason: "supplied pieces of content that failed its digest".to_owned(),
                corrupt: true,
                gone: false,
            }));
        }
        self.send(download_request::Kind::Failed(proto::Failed {
            reason: "content assembled from peers failed its digest".to_owned(),
            poisoned: true,
        }));
        self.finished_sent.store(true, Ordering::SeqCst);
        true
    }

    pub fn reschedule(&self, stalled: Vec<String>) {
        self.send(download_request::Kind::Reschedule(proto::Reschedule { stalled }));
    }
}

fn request(kind: download_request::Kind) -> DownloadRequest {
    DownloadRequest { kind: Some(kind) }
}

fn valid_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads the scheduler's answers into the download until the stream ends; then the download
/// falls back to the origin.
pub(crate) async fn pump(download: Arc<Download>, mut responses: Responses) -> bool {
    loop {
        match responses.next().await {
            Some(Ok(resp)) => download.apply(resp),
            None => return true,
            Some(Err(e)) => {
                tracing::debug!(digest = %download.digest, error = %e, "download stream ended");
                // Parents already handed out keep serving without the scheduler; the stall timer
                // sends the download to the origin if they stop.
                let mut st = download.lock();
                if st.mode != Mode::Parents {
                    st.mode = Mode::Origin;
                }
                drop(st);
                download.notify();
                return false;
            }
        }
    }
}
