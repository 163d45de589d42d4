//! The scheduler core, callable in-process: every RPC as a method, a handle per download.
//! The tonic service (`service.rs`) is a thin adapter over this.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use damselfly_proto::member::Owner;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::{check_entry, check_key};
use crate::config::SchedulerConfig;
use crate::decide::{parse_sha, pin_all, Env, SEED_WAIT};
use crate::download::{channel, check_digest, check_id, DownloadHandle, MAX_PIECES};
use crate::error::SchedulerError;
use crate::hosts::{Host, HostIx};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, SessionTx};
use crate::proto::{self, DownloadResponse, HoldTask, Register, SeedTask, TaskInfo};
use crate::select::location_labels;
use crate::state::{content_digest, piece_count, Id, PeerState, Sha, SoftState};
use crate::token;

/// Tasks one announcement may list.
const MAX_ANNOUNCED_TASKS: usize = 10_000;
/// Hosts one scheduler keeps; more are refused until some leave or expire.
const MAX_HOSTS: usize = 50_000;
/// Tasks one host may hold a peer in; announcements beyond it are ignored.
pub(crate) const MAX_HOST_TASKS: usize = 20_000;
/// Free-form host fields longer than this are refused.
const MAX_FIELD: usize = 1024;
/// Seed tasks queued for a seed that is not reading them.
const SEED_QUEUE: usize = 256;
/// Silent hosts are looked for at most this often.
const EXPIRY_EVERY: Duration = Duration::from_secs(5);

