//! Upstream failures mid-body: the client gets the right bytes or a broken connection, never a
//! clean short or wrong body, and nothing bad is cached.

use damselfly_integration::{fetch, http_client, random_bytes, FaultProxy, Mirror, MirrorOpts, Registry, Times, MIB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_mid_blob_yields_correct_body_or_broken_connection() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes((16 * MIB) as usize);
    let size = data.len() as u64;
    let digest = origin.push_blob("test/cut", data).await.unwrap();
    let proxy = FaultProxy::start(origin.addr()).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&proxy.url())).await.unwrap();
    let url = format!("{}/v2/test/cut/blobs/{digest}", mirror.url());

    // 3 MiB is inside the first 4 MiB piece, so the cut hits whether the daemon streams the
    // whole blob or fetches it piece by piece.
    proxy.cut_after(&digest, 3 * MIB, Times::Once);
    let first = fetch(http_client().get(&url), false).await.unwrap();
    assert_eq!(proxy.fired(&digest), 1, "the fault never hit: {:#?}", proxy.requests());
    assert!(!first.is_clean_but_wrong(&digest, size), "clean but short/wrong body after an upstream cut: {first:?}");
    if first.is_complete() {
        // The daemon resumed upstream (by range) and delivered everything.
        first.assert_blob(&digest, size);
    }
    // Either way the blob is fine afterwards.
    fetch(http_client().get(&url), false).await.unwrap().assert_blob(&digest, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_serving_wrong_bytes_breaks_the_client_connection_and_is_not_cached() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes((12 * MIB) as usize);
    let size = data.len() as u64;
    let digest = origin.push_blob("test/corrupt", data).await.unwrap();
    let proxy = FaultProxy::start(origin.addr()).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&proxy.url())).await.unwrap();
    let url = format!("{}/v2/test/corrupt/blobs/{digest}", mirror.url());

    proxy.corrupt(&digest, Times::Always);
    let bad = fetch(http_client().get(&url), false).await.unwrap();
    assert!(proxy.fired(&digest) >= 1, "the fault never hit: {:#?}", proxy.requests());
    // Bytes stream while being hashed and the last ones are held back until the digest matches,
    // so the client sees its connection break before the end. (An error status without a body
    // would also be safe, if slower.)
    if bad.status.is_success() {
        assert!(!bad.is_complete(), "a body with the wrong digest ended cleanly: {bad:?}");
        assert!(bad.received < size, "all {size} bytes delivered before the digest mismatch was signalled");
    } else {
        assert!(bad.status.is_server_error(), "unexpected status {}", bad.status);
    }

    // The wrong bytes were not kept: a clean upstream now yields the right blob.
    proxy.clear();
    fetch(http_client().get(&url), false).await.unwrap().assert_blob(&digest, size);
}
