//! Filling a fetch's pieces from other peers: several pieces in flight from several parents,
//! each verified against its pinned digest before it counts; the origin takes over the missing
//! pieces when the scheduler says so, is unreachable, or the swarm stalls.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use damselfly_proto::v1::{self as proto, download_request};
use std::panic::AssertUnwindSafe;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};

use super::download::{Download, Mode};
use super::peer::{self, PieceError, PieceJob};
use super::Node;
use crate::share::{Direct, Fetcher};
use crate::source::{Source, SourceError};
use crate::task::TaskRef;

/// Pieces downloaded at once by one fetch, and from one parent. One per parent: a child that
/// queued several pieces at the first holder (often the seed) would take them all from there,
/// even after its siblings got them, and each would arrive later, since they share that
/// parent's uplink; a piece that arrives sooner is passed on sooner (measured in
/// `docs/benchmarks.md`, cluster).
const MAX_INFLIGHT: usize = 8;
const PER_PARENT: usize = 1;
/// How long a parent that answered "busy" is left alone.
const BUSY_BACKOFF: Duration = Duration::from_millis(500);
/// How often the stall timer is looked at.
const TICK: Duration = Duration::from_millis(100);
/// How often a download asks for a fresh parent set: peers that registered after it hold
/// pieces too, and taking pieces from them instead of all from the first holder is what keeps
/// one uplink from carrying the whole cluster.
const REFRESH: Duration = Duration::from_secs(2);
/// A download with nothing it can fetch asks sooner, but not more often than this.
const STARVED_REFRESH: Duration = Duration::from_millis(500);
/// How long a download waits without news while the node the scheduler chose fetches the
/// task's first piece from the origin. That piece waits on the origin's first byte (a token
/// exchange, a redirect to a CDN), which from a remote registry often takes longer than the
/// stall time; giving up then would send every waiting node to the origin at once.
const FIRST_PIECE_WAIT: Duration = Duration::from_secs(5);

struct Swarm {
    node: Arc<Node>,
    task: TaskRef,
    id: u64,
    run: Range<usize>,
    download: Arc<Download>,
    /// Pieces being downloaded, and from which parent.
    inflight: HashMap<usize, String>,
    /// Milliseconds since `epoch` at which the last byte arrived from a parent.
    last_byte: Arc<AtomicU64>,
    epoch: Instant,
}

/// What a shared store is handed to fetch with (see `share.rs`): its missing pieces come
/// from other nodes first. It holds the node weakly, since the node holds the store.
pub(crate) struct SwarmFetcher(pub(crate) Weak<Node>);

impl Fetcher for SwarmFetcher {
    fn fetch(&self, task: TaskRef, id: u64, pieces: Range<usize>, source: Arc<dyn Source>) {
        match self.0.upgrade() {
            Some(node) => drop(tokio::spawn(run(node, task, id, pieces, source))),
            // The node is gone (shutting down): the source alone.
            None => Direct.fetch(task, id, pieces, source),
        }
    }
}

async fn run(node: Arc<Node>, task: TaskRef, id: u64, pieces: Range<usize>, source: Arc<dyn Source>) {
    let download = node.download(&task, &*source);
    download.attach();
    let mut swarm = Swarm {
        node: node.clone(),
        task: task.clone(),
        id,
        run: pieces,
        download: download.clone(),
        inflight: HashMap::new(),
        last_byte: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
    };
    // A panic must not leave pieces claimed by a fetch that no longer runs (as in fetch.rs).
    let take_from_peers = AssertUnwindSafe(swarm.take_from_peers())
        .catch_unwind()
        .await
        .unwrap_or(Err("taking pieces from peers panicked"));
    swarm.abandon_inflight();
    // Whatever the peers did not deliver comes from the origin.
    let (result, hashing) = swarm.take_from_origin(&*source).await;
    if let Err(why) = &take_from_peers {
        tracing::debug!(digest = %task.digest(), reason = %why, "took the rest from the origin");
    }
    node.release(&download);
    task.finish_fetch(id, hashing, result.err().map(|e| e.message));
    // Pieces from peers and from origin ranges: nobody streamed the whole content through a
    // hash, and a seed or background fill has no full reader to ask for it.
    if task.is_complete() {
        task.task().verify_ahead();
    }
}

