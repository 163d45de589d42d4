use super::*;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../../config/mirror.example.toml");

/// Turns `# key = value` and `# [[table]]` lines into live TOML, leaving prose comments alone.
fn uncomment(text: &str) -> String {
    let live = |l: &str| {
        l.starts_with("[[")
            || l.split_once(" = ").is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    };
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if live(rest) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn example_config_is_all_defaults() {
    let cfg = MirrorConfig::from_toml_str(EXAMPLE).expect("example parses");
    assert_eq!(cfg, MirrorConfig::default());
}

#[test]
fn example_config_documents_every_key_with_its_default() {
    let live = uncomment(EXAMPLE);
    let cfg = MirrorConfig::from_toml_str(&live).expect("uncommented example parses");
    cfg.validate().expect("uncommented example validates");
    let d = MirrorConfig::default();
    assert_eq!((cfg.listen, cfg.health_listen, cfg.metrics_listen), (d.listen, d.health_listen, d.metrics_listen));
    assert_eq!(cfg.cache_quota, d.cache_quota);
    assert_eq!(cfg.registry_mirror, d.registry_mirror);
    assert_eq!((cfg.background_fill, cfg.log_format, &cfg.log_level), (d.background_fill, d.log_format, &d.log_level));
    assert_eq!(cfg.cache_direct_io, d.cache_direct_io);
    assert_eq!(cfg.registry_in_path, d.registry_in_path);
    assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/damselfly"));
    assert_eq!(cfg.insecure_registries, ["registry.local:5000"]);
    assert_eq!(cfg.registry_auth.len(), 1);
    assert!(cfg.registry_auth_file.is_some());
    assert_eq!((cfg.upload_listen, cfg.seed, cfg.max_uploads), (d.upload_listen, d.seed, d.max_uploads));
    assert_eq!(cfg.scheduler_urls().expect("valid"), ["http://damselfly-scheduler.damselfly.svc:8002"]);
    let keys = [
        "listen",
        "tls_cert",
        "tls_key",
        "health_listen",
        "metrics_listen",
        "data_dir",
        "cache_quota",
        "registry_mirror",
        "insecure_registries",
        "[[registry_auth]]",
        "registry_auth_file",
        "registry_in_path",
        "proxy_rules",
        "proxy_allow",
        "proxy_intercept",
        "proxy_ca_cert",
        "proxy_ca_key",
        "upstream_ca_file",
        "background_fill",
        "cache_direct_io",
        "seed_registries",
        "log_format",
        "log_level",
        "schedulers",
        "cluster_ca",
        "cluster_cert",
        "cluster_key",
        "peer_tls",
        "share_tokens_with_seeds",
        "upload_listen",
        "advertise_ip",
        "host_id",
        "idc",
        "location",
        "seed",
        "upload_rate_limit",
        "download_rate_limit",
        "max_uploads",
        "scheduler_listen",
        "scheduler_seed_name",
    ];
    for key in keys {
        assert!(live.lines().any(|l| l.starts_with(key)), "example does not document {key}");
    }
}

#[test]
fn default_validates() {
    MirrorConfig::default().validate().expect("defaults are valid");
}

#[test]
fn unknown_keys_are_rejected() {
    let err = MirrorConfig::from_toml_str("listn = \"127.0.0.1:1\"").unwrap_err();
    assert!(err.to_string().contains("listn"), "{err}");
    let err = MirrorConfig::from_toml_str("[[registry_auth]]\nhost=\"a\"\nusername=\"u\"\npassword=\"p\"\ntoken=\"t\"")
        .unwrap_err();
    assert!(err.to_string().contains("token"), "{err}");
}

#[test]
fn parses_full_file() {
    let cfg = MirrorConfig::from_toml_str(
        r#"
        listen = "0.0.0.0:5000"
        cache_quota = 1048576
        insecure_registries = ["localhost:5000", "[::1]:5001"]
        background_fill = true
        cache_direct_io = false
        log_format = "json"
        [[registry_auth]]
        host = "ghcr.io"
        username = "me"
        password = "p=a:ss"
        "#,
    )
    .expect("parses");
    cfg.validate().expect("valid");
    assert_eq!(cfg.listen, "0.0.0.0:5000".parse().expect("addr"));
    assert_eq!(cfg.cache_quota, ByteSize(1 << 20));
    assert!(cfg.background_fill);
    assert!(!cfg.cache_direct_io);
    assert_eq!(cfg.log_format, LogFormat::Json);
    assert_eq!(cfg.registry_auth[0].password, "p=a:ss");
}

#[test]
fn bad_values_give_clear_errors() {
    let err = MirrorConfig::from_toml_str("cache_quota = \"12 parsecs\"").unwrap_err().to_string();
    assert!(err.contains("unknown size unit"), "{err}");
    let err = MirrorConfig::from_toml_str("cache_quota = -1").unwrap_err().to_string();
    assert!(err.contains("negative"), "{err}");
    let err = MirrorConfig::from_toml_str("log_format = \"xml\"").unwrap_err().to_string();
    assert!(err.contains("xml"), "{err}");
    let err = MirrorConfig::from_toml_str("listen = \"localhost\"").unwrap_err().to_string();
    assert!(err.contains("listen"), "{err}");
}

fn invalid(edit: impl FnOnce(&mut MirrorConfig)) -> String {
    let mut cfg = MirrorConfig::default();
    edit(&mut cfg);
    cfg.validate().expect_err("should be invalid").to_string()
}

#[test]
fn validation_rejects_bad_configs() {
    let e = invalid(|c| c.metrics_listen = c.listen);
    assert!(e.contains("listen and metrics_listen"), "{e}");
    let e = invalid(|c| c.health_listen = "0.0.0.0:65001".parse().expect("addr"));
    assert!(e.contains("health_listen"), "{e}");
    assert!(invalid(|c| c.cache_quota = ByteSize(0)).contains("greater than zero"));
    assert!(invalid(|c| c.data_dir = PathBuf::new()).contains("data_dir"));
    for url in ["docker.io", "ftp://x", "https://u:p@x", "https://x/v2", "https://x?a=b", "https://"] {
        let e = invalid(|c| c.registry_mirror = url.into());
        assert!(e.contains("registry_mirror"), "{url}: {e}");
    }
    for host in ["", "a/b", "http://a", "a:0", "a:99999", "::1", "a b", "-a.com"] {
        let e = invalid(|c| c.insecure_registries = vec![host.into()]);
        assert!(e.contains("insecure_registries"), "{host}: {e}");
    }
    let auth = |h: &str, u: &str, p: &str| RegistryAuth { host: h.into(), username: u.into(), password: p.into() };
    assert!(invalid(|c| c.registry_auth = vec![auth("x.io", "", "p")]).contains("empty username"));
    let e = invalid(|c| c.registry_auth = vec![auth("x.io", "u", "")]);
    assert!(e.contains("empty password"), "{e}");
    let e = invalid(|c| c.registry_auth = vec![auth("x.io", "u", "p"), auth("X.io", "v", "q")]);
    assert!(e.contains("more than one"), "{e}");
    assert!(invalid(|c| c.log_level = "info,=[".into()).contains("log_level"));
}

#[test]
fn port_zero_and_distinct_ips_do_not_collide() {
    let cfg = MirrorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        health_listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: "127.0.0.2:65001".parse().expect("addr"),
        ..Default::default()
    };
    cfg.validate().expect("no collision");
}

