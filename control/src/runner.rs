//! Runs preheat jobs: claims those no live runner holds, resolves each to its blobs, asks the
//! peers in scope to fetch them, and watches the scheduler's state until every peer in scope
//! holds every blob whole and verified (`SUCCESS`), or the job's time runs out (`FAILURE`).
//! Progress goes to the store as it changes, so any scheduler sharing the store answers polls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use damselfly_mirror::upstream::Upstream;
use damselfly_proto::v1::{CacheEntry, SeedTask, Source, UrlTask};
use damselfly_scheduler::{Holding, HostView, Scheduler, UrlFailure};
use sha2::{Digest as _, Sha256};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::job::{BlobProgress, Job, JobState, PeerResult, Scope, MAX_BLOBS, MAX_CONCURRENCY};
use crate::resolve::{authorization, plain_file, resolve, ImageRef};
use crate::store::{now_ms, Claim, JobStore, StoreError};

/// How often the runner looks for jobs and at its jobs' peers.
const TICK: Duration = Duration::from_secs(1);
/// Jobs one scheduler runs at once.
const MAX_RUNNING: usize = 16;
/// A peer asked for a blob it does not hold after this long is asked again (its seed stream
/// may have been full, or it restarted).
const ASK_AGAIN: Duration = Duration::from_secs(20);
/// How long a job waits for a peer in scope to appear before it fails.
const NO_PEER_GRACE: Duration = Duration::from_secs(30);
/// Ended jobs are kept this long, then forgotten.
pub const RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often ended jobs past [`RETAIN`] are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What the runner reads of the cluster and asks of it; the scheduler in production, a fake in
/// unit tests.
pub trait Cluster: Send + Sync + 'static {
    fn hosts(&self) -> Vec<HostView>;
    /// Who holds the blob of `digest` and `length`.
    fn holding(&self, digest: &str, length: u64) -> Holding;
    /// Asks a seed to fetch from the origin (the seed scopes).
    fn ask_seed(&self, host: &str, task: SeedTask) -> bool;
    /// Asks any node to hold a task, from its peers first (`all_peers`).
    fn ask_to_hold(&self, host: &str, task: SeedTask) -> bool;
    /// Asks a seed to fetch a file at a plain URL into its P2P cache.
    fn ask_to_fetch_url(&self, host: &str, task: UrlTask) -> bool;
    /// Asks any node to keep a replica of a P2P cache entry, from its peers.
    fn ask_to_keep(&self, host: &str, entry: CacheEntry) -> bool;
    /// The P2P cache entry under `key`, and the hosts that keep it.
    fn cache_entry(&self, key: &str) -> Option<(CacheEntry, Vec<String>)>;
    /// What the seed asked to fetch the file named `key` said of its failure.
    fn url_failure(&self, key: &str) -> Option<UrlFailure>;
}

impl Cluster for Scheduler {
    fn hosts(&self) -> Vec<HostView> {
        self.hosts_view()
    }

    fn holding(&self, digest: &str, length: u64) -> Holding {
        Scheduler::holding(self, digest, length)
    }

    fn ask_seed(&self, host: &str, task: SeedTask) -> bool {
        Scheduler::ask_seed(self, host, task)
    }

    fn ask_to_hold(&self, host: &str, task: SeedTask) -> bool {
        Scheduler::ask_to_hold(self, host, task)
    }

    fn ask_to_fetch_url(&self, host: &str, task: UrlTask) -> bool {
        Scheduler::ask_to_fetch_url(self, host, task)
    }

    fn ask_to_keep(&self, host: &str, entry: CacheEntry) -> bool {
        Scheduler::ask_to_keep(self, host, entry)
    }

    fn cache_entry(&self, key: &str) -> Option<(CacheEntry, Vec<String>)> {
        Scheduler::cache_entry(self, key)
    }

    fn url_failure(&self, key: &str) -> Option<UrlFailure> {
        Scheduler::url_failure(self, key)
    }
}

#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    store: JobStore,
    cluster: Arc<dyn Cluster>,
    upstream: Arc<Upstream>,
    /// This runner's name in the store's claims: unique per process start.
    name: String,
    lease: Duration,
    /// Whether a job's `Authorization` may go to seeds (only over a gRPC port that requires
    /// client certificates, as for credentials nodes share).
    forward_credentials: bool,
    /// How long a preheated file is kept in the nodes' P2P caches.
    file_ttl: Duration,
}