impl Swarm {
    /// Downloads claimed pieces from parents until none are left (`Ok`) or the origin must
    /// take over (`Err` says why).
    async fn take_from_peers(&mut self) -> Result<(), &'static str> {
        let mut changed = self.download.subscribe();
        let mut jobs = FuturesUnordered::new();
        let mut tick = tokio::time::interval(TICK);
        let mut refreshed = Instant::now();
        loop {
            let want = self.task.claimed(self.id, self.run.clone());
            if want.is_empty() {
                return Ok(());
            }
            match self.download.mode() {
                Mode::Origin => return Err("the scheduler sent this node to the origin"),
                Mode::Parents => {
                    self.start(&want, &mut jobs);
                    let starved = self.inflight.is_empty();
                    let due = if starved { STARVED_REFRESH } else { REFRESH };
                    if refreshed.elapsed() >= due {
                        self.download.reschedule(Vec::new());
                        refreshed = Instant::now();
                    }
                }
                Mode::Pending | Mode::Wait => {}
            }
            if self.stalled() {
                let stalled: Vec<String> = {
                    let st = self.download.lock();
                    tracing::debug!(
                        digest = %self.task.digest(),
                        mode = ?st.mode,
                        parents = st.parents.len(),
                        pinned = st.digests.iter().filter(|d| d.is_some()).count(),
                        available = st.parents.iter().map(|p| p.pieces.iter().filter(|&&b| b).count()).sum::<usize>(),
                        inflight = self.inflight.len(),
                        want = want.len(),
                        "swarm stalled"
                    );
                    st.parents.iter().map(|p| p.host_id.clone()).collect()
                };
                self.download.reschedule(stalled);
                self.node.metrics.fallbacks.inc();
                return Err("no bytes from any parent in time");
            }
            tokio::select! {
                Some((job, result)) = jobs.next(), if !jobs.is_empty() => self.finished(job, result),
                _ = changed.changed() => {}
                _ = tick.tick() => {}
            }
        }
    }

    /// Downloads cut short by the origin taking over no longer load their parents.
    fn abandon_inflight(&mut self) {
        let mut st = self.download.lock();
        for (_, parent) in self.inflight.drain() {
            if let Some(p) = st.parents.iter_mut().find(|p| p.host_id == parent) {
                p.inflight = p.inflight.saturating_sub(1);
            }
        }
    }

    /// No bytes from a parent and no news of parents or pieces for the stall time.
    fn stalled(&self) -> bool {
        let (news, limit) = {
            let st = self.download.lock();
            let pinned = st.digests.iter().any(Option::is_some);
            (st.news_at.max(self.epoch), patience(st.mode, pinned, self.node.cfg.stall_timeout))
        };
        let last_byte = self.epoch + Duration::from_millis(self.last_byte.load(Ordering::Relaxed));
        news.max(last_byte).elapsed() >= limit
    }

    /// Starts downloads of wanted pieces whose digest is pinned. The next piece a reader
    /// waits for goes first; then the rarest pieces among the parents (random among equals), so
    /// that children of one parent fetch different pieces and can trade them. Each piece comes
    /// from the least busy parent that holds it.
    fn start(&mut self, want: &[usize], jobs: &mut FuturesUnordered<peer::JobFuture>) {
        use rand::Rng;
        let mut st = self.download.lock();
        let mut rng = rand::thread_rng();
        let mut order: Vec<(usize, u32, usize)> = want
            .iter()
            .filter(|i| !self.inflight.contains_key(i) && st.digests.get(**i).is_some_and(|d| d.is_some()))
            .filter_map(|&i| {
                let holders = st.parents.iter().filter(|p| p.pieces.get(i).copied().unwrap_or(false)).count();
                (holders > 0).then(|| (holders, rng.gen::<u32>(), i))
            })
            .collect();
        order.sort_unstable();
        if let Some(first) = want.first().and_then(|f| order.iter().position(|o| o.2 == *f)) {
            let head = order.remove(first);
            order.insert(0, head);
        }
        for (_, _, i) in order {
            if self.inflight.len() >= MAX_INFLIGHT {
                break;
            }
            let Some(sha) = st.digests[i].clone() else { continue };
            let best = st
                .parents
                .iter_mut()
                .filter(|p| p.inflight < PER_PARENT && p.pieces.get(i).copied().unwrap_or(false))
                .filter(|p| p.busy_until.is_none_or(|t| t <= Instant::now()))
                .min_by_key(|p| (p.inflight, rng.gen::<u8>()));
            let Some(parent) = best else { continue };
            parent.inflight += 1;
            self.inflight.insert(i, parent.host_id.clone());
            let job = PieceJob {
                task: self.task.clone(),
                number: i,
                sha256: sha,
                parent: parent.host_id.clone(),
                addr: parent.addr,
                token: parent.token.clone(),
                last_byte: self.last_byte.clone(),
                epoch: self.epoch,
                started: Instant::now(),
            };
            jobs.push(peer::download(self.node.clone(), job));
        }
    }

    fn finished(&mut self, job: PieceJob, result: Result<crate::meta::PieceRecord, PieceError>) {
        self.inflight.remove(&job.number);
        {
            let mut st = self.download.lock();
            if let Some(p) = st.parents.iter_mut().find(|p| p.host_id == job.parent) {
                p.inflight = p.inflight.saturating_sub(1);
            }
            if result.is_ok() {
                st.suppliers.insert(job.parent.clone());
            }
        }
        match result {
            Ok(record) => {
                tracing::debug!(digest = %self.task.digest(), piece = job.number, parent = %job.parent, "piece from a parent");
                let len =
                    self.task.layout().piece_range(job.number).end - self.task.layout().piece_range(job.number).start;
                self.task.piece_from_peer(self.id, job.number, record);
                self.task.task().verify_ahead();
                self.node.store.metrics().fetched(crate::ByteSource::Peer, len);
                let cost = job.started.elapsed().as_micros().max(1) as u64;
                self.download.send(download_request::Kind::PieceFinished(proto::PieceFinished {
                    number: job.number as u32,
                    parent_id: job.parent,
                    sha256: String::new(),
                    cost_micros: cost,
                }));
            }
            Err(PieceError::Busy) => {
                self.task.metrics.piece_failed(PieceError::Busy.reason());
                let mut st = self.download.lock();
                if let Some(p) = st.parents.iter_mut().find(|p| p.host_id == job.parent) {
                    p.busy_until = Some(Instant::now() + BUSY_BACKOFF);
                }
            }
            Err(e @ PieceError::Write(_)) => {
                // As with the origin: drop the task so the clients' retries stream through.
                self.task.metrics.piece_failed(e.reason());
                self.task.abandon(&e.to_string());
            }
            Err(e) => {
                tracing::info!(digest = %self.task.digest(), piece = job.number, parent = %job.parent, error = %e, "piece from a parent failed; blocking it");
                self.task.metrics.piece_failed(e.reason());
                self.download.block(&job.parent, job.number, &e);
            }
        }
    }

    /// Fetches the claimed pieces that are still missing from the origin, run by run.
    async fn take_from_origin(&mut self, source: &dyn Source) -> (Result<(), SourceError>, bool) {
        let mut hashing = false;
        // One run at a time, looking again after each: a source that ignores ranges answers
        // the first run with the whole content, which fills every claimed piece at once.
        while let Some(run) = runs(&self.task.claimed(self.id, self.run.clone())).into_iter().next() {
            let (result, hashed) = crate::fetch::fill(&self.task, self.id, run, source).await;
            hashing |= hashed;
            if result.is_err() {
                return (result, hashing);
            }
        }
        (Ok(()), hashing)
    }
}

