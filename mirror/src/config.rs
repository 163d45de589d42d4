//! The node daemon's configuration: one flat TOML file, overridden by CLI flags (see `cli`).
//!
//! Every default lives in `impl Default for MirrorConfig`; serde's `#[serde(default)]` reuses it,
//! so the file, the flags and the example config cannot drift apart.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use damselfly_serve::LogFormat;
use serde::{Deserialize, Serialize};

use crate::oci::route::is_host_port;

/// Where the upstream lives when a request names none (dfdaemon's `registryMirror.addr` default).
pub const DEFAULT_REGISTRY_MIRROR: &str = "https://index.docker.io";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and key: the mirror API (`listen`) is served over HTTPS (HTTP/2
    /// and HTTP/1.1 by ALPN) instead of plain HTTP.
    #[serde(with = "paths::option")]
    pub tls_cert: Option<PathBuf>,
    #[serde(with = "paths::option")]
    pub tls_key: Option<PathBuf>,
    pub health_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    #[serde(with = "paths")]
    pub data_dir: PathBuf,
    pub cache_quota: ByteSize,
    pub registry_mirror: String,
    pub insecure_registries: Vec<String>,
    /// Registries a client may name (`*`, `HOST[:PORT]`, `*.DOMAIN`); empty: any. The ones
    /// named here (and in `registry_mirror`, `insecure_registries`, `registry_auth`) may be on
    /// private addresses; others only on public ones.
    pub allow_registries: Vec<String>,
    pub registry_auth: Vec<RegistryAuth>,
    #[serde(with = "paths::option")]
    pub registry_auth_file: Option<PathBuf>,
    /// A request naming no registry (no header, no `ns`) whose repository starts with one
    /// (`/v2/ghcr.io/org/app/...`, `10.0.0.5_5000` for a port) goes to that registry: how
    /// skopeo, podman and CRI-O reach several registries through one daemon.
    pub registry_in_path: bool,
    /// Regular expressions: an absolute-form (HTTP proxy) registry request whose URL matches
    /// one is served through the cache; others are forwarded as they are.
    pub proxy_rules: Vec<String>,
    /// Networks (CIDR, or an address) whose clients may use the mirror port as an HTTP proxy,
    /// besides loopback.
    pub proxy_allow: Vec<String>,
    /// Hosts (or `*`) whose `CONNECT` tunnels the proxy terminates with its CA, handling the
    /// requests inside (HTTPS registries through the cache).
    pub proxy_intercept: Vec<String>,
    /// The CA interception signs with (PEM); default: one generated in `data_dir`.
    #[serde(with = "paths::option")]
    pub proxy_ca_cert: Option<PathBuf>,
    #[serde(with = "paths::option")]
    pub proxy_ca_key: Option<PathBuf>,
    /// PEM CA certificates trusted for TLS to upstreams (registries, and hosts the proxy
    /// forwards to), besides the bundled public roots.
    #[serde(with = "paths::option")]
    pub upstream_ca_file: Option<PathBuf>,
    /// After a cold range read, fetch the rest of the blob (seeds always do).
    pub background_fill: bool,
    /// Write cold fills past the page cache (`O_DIRECT`) where the filesystem allows it.
    pub cache_direct_io: bool,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Scheduler addresses (`host:port`, `http://host:port` or `https://host:port`); empty =
    /// a single node.
    pub schedulers: Vec<String>,
    /// PEM CA certificates of the cluster: `https://` schedulers, and peers with `peer_tls`,
    /// are verified against them.
    #[serde(with = "paths::option")]
    pub cluster_ca: Option<PathBuf>,
    /// PEM certificate and key of this node, shown to schedulers that require one and, with
    /// `peer_tls`, to other nodes (its certificate must name its advertised address).
    #[serde(with = "paths::option")]
    pub cluster_cert: Option<PathBuf>,
    #[serde(with = "paths::option")]
    pub cluster_key: Option<PathBuf>,
    /// Pieces between nodes over mutual TLS; schedulers pair only nodes that agree on it.
    pub peer_tls: bool,
    /// The cluster secret every node and scheduler shares (at least 16 bytes); default: the
    /// `DAMSELFLY_SCHEDULER_SECRET` environment variable. Nodes prove membership with it.
    #[serde(with = "paths::option")]
    pub secret_file: Option<PathBuf>,
    /// Join schedulers (and run the in-process one) without a cluster secret: a lab on a
    /// closed network, where anyone who reaches a scheduler is a member.
    pub insecure_cluster: bool,
    /// Send a client's Bearer token with a download's registration to `https://` schedulers,
    /// which pass it to the seed peer fetching the blob (only when they require client
    /// certificates). For registries whose Bearer tokens are short-lived and scoped to one
    /// repository, as in the Docker token flow.
    pub share_tokens_with_seeds: bool,
    /// Where other peers fetch pieces from this node (only with schedulers).
    pub upload_listen: SocketAddr,
    /// The address peers reach this node at; default: the upload address, or the address
    /// that routes to the first scheduler.
    pub advertise_ip: Option<IpAddr>,
    /// Default: generated once and kept in `<data_dir>/host-id`.
    pub host_id: Option<String>,
    pub idc: String,
    pub location: String,
    pub seed: bool,
    /// Registries (`HOST[:PORT]`, or `*` for any) this node fetches from when a scheduler asks:
    /// as a seed, or for a preheat of every node. Empty: the registries this daemon names elsewhere (`registry_mirror`,
    /// `insecure_registries`, `registry_auth`).
    pub seed_registries: Vec<String>,
    pub upload_rate_limit: Option<ByteSize>,
    pub download_rate_limit: Option<ByteSize>,
    pub max_uploads: usize,
    /// Run a scheduler inside this daemon on this address, for other nodes (and this one).
    pub scheduler_listen: Option<SocketAddr>,
    /// That scheduler takes as seeds only nodes whose certificate is valid for this DNS name
    /// or IP address (it serves mutual TLS with `cluster_cert`).
    pub scheduler_seed_name: Option<String>,
}

