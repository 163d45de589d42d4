use super::*;
use crate::job::Summary;

fn spec(url: &str) -> JobSpec {
    JobSpec {
        target: Target::Image,
        url: url.to_owned(),
        headers: BTreeMap::from([("Authorization".to_owned(), "Bearer t".to_owned())]),
        scope: Scope::AllSeedPeers,
        platforms: vec!["linux/amd64".to_owned()],
        concurrency: 3,
        timeout: Duration::from_secs(60),
        origin: Origin::OpenApi,
    }
}

fn blob(d: char) -> BlobProgress {
    BlobProgress { digest: format!("sha256:{}", d.to_string().repeat(64)), length: 10, ..BlobProgress::default() }
}

#[tokio::test]
async fn a_job_reads_back_as_it_was_created_and_survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("open");
    let a = store.create(&spec("http://r/v2/a/manifests/1")).await.expect("create");
    let b = store.create(&spec("http://r/v2/b/manifests/1")).await.expect("create");
    assert!(b > a);
    let job = store.get(a).await.expect("get").expect("found");
    assert_eq!((job.spec.clone(), job.state), (spec("http://r/v2/a/manifests/1"), JobState::Pending));
    assert!(job.created_ms > 0 && job.peers.is_empty() && job.blobs.is_empty());
    assert_eq!(store.get(JobId(999)).await.expect("get"), None);
    let listed: Vec<JobId> = store.list(10, 0).await.expect("list").iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![b, a]);
    store.close().await;
    let reopened = JobStore::open_in(dir.path()).await.expect("reopen");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("jobs.db")).expect("file").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "jobs hold registry credentials: owner only");
    assert_eq!(reopened.get(a).await.expect("get").map(|j| j.spec), Some(spec("http://r/v2/a/manifests/1")));
    let c = reopened.create(&spec("http://r/v2/c/manifests/1")).await.expect("create");
    assert!(c > b, "ids are never reused");
}

#[tokio::test]
async fn one_runner_holds_a_job_until_its_lease_lapses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("open");
    let id = store.create(&spec("http://r/v2/a/manifests/1")).await.expect("create");
    assert_eq!(store.claimable(10).await.expect("claimable"), vec![id]);
    let lease = Duration::from_millis(300);
    let first = store.claim(id, "one", lease).await.expect("claim").expect("claimed");
    assert_eq!(store.claim(id, "two", lease).await.expect("claim"), None, "held by one");
    assert!(store.claimable(10).await.expect("claimable").is_empty());
    assert!(store.renew(&first, lease).await.expect("renew"));
    assert_eq!(store.get(id).await.expect("get").map(|j| j.state), Some(JobState::Running));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The first runner stopped renewing, as a dead one does.
    let second = store.claim(id, "two", lease).await.expect("claim").expect("taken over");
    assert!(!store.renew(&first, lease).await.expect("renew"), "the old runner lost it");
    assert!(!store.finish(&first, JobState::Success, "", &[]).await.expect("finish"));
    assert!(store.finish(&second, JobState::Failure, "why", &[]).await.expect("finish"));
    let job = store.get(id).await.expect("get").expect("found");
    assert_eq!((job.state, job.error.as_str()), (JobState::Failure, "why"));
    assert_eq!(store.claim(id, "three", lease).await.expect("claim"), None, "a finished job stays finished");
}

#[tokio::test]
async fn blobs_are_recorded_once_and_their_progress_updates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("open");
    let id = store.create(&spec("http://r/v2/a/manifests/1")).await.expect("create");
    let claim = store.claim(id, "one", Duration::from_secs(10)).await.expect("claim").expect("claimed");
    assert!(!store.run_state(&claim).await.expect("state").1);
    store.set_blobs(&claim, &[blob('a'), blob('b')]).await.expect("blobs");
    store.set_blobs(&claim, &[blob('c')]).await.expect("again");
    assert!(store.run_state(&claim).await.expect("state").1);
    let mut held = blob('b');
    (held.wanted, held.holders, held.pieces_held, held.piece_count) = (2, vec!["seed-1".into()], 3, 3);
    store.set_progress(&claim, &held).await.expect("progress");
    let blobs = store.blobs(id).await.expect("blobs");
    assert_eq!(blobs, vec![blob('a'), held]);
    let peers = [PeerResult { host_id: "seed-1".into(), ip: "10.0.0.1".into(), description: String::new() }];
    assert!(store.finish(&claim, JobState::Success, "", &peers).await.expect("finish"));
    assert_eq!(store.get(id).await.expect("get").expect("found").peers, peers);
}

#[tokio::test]
async fn only_sqlite_and_postgres_urls_open() {
    assert!(matches!(JobStore::open("mysql://x").await, Err(StoreError::Url(_))));
}

#[tokio::test]
async fn ended_jobs_are_summed_and_forgotten_after_their_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("open");
    let id = store.create(&spec("http://r/v2/a/manifests/1")).await.expect("create");
    let claim = store.claim(id, "one", Duration::from_secs(10)).await.expect("claim").expect("claimed");
    // Text from a registry may hold NUL, which PostgreSQL refuses: stored without it.
    let odd = BlobProgress { media_type: "type\0with nul".into(), ..blob('a') };
    assert!(store.set_blobs(&claim, &[odd, blob('b')]).await.expect("blobs"));
    assert_eq!(store.blobs(id).await.expect("blobs")[0].media_type, "typewith nul");
    let mut held = blob('b');
    (held.wanted, held.holders) = (1, vec!["seed".into()]);
    store.set_progress(&claim, &held).await.expect("progress");
    let sums = store.summaries(&[id]).await.expect("sums");
    assert_eq!(sums[&id], Summary { blobs: 2, held: 1, bytes: 20, bytes_held: 10, failed: 0 });
    // A runner that lost the job writes nothing.
    let stale = Claim { id, runner: "gone".into() };
    store.set_progress(&stale, &BlobProgress { error: "late".into(), ..blob('a') }).await.expect("ignored");
    assert_eq!(store.blobs(id).await.expect("blobs")[0].error, "");
    assert!(!store.set_blobs(&stale, &[blob('c')]).await.expect("not the claim's"));
    assert_eq!(store.open_count().await.expect("count"), 1);
    assert!(store.finish(&claim, JobState::Success, "", &[]).await.expect("finish"));
    assert!(
        store.get(id).await.expect("get").expect("job").spec.headers.is_empty(),
        "credentials forgotten at the end"
    );
    assert_eq!(store.open_count().await.expect("count"), 0);
    assert_eq!(store.prune(now_ms() - 60_000).await.expect("prune"), 0, "ended a moment ago");
    assert_eq!(store.prune(now_ms() + 1).await.expect("prune"), 1);
    assert_eq!(store.get(id).await.expect("get"), None);
    assert!(store.blobs(id).await.expect("blobs").is_empty());
}

#[tokio::test]
async fn a_bad_store_url_does_not_echo_its_password() {
    let err = JobStore::open("mysql://user:hunter2@db/x").await.map(drop).expect_err("refused");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}
