//! Upload tokens: the capability a child shows a parent's upload server.
//!
//! The scheduler derives one key per host from its secret (`HMAC(secret, host id)`) and hands
//! it to that host when it announces itself. A token for reading one task from one parent is
//! `v1.<expiry>.<child>.<mac>` with `mac = HMAC(parent key, "<digest>|<child>|<expiry>")`, so
//! only the scheduler and the parent itself can mint tokens that parent accepts, a token names
//! the one task it opens, and it runs out.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of derived keys and MACs.
pub const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed upload token")]
    Malformed,
    #[error("upload token expired")]
    Expired,
    #[error("upload token not valid for this host and task")]
    BadSignature,
    #[error("upload token lives longer than {MAX_TOKEN_LIFETIME} s")]
    TooLong,
}

/// The longest a token may have left to live: a parent refuses one that runs out later, so a
/// token, once seen, is worth an hour at most whoever minted it.
pub const MAX_TOKEN_LIFETIME: u64 = 3600;

/// The key host `host_id` checks tokens with.
pub fn upload_key(secret: &[u8], host_id: &str) -> [u8; KEY_LEN] {
    mac(secret, &[b"damselfly-upload-key|", host_id.as_bytes()])
}

/// A token that lets `child` read `digest` from the parent owning `parent_key` until `expiry`
/// (seconds since the Unix epoch).
pub fn mint(parent_key: &[u8], digest: &str, child: &str, expiry: u64) -> String {
    Minter::new(parent_key).mint(digest, child, expiry)
}

/// Mints tokens for one parent with its key schedule computed once: the scheduler mints one
/// per parent per decision, and keying HMAC is half the work of a short message.
#[derive(Clone)]
pub struct Minter(HmacSha256);

impl Minter {
    pub fn new(parent_key: &[u8]) -> Self {
        Minter(HmacSha256::new_from_slice(parent_key).expect("HMAC takes keys of any length"))
    }

    pub fn mint(&self, digest: &str, child: &str, expiry: u64) -> String {
        self.mint_for(&Grant::new(child, expiry), digest)
    }

    /// The token for `grant` on this parent: a decision makes one grant for its child and
    /// mints it for each parent, so what does not depend on the parent is done once.
    pub fn mint_for(&self, grant: &Grant, digest: &str) -> String {
        let mut m = self.0.clone();
        for part in [digest.as_bytes(), b"|", grant.child.as_bytes(), b"|", grant.expiry.as_bytes()] {
            m.update(part);
        }
        let tag: [u8; KEY_LEN] = m.finalize().into_bytes().into();
        let mut token = String::with_capacity(grant.prefix.len() + 2 * KEY_LEN);
        token.push_str(&grant.prefix);
        push_hex(&mut token, &tag);
        token
    }
}

/// What the tokens of one decision share: the child they let in, and until when.
pub struct Grant {
    child: String,
    expiry: String,
    /// `v1.<expiry>.<child in hex>.`
    prefix: String,
}

impl Grant {
    pub fn new(child: &str, expiry: u64) -> Grant {
        let expiry = expiry.to_string();
        let mut prefix = String::with_capacity(5 + expiry.len() + 2 * child.len());
        prefix.push_str("v1.");
        prefix.push_str(&expiry);
        prefix.push('.');
        push_hex(&mut prefix, child.as_bytes());
        prefix.push('.');
        Grant { child: child.to_owned(), expiry, prefix }
    }
}

/// Checks `token` for `digest` against any of the host's keys (one per scheduler it announced
/// to). Returns the child host id the token was issued to.
pub fn verify(keys: &[[u8; KEY_LEN]], token: &str, digest: &str, now: u64) -> Result<String, TokenError> {
    let mut parts = token.split('.');
    let (Some("v1"), Some(expiry), Some(child), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let expiry: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
    let child = String::from_utf8(unhex(child).ok_or(TokenError::Malformed)?).map_err(|_| TokenError::Malformed)?;
    let tag = unhex(tag).ok_or(TokenError::Malformed)?;
    if expiry < now {
        return Err(TokenError::Expired);
    }
    if expiry - now > MAX_TOKEN_LIFETIME {
        return Err(TokenError::TooLong);
    }
    let expiry = expiry.to_string();
    let message: [&[u8]; 5] = [digest.as_bytes(), b"|", child.as_bytes(), b"|", expiry.as_bytes()];
    let ok = keys.iter().any(|key| {
        let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        for part in message {
            m.update(part);
        }
        // Constant-time comparison.
        m.verify_slice(&tag).is_ok()
    });
    if ok {
        Ok(child)
    } else {
        Err(TokenError::BadSignature)
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

#[cfg(test)]
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

pub(crate) fn push_hex(s: &mut String, bytes: &[u8]) {
    // A table, not `write!`: tokens are minted for every parent of every decision.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 1024 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn a_minted_token_opens_its_task_on_its_parent_only() {
        let parent = upload_key(b"secret", "parent");
        let other = upload_key(b"secret", "other");
        let t = mint(&parent, D, "child", 100);
        assert_eq!(verify(&[parent], &t, D, 50), Ok("child".to_owned()));
        assert_eq!(verify(&[other], &t, D, 50), Err(TokenError::BadSignature));
        assert_eq!(verify(&[parent], &t, &D.replace('1', "2"), 50), Err(TokenError::BadSignature));
        assert_eq!(verify(&[other, parent], &t, D, 50), Ok("child".to_owned()));
    }

    #[test]
    fn a_reused_minter_mints_what_mint_does() {
        let k = upload_key(b"secret", "p");
        let m = Minter::new(&k);
        for (child, expiry) in [("c", 1), ("other child", 99_999_999_999)] {
            assert_eq!(m.mint(D, child, expiry), mint(&k, D, child, expiry));
            assert_eq!(verify(&[k], &m.mint(D, child, expiry), D, expiry), Ok(child.to_owned()));
        }
    }

    #[test]
    fn expired_and_malformed_tokens_are_refused() {
        let k = upload_key(b"secret", "p");
        assert_eq!(verify(&[k], &mint(&k, D, "c", 10), D, 11), Err(TokenError::Expired));
        let far = mint(&k, D, "c", 10 + MAX_TOKEN_LIFETIME + 1);
        assert_eq!(verify(&[k], &far, D, 10), Err(TokenError::TooLong));
        for bad in ["", "v1", "v2.1.63.00", "v1.x.63.00", "v1.99.6.00", "v1.99.63.0g", "v1.99.63.00.1"] {
            assert_eq!(verify(&[k], bad, D, 0), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn a_token_with_a_changed_expiry_or_child_is_refused() {
        let k = upload_key(b"secret", "p");
        let t = mint(&k, D, "c", 100);
        let longer = t.replacen("v1.100.", "v1.900.", 1);
        assert_eq!(verify(&[k], &longer, D, 0), Err(TokenError::BadSignature));
        let other_child = t.replacen(&format!(".{}.", hex(b"c")), &format!(".{}.", hex(b"d")), 1);
        assert_eq!(verify(&[k], &other_child, D, 0), Err(TokenError::BadSignature));
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(s in "\\PC{0,200}") {
            let _ = verify(&[[0; KEY_LEN]], &s, D, 0);
        }
    }
}
