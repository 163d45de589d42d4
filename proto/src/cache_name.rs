//! How the P2P cache names content: an id and a tag chosen by the user, and the key derived
//! from them that nodes and schedulers name the entry by; and the terms every holder reads
//! alike (the replica bound, the clock of creation and expiry times).

use sha2::{Digest as _, Sha256};

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

    proptest! {
        #[test]
        fn a_name_is_accepted_exactly_when_it_is_in_the_alphabet(id in "\\PC{0,140}", tag in "\\PC{0,140}") {
            let ok = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)) && s.len() <= MAX_NAME;
            let accepted = CacheName::new(&id, &tag).is_ok();
            prop_assert_eq!(accepted, !id.is_empty() && ok(&id) && ok(&tag));
        }
    }
}
