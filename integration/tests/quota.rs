//! The cache respects its disk quota by evicting least recently used blobs.

use std::time::Duration;

use damselfly_integration::{
    disk_usage, fetch, http_client, poll_until, random_bytes, Mirror, MirrorOpts, Registry, MIB,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stays_within_quota_and_evicts_least_recently_used_blobs() {
    let quota = 40 * MIB;
    // Metadata and a piece in flight; far less than one blob.
    let slack = 4 * MIB;
    let origin = Registry::start().await.unwrap();
    let mut blobs = Vec::new();
    for _ in 0..5 {
        let data = random_bytes((15 * MIB) as usize);
        let size = data.len() as u64;
        blobs.push((origin.push_blob("test/quota", data).await.unwrap(), size));
    }
    let mirror = Mirror::start(MirrorOpts::new(&origin.url()).cache_quota(quota)).await.unwrap();
    let client = http_client();
    let get = |digest: &str| fetch(client.get(mirror.blob_url_ns("test/quota", digest, &origin.host())), false);

    for (i, (digest, size)) in blobs.iter().enumerate() {
        get(digest).await.unwrap().assert_blob(digest, *size);
        // Eviction may finish just after the response; give it a moment, not forever.
        poll_until(&format!("cache within quota after blob {i}"), Duration::from_secs(10), || async {
            let metrics = mirror.metrics().await?;
            anyhow::ensure!(metrics.has("damselfly_cache_bytes"), "no damselfly_cache_bytes metric");
            let reported = metrics.sum("damselfly_cache_bytes", &[]);
            let on_disk = disk_usage(mirror.data_dir());
            if reported <= quota as f64 && on_disk <= quota + slack {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("damselfly_cache_bytes = {reported}, on disk {on_disk}, quota {quota}"))
            }
        })
        .await
        .unwrap();
    }

    // The most recent blob is still cached; the first one was evicted and comes from the origin.
    let (last, last_size) = blobs.last().unwrap();
    let before = origin.settled_access_log().await;
    get(last).await.unwrap().assert_blob(last, *last_size);
    let after = origin.settled_access_log().await;
    assert_eq!(
        after.blob_get_bytes(last),
        before.blob_get_bytes(last),
        "the most recent blob was not served from cache"
    );

    let (first, first_size) = &blobs[0];
    get(first).await.unwrap().assert_blob(first, *first_size);
    let end = origin.settled_access_log().await;
    assert!(
        end.blob_get_bytes(first) > after.blob_get_bytes(first),
        "the first blob was not re-fetched: was it evicted at all? {:#?}",
        end.matching(first)
    );
}
