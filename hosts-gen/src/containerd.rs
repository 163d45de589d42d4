//! containerd's `hosts.toml`: the daemon as the first host of a registry, merged into whatever
//! the user has. Everything already there stays, comments included: `server`, `ca`, `client`,
//! `skip_verify`, other hosts and their order. A registry without `server` gets its own, so
//! that containerd falls back to it when the daemon is down.

use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table};

use crate::registry::Registry;

/// What containerd needs of a mirror host to pull through it.
const CAPABILITIES: [&str; 2] = ["pull", "resolve"];
pub const REGISTRY_HEADER: &str = "X-Dragonfly-Registry";

#[derive(Debug, thiserror::Error)]
#[error("{path}: not a hosts.toml containerd reads: {reason}")]
pub struct HostsError {
    pub path: PathBuf,
    pub reason: String,
}

/// The directory containerd reads for `registry` under `config_path`: the `host_port_` form
/// if the user has it (containerd looks there first), else the host as written (`_default`
/// for every registry).
pub fn hosts_dir(config_path: &Path, registry: Option<&Registry>) -> PathBuf {
    let Some(registry) = registry else { return config_path.join("_default") };
    if let Some((host, port)) = registry.host.rsplit_once(':') {
        let underscored = config_path.join(format!("{host}_{port}_"));
        if underscored.is_dir() {
            return underscored;
        }
    }
    config_path.join(&registry.host)
}

/// `existing` (a hosts.toml, or nothing) with the daemon at `mirror` as its first host for
/// `registry` (`None`: the `_default` file for every registry, which names no server and no
/// registry header: containerd's `ns` tells the daemon). Running it on its own output returns
/// that output unchanged.
pub fn merge(
    path: &Path,
    existing: Option<&str>,
    registry: Option<&Registry>,
    mirror: &str,
    dial_timeout: Option<&str>,
) -> Result<String, HostsError> {
    let fail = |reason: String| HostsError { path: path.to_owned(), reason };
    let mut doc: DocumentMut = existing.unwrap_or("").parse().map_err(|e: toml_edit::TomlError| fail(e.to_string()))?;
    if let Some(r) = registry {
        if !doc.contains_key("server") {
            // Before any table: a key after `[host.…]` would belong to that table.
            doc.insert("server", value(&r.url));
            if let Some(mut key) = doc.as_table_mut().key_mut("server") {
                key.leaf_decor_mut().set_prefix("");
            }
        }
    }
    let hosts = doc.entry("host").or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    let hosts = hosts.as_table_mut().ok_or_else(|| fail("`host` is not a table".to_owned()))?;
    hosts.set_implicit(true);
    if hosts.contains_key(mirror) {
        let ours = hosts[mirror].as_table_mut().ok_or_else(|| fail(format!("`host.\"{mirror}\"` is not a table")))?;
        complete(ours, registry, dial_timeout);
    } else {
        let mut ours = Table::new();
        complete(&mut ours, registry, dial_timeout);
        // First among the hosts, so that containerd tries it first: the hosts already there
        // move down one place in the file, in their order.
        let first = hosts.iter().filter_map(|(_, item)| item.as_table().and_then(Table::position)).min();
        let base = first.unwrap_or(usize::MAX / 2);
        for (_, item) in hosts.iter_mut() {
            if let Some(t) = item.as_table_mut() {
                shift(t, 2);
            }
        }
        ours.set_position(base);
        if let Some(Item::Table(header)) = ours.get_mut("header") {
            header.set_position(base + 1);
        }
        hosts.insert(mirror, Item::Table(ours));
    }
    Ok(doc.to_string())
}

/// Fills in what the daemon's host needs, leaving what the user set.
fn complete(ours: &mut Table, registry: Option<&Registry>, dial_timeout: Option<&str>) {
    if !ours.contains_key("capabilities") {
        let caps: Array = CAPABILITIES.iter().copied().collect();
        ours.insert("capabilities", value(caps));
    }
    if let Some(timeout) = dial_timeout {
        if !ours.contains_key("dial_timeout") {
            ours.insert("dial_timeout", value(timeout));
        }
    }
    if let Some(r) = registry {
        let header = ours.entry("header").or_insert_with(|| Item::Table(Table::new()));
        if let Some(header) = header.as_table_mut() {
            if !header.contains_key(REGISTRY_HEADER) {
                header.insert(REGISTRY_HEADER, value(&r.url));
            }
        }
    }
}

