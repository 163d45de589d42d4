//! A full disk is not an error: the blob streams through, verified, without being cached.

use std::path::Path;
use std::process::Command;

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
