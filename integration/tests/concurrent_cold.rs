//! Many clients asking for the same cold blob at once must share one upstream download.

use damselfly_integration::{fetch, http_client, random_bytes, Mirror, MirrorOpts, Registry, MIB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_cold_gets_of_a_100_mib_blob_cost_origin_one_copy() {
    let origin = Registry::start().await.unwrap();
    let size = 100 * MIB;
    let digest = origin.push_blob("test/big", random_bytes(size as usize)).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let url = mirror.blob_url_ns("test/big", &digest, &origin.host());

    // Separate connections (the client keeps no idle pool); bodies are hashed while streaming.
    let client = http_client();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let request = client.get(&url);
        clients.spawn(async move { fetch(request, false).await });
    }
    while let Some(result) = clients.join_next().await {
        result.unwrap().unwrap().assert_blob(&digest, size);
    }

    let log = origin.settled_access_log().await;
    log.assert_copies_at_most(&[(digest, size)], 1.05);
}
