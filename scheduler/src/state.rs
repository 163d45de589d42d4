//! The scheduler's soft state: hosts, tasks and the peers (host, task) downloading or holding
//! them. Nothing here is persisted: a restarted scheduler learns it all again from the hosts'
//! announcements and registrations.
//!
//! Everything lives behind one `std::sync::Mutex` (see `scheduler.rs`): a decision touches the
//! task, its candidate peers and their hosts' load, which belong to different tasks' hosts, so
//! sharding by task would still need shared host state. Every operation is a few microseconds
//! without an await inside, which keeps one lock well ahead of the decision rate we need.

use std::collections::{HashMap, HashSet, VecDeque};

use foldhash::fast::RandomState;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;

use crate::hosts::{HostIx, Hosts};
use crate::outbox::{Outbox, Unsent};
use crate::pieces::PieceSet;
use crate::proto::{download_response::Kind, Source};

pub(crate) type Id = Arc<str>;
/// Maps and sets keyed by ids: foldhash is several times faster than SipHash on short keys and
/// still seeded per process, so ids chosen by clients cannot be made to collide.
pub(crate) type Map<K, V> = HashMap<K, V, RandomState>;
pub(crate) type Set<K> = HashSet<K, RandomState>;

/// A sha256 as bytes.
pub(crate) type Sha = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerState {
    /// Told to wait: no parent and no origin slot yet.
    Waiting,
    /// Fetching from the origin.
    Origin,
    /// Fetching from parents.
    Peers,
    /// Holds every piece.
    Finished,
    /// Not downloading (just registered, or its stream ended); may hold some pieces.
    Idle,
}

/// Laid out so that what scoring a candidate reads (host, slot, state, piece count, registry)
/// shares the first cache line: a decision samples peers at random, and over gRPC the
/// transport's buffers evict them between decisions, so each line read is a miss.
#[repr(C, align(64))]
pub(crate) struct Peer {
    pub host: Id,
    /// The host's slot in `Hosts`.
    pub hix: HostIx,
    pub state: PeerState,
    /// Counted in the task's origin fetchers.
    pub origin_slot: bool,
    /// The scheduler sent this download to the origin (it is a seed's, or it had an origin
    /// slot): its origin pieces' digests may be pinned. Nobody else's are.
    pub may_pin: bool,
    pub pieces: PieceSet,
    /// The registry this download fetches from (its host), empty when unknown (a holder
    /// known from an announcement).
    pub registry: Id,
    /// Parents this child stopped taking pieces from.
    pub blocked: Vec<Id>,
    pub parents: Vec<Id>,
    pub children: Children,
    /// The download stream that owns this peer now; events from older streams are refused.
    pub gen: u64,
    pub tx: Option<Outbox>,
}

impl Peer {
    fn new(host: Id, hix: HostIx) -> Self {
        Peer {
            host,
            registry: Id::from(""),
            hix,
            pieces: PieceSet::default(),
            state: PeerState::Idle,
            origin_slot: false,
            may_pin: false,
            blocked: Vec::new(),
            parents: Vec::new(),
            children: Children::default(),
            gen: 0,
            tx: None,
        }
    }

    /// A possible parent: it holds something, or is fetching and will (pipelining).
    pub fn is_candidate(&self) -> bool {
        matches!(self.state, PeerState::Origin | PeerState::Peers | PeerState::Finished) || !self.pieces.is_empty()
    }

    pub fn downloading(&self) -> bool {
        matches!(self.state, PeerState::Origin | PeerState::Peers | PeerState::Waiting)
    }

    /// The pieces this peer holds now: all of them once finished and the count is known.
    pub fn held(&self, count: Option<u32>) -> Vec<u32> {
        match (self.state, count) {
            (PeerState::Finished, Some(c)) => (0..c).collect(),
            _ => {
                let mut v = Vec::with_capacity(self.pieces.len() as usize);
                v.extend(self.pieces.iter());
                v
            }
        }
    }

    pub fn held_count(&self, count: Option<u32>) -> u32 {
        match (self.state, count) {
            (PeerState::Finished, Some(c)) => c,
            _ => self.pieces.len(),
        }
    }