#[test]
fn sizes_parse() {
    let cases = [
        ("50GiB", 50 << 30),
        ("512MiB", 512 << 20),
        ("1KiB", 1024),
        ("2TiB", 2 << 40),
        ("10GB", 10_000_000_000),
        ("100MB", 100_000_000),
        ("1KB", 1000),
        ("1048576", 1 << 20),
        ("7B", 7),
        (" 3 gib ", 3 << 30),
    ];
    for (s, n) in cases {
        assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
    }
    assert_eq!("".parse::<ByteSize>(), Err(SizeError::Empty));
    assert!(matches!("GiB".parse::<ByteSize>(), Err(SizeError::NoNumber(_))));
    assert!(matches!("1.5GiB".parse::<ByteSize>(), Err(SizeError::Unit(_))));
    assert!(matches!("-1".parse::<ByteSize>(), Err(SizeError::NoNumber(_))));
    assert!(matches!("16777216TiB".parse::<ByteSize>(), Err(SizeError::Overflow(_))));
    assert!(matches!("99999999999999999999".parse::<ByteSize>(), Err(SizeError::Overflow(_))));
    assert_eq!(ByteSize(50 << 30).to_string(), "50GiB");
    assert_eq!(ByteSize(1000).to_string(), "1000");
}

#[test]
fn auth_entries_parse_and_hide_passwords() {
    let a: RegistryAuth = "ghcr.io:443=user:pa:ss=word".parse().expect("parses");
    assert_eq!((a.host.as_str(), a.username.as_str(), a.password.as_str()), ("ghcr.io:443", "user", "pa:ss=word"));
    assert!(!format!("{a:?}").contains("pa:ss"));
    assert!(!format!("{:?}", MirrorConfig { registry_auth: vec![a], ..Default::default() }).contains("pa:ss"));
    for bad in ["nohost-S3CRET", "host=S3CRET", "=u:S3CRET", "h=:S3CRET", "a/b=u:S3CRET"] {
        let msg = bad.parse::<RegistryAuth>().expect_err(bad).to_string();
        assert!(!msg.contains("S3CRET"), "{msg}");
    }
    let err = "h=u:".parse::<RegistryAuth>().expect_err("empty password");
    assert_eq!(err, AuthEntryError::EmptyPassword { host: "h".into() });
}

#[test]
fn auth_list_separators() {
    let l = parse_auth_list("a.io=u:p, b.io=v:q,").expect("commas");
    assert_eq!(l.iter().map(|a| a.host.as_str()).collect::<Vec<_>>(), ["a.io", "b.io"]);
    let l = parse_auth_list("a.io=u:p,with,commas\nb.io=v:q\n\n").expect("newlines");
    assert_eq!(l[0].password, "p,with,commas");
    assert_eq!(l.len(), 2);
    assert!(parse_auth_list("").expect("empty").is_empty());
    assert!(parse_auth_list("a.io=u").is_err());
}