/// Moves a table and its subtables `by` places down the file.
fn shift(t: &mut Table, by: usize) {
    if let Some(p) = t.position() {
        t.set_position(p + by);
    }
    for (_, item) in t.iter_mut() {
        if let Some(sub) = item.as_table_mut() {
            shift(sub, by);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIRROR: &str = "http://127.0.0.1:65001";

    fn registry(s: &str) -> Registry {
        Registry::parse(s).expect("registry")
    }

    fn merged(existing: Option<&str>, r: Option<&Registry>) -> String {
        merge(Path::new("hosts.toml"), existing, r, MIRROR, None).expect("merges")
    }

    #[test]
    fn a_new_file_names_the_registry_and_puts_the_daemon_first() {
        let out = merged(None, Some(&registry("docker.io")));
        let doc: DocumentMut = out.parse().expect("toml");
        assert_eq!(doc["server"].as_str(), Some("https://registry-1.docker.io"));
        let ours = &doc["host"][MIRROR];
        assert_eq!(ours["capabilities"].as_array().map(|a| a.len()), Some(2));
        assert_eq!(ours["header"][REGISTRY_HEADER].as_str(), Some("https://registry-1.docker.io"));
        assert!(out.starts_with("server = "), "{out}");
    }

    #[test]
    fn a_users_file_keeps_everything_and_the_daemon_goes_first() {
        let user = "# my registry\nserver = \"https://registry.local:5000\"\n\n# the office cache\n[host.\"https://cache.office:5000\"]\n  capabilities = [\"pull\"]\n  skip_verify = true\n  ca = \"office.pem\"\n";
        let out = merged(Some(user), Some(&registry("registry.local:5000")));
        assert!(out.contains("# my registry") && out.contains("# the office cache"), "{out}");
        assert!(out.contains("skip_verify = true") && out.contains("ca = \"office.pem\""), "{out}");
        assert!(out.contains("server = \"https://registry.local:5000\""), "{out}");
        let ours = out.find(&format!("[host.\"{MIRROR}\"]")).expect("ours");
        let theirs = out.find("[host.\"https://cache.office:5000\"]").expect("theirs");
        assert!(ours < theirs, "the daemon is not first:\n{out}");
        assert_eq!(merged(Some(&out), Some(&registry("registry.local:5000"))), out, "a second run changed it");
    }

    #[test]
    fn the_default_file_has_the_daemon_and_nothing_else() {
        let out = merged(None, None);
        let doc: DocumentMut = out.parse().expect("toml");
        assert!(!doc.contains_key("server"));
        assert!(doc["host"][MIRROR].get("header").is_none());
    }

    #[test]
    fn a_dial_timeout_is_written_when_asked() {
        let out = merge(Path::new("h"), None, Some(&registry("ghcr.io")), MIRROR, Some("200ms")).expect("merges");
        assert!(out.contains("dial_timeout = \"200ms\""), "{out}");
    }

    #[test]
    fn a_file_that_is_not_toml_is_refused_not_overwritten() {
        assert!(merge(Path::new("h"), Some("server = ["), None, MIRROR, None).is_err());
        assert!(merge(Path::new("h"), Some("host = 3"), None, MIRROR, None).is_err());
    }

    #[test]
    fn the_underscored_directory_is_used_when_the_user_has_it() {
        let dir = tempfile::tempdir().expect("dir");
        let r = registry("registry.local:5000");
        assert_eq!(hosts_dir(dir.path(), Some(&r)), dir.path().join("registry.local:5000"));
        std::fs::create_dir(dir.path().join("registry.local_5000_")).expect("mkdir");
        assert_eq!(hosts_dir(dir.path(), Some(&r)), dir.path().join("registry.local_5000_"));
        assert_eq!(hosts_dir(dir.path(), None), dir.path().join("_default"));
    }

    proptest::proptest! {
        #[test]
        fn merging_twice_is_merging_once(
            comment in "[a-z ]{0,20}",
            server in proptest::option::of("[a-z]{1,8}\\.example"),
            hosts in proptest::collection::btree_map("[a-z]{1,8}", proptest::bool::ANY, 0..4),
        ) {
            let mut user = format!("# {comment}\n");
            if let Some(s) = &server {
                user.push_str(&format!("server = \"https://{s}\"\n"));
            }
            for (h, skip) in &hosts {
                user.push_str(&format!("\n[host.\"https://{h}.mirror\"]\n  skip_verify = {skip}\n"));
            }
            let once = merged(Some(&user), Some(&registry("ghcr.io")));
            proptest::prop_assert_eq!(merged(Some(&once), Some(&registry("ghcr.io"))), once.clone());
            let ours = once.find(&format!("[host.\"{MIRROR}\"]"));
            proptest::prop_assert!(ours.is_some(), "{}", once);
            for h in hosts.keys() {
                let theirs = once.find(&format!("[host.\"https://{h}.mirror\"]"));
                proptest::prop_assert!(theirs.is_some_and(|t| Some(t) > ours), "{}", once);
            }
        }
    }
}