impl Runner {
    /// `place` names where this runner runs (the scheduler's HTTP address) in the claims it
    /// makes, so a job's record says which scheduler runs it.
    pub fn new(
        store: JobStore,
        cluster: Arc<dyn Cluster>,
        upstream: Arc<Upstream>,
        place: &str,
        lease: Duration,
        forward_credentials: bool,
        file_ttl: Duration,
    ) -> Runner {
        let name = format!("{place}#{:08x}", rand::random::<u32>());
        Runner { inner: Arc::new(Inner { store, cluster, upstream, name, lease, forward_credentials, file_ttl }) }
    }

    /// Claims and runs jobs until `shutdown`. Jobs still running then are released for any
    /// scheduler to resume.
    pub async fn run(self, shutdown: CancellationToken) {
        // The jobs this runner holds; a claim is refused for a job whose lease is live, so a
        // job it holds is never claimed twice here.
        let mut running: JoinSet<()> = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pruned: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            while running.try_join_next().is_some() {}
            if pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                pruned = Some(Instant::now());
                let before = now_ms().saturating_sub(i64::try_from(RETAIN.as_millis()).unwrap_or(i64::MAX));
                match self.inner.store.prune(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "forgot preheat jobs that ended over a week ago"),
                    Err(e) => tracing::warn!(error = %e, "cannot forget old preheat jobs"),
                }
            }
            let free = MAX_RUNNING.saturating_sub(running.len());
            if free == 0 {
                continue;
            }
            let ids = match self.inner.store.claimable(free as u32).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for preheat jobs");
                    continue;
                }
            };
            for id in ids {
                match self.inner.store.claim(id, &self.inner.name, self.inner.lease).await {
                    Ok(Some(claim)) => {
                        let job = JobRun { runner: self.inner.clone(), claim, shutdown: shutdown.clone() };
                        running.spawn(job.run());
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(job = %id, error = %e, "cannot claim a preheat job"),
                }
            }
        }
        while running.join_next().await.is_some() {}
    }
}

struct JobRun {
    runner: Arc<Inner>,
    claim: Claim,
    /// Cancelled when this scheduler shuts down.
    shutdown: CancellationToken,
}

/// How a job ended, if it did.
enum Outcome {
    Done(JobState, String, Vec<PeerResult>),
    /// This scheduler shuts down: the job is released for any scheduler to resume.
    Released,
    /// The lease went to another runner, or the store failed: the job is left to whoever
    /// claims it after the lease.
    Left,
}

impl JobRun {
    async fn run(self) {
        let id = self.claim.id;
        tracing::info!(job = %id, "preheat job claimed");
        // Renewed beside the run, so a slow registry (resolving) cannot let the lease lapse under
        // a live runner; losing it stops this run.
        let outcome = tokio::select! {
            () = renew(&self.runner, &self.claim) => Ok(Outcome::Left),
            outcome = self.drive() => outcome,
        };
        let outcome = outcome.unwrap_or_else(|e| {
            tracing::warn!(job = %id, error = %e, "preheat job left for the next claim after its lease");
            Outcome::Left
        });
        let store = &self.runner.store;
        match outcome {
            Outcome::Done(state, error, peers) => match store.finish(&self.claim, state, &error, &peers).await {
                Ok(true) => tracing::info!(job = %id, state = state.as_str(), error = %error, "preheat job ended"),
                Ok(false) => tracing::info!(job = %id, "preheat job was taken over before it ended here"),
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot record the end of a preheat job"),
            },
            Outcome::Released => {
                let _ = store.release(&self.claim).await;
            }
            Outcome::Left => {}
        }
    }

