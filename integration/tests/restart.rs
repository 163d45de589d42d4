//! The cache survives a restart, and corruption at rest is detected instead of served.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use damselfly_integration::{fetch, http_client, random_bytes, walk_files, Fetched, Mirror, MirrorOpts, Registry, MIB};

async fn get_blob(mirror: &Mirror, origin: &Registry, digest: &str) -> Fetched {
    let url = mirror.blob_url_ns("test/restart", digest, &origin.host());
    fetch(http_client().get(url), false).await.unwrap()
}

/// The cached blob's file: one file per task (preferably under `tasks/`), pieces at their
/// offsets, so the regular file of exactly the blob's size.
fn task_file_of_size(data_dir: &Path, size: u64) -> PathBuf {
    let files = walk_files(data_dir);
    files
        .iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == size))
        .max_by_key(|p| p.starts_with(data_dir.join("tasks")))
        .cloned()
        .unwrap_or_else(|| panic!("no file of {size} bytes under the data dir: {files:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_survives_restart_and_on_disk_corruption_is_refetched_not_served() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes((8 * MIB + 123) as usize);
    let size = data.len() as u64;
    let digest = origin.push_blob("test/restart", data.clone()).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let opts = || MirrorOpts::new(&origin.url()).data_dir(data_dir.path());

    // 1. Cold fetch fills the cache.
    let mirror = Mirror::start(opts()).await.unwrap();
    get_blob(&mirror, &origin, &digest).await.assert_blob(&digest, size);
    mirror.shutdown().await;
    let cold = origin.settled_access_log().await.blob_get_bytes(&digest);
    assert!(cold >= size, "cold fetch did not reach the origin ({cold} bytes)");

    // 2. A new daemon on the same data dir serves it without the origin.
    let mirror = Mirror::start(opts()).await.unwrap();
    get_blob(&mirror, &origin, &digest).await.assert_blob(&digest, size);
    mirror.shutdown().await;
    let log = origin.settled_access_log().await;
    assert_eq!(log.blob_get_bytes(&digest), cold, "restart lost the cache: {:#?}", log.matching(&digest));

    // 3. Flip one byte in the middle of the cached blob on disk (one file per task, pieces at
    //    their offsets, so it is the file of exactly the blob's size holding its bytes).
    let task_file = &task_file_of_size(data_dir.path(), size);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(task_file).unwrap();
    let middle = size / 2;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, middle).unwrap();
    assert_eq!(byte[0], data[middle as usize], "{} does not hold the blob at its offset", task_file.display());
    file.write_all_at(&[byte[0] ^ 0xff], middle).unwrap();
    file.sync_all().unwrap();
    drop(file);

    // 4. The next daemon must not serve the flipped byte. A broken connection on the first try
    //    is acceptable (the client retries); a clean wrong body is not.
    let mirror = Mirror::start(opts()).await.unwrap();
    let first = get_blob(&mirror, &origin, &digest).await;
    assert!(!first.is_clean_but_wrong(&digest, size), "served the corrupted blob as a clean body: {first:?}");
    if !first.is_complete() {
        get_blob(&mirror, &origin, &digest).await.assert_blob(&digest, size);
    } else {
        first.assert_blob(&digest, size);
    }
    let log = origin.settled_access_log().await;
    assert!(
        log.blob_get_bytes(&digest) > cold,
        "corruption repaired without refetching from the origin?: {:#?}",
        log.matching(&digest)
    );
    let metrics = mirror.metrics().await.unwrap();
    // Whole-blob verification failures or a corrupt piece caught by its checksum on read.
    let detected = metrics.sum("damselfly_verify_failures_total", &[])
        + metrics.sum("damselfly_piece_corrupt_total", &[])
        + metrics.sum("damselfly_piece_failures_total", &[("reason", "corrupt")]);
    assert!(detected > 0.0, "corruption not counted: {:#?}", metrics.with_prefix("damselfly_"));
    mirror.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_cache_file_is_refetched_instead_of_crashing_or_served_short() {
    // A cache file cut short behind the daemon's back (disk full, manual cleanup, a crash during
    // a copy): reading past its end must be detected, never a SIGBUS through a stale memory map
    // (which would kill this whole test process) and never a short body.
    let origin = Registry::start().await.unwrap();
    let data = random_bytes((10 * MIB + 7) as usize);
    let size = data.len() as u64;
    let digest = origin.push_blob("test/restart", data).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let opts = || MirrorOpts::new(&origin.url()).data_dir(data_dir.path());

    let mirror = Mirror::start(opts()).await.unwrap();
    get_blob(&mirror, &origin, &digest).await.assert_blob(&digest, size);
    mirror.shutdown().await;
    let cold = origin.settled_access_log().await.blob_get_bytes(&digest);

    let task_file = task_file_of_size(data_dir.path(), size);
    std::fs::OpenOptions::new().write(true).open(&task_file).unwrap().set_len(size / 3).unwrap();

    let mirror = Mirror::start(opts()).await.unwrap();
    let first = get_blob(&mirror, &origin, &digest).await;
    assert!(!first.is_clean_but_wrong(&digest, size), "served a truncated blob as a clean body: {first:?}");
    if first.is_complete() {
        first.assert_blob(&digest, size);
    } else {
        get_blob(&mirror, &origin, &digest).await.assert_blob(&digest, size);
    }
    let log = origin.settled_access_log().await;
    assert!(log.blob_get_bytes(&digest) > cold, "missing bytes not refetched: {:#?}", log.matching(&digest));
    mirror.shutdown().await;
}
