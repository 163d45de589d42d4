//! Faults in a cluster: a parent dies or drops off the network mid-transfer, the scheduler
//! dies and comes back, one of two schedulers dies. Pulls complete with the right bytes, and
//! fast; the origin still serves about one copy where peers can serve the rest.

use std::time::{Duration, Instant};

use damselfly_integration::{
    fetch, http_client, poll_until, random_bytes, Cluster, Metrics, Mirror, MirrorOpts, Registry, MIB,
};

const REPO: &str = "test/faults";

async fn downloaded(cluster: &Cluster, i: usize, source: &str) -> f64 {
    cluster.metrics(i).await.unwrap().sum("damselfly_download_bytes_total", &[("source", source)])
}

async fn pull(cluster: &Cluster, i: usize, origin: &Registry, digest: &str, size: u64) -> Duration {
    let started = Instant::now();
    let url = cluster.node(i).blob_url_ns(REPO, digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap().assert_blob(digest, size);
    started.elapsed()
}

/// Two nodes; node 0 holds a 32 MiB blob and uploads it slowly (4 MiB/s), so that a child of
/// it still has most of the transfer to go when something happens to it.
async fn slow_parent_with_a_blob() -> (Registry, Cluster, String, u64) {
    let origin = Registry::start().await.unwrap();
    let size = 32 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |i, mut o| {
        if i == 0 {
            o.config.upload_rate_limit = Some(damselfly_mirror::config::ByteSize(4 * MIB));
        }
        o
    })
    .await
    .unwrap();
    pull(&cluster, 0, &origin, &digest, size).await;
    (origin, cluster, digest, size)
}