    /// Queues a response for the peer's download. A full queue means the client stopped
    /// reading: its download is ended rather than buffering without bound (it re-registers).
    pub fn push(&mut self, kind: Kind) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.send(kind) {
            if e == Unsent::NotReading {
                tracing::warn!(host = %self.host, "download stream not read; ending it");
            }
            self.tx = None;
        }
    }
}

/// The children of a peer, by host id. A list, not a set: a parent has a few children (its
/// upload slots' worth, more for a seed), and a decision links and unlinks several; scanning
/// one short allocation beats hashing into a table of its own per peer, whose probes missed
/// the cache on every link. Ids are the hosts' interned ones, so most comparisons are of
/// pointers.
#[derive(Default)]
pub(crate) struct Children(Vec<Id>);

fn same(a: &Id, b: &Id) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

impl Children {
    /// Returns whether `id` was new.
    pub fn insert(&mut self, id: Id) -> bool {
        if self.0.iter().any(|c| same(c, &id)) {
            return false;
        }
        self.0.push(id);
        true
    }

    /// Returns whether `id` was there.
    pub fn remove(&mut self, id: &Id) -> bool {
        match self.0.iter().position(|c| same(c, id)) {
            Some(i) => {
                self.0.swap_remove(i);
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    pub fn contains(&self, id: &str) -> bool {
        self.0.iter().any(|c| **c == *id)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Id> {
        self.0.iter()
    }

    pub fn into_vec(self) -> Vec<Id> {
        self.0
    }
}

/// A seed asked to fetch a task for the peers waiting on it.
pub(crate) struct SeedTrigger {
    pub host: Id,
    pub at: Instant,
    /// Done waiting for it: it registered for the task, or its seed stream ended.
    pub settled: bool,
}

pub(crate) struct Task {
    /// The task's key: its digest, or `<digest>#<length>` for downloads that register another
    /// length than the task's before anyone verified it (see `SoftState::register`).
    pub digest: Id,
    pub length: u64,
    pub piece_size: u64,
    /// Pinned sha256 per piece; grows as pieces are pinned.
    pub digests: Vec<Option<Sha>>,
    /// The host whose word pinned the first digests: an origin fetcher this scheduler sent, or
    /// a host that announced the task. Blocked when content checked against them fails.
    pub pinned_by: Option<Id>,
    pub quarantined: Option<String>,
    pub source: Option<Source>,
    pub peers: Vec<Peer>,
    index: Map<Id, usize>,
    pub origin_fetchers: usize,
    /// Peers ever sent to the origin for this task: about the copies the origin served.
    pub origin_grants: u32,
    pub waiting: Set<Id>,
    pub seed: Option<SeedTrigger>,
    /// A candidate appeared or an origin slot freed: waiting peers must be decided again.
    pub wake: bool,
    /// The pinned digests are known to be the blob's: a node verified the whole content
    /// against its digest (it finished, or announced the blob). Until then they are only the
    /// word of the registry the first origin fetch read, and peers are paired only with peers
    /// pulling from the same registry, so that one registry's bytes cannot reach the clients
    /// of another as ranges (which no digest check covers).
    pub trusted: bool,
}

impl Task {
    pub fn new(digest: Id) -> Self {
        Task {
            digest,
            length: 0,
            piece_size: 0,
            digests: Vec::new(),
            pinned_by: None,
            quarantined: None,
            source: None,
            peers: Vec::new(),
            index: Map::default(),
            origin_fetchers: 0,
            origin_grants: 0,
            waiting: Set::default(),
            seed: None,
            wake: false,
            trusted: false,
        }
    }

    /// The content digest, whatever the key: what tokens and seed tasks name.
    pub fn content_digest(&self) -> &str {
        content_digest(&self.digest)
    }

    /// A task of a length other than the first one registered for its digest.
    pub fn is_alternate(&self) -> bool {
        self.digest.contains('#')
    }

    pub fn piece_count(&self) -> Option<u32> {
        piece_count(self.length, self.piece_size)
    }

    /// The index of `host`'s peer. Called with an interned `&Id`, the key is matched by
    /// pointer; with a `&str`, by its bytes.
    pub fn idx<Q>(&self, host: &Q) -> Option<usize>
    where
        Id: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.index.get(host).copied()
    }

    /// Returns the peer's index and whether it is new.
    pub fn add_peer(&mut self, host: &Id, hix: HostIx) -> (usize, bool) {
        if let Some(i) = self.idx(host) {
            return (i, false);
        }
        self.peers.push(Peer::new(host.clone(), hix));
        self.index.insert(host.clone(), self.peers.len() - 1);
        (self.peers.len() - 1, true)
    }

    /// Takes the peer out with all its edges; returns it and the children it leaves behind.
    pub fn remove_peer(&mut self, hosts: &mut Hosts, host: &str) -> Option<(Peer, Vec<Id>)> {
        let i = self.idx(host)?;
        let (hix, id) = (self.peers[i].hix, self.peers[i].host.clone());
        self.unlink_parents(hosts, i);
        self.release_slot(i);
        self.waiting.remove(host);
        let children: Vec<Id> = std::mem::take(&mut self.peers[i].children).into_vec();
        for c in &children {
            if let Some(ci) = self.idx(c) {
                self.peers[ci].parents.retain(|p| &**p != host);
            }
            if let Some(h) = hosts.of_mut(hix, &id) {
                h.children = h.children.saturating_sub(1);
            }
        }
        self.index.remove(host);
        let peer = self.peers.swap_remove(i);
        if let Some(moved) = self.peers.get(i) {
            self.index.insert(moved.host.clone(), i);
        }
        if let Some(h) = hosts.of_mut(hix, &id) {
            h.tasks.remove(&self.digest);
        }
        Some((peer, children))
    }

    pub fn set_state(&mut self, i: usize, state: PeerState) {
        let was = self.peers[i].is_candidate();
        let peer = &mut self.peers[i];
        if peer.state == PeerState::Waiting && state != PeerState::Waiting {
            self.waiting.remove(&peer.host);
        } else if state == PeerState::Waiting {
            self.waiting.insert(peer.host.clone());
        }
        peer.state = state;
        if !was && peer.is_candidate() {
            self.wake = true;
        }
    }

    /// Returns whether the piece is new to the peer.
    pub fn mark_piece(&mut self, i: usize, n: u32) -> bool {
        let was = self.peers[i].is_candidate();
        let new = self.peers[i].pieces.insert(n);
        if !was {
            self.wake = true;
        }
        new
    }

    pub fn take_slot(&mut self, i: usize) {
        if !self.peers[i].origin_slot {
            self.peers[i].origin_slot = true;
            self.origin_fetchers += 1;
            self.origin_grants = self.origin_grants.saturating_add(1);
        }
    }

    pub fn release_slot(&mut self, i: usize) {
        if self.peers[i].origin_slot {
            self.peers[i].origin_slot = false;
            self.origin_fetchers = self.origin_fetchers.saturating_sub(1);
            self.wake = true;
        }
    }

    /// Makes peer `parent` a parent of peer `child`, raising the parent host's load.
    pub fn link(&mut self, hosts: &mut Hosts, child: usize, parent: usize) {
        let c = self.peers[child].host.clone();
        if !self.peers[parent].children.insert(c) {
            return;
        }
        let p = self.peers[parent].host.clone();
        if let Some(h) = hosts.of_mut(self.peers[parent].hix, &p) {
            h.children += 1;
        }
        self.peers[child].parents.push(p);
    }

    pub fn unlink_parents(&mut self, hosts: &mut Hosts, child: usize) {
        let parents = std::mem::take(&mut self.peers[child].parents);
        let c = self.peers[child].host.clone();
        for p in parents {
            if let Some(pi) = self.idx(&p) {
                if self.peers[pi].children.remove(&c) {
                    if let Some(h) = hosts.of_mut(self.peers[pi].hix, &p) {
                        h.children = h.children.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// Sends `kind` to every open stream of the task but `except`'s.
    pub fn push_all(&mut self, kind: &Kind, except: Option<usize>) {
        for (i, p) in self.peers.iter_mut().enumerate() {
            if Some(i) != except && p.tx.is_some() {
                p.push(kind.clone());
            }
        }
    }
}

pub(crate) fn piece_count(length: u64, piece_size: u64) -> Option<u32> {
    if length == 0 || piece_size == 0 {
        return None;
    }
    u32::try_from(length.div_ceil(piece_size)).ok()
}

/// What the scheduler knows: hosts, tasks and their peers, seeds. Soft: rebuilt from the
/// nodes' announcements after a restart.
pub(crate) struct SoftState {
    pub hosts: Hosts,
    pub tasks: Map<Id, Task>,
    /// Hosts with an open `SeedTasks` stream.
    pub seeds: Set<Id>,
    /// Seed triggers to look at again when they time out: (task, seed).
    pub seed_waits: VecDeque<(Instant, Id, Id)>,
    pub peers: usize,
    pub next_gen: u64,
    pub rng: SmallRng,
    /// Streams are refused once shutdown began.
    pub shut: bool,
    pub next_expiry: Option<Instant>,
    /// The P2P cache's names (`cache.rs`).
    pub cache: crate::cache::CacheEntries,
}

impl SoftState {
    pub fn new(rng: SmallRng) -> Self {
        SoftState {
            hosts: Hosts::default(),
            tasks: Map::default(),
            seeds: Set::default(),
            seed_waits: VecDeque::new(),
            peers: 0,
            next_gen: 1,
            rng,
            shut: false,
            next_expiry: None,
            cache: Default::default(),
        }
    }

    /// The interned id of a known host, so peers share its allocation.
    pub fn host_id(&self, id: &str) -> Option<Id> {
        self.hosts.ix(id).map(|(id, _)| id)
    }

    /// Adds (or finds) the peer of `host` in `digest`, creating the task if needed.
    pub fn add_peer(&mut self, digest: &Id, host: &Id, hix: HostIx) -> usize {
        let task = self.tasks.entry(digest.clone()).or_insert_with(|| Task::new(digest.clone()));
        let (i, new) = task.add_peer(host, hix);
        if new {
            self.peers += 1;
            if let Some(h) = self.hosts.of_mut(hix, host) {
                h.tasks.insert(digest.clone());
            }
        }
        i
    }
}

/// The digest a task key names (see `Task::digest`).
pub(crate) fn content_digest(key: &str) -> &str {
    key.split_once('#').map_or(key, |(digest, _)| digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::test_host;
    use rand::SeedableRng;

    #[test]
    fn removing_a_peer_undoes_its_edges_and_load_and_keeps_the_index_right() {
        let mut st = SoftState::new(SmallRng::seed_from_u64(1));
        let (d, a, b, c): (Id, Id, Id, Id) = ("d".into(), "a".into(), "b".into(), "c".into());
        let mut add = |id: &Id| {
            let ix = st.hosts.insert(test_host(id));
            let id = st.host_id(id).expect("interned");
            st.add_peer(&d, &id, ix)
        };
        let (ia, ib, ic) = (add(&a), add(&b), add(&c));
        let SoftState { tasks, hosts, .. } = &mut st;
        let t = tasks.get_mut(&d).expect("task");
        t.link(hosts, ib, ia);
        t.link(hosts, ic, ia);
        t.link(hosts, ic, ib);
        assert_eq!((hosts["a"].children, hosts["b"].children), (2, 1));
        let (_, orphans) = t.remove_peer(hosts, "a").expect("peer");
        assert_eq!(orphans.len(), 2);
        assert_eq!(hosts["a"].children, 0);
        assert!(!hosts["a"].tasks.contains("d"));
        // c moved into a's slot; its remaining edge to b still unlinks cleanly.
        let ic = t.idx("c").expect("c");
        assert_eq!(t.peers[ic].parents, vec![b.clone()]);
        t.unlink_parents(hosts, ic);
        assert_eq!(hosts["b"].children, 0);
    }

    #[test]
    fn piece_count_rounds_up_and_needs_both_values() {
        assert_eq!(piece_count(10, 4), Some(3));
        assert_eq!(piece_count(8, 4), Some(2));
        assert_eq!((piece_count(0, 4), piece_count(8, 0)), (None, None));
    }
}
