use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use damselfly_mirror::upstream::UpstreamConfig;

use super::*;
use crate::job::{JobId, JobSpec, Origin, Target};

/// Seeds that fetch what they are asked for at once (or never, when `lazy`).
struct FakeCluster {
    seeds: Vec<&'static str>,
    lazy: bool,
    held: Mutex<HashSet<(String, String)>>,
    asked: Mutex<Vec<(String, SeedTask)>>,
    /// Hosts asked through their seed stream, and through their preheat stream.
    seed_asks: Mutex<Vec<String>>,
    held_asks: Mutex<Vec<String>>,
    /// Every task quarantined, with this reason.
    quarantine: Mutex<Option<String>>,
}

impl FakeCluster {
    fn new(seeds: &[&'static str], lazy: bool) -> Arc<FakeCluster> {
        Arc::new(FakeCluster {
            seeds: seeds.to_vec(),
            lazy,
            held: Mutex::default(),
            asked: Mutex::default(),
            seed_asks: Mutex::default(),
            held_asks: Mutex::default(),
            quarantine: Mutex::default(),
        })
    }

    fn asked_hosts(&self) -> HashSet<String> {
        self.asked.lock().expect("lock").iter().map(|(h, _)| h.clone()).collect()
    }
}

impl Cluster for FakeCluster {
    fn hosts(&self) -> Vec<HostView> {
        let seed = |id: &str| HostView {
            id: id.to_owned(),
            ip: format!("10.0.0.{}", id.len()),
            upload_port: 1,
            idc: String::new(),
            location: String::new(),
            seed: true,
            seeding: true,
            preheating: true,
            load: 0,
            slots: 4,
            tasks: 0,
            last_seen_secs: 0,
            served_origin: 0,
            served_peer: 0,
            served_cache: 0,
        };
        let mut hosts: Vec<HostView> = self.seeds.iter().map(|s| seed(s)).collect();
        hosts.push(HostView { seed: false, seeding: false, ..seed("ordinary") });
        hosts.push(HostView { seed: false, seeding: false, preheating: false, ..seed("unreachable") });
        hosts
    }

    fn holding(&self, digest: &str, _length: u64) -> Holding {
        let held = self.held.lock().expect("lock");
        let peers = held.iter().filter(|(_, d)| d == digest).map(|(h, _)| (h.clone(), 2, true)).collect();
        Holding { peers, piece_count: 2, quarantined: self.quarantine.lock().expect("lock").clone() }
    }

    fn ask_to_hold(&self, host: &str, task: SeedTask) -> bool {
        self.held_asks.lock().expect("lock").push(host.to_owned());
        self.ask(host, task)
    }

    fn ask_seed(&self, host: &str, task: SeedTask) -> bool {
        self.seed_asks.lock().expect("lock").push(host.to_owned());
        self.ask(host, task)
    }

    // Files at plain URLs need an origin to HEAD: the integration tests drive them.
    fn ask_to_fetch_url(&self, _: &str, _: UrlTask) -> bool {
        false
    }

    fn ask_to_keep(&self, _: &str, _: CacheEntry) -> bool {
        false
    }

    fn cache_entry(&self, _: &str) -> Option<(CacheEntry, Vec<String>)> {
        None
    }

