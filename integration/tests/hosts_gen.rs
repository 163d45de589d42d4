//! `damselfly hosts-gen containerd` against a user's own `hosts.toml` and a real containerd:
//! the merge keeps what the user wrote, a second run changes nothing, `ctr` pulls through the
//! daemon, the daemon's absence sends containerd to the registry itself, and `--restore` puts
//! the user's file back byte for byte.

use damselfly_hosts_gen::cli::{run, ContainerdArgs, HostsGenArgs, Runtime};
use damselfly_integration::{Containerd, Mirror, MirrorOpts, Registry};

fn args(config_path: &std::path::Path, registry: &str, mirror: &str) -> HostsGenArgs {
    HostsGenArgs {
        runtime: Runtime::Containerd(ContainerdArgs {
            config_path: config_path.to_owned(),
            registries: vec![registry.to_owned()],
            all_registries: false,
            containerd_config: None,
            mirror: mirror.to_owned(),
            dial_timeout: None,
            dry_run: false,
            restore: false,
        }),
    }
}

fn hosts_gen(args: &HostsGenArgs) -> String {
    let mut out = Vec::new();
    run(args, &mut out).expect("hosts-gen runs");
    String::from_utf8(out).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_daemon_with_the_users_hosts_toml_merged_and_restored() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/hostsgen", "v1", 4).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let ctd = Containerd::start().await.unwrap();
    // The user's file: a comment, the registry as server, an office cache of their own (down).
    let dir = ctd.hosts_dir().join(origin.host());
    std::fs::create_dir_all(&dir).unwrap();
    let theirs = format!(
        "# the team registry\nserver = \"{}\"\n\n# office cache, usually off\n[host.\"http://127.0.0.1:1\"]\n  capabilities = [\"pull\"]\n  skip_verify = true\n",
        origin.url()
    );
    std::fs::write(dir.join("hosts.toml"), &theirs).unwrap();

    let gen = args(&ctd.hosts_dir(), &origin.url(), &mirror.url());
    assert!(hosts_gen(&gen).contains("wrote"));
    let merged = std::fs::read_to_string(dir.join("hosts.toml")).unwrap();
    assert!(merged.contains("# the team registry") && merged.contains("# office cache, usually off"), "{merged}");
    assert!(merged.contains("skip_verify = true"), "{merged}");
    let ours = merged.find(&format!("[host.\"{}\"]", mirror.url())).expect("the daemon's host");
    assert!(ours < merged.find("[host.\"http://127.0.0.1:1\"]").expect("theirs"), "{merged}");
    assert!(merged.contains(&format!("X-Dragonfly-Registry = \"{}\"", origin.url())), "{merged}");
    let saved = ctd.hosts_dir().join("_backup").join(origin.host()).join("hosts.toml");
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), theirs, "the original is kept");
    assert!(hosts_gen(&gen).contains("unchanged"));
    assert_eq!(std::fs::read_to_string(dir.join("hosts.toml")).unwrap(), merged, "a second run changed it");

    // Through the daemon: the origin sees the daemon fetch every blob, and containerd none.
    ctd.pull(&image.reference).await.unwrap();
    let log = origin.settled_access_log().await;
    for (digest, _) in &image.blobs {
        let gets: Vec<_> = log.matching(digest).into_iter().filter(|e| e.method == "GET").collect();
        assert!(!gets.is_empty() && gets.iter().all(|e| e.user_agent.starts_with("damselfly/")), "{gets:#?}");
    }

    // The daemon gone: containerd goes down the list to the registry itself.
    mirror.shutdown().await;
    let alone = ctd.fresh().await.unwrap();
    alone.pull(&image.reference).await.expect("the pull falls back to the registry");
    let log = origin.settled_access_log().await;
    let (big, _) = image.largest_blob();
    assert!(log.matching(&big).iter().any(|e| e.method == "GET" && e.user_agent.starts_with("containerd/")));

    let mut restore = gen.clone();
    if let Runtime::Containerd(a) = &mut restore.runtime {
        (a.registries, a.restore) = (Vec::new(), true);
    }
    hosts_gen(&restore);
    assert_eq!(std::fs::read(dir.join("hosts.toml")).unwrap(), theirs.as_bytes(), "restored byte for byte");
    assert!(!ctd.hosts_dir().join("_backup").exists());
}

/// A daemon that answers 500 to everything: containerd, pointed at it by `hosts-gen`, goes on
/// down its list to the registry, and the pull succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_falls_back_to_the_registry_when_the_daemon_answers_500() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/hostsgen500", "v1", 1).await.unwrap();
    let broken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken_url = format!("http://{}", broken.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = broken.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                    std::future::ready(Ok::<_, std::convert::Infallible>(resp))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    let ctd = Containerd::start().await.unwrap();
    hosts_gen(&args(&ctd.hosts_dir(), &origin.url(), &broken_url));
    ctd.pull(&image.reference).await.expect("the pull falls back to the registry");
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) > 0, "containerd never asked the daemon");
    let log = origin.settled_access_log().await;
    let (big, _) = image.largest_blob();
    assert!(log.matching(&big).iter().any(|e| e.method == "GET" && e.user_agent.starts_with("containerd/")));
}
