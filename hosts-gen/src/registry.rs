//! A registry as the command line names it: `HOST[:PORT]` (reached over HTTPS) or a URL with
//! its scheme (`http://10.0.0.5:5000`).

use url::Url;

/// Docker Hub's names; its API lives at `registry-1.docker.io`, not at the web site.
const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
const DOCKER_HUB_API: &str = "https://registry-1.docker.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    /// `host[:port]` as image references name it (`docker.io` for Docker Hub).
    pub host: String,
    /// `scheme://host[:port]` of its API: what a runtime falls back to, and what the daemon is
    /// told in `X-Dragonfly-Registry`.
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
#[error("registry {0:?} is neither HOST[:PORT] nor an http(s):// URL without a path")]
pub struct RegistryError(pub String);

impl Registry {
    pub fn parse(raw: &str) -> Result<Registry, RegistryError> {
        let bad = || RegistryError(raw.to_owned());
        let raw = raw.trim();
        let with_scheme = if raw.contains("://") { raw.to_owned() } else { format!("https://{raw}") };
        let url = Url::parse(&with_scheme).map_err(|_| bad())?;
        let ok_path = matches!(url.path(), "" | "/");
        if !matches!(url.scheme(), "http" | "https")
            || !ok_path
            || url.query().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(bad());
        }
        let name = url.host_str().ok_or_else(bad)?.to_ascii_lowercase();
        let host = match url.port() {
            Some(port) => format!("{name}:{port}"),
            None => name.clone(),
        };
        if DOCKER_HUB.contains(&host.as_str()) {
            return Ok(Registry { host: "docker.io".to_owned(), url: DOCKER_HUB_API.to_owned() });
        }
        Ok(Registry { url: format!("{}://{host}", url.scheme()), host })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_parse_from_hosts_and_urls() {
        let r = Registry::parse("ghcr.io").expect("host");
        assert_eq!((r.host.as_str(), r.url.as_str()), ("ghcr.io", "https://ghcr.io"));
        let r = Registry::parse("http://10.0.0.5:5000").expect("url");
        assert_eq!((r.host.as_str(), r.url.as_str()), ("10.0.0.5:5000", "http://10.0.0.5:5000"));
        let r = Registry::parse("Registry.Local:5000").expect("host and port");
        assert_eq!(r.url, "https://registry.local:5000");
        for hub in ["docker.io", "index.docker.io", "https://registry-1.docker.io/"] {
            let r = Registry::parse(hub).expect("docker hub");
            assert_eq!((r.host.as_str(), r.url.as_str()), ("docker.io", "https://registry-1.docker.io"), "{hub}");
        }
        for bad in ["", "ftp://x", "https://x/path", "https://u:p@x", "a b"] {
            assert!(Registry::parse(bad).is_err(), "{bad:?}");
        }
    }
}