/// The scheduler: cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    config: SchedulerConfig,
    metrics: Metrics,
    /// One lock for all state (why: see `state.rs`); never held across an await.
    state: Mutex<SoftState>,
    /// Cancelled when the streams close for shutdown: session streams end then too.
    closing: CancellationToken,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let state = Mutex::new(SoftState::new(SmallRng::from_entropy()));
        let closing = CancellationToken::new();
        Scheduler { inner: Arc::new(Inner { config, metrics: Metrics::new(), state, closing }) }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SoftState> {
        // The state stays consistent between statements that could panic; keep serving.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut SoftState, &Env) -> R) -> R {
        self.with_at(Instant::now(), f)
    }

    fn with_at<R>(&self, now: Instant, f: impl FnOnce(&mut SoftState, &Env) -> R) -> R {
        let env = Env { cfg: &self.inner.config, metrics: &self.inner.metrics, now };
        let mut st = self.lock();
        let r = f(&mut st, &env);
        self.inner.metrics.sizes(st.hosts.len(), st.tasks.len(), st.peers, st.seeds.len());
        r
    }

    /// Adds or refreshes a host and the complete tasks it holds, for a caller without an
    /// owner token (in-process callers, tests).
    pub fn announce_host(
        &self,
        req: proto::AnnounceHostRequest,
    ) -> Result<proto::AnnounceHostResponse, SchedulerError> {
        self.announce_host_by(req, None)
    }

    /// Adds or refreshes a host for the node with `owner`: the first to announce an id owns
    /// it, and another owner is refused while the host is known.
    pub fn announce_host_by(
        &self,
        req: proto::AnnounceHostRequest,
        owner: Option<Owner>,
    ) -> Result<proto::AnnounceHostResponse, SchedulerError> {
        let host = req.host.ok_or_else(|| SchedulerError::invalid("host missing"))?;
        check_id("host id", &host.id)?;
        if [&host.ip, &host.idc, &host.location].iter().any(|f| f.len() > MAX_FIELD) {
            return Err(SchedulerError::invalid("host field too long"));
        }
        if req.tasks.len() > MAX_ANNOUNCED_TASKS {
            return Err(SchedulerError::invalid(format!("more than {MAX_ANNOUNCED_TASKS} tasks")));
        }
        let tasks = req.tasks.iter().map(parse_task).collect::<Result<Vec<_>, _>>()?;
        if req.cache_entries.len() > MAX_ANNOUNCED_TASKS {
            return Err(SchedulerError::invalid(format!("more than {MAX_ANNOUNCED_TASKS} cache entries")));
        }
        let listed: Option<crate::state::Set<String>> =
            req.all_cache_entries.then(|| req.cache_entries.iter().map(|e| e.key.clone()).collect());
        // Entries a bad one among them would refuse are left out, not the announcement.
        let entries: Vec<proto::CacheEntry> =
            req.cache_entries.into_iter().filter(|e| check_entry(e).is_ok()).collect();
        let key = token::upload_key(&self.inner.config.secret, &host.id);
        self.with(|st, env| {
            match st.hosts.get(&host.id) {
                Some(h) if !h.owned_by(owner.as_ref()) => return Err(SchedulerError::NotOwner(host.id.clone())),
                None if st.hosts.len() >= MAX_HOSTS => {
                    return Err(SchedulerError::Exhausted(format!("the scheduler holds {MAX_HOSTS} hosts")))
                }
                _ => {}
            }
            let (id, hix) = upsert_host(st, env, host, &key);
            if let Some(h) = st.hosts.at_mut(hix) {
                h.owner = h.owner.or(owner);
            }
            for (info, shas) in tasks {
                st.announce_task(env, &id, hix, info, &shas);
            }
            if let Some(listed) = &listed {
                st.cache_entries_of(&id, listed);
            }
            for entry in entries {
                // Another put named the key with other content first: that one stands.
                let _ = st.put_cache_entry(&id, entry);
            }
            Ok(())
        })?;
        let secs = self.inner.config.announce_interval.as_secs();
        Ok(proto::AnnounceHostResponse {
            upload_key: key.to_vec(),
            announce_interval_secs: u32::try_from(secs).unwrap_or(u32::MAX).max(1),
        })
    }

    /// Whether a caller with `owner` may act for `host_id`: the host is unknown, unowned, or
    /// its own.
    pub fn may_act_for(&self, host_id: &str, owner: Option<&Owner>) -> bool {
        self.lock().hosts.get(host_id).is_none_or(|h| h.owned_by(owner))
    }

    /// Whether `host_id` names a host that announced itself a seed.
    pub fn is_seed(&self, host_id: &str) -> bool {
        self.lock().hosts.get(host_id).is_some_and(|h| h.seed)
    }

    /// Opens a download: registers it, queues the first decision on the returned receiver.
    pub fn download(
        &self,
        reg: Register,
    ) -> Result<(DownloadHandle, mpsc::Receiver<DownloadResponse>), SchedulerError> {
        let (tx, rx) = channel();
        let handle = self.register(reg, Outbox::Stream(tx))?;
        Ok((handle, rx))
    }

    /// Opens download `id` of a host's session: its responses go to `to`, tagged with `id`.
    pub fn download_in_session(
        &self,
        reg: Register,
        to: &SessionTx,
        id: u64,
    ) -> Result<DownloadHandle, SchedulerError> {
        self.register(reg, Outbox::session(to, id))
    }

    fn register(&self, reg: Register, outbox: Outbox) -> Result<DownloadHandle, SchedulerError> {
        let (digest, host, gen) = self.with(|st, env| st.register(env, &reg, outbox))?;
        Ok(DownloadHandle { sched: self.clone(), digest, host, gen, ended: false, quiet: false })
    }

    /// Cancelled once the streams close for shutdown.
    pub fn closing(&self) -> CancellationToken {
        self.inner.closing.clone()
    }

    pub fn stat_task(&self, req: &proto::StatTaskRequest) -> Result<proto::StatTaskResponse, SchedulerError> {
        check_id("digest", &req.digest)?;
        let st = self.lock();
        let Some(task) = st.tasks.get(req.digest.as_str()) else { return Ok(proto::StatTaskResponse::default()) };
        let count = task.piece_count();
        let peers = task.peers.iter().map(|p| proto::PeerStat {
            host_id: String::from(&*p.host),
            pieces: p.held_count(count),
            finished: p.state == PeerState::Finished,
        });
        Ok(proto::StatTaskResponse {
            known: true,
            length: task.length,
            piece_size: task.piece_size,
            piece_count: count.unwrap_or(0),
            peers: peers.collect(),
            quarantined: task.quarantined.is_some(),
        })
    }

    pub fn withdraw_task(&self, req: &proto::WithdrawTaskRequest) -> Result<(), SchedulerError> {
        check_id("host id", &req.host_id)?;
        check_id("digest", &req.digest)?;
        self.with(|st, env| {
            // The host's peer of the digest, under whichever length it registered.
            let keys: Vec<Id> = st.hosts.get(&req.host_id).map_or_else(Vec::new, |h| {
                h.tasks.iter().filter(|k| content_digest(k) == req.digest).cloned().collect()
            });
            for key in keys {
                st.drop_peer(env, &key, &req.host_id);
            }
        });
        Ok(())
    }

    pub fn leave_host(&self, req: &proto::LeaveHostRequest) -> Result<(), SchedulerError> {
        check_id("host id", &req.host_id)?;
        self.with(|st, env| st.leave_host(env, &req.host_id));
        Ok(())
    }

    /// Forgets a task; its open download streams end.
    pub fn delete_task(&self, req: &proto::DeleteTaskRequest) -> Result<(), SchedulerError> {
        check_id("digest", &req.digest)?;
        self.with(|st, _| {
            let SoftState { tasks, hosts, .. } = st;
            let Some(mut task) = tasks.remove(req.digest.as_str()) else { return };
            for i in 0..task.peers.len() {
                task.unlink_parents(hosts, i);
                if let Some(h) = hosts.get_mut(&task.peers[i].host) {
                    h.tasks.remove(&task.digest);
                }
            }
            st.peers -= task.peers.len();
        });
        Ok(())
    }

    /// Opens the stream of tasks a seed host is asked to fetch from the origin.
    pub fn seed_tasks(&self, req: &proto::SeedTasksRequest) -> Result<TaskSubscription<SeedTask>, SchedulerError> {
        check_id("host id", &req.host_id)?;
        let (tx, rx) = mpsc::channel(SEED_QUEUE);
        let (host, gen) = self.open_stream(&req.host_id, TaskStream::Seed, |h, gen| h.seed_stream = Some((gen, tx)))?;
        Ok(TaskSubscription { rx, sched: self.clone(), host, gen, kind: TaskStream::Seed })
    }

    /// Opens the stream of what preheats and the P2P cache ask a host to hold (or drop).
    pub fn preheat_tasks(
        &self,
        req: &proto::PreheatTasksRequest,
    ) -> Result<TaskSubscription<HoldTask>, SchedulerError> {
        check_id("host id", &req.host_id)?;
        let (tx, rx) = mpsc::channel(SEED_QUEUE);
        let (host, gen) =
            self.open_stream(&req.host_id, TaskStream::Preheat, |h, gen| h.preheat_stream = Some((gen, tx)))?;
        Ok(TaskSubscription { rx, sched: self.clone(), host, gen, kind: TaskStream::Preheat })
    }

    fn open_stream(
        &self,
        host_id: &str,
        kind: TaskStream,
        set: impl FnOnce(&mut Host, u64),
    ) -> Result<(Id, u64), SchedulerError> {
        self.with(|st, env| {
            if st.shut {
                return Err(SchedulerError::ShuttingDown);
            }
            let gen = st.next_gen;
            st.next_gen += 1;
            let h =
                match kind {
                    TaskStream::Seed => st.hosts.get_mut(host_id).filter(|h| h.seed).ok_or_else(|| {
                        SchedulerError::precondition("not a seed host; announce with seed=true first")
                    })?,
                    TaskStream::Preheat => st
                        .hosts
                        .get_mut(host_id)
                        .ok_or_else(|| SchedulerError::precondition("unknown host; announce it first"))?,
                };
            set(h, gen);
            h.last_seen = env.now;
            let id = h.id.clone();
            if kind == TaskStream::Seed {
                st.seeds.insert(id.clone());
            }
            Ok((id, gen))
        })
    }

    /// `req.host_id` keeps a P2P cache entry.
    pub fn put_cache_entry(&self, req: proto::PutCacheEntryRequest) -> Result<(), SchedulerError> {
        check_id("host id", &req.host_id)?;
        let entry = req.entry.ok_or_else(|| SchedulerError::invalid("cache entry missing"))?;
        check_entry(&entry)?;
        self.with(|st, env| {
            let host = st
                .host_id(&req.host_id)
                .ok_or_else(|| SchedulerError::precondition("unknown host; announce it first"))?;
            st.put_cache_entry(&host, entry)?;
            st.place_replicas(env.now, false);
            Ok(())
        })
    }

    /// What a P2P cache key names, and who keeps it.
    pub fn stat_cache_entry(
        &self,
        req: &proto::StatCacheEntryRequest,
    ) -> Result<proto::StatCacheEntryResponse, SchedulerError> {
        check_key(&req.key)?;
        let stat = self.lock().stat_cache_entry(&req.key);
        Ok(stat.map_or_else(Default::default, |s| proto::StatCacheEntryResponse {
            entry: Some(s.entry),
            holders: s.holders,
        }))
    }

    /// A seed could not fetch a file it was asked for.
    pub fn failed_url_task(&self, req: &proto::FailedUrlTaskRequest) -> Result<(), SchedulerError> {
        check_id("host id", &req.host_id)?;
        check_key(&req.key)?;
        self.with(|st, env| st.failed_url_task(&req.host_id, &req.key, &req.reason, env.now));
        Ok(())
    }

    /// A host no longer keeps a P2P cache entry, or (`everywhere`) nobody may.
    pub fn drop_cache_entry(&self, req: &proto::DropCacheEntryRequest) -> Result<(), SchedulerError> {
        check_id("host id", &req.host_id)?;
        check_key(&req.key)?;
        self.with(|st, env| st.drop_cache_entry(&req.host_id, &req.key, req.everywhere, env.now));
        Ok(())
    }

    /// Drops hosts silent for three announce intervals with no stream open, with their peers.
    pub fn expire(&self, now: Instant) {
        self.with_at(now, |st, env| {
            let interval = env.cfg.announce_interval;
            let dead: Vec<Id> = st.hosts.values().filter(|h| !h.alive(now, interval)).map(|h| h.id.clone()).collect();
            for id in dead {
                tracing::info!(host = %id, "host expired");
                st.leave_host(env, &id);
            }
        });
    }

    /// Periodic upkeep: gives up on seeds that did not come, expires silent hosts.
    pub fn tick(&self, now: Instant) {
        let expire = self.with_at(now, |st, env| {
            while let Some((at, digest, seed)) = st.seed_waits.front().cloned() {
                if now.saturating_duration_since(at) < SEED_WAIT {
                    break;
                }
                st.seed_waits.pop_front();
                st.seed_gone(env, &digest, &seed, at);
            }
            let due = st.next_expiry.is_none_or(|t| now >= t);
            if due {
                st.next_expiry = Some(now + EXPIRY_EVERY.min(env.cfg.announce_interval));
            }
            due
        });
        if expire {
            self.expire(now);
        }
        self.with_at(now, |st, _| st.place_replicas(now, true));
    }

    /// Ends every stream (downloads and seeds) and refuses new ones: for shutdown.
    pub fn close_streams(&self) {
        self.inner.closing.cancel();
        self.with(|st, _| {
            st.shut = true;
            for task in st.tasks.values_mut() {
                for p in &mut task.peers {
                    p.tx = None;
                }
            }
            for h in st.hosts.values_mut() {
                h.seed_stream = None;
                h.preheat_stream = None;
            }
            st.seeds.clear();
        });
    }

    fn stream_closed(&self, kind: TaskStream, host: &Id, gen: u64) {
        self.with(|st, env| {
            let Some(h) = st.hosts.get_mut(host) else { return };
            if !kind.close(h, gen) {
                return;
            }
            h.last_seen = env.now;
            if kind == TaskStream::Seed {
                st.seeds.remove(host);
                st.seed_ended(env, host);
            }
        });
    }
}

