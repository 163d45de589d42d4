//! `damselfly hosts-gen` with real clients against the real registry.
//!
//! - containerd: the merge into a user's own `hosts.toml` keeps what the user wrote, a second
//!   run changes nothing, `ctr` pulls through the daemon, the daemon's absence or a 500 sends
//!   containerd to the registry itself, and `--restore` puts the user's file back byte for byte.
//! - skopeo: one daemon serves two registries through a generated registries.conf drop-in, and
//!   skopeo goes to the registry when the daemon is down or answers 500.

use std::path::Path;

use damselfly_hosts_gen::cli::{run, ContainerdArgs, HostsGenArgs, RegistriesConfArgs, Runtime};
use damselfly_integration::{sha256_digest, skopeo, BrokenDaemon, Containerd, Image, Mirror, MirrorOpts, Registry};

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
    assert!(log.blobs_fetched_only_by(&image.blobs, "damselfly/"), "{:#?}", log.matching("/blobs/"));

    // The daemon gone: containerd goes down the list to the registry itself.
    mirror.shutdown().await;
    let alone = ctd.fresh().await.unwrap();
    alone.pull(&image.reference).await.expect("the pull falls back to the registry");
    let log = origin.settled_access_log().await;
    let (big, _) = image.largest_blob();
    assert!(log.fetched_by(&big, "containerd/"));

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
    let broken = BrokenDaemon::start().await.unwrap();
    let ctd = Containerd::start().await.unwrap();
    hosts_gen(&args(&ctd.hosts_dir(), &origin.url(), &broken.url()));
    ctd.pull(&image.reference).await.expect("the pull falls back to the registry");
    assert!(broken.hits() > 0, "containerd never asked the daemon");
    let log = origin.settled_access_log().await;
    let (big, _) = image.largest_blob();
    assert!(log.fetched_by(&big, "containerd/"));
}

/// Writes the skopeo drop-in for `registries` through the daemon at `mirror` (`HOST:PORT`).
fn registries_conf(file: &Path, registries: &[String], mirror: &str) -> String {
    hosts_gen(&HostsGenArgs {
        runtime: Runtime::RegistriesConf(RegistriesConfArgs {
            file: file.to_owned(),
            main_file: file.with_file_name("no-main-registries.conf"),
            registries: registries.to_vec(),
            mirror: mirror.to_owned(),
            insecure: true,
            dry_run: false,
            restore: false,
        }),
    })
}

/// `skopeo copy` of `reference` with the drop-in as its registries.conf; checks every blob.
async fn skopeo_copy(conf: &Path, image: &Image, dest: &Path) {
    let conf = conf.to_string_lossy();
    let src = format!("docker://{}", image.reference);
    let dest_arg = format!("dir:{}", dest.display());
    skopeo(&["--registries-conf", &conf, "copy", &src, &dest_arg]).await.expect("skopeo copies");
    for (digest, size) in &image.blobs {
        let file = std::fs::read(dest.join(digest.trim_start_matches("sha256:"))).unwrap();
        assert_eq!((file.len() as u64, sha256_digest(&file)), (*size, digest.clone()), "{digest}");
    }
}

