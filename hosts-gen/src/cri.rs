//! containerd's `config.toml`: the CRI plugin reads `hosts.toml` files only from the directory
//! its `registry.config_path` names, and kubelet pulls through the CRI plugin. Config version 2
//! (containerd 1.x) keeps it under `plugins."io.containerd.grpc.v1.cri".registry`, version 3
//! (2.x) under `plugins."io.containerd.cri.v1.images".registry`. Every other key and comment
//! stays; a config that sets `registry.mirrors` or `registry.configs` is refused, since
//! containerd rejects those together with `config_path`.

use std::path::Path;

use toml_edit::{value, DocumentMut, Item, Table};

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("{path}: not TOML: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: config version {version} is not supported (2 for containerd 1.x, 3 for 2.x)")]
    Version { path: String, version: i64 },
    #[error("{path}: the CRI plugin sets registry.{key}, which containerd refuses together with config_path; move those settings into hosts.toml files and remove registry.{key}")]
    Legacy { path: String, key: &'static str },
    #[error("{path}: the CRI plugin reads hosts files from {theirs:?}; run hosts-gen with --config-path {theirs:?}, or remove config_path")]
    OtherPath { path: String, theirs: String },
}

/// `existing` (a containerd config) with the CRI plugin reading `config_path`.
pub fn merge(path: &Path, existing: &str, config_path: &str) -> Result<String, CriError> {
    let name = path.display().to_string();
    let mut doc: DocumentMut = existing
        .parse()
        .map_err(|e: toml_edit::TomlError| CriError::Parse { path: name.clone(), reason: e.to_string() })?;
    let version = doc.get("version").and_then(Item::as_integer).unwrap_or(1);
    let plugin = match version {
        2 => "io.containerd.grpc.v1.cri",
        3 => "io.containerd.cri.v1.images",
        other => return Err(CriError::Version { path: name, version: other }),
    };
    let registry = table(table(table(doc.as_table_mut(), "plugins"), plugin), "registry");
    for key in ["mirrors", "configs"] {
        if registry.get(key).is_some_and(|t| t.as_table_like().is_some_and(|t| !t.is_empty())) {
            return Err(CriError::Legacy { path: name, key });
        }
    }
    match registry.get("config_path").and_then(Item::as_str) {
        // A `:`-separated list: the first directory that has a registry's files wins.
        Some(theirs) if theirs.split(':').any(|d| d == config_path) => {}
        Some(theirs) if !theirs.is_empty() => {
            return Err(CriError::OtherPath { path: name, theirs: theirs.to_owned() })
        }
        _ => {
            registry.insert("config_path", value(config_path));
        }
    }
    Ok(doc.to_string())
}

/// The table `key` of `parent`, made (implicit, so no empty header is printed) if missing.
fn table<'a>(parent: &'a mut Table, key: &str) -> &'a mut Table {
    let item = parent.entry(key).or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    if !item.is_table() {
        // A dotted or inline form: keep its content as a table of its own.
        if let Ok(t) = item.clone().into_table() {
            *item = Item::Table(t);
        }
    }
    item.as_table_mut().expect("made a table above")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/etc/containerd/certs.d";

    fn merged(text: &str) -> Result<String, CriError> {
        merge(Path::new("config.toml"), text, DIR)
    }

    #[test]
    fn version_2_and_3_get_config_path_under_their_plugin_and_keep_the_rest() {
        let v2 = "version = 2\n# keep me\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.9\"\n";
        let out = merged(v2).expect("v2");
        let doc: DocumentMut = out.parse().expect("toml");
        assert_eq!(doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"].as_str(), Some(DIR));
        assert!(out.contains("# keep me") && out.contains("sandbox_image = \"pause:3.9\""), "{out}");
        let out = merged("version = 3\n").expect("v3");
        let doc: DocumentMut = out.parse().expect("toml");
        assert_eq!(doc["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"].as_str(), Some(DIR));
        assert_eq!(merged(&out).expect("again"), out, "a second run changed it");
    }

    #[test]
    fn legacy_mirrors_another_path_and_old_versions_are_refused() {
        let mirrors = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m\"]\n";
        assert!(matches!(merged(mirrors), Err(CriError::Legacy { key: "mirrors", .. })));
        let other = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/opt/certs\"\n";
        assert!(matches!(merged(other), Err(CriError::OtherPath { .. })));
        let listed = format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/opt/certs:{DIR}\"\n"
        );
        assert_eq!(merged(&listed).expect("listed"), listed);
        assert!(matches!(merged("root = \"/var/lib/containerd\"\n"), Err(CriError::Version { version: 1, .. })));
    }
}
