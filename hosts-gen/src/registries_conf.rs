//! containers-registries.conf (skopeo, podman, CRI-O, buildah): a drop-in with one
//! `[[registry]]` per registry whose first mirror is the daemon.
//!
//! These clients send a mirror neither `ns` nor a header; they put the path of the mirror's
//! `location` in front of the repository. So the daemon's location carries the registry as its
//! path, `127.0.0.1:65001/ghcr.io` (a port spelled `10.0.0.5_5000`), and the daemon reads the
//! registry back from there (`damselfly_mirror::oci::registry_prefix`).
//!
//! A drop-in's `[[registry]]` replaces the entry with the same prefix in the main file, so an
//! entry the user has there (its location, `insecure`, `blocked`, its mirrors) is carried into
//! the drop-in whole before the daemon goes in front of its mirrors.

use std::path::{Path, PathBuf};

use damselfly_mirror::oci::registry_prefix;
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("{path}: not a registries.conf: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("registry {0:?} cannot be named in a repository path (an IPv6 address?): give it a host name")]
    Unspellable(String),
}

/// Where the daemon's mirror is, as registries.conf names it: `host:port`, and whether it is
/// plain HTTP (its entry is then `insecure`, or the clients would insist on TLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorLocation {
    pub authority: String,
    pub plain_http: bool,
}

impl MirrorLocation {
    /// `HOST:PORT` (plain HTTP, the daemon's default) or an `http(s)://HOST:PORT` URL.
    pub fn parse(raw: &str) -> Option<MirrorLocation> {
        let (plain_http, rest) = match raw.split_once("://") {
            Some(("http", rest)) => (true, rest),
            Some(("https", rest)) => (false, rest),
            Some(_) => return None,
            None => (true, raw),
        };
        let authority = rest.trim_end_matches('/');
        let valid = !authority.is_empty()
            && !authority.contains(['/', '@', '?', '#'])
            && !authority.chars().any(char::is_whitespace);
        valid.then(|| MirrorLocation { authority: authority.to_owned(), plain_http })
    }
}

/// One registry to send through the daemon.
pub struct Entry<'a> {
    pub registry: &'a Registry,
    /// The registry itself may be reached over plain HTTP or unverified TLS.
    pub insecure: bool,
}

