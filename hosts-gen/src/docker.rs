//! dockerd's `daemon.json`: the daemon first in `registry-mirrors`, once, every other key kept
//! in its order. dockerd sends only Docker Hub pulls to its mirrors.

use std::path::Path;

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{path}: not JSON: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: {what} is not {expected}")]
    Shape { path: String, what: &'static str, expected: &'static str },
}

/// `existing` (a daemon.json, or nothing) with `mirror` first in `registry-mirrors`.
pub fn merge(path: &Path, existing: Option<&str>, mirror: &str) -> Result<String, DockerError> {
    let name = path.display().to_string();
    let text = existing.filter(|t| !t.trim().is_empty()).unwrap_or("{}");
    let mut doc: Value =
        serde_json::from_str(text).map_err(|e| DockerError::Parse { path: name.clone(), reason: e.to_string() })?;
    let shape = |what, expected| DockerError::Shape { path: name.clone(), what, expected };
    let top: &mut Map<String, Value> = doc.as_object_mut().ok_or_else(|| shape("the file", "an object"))?;
    let mirrors = top.entry("registry-mirrors").or_insert_with(|| Value::Array(Vec::new()));
    let list = mirrors.as_array_mut().ok_or_else(|| shape("registry-mirrors", "a list"))?;
    let same = |v: &Value| v.as_str().is_some_and(|s| s.trim_end_matches('/') == mirror.trim_end_matches('/'));
    if !list.first().is_some_and(same) || list.iter().filter(|v| same(v)).count() > 1 {
        list.retain(|v| !same(v));
        list.insert(0, Value::String(mirror.to_owned()));
    }
    let mut out =
        serde_json::to_string_pretty(&doc).map_err(|e| DockerError::Parse { path: name, reason: e.to_string() })?;
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "http://127.0.0.1:65001";

    fn merged(existing: Option<&str>) -> String {
        merge(Path::new("daemon.json"), existing, M).expect("merges")
    }

    #[test]
    fn the_daemon_goes_first_once_and_every_other_key_stays_in_order() {
        let user = r#"{"log-driver": "journald", "registry-mirrors": ["https://mirror.gcr.io", "http://127.0.0.1:65001/"], "data-root": "/srv/docker"}"#;
        let out = merged(Some(user));
        let doc: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(doc["registry-mirrors"], serde_json::json!([M, "https://mirror.gcr.io"]));
        let keys: Vec<&str> = doc.as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(keys, ["log-driver", "registry-mirrors", "data-root"]);
        assert_eq!(merged(Some(&out)), out, "a second run changed it");
    }

    #[test]
    fn a_missing_or_empty_file_gets_only_the_mirror() {
        let out = merged(None);
        assert_eq!(serde_json::from_str::<Value>(&out).expect("json"), serde_json::json!({"registry-mirrors": [M]}));
        assert_eq!(merged(Some("\n")), out);
    }

    #[test]
    fn what_is_not_a_daemon_json_is_refused() {
        for bad in ["[", "[1]", r#"{"registry-mirrors": "x"}"#] {
            assert!(merge(Path::new("d"), Some(bad), M).is_err(), "{bad}");
        }
    }
}