#[test]
fn auth_file_is_appended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("auth");
    std::fs::write(&path, "# comment\n\n  b.io=u:p  \nc.io:5000=x:y\n").expect("write");
    let mut cfg = MirrorConfig {
        registry_auth: vec!["a.io=q:r".parse().expect("entry")],
        registry_auth_file: Some(path.clone()),
        ..Default::default()
    };
    cfg.load_registry_auth_file().expect("loads");
    assert_eq!(cfg.registry_auth.iter().map(|a| a.host.as_str()).collect::<Vec<_>>(), ["a.io", "b.io", "c.io:5000"]);
    std::fs::write(&path, "ok.io=u:p\nbroken-line-secret\n").expect("write");
    let err = cfg.load_registry_auth_file().unwrap_err().to_string();
    assert!(err.contains("line 2") && !err.contains("secret"), "{err}");
    cfg.registry_auth_file = Some(dir.path().join("missing"));
    assert!(cfg.load_registry_auth_file().unwrap_err().to_string().contains("missing"));
}

proptest! {
    #[test]
    fn size_parser_never_panics(s in "\\PC{0,40}") {
        let _ = s.parse::<ByteSize>();
    }

    #[test]
    fn size_parser_never_panics_on_near_misses(s in "[0-9 ]{0,25}[kKmMgGtTiIbB ]{0,4}") {
        let _ = s.parse::<ByteSize>();
    }

    #[test]
    fn gib_is_binary(n in 0u64..(1 << 34)) {
        prop_assert_eq!(format!("{n}GiB").parse::<ByteSize>(), Ok(ByteSize(n << 30)));
        prop_assert_eq!(format!("{n}GB").parse::<ByteSize>(), Ok(ByteSize(n * 1_000_000_000)));
    }

    #[test]
    fn display_round_trips(n in any::<u64>()) {
        prop_assert_eq!(ByteSize(n).to_string().parse::<ByteSize>(), Ok(ByteSize(n)));
    }
}

#[test]
fn parse_errors_do_not_carry_the_file() {
    let text = "[[registry_auth]]\nhost = \"a.io\"\nusername = \"u\"\npassword = \"S3CRET\"\n\n[bogus]\n";
    let err = MirrorConfig::from_toml_str(text).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    assert!(!format!("{err:?}").contains("S3CRET"), "{err:?}");
}

#[test]
fn cluster_settings_are_validated() {
    let ok = MirrorConfig::from_toml_str(
        "schedulers = [\"10.0.0.1:8002\", \"https://s.example:443\"]\nhost_id = \"n-1.a_b\"\ncluster_ca = \"/etc/ca.pem\"\n",
    )
    .expect("parses");
    ok.validate().expect("valid");
    assert_eq!(ok.scheduler_urls().expect("urls"), ["http://10.0.0.1:8002", "https://s.example:443"]);
    let upper = MirrorConfig::from_toml_str("schedulers = [\"HTTPS://s.example:443\"]").expect("parses");
    assert_eq!(upper.scheduler_urls().expect("urls"), ["https://s.example:443"]);
    assert!(upper.validate().is_err(), "an https scheduler without cluster_ca, whatever the case of its scheme");
    for bad in [
        "schedulers = [\"ftp://x:1\"]",
        "schedulers = [\"x:1/path\"]",
        "schedulers = [\"\"]",
        "schedulers = [\"x:1\"]\nhost_id = \"a b\"",
        "schedulers = [\"x:1\"]\nhost_id = \"\"",
        "schedulers = [\"x:1\"]\nmax_uploads = 0",
        "seed = true",
        "schedulers = [\"x:1\"]\nupload_listen = \"127.0.0.1:65001\"",
        // TLS: a CA to verify https schedulers with, and a certificate only with its key.
        "schedulers = [\"https://x:1\"]",
        "schedulers = [\"https://x:1\"]\ncluster_ca = \"ca.pem\"\ncluster_cert = \"c.pem\"",
        "schedulers = [\"https://x:1\"]\ncluster_ca = \"ca.pem\"\ncluster_key = \"k.pem\"",
        "schedulers = [\"x:1\"]\npeer_tls = true\ncluster_ca = \"ca.pem\"",
        "scheduler_listen = \"127.0.0.1:8002\"\ncluster_cert = \"c.pem\"\ncluster_key = \"k.pem\"",
        "scheduler_listen = \"127.0.0.1:8002\"\nscheduler_seed_name = \"seed.internal\"",
        "schedulers = [\"https://x:1\"]\ncluster_ca = \"ca.pem\"\nscheduler_seed_name = \"seed.internal\"",
    ] {
        let cfg = MirrorConfig::from_toml_str(bad).expect("parses");
        assert!(cfg.validate().is_err(), "{bad}");
    }
    // Without schedulers the upload address is never bound, so it cannot collide.
    let single = MirrorConfig::from_toml_str("upload_listen = \"127.0.0.1:65001\"").expect("parses");
    single.validate().expect("single node ignores upload_listen");
}