/// `existing` (the drop-in, or nothing) with the daemon first among the mirrors of each
/// registry in `entries`. `main` is the main registries.conf, whose entry for a registry the
/// drop-in does not have yet is carried over. Running it on its own output returns that output.
pub fn merge(
    path: &Path,
    existing: Option<&str>,
    main: Option<&str>,
    entries: &[Entry<'_>],
    mirror: &MirrorLocation,
) -> Result<String, ConfError> {
    let fail = |reason: String| ConfError::Parse { path: path.to_owned(), reason };
    let mut doc: DocumentMut = existing.unwrap_or("").parse().map_err(|e: toml_edit::TomlError| fail(e.to_string()))?;
    let main: Option<DocumentMut> = main.and_then(|m| m.parse().ok());
    for entry in entries {
        let prefix = &entry.registry.host;
        let component = registry_prefix::spell(prefix).ok_or_else(|| ConfError::Unspellable(prefix.clone()))?;
        let ours = mirror_table(&format!("{}/{component}", mirror.authority), mirror.plain_http);
        let index = entry_for(&mut doc, main.as_ref(), entry).map_err(fail)?;
        put_first(&mut doc, index, ours).map_err(fail)?;
    }
    let text = doc.to_string();
    match existing.is_some_and(|e| !e.trim().is_empty()) {
        true => Ok(text),
        false => Ok(format!("{HEADER}\n{}", text.trim_start_matches('\n'))),
    }
}

/// What a file this command makes says about itself.
const HEADER: &str = "# Written by `damselfly hosts-gen registries-conf`: skopeo, podman and CRI-O pull these\n\
                      # registries through the daemon, and from the registry itself when it is down.\n\
                      # `damselfly hosts-gen registries-conf --restore` removes it.";

fn registries_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, String> {
    let item = doc.entry("registry").or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
    item.as_array_of_tables_mut().ok_or_else(|| "`registry` is not a list of tables".to_owned())
}

/// The index of `entry`'s `[[registry]]` in `doc`: the one there, else the main file's carried
/// over, else a new one, appended.
fn entry_for(doc: &mut DocumentMut, main: Option<&DocumentMut>, entry: &Entry<'_>) -> Result<usize, String> {
    let prefix = &entry.registry.host;
    if let Some(i) = find(registries_mut(doc)?, prefix) {
        return Ok(i);
    }
    let carried = main.and_then(|m| m.get("registry")?.as_array_of_tables()).and_then(|list| {
        let i = find(list, prefix)?;
        list.get(i).cloned()
    });
    let mut table = carried.unwrap_or_else(|| new_registry(entry));
    reposition(&mut table, next_position(doc));
    let registries = registries_mut(doc)?;
    registries.push(table);
    Ok(registries.len() - 1)
}

/// Makes `ours` the first mirror of the `index`th `[[registry]]`, once: the others keep their
/// order, and the tables after it in the file move down one place.
fn put_first(doc: &mut DocumentMut, index: usize, mut ours: Table) -> Result<(), String> {
    let table = registries_mut(doc)?.get_mut(index).ok_or("the registry entry vanished")?;
    if mirrors(table).and_then(|m| m.get(0)).is_some_and(|t| same(t, &ours)) {
        return Ok(());
    }
    let at = mirrors(table).and_then(|m| m.iter().filter_map(Table::position).min());
    let at = at.or_else(|| table.position().map(|p| p + 1)).unwrap_or(usize::MAX / 2);
    shift_from(doc.as_table_mut(), at);
    let table = registries_mut(doc)?.get_mut(index).ok_or("the registry entry vanished")?;
    let others = mirrors(table).into_iter().flat_map(|m| m.iter()).filter(|t| location_of(t) != location_of(&ours));
    let others: Vec<Table> = others.cloned().collect();
    ours.set_position(at);
    let mut list = ArrayOfTables::new();
    list.push(ours);
    others.into_iter().for_each(|t| list.push(t));
    table.insert("mirror", Item::ArrayOfTables(list));
    Ok(())
}

/// The entry for `prefix`: its `prefix`, or its `location` when it has none (the file
/// format's own rule).
fn find(list: &ArrayOfTables, prefix: &str) -> Option<usize> {
    list.iter().position(|t| {
        let key = t.get("prefix").or_else(|| t.get("location")).and_then(Item::as_str);
        key.is_some_and(|k| k.trim_end_matches('/') == prefix)
    })
}

fn new_registry(entry: &Entry<'_>) -> Table {
    let mut table = Table::new();
    table.insert("prefix", value(&entry.registry.host));
    table.insert("location", value(&entry.registry.host));
    if entry.insecure {
        table.insert("insecure", value(true));
    }
    table
}

fn mirror_table(location: &str, insecure: bool) -> Table {
    let mut table = Table::new();
    table.insert("location", value(location));
    if insecure {
        table.insert("insecure", value(true));
    }
    table
}

fn mirrors(table: &Table) -> Option<&ArrayOfTables> {
    table.get("mirror")?.as_array_of_tables()
}

fn location_of(t: &Table) -> Option<&str> {
    t.get("location").and_then(Item::as_str).map(|l| l.trim_end_matches('/'))
}

fn same(t: &Table, ours: &Table) -> bool {
    let insecure = |t: &Table| t.get("insecure").and_then(Item::as_bool).unwrap_or(false);
    location_of(t) == location_of(ours) && insecure(t) == insecure(ours)
}

/// One past the last table's position: where an appended entry goes.
fn next_position(doc: &DocumentMut) -> usize {
    fn max(t: &Table) -> usize {
        let own = t.position().unwrap_or(0);
        t.iter()
            .map(|(_, item)| match item {
                Item::Table(sub) => max(sub),
                Item::ArrayOfTables(list) => list.iter().map(max).max().unwrap_or(0),
                _ => 0,
            })
            .fold(own, usize::max)
    }
    max(doc.as_table()) + 1
}

/// Gives a table carried from another file, and its mirrors, positions from `at` on, and a
/// blank line before it (it may have been the first thing in its file).
fn reposition(table: &mut Table, at: usize) {
    table.set_position(at);
    let prefix = table.decor().prefix().and_then(|p| p.as_str()).unwrap_or("").to_owned();
    if !prefix.starts_with('\n') {
        table.decor_mut().set_prefix(format!("\n{prefix}"));
    }
    if let Some(Item::ArrayOfTables(list)) = table.get_mut("mirror") {
        for (i, t) in list.iter_mut().enumerate() {
            t.set_position(at + 1 + i);
        }
    }
}

/// Moves every table at or after `at` one place down the file, to make room there.
fn shift_from(t: &mut Table, at: usize) {
    if let Some(p) = t.position().filter(|&p| p >= at) {
        t.set_position(p + 1);
    }
    for (_, item) in t.iter_mut() {
        match item {
            Item::Table(sub) => shift_from(sub, at),
            Item::ArrayOfTables(list) => list.iter_mut().for_each(|sub| shift_from(sub, at)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror() -> MirrorLocation {
        MirrorLocation::parse("127.0.0.1:65001").expect("mirror")
    }

    fn merged(existing: Option<&str>, main: Option<&str>, registries: &[&str], insecure: bool) -> String {
        let parsed: Vec<Registry> = registries.iter().map(|r| Registry::parse(r).expect("registry")).collect();
        let entries: Vec<Entry<'_>> = parsed.iter().map(|registry| Entry { registry, insecure }).collect();
        merge(Path::new("damselfly.conf"), existing, main, &entries, &mirror()).expect("merges")
    }

    /// (prefix, location, mirror locations) of every entry, as containers-image reads them.
    fn read(text: &str) -> Vec<(String, String, Vec<String>)> {
        let doc: DocumentMut = text.parse().expect("toml");
        let list = doc["registry"].as_array_of_tables().expect("list");
        list.iter()
            .map(|t| {
                let s = |k: &str| t.get(k).and_then(Item::as_str).unwrap_or_default().to_owned();
                let m = mirrors(t).map(|m| m.iter().filter_map(location_of).map(str::to_owned).collect());
                (s("prefix"), s("location"), m.unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn each_registry_gets_the_daemon_as_its_mirror_with_the_registry_in_the_path() {
        let out = merged(None, None, &["ghcr.io", "10.0.0.5:5000", "docker.io"], false);
        assert_eq!(
            read(&out),
            [
                ("ghcr.io".into(), "ghcr.io".into(), vec!["127.0.0.1:65001/ghcr.io".to_owned()]),
                ("10.0.0.5:5000".into(), "10.0.0.5:5000".into(), vec!["127.0.0.1:65001/10.0.0.5_5000".to_owned()]),
                ("docker.io".into(), "docker.io".into(), vec!["127.0.0.1:65001/docker.io".to_owned()]),
            ]
        );
        let doc: DocumentMut = out.parse().expect("toml");
        assert_eq!(doc["registry"][0]["mirror"][0]["insecure"].as_bool(), Some(true), "a plain-HTTP daemon");
        assert_eq!(merged(Some(&out), None, &["ghcr.io", "10.0.0.5:5000", "docker.io"], false), out);
    }

    #[test]
    fn an_entry_the_user_has_keeps_everything_and_gets_the_daemon_first() {
        let user = "# my mirrors\nunqualified-search-registries = [\"docker.io\"]\n\n\
                    [[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\nblocked = false # keep\n\n\
                    [[registry.mirror]]\nlocation = \"mirror.corp/quay\"\n\n\
                    [[registry]]\nlocation = \"ghcr.io\"\n";
        let out = merged(Some(user), None, &["quay.io", "ghcr.io"], false);
        assert!(out.starts_with("# my mirrors\nunqualified-search-registries"), "{out}");
        assert!(out.contains("blocked = false # keep"), "{out}");
        assert_eq!(
            read(&out),
            [
                ("quay.io".into(), "quay.io".into(), vec!["127.0.0.1:65001/quay.io".into(), "mirror.corp/quay".into()]),
                (String::new(), "ghcr.io".into(), vec!["127.0.0.1:65001/ghcr.io".into()]),
            ]
        );
        assert_eq!(merged(Some(&out), None, &["quay.io", "ghcr.io"], false), out, "a second run changed it");
    }

    #[test]
    fn the_main_files_entry_is_carried_into_the_drop_in() {
        let main = "[[registry]]\nprefix = \"reg.corp\"\nlocation = \"reg.corp:8443\"\ninsecure = true\n\n\
                    [[registry.mirror]]\nlocation = \"cache.corp/reg\"\n";
        let out = merged(None, Some(main), &["reg.corp"], false);
        assert_eq!(
            read(&out),
            [(
                "reg.corp".into(),
                "reg.corp:8443".into(),
                vec!["127.0.0.1:65001/reg.corp".into(), "cache.corp/reg".into()]
            )]
        );
        let doc: DocumentMut = out.parse().expect("toml");
        assert_eq!(doc["registry"][0]["insecure"].as_bool(), Some(true));
    }

    #[test]
    fn an_insecure_registry_is_marked_and_an_ipv6_one_is_refused() {
        let doc: DocumentMut = merged(None, None, &["localhost:5000"], true).parse().expect("toml");
        assert_eq!(doc["registry"][0]["insecure"].as_bool(), Some(true));
        let v6 = Registry::parse("[::1]:5000").expect("registry");
        let err = merge(Path::new("d"), None, None, &[Entry { registry: &v6, insecure: false }], &mirror());
        assert!(matches!(err, Err(ConfError::Unspellable(_))), "{err:?}");
    }

    #[test]
    fn mirror_locations_parse_as_authorities() {
        let https = MirrorLocation::parse("https://node.local:65001/").expect("url");
        assert_eq!(https, MirrorLocation { authority: "node.local:65001".into(), plain_http: false });
        for bad in ["", "ftp://x", "x/y", "http://u@x", "a b"] {
            assert_eq!(MirrorLocation::parse(bad), None, "{bad:?}");
        }
    }
}
