//! The names this node keeps: one small JSON file per entry under `<data-dir>/cache/entries/`,
//! written by rename so a crash leaves the old or the new one, and read back at start.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use damselfly_p2p::net::CacheEntry;
use damselfly_p2p::Digest;
use damselfly_proto::cache_name::{later_expiry, url_agrees, CacheName};
use serde::{Deserialize, Serialize};

use crate::protocol::EntryInfo;

/// One name: what it names, since when, until when, and how many nodes should keep it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub id: String,
    pub tag: String,
    pub digest: Digest,
    pub length: u64,
    pub created_ms: u64,
    /// 0: never expires.
    pub expires_ms: u64,
    pub replicas: u32,
    /// The plain URL a preheated file came from; empty for an import.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
}

impl Entry {
    /// The key its name gives (entries are made from checked names only: `Index::open` and
    /// `from_proto` drop any other).
    pub fn key(&self) -> String {
        CacheName::new(&self.id, &self.tag).map(|n| n.key()).unwrap_or_default()
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        damselfly_proto::cache_name::expired(self.expires_ms, now_ms)
    }

    pub fn to_proto(&self) -> CacheEntry {
        CacheEntry {
            key: self.key(),
            id: self.id.clone(),
            tag: self.tag.clone(),
            digest: self.digest.to_string(),
            length: self.length,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            replicas: self.replicas,
            url: self.url.clone(),
        }
    }

    /// An entry as a scheduler sent it, checked as if a user had typed it.
    pub fn from_proto(e: &CacheEntry) -> Result<Entry, String> {
        let name = CacheName::new(&e.id, &e.tag).map_err(|err| err.to_string())?;
        if name.key() != e.key {
            return Err("the key is not its id's and tag's".into());
        }
        let digest = Digest::parse(&e.digest).map_err(|err| err.to_string())?;
        if !url_agrees(&e.id, &e.url) {
            return Err("a preheated file's id is its URL's, and only its".into());
        }
        Ok(Entry {
            id: e.id.clone(),
            tag: e.tag.clone(),
            digest,
            length: e.length,
            created_ms: e.created_ms,
            expires_ms: e.expires_ms,
            replicas: e.replicas.max(1),
            url: e.url.clone(),
        })
    }

    pub fn info(&self, holders: Option<Vec<String>>) -> EntryInfo {
        EntryInfo {
            id: self.id.clone(),
            tag: self.tag.clone(),
            digest: self.digest.to_string(),
            length: self.length,
            created_ms: self.created_ms,
            expires_ms: (self.expires_ms != 0).then_some(self.expires_ms),
            replicas: self.replicas,
            url: (!self.url.is_empty()).then(|| self.url.clone()),
            holders,
        }
    }
}

/// What [`Index::claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    New(Entry),
    Held(Entry),
    Taken(Entry),
}

