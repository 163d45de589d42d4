//! The P2P cache, driven with `damselfly cache` (the binary) against node daemons of a cluster:
//! content imported on one node is exported on others from their peers, replicas outlive the
//! importing node, a time to live and `delete --all` reach every holder, a parent serving
//! corrupt pieces is passed over, and bad input gets a clear message and a non-zero exit.

use std::path::Path;
use std::time::Duration;

use damselfly_integration::cache_cli::{cache, CacheRun};
use damselfly_integration::cluster::node_id;
use damselfly_integration::{poll_until, random_bytes, Cluster, Registry, MIB};

/// `damselfly cache`'s exit status for a missing entry.
const NOT_FOUND: i32 = 3;

async fn three_nodes() -> (Registry, Cluster) {
    // The cluster harness wants an origin; the cache never asks it for anything.
    let origin = Registry::start().await.unwrap();
    let cluster = Cluster::start(&origin, 1, 3, |_, o| o).await.unwrap();
    cluster.wait_for_hosts(3.0).await.unwrap();
    (origin, cluster)
}

async fn run(cluster: &Cluster, node: usize, args: &[&str]) -> CacheRun {
    cache(cluster.node(node).data_dir(), args).await.unwrap()
}

fn write_file(dir: &Path, name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let bytes = random_bytes(len);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// Whether no node keeps `id` (and, with `no_content`, no node holds any task either).
async fn held_nowhere(cluster: &Cluster, id: &str, no_content: bool) -> bool {
    for node in 0..3 {
        let tasks = cluster.metrics(node).await.map_or(1.0, |m| m.sum("damselfly_cache_tasks", &[]));
        if (no_content && tasks > 0.0) || run(cluster, node, &["stat", "--id", id, "--local"]).await.code != NOT_FOUND {
            return false;
        }
    }
    true
}

async fn fetched_from_peers(cluster: &Cluster, i: usize) -> f64 {
    cluster.metrics(i).await.unwrap().sum("damselfly_fetched_bytes_total", &[("source", "peer")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_imported_on_one_node_is_exported_on_two_others_from_peers() {
    let (_origin, cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, bytes) = write_file(dir.path(), "model.bin", 18 * MIB as usize + 123);
    let path = file.to_str().unwrap();

    let imported = run(&cluster, 0, &["import", path, "--id", "model", "--tag", "v1", "--json"]).await.ok().json();
    let digest = imported["imported"]["digest"].as_str().unwrap().to_owned();
    assert_eq!(imported["imported"]["length"], bytes.len());
    assert_ne!(imported["placement"], "copy", "a file of the daemon's own user is linked, not copied");

    for node in [1, 2] {
        let stat = run(&cluster, node, &["stat", "--id", "model", "--tag", "v1", "--json"]).await.ok().json();
        assert_eq!(stat["entry"]["digest"], digest.as_str());
        assert_eq!(stat["entry"]["holders"], serde_json::json!([node_id(0)]));
        // Not here until exported.
        assert_eq!(run(&cluster, node, &["stat", "--id", "model", "--tag", "v1", "--local"]).await.code, NOT_FOUND);
    }
    for node in [1, 2] {
        let out = dir.path().join(format!("out-{node}"));
        let out_path = out.to_str().unwrap();
        let export = run(&cluster, node, &["export", "--id", "model", "--tag", "v1", "-O", out_path, "--json"])
            .await
            .ok()
            .json();
        assert_eq!(export["from_peers"], true);
        assert_eq!(export["written_by"], "written as peers delivered it", "{export}");
        assert!(std::fs::read(&out).unwrap() == bytes, "node {node} exported other bytes");
        assert!(
            fetched_from_peers(&cluster, node).await >= bytes.len() as f64,
            "node {node} did not take it from peers"
        );
    }
    let uploaded = cluster.metrics(0).await.unwrap().sum("damselfly_upload_bytes_total", &[]);
    assert!(uploaded > 0.0, "the importing node served no piece");

    // Held here now: the export is a copy of what the store holds.
    let again = dir.path().join("again");
    let again_path = again.to_str().unwrap();
    let export = run(&cluster, 1, &["export", "--id", "model", "--tag", "v1", "-O", again_path, "--json"]).await;
    assert_eq!(export.ok().json()["from_peers"], false);
    assert!(std::fs::read(&again).unwrap() == bytes);
    // The importing node exports without a peer, here onto another filesystem (tmpfs), where
    // the kernel cannot copy between the two.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let local = shm.path().join("local");
    run(&cluster, 0, &["export", "--id", "model", "--tag", "v1", "-O", local.to_str().unwrap()]).await.ok();
    assert!(std::fs::read(&local).unwrap() == bytes);
    let listed = run(&cluster, 0, &["list", "--json"]).await.ok().json();
    assert_eq!(listed["entries"].as_array().unwrap().len(), 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_outlives_the_importing_node() {
    let (_origin, mut cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, bytes) = write_file(dir.path(), "data.tar", 9 * MIB as usize);
    let path = file.to_str().unwrap();
    let imported =
        run(&cluster, 0, &["import", path, "--id", "dataset", "--replicas", "2", "--json"]).await.ok().json();
    let holders = imported["imported"]["holders"].as_array().expect("the import waits for its replicas").clone();
    assert_eq!(holders.len(), 2, "{imported}");
    let replica = holders.iter().map(|h| h.as_str().unwrap()).find(|h| *h != node_id(0)).unwrap().to_owned();
    let replica_node = (1..3).find(|&i| node_id(i) == replica).unwrap();
    let other = 3 - replica_node;
    run(&cluster, replica_node, &["stat", "--id", "dataset", "--local"]).await.ok();

    cluster.kill(0).await;
    let out = dir.path().join("out");
    let export = run(&cluster, other, &["export", "--id", "dataset", "-O", out.to_str().unwrap(), "--json"]).await.ok();
    assert_eq!(export.json()["from_peers"], true);
    assert!(std::fs::read(&out).unwrap() == bytes);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_past_its_ttl_is_dropped_on_every_holder() {
    let (_origin, cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = write_file(dir.path(), "build.out", 5 * MIB as usize);
    let path = file.to_str().unwrap();
    let args = ["import", path, "--id", "build", "--replicas", "3", "--ttl", "4s", "--json"];
    let imported = run(&cluster, 0, &args).await.ok().json();
    assert_eq!(imported["imported"]["holders"].as_array().unwrap().len(), 3, "{imported}");
    assert!(imported["imported"]["expires_ms"].as_u64().is_some());
    // Every holder drops the name and the content on its own clock.
    poll_until("the entry to expire everywhere", Duration::from_secs(20), || async {
        Ok(held_nowhere(&cluster, "build", true).await.then_some(()))
    })
    .await
    .unwrap();
    for node in 0..3 {
        assert_eq!(run(&cluster, node, &["stat", "--id", "build"]).await.code, NOT_FOUND, "node {node}");
        let files = damselfly_integration::walk_files(cluster.node(node).data_dir());
        assert!(
            !files.iter().any(|f| f.extension().is_some_and(|e| e == "data" || e == "json")),
            "node {node}: {files:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_all_makes_stat_fail_on_every_node() {
    let (_origin, cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = write_file(dir.path(), "f", 3 * MIB as usize);
    run(&cluster, 0, &["import", file.to_str().unwrap(), "--id", "doomed", "--replicas", "2"]).await.ok();
    // Without --all a node that does not keep it has nothing to delete.
    let holders: Vec<String> = run(&cluster, 1, &["stat", "--id", "doomed", "--json"]).await.ok().json()["entry"]
        ["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    let outsider = (0..3).find(|&i| !holders.contains(&node_id(i))).unwrap();
    assert_eq!(run(&cluster, outsider, &["delete", "--id", "doomed"]).await.code, NOT_FOUND);

    run(&cluster, outsider, &["delete", "--id", "doomed", "--all"]).await.ok();
    poll_until("every holder to drop it", Duration::from_secs(10), || async {
        Ok(held_nowhere(&cluster, "doomed", false).await.then_some(()))
    })
    .await
    .unwrap();
    for node in 0..3 {
        let stat = run(&cluster, node, &["stat", "--id", "doomed"]).await;
        assert_eq!(stat.code, NOT_FOUND, "node {node}: {stat:?}");
        assert!(stat.stderr.contains("no entry doomed"), "{stat:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_serving_corrupt_pieces_is_passed_over_during_an_export() {
    let (_origin, cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB as usize;
    let (file, bytes) = write_file(dir.path(), "weights", size);
    run(&cluster, 0, &["import", file.to_str().unwrap(), "--id", "weights"]).await.ok();
    let first = dir.path().join("first");
    run(&cluster, 1, &["export", "--id", "weights", "-O", first.to_str().unwrap()]).await.ok();
    // Node 1 took every piece from a peer just now (so it serves them without checking them
    // again for a minute); its copy now rots in every piece.
    let data = damselfly_integration::walk_files(cluster.node(1).data_dir())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .expect("node 1's task file");
    let mut rotten = std::fs::read(&data).unwrap();
    for piece in 0..size / (4 * MIB as usize) {
        rotten[piece * 4 * MIB as usize + 7] ^= 0xff;
    }
    std::fs::write(&data, &rotten).unwrap();

    let out = dir.path().join("out");
    run(&cluster, 2, &["export", "--id", "weights", "-O", out.to_str().unwrap()]).await.ok();
    assert!(std::fs::read(&out).unwrap() == bytes, "node 2 wrote bytes that failed verification");
    let m2 = cluster.metrics(2).await.unwrap();
    assert!(
        m2.sum("damselfly_piece_failures_total", &[("reason", "peer_corrupt")]) >= 1.0,
        "node 2 never met the corrupt parent: {:?}",
        m2.with_prefix("damselfly_piece_failures")
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_message_and_a_non_zero_exit() {
    let (_origin, cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = write_file(dir.path(), "f", MIB as usize);
    let file = file.to_str().unwrap();

    let bad = run(&cluster, 0, &["import", file, "--id", "../etc"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("only letters, digits"), "{bad:?}");
    // Names of files preheated from URLs are the cluster's.
    let taken = run(&cluster, 0, &["import", file, "--id", "url.model"]).await;
    assert_eq!(taken.code, 1);
    assert!(taken.stderr.contains("name preheated files"), "{taken:?}");
    let long = "a".repeat(129);
    assert!(run(&cluster, 0, &["stat", "--id", &long]).await.stderr.contains("longer than 128"));

    let unknown = run(&cluster, 1, &["stat", "--id", "nobody"]).await;
    assert_eq!(unknown.code, NOT_FOUND, "{unknown:?}");
    let out = dir.path().join("never");
    let unknown = run(&cluster, 1, &["export", "--id", "nobody", "-O", out.to_str().unwrap()]).await;
    assert_eq!(unknown.code, NOT_FOUND, "{unknown:?}");
    assert!(!out.exists());
    let beside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(!beside.iter().any(|n| n.to_string_lossy().ends_with(".tmp")), "nothing half-written: {beside:?}");

    run(&cluster, 0, &["import", file, "--id", "real"]).await.ok();
    let missing_dir = dir.path().join("no/such/dir/out");
    let export = run(&cluster, 1, &["export", "--id", "real", "-O", missing_dir.to_str().unwrap()]).await;
    assert_eq!(export.code, 1);
    assert!(export.stderr.contains("does not exist"), "{export:?}");

    // Another file under a name that stands for other content.
    let (other, _) = write_file(dir.path(), "g", MIB as usize);
    let clash = run(&cluster, 1, &["import", other.to_str().unwrap(), "--id", "real"]).await;
    assert_eq!(clash.code, 1, "{clash:?}");
    assert!(clash.stderr.contains("names other content"), "{clash:?}");
    assert_eq!(run(&cluster, 1, &["stat", "--id", "real", "--local"]).await.code, NOT_FOUND, "the clash kept nothing");

    // No daemon behind a data directory.
    let nobody = cache(dir.path(), &["stat", "--id", "real"]).await.unwrap();
    assert_eq!(nobody.code, 1);
    assert!(nobody.stderr.contains("no damselfly daemon is running"), "{nobody:?}");

    // Nothing but a file: a directory or a device is refused.
    let dev = run(&cluster, 0, &["import", "/dev/null", "--id", "dev"]).await;
    assert_eq!(dev.code, 1);
    assert!(dev.stderr.contains("not a regular file"), "{dev:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_changes_while_it_is_imported_is_refused_and_nothing_is_kept() {
    let (_origin, cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = write_file(dir.path(), "growing", 64 * MIB as usize);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                f.write_all(&[7; 4096]).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let import = run(&cluster, 0, &["import", file.to_str().unwrap(), "--id", "moving"]).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(import.code, 1, "{import:?}");
    assert!(import.stderr.contains("changed while it was imported"), "{import:?}");
    assert_eq!(run(&cluster, 0, &["stat", "--id", "moving", "--local"]).await.code, NOT_FOUND);
    let files = damselfly_integration::walk_files(cluster.node(0).data_dir());
    assert!(!files.iter().any(|f| f.extension().is_some_and(|e| e == "data" || e == "tmp")), "{files:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_reach_the_admin_socket() {
    use std::os::unix::fs::PermissionsExt;
    let (_origin, cluster) = three_nodes().await;
    let data = cluster.node(0).data_dir();
    let admin = data.join("admin");
    assert_eq!(std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(admin.join("cache.sock")).unwrap().permissions().mode() & 0o777, 0o600);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED the other-user half: it needs root to run a client as nobody");
        cluster.shutdown().await;
        return;
    }
    // A local user other than the daemon's tries to talk to the socket.
    let probe = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\nelse:\n    print('connected')\n";
    let out = tokio::process::Command::new("python3")
        .args(["-c", probe])
        .arg(admin.join("cache.sock"))
        .uid(65534)
        .gid(65534)
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "refused", "{out:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_file_changed_after_its_import_is_dropped_and_never_written_back() {
    let (_origin, cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, mut bytes) = write_file(dir.path(), "linked", 6 * MIB as usize);
    let imported = run(&cluster, 0, &["import", file.to_str().unwrap(), "--id", "linked", "--json"]).await.ok().json();
    assert_eq!(imported["placement"], "hard link", "{imported}");
    // Its owner changes it in place afterwards.
    bytes[100] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let out = dir.path().join("out");
    let export = run(&cluster, 1, &["export", "--id", "linked", "-O", out.to_str().unwrap()]).await;
    assert_eq!(export.code, 1, "{export:?}");
    assert!(!out.exists(), "an export that failed left a file");
    // The node found its piece changed and dropped the content rather than fetch it again
    // into the user's file.
    let m0 = cluster.metrics(0).await.unwrap();
    assert_eq!(m0.sum("damselfly_cache_tasks", &[]), 0.0, "{:?}", m0.with_prefix("damselfly_cache"));
    assert!(std::fs::read(&file).unwrap() == bytes, "the user's file was written");
    // The name without its content goes too.
    assert_eq!(run(&cluster, 0, &["stat", "--id", "linked", "--local"]).await.code, NOT_FOUND);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_that_cannot_finish_leaves_nothing_at_or_beside_its_target() {
    let (_origin, mut cluster) = three_nodes().await;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = write_file(dir.path(), "only-here", 9 * MIB as usize);
    run(&cluster, 0, &["import", file.to_str().unwrap(), "--id", "lonely"]).await.ok();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out");
    // The only holder is gone: no peer can deliver the content.
    cluster.kill(0).await;
    let export = run(&cluster, 1, &["export", "--id", "lonely", "-O", out.to_str().unwrap()]).await;
    assert_eq!(export.code, 1, "{export:?}");
    let left: Vec<_> =
        std::fs::read_dir(out_dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "nothing at the target or beside it: {left:?}");
    cluster.shutdown().await;
}
