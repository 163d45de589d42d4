use super::*;
use damselfly_mirror::upstream::UpstreamConfig;

fn upstream(allow: &[&str]) -> Upstream {
    let cfg =
        UpstreamConfig { allow_registries: allow.iter().map(|s| s.to_string()).collect(), ..UpstreamConfig::default() };
    Upstream::new(cfg).expect("upstream")
}

const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const E: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[test]
fn a_job_url_names_its_registry_repository_and_reference() {
    let up = upstream(&[]);
    let image = ImageRef::parse("http://127.0.0.1:5000/v2/library/app/manifests/v1", Target::Image, &up).expect("ok");
    assert_eq!((image.repository.as_str(), image.reference.as_str()), ("library/app", "v1"));
    assert_eq!((image.registry_url().as_str(), image.insecure()), ("http://127.0.0.1:5000", true));
    let harbor =
        ImageRef::parse(&format!("https://harbor.example/v2/p/r/manifests/{D}"), Target::Image, &up).expect("ok");
    assert_eq!((harbor.registry_url().as_str(), harbor.insecure()), ("https://harbor.example", false));
    let blob = ImageRef::parse(&format!("https://r.example/v2/a/blobs/{D}"), Target::File, &up).expect("ok");
    assert_eq!(blob.reference, D);
}

#[test]
fn urls_a_preheat_cannot_use_are_refused_with_the_reason() {
    let up = upstream(&["registry.example"]);
    let refused = |url: &str, target| ImageRef::parse(url, target, &up).expect_err(url).to_string();
    assert!(refused("ftp://registry.example/v2/a/manifests/1", Target::Image).contains("scheme"));
    assert!(refused("https://registry.example/a/manifests/1", Target::Image).contains("/v2/<repository>"));
    assert!(refused("https://registry.example/v2/a/tags/list", Target::Image).contains("manifests"));
    assert!(refused("https://registry.example/v2/A/manifests/1", Target::Image).contains("repository"));
    assert!(refused("https://registry.example/v2/a/manifests/-x", Target::Image).contains("reference"));
    assert!(refused("https://other.example/v2/a/manifests/1", Target::Image).contains("not allowed"));
    assert!(refused("http://169.254.169.254/v2/a/manifests/1", Target::Image).contains("not allowed"));
}

#[test]
fn a_file_job_names_a_registry_blob_or_a_plain_url() {
    let blob = format!("https://r.example/v2/a/blobs/{D}");
    assert_eq!(plain_file(&blob, Target::File).expect("ok"), None, "a registry blob");
    assert_eq!(plain_file("https://r.example/v2/a/manifests/1", Target::Image).expect("ok"), None);
    let plain = plain_file("HTTPS://Files.Example:443/models/a.bin?v=1", Target::File).expect("ok");
    assert_eq!(plain.as_deref(), Some("https://files.example/models/a.bin?v=1"), "in its canonical spelling");
    assert!(check_url("https://files.example/models/a.bin", Target::File).is_ok());
    assert!(check_url("https://files.example/models/a.bin", Target::Image).is_err());
    let fragment = plain_file("https://files.example/a.bin#part", Target::File).expect("ok");
    assert_eq!(fragment.as_deref(), Some("https://files.example/a.bin"), "a fragment is never sent");
    assert!(plain_file("https://r.example/v2/a/blobs/sha512:00", Target::File).is_err(), "a registry blob's errors");
    for bad in ["ftp://files.example/a", "https://user:pw@files.example/a", "not a url"] {
        assert!(plain_file(bad, Target::File).is_err(), "{bad}");
        assert!(check_url(bad, Target::File).is_err(), "{bad}");
    }
}

fn descriptor(platform: Option<(&str, &str, Option<&str>)>, digest: char) -> serde_json::Value {
    let mut d = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", digest.to_string().repeat(64)),
        "size": 100,
    });
    if let Some((os, arch, variant)) = platform {
        d["platform"] = serde_json::json!({"os": os, "architecture": arch});
        if let Some(v) = variant {
            d["platform"]["variant"] = v.into();
        }
    }
    d
}

#[test]
fn an_index_resolves_to_the_platforms_asked_for() {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            descriptor(Some(("linux", "amd64", None)), 'a'),
            descriptor(Some(("linux", "arm64", Some("v8"))), 'b'),
            descriptor(Some(("unknown", "unknown", None)), 'c'),
        ],
    });
    let bytes = serde_json::to_vec(&index).expect("json");
    assert!(is_index("", &bytes));
    let parsed = ImageIndex::from_reader(&bytes[..]).expect("index");
    let names = |ps: &[&str]| {
        let wanted: Vec<String> = ps.iter().map(|s| s.to_string()).collect();
        choose(parsed.manifests(), &wanted).map(|c| c.into_iter().map(|(n, _)| n).collect::<Vec<_>>())
    };
    assert_eq!(names(&[]).expect("all"), ["linux/amd64", "linux/arm64/v8"]);
    assert_eq!(names(&["linux/arm64"]).expect("arm"), ["linux/arm64/v8"]);
    let err = names(&["windows/amd64"]).expect_err("none").to_string();
    assert!(err.contains("windows/amd64") && err.contains("linux/amd64, linux/arm64/v8"), "{err}");
}

#[test]
fn a_manifest_gives_its_config_and_layers() {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": D, "size": 7},
        "layers": [
            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": E, "size": 9},
        ],
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    assert!(!is_index("application/vnd.docker.distribution.manifest.v2+json", &bytes));
    let blobs = manifest_blobs(&bytes, "v1", "linux/amd64").expect("blobs");
    let got: Vec<(&str, u64, &str)> =
        blobs.iter().map(|b| (b.digest.as_str(), b.length, b.platform.as_str())).collect();
    assert_eq!(got, [(D, 7, "linux/amd64"), (E, 9, "linux/amd64")]);
    assert!(manifest_blobs(b"{\"schemaVersion\": 1}", "v1", "").is_err());
}

#[test]
fn only_the_authorization_header_is_taken() {
    let headers = BTreeMap::from([("authorization".to_owned(), "Bearer x".to_owned()), ("X-Other".into(), "y".into())]);
    assert_eq!(authorization(&headers).expect("auth"), "Bearer x");
    assert_eq!(authorization(&BTreeMap::new()), None);
}
