//! How the P2P cache names content: an id and a tag chosen by the user, and the key derived
//! from them that nodes and schedulers name the entry by; and the terms every holder reads
//! alike (the replica bound, the clock of creation and expiry times).

use sha2::{Digest as _, Sha256};

use crate::v1::UrlTask;

/// Longest id or tag.
pub const MAX_NAME: usize = 128;
/// Replicas an entry may ask for.
pub const MAX_REPLICAS: u32 = 64;

/// Now, as entries' times are written: milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether an entry that expires at `expires_ms` (0: never) has expired at `now_ms`.
pub fn expired(expires_ms: u64, now_ms: u64) -> bool {
    expires_ms != 0 && expires_ms <= now_ms
}

/// The longest time to live: a hundred years.
const MAX_TTL: u64 = 100 * 365 * 86_400;

/// A time to live as typed: a number and a unit (s, m, h, d), such as `12h`.
pub fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: a number and a unit (s, m, h, d), such as 12h"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    match n.checked_mul(secs) {
        Some(0) => Err("the time to live must be more than 0".into()),
        Some(t) if t <= MAX_TTL => Ok(std::time::Duration::from_secs(t)),
        _ => Err(format!("{s:?} is longer than a hundred years")),
    }
}

/// Whether an expiry of `new_ms` keeps an entry longer than `old_ms` does (0: never expires).
pub fn later_expiry(old_ms: u64, new_ms: u64) -> bool {
    old_ms != 0 && (new_ms == 0 || new_ms > old_ms)
}

/// How a name is shown: `id`, or `id:tag`.
pub fn label(id: &str, tag: &str) -> String {
    if tag.is_empty() {
        id.to_owned()
    } else {
        format!("{id}:{tag}")
    }
}

/// Why an id or a tag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the id is empty")]
    EmptyId,
    #[error("the {0} is longer than {MAX_NAME} characters")]
    TooLong(&'static str),
    #[error("the {what} may hold only letters, digits, '.', '_' and '-' (found {found:?})")]
    BadChar { what: &'static str, found: char },
}

/// An entry's name: an id of 1 to 128 characters of `[A-Za-z0-9._-]`, and a tag of up to 128
/// of the same (empty by default).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheName {
    id: String,
    tag: String,
}

impl CacheName {
    pub fn new(id: &str, tag: &str) -> Result<CacheName, NameError> {
        if id.is_empty() {
            return Err(NameError::EmptyId);
        }
        check("id", id)?;
        check("tag", tag)?;
        Ok(CacheName { id: id.to_owned(), tag: tag.to_owned() })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Lower-case hex sha256 of the id and the tag, with a prefix of its own and a NUL between
    /// them (neither may hold one), so that no other pair has the same key.
    pub fn key(&self) -> String {
        let h = Sha256::new()
            .chain_update(b"damselfly-cache-v1\0")
            .chain_update(self.id.as_bytes())
            .chain_update(b"\0")
            .chain_update(self.tag.as_bytes())
            .finalize();
        h.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for CacheName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&label(&self.id, &self.tag))
    }
}

fn check(what: &'static str, s: &str) -> Result<(), NameError> {
    if let Some(found) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(NameError::BadChar { what, found });
    }
    if s.len() > MAX_NAME {
        return Err(NameError::TooLong(what));
    }
    Ok(())
}

/// What a preheated file's name is made of: its URL and the version of it its origin showed.
///
/// A URL names whatever its origin serves at the moment, so a file is named by the URL and a
/// validator together: a strong `ETag`, else `Last-Modified`, with the length. Content that
/// changes at its origin gets a new name, and a client is served the cluster's copy only when
/// the origin still shows the same version to it. A weak `ETag` promises no byte equality and
/// is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlVersion {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub length: u64,
}

/// The id every preheated file's name starts with. Such names are the cluster's: an import may
/// not take one, and a scheduler takes a new one only from a seed.
pub const URL_ID_PREFIX: &str = "url.";

impl UrlVersion {
    /// The version an origin's headers show; `None` when they carry no usable validator.
    pub fn from_headers(etag: Option<&str>, last_modified: Option<&str>, length: u64) -> Option<UrlVersion> {
        let usable = |v: &&str| !v.is_empty() && v.len() <= 1024 && v.bytes().all(|b| (0x20..0x7f).contains(&b));
        let etag = etag.filter(usable).filter(|e| e.starts_with('"') && e.ends_with('"') && e.len() >= 2);
        let last_modified = last_modified.filter(usable);
        match (etag, last_modified) {
            (Some(e), _) => Some(UrlVersion { etag: Some(e.to_owned()), last_modified: None, length }),
            (None, Some(lm)) => Some(UrlVersion { etag: None, last_modified: Some(lm.to_owned()), length }),
            (None, None) => None,
        }
    }

    /// What a seed is asked to fetch: `url` at this version, until `expires_ms`.
    pub fn task(&self, url: &str, authorization: String, expires_ms: u64) -> UrlTask {
        UrlTask {
            url: url.to_owned(),
            authorization,
            etag: self.etag.clone().unwrap_or_default(),
            last_modified: self.last_modified.clone().unwrap_or_default(),
            length: self.length,
            expires_ms,
        }
    }

