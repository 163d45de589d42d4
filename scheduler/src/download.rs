//! One download stream: its registration, what it reports, and its end.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::decide::{parse_sha, pin_piece, pinned, Env};
use crate::error::SchedulerError;
use crate::outbox::Outbox;
use crate::pieces::PieceSet;
use crate::proto::download_request::Kind as Req;
use crate::proto::download_response::Kind;
use crate::proto::{
    DownloadRequest, DownloadResponse, PieceAvailable, PieceDigests, PieceFailed, PieceFinished, Register,
};
use crate::scheduler::Scheduler;
use crate::state::{piece_count, Id, PeerState, SoftState};

/// Pieces a task may have.
pub(crate) const MAX_PIECES: u32 = 100_000;
/// Host ids and digests longer than this are refused.
pub(crate) const MAX_ID: usize = 512;
/// Parents one download remembers as blocked (the oldest are forgotten first).
const MAX_BLOCKED: usize = 1024;
/// Distinct children that must report corrupt pieces from a host before it is blocked for
/// everyone: one could be a child with a broken disk or a lying child.
const CORRUPT_REPORTERS: usize = 2;
/// How long corrupt reports count, and how long a host they condemn stays blocked.
const CORRUPT_BLOCK: Duration = Duration::from_secs(600);
/// Weight of the newest sample in a host's throughput average.
const EWMA_ALPHA: f64 = 0.3;
/// How long a host whose word pinned digests that proved wrong is handed to nobody.
const POISON_BLOCK: Duration = Duration::from_secs(3600);
/// Responses queued for a download before it counts as not reading (see `Peer::push`).
pub(crate) const QUEUE: usize = 1024;

/// A blob digest as nodes key blobs (the one rule, `damselfly_proto::Digest`): anything else
/// names no blob a node could hold.
pub(crate) fn check_digest(s: &str) -> Result<(), SchedulerError> {
    damselfly_proto::Digest::parse(s).map(drop).map_err(|e| SchedulerError::invalid(format!("digest: {e}")))
}

pub(crate) fn check_id(what: &str, s: &str) -> Result<(), SchedulerError> {
    if s.is_empty() {
        return Err(SchedulerError::invalid(format!("{what} is empty")));
    }
    if s.len() > MAX_ID {
        return Err(SchedulerError::invalid(format!("{what} is longer than {MAX_ID} bytes")));
    }
    Ok(())
}

/// The scheduler's side of one download stream. Requests go in with [`send`](Self::send);
/// responses come out of the receiver [`Scheduler::download`] returned with it. Dropping the
/// handle ends the stream: the peer keeps the pieces it reported, as its host still holds them.
pub struct DownloadHandle {
    pub(crate) sched: Scheduler,
    pub(crate) digest: Id,
    pub(crate) host: Id,
    pub(crate) gen: u64,
    pub(crate) ended: bool,
    /// The host closed the download itself, or was told why it ended: dropping the handle
    /// tells it nothing more.
    pub(crate) quiet: bool,
}

impl DownloadHandle {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn host_id(&self) -> &str {
        &self.host
    }

    /// Applies one request of the stream (anything but `Register`, which opened it).
    pub fn send(&mut self, req: DownloadRequest) -> Result<(), SchedulerError> {
        if self.ended {
            return Err(SchedulerError::DownloadEnded("the download already failed"));
        }
        let kind = req.kind.ok_or_else(|| SchedulerError::invalid("empty download request"))?;
        let failed = matches!(kind, Req::Failed(_));
        let (digest, host, gen) = (self.digest.clone(), self.host.clone(), self.gen);
        self.sched.with(|st, env| st.event(env, &digest, &host, gen, kind))?;
        self.ended = failed;
        Ok(())
    }
}

impl DownloadHandle {
    /// Ends the download as dropping the handle does, without an `Ended` to a session: the
    /// host closed it, or the refusal that ends it was already sent.
    pub fn close_quietly(mut self) {
        self.quiet = true;
    }
}

impl Drop for DownloadHandle {
    fn drop(&mut self) {
        let (digest, host, gen, ended, quiet) =
            (self.digest.clone(), self.host.clone(), self.gen, self.ended, self.quiet);
        self.sched.with(|st, env| st.close_stream(env, &digest, &host, gen, Closing { failed: ended, quiet }));
    }
}

/// How a download's stream ended.
pub(crate) struct Closing {
    /// It sent `Failed`: the peer is gone already.
    pub failed: bool,
    /// Nothing more to tell the host (see `DownloadHandle::close_quietly`).
    pub quiet: bool,
}

