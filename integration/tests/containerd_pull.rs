//! containerd (ctr with a hosts.toml mirror entry) pulling through the daemon: two nodes pulling
//! the same image must cost the origin about one copy of each blob and one manifest GET.

use damselfly_integration::{Containerd, Mirror, MirrorOpts, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containerd_pulls_through_mirror_cost_origin_one_copy_of_each_blob() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/ctd", "v1", 20).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();

    // hosts.toml: the mirror first (pull+resolve), the origin as `server`. containerd then asks
    // the mirror with ?ns=<origin host> and silently falls back to the origin if it fails, so
    // only the origin's log can tell whether the mirror did its job.
    let first = Containerd::start().await.unwrap();
    first.write_hosts_toml(&origin.host(), &origin.url(), &mirror.url()).unwrap();
    first.pull(&image.reference).await.unwrap();
    // A second node: fresh content store, same hosts.toml.
    let second = first.fresh().await.unwrap();
    second.pull(&image.reference).await.unwrap();

    let log = origin.settled_access_log().await;
    log.assert_copies_at_most(&image.blobs, 1.05);
    // The manifest fetched by digest is cached: the second pull must not fetch it again. (Zero
    // is fine too: a daemon may cache the bytes it got when resolving the tag.)
    let by_digest = log.count("GET", &format!("/manifests/{}", image.manifest_digest));
    assert!(by_digest <= 1, "manifest by digest fetched {by_digest} times: {:#?}", log.matching("/manifests/"));

    let metrics = mirror.metrics().await.unwrap();
    let from_cache = metrics.sum("damselfly_download_bytes_total", &[("source", "cache")]);
    assert!(from_cache > 0.0, "no bytes served from cache: {:#?}", metrics.with_prefix("damselfly_"));
}