    async fn drive(&self) -> Result<Outcome, StoreError> {
        let store = &self.runner.store;
        let Some(job) = store.get(self.claim.id).await? else { return Ok(Outcome::Left) };
        let (started_ms, resolved) = store.run_state(&self.claim).await?;
        let deadline_ms = started_ms.saturating_add(i64::try_from(job.spec.timeout.as_millis()).unwrap_or(i64::MAX));
        // Checked first: a job that cannot get further (its store writes fail, its runners
        // keep dying) still ends.
        if now_ms() >= deadline_ms {
            return Ok(fail(&format!("timed out after {} s", job.spec.timeout.as_secs())));
        }
        match plain_file(&job.spec.url, job.spec.target) {
            Ok(Some(url)) => return self.drive_file(&job, &url, deadline_ms).await,
            Ok(None) => {}
            Err(e) => return Ok(fail(&reason(&e))),
        }
        let image = match ImageRef::parse(&job.spec.url, job.spec.target, &self.runner.upstream) {
            Ok(image) => image,
            Err(e) => return Ok(fail(&reason(&e))),
        };
        if !resolved {
            let auth = authorization(&job.spec.headers);
            let found = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Outcome::Released),
                found = resolve(&self.runner.upstream, &image, job.spec.target, auth, &job.spec.platforms) => found,
            };
            match found {
                Ok(blobs) if blobs.is_empty() => return Ok(fail("the image has no blobs")),
                Ok(blobs) if blobs.len() > MAX_BLOBS => {
                    return Ok(fail(&format!(
                        "the image has {} blobs; a preheat takes at most {MAX_BLOBS}",
                        blobs.len()
                    )))
                }
                Ok(blobs) => {
                    if !store.set_blobs(&self.claim, &blobs).await? {
                        return Ok(Outcome::Left);
                    }
                }
                Err(e) => return Ok(fail(&reason(&e))),
            }
        }
        let mut blobs = store.blobs(self.claim.id).await?;
        if blobs.is_empty() {
            return Ok(fail("the job's blobs were not recorded"));
        }
        self.watch(&job, &image, &mut blobs, deadline_ms).await
    }

    /// Asks the peers in scope for the blobs and waits until they hold them all.
    async fn watch(
        &self,
        job: &Job,
        image: &ImageRef,
        blobs: &mut [BlobProgress],
        deadline_ms: i64,
    ) -> Result<Outcome, StoreError> {
        let store = &self.runner.store;
        let cluster = &self.runner.cluster;
        let source = Source {
            registry: image.registry_url(),
            repository: image.repository.clone(),
            insecure: image.insecure(),
            credential: String::new(),
        };
        // The registry credential goes to seeds only, and only over mutual TLS: an ordinary
        // node asked to hold a blob takes it from peers, or from the origin anonymously.
        let seed_source = Source {
            credential: match self.runner.forward_credentials {
                true => authorization(&job.spec.headers)
                    .and_then(|v| v.to_str().ok().map(str::to_owned))
                    .unwrap_or_default(),
                false => String::new(),
            },
            ..source.clone()
        };
        let concurrency = job.spec.concurrency.clamp(1, MAX_CONCURRENCY) as usize;
        let mut asked: HashMap<(usize, String), Instant> = HashMap::new();
        let mut no_peer_since: Option<Instant> = None;
        // The peers in scope, chosen once they are there: all seeds or all nodes are those of
        // that moment (one that leaves afterwards fails the job at its timeout, named); the one
        // seed is chosen again if it leaves.
        let mut targets: Vec<HostView> = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Outcome::Released),
                _ = tick.tick() => {}
            }
            let hosts = cluster.hosts();
            let single_gone = job.spec.scope == Scope::SingleSeedPeer
                && targets.first().is_some_and(|t| !hosts.iter().any(|h| h.id == t.id && h.seeding));
            if targets.is_empty() || single_gone {
                targets = peers_in_scope(&hosts, job.spec.scope, &job.spec.url);
            }
            if targets.is_empty() {
                let since = *no_peer_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= NO_PEER_GRACE {
                    let why = match job.spec.scope {
                        Scope::AllPeers => "no node is connected to this scheduler",
                        Scope::SingleSeedPeer | Scope::AllSeedPeers => "no seed peer is connected to this scheduler",
                    };
                    return Ok(fail(why));
                }
                continue;
            }
            no_peer_since = None;
            let mut in_flight = 0;
            for (i, blob) in blobs.iter_mut().enumerate() {
                let Holding { peers, piece_count, quarantined } = cluster.holding(&blob.digest, blob.length);
                let mut next = blob.clone();
                next.wanted = targets.len() as u32;
                next.piece_count = piece_count;
                // Shown while it lasts; the peers fetch it again from the origin meanwhile.
                next.error = quarantined.map(|why| format!("quarantined by the scheduler: {why}")).unwrap_or_default();
                next.holders = targets
                    .iter()
                    .filter(|t| peers.iter().any(|(h, _, fin)| *fin && h == &t.id))
                    .map(|t| t.id.clone())
                    .collect();
                next.pieces_held = peers
                    .iter()
                    .filter(|(h, _, _)| targets.iter().any(|t| &t.id == h))
                    .map(|(_, n, _)| u64::from(*n))
                    .sum();
                if next != *blob {
                    store.set_progress(&self.claim, &next).await?;
                    *blob = next;
                }
                if blob.is_held() {
                    continue;
                }
                in_flight += 1;
                if in_flight > concurrency {
                    continue;
                }
                for t in targets.iter().filter(|t| !blob.holders.contains(&t.id)) {
                    let due = asked.get(&(i, t.id.clone())).is_none_or(|at| at.elapsed() >= ASK_AGAIN);
                    if !due {
                        continue;
                    }
                    let task = |source: &Source| SeedTask {
                        digest: blob.digest.clone(),
                        length: blob.length,
                        source: Some(source.clone()),
                    };
                    let sent = match job.spec.scope {
                        Scope::AllPeers => cluster.ask_to_hold(&t.id, task(&source)),
                        Scope::SingleSeedPeer | Scope::AllSeedPeers => cluster.ask_seed(&t.id, task(&seed_source)),
                    };
                    if sent {
                        asked.insert((i, t.id.clone()), Instant::now());
                    }
                }
            }
            if blobs.iter().all(BlobProgress::is_held) {
                let peers = targets.iter().map(|t| PeerResult {
                    host_id: t.id.clone(),
                    ip: t.ip.clone(),
                    description: String::new(),
                });
                return Ok(Outcome::Done(JobState::Success, String::new(), peers.collect()));
            }
            if now_ms() >= deadline_ms {
                return self.timed_out(job, blobs, &targets).await;
            }
        }
    }

    async fn timed_out(
        &self,
        job: &Job,
        blobs: &mut [BlobProgress],
        targets: &[HostView],
    ) -> Result<Outcome, StoreError> {
        let missing = blobs.iter().filter(|b| !b.is_held()).count();
        for blob in blobs.iter_mut().filter(|b| !b.is_held()) {
            let held = format!("held by {} of {} peers when the job timed out", blob.holders.len(), blob.wanted);
            blob.error = match blob.error.is_empty() {
                true => held,
                false => format!("{}; {held}", blob.error),
            };
            self.runner.store.set_progress(&self.claim, blob).await?;
        }
        let peers = targets.iter().map(|t| {
            let lacking = blobs.iter().filter(|b| !b.holders.contains(&t.id)).count();
            let description = match lacking {
                0 => String::new(),
                n => format!("{n} of {} blobs not held", blobs.len()),
            };
            PeerResult { host_id: t.id.clone(), ip: t.ip.clone(), description }
        });
        let why = format!(
            "timed out after {} s: {missing} of {} blobs not yet held by every peer in scope",
            job.spec.timeout.as_secs(),
            blobs.len()
        );
        Ok(Outcome::Done(JobState::Failure, why, peers.collect()))
    }
}