pub(crate) fn channel() -> (mpsc::Sender<DownloadResponse>, mpsc::Receiver<DownloadResponse>) {
    mpsc::channel(QUEUE)
}

impl SoftState {
    /// Registers a download and makes its first decision. Returns the task, host and stream
    /// generation the handle needs.
    pub fn register(&mut self, env: &Env, reg: &Register, tx: Outbox) -> Result<(Id, Id, u64), SchedulerError> {
        if self.shut {
            return Err(SchedulerError::ShuttingDown);
        }
        check_id("host id", &reg.host_id)?;
        check_digest(&reg.digest)?;
        let (host, hix) = self
            .hosts
            .ix(&reg.host_id)
            .ok_or_else(|| SchedulerError::precondition(format!("unknown host {}: announce first", reg.host_id)))?;
        let key = self.task_key(reg)?;
        let existing = self.tasks.get_key_value(key.as_str());
        let (length, piece_size) = existing.map_or((0, 0), |(_, t)| (t.length, t.piece_size));
        let length = pin_value("length", length, reg.length)?;
        let piece_size = pin_value("piece size", piece_size, reg.piece_size)?;
        let count = piece_count(length, piece_size);
        if length > 0 && piece_size > 0 && count.is_none_or(|c| c > MAX_PIECES) {
            return Err(SchedulerError::invalid(format!("more than {MAX_PIECES} pieces")));
        }
        if reg.pieces.len() > MAX_PIECES as usize {
            return Err(SchedulerError::invalid("too many pieces"));
        }
        if let Some(&n) = reg.pieces.iter().find(|&&n| n >= count.unwrap_or(MAX_PIECES)) {
            return Err(SchedulerError::invalid(format!("piece {n} out of range")));
        }
        let digest: Id = existing.map_or_else(|| key.as_str().into(), |(k, _)| k.clone());
        let gen = self.next_gen;
        self.next_gen += 1;
        let i = self.add_peer(&digest, &host, hix);
        if let Some(h) = self.hosts.at_mut(hix) {
            h.streams += 1;
            h.last_seen = env.now;
        }
        let SoftState { tasks, hosts, .. } = self;
        let Some(task) = tasks.get_mut(&digest) else { return Err(SchedulerError::precondition("task vanished")) };
        (task.length, task.piece_size) = (length, piece_size);
        // A credential is kept only when every caller showed a certificate from the cluster's
        // CA: otherwise anyone who reaches this port could announce a seed and collect it. A
        // later registration's credential replaces an earlier one, which may have run out.
        task.peers[i].registry = registry_id(reg.source.as_ref().map_or("", |s| s.registry.as_str())).as_str().into();
        let mut source = reg.source.clone();
        if env.cfg.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            if let Some(s) = source.as_mut() {
                s.credential.clear();
            }
        }
        let brings_credential = source.as_ref().is_some_and(|s| !s.credential.is_empty());
        if task.source.is_none() || brings_credential {
            task.source = source;
        }
        if let Some(t) = task.seed.as_mut().filter(|t| t.host == host) {
            t.settled = true;
        }
        task.unlink_parents(hosts, i);
        task.release_slot(i);
        task.set_state(i, PeerState::Idle);
        task.peers[i].pieces = PieceSet::default();
        // Blocks belong to one download: a parent that stalled an earlier one may serve this
        // one well, and one that serves bad data is blocked again at its first bad piece.
        task.peers[i].blocked.clear();
        for &n in &reg.pieces {
            task.mark_piece(i, n);
        }
        // Replacing the sender ends an older stream of the same download.
        (task.peers[i].gen, task.peers[i].tx) = (gen, Some(tx.installed()));
        let digests = pinned(task);
        if !digests.is_empty() {
            task.peers[i].push(Kind::PieceDigests(PieceDigests { piece_size: task.piece_size, digests }));
        }
        self.decide(env, &digest, &host, false);
        self.settle(env, &digest);
        Ok((digest, host, gen))
    }

    /// The task a registration joins: the digest's, or, when it registers another length
    /// before anyone verified the content, a task of that length apart (`<digest>#<length>`).
    /// One length is wrong, and whoever registered it first must not keep everyone else from
    /// sharing the content; a verified task's length is the content's, and another is refused.
    fn task_key(&self, reg: &Register) -> Result<String, SchedulerError> {
        let apart = format!("{}#{}", reg.digest, reg.length);
        let Some(task) = self.tasks.get(reg.digest.as_str()) else {
            // The digest's first task is gone; one of this length apart from it is joined.
            return Ok(if self.tasks.contains_key(apart.as_str()) { apart } else { reg.digest.clone() });
        };
        if task.length == 0 || reg.length == 0 || task.length == reg.length {
            return Ok(reg.digest.clone());
        }
        if task.trusted {
            return Err(SchedulerError::invalid(format!(
                "length {} differs from the verified length {} of the task",
                reg.length, task.length
            )));
        }
        Ok(apart)
    }

    pub fn event(&mut self, env: &Env, digest: &Id, host: &Id, gen: u64, kind: Req) -> Result<(), SchedulerError> {
        let current = self.tasks.get(digest).and_then(|t| t.idx(host).map(|i| t.peers[i].gen == gen));
        match current {
            Some(true) => {}
            Some(false) => return Err(SchedulerError::DownloadEnded("a newer stream took over this download")),
            None => return Err(SchedulerError::DownloadEnded("the download is no longer registered")),
        }
        match kind {
            Req::Register(_) => return Err(SchedulerError::invalid("register sent twice")),
            Req::PieceFinished(p) => self.piece_finished(digest, host, &p)?,
            Req::PieceFailed(p) => self.piece_failed(env, digest, host, &p)?,
            Req::Reschedule(r) => {
                if r.stalled.len() > MAX_BLOCKED {
                    return Err(SchedulerError::invalid("too many stalled parents"));
                }
                for s in r.stalled.iter().filter(|s| !s.is_empty()) {
                    check_id("stalled host id", s)?;
                    self.block(digest, host, s);
                }
                self.decide(env, digest, host, false);
            }
            Req::Finished(_) => self.finish(digest, host),
            Req::Failed(f) if f.poisoned => {
                self.poisoned(env, digest, host);
                self.drop_peer(env, digest, host);
            }
            Req::Failed(f) => {
                tracing::debug!(%digest, %host, reason = %f.reason, "download failed");
                self.drop_peer(env, digest, host);
            }
        }
        self.settle(env, digest);
        Ok(())
    }

    fn piece_finished(&mut self, digest: &Id, host: &Id, p: &PieceFinished) -> Result<(), SchedulerError> {
        let SoftState { tasks, hosts, .. } = self;
        let Some(task) = tasks.get_mut(digest) else { return Ok(()) };
        let Some(i) = task.idx(host) else { return Ok(()) };
        // Nodes register with the length and piece size they know; without them a piece
        // number has no range to be checked against.
        let Some(count) = task.piece_count() else {
            return Err(SchedulerError::precondition("piece reported before the task's length and piece size"));
        };
        if p.number >= count {
            return Err(SchedulerError::invalid(format!("piece {} out of range", p.number)));
        }
        let sha = match p.sha256.as_str() {
            "" => None,
            s => Some(parse_sha(s).ok_or_else(|| SchedulerError::invalid("sha256 is not lower-case hex"))?),
        };
        if p.parent_id.len() > MAX_ID {
            return Err(SchedulerError::invalid("parent id too long"));
        }
        let new = task.mark_piece(i, p.number);
        match (p.parent_id.is_empty(), sha) {
            // Only origin bytes are trusted to pin (a parent's would vouch for themselves), and
            // only from a download this scheduler sent to the origin: anyone else's report
            // would let it choose the digests everyone checks pieces against.
            (true, Some(sha)) if task.peers[i].may_pin => pin_piece(task, hosts, i, p.number, sha),
            (true, Some(_)) => {
                tracing::debug!(%digest, %host, piece = p.number, "origin piece from a download not sent to the origin; not pinned");
            }
            (false, _) if p.cost_micros > 0 && task.piece_size > 0 => {
                if let Some(h) = hosts.get_mut(p.parent_id.as_str()) {
                    let rate = task.piece_size as f64 / (p.cost_micros as f64 / 1e6);
                    h.throughput =
                        if h.throughput > 0.0 { EWMA_ALPHA * rate + (1.0 - EWMA_ALPHA) * h.throughput } else { rate };
                }
            }
            _ => {}
        }
        // Pinning may have quarantined the task, which unlinks every child.
        if new && task.idx(host) == Some(i) && !task.peers[i].children.is_empty() {
            let mut children: Vec<usize> = task.peers[i].children.iter().filter_map(|c| task.idx(c)).collect();
            if p.parent_id.is_empty() && children.len() > 1 {
                // A piece fresh from the origin is offered to one child only, in turn: the
                // others get it from that child, so the origin fetcher's uplink carries each
                // piece about once instead of once per child. Parent sets list its pieces once
                // it finished, so a child that dies with one delays the others, never strands them.
                children.sort_unstable();
                children = vec![children[p.number as usize % children.len()]];
            }
            let msg = Kind::PieceAvailable(PieceAvailable { host_id: String::from(&**host), pieces: vec![p.number] });
            for c in children {
                task.peers[c].push(msg.clone());
            }
        }
        Ok(())
    }

    fn piece_failed(&mut self, env: &Env, digest: &Id, host: &Id, p: &PieceFailed) -> Result<(), SchedulerError> {
        if p.parent_id.is_empty() {
            // The origin failed: the download retries it, there is nobody to block.
            return Ok(());
        }
        check_id("parent id", &p.parent_id)?;
        // Only a parent this download was given can have served it anything: a report about
        // any other host is a stranger's word and counts against nobody but the reporter.
        let was_parent = self
            .tasks
            .get(digest)
            .and_then(|t| t.idx(host).map(|i| t.peers[i].parents.iter().any(|q| **q == *p.parent_id)))
            .unwrap_or(false);
        self.block(digest, host, &p.parent_id);
        if p.corrupt && was_parent {
            self.report_corrupt(env, &p.parent_id, host);
        }
        if p.gone && was_parent {
            self.forget_holder(env, digest, &p.parent_id);
        }
        self.decide(env, digest, host, false);
        Ok(())
    }

    fn block(&mut self, digest: &Id, host: &Id, parent: &str) {
        let id = self.host_id(parent).unwrap_or_else(|| parent.into());
        let Some(task) = self.tasks.get_mut(digest) else { return };
        let Some(i) = task.idx(host) else { return };
        let blocked = &mut task.peers[i].blocked;
        if !blocked.contains(&id) {
            if blocked.len() >= MAX_BLOCKED {
                blocked.remove(0);
            }
            blocked.push(id);
        }
    }

    /// A holder told a child it no longer has the task's piece: it was evicted, or a piece
    /// failed its check, and the withdrawal never reached this scheduler. Listed, it would rank
    /// first for every child and cost each one a request. A holder with a download open here
    /// is left to it; one that still has the blob announces it again.
    fn forget_holder(&mut self, env: &Env, digest: &Id, parent: &str) {
        let holder = self.tasks.get(digest).and_then(|t| t.idx(parent).map(|i| t.peers[i].tx.is_none()));
        if holder == Some(true) {
            tracing::info!(%digest, host = %parent, "holder no longer has the task; forgotten");
            self.drop_peer(env, digest, parent);
        }
    }

    fn report_corrupt(&mut self, env: &Env, parent: &str, child: &Id) {
        let Some(h) = self.hosts.get_mut(parent) else { return };
        h.corrupt.retain(|(_, at)| env.now.saturating_duration_since(*at) < CORRUPT_BLOCK);
        if !h.corrupt.iter().any(|(c, _)| c == child) {
            h.corrupt.push((child.clone(), env.now));
        }
        if h.corrupt.len() >= CORRUPT_REPORTERS {
            tracing::warn!(host = %parent, "host served corrupt pieces to several children; blocked");
            h.blocked_until = Some(env.now + CORRUPT_BLOCK);
            h.corrupt.clear();
        }
    }

    /// `host` assembled content of `digest` from pieces checked against the pinned digests,
    /// and it failed the blob's digest: the pins are wrong. Unless a download verified content
    /// checked against them before (then the report is what is wrong, or the reporter), they
    /// are dropped and the host whose word pinned them is blocked and leaves the task, so the
    /// next origin fetch pins the right ones.
    fn poisoned(&mut self, env: &Env, digest: &Id, host: &Id) {
        let SoftState { tasks, hosts, .. } = self;
        let Some(task) = tasks.get_mut(digest) else { return };
        if task.trusted {
            tracing::warn!(%digest, %host, "a host reports content that failed its digest, checked against digests another download verified; ignored");
            return;
        }
        let pinner = task.pinned_by.take();
        tracing::warn!(%digest, reporter = %host, pinned_by = ?pinner, "content checked against the pinned digests failed its digest; unpinning");
        env.metrics.poison_reported();
        task.digests.clear();
        let Some(pinner) = pinner.filter(|p| p != host) else { return };
        if let Some(h) = hosts.get_mut(&pinner) {
            h.blocked_until = Some(env.now + POISON_BLOCK);
        }
        self.drop_peer(env, digest, &pinner);
    }

    fn finish(&mut self, digest: &Id, host: &Id) {
        let SoftState { tasks, hosts, .. } = self;
        let Some(task) = tasks.get_mut(digest) else { return };
        let Some(i) = task.idx(host) else { return };
        task.unlink_parents(hosts, i);
        task.release_slot(i);
        task.set_state(i, PeerState::Finished);
        // Nodes report finished only once the whole content matched its digest.
        task.trusted = true;
        if let Some(c) = task.piece_count() {
            task.peers[i].pieces.fill(c);
        }
    }

    /// Removes a peer; the children it leaves are decided again.
    pub fn drop_peer(&mut self, env: &Env, digest: &str, host: &str) {
        let SoftState { tasks, hosts, .. } = self;
        let Some(task) = tasks.get_mut(digest) else { return };
        let Some((_peer, children)) = task.remove_peer(hosts, host) else { return };
        self.peers -= 1;
        self.reschedule_all(env, digest, &children);
        self.settle(env, digest);
        // A task nobody holds is forgotten, pinned digests and quarantine included: state is
        // soft, the next origin fetch pins the list again, and pieces are verified against it
        // and blobs against their digest whatever was pinned before. Keeping them would let
        // every digest ever reported (or made up) hold memory for the life of the process.
        if self.tasks.get(digest).is_some_and(|t| t.peers.is_empty()) {
            self.tasks.remove(digest);
        }
    }

    /// The stream of a download ended (the client closed it, or it broke).
    pub fn close_stream(&mut self, env: &Env, digest: &Id, host: &Id, gen: u64, how: Closing) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.streams = h.streams.saturating_sub(1);
            // It was alive until now: expiry counts from here.
            h.last_seen = env.now;
        }
        if how.failed {
            return;
        }
        let SoftState { tasks, hosts, .. } = self;
        let Some(task) = tasks.get_mut(digest) else { return };
        let Some(i) = task.idx(host).filter(|&i| task.peers[i].gen == gen) else { return };
        if let Some(outbox) = task.peers[i].tx.take() {
            if how.quiet {
                outbox.close_quietly();
            }
        }
        task.unlink_parents(hosts, i);
        task.release_slot(i);
        match task.peers[i].state {
            PeerState::Finished => {}
            _ if !task.peers[i].pieces.is_empty() => task.set_state(i, PeerState::Idle),
            _ => return self.drop_peer(env, digest, host),
        }
        self.settle(env, digest);
    }
}