    fn url_failure(&self, _: &str) -> Option<damselfly_scheduler::UrlFailure> {
        None
    }
}

impl FakeCluster {
    fn ask(&self, host: &str, task: SeedTask) -> bool {
        if !self.lazy {
            self.held.lock().expect("lock").insert((host.to_owned(), task.digest.clone()));
        }
        self.asked.lock().expect("lock").push((host.to_owned(), task));
        true
    }
}

fn blob(c: char) -> BlobProgress {
    BlobProgress { digest: format!("sha256:{}", c.to_string().repeat(64)), length: 100, ..BlobProgress::default() }
}

/// A job whose blobs are already known, so the runner needs no registry.
async fn job(store: &JobStore, scope: Scope, timeout: Duration) -> JobId {
    let spec = JobSpec {
        target: Target::Image,
        url: "http://127.0.0.1:5000/v2/app/manifests/v1".to_owned(),
        headers: BTreeMap::new(),
        scope,
        platforms: Vec::new(),
        concurrency: 8,
        timeout,
        origin: Origin::OpenApi,
    };
    let id = store.create(&spec).await.expect("create");
    let setup = store.claim(id, "setup", Duration::from_secs(5)).await.expect("claim").expect("claimed");
    store.set_blobs(&setup, &[blob('a'), blob('b')]).await.expect("blobs");
    store.release(&setup).await.expect("release");
    id
}

fn runner(store: &JobStore, cluster: Arc<FakeCluster>, lease: Duration) -> Runner {
    let upstream = Arc::new(Upstream::new(UpstreamConfig::default()).expect("upstream"));
    Runner::new(store.clone(), cluster, upstream, "test", lease, false, crate::DEFAULT_FILE_TTL)
}

async fn until_done(store: &JobStore, id: JobId) -> Job {
    for _ in 0..200 {
        let job = store.get(id).await.expect("get").expect("job");
        if job.state.is_done() {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not end");
}

/// Runs one job of `scope` and `timeout` on `cluster` until it ends.
async fn run_one(scope: Scope, timeout: Duration, cluster: Arc<FakeCluster>) -> Job {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("store");
    let id = job(&store, scope, timeout).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(runner(&store, cluster, DEFAULT_LEASE_FOR_TESTS).run(stop.clone()));
    let done = until_done(&store, id).await;
    stop.cancel();
    task.await.expect("runner");
    done
}

#[tokio::test]
async fn a_single_seed_job_succeeds_once_one_seed_holds_every_blob() {
    let cluster = FakeCluster::new(&["seed-a", "seed-b"], false);
    let done = run_one(Scope::SingleSeedPeer, Duration::from_secs(60), cluster.clone()).await;
    assert_eq!(done.state, JobState::Success, "{}", done.error);
    assert_eq!(cluster.asked_hosts().len(), 1, "one seed asked");
    let seed = cluster.asked_hosts().into_iter().next().expect("a seed");
    assert_eq!(done.succeeded_peers().map(|p| p.host_id.clone()).collect::<Vec<_>>(), vec![seed.clone()]);
    assert!(done.blobs.iter().all(|b| b.holders == vec![seed.clone()] && b.wanted == 1));
    let asked = cluster.asked.lock().expect("lock");
    let source = asked[0].1.source.as_ref().expect("source");
    assert_eq!((source.registry.as_str(), source.repository.as_str()), ("http://127.0.0.1:5000", "app"));
    assert_eq!(asked[0].1.length, 100);
}

#[tokio::test]
async fn an_all_seeds_job_waits_for_every_seed() {
    let cluster = FakeCluster::new(&["seed-a", "seed-b"], false);
    let done = run_one(Scope::AllSeedPeers, Duration::from_secs(60), cluster.clone()).await;
    assert_eq!(done.state, JobState::Success);
    assert_eq!(cluster.asked_hosts(), HashSet::from(["seed-a".to_owned(), "seed-b".to_owned()]));
    assert_eq!(done.succeeded_peers().count(), 2);
    assert!(cluster.held_asks.lock().expect("lock").is_empty(), "seeds are asked on their seed streams");
}

#[tokio::test]
async fn a_job_whose_seeds_never_fetch_fails_at_its_timeout_with_each_blobs_reason() {
    let cluster = FakeCluster::new(&["seed-a"], true);
    let done = run_one(Scope::SingleSeedPeer, Duration::from_secs(2), cluster.clone()).await;
    assert_eq!(done.state, JobState::Failure);
    assert!(done.error.contains("timed out") && done.error.contains("2 of 2 blobs"), "{}", done.error);
    assert!(done.blobs.iter().all(|b| b.error.contains("held by 0 of 1")), "{:?}", done.blobs);
    assert_eq!(done.failed_peers().map(|p| p.description.clone()).collect::<Vec<_>>(), vec!["2 of 2 blobs not held"]);
}

#[tokio::test]
async fn a_quarantined_blob_says_so_in_the_jobs_failure() {
    let cluster = FakeCluster::new(&["seed-a"], true);
    *cluster.quarantine.lock().expect("lock") = Some("its digests failed".into());
    let done = run_one(Scope::SingleSeedPeer, Duration::from_secs(2), cluster).await;
    assert_eq!(done.state, JobState::Failure);
    let errors: Vec<&str> = done.blobs.iter().map(|b| b.error.as_str()).collect();
    assert!(
        errors
            .iter()
            .all(|e| e.contains("quarantined by the scheduler: its digests failed") && e.contains("timed out")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn an_all_peers_job_waits_for_every_node_with_a_preheat_stream() {
    let cluster = FakeCluster::new(&["seed-a"], false);
    let done = run_one(Scope::AllPeers, Duration::from_secs(60), cluster.clone()).await;
    assert_eq!(done.state, JobState::Success, "{}", done.error);
    assert_eq!(cluster.asked_hosts(), HashSet::from(["seed-a".to_owned(), "ordinary".to_owned()]));
    assert!(cluster.seed_asks.lock().expect("lock").is_empty(), "nobody is sent to the origin by the job");
}

#[tokio::test]
async fn a_job_whose_runner_dies_is_resumed_by_another_after_the_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("store");
    let id = job(&store, Scope::SingleSeedPeer, Duration::from_secs(60)).await;
    let lease = Duration::from_secs(1);
    // The first runner's seeds never fetch; it dies mid-job without releasing its claim.
    let first = tokio::spawn(runner(&store, FakeCluster::new(&["seed-a"], true), lease).run(CancellationToken::new()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.get(id).await.expect("get").map(|j| j.state), Some(JobState::Running));
    first.abort();
    let _ = first.await;
    let stop = CancellationToken::new();
    let cluster = FakeCluster::new(&["seed-a"], false);
    let second = tokio::spawn(runner(&store, cluster.clone(), lease).run(stop.clone()));
    let done = until_done(&store, id).await;
    stop.cancel();
    second.await.expect("runner");
    assert_eq!(done.state, JobState::Success);
    assert_eq!(cluster.asked_hosts().len(), 1);
}

#[test]
fn every_scheduler_picks_the_same_single_seed() {
    let cluster = FakeCluster::new(&["a", "b", "c", "d"], false);
    let mut hosts = cluster.hosts();
    let pick =
        |hosts: &[HostView]| peers_in_scope(hosts, Scope::SingleSeedPeer, "http://r/v2/x/manifests/1")[0].id.clone();
    let first = pick(&hosts);
    hosts.reverse();
    assert_eq!(pick(&hosts), first);
    assert!(peers_in_scope(&hosts, Scope::AllSeedPeers, "u").iter().all(|h| h.seed));
    assert_eq!(peers_in_scope(&hosts, Scope::AllSeedPeers, "u").len(), 4);
    assert_eq!(peers_in_scope(&hosts, Scope::AllPeers, "u").len(), 5, "every node with a preheat stream");
}

const DEFAULT_LEASE_FOR_TESTS: Duration = Duration::from_secs(5);
