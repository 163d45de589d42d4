//! The `damselfly` binary itself: flags, the three listeners, and one blob through it.

use damselfly_integration::{fetch, http_client, random_bytes, Mirror, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damselfly_binary_serves_api_health_metrics_and_a_blob() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes(1 << 20);
    let digest = origin.push_blob("test/cli", data.clone()).await.unwrap();
    let daemon = Mirror::spawn_binary(&["--registry-mirror", &origin.url()]).await.unwrap();
    let client = http_client();

    let base = client.get(format!("{}/v2/", daemon.url())).send().await.unwrap();
    assert_eq!(base.status(), 200, "log: {}", daemon.log());
    assert_eq!(
        base.headers().get("docker-distribution-api-version").map(|v| v.to_str().unwrap()),
        Some("registry/2.0")
    );

    for path in ["/server/ping", "/healthy"] {
        let resp = client.get(format!("{}{path}", daemon.health_url())).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }

    let metrics = client.get(daemon.metrics_url()).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().lines().any(|l| l.starts_with("damselfly_")), "no damselfly_ series");

    // No ns: the upstream is --registry-mirror.
    fetch(client.get(format!("{}/v2/test/cli/blobs/{digest}", daemon.url())), false)
        .await
        .unwrap()
        .assert_blob(&digest, data.len() as u64);
}