pub struct Index {
    dir: PathBuf,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Index {
    /// Reads the entries under `dir` (created if missing), dropping files that do not parse
    /// or name their entry by another key.
    pub fn open(dir: &Path) -> io::Result<Index> {
        fs::create_dir_all(dir)?;
        let mut entries = HashMap::new();
        for file in fs::read_dir(dir)? {
            let path = file?.path();
            let key = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            let parsed = (path.extension().is_some_and(|e| e == "json"))
                .then(|| fs::read(&path).ok())
                .flatten()
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok())
                .filter(|e| CacheName::new(&e.id, &e.tag).is_ok_and(|n| n.key() == key));
            match parsed {
                Some(e) => {
                    entries.insert(key, e);
                }
                None => {
                    tracing::warn!(path = %path.display(), "removing an unreadable cache entry");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(Index { dir: dir.to_owned(), entries: Mutex::new(entries) })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Entry> {
        self.lock().get(key).cloned()
    }

    pub fn list(&self) -> Vec<Entry> {
        let mut all: Vec<Entry> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| (&a.id, &a.tag).cmp(&(&b.id, &b.tag)));
        all
    }

    /// Records `entry` under its name unless the name is taken: by an entry of other content
    /// (`Taken`), or of the same (`Held`, the first one's terms stand). Checked and recorded
    /// under one lock, on disk first, so two imports of one name cannot both win.
    pub fn claim(&self, entry: Entry, now_ms: u64) -> io::Result<Claim> {
        let key = entry.key();
        let mut entries = self.lock();
        if let Some(e) = entries.get(&key).filter(|e| !e.expired(now_ms)) {
            return Ok(if e.digest == entry.digest { Claim::Held(e.clone()) } else { Claim::Taken(e.clone()) });
        }
        self.write(&key, &entry)?;
        entries.insert(key, entry.clone());
        Ok(Claim::New(entry))
    }

    /// Moves the expiry of a preheated file's entry to `expires_ms` if that is later (a
    /// preheat of the same version again); returns the entry as it stands.
    pub fn renew(&self, key: &str, expires_ms: u64) -> io::Result<Option<Entry>> {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(key) else { return Ok(None) };
        if !e.url.is_empty() && later_expiry(e.expires_ms, expires_ms) {
            let renewed = Entry { expires_ms, ..e.clone() };
            self.write(key, &renewed)?;
            *e = renewed;
        }
        Ok(Some(e.clone()))
    }

    /// Writes `entry`'s file by rename, synced.
    fn write(&self, key: &str, entry: &Entry) -> io::Result<()> {
        let path = self.dir.join(format!("{key}.json"));
        let tmp = self.dir.join(format!("{key}.json.tmp"));
        let mut f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec(entry).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    pub fn remove(&self, key: &str) -> Option<Entry> {
        let removed = self.lock().remove(key);
        if removed.is_some() {
            let _ = fs::remove_file(self.dir.join(format!("{key}.json")));
        }
        removed
    }

    /// Whether any entry names `digest`.
    pub fn names(&self, digest: &Digest) -> bool {
        self.lock().values().any(|e| &e.digest == digest)
    }

    /// Entries expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> Vec<Entry> {
        self.lock().values().filter(|e| e.expired(now_ms)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            id: id.into(),
            tag: "v1".into(),
            digest: Digest::of(damselfly_p2p::Algorithm::Sha256, id.as_bytes()),
            length: 2,
            created_ms: 1,
            expires_ms: 0,
            replicas: 1,
            url: String::new(),
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_strangers_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        index.claim(entry("a"), 0).unwrap();
        index.claim(entry("b"), 0).unwrap();
        index.remove(&entry("b").key());
        fs::write(dir.path().join(format!("{}.json", "0".repeat(64))), serde_json::to_vec(&entry("c")).unwrap())
            .unwrap();
        fs::write(dir.path().join("junk.json"), b"{").unwrap();
        let again = Index::open(dir.path()).unwrap();
        assert_eq!(again.list(), vec![entry("a")]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(again.claim(entry("a"), 0).unwrap(), Claim::Held(entry("a")));
        let other = Entry { digest: entry("x").digest, ..entry("a") };
        assert_eq!(again.claim(other, 0).unwrap(), Claim::Taken(entry("a")));
        // An expired entry gives its name up.
        let brief = Entry { id: "b".into(), expires_ms: 5, ..entry("b") };
        assert!(matches!(again.claim(brief.clone(), 1).unwrap(), Claim::New(_)));
        assert!(matches!(again.claim(entry("b"), 10).unwrap(), Claim::New(_)));
    }

    #[test]
    fn an_entry_from_a_scheduler_is_checked_like_a_typed_one() {
        let good = entry("model").to_proto();
        assert_eq!(Entry::from_proto(&good).unwrap(), entry("model"));
        let mut bad = good.clone();
        bad.id = "../x".into();
        assert!(Entry::from_proto(&bad).is_err());
        let mut other_key = good;
        other_key.key = "0".repeat(64);
        assert!(Entry::from_proto(&other_key).is_err());
    }
}