impl SoftState {
    fn announce_task(&mut self, env: &Env, host: &Id, hix: HostIx, info: &TaskInfo, shas: &[Sha]) {
        let existing = self.tasks.get_key_value(info.digest.as_str());
        let (length, piece_size) = existing.map_or((0, 0), |(_, t)| (t.length, t.piece_size));
        let conflict = |a: u64, b: u64| a != 0 && b != 0 && a != b;
        if conflict(length, info.length) || conflict(piece_size, info.piece_size) {
            // Its pieces are numbered differently from everyone else's: not a usable parent.
            tracing::debug!(%host, digest = %info.digest, "announced task has another length or piece size; ignored");
            return;
        }
        let (length, piece_size) = (length.max(info.length), piece_size.max(info.piece_size));
        let count = piece_count(length, piece_size);
        if count.is_some_and(|c| c > MAX_PIECES) {
            return;
        }
        let full = self
            .hosts
            .at(hix)
            .is_some_and(|h| h.tasks.len() >= MAX_HOST_TASKS && !h.tasks.contains(info.digest.as_str()));
        if full {
            tracing::debug!(%host, digest = %info.digest, "host holds {MAX_HOST_TASKS} tasks here; announced task ignored");
            return;
        }
        let digest: Id = existing.map_or_else(|| info.digest.as_str().into(), |(k, _)| k.clone());
        let i = self.add_peer(&digest, host, hix);
        let SoftState { tasks, hosts, .. } = self;
        let Some(task) = tasks.get_mut(&digest) else { return };
        (task.length, task.piece_size) = (length, piece_size);
        if task.peers[i].state != PeerState::Finished {
            task.unlink_parents(hosts, i);
            task.release_slot(i);
            // The peer state first: filling pieces first would hide that a new candidate appeared.
            task.set_state(i, PeerState::Finished);
            if let Some(c) = count {
                task.peers[i].pieces.fill(c);
            }
        }
        if !shas.is_empty() {
            if count == Some(shas.len() as u32) {
                pin_all(task, hosts, shas, host);
            } else {
                tracing::debug!(%host, %digest, "announced digest list does not cover the task; not pinned");
            }
        }
        self.settle(env, &digest);
    }