/// Renews `claim` every third of the lease; returns once it is lost.
async fn renew(runner: &Inner, claim: &Claim) {
    loop {
        tokio::time::sleep(runner.lease / 3).await;
        match runner.store.renew(claim, runner.lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(job = %claim.id, "preheat job's lease was lost");
                return;
            }
            // A store that fails briefly: the lease still has two thirds left.
            Err(e) => tracing::warn!(job = %claim.id, error = %e, "cannot renew a preheat job's lease"),
        }
    }
}

fn fail(why: &str) -> Outcome {
    Outcome::Done(JobState::Failure, why.to_owned(), Vec::new())
}

/// An error with its causes, as a job's reason: "cannot send" alone says little.
fn reason(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        cause = c.source();
    }
    text
}

/// The peers that must hold the job's blobs: seeds with a seed stream open here, all of them
/// or the one the job's URL hashes to (so that every scheduler picks the same one while the
/// seeds stay the same); or every node with a preheat stream open here.
pub fn peers_in_scope(hosts: &[HostView], scope: Scope, url: &str) -> Vec<HostView> {
    let seeds = hosts.iter().filter(|h| h.seed && h.seeding);
    match scope {
        Scope::AllSeedPeers => seeds.cloned().collect(),
        // A hash every scheduler computes alike, whatever it was built with.
        Scope::SingleSeedPeer => seeds
            .max_by_key(|h| {
                let mut hasher = Sha256::new();
                hasher.update(url.as_bytes());
                hasher.update([0]);
                hasher.update(h.id.as_bytes());
                <[u8; 32]>::from(hasher.finalize())
            })
            .cloned()
            .into_iter()
            .collect(),
        Scope::AllPeers => hosts.iter().filter(|h| h.preheating).cloned().collect(),
    }
}

mod file;
#[cfg(test)]
mod tests;
