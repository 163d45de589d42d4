//! `damselfly mirror`: its flags, how they layer over the config file, and the daemon's life
//! (bind, serve until asked to stop, shut down). The `damselfly` binary only dispatches here.
//!
//! Precedence: defaults < config file < `DAMSELFLY_REGISTRY_AUTH` (auth only) < flags. A flag
//! replaces the file's value, lists included, so what the command line says is what runs.
//! Each flag is named after its config key, and the layering goes by those names (see
//! [`layer`]): a new setting is a config field and a flag field, nothing else.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::config::{parse_auth_list, ByteSize, ConfigError, LogFormat, MirrorConfig, RegistryAuth};
use crate::daemon::{self, DaemonError, Listeners};

/// Keeps registry passwords out of `ps`: comma- or newline-separated `HOST=USER:PASS` entries.
pub const REGISTRY_AUTH_ENV: &str = "DAMSELFLY_REGISTRY_AUTH";

/// Runs the daemon on `config` until `stop` resolves, then shuts it down.
pub async fn run(config: MirrorConfig, stop: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let listeners = Listeners::bind(&config).await?;
    let running = daemon::start(config, listeners).await?;
    stop.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// The flags of `damselfly mirror`. Every field but `config` is named after the config key it
/// sets; unset fields (`None`, no values) leave the key alone.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct MirrorArgs {
    /// TOML config file (see config/mirror.example.toml).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Registry mirror API address [default: 127.0.0.1:65001].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain: serve the mirror API over HTTPS (HTTP/2 and HTTP/1.1) with it.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    #[serde(with = "crate::config::paths::option")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    #[serde(with = "crate::config::paths::option")]
    pub tls_key: Option<PathBuf>,
    /// Health endpoint address [default: 127.0.0.1:40901].
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
    /// Metrics endpoint address [default: 127.0.0.1:8000].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Cache and state directory [default: /var/lib/damselfly as root, else the XDG data dir].
    #[arg(long, value_name = "DIR")]
    #[serde(with = "crate::config::paths::option")]
    pub data_dir: Option<PathBuf>,
    /// Disk quota for cached content, e.g. 50GiB or 100GB [default: 50GiB].
    #[arg(long, value_name = "SIZE")]
    pub cache_quota: Option<ByteSize>,
    /// Upstream used when a request names none [default: https://index.docker.io].
    #[arg(long, value_name = "URL")]
    pub registry_mirror: Option<String>,
    /// Registry reached over plain HTTP; repeatable, replaces the config file's list.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// Credentials for a registry; repeatable, replaces the config file's list. Prefer
    /// --registry-auth-file or DAMSELFLY_REGISTRY_AUTH: flags are visible in `ps`.
    #[arg(long = "registry-auth", value_name = "HOST=USER:PASS")]
    pub registry_auth: Vec<RegistryAuth>,
    /// File of HOST=USER:PASS lines, added to the other credentials.
    #[arg(long, value_name = "FILE")]
    #[serde(with = "crate::config::paths::option")]
    pub registry_auth_file: Option<PathBuf>,
    /// Take the registry from the repository's first component (/v2/ghcr.io/org/app/...) when a
    /// request names none otherwise, as skopeo, podman and CRI-O mirrors do [default: true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub registry_in_path: Option<bool>,
    /// An HTTP proxy request for a registry URL matching this regular expression goes through
    /// the cache; others are forwarded (repeatable; replaces the config file's list)
    /// [default: blobs/sha256.*].
    #[arg(long = "proxy-rule", value_name = "REGEX")]
    pub proxy_rules: Vec<String>,
    /// Clients in this network (CIDR or an address) may use the mirror port as an HTTP proxy,
    /// besides loopback (repeatable; replaces the config file's list).
    #[arg(long = "proxy-allow", value_name = "CIDR")]
    pub proxy_allow: Vec<String>,
    /// Terminate CONNECT tunnels to this host (or `*`) with the proxy's CA and serve the HTTPS
    /// requests inside through the cache (repeatable; replaces the config file's list).
    #[arg(long = "proxy-intercept", value_name = "HOST")]
    pub proxy_intercept: Vec<String>,
    /// PEM certificate of the CA interception signs with [default: generated in the data dir].
    #[arg(long, value_name = "FILE", requires = "proxy_ca_key")]
    #[serde(with = "crate::config::paths::option")]
    pub proxy_ca_cert: Option<PathBuf>,
    /// PEM private key of --proxy-ca-cert.
    #[arg(long, value_name = "FILE", requires = "proxy_ca_cert")]
    #[serde(with = "crate::config::paths::option")]
    pub proxy_ca_key: Option<PathBuf>,
    /// PEM CA certificates trusted for TLS to registries and to hosts the proxy forwards to,
    /// besides the bundled public roots.
    #[arg(long, value_name = "FILE", alias = "proxy-ca-file")]
    #[serde(with = "crate::config::paths::option")]
    pub upstream_ca_file: Option<PathBuf>,
    /// After a cold Range read, fetch the rest of the blob in the background (always on seed
    /// peers).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub background_fill: Option<bool>,
    /// Write cold blobs to the cache past the page cache (O_DIRECT) [default: true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cache_direct_io: Option<bool>,
    /// Scheduler (host:port or http://host:port); repeatable. Without one the node works alone.
    #[arg(long = "scheduler", value_name = "ADDR")]
    pub schedulers: Vec<String>,
    /// PEM CA certificates of the cluster: https:// schedulers (and peers, with --peer-tls)
    /// must show certificates that chain to one.
    #[arg(long, value_name = "FILE")]
    #[serde(with = "crate::config::paths::option")]
    pub cluster_ca: Option<PathBuf>,
    /// PEM certificate of this node, for schedulers that ask for one and for peers (naming
    /// the node's advertised address).
    #[arg(long, value_name = "FILE")]
    #[serde(with = "crate::config::paths::option")]
    pub cluster_cert: Option<PathBuf>,
    /// PEM private key of --cluster-cert.
    #[arg(long, value_name = "FILE")]
    #[serde(with = "crate::config::paths::option")]
    pub cluster_key: Option<PathBuf>,
    /// Pieces between nodes over mutual TLS with --cluster-ca and --cluster-cert; schedulers
    /// pair only nodes that agree on it [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub peer_tls: Option<bool>,
    /// Send a client's Bearer token with a registration to https:// schedulers, for the seed
    /// that fetches the blob [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub share_tokens_with_seeds: Option<bool>,
    /// File holding the cluster secret shared by every node and scheduler [default: env
    /// DAMSELFLY_SCHEDULER_SECRET].
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Join a cluster without its secret (a lab on a closed network: its schedulers must run
    /// --insecure-cluster too).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub insecure_cluster: Option<bool>,
    /// Where other peers fetch pieces from this node [default: 0.0.0.0:65002].
    #[arg(long, value_name = "ADDR")]
    pub upload_listen: Option<SocketAddr>,
    /// Address peers reach this node at [default: the upload address, or the one routing to the scheduler].
    #[arg(long, value_name = "IP")]
    pub advertise_ip: Option<IpAddr>,
    /// Node identity [default: generated once, kept in <data-dir>/host-id].
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Data-centre label; parents in the same idc are preferred.
    #[arg(long, value_name = "LABEL")]
    pub idc: Option<String>,
    /// Location label such as region|zone|rack; parents sharing a longer prefix are preferred.
    #[arg(long, value_name = "LABEL")]
    pub location: Option<String>,
    /// Make this node a seed peer: it fetches new tasks from the origin for the cluster.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub seed: Option<bool>,
    /// Registry a client may name (repeatable): `*`, HOST[:PORT] or *.DOMAIN [default: any].
    /// Named registries may be on private addresses; others only on public ones.
    #[arg(long = "allow-registry", value_name = "PATTERN")]
    pub allow_registries: Vec<String>,
    /// Registry this node fetches from when a scheduler asks: as a seed, or for a preheat of
    /// every node (repeatable; `*` for any) [default: the registries named by
    /// --registry-mirror, --insecure-registry and --registry-auth].
    #[arg(long = "seed-registry", value_name = "HOST[:PORT]")]
    pub seed_registries: Vec<String>,
    /// Upload limit per second, e.g. 100MiB [default: unlimited].
    #[arg(long, value_name = "SIZE")]
    pub upload_rate_limit: Option<ByteSize>,
    /// Download limit per second for piece traffic [default: unlimited].
    #[arg(long, value_name = "SIZE")]
    pub download_rate_limit: Option<ByteSize>,
    /// Run a scheduler inside this daemon on this address, for other nodes and this one.
    #[arg(long, value_name = "ADDR")]
    pub scheduler_listen: Option<SocketAddr>,
    /// That scheduler takes as seeds only nodes whose certificate is valid for this DNS name or
    /// IP address (see `damselfly scheduler --tls-seed-name`).
    #[arg(long, value_name = "NAME")]
    pub scheduler_seed_name: Option<String>,
    /// Pieces uploaded at once [default: 64].
    #[arg(long, value_name = "N")]
    pub max_uploads: Option<usize>,
    /// Log output format [default: human].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter in EnvFilter syntax; RUST_LOG overrides it [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl MirrorArgs {
    /// Loads the config file, applies the environment and the flags, reads the auth file and
    /// validates the result.
    pub fn into_config(self) -> Result<MirrorConfig, ConfigError> {
        let env_auth = match std::env::var(REGISTRY_AUTH_ENV) {
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => return Err(ConfigError::EnvNotUnicode(REGISTRY_AUTH_ENV)),
        };
        self.into_config_with_env(env_auth.as_deref())
    }

    fn into_config_with_env(self, env_auth: Option<&str>) -> Result<MirrorConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => MirrorConfig::from_file(path)?,
            None => MirrorConfig::default(),
        };
        let mut env = None;
        if let Some(value) = env_auth {
            let entries =
                parse_auth_list(value).map_err(|source| ConfigError::EnvAuth { var: REGISTRY_AUTH_ENV, source })?;
            // An empty variable is treated as unset rather than as "no credentials at all".
            env = Some(entries).filter(|e| !e.is_empty());
        }
        let mut cfg = layer(&file, env, &self)?;
        cfg.load_registry_auth_file()?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `base` with the environment's credentials and the flags set in `flags` over it, key by key.
fn layer(
    base: &MirrorConfig,
    env_auth: Option<Vec<RegistryAuth>>,
    flags: &MirrorArgs,
) -> Result<MirrorConfig, ConfigError> {
    let invalid = |e: serde_json::Error| ConfigError::Parse {
        origin: "from the command line".to_owned(),
        message: e.to_string(),
    };
    let mut merged = serde_json::to_value(base).map_err(invalid)?;
    let keys = merged.as_object_mut().ok_or_else(|| invalid(serde::ser::Error::custom("not a table")))?;
    if let Some(auth) = env_auth {
        keys.insert("registry_auth".to_owned(), serde_json::to_value(auth).map_err(invalid)?);
    }
    if let Value::Object(set) = serde_json::to_value(flags).map_err(invalid)? {
        for (key, value) in set {
            let unset = value.is_null() || value.as_array().is_some_and(Vec::is_empty);
            if !unset {
                keys.insert(key, value);
            }
        }
    }
    serde_json::from_value(merged).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MirrorArgs,
    }

    fn mirror_args(args: &[&str]) -> MirrorArgs {
        let argv = ["mirror"].iter().chain(args);
        Cli::try_parse_from(argv).expect("parses").args
    }

    fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
        let path = dir.path().join("mirror.toml");
        std::fs::write(&path, text).expect("write config");
        path.display().to_string()
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn no_flags_gives_defaults() {
        let cfg = mirror_args(&[]).into_config_with_env(None).expect("config");
        assert_eq!(cfg, MirrorConfig::default());
    }

    #[test]
    fn parses_every_flag() {
        let m = mirror_args(&[
            "--listen=127.0.0.1:1",
            "--health-listen",
            "127.0.0.1:2",
            "--metrics-listen",
            "127.0.0.1:3",
            "--data-dir",
            "/tmp/d",
            "--cache-quota",
            "1GiB",
            "--registry-mirror",
            "http://localhost:5000",
            "--insecure-registry",
            "a:1",
            "--insecure-registry",
            "b",
            "--registry-auth",
            "x.io=u:p",
            "--background-fill",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--scheduler",
            "10.0.0.1:8002",
            "--scheduler=http://10.0.0.2:8002",
            "--upload-listen",
            "127.0.0.2:0",
            "--advertise-ip",
            "127.0.0.2",
            "--host-id",
            "n1",
            "--idc",
            "dc1",
            "--location",
            "eu|a",
            "--seed",
            "--upload-rate-limit",
            "10MiB",
            "--download-rate-limit",
            "20MiB",
            "--max-uploads",
            "8",
            "--scheduler-listen",
            "127.0.0.2:8002",
            "--scheduler-seed-name",
            "seed.internal",
            "--cluster-ca",
            "/etc/ca.pem",
            "--cluster-cert",
            "/etc/node.pem",
            "--cluster-key",
            "/etc/node.key",
            "--peer-tls",
            "--secret-file=/s",
            "--insecure-cluster",
            "--share-tokens-with-seeds",
        ]);
        assert_eq!(m.background_fill, Some(true));
        let cfg = m.into_config_with_env(None).expect("config");
        assert_eq!(cfg.listen.port(), 1);
        assert_eq!((cfg.health_listen.port(), cfg.metrics_listen.port()), (2, 3));
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(cfg.cache_quota, ByteSize(1 << 30));
        assert_eq!(cfg.registry_mirror, "http://localhost:5000");
        assert_eq!(cfg.insecure_registries, ["a:1", "b"]);
        assert_eq!(cfg.registry_auth[0].host, "x.io");
        assert!(cfg.background_fill);
        assert_eq!((cfg.log_format, cfg.log_level.as_str()), (LogFormat::Json, "debug"));
        assert_eq!(cfg.scheduler_urls().expect("urls"), ["http://10.0.0.1:8002", "http://10.0.0.2:8002"]);
        assert_eq!(cfg.upload_listen, "127.0.0.2:0".parse().expect("addr"));
        assert_eq!(cfg.advertise_ip, Some([127, 0, 0, 2].into()));
        assert_eq!((cfg.host_id.as_deref(), cfg.idc.as_str(), cfg.location.as_str()), (Some("n1"), "dc1", "eu|a"));
        assert!(cfg.seed);
        assert_eq!(
            (cfg.upload_rate_limit, cfg.download_rate_limit),
            (Some(ByteSize(10 << 20)), Some(ByteSize(20 << 20)))
        );
        assert_eq!(cfg.max_uploads, 8);
        assert_eq!(cfg.cluster_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(cfg.cluster_key, Some(PathBuf::from("/etc/node.key")));
        assert!(cfg.peer_tls && cfg.share_tokens_with_seeds);
        assert_eq!((cfg.secret_file.as_deref(), cfg.insecure_cluster), (Some(std::path::Path::new("/s")), true));
        assert_eq!(cfg.scheduler_listen, Some("127.0.0.2:8002".parse().expect("addr")));
        assert_eq!(cfg.scheduler_seed_name.as_deref(), Some("seed.internal"));
        assert_eq!(mirror_args(&["--background-fill=false"]).background_fill, Some(false));
        assert_eq!(mirror_args(&["--cache-direct-io=false"]).cache_direct_io, Some(false));
        assert!(
            !mirror_args(&["--registry-in-path=false"]).into_config_with_env(None).expect("config").registry_in_path
        );
        assert_eq!(mirror_args(&[]).cache_direct_io, None);
    }

    #[test]
    fn bad_flags_are_rejected() {
        for bad in [
            &["--listen", "nope"][..],
            &["--cache-quota", "lots"],
            &["--log-format", "xml"],
            &["--registry-auth", "no-equals"],
            &["--unknown"],
        ] {
            let argv = ["mirror"].iter().chain(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
        let err = mirror_args(&["--registry-mirror", "ftp://x"]).into_config_with_env(None).unwrap_err();
        assert!(err.to_string().contains("registry_mirror"), "{err}");
    }

    #[test]
    fn flags_replace_file_values_and_lists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config(
            &dir,
            "listen = \"127.0.0.1:7000\"\nlog_level = \"warn\"\ninsecure_registries = [\"a:1\", \"b:2\"]\n\
             [[registry_auth]]\nhost = \"f.io\"\nusername = \"u\"\npassword = \"p\"\n",
        );
        let cfg = mirror_args(&["--config", &file]).into_config_with_env(None).expect("file only");
        assert_eq!((cfg.listen.port(), cfg.log_level.as_str()), (7000, "warn"));
        assert_eq!(cfg.insecure_registries, ["a:1", "b:2"]);

        let args = ["--config", &file, "--insecure-registry", "c:3", "--log-level", "trace"];
        let cfg = mirror_args(&args).into_config_with_env(None).expect("merged");
        assert_eq!(cfg.insecure_registries, ["c:3"]);
        assert_eq!((cfg.listen.port(), cfg.log_level.as_str()), (7000, "trace"));
        assert_eq!(cfg.registry_auth[0].host, "f.io");
    }

    #[test]
    fn auth_precedence_file_env_flags_then_auth_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config(&dir, "[[registry_auth]]\nhost = \"file.io\"\nusername = \"u\"\npassword = \"p\"\n");
        let hosts = |cfg: &MirrorConfig| cfg.registry_auth.iter().map(|a| a.host.clone()).collect::<Vec<_>>();

        let cfg = mirror_args(&["--config", &file]).into_config_with_env(Some("")).expect("empty env");
        assert_eq!(hosts(&cfg), ["file.io"]);
        let cfg = mirror_args(&["--config", &file]).into_config_with_env(Some("e1.io=u:p,e2.io=u:p")).expect("env");
        assert_eq!(hosts(&cfg), ["e1.io", "e2.io"]);
        let args = ["--config", &file, "--registry-auth", "flag.io=u:p"];
        let cfg = mirror_args(&args).into_config_with_env(Some("e1.io=u:p")).expect("flag");
        assert_eq!(hosts(&cfg), ["flag.io"]);

        let auth_file = dir.path().join("auth");
        std::fs::write(&auth_file, "# creds\nextra.io=u:p\n").expect("write");
        let auth_file = auth_file.display().to_string();
        let args = ["--config", &file, "--registry-auth-file", &auth_file];
        let cfg = mirror_args(&args).into_config_with_env(Some("e1.io=u:p\n")).expect("auth file");
        assert_eq!(hosts(&cfg), ["e1.io", "extra.io"]);
    }

    #[test]
    fn env_auth_errors_do_not_leak_passwords() {
        let err = mirror_args(&[]).into_config_with_env(Some("a.io=u:S3CRET,broken-S3CRET")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(REGISTRY_AUTH_ENV) && !msg.contains("S3CRET"), "{msg}");
        let dup = mirror_args(&[]).into_config_with_env(Some("a.io=u:p,a.io=v:q")).unwrap_err();
        assert!(dup.to_string().contains("more than one"), "{dup}");
    }

    proptest::proptest! {
        #[test]
        fn a_set_flag_wins_and_an_unset_one_keeps_the_file_value(
            file_port in 1u16.., flag_port in proptest::option::of(1u16..),
            file_hosts in proptest::collection::vec("[a-z]{1,8}:[0-9]{1,4}", 0..3),
            flag_hosts in proptest::collection::vec("[a-z]{1,8}:[0-9]{1,4}", 0..3),
            file_uploads in 1usize..1000, flag_uploads in proptest::option::of(1usize..1000),
            flag_seed in proptest::option::of(proptest::bool::ANY),
        ) {
            let file = MirrorConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], file_port)),
                insecure_registries: file_hosts.clone(),
                max_uploads: file_uploads,
                ..MirrorConfig::default()
            };
            let flags = MirrorArgs {
                listen: flag_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
                insecure_registries: flag_hosts.clone(),
                max_uploads: flag_uploads,
                seed: flag_seed,
                ..MirrorArgs::default()
            };
            let cfg = layer(&file, None, &flags).expect("layers");
            proptest::prop_assert_eq!(cfg.listen.port(), flag_port.unwrap_or(file_port));
            let hosts = if flag_hosts.is_empty() { file_hosts } else { flag_hosts };
            proptest::prop_assert_eq!(cfg.insecure_registries, hosts);
            proptest::prop_assert_eq!(cfg.max_uploads, flag_uploads.unwrap_or(file_uploads));
            proptest::prop_assert_eq!(cfg.seed, flag_seed.unwrap_or(false));
            proptest::prop_assert_eq!(cfg.data_dir, file.data_dir);
        }
    }

    #[test]
    fn paths_that_are_not_utf8_come_through_the_layering_whole() {
        use std::os::unix::ffi::OsStringExt;
        let odd = |tail: &[u8]| PathBuf::from(std::ffi::OsString::from_vec([b"/tmp/d\xff".as_slice(), tail].concat()));
        let base = MirrorConfig { data_dir: odd(b""), ..MirrorConfig::default() };
        let flags = MirrorArgs { cluster_ca: Some(odd(b"/ca")), ..MirrorArgs::default() };
        let cfg = layer(&base, None, &flags).expect("layers");
        assert_eq!((cfg.data_dir, cfg.cluster_ca), (odd(b""), Some(odd(b"/ca"))));
        let flags = MirrorArgs { data_dir: Some(odd(b"/x")), ..MirrorArgs::default() };
        assert_eq!(layer(&MirrorConfig::default(), None, &flags).expect("layers").data_dir, odd(b"/x"));
    }

    #[test]
    fn every_flag_sets_a_config_key_of_its_name() {
        // The config rejects unknown keys: a flag whose name is no key fails to layer.
        let all = mirror_args(&[
            "--listen=127.0.0.1:1",
            "--health-listen=127.0.0.1:2",
            "--metrics-listen=127.0.0.1:3",
            "--data-dir=/d",
            "--cache-quota=1GiB",
            "--registry-mirror=http://r:1",
            "--insecure-registry=a:1",
            "--registry-auth=x.io=u:p",
            "--registry-auth-file=/f",
            "--registry-in-path=false",
            "--tls-cert=/tls.pem",
            "--tls-key=/tls.key",
            "--proxy-rule=manifests/sha256:.*",
            "--proxy-allow=10.0.0.0/8",
            "--proxy-intercept=ghcr.io",
            "--proxy-ca-cert=/ca.pem",
            "--proxy-ca-key=/ca.key",
            "--upstream-ca-file=/extra.pem",
            "--background-fill",
            "--cache-direct-io=false",
            "--scheduler=s:1",
            "--cluster-ca=/ca",
            "--cluster-cert=/c",
            "--cluster-key=/k",
            "--peer-tls",
            "--secret-file=/s",
            "--insecure-cluster",
            "--share-tokens-with-seeds",
            "--upload-listen=127.0.0.1:4",
            "--advertise-ip=127.0.0.5",
            "--host-id=h",
            "--idc=i",
            "--location=l",
            "--seed",
            "--allow-registry=*.example.com",
            "--seed-registry=*",
            "--upload-rate-limit=1MiB",
            "--download-rate-limit=2MiB",
            "--scheduler-listen=127.0.0.1:5",
            "--scheduler-seed-name=n",
            "--max-uploads=3",
            "--log-format=json",
            "--log-level=debug",
        ]);
        let cfg = layer(&MirrorConfig::default(), None, &all).expect("every flag names a key");
        assert_ne!(cfg, MirrorConfig::default());
        let set = serde_json::to_value(&all).expect("flags");
        let unset: Vec<_> =
            set.as_object().expect("object").iter().filter(|(_, v)| v.is_null()).map(|(k, _)| k).collect();
        assert!(unset.is_empty(), "flags left out of this test: {unset:?}");
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = mirror_args(&["--config", "/nonexistent/damselfly.toml"]).into_config_with_env(None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/damselfly.toml"), "{err}");
    }
}
