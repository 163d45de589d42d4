//! The mirror API over HTTPS (`--tls-cert`/`--tls-key`): containerd and skopeo pull through it
//! with the daemon's CA trusted and nothing marked insecure, and HTTP/2 is offered by ALPN.

use damselfly_integration::{skopeo, Containerd, Mirror, MirrorOpts, Registry, TestCa};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_and_skopeo_pull_through_the_mirror_over_https() {
    let work = tempfile::tempdir().unwrap();
    let ca = TestCa::new(work.path(), "mirror-ca");
    let (cert, key) = ca.issue("mirror", &["127.0.0.1", "localhost"]);
    let origin = Registry::start().await.unwrap();
    let for_ctr = origin.push_image("team/tls-ctr", "v1", 4).await.unwrap();
    let for_skopeo = origin.push_image("team/tls-skopeo", "v1", 4).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url()).tls(&cert, &key)).await.unwrap();
    assert!(mirror.url().starts_with("https://"));

    let pem = std::fs::read(ca.cert_path()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let resp = client.get(format!("{}/v2/", mirror.url())).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_2));

    let ctd = Containerd::start().await.unwrap();
    let hosts = ctd.hosts_dir().join(origin.host());
    std::fs::create_dir_all(&hosts).unwrap();
    let toml = format!(
        "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
        origin.url(),
        mirror.url(),
        ca.cert_path().display()
    );
    std::fs::write(hosts.join("hosts.toml"), toml).unwrap();
    ctd.pull(&for_ctr.reference).await.unwrap();
    let log = origin.settled_access_log().await;
    assert!(log.blobs_fetched_only_by(&for_ctr.blobs, "damselfly/"), "{:#?}", log.matching("/blobs/"));

    // skopeo: the mirror entry is not insecure; the CA comes from the certificate directory.
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(ca.cert_path(), certs.join("ca.crt")).unwrap();
    let conf = work.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{0}\"\nlocation = \"{0}\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"{1}\"\n",
            origin.host(),
            mirror.host()
        ),
    )
    .unwrap();
    let dest = format!("dir:{}", work.path().join("out").display());
    let src = format!("docker://{}", for_skopeo.reference);
    let (conf, certs) = (conf.to_string_lossy(), certs.to_string_lossy());
    skopeo(&["--registries-conf", &conf, "copy", "--src-cert-dir", &certs, &src, &dest]).await.unwrap();
    let log = origin.settled_access_log().await;
    assert!(log.blobs_fetched_only_by(&for_skopeo.blobs, "damselfly/"), "{:#?}", log.matching("/blobs/"));
}