    pub(crate) fn leave_host(&mut self, env: &Env, host: &str) {
        // Not a seed candidate while its children are decided again.
        self.seeds.remove(host);
        let Some(h) = self.hosts.get_mut(host) else { return };
        h.seed_stream = None;
        h.preheat_stream = None;
        let tasks: Vec<Id> = h.tasks.iter().cloned().collect();
        for digest in tasks {
            self.drop_peer(env, &digest, host);
        }
        self.hosts.remove(host);
        self.cache_host_left(host);
        self.seed_ended(env, host);
    }

    /// A seed's stream ended: downloads waiting for it to fetch their task stop waiting.
    fn seed_ended(&mut self, env: &Env, seed: &str) {
        let pending: Vec<_> = self.seed_waits.iter().filter(|(_, _, s)| &**s == seed).cloned().collect();
        for (at, digest, seed) in pending {
            self.seed_gone(env, &digest, &seed, at);
        }
    }

    /// The seed triggered for `digest` at `at` will not come: its waiters are decided again.
    fn seed_gone(&mut self, env: &Env, digest: &Id, seed: &Id, at: Instant) {
        let Some(task) = self.tasks.get_mut(digest) else { return };
        let Some(t) = task.seed.as_mut().filter(|t| &t.host == seed && t.at == at && !t.settled) else { return };
        t.settled = true;
        task.wake = true;
        self.settle(env, digest);
    }
}

