//! Real nydusd 2.2 mounting a RAFS v6 image whose blob is in the real registry, its backend as
//! `damselfly hosts-gen nydusd` prints it: through the daemon in mirror mode and in proxy mode
//! (the daemon's own default registry is another one, so the request decides), every file
//! intact, the origin paying about one copy for both mounts; and the registry itself when the
//! daemon is down or answers 500.

use damselfly_hosts_gen::nydusd::{backend, Mode};
use damselfly_hosts_gen::registry::Registry as Named;
use damselfly_integration::{fuse_missing, BrokenDaemon, Mirror, MirrorOpts, NydusImage, Nydusd, Registry};

const REPO: &str = "test/nydus";

/// nydusd's backend for the image's registry, through `daemon` (health at `health`).
fn through(origin: &Registry, mode: Mode, daemon: &str, health: &str) -> serde_json::Value {
    let named = Named::parse(&origin.url()).expect("registry");
    backend(&named, REPO, mode, daemon, health)
}

/// Whether any GET of the blob reached the origin from someone other than the daemon.
fn read_directly(origin: &Registry, image: &NydusImage) -> bool {
    origin.access_log().gets(&image.blob_digest).iter().any(|e| !e.user_agent.starts_with("damselfly/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nydusd_reads_every_file_through_the_daemon_in_mirror_and_proxy_mode() {
    if let Some(why) = fuse_missing() {
        eprintln!("SKIPPED nydusd_reads_every_file_through_the_daemon_in_mirror_and_proxy_mode: {why}");
        return;
    }
    let origin = Registry::start().await.unwrap();
    let image = NydusImage::build_and_push(&origin, REPO, 24).await.unwrap();
    let elsewhere = Registry::start().await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&elsewhere.url())).await.unwrap();
    let health = format!("{}/healthy", mirror.health_url());

    for mode in [Mode::Mirror, Mode::Proxy] {
        let nydusd = Nydusd::mount(&image, through(&origin, mode, &mirror.url(), &health)).await.unwrap();
        nydusd.check_files(&image).await.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    }
    let log = origin.settled_access_log().await;
    log.assert_copies_at_most(&[(image.blob_digest.clone(), image.blob_size)], 1.1);
    assert!(!read_directly(&origin, &image), "nydusd went around the daemon: {:#?}", log.matching(&image.blob_digest));
    assert_eq!(elsewhere.settled_access_log().await.count("GET", "/blobs/"), 0);
    let metrics = mirror.metrics().await.unwrap();
    assert!(metrics.sum("damselfly_proxy_requests_total", &[("kind", "cache")]) > 0.0, "proxy mode bypassed the proxy");

    // The daemon gone: nydusd reads from the registry itself, in both modes.
    mirror.shutdown().await;
    for mode in [Mode::Mirror, Mode::Proxy] {
        let nydusd = Nydusd::mount(&image, through(&origin, mode, "http://127.0.0.1:1", &health)).await.unwrap();
        nydusd.check_files(&image).await.unwrap_or_else(|e| panic!("{mode:?} without the daemon: {e}"));
    }
    assert!(read_directly(&origin, &image));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nydusd_reads_from_the_registry_when_the_daemon_answers_500() {
    if let Some(why) = fuse_missing() {
        eprintln!("SKIPPED nydusd_reads_from_the_registry_when_the_daemon_answers_500: {why}");
        return;
    }
    let origin = Registry::start().await.unwrap();
    let image = NydusImage::build_and_push(&origin, REPO, 4).await.unwrap();
    let broken = BrokenDaemon::start().await.unwrap();
    for mode in [Mode::Mirror, Mode::Proxy] {
        let health = format!("{}/healthy", broken.url());
        let nydusd = Nydusd::mount(&image, through(&origin, mode, &broken.url(), &health)).await.unwrap();
        nydusd.check_files(&image).await.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    }
    assert!(broken.hits() > 0, "nydusd never asked the daemon");
    assert!(read_directly(&origin, &image));
}
