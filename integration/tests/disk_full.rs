//! A full disk is not an error: the blob streams through, verified, without being cached.

use std::path::Path;
use std::process::Command;

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use damselfly_integration::util::hex;
use damselfly_integration::{fetch, http_client, random_bytes, Mirror, MirrorOpts, Registry, MIB};

/// A small tmpfs standing in for a full disk; unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mib: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount(8) runs");
        assert!(status.success(), "mounting a tmpfs needs root (the test suite runs as root)");
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_streams_through_verified_without_caching() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes((24 * MIB) as usize);
    let size = data.len() as u64;
    let digest = origin.push_blob("test/full", data).await.unwrap();
    // The quota would allow the blob; the disk (32 MiB) does not leave the store's headroom.
    let fs = SmallFs::mount(32);
    let data_dir = fs.path().join("data");
    let mirror = Mirror::start(MirrorOpts::new(&origin.url()).data_dir(&data_dir).cache_quota(1 << 30)).await.unwrap();
    let client = http_client();
    let url = mirror.blob_url_ns("test/full", &digest, &origin.host());

    for _ in 0..2 {
        fetch(client.get(&url), false).await.unwrap().assert_blob(&digest, size);
    }
    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(metrics.sum("damselfly_passthrough_total", &[]), 2.0, "both requests streamed through");
    assert_eq!(metrics.sum("damselfly_cache_tasks", &[]), 0.0, "nothing was cached");
    assert_eq!(metrics.sum("damselfly_download_bytes_total", &[("source", "origin")]), 2.0 * size as f64);
    let log = origin.settled_access_log().await;
    assert_eq!(log.blob_get_bytes(&digest), 2 * size, "each request read the origin once, no more");
    mirror.shutdown().await;
}

/// Regression: another writer filled the disk while a blob arrived (containerd unpacking layers
/// onto the same disk, say), the cache's next write failed, and the response broke half way.
/// A task's blocks are now allocated when it is created, so its writes cannot run out of space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_another_writer_mid_download_does_not_break_the_response() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes((64 * MIB) as usize);
    let size = data.len() as u64;
    let digest = origin.push_blob("test/filled", data).await.unwrap();
    // Room for the blob and the store's headroom when the request starts.
    let fs = SmallFs::mount(400);
    let data_dir = fs.path().join("data");
    let mirror = Mirror::start(MirrorOpts::new(&origin.url()).data_dir(&data_dir).cache_quota(1 << 30)).await.unwrap();
    let url = mirror.blob_url_ns("test/filled", &digest, &origin.host());

    let response = http_client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    // Read a little, then let another writer take every free byte while the blob still
    // arrives (the fetch waits for this reader, so most of it is yet to be written).
    while received < MIB {
        let chunk = body.next().await.expect("body continues").expect("body chunk");
        hasher.update(&chunk);
        received += chunk.len() as u64;
    }
    let filler = fs.path().join("filler");
    let filled = tokio::task::spawn_blocking(move || fill(&filler)).await.unwrap();
    assert!(filled > 0, "the filler wrote something before the disk was full");
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("body broke after {received} bytes with the disk full: {e:#}"));
        hasher.update(&chunk);
        received += chunk.len() as u64;
    }
    assert_eq!(received, size);
    assert_eq!(format!("sha256:{}", hex(&hasher.finalize())), digest);

    // The blob was cached despite the full disk: the next request does not reach the origin.
    fetch(http_client().get(&url), false).await.unwrap().assert_blob(&digest, size);
    let metrics = mirror.metrics().await.unwrap();
    assert_eq!(metrics.sum("damselfly_passthrough_total", &[]), 0.0);
    assert_eq!(metrics.sum("damselfly_download_bytes_total", &[("source", "cache")]), size as f64);
    let log = origin.settled_access_log().await;
    assert_eq!(log.blob_get_bytes(&digest), size, "the origin sent the blob once");
    mirror.shutdown().await;
}

/// Writes to `path` until the disk refuses; returns how many bytes it took.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; MIB as usize];
    let mut written = 0;
    while let Ok(n) = file.write(&block) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}