/// Where the upload server listens unless configured (Dragonfly's piece upload port).
pub const DEFAULT_UPLOAD_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 65002);

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 65001)),
            tls_cert: None,
            tls_key: None,
            health_listen: SocketAddr::from(([127, 0, 0, 1], 40901)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            data_dir: default_data_dir(),
            cache_quota: ByteSize(50 << 30),
            registry_mirror: DEFAULT_REGISTRY_MIRROR.to_owned(),
            insecure_registries: Vec::new(),
            allow_registries: Vec::new(),
            registry_auth: Vec::new(),
            registry_auth_file: None,
            registry_in_path: true,
            proxy_rules: vec![crate::proxy::DEFAULT_RULE.to_owned()],
            proxy_allow: Vec::new(),
            proxy_intercept: Vec::new(),
            proxy_ca_cert: None,
            proxy_ca_key: None,
            upstream_ca_file: None,
            background_fill: false,
            cache_direct_io: true,
            log_format: LogFormat::Human,
            log_level: "info".to_owned(),
            schedulers: Vec::new(),
            cluster_ca: None,
            cluster_cert: None,
            cluster_key: None,
            peer_tls: false,
            secret_file: None,
            insecure_cluster: false,
            share_tokens_with_seeds: false,
            upload_listen: DEFAULT_UPLOAD_LISTEN,
            advertise_ip: None,
            host_id: None,
            idc: String::new(),
            location: String::new(),
            seed: false,
            seed_registries: Vec::new(),
            upload_rate_limit: None,
            download_rate_limit: None,
            max_uploads: 64,
            scheduler_listen: None,
            scheduler_seed_name: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Holds the rendered message, not the toml error, whose `Debug` carries the whole file,
    /// passwords included.
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{first} and {second} would both bind {addr}")]
    AddrConflict { first: &'static str, second: &'static str, addr: SocketAddr },
    #[error("cache_quota must be greater than zero")]
    ZeroQuota,
    #[error("data_dir must not be empty")]
    EmptyDataDir,
    #[error("registry_mirror {value:?}: {reason}")]
    RegistryMirror { value: String, reason: String },
    #[error("{0}")]
    AllowRegistry(String),
    #[error("{0}")]
    Proxy(String),
    #[error("insecure_registries entry {0:?} is not HOST[:PORT]")]
    InsecureRegistry(String),
    #[error("seed_registries entry {0:?} is neither HOST[:PORT] nor *")]
    SeedRegistry(String),
    #[error("registry_auth: {0}")]
    Auth(AuthEntryError),
    #[error("registry_auth has more than one entry for host {0:?}")]
    DuplicateAuth(String),
    #[error("registry_auth_file {path}, line {line}: {source}")]
    AuthFile { path: PathBuf, line: usize, source: AuthEntryError },
    #[error("{var}: {source}")]
    EnvAuth { var: &'static str, source: AuthEntryError },
    #[error("{0} is not valid UTF-8")]
    EnvNotUnicode(&'static str),
    #[error("schedulers entry {value:?}: {reason}")]
    Scheduler { value: String, reason: String },
    #[error("host_id {0:?} must be 1 to 128 characters of [A-Za-z0-9._-]")]
    HostId(String),
    #[error("max_uploads must be at least 1")]
    MaxUploads,
    #[error("{0} is a cluster setting: give schedulers or scheduler_listen too")]
    NeedsSchedulers(&'static str),
    #[error("{0}")]
    ClusterTls(&'static str),
    #[error("{0}")]
    Tls(&'static str),
    #[error("log_level {value:?}: {reason}")]
    LogLevel { value: String, reason: String },
}

impl MirrorConfig {
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        Self::parse_toml(s, "config")
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse_toml(&text, &path.display().to_string())
    }

    fn parse_toml(s: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(s).map_err(|e| ConfigError::Parse { origin: origin.to_owned(), message: e.to_string() })
    }

    /// Reads `registry_auth_file` (if set) and appends its entries to `registry_auth`.
    /// Called once at start by `MirrorArgs::into_config`; calling it twice duplicates entries,
    /// which `validate` then rejects.
    pub fn load_registry_auth_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.registry_auth_file else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry =
                line.parse().map_err(|source| ConfigError::AuthFile { path: path.clone(), line: i + 1, source })?;
            self.registry_auth.push(entry);
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_addrs()?;
        if self.cache_quota.0 == 0 {
            return Err(ConfigError::ZeroQuota);
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::EmptyDataDir);
        }
        validate_registry_url(&self.registry_mirror)?;
        if let Some(bad) = self.insecure_registries.iter().find(|h| !is_host_port(h)) {
            return Err(ConfigError::InsecureRegistry(bad.clone()));
        }
        crate::upstream::guard::AllowList::new(&self.allow_registries).map_err(ConfigError::AllowRegistry)?;
        crate::proxy::Rules::new(&self.proxy_rules).map_err(ConfigError::Proxy)?;
        crate::proxy::parse_allow(&self.proxy_allow).map_err(ConfigError::Proxy)?;
        if self.proxy_ca_cert.is_some() != self.proxy_ca_key.is_some() {
            return Err(ConfigError::Tls("proxy_ca_cert and proxy_ca_key go together"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Tls("tls_cert and tls_key go together"));
        }
        let mut seen = std::collections::HashSet::new();
        for auth in &self.registry_auth {
            auth.validate().map_err(ConfigError::Auth)?;
            if !seen.insert(auth.host.to_ascii_lowercase()) {
                return Err(ConfigError::DuplicateAuth(auth.host.clone()));
            }
        }
        self.validate_cluster()?;
        damselfly_serve::check_log_level(&self.log_level)
            .map_err(|reason| ConfigError::LogLevel { value: self.log_level.clone(), reason })?;
        Ok(())
    }

    /// Scheduler URLs as the gRPC client wants them.
    pub fn scheduler_urls(&self) -> Result<Vec<String>, ConfigError> {
        self.schedulers.iter().map(|s| scheduler_url(s)).collect()
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let urls = self.scheduler_urls()?;
        let tls = urls.iter().any(|u| u.starts_with("https://"));
        if tls && self.cluster_ca.is_none() {
            return Err(ConfigError::ClusterTls("https:// schedulers need cluster_ca to verify them against"));
        }
        if self.cluster_cert.is_some() != self.cluster_key.is_some() {
            return Err(ConfigError::ClusterTls("cluster_cert and cluster_key go together"));
        }
        if self.peer_tls && (self.cluster_ca.is_none() || self.cluster_cert.is_none()) {
            return Err(ConfigError::ClusterTls("peer_tls needs cluster_ca, cluster_cert and cluster_key"));
        }
        if self.scheduler_listen.is_some() && self.cluster_cert.is_some() && self.cluster_ca.is_none() {
            return Err(ConfigError::ClusterTls(
                "with cluster_cert the scheduler_listen scheduler serves TLS, which this node checks with cluster_ca",
            ));
        }
        if self.scheduler_seed_name.is_some() && (self.scheduler_listen.is_none() || self.cluster_cert.is_none()) {
            return Err(ConfigError::ClusterTls(
                "scheduler_seed_name needs scheduler_listen and cluster_cert (its scheduler checks client certificates)",
            ));
        }

        if let Some(id) = &self.host_id {
            let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
            if id.is_empty() || id.len() > 128 || !id.bytes().all(ok) {
                return Err(ConfigError::HostId(id.clone()));
            }
        }
        if self.max_uploads == 0 {
            return Err(ConfigError::MaxUploads);
        }
        if !self.in_cluster() && self.seed {
            return Err(ConfigError::NeedsSchedulers("seed"));
        }
        if let Some(bad) = self.seed_registries.iter().find(|h| *h != "*" && !is_host_port(h)) {
            return Err(ConfigError::SeedRegistry(bad.clone()));
        }
        Ok(())
    }

    /// Whether this daemon is part of a cluster: it talks to schedulers or runs one.
    pub fn in_cluster(&self) -> bool {
        !self.schedulers.is_empty() || self.scheduler_listen.is_some()
    }

    fn validate_addrs(&self) -> Result<(), ConfigError> {
        let upload = self.in_cluster().then_some(("upload_listen", self.upload_listen));
        let scheduler = self.scheduler_listen.map(|a| ("scheduler_listen", a));
        let addrs: Vec<(&'static str, SocketAddr)> =
            [("listen", self.listen), ("health_listen", self.health_listen), ("metrics_listen", self.metrics_listen)]
                .into_iter()
                .chain(upload)
                .chain(scheduler)
                .collect();
        for (i, &(first, a)) in addrs.iter().enumerate() {
            for &(second, b) in &addrs[i + 1..] {
                if binds_collide(a, b) {
                    return Err(ConfigError::AddrConflict { first, second, addr: b });
                }
            }
        }
        Ok(())
    }
}

/// Port 0 asks the OS for a fresh port, so two such addresses never collide; a wildcard
/// address collides with every address on the same port.
fn binds_collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `host:port` or `http(s)://host:port` → a URL with scheme.
fn scheduler_url(value: &str) -> Result<String, ConfigError> {
    let fail = |reason: &str| ConfigError::Scheduler { value: value.to_owned(), reason: reason.to_owned() };
    let with_scheme = if value.contains("://") { value.to_owned() } else { format!("http://{value}") };
    let url = url::Url::parse(&with_scheme).map_err(|e| fail(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(fail("scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) || url.port_or_known_default().is_none() {
        return Err(fail("must be host:port"));
    }
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(fail("must be [scheme://]host:port with nothing after it"));
    }
    // The scheme in lower case: TLS is chosen by comparing it.
    let rest = with_scheme.find("://").map_or("", |i| &with_scheme[i..]);
    Ok(format!("{}{}", url.scheme(), rest.trim_end_matches('/')))
}

fn validate_registry_url(value: &str) -> Result<(), ConfigError> {
    let fail = |reason: &str| ConfigError::RegistryMirror { value: value.to_owned(), reason: reason.to_owned() };
    let url = url::Url::parse(value).map_err(|e| fail(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(fail("scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(fail("a host is required"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(fail("credentials belong in registry_auth, not in the URL"));
    }
    // The distribution API lives at /v2 on the host root; a path prefix would be silently dropped.
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(fail("must be scheme://host[:port] with no path, query or fragment"));
    }
    Ok(())
}

pub use damselfly_p2p::data_dir::default_data_dir;

/// A byte count. Parses `512MiB`/`50GiB` (binary), `10GB`/`100MB` (decimal) and plain bytes;
/// in TOML either a string or an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("size {0:?} must start with a whole number")]
    NoNumber(String),
    #[error("unknown size unit {0:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")]
    Unit(String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, SizeError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(SizeError::Empty);
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        if digits.is_empty() {
            return Err(SizeError::NoNumber(truncated(s)));
        }
        let number: u64 = digits.parse().map_err(|_| SizeError::Overflow(truncated(s)))?;
        let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(SizeError::Unit(truncated(unit))),
        };
        number.checked_mul(multiplier).map(ByteSize).ok_or_else(|| SizeError::Overflow(truncated(s)))
    }
}

/// Error messages echo the input; a pasted-in megabyte of garbage should not come back whole.
fn truncated(s: &str) -> String {
    s.chars().take(40).collect()
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (name, shift) in UNITS {
            if self.0 != 0 && self.0.trailing_zeros() >= shift {
                return write!(f, "{}{}", self.0 >> shift, name);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Written as it reads back: `50GiB`, or a plain number of bytes.
impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"50GiB\", \"100MB\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("size must not be negative"))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Credentials the daemon uses for one registry. `Debug` never shows the password, so the
/// whole config can be logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    pub host: String,
    pub username: String,
    pub password: String,
}

/// Messages never include the entry itself: it holds a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthEntryError {
    #[error("entry must be HOST=USER:PASS (no '=')")]
    MissingEquals,
    #[error("entry for {host:?} must be HOST=USER:PASS (no ':' between user and password)")]
    MissingColon { host: String },
    #[error("host {0:?} is not HOST[:PORT]")]
    BadHost(String),
    #[error("entry for {host:?} has an empty username")]
    EmptyUsername { host: String },
    #[error("entry for {host:?} has an empty password")]
    EmptyPassword { host: String },
}

impl RegistryAuth {
    pub fn validate(&self) -> Result<(), AuthEntryError> {
        if !is_host_port(&self.host) {
            return Err(AuthEntryError::BadHost(truncated(&self.host)));
        }
        let host = self.host.clone();
        if self.username.is_empty() {
            return Err(AuthEntryError::EmptyUsername { host });
        }
        if self.password.is_empty() {
            return Err(AuthEntryError::EmptyPassword { host });
        }
        Ok(())
    }
}

impl FromStr for RegistryAuth {
    type Err = AuthEntryError;

    /// `HOST=USER:PASS`: the host has no `=` and a Basic-auth user has no `:`, so splitting at
    /// the first of each leaves the password free to contain both.
    fn from_str(s: &str) -> Result<Self, AuthEntryError> {
        let (host, creds) = s.trim().split_once('=').ok_or(AuthEntryError::MissingEquals)?;
        let (username, password) =
            creds.split_once(':').ok_or_else(|| AuthEntryError::MissingColon { host: truncated(host) })?;
        let auth = RegistryAuth { host: host.to_owned(), username: username.to_owned(), password: password.to_owned() };
        auth.validate()?;
        Ok(auth)
    }
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Parses the `DAMSELFLY_REGISTRY_AUTH` form: entries separated by newlines, or by commas when
/// the value has no newline (so a password may contain commas in the newline form).
pub fn parse_auth_list(s: &str) -> Result<Vec<RegistryAuth>, AuthEntryError> {
    let sep = if s.contains('\n') { '\n' } else { ',' };
    s.split(sep).map(str::trim).filter(|e| !e.is_empty()).map(str::parse).collect()
}

pub(crate) mod paths;
#[cfg(test)]
mod tests;