/// The host of a registry URL: nodes with different TLS settings name one registry with
/// different schemes.
/// Whose word a download's bytes are, as nodes name registries: the host, or `http://host`
/// for a registry a client named over plain HTTP (anyone on the path chose those bytes), which
/// is another registry than the same host over TLS.
fn registry_id(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split('/').next().unwrap_or(rest);
    match scheme {
        "http" => format!("http://{host}"),
        _ => host.to_owned(),
    }
}

/// First non-zero value wins; a later different non-zero one is an error.
fn pin_value(what: &str, pinned: u64, offered: u64) -> Result<u64, SchedulerError> {
    match (pinned, offered) {
        (0, v) | (v, 0) => Ok(v),
        (p, v) if p == v => Ok(p),
        (p, v) => Err(SchedulerError::invalid(format!("{what} {v} differs from the task's {p}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_named_over_plain_http_is_another_supplier_than_over_tls() {
        assert_eq!(registry_id("https://r.example:5000/x"), "r.example:5000");
        assert_eq!(registry_id("http://r.example:5000"), "http://r.example:5000");
        assert_ne!(registry_id("http://r.example"), registry_id("https://r.example"));
        assert_eq!(registry_id(""), "");
    }

    #[test]
    fn the_first_non_zero_value_wins_and_a_different_one_is_refused() {
        assert_eq!(pin_value("x", 0, 5).ok(), Some(5));
        assert_eq!(pin_value("x", 5, 0).ok(), Some(5));
        assert_eq!(pin_value("x", 5, 5).ok(), Some(5));
        assert!(pin_value("x", 5, 6).is_err());
        assert!(check_id("id", "").is_err() && check_id("id", &"x".repeat(MAX_ID + 1)).is_err());
    }
}
