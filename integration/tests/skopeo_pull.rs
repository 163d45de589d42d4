//! skopeo pulling through the daemon as a registries.conf mirror. skopeo sends no `ns`, so the
//! daemon's configured `registry_mirror` names the upstream.

use damselfly_integration::{sha256_digest, skopeo_copy_via_mirror, Mirror, MirrorOpts, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_skopeo_copies_through_mirror_cost_origin_one_copy_of_each_blob() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/skopeo", "v1", 8).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let work = tempfile::tempdir().unwrap();

    for out in ["out1", "out2"] {
        let dest = work.path().join(out);
        skopeo_copy_via_mirror(work.path(), &origin.host(), &mirror.host(), &image.reference, &dest).await.unwrap();
        for (digest, size) in &image.blobs {
            let file = std::fs::read(dest.join(digest.trim_start_matches("sha256:"))).unwrap();
            assert_eq!((file.len() as u64, sha256_digest(&file)), (*size, digest.clone()), "{out}: {digest}");
        }
    }

    // If the mirror had failed, skopeo would have used the origin for all blobs of that copy.
    let log = origin.settled_access_log().await;
    log.assert_copies_at_most(&image.blobs, 1.05);
    let metrics = mirror.metrics().await.unwrap();
    let from_cache = metrics.sum("damselfly_download_bytes_total", &[("source", "cache")]);
    assert!(from_cache > 0.0, "no bytes served from cache: {:#?}", metrics.with_prefix("damselfly_"));
}