/// How long a download goes without news before it takes the origin. The stall time, except
/// while the scheduler has said another node is fetching (it answered `Wait`, or gave parents)
/// and no piece of the task exists yet. Before any answer (`Pending`), a scheduler that hangs
/// must cost no more than the stall time.
fn patience(mode: Mode, any_piece_pinned: bool, stall: Duration) -> Duration {
    match mode {
        Mode::Wait | Mode::Parents if !any_piece_pinned => stall.max(FIRST_PIECE_WAIT),
        _ => stall,
    }
}

/// Contiguous runs of sorted piece numbers.
fn runs(pieces: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &i in pieces {
        match out.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_told_to_wait_are_patient_until_the_first_piece_exists() {
        let stall = Duration::from_secs(1);
        assert_eq!(patience(Mode::Wait, false, stall), FIRST_PIECE_WAIT);
        assert_eq!(patience(Mode::Parents, false, stall), FIRST_PIECE_WAIT);
        // Once pieces exist they flow, and a stall is a stall.
        assert_eq!(patience(Mode::Wait, true, stall), stall);
        assert_eq!(patience(Mode::Parents, true, stall), stall);
        // No answer yet: the scheduler may be the thing that hangs.
        assert_eq!(patience(Mode::Pending, false, stall), stall);
        assert_eq!(patience(Mode::Wait, false, Duration::from_secs(9)), Duration::from_secs(9));
    }

    #[test]
    fn runs_split_at_gaps() {
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8]), vec![0..3, 5..6, 7..9]);
        assert!(runs(&[]).is_empty());
    }
}
