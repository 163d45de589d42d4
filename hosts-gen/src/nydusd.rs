//! nydusd's registry backend, as the `device.backend` object of its configuration: mirror mode
//! (the `mirrors` list of nydusd 2.1 to 2.3.4), with `auth_through` (without it nydusd sends
//! requests for anonymous registries straight to the registry, and the daemon sees nothing)
//! and `ping_url` at the daemon's health endpoint. nydusd falls back to the registry when the
//! daemon answers 5xx or is unreachable.

use serde_json::{json, Value};

use crate::containerd::REGISTRY_HEADER;
use crate::registry::Registry;

/// The `backend` object for `repo` in `registry`, read through the daemon at `mirror` whose
/// health endpoint is `health`.
pub fn backend(registry: &Registry, repo: &str, mirror: &str, health: &str) -> Value {
    let (scheme, host) = registry.url.split_once("://").unwrap_or(("https", &registry.host));
    json!({
        "type": "registry",
        "config": {
            "scheme": scheme,
            "host": host,
            "repo": repo,
            "mirrors": [{
                "host": mirror,
                "headers": { REGISTRY_HEADER: registry.url },
                "ping_url": health,
                "health_check_interval": 5,
                "failure_limit": 5,
                "auth_through": true,
            }],
        },
    })
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
        mirrors: Vec<MirrorConfig>,
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
        let v = backend(&r, "team/app", "http://127.0.0.1:65001", "http://127.0.0.1:40901/healthy");
        let b: Backend = serde_json::from_value(v).expect("nydusd's shape");
        assert_eq!(
            (b.r#type.as_str(), b.config.scheme.as_str(), b.config.host.as_str()),
            ("registry", "http", "10.0.0.5:5000")
        );
        let m = &b.config.mirrors[0];
        assert!(m.auth_through);
        assert_eq!(m.headers.get(REGISTRY_HEADER).map(String::as_str), Some("http://10.0.0.5:5000"));
        let hub = backend(&Registry::parse("docker.io").expect("hub"), "library/x", "m", "h");
        assert_eq!(hub["config"]["host"], "registry-1.docker.io");
    }
}
