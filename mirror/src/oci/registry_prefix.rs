//! A registry named by the first component of the repository: `/v2/ghcr.io/org/app/...`.
//!
//! skopeo, podman and CRI-O (containers-registries.conf) send a mirror neither `ns` nor a
//! header: they put the path of the mirror's `location` in front of the repository. A location
//! `127.0.0.1:65001/ghcr.io` makes them ask for `/v2/ghcr.io/org/app/manifests/v1`, so one
//! daemon can mirror any number of registries for them.
//!
//! The spelling: the component is the registry's host, with `_PORT` for a port, since a colon
//! may not appear in a repository name (`10.0.0.5_5000`, `localhost_5000`). A component names a
//! registry only when its host contains a dot or is `localhost`: Docker Hub namespaces never
//! contain a dot, so `library/alpine` stays a repository of the default registry. IPv6
//! literals have no spelling; such registries need a host name, `ns` or the header.

use super::route::is_valid_name;

/// The repository component that names `host_port` (`host` or `host:port`, lowercase), or
/// `None` when it has no spelling (an IPv6 literal, characters a repository may not hold).
pub fn spell(host_port: &str) -> Option<String> {
    let component = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && is_port(port) => format!("{host}_{port}"),
        Some(_) => return None,
        None => host_port.to_owned(),
    };
    let host = component.rsplit_once('_').filter(|(_, p)| is_port(p)).map_or(component.as_str(), |(h, _)| h);
    (names_registry(host) && is_valid_name(&component) && !component.contains('/')).then_some(component)
}

/// Splits a repository whose first component names a registry into that registry, as
/// `host[:port]`, and the repository at it. `None` when the first component is a namespace, or
/// nothing follows it. The registry is not checked here beyond its spelling: it is read as
/// containerd's `ns` is.
pub fn split(name: &str) -> Option<(String, &str)> {
    let (first, repo) = name.split_once('/')?;
    let (host, port) = match first.rsplit_once('_') {
        Some((host, port)) if is_port(port) => (host, Some(port)),
        _ => (first, None),
    };
    if !names_registry(host) || repo.is_empty() {
        return None;
    }
    let host_port = match port {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    Some((host_port, repo))
}

fn names_registry(host: &str) -> bool {
    host.contains('.') || host == "localhost"
}

fn is_port(p: &str) -> bool {
    (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registries_are_spelled_with_an_underscore_before_the_port() {
        assert_eq!(spell("ghcr.io").as_deref(), Some("ghcr.io"));
        assert_eq!(spell("10.0.0.5:5000").as_deref(), Some("10.0.0.5_5000"));
        assert_eq!(spell("localhost:5000").as_deref(), Some("localhost_5000"));
        assert_eq!(spell("localhost").as_deref(), Some("localhost"));
        for none in ["[::1]:5000", "[::1]", "myregistry", "myregistry:5000", "a..b", "x.example:0", "UP.example"] {
            assert_eq!(spell(none), None, "{none}");
        }
    }

    #[test]
    fn the_first_component_names_a_registry_only_with_a_dot_or_as_localhost() {
        assert_eq!(split("ghcr.io/org/app"), Some(("ghcr.io".to_owned(), "org/app")));
        assert_eq!(split("10.0.0.5_5000/app"), Some(("10.0.0.5:5000".to_owned(), "app")));
        assert_eq!(split("localhost_5000/a/b"), Some(("localhost:5000".to_owned(), "a/b")));
        assert_eq!(split("docker.io/library/alpine"), Some(("docker.io".to_owned(), "library/alpine")));
        // Docker Hub namespaces, and names with nothing after the registry, stay repositories.
        for repo in ["library/alpine", "my_team/app", "team_5000/app", "ghcr.io", "app"] {
            assert_eq!(split(repo), None, "{repo}");
        }
    }

    proptest! {
        #[test]
        fn a_spelled_registry_splits_back_to_itself(
            labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", 2..4),
            port in proptest::option::of(1u16..),
            repo in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}",
        ) {
            let host = labels.join(".");
            let host_port = match port { Some(p) => format!("{host}:{p}"), None => host };
            let component = spell(&host_port).expect("spelled");
            let name = format!("{component}/{repo}");
            prop_assert!(is_valid_name(&name), "{name} is not a repository name");
            prop_assert_eq!(split(&name), Some((host_port, repo.as_str())));
        }
    }
}
