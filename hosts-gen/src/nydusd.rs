//! nydusd's registry backend, as the `device.backend` object of its configuration, in one of
//! two modes:
//!
//! - mirror (the `mirrors` list of nydusd 2.1 to 2.3.4): requests go to the daemon with the
//!   registry in `X-Dragonfly-Registry`; `auth_through` (without it nydusd sends requests for
//!   anonymous registries straight to the registry, and the daemon sees nothing), `ping_url` at
//!   the daemon's health endpoint;
//! - proxy (every nydusd version): the daemon is nydusd's HTTP proxy and reads the registry
//!   from the request line; `fallback` sends nydusd to the registry while the daemon is down.
//!   An `https` registry is reached with `CONNECT`, which the daemon tunnels.
//!
//! In both, nydusd goes to the registry itself when the daemon answers 5xx or is unreachable.

use serde_json::{json, Value};

use crate::containerd::REGISTRY_HEADER;
use crate::registry::Registry;

/// How nydusd reaches the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Mirror,
    Proxy,
}

/// The `backend` object for `repo` in `registry`, read through the daemon at `mirror` whose
/// health endpoint is `health`.
pub fn backend(registry: &Registry, repo: &str, mode: Mode, mirror: &str, health: &str) -> Value {
    let (scheme, host) = registry.url.split_once("://").unwrap_or(("https", &registry.host));
    let mut config = json!({ "scheme": scheme, "host": host, "repo": repo });
    config[match mode {
        Mode::Mirror => "mirrors",
        Mode::Proxy => "proxy",
    }] = match mode {
        Mode::Mirror => json!([{
            "host": mirror,
            "headers": { REGISTRY_HEADER: registry.url },
            "ping_url": health,
            "health_check_interval": 5,
            "failure_limit": 5,
            "auth_through": true,
        }]),
        Mode::Proxy => json!({
            "url": mirror,
            "ping_url": health,
            "fallback": true,
            "check_interval": 5,
        }),
    };
    json!({ "type": "registry", "config": config })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields nydusd 2.2 reads (`api/src/config.rs`: `RegistryConfig`, `MirrorConfig`).
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Backend {
        r#type: String,
        config: RegistryConfig,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct RegistryConfig {
        scheme: String,
        host: String,
        repo: String,
        #[serde(default)]
        mirrors: Vec<MirrorConfig>,
        proxy: Option<ProxyConfig>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct ProxyConfig {
        url: String,
        ping_url: String,
        fallback: bool,
        check_interval: u64,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct MirrorConfig {
        host: String,
        headers: std::collections::HashMap<String, String>,
        ping_url: String,
        health_check_interval: u64,
        failure_limit: u8,
        auth_through: bool,
    }

    #[test]
    fn the_backend_has_the_fields_nydusd_reads() {
        let r = Registry::parse("http://10.0.0.5:5000").expect("registry");
        let v = backend(&r, "team/app", Mode::Mirror, "http://127.0.0.1:65001", "http://127.0.0.1:40901/healthy");
        let b: Backend = serde_json::from_value(v).expect("nydusd's shape");
        assert_eq!(
            (b.r#type.as_str(), b.config.scheme.as_str(), b.config.host.as_str()),
            ("registry", "http", "10.0.0.5:5000")
        );
        let m = &b.config.mirrors[0];
        assert!(m.auth_through);
        assert_eq!(m.headers.get(REGISTRY_HEADER).map(String::as_str), Some("http://10.0.0.5:5000"));
        let hub = backend(&Registry::parse("docker.io").expect("hub"), "library/x", Mode::Mirror, "m", "h");
        assert_eq!(hub["config"]["host"], "registry-1.docker.io");
        let v = backend(&r, "team/app", Mode::Proxy, "http://127.0.0.1:65001", "http://127.0.0.1:40901/healthy");
        let b: Backend = serde_json::from_value(v).expect("nydusd's shape");
        let proxy = b.config.proxy.expect("proxy");
        assert!(b.config.mirrors.is_empty() && proxy.fallback);
        assert_eq!(proxy.url, "http://127.0.0.1:65001");
    }
}
