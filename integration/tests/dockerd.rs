//! A real dockerd through the daemon, both ways users run it:
//!
//! - as Dragonfly users do: `HTTPS_PROXY` at the daemon, which intercepts the registry's TLS,
//!   dockerd trusting the daemon's CA for that registry; dockerd pulls an image from a TLS
//!   registry through it, and the second pull's blobs come from the cache;
//! - with `registry-mirrors`, as `hosts-gen docker` writes it; dockerd goes to Docker Hub (a
//!   stand-in, `FakeHub`) when the daemon fails or is down.

use std::collections::HashMap;

use damselfly_hosts_gen::cli::{run, DockerArgs, HostsGenArgs, Runtime};
use damselfly_integration::{
    non_loopback_ipv4, BrokenDaemon, DockerTrust, Dockerd, FakeHub, Mirror, MirrorOpts, Registry, TestCa,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_a_tls_registry_through_the_intercepting_proxy() {
    let Some(ip) = non_loopback_ipv4() else {
        eprintln!("SKIPPED dockerd_pulls_a_tls_registry_through_the_intercepting_proxy: no non-loopback address");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let registry_ca = TestCa::new(work.path(), "registry-ca");
    let (cert, key) = registry_ca.issue("registry", &[&ip.to_string()]);
    let origin = Registry::start_tls_at(ip, &cert, &key).await.unwrap();
    let image = origin.push_image("team/docker", "v1", 4).await.unwrap();
    let elsewhere = Registry::start().await.unwrap();
    let mut opts = MirrorOpts::new(&elsewhere.url());
    opts.config.proxy_intercept = vec![ip.to_string()];
    opts.config.upstream_ca_file = Some(registry_ca.cert_path());
    let mirror = Mirror::start(opts).await.unwrap();
    let _trust = DockerTrust::install(&origin.host(), &mirror.data_dir().join("proxy-ca.pem")).unwrap();
    let env = HashMap::from([("HTTPS_PROXY", mirror.url()), ("HTTP_PROXY", mirror.url())]);
    let dockerd = Dockerd::start(&env).await.unwrap();

    dockerd.docker(&["pull", &image.reference]).await.unwrap();
    let log = origin.settled_access_log().await;
    assert!(log.blobs_fetched_only_by(&image.blobs, "damselfly/"), "{:#?}", log.matching("/blobs/"));
    dockerd.docker(&["rmi", &image.reference]).await.unwrap();
    dockerd.docker(&["pull", &image.reference]).await.unwrap();
    origin.settled_access_log().await.assert_copies_at_most(&image.blobs, 1.05);
    let metrics = mirror.metrics().await.unwrap();
    assert!(metrics.sum("damselfly_download_bytes_total", &[("source", "cache")]) > 0.0);
    assert!(metrics.sum("damselfly_proxy_requests_total", &[("kind", "intercept")]) >= 2.0);
}

/// dockerd's `registry-mirrors`, merged into its `daemon.json` by `hosts-gen docker`: dockerd
/// sends Docker Hub pulls to the daemon, which reads them from its default registry (here a
/// local one standing in for Docker Hub, which the tests cannot reach).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_docker_hub_images_through_the_mirror_hosts_gen_docker_wrote() {
    let hub = Registry::start().await.unwrap();
    let image = hub.push_image("library/damselfly-test", "v1", 4).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&hub.url())).await.unwrap();
    let dockerd = Dockerd::start_with(&HashMap::new(), |daemon_json| {
        let args = HostsGenArgs {
            runtime: Runtime::Docker(DockerArgs {
                daemon_json: daemon_json.to_owned(),
                mirror: mirror.url(),
                dry_run: false,
                restore: false,
            }),
        };
        run(&args, &mut Vec::new())?;
        let text = std::fs::read_to_string(daemon_json)?;
        anyhow::ensure!(text.contains("max-concurrent-downloads") && text.contains(&mirror.url()), "{text}");
        Ok(())
    })
    .await
    .unwrap();
    dockerd.docker(&["pull", "damselfly-test:v1"]).await.unwrap();
    let log = hub.settled_access_log().await;
    assert!(log.blobs_fetched_only_by(&image.blobs, "damselfly/"), "{:#?}", log.matching("/blobs/"));
}

/// dockerd goes to Docker Hub itself when its mirror, the daemon, answers 500 or is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_falls_back_to_docker_hub_when_the_daemon_answers_500_or_is_down() {
    let work = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(work.path()).await.unwrap();
    let image = hub.registry.push_image("library/damselfly-fallback", "v1", 1).await.unwrap();
    let broken = BrokenDaemon::start().await.unwrap();
    let env =
        HashMap::from([("HTTPS_PROXY", hub.proxy_url.clone()), ("SSL_CERT_FILE", hub.ca_file.display().to_string())]);
    let mirror_url = broken.url();
    let dockerd = Dockerd::start_with(&env, |daemon_json| {
        let args = HostsGenArgs {
            runtime: Runtime::Docker(DockerArgs {
                daemon_json: daemon_json.to_owned(),
                mirror: mirror_url,
                dry_run: false,
                restore: false,
            }),
        };
        run(&args, &mut Vec::new())?;
        Ok(())
    })
    .await
    .unwrap();
    let pulled_from_hub = |log: &damselfly_integration::AccessLog| {
        let (big, _) = image.largest_blob();
        log.gets(&big).iter().filter(|e| e.user_agent.starts_with("docker/")).count()
    };

    dockerd.docker(&["pull", "damselfly-fallback:v1"]).await.expect("the pull falls back to Docker Hub");
    assert!(broken.hits() > 0, "dockerd never asked the daemon");
    assert_eq!(pulled_from_hub(&hub.registry.settled_access_log().await), 1);

    dockerd.docker(&["rmi", "damselfly-fallback:v1"]).await.unwrap();
    drop(broken);
    dockerd.docker(&["pull", "damselfly-fallback:v1"]).await.expect("the pull falls back to Docker Hub");
    assert_eq!(pulled_from_hub(&hub.registry.settled_access_log().await), 2);
    assert!(hub.tunnels() > 0);
}
