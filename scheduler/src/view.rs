//! What the control plane (preheat jobs, the console) reads of the soft state, and what it may
//! ask of it: that a seed fetch a task from the origin, or that a node hold one. Views are
//! snapshots taken under the lock and handed out as plain values, so nothing above holds it.

use std::time::Instant;

use crate::cache::UrlFailure;
use crate::proto::{hold_task, CacheEntry, SeedTask, UrlTask};
use crate::scheduler::Scheduler;
use crate::state::PeerState;

/// A host as the console and the preheat runner see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostView {
    pub id: String,
    pub ip: String,
    pub upload_port: u32,
    pub idc: String,
    /// `region|zone|rack`.
    pub location: String,
    /// Announced itself a seed.
    pub seed: bool,
    /// Has a seed stream open here: it can be asked to fetch from the origin.
    pub seeding: bool,
    /// Has a preheat stream open here: it can be asked to hold a task.
    pub preheating: bool,
    /// Children its peers serve now, and its upload slots.
    pub load: u32,
    pub slots: u32,
    /// Tasks it has a peer in.
    pub tasks: usize,
    pub last_seen_secs: u64,
    /// Bytes it says it sent its clients: from the origin, from peers, from its cache.
    pub served_origin: u64,
    pub served_peer: u64,
    pub served_cache: u64,
}

/// A task as the console sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TaskView {
    pub digest: String,
    pub length: u64,
    pub piece_count: u32,
    /// Peers that hold it whole and verified.
    pub holders: usize,
    /// Peers registered for it, holders included.
    pub peers: usize,
    /// Peers fetching it from the origin now.
    pub origin_fetchers: usize,
    /// Peers ever sent to the origin for it.
    pub origin_fetches: u32,
}

/// Who holds a blob: the peers of the task of that digest and length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    /// Each peer's host, the pieces it holds, and whether it finished (verified) the task.
    pub peers: Vec<(String, u32, bool)>,
    pub piece_count: u32,
    /// Why the task is quarantined, if it is.
    pub quarantined: Option<String>,
}

impl Scheduler {
    /// The peers of the task of `digest` with `length`: the digest's task, or the task apart
    /// that downloads of this length joined when a member registered the digest with another
    /// length first (`download.rs`, `task_key`).
    pub fn holding(&self, digest: &str, length: u64) -> Holding {
        let st = self.lock();
        let apart = format!("{digest}#{length}");
        let main = st.tasks.get(digest).filter(|t| t.length == 0 || length == 0 || t.length == length);
        let Some(task) = main.or_else(|| st.tasks.get(apart.as_str())) else { return Holding::default() };
        let count = task.piece_count();
        Holding {
            peers: task
                .peers
                .iter()
                .map(|p| (String::from(&*p.host), p.held_count(count), p.state == PeerState::Finished))
                .collect(),
            piece_count: count.unwrap_or(0),
            quarantined: task.quarantined.clone(),
        }
    }

    /// Every host this scheduler knows, by id.
    pub fn hosts_view(&self) -> Vec<HostView> {
        let now = Instant::now();
        let st = self.lock();
        let mut hosts: Vec<HostView> = st
            .hosts
            .values()
            .map(|h| HostView {
                id: String::from(&*h.id),
                ip: h.ip.clone(),
                upload_port: h.port,
                idc: h.idc.clone(),
                location: h.location.join("|"),
                seed: h.seed,
                seeding: h.seed_stream.as_ref().is_some_and(|(_, tx)| !tx.is_closed()),
                preheating: h.preheat_stream.as_ref().is_some_and(|(_, tx)| !tx.is_closed()),
                load: h.children,
                slots: h.slots(),
                tasks: h.tasks.len(),
                last_seen_secs: now.saturating_duration_since(h.last_seen).as_secs(),
                served_origin: h.served[0],
                served_peer: h.served[1],
                served_cache: h.served[2],
            })
            .collect();
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        hosts
    }

    /// Up to `limit` tasks, those with the most peers first.
    pub fn tasks_view(&self, limit: usize) -> Vec<TaskView> {
        // Copied out under the lock, sorted after it.
        let mut tasks: Vec<TaskView> = self
            .lock()
            .tasks
            .values()
            .map(|t| TaskView {
                digest: String::from(&*t.digest),
                length: t.length,
                piece_count: t.piece_count().unwrap_or(0),
                holders: t.peers.iter().filter(|p| p.state == PeerState::Finished).count(),
                peers: t.peers.len(),
                origin_fetchers: t.origin_fetchers,
                origin_fetches: t.origin_grants,
            })
            .collect();
        tasks.sort_by(|a, b| b.peers.cmp(&a.peers).then_with(|| a.digest.cmp(&b.digest)));
        tasks.truncate(limit);
        tasks
    }

    /// Asks seed `host` to fetch `task` from its origin, as the scheduler does when a download
    /// waits for a seed. False when the host has no open seed stream here or its queue is full.
    pub fn ask_seed(&self, host: &str, task: SeedTask) -> bool {
        let st = self.lock();
        let Some((_, tx)) = st.hosts.get(host).filter(|h| h.seed).and_then(|h| h.seed_stream.as_ref()) else {
            return false;
        };
        tx.try_send(task).is_ok()
    }

    /// Asks `host` to hold `task`, fetching it as for a client (from peers first). False when
    /// the host has no open preheat stream here or its queue is full.
    pub fn ask_to_hold(&self, host: &str, task: SeedTask) -> bool {
        self.lock().ask_host(host, hold_task::Kind::Fetch(task))
    }

    /// Asks `host` to fetch a file at a plain URL from its origin into its P2P cache (a seed,
    /// for a preheat). False when the host has no open preheat stream here or its queue is full.
    pub fn ask_to_fetch_url(&self, host: &str, task: UrlTask) -> bool {
        self.lock().ask_to_fetch_url(host, task, Instant::now())
    }

    /// What the seed asked to fetch the file named `key` reported of its failure, if it did.
    pub fn url_failure(&self, key: &str) -> Option<UrlFailure> {
        self.lock().url_failure(key)
    }

    /// Asks `host` to keep a replica of a P2P cache entry, from its peers.
    pub fn ask_to_keep(&self, host: &str, entry: CacheEntry) -> bool {
        self.lock().ask_host(host, hold_task::Kind::Keep(entry))
    }

    /// The P2P cache entry under `key`, and the hosts here that keep it.
    pub fn cache_entry(&self, key: &str) -> Option<(CacheEntry, Vec<String>)> {
        self.lock().stat_cache_entry(key).map(|s| (s.entry, s.holders))
    }
}