fn upsert_host(st: &mut SoftState, env: &Env, h: proto::Host, key: &[u8; token::KEY_LEN]) -> (Id, HostIx) {
    let location = location_labels(&h.location);
    if let Some((id, ix)) = st.hosts.ix(&h.id) {
        if let Some(host) = st.hosts.at_mut(ix) {
            (host.ip, host.port, host.idc, host.location) = (h.ip, h.upload_port, h.idc, location);
            (host.slots, host.seed, host.last_seen) = (h.upload_slots, h.seed, env.now);
            host.peer_tls = h.peer_tls;
            host.served = served(h.served);
            if !host.seed && host.seed_stream.take().is_some() {
                st.seeds.remove(&id);
            }
        }
        return (id, ix);
    }
    let id: Id = h.id.as_str().into();
    let ix = st.hosts.insert(Host {
        ip: h.ip,
        port: h.upload_port,
        idc: h.idc,
        location,
        slots: h.upload_slots,
        seed: h.seed,
        peer_tls: h.peer_tls,
        served: served(h.served),
        ..Host::new(id.clone(), token::Minter::new(key), env.now)
    });
    (id, ix)
}

fn served(s: Option<proto::ServedBytes>) -> [u64; 3] {
    s.map_or([0; 3], |s| [s.origin, s.peer, s.cache])
}

fn parse_task(t: &TaskInfo) -> Result<(&TaskInfo, Vec<Sha>), SchedulerError> {
    check_digest(&t.digest)?;
    if t.piece_sha256.len() > MAX_PIECES as usize {
        return Err(SchedulerError::invalid(format!("more than {MAX_PIECES} piece digests")));
    }
    let shas = t.piece_sha256.iter().map(|s| parse_sha(s)).collect::<Option<Vec<_>>>();
    Ok((t, shas.ok_or_else(|| SchedulerError::invalid(format!("bad piece sha256 in {}", t.digest)))?))
}

/// Which of a host's task streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskStream {
    /// A seed's: fetch from the origin for the cluster.
    Seed,
    /// Any member's: hold a preheated task.
    Preheat,
}

impl TaskStream {
    /// Closes the host's stream of this kind if it is the one opened as `gen`.
    fn close(self, h: &mut Host, gen: u64) -> bool {
        let open = match self {
            TaskStream::Seed => h.seed_stream.as_ref().map(|(g, _)| *g),
            TaskStream::Preheat => h.preheat_stream.as_ref().map(|(g, _)| *g),
        };
        if open != Some(gen) {
            return false;
        }
        match self {
            TaskStream::Seed => h.seed_stream = None,
            TaskStream::Preheat => h.preheat_stream = None,
        }
        true
    }
}

/// What a host is asked to do on one of its task streams. Dropping it closes the stream.
pub struct TaskSubscription<T> {
    rx: mpsc::Receiver<T>,
    sched: Scheduler,
    host: Id,
    gen: u64,
    kind: TaskStream,
}

impl<T> TaskSubscription<T> {
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }
}

impl<T> futures_util::Stream for TaskSubscription<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl<T> Drop for TaskSubscription<T> {
    fn drop(&mut self) {
        self.sched.stream_closed(self.kind, &self.host, self.gen);
    }
}