    /// The version a seed is asked to fetch; `None` for a task that names none.
    pub fn of_task(task: &UrlTask) -> Option<UrlVersion> {
        let set = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        UrlVersion::from_headers(set(&task.etag).as_deref(), set(&task.last_modified).as_deref(), task.length)
    }

    /// The name of `url` (in its canonical spelling) at this version: `url.<sha256 of the
    /// URL>`, tagged with a sha256 of the validator and the length.
    pub fn name(&self, url: &str) -> CacheName {
        let id = format!("{URL_ID_PREFIX}{}", url_hash(url));
        let mut tag = Sha256::new().chain_update(b"damselfly-url-version-v1\0");
        match (&self.etag, &self.last_modified) {
            (Some(e), _) => tag.update(format!("etag\0{e}")),
            (None, Some(lm)) => tag.update(format!("last-modified\0{lm}")),
            (None, None) => tag.update(b"none"),
        }
        tag.update(format!("\0{}", self.length));
        let tag: String = tag.finalize().iter().map(|b| format!("{b:02x}")).collect();
        CacheName { id, tag }
    }
}

/// Whether an entry's id and URL agree: a preheated file's id is its URL's, and only such an
/// id comes with a URL (empty for an import).
pub fn url_agrees(id: &str, url: &str) -> bool {
    match id.strip_prefix(URL_ID_PREFIX) {
        Some(hash) => !url.is_empty() && hash == url_hash(url),
        None => url.is_empty(),
    }
}

fn url_hash(url: &str) -> String {
    let h = Sha256::new().chain_update(b"damselfly-url-v1\0").chain_update(url.as_bytes()).finalize();
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `key` looks like a key ([`CacheName::key`]): 64 lower-case hex digits.
pub fn is_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_and_tags_outside_the_alphabet_are_refused() {
        assert_eq!(CacheName::new("", "").unwrap_err(), NameError::EmptyId);
        assert!(matches!(CacheName::new("a/b", ""), Err(NameError::BadChar { what: "id", found: '/' })));
        assert!(matches!(CacheName::new("a", "x y"), Err(NameError::BadChar { what: "tag", found: ' ' })));
        assert!(matches!(CacheName::new("é", ""), Err(NameError::BadChar { .. })));
        assert_eq!(CacheName::new(&"a".repeat(129), "").unwrap_err(), NameError::TooLong("id"));
        assert!(CacheName::new(&"a".repeat(128), &"b".repeat(128)).is_ok());
        assert!(CacheName::new("model-7b.v2_final", "").is_ok());
    }

    #[test]
    fn the_key_tells_id_and_tag_apart() {
        let k = |id, tag| CacheName::new(id, tag).unwrap().key();
        assert_ne!(k("ab", "c"), k("a", "bc"));
        assert_ne!(k("a", ""), k("a", "latest"));
        assert!(is_key(&k("a", "")));
        assert!(!is_key("ABC"));
    }

    #[test]
    fn a_url_is_named_by_its_strong_validator_and_length() {
        let v = |e: Option<&str>, lm: Option<&str>, n| UrlVersion::from_headers(e, lm, n);
        let url = "http://files.example/model.bin";
        let a = v(Some("\"abc\""), Some("Mon, 07 Dec 2026 10:00:00 GMT"), 10).unwrap();
        assert_eq!(a.last_modified, None, "a strong ETag is enough");
        assert!(v(Some("W/\"abc\""), None, 10).is_none(), "a weak ETag promises no bytes");
        assert!(v(None, None, 10).is_none());
        let lm = v(Some("W/\"abc\""), Some("Mon, 07 Dec 2026 10:00:00 GMT"), 10).unwrap();
        assert_eq!(lm.etag, None);
        let name = a.name(url);
        assert!(CacheName::new(name.id(), name.tag()).is_ok(), "a name every holder accepts");
        assert!(url_agrees(name.id(), url));
        assert!(!url_agrees(name.id(), "http://files.example/other.bin"));
        assert!(!url_agrees(name.id(), ""), "a URL's id without the URL");
        assert!(!url_agrees("model", url), "an import's id with a URL");
        assert!(url_agrees("model", ""));
        assert_ne!(name.key(), v(Some("\"abc\""), None, 11).unwrap().name(url).key(), "another length");
        assert_ne!(name.key(), v(Some("\"abd\""), None, 10).unwrap().name(url).key(), "another version");
        assert_eq!(name.key(), v(Some("\"abc\""), None, 10).unwrap().name(url).key());
        assert_ne!(name.key(), lm.name(url).key());
    }

    #[test]
    fn ttls_read_with_their_units() {
        assert_eq!(parse_ttl("90"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(std::time::Duration::from_secs(1800)));
        assert_eq!(parse_ttl("7d"), Ok(std::time::Duration::from_secs(7 * 86_400)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
        assert!(parse_ttl("36501d").is_err());
    }

    proptest! {
        #[test]
        fn a_name_is_accepted_exactly_when_it_is_in_the_alphabet(id in "\\PC{0,140}", tag in "\\PC{0,140}") {
            let ok = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)) && s.len() <= MAX_NAME;
            let accepted = CacheName::new(&id, &tag).is_ok();
            prop_assert_eq!(accepted, !id.is_empty() && ok(&id) && ok(&tag));
        }
    }
}