/// skopeo sends a mirror neither `ns` nor a header: the drop-in names each registry in the
/// mirror's path, and one daemon, whose own default registry has none of these images, serves
/// both registries. With the daemon gone, skopeo goes to each registry itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_two_registries_through_one_daemon_with_a_generated_drop_in() {
    let (one, two) = (Registry::start().await.unwrap(), Registry::start().await.unwrap());
    let image_one = one.push_image("team/one", "v1", 4).await.unwrap();
    let image_two = two.push_image("team/two", "v1", 4).await.unwrap();
    let elsewhere = Registry::start().await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&elsewhere.url())).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let conf = work.path().join("registries.conf.d/damselfly.conf");
    let wrote = registries_conf(&conf, &[one.host(), two.host()], &mirror.host());
    assert!(wrote.contains("wrote"), "{wrote}");
    let text = std::fs::read_to_string(&conf).unwrap();
    let spelled = format!("{}/127.0.0.1_{}", mirror.host(), one.addr().port());
    assert!(text.contains(&spelled), "{text}");

    skopeo_copy(&conf, &image_one, &work.path().join("one")).await;
    skopeo_copy(&conf, &image_two, &work.path().join("two")).await;
    for (origin, image) in [(&one, &image_one), (&two, &image_two)] {
        let log = origin.settled_access_log().await;
        assert!(log.blobs_fetched_only_by(&image.blobs, "damselfly/"), "{:#?}", log.matching("/blobs/"));
    }
    assert_eq!(elsewhere.settled_access_log().await.count("GET", "/blobs/"), 0);

    // A second copy of each comes from the daemon's cache.
    skopeo_copy(&conf, &image_one, &work.path().join("one-again")).await;
    skopeo_copy(&conf, &image_two, &work.path().join("two-again")).await;
    one.settled_access_log().await.assert_copies_at_most(&image_one.blobs, 1.05);
    two.settled_access_log().await.assert_copies_at_most(&image_two.blobs, 1.05);

    mirror.shutdown().await;
    skopeo_copy(&conf, &image_one, &work.path().join("alone")).await;
    let log = one.settled_access_log().await;
    let (big, _) = image_one.largest_blob();
    assert!(log.fetched_by(&big, "skopeo/"), "no fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_falls_back_to_the_registry_when_the_daemon_answers_500() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("team/broken", "v1", 1).await.unwrap();
    let broken = BrokenDaemon::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let conf = work.path().join("damselfly.conf");
    registries_conf(&conf, &[origin.host()], &broken.host());
    skopeo_copy(&conf, &image, &work.path().join("out")).await;
    assert!(broken.hits() > 0, "skopeo never asked the daemon");
    let log = origin.settled_access_log().await;
    assert!(log.blobs_fetched_only_by(&image.blobs, "skopeo/"), "{:#?}", log.matching("/blobs/"));
}

/// Kubelet pulls through containerd's CRI plugin, which reads hosts files only where its
/// `registry.config_path` points. `hosts-gen containerd --containerd-config` sets it in a
/// node's own config (keeping the rest), and the CRI pull goes through the daemon; with the
/// daemon gone, a CRI pull on a fresh node goes to the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cri_plugin_pulls_through_the_daemon_once_hosts_gen_sets_config_path() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("test/cri", "v1", 4).await.unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url())).await.unwrap();
    let generate = |mirror_url: String| {
        let origin_url = origin.url();
        move |config: &Path, hosts_dir: &Path| {
            let mut gen = args(hosts_dir, &origin_url, &mirror_url);
            if let Runtime::Containerd(a) = &mut gen.runtime {
                a.containerd_config = Some(config.to_owned());
            }
            let said = hosts_gen(&gen);
            assert!(said.contains("restart containerd"), "{said}");
            let text = std::fs::read_to_string(config).unwrap();
            assert!(text.contains("# the node's own CRI settings") && text.contains("sandbox_image"), "{text}");
            assert!(text.contains(&format!("config_path = \"{}\"", hosts_dir.display())), "{text}");
            Ok(())
        }
    };
    let node = Containerd::start_cri(generate(mirror.url())).await.unwrap();
    node.cri_pull(&image.reference).await.expect("the CRI pull succeeds");
    let log = origin.settled_access_log().await;
    assert!(log.blobs_fetched_only_by(&image.blobs, "damselfly/"), "{:#?}", log.matching("/blobs/"));

    let daemon_url = mirror.url();
    mirror.shutdown().await;
    let alone = Containerd::start_cri(generate(daemon_url)).await.unwrap();
    alone.cri_pull(&image.reference).await.expect("the CRI pull falls back to the registry");
    let log = origin.settled_access_log().await;
    let (big, _) = image.largest_blob();
    assert!(log.fetched_by(&big, "containerd/"));
}