/// Waits until node `i` has a piece from a peer (pieces arrive whole, about one a second from
/// a parent limited to 4 MiB/s).
async fn took_from_a_peer(cluster: &Cluster, i: usize) {
    let url = cluster.node(i).metrics_url();
    poll_until("a piece from a peer", Duration::from_secs(15), || {
        let url = url.clone();
        async move {
            let m = Metrics::scrape(&url).await?;
            Ok((m.sum("damselfly_fetched_bytes_total", &[("source", "peer")]) > 0.0).then_some(()))
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_of_a_parent_killed_mid_transfer_complete_with_the_right_bytes() {
    let (origin, mut cluster, digest, size) = slow_parent_with_a_blob().await;

    let url = cluster.node(1).blob_url_ns(REPO, &digest, &origin.host());
    let child = tokio::spawn(async move { fetch(http_client().get(url), false).await });
    took_from_a_peer(&cluster, 1).await;
    cluster.kill(0).await;
    let killed_at = Instant::now();
    child.await.unwrap().unwrap().assert_blob(&digest, size);
    assert!(killed_at.elapsed() < Duration::from_secs(10), "the child took {:?} after the kill", killed_at.elapsed());
    cluster.shutdown().await;
}

/// Drops every packet to one address and port until dropped.
struct Partition(Vec<String>);

impl Partition {
    fn new(addr: std::net::SocketAddr) -> Partition {
        let rule = vec![
            "INPUT".to_owned(),
            "-p".into(),
            "tcp".into(),
            "-d".into(),
            addr.ip().to_string(),
            "--dport".into(),
            addr.port().to_string(),
            "-j".into(),
            "DROP".into(),
        ];
        let status = iptables().arg("-I").args(&rule).status().expect("run iptables");
        assert!(status.success(), "iptables -I failed (the partition test needs root or password-less sudo)");
        Partition(rule)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = iptables().arg("-D").args(&self.0).status();
    }
}

/// `iptables`, through `sudo -n` when not running as root.
fn iptables() -> std::process::Command {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = std::process::Command::new(if root { "iptables" } else { "sudo" });
    if !root {
        cmd.args(["-n", "iptables"]);
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_of_a_partitioned_parent_move_on_within_about_a_second() {
    let (origin, cluster, digest, size) = slow_parent_with_a_blob().await;

    let url = cluster.node(1).blob_url_ns(REPO, &digest, &origin.host());
    let child = tokio::spawn(async move { fetch(http_client().get(url), false).await });
    took_from_a_peer(&cluster, 1).await;
    let partition = Partition::new(cluster.node(0).upload_addr.expect("upload address"));
    let cut_at = Instant::now();
    child.await.unwrap().unwrap().assert_blob(&digest, size);
    let took = cut_at.elapsed();
    drop(partition);
    assert!(downloaded(&cluster, 1, "peer").await > 0.0, "the child never used its parent");
    // One second of stall, then the rest (most of 32 MiB) from the origin on loopback.
    assert!(took < Duration::from_secs(4), "the child needed {took:?} after the partition");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_survive_the_scheduler_and_a_restarted_scheduler_finds_cached_blobs_again() {
    let origin = Registry::start().await.unwrap();
    let size = 16 * MIB;
    let cached = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let fresh = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let mut cluster = Cluster::start(&origin, 1, 3, |_, o| o).await.unwrap();
    pull(&cluster, 0, &origin, &cached, size).await;

    cluster.schedulers[0].stop().await;
    // The scheduler is gone: the pull goes to the origin at once (connection refused) or after
    // the connect timeout, never after a long wait.
    let took = pull(&cluster, 1, &origin, &fresh, size).await;
    assert!(took < Duration::from_secs(3), "a pull without a scheduler took {took:?}");

    cluster.schedulers[0].restart().await.unwrap();
    cluster.wait_for_hosts(3.0).await.unwrap();
    // Node 0 cached this before the restart; the new scheduler learnt it from the announcement.
    pull(&cluster, 2, &origin, &cached, size).await;
    assert_eq!(downloaded(&cluster, 2, "peer").await, size as f64, "node 2 did not get the blob from a peer");
    origin.settled_access_log().await.assert_copies_at_most(&[(cached, size)], 1.1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_spread_over_two_schedulers_and_pulls_continue_when_one_dies() {
    let origin = Registry::start().await.unwrap();
    let size = 4 * MIB;
    let mut blobs = Vec::new();
    for _ in 0..8 {
        blobs.push(origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap());
    }
    let mut cluster = Cluster::start(&origin, 2, 2, |_, o| o).await.unwrap();
    for d in &blobs {
        pull(&cluster, 0, &origin, d, size).await;
    }
    for s in &cluster.schedulers {
        let tasks = Metrics::scrape(&s.metrics_url()).await.unwrap().sum("damselfly_scheduler_tasks", &[]);
        assert!(tasks >= 1.0, "a scheduler got no task: {tasks}");
    }

    cluster.schedulers[0].stop().await;
    for d in &blobs {
        pull(&cluster, 1, &origin, d, size).await;
    }
    // Every blob still came from node 0, through whichever scheduler was left.
    assert_eq!(downloaded(&cluster, 1, "peer").await, (8 * size) as f64);
    let all: Vec<(String, u64)> = blobs.iter().map(|d| (d.clone(), size)).collect();
    origin.settled_access_log().await.assert_copies_at_most(&all, 1.1);
    cluster.shutdown().await;
}

/// Regression: a parent set that holds only some pieces, handed out again and again, kept a full
/// read from ever reaching its stall timer; it hung instead of taking the rest from the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_is_not_starved_by_a_parent_holding_only_some_pieces() {
    let origin = Registry::start().await.unwrap();
    let size = 24 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let cluster = Cluster::start(&origin, 1, 2, |_, o| o).await.unwrap();
    // Node 0 reads one range (one piece) the way nydusd does, then its download stream closes
    // and it stays a holder of that piece alone.
    let url0 = cluster.node(0).blob_url_ns(REPO, &digest, &origin.host());
    let piece3 = format!("bytes={}-{}", 3 * 4 * MIB, 4 * 4 * MIB - 1);
    let got = fetch(http_client().get(url0).header("Range", piece3), false).await.unwrap();
    assert_eq!(got.received, 4 * MIB);
    tokio::time::sleep(Duration::from_secs(6)).await;

    let url1 = cluster.node(1).blob_url_ns(REPO, &digest, &origin.host());
    let full = tokio::time::timeout(Duration::from_secs(20), fetch(http_client().get(url1), false)).await;
    full.expect("the full read hung").unwrap().assert_blob(&digest, size);
    cluster.shutdown().await;
}

/// A node alone keeps no piece digests (nobody needs them); one that joins a cluster with a
/// cache full of blobs computes them, checking each blob against its digest, and announces
/// the blobs, so that its peers take them from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_cached_by_a_node_alone_are_served_to_peers_once_it_joins_a_cluster() {
    let origin = Registry::start().await.unwrap();
    let size = 12 * MIB;
    let digest = origin.push_blob(REPO, random_bytes(size as usize)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alone = Mirror::start(MirrorOpts::new(&origin.url()).data_dir(dir.path())).await.unwrap();
    let url = alone.blob_url_ns(REPO, &digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap().assert_blob(&digest, size);
    alone.shutdown().await;

    let cluster = Cluster::start(&origin, 1, 2, |i, o| if i == 0 { o.data_dir(dir.path()) } else { o }).await.unwrap();
    let sched = cluster.schedulers[0].metrics_url();
    poll_until("the cached blob announced", Duration::from_secs(15), || {
        let url = sched.clone();
        async move {
            let m = Metrics::scrape(&url).await?;
            Ok((m.sum("damselfly_scheduler_tasks", &[]) >= 1.0).then_some(()))
        }
    })
    .await
    .unwrap();
    pull(&cluster, 1, &origin, &digest, size).await;
    assert_eq!(downloaded(&cluster, 1, "peer").await, size as f64, "node 1 did not get the blob from node 0");
    origin.settled_access_log().await.assert_copies_at_most(&[(digest, size)], 1.1);
    cluster.shutdown().await;
}
