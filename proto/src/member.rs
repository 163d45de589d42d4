//! Cluster membership: how a node proves to a scheduler that it belongs to the cluster, and
//! which node a host id belongs to.
//!
//! Every call a node makes carries three metadata entries:
//!
//! - `damselfly-host`: the host id it acts as;
//! - `damselfly-owner`: its owner token, 32 random bytes in hex kept in its data dir. The first
//!   caller to announce a host id owns it; a scheduler refuses another owner for that id while
//!   the host is known. The token is a node's own secret: other members never see it.
//! - `damselfly-member`: `v1.<unix seconds>.<mac>`, where `mac` is the HMAC-SHA256, under a key
//!   derived from the cluster secret, of the host id, the owner token and the time. Only a
//!   holder of the cluster secret can make one, the secret itself never travels, and a proof
//!   is good for [`MAX_SKEW`] either side of its time.
//!
//! Without TLS, a proof seen on the wire can be replayed for the same host id and owner until
//! it runs out; the cluster's TLS options close that (see `docs/security.md`).

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use crate::token::{push_hex, unhex, KEY_LEN};

type HmacSha256 = Hmac<Sha256>;

pub const HOST_HEADER: &str = "damselfly-host";
pub const OWNER_HEADER: &str = "damselfly-owner";
pub const PROOF_HEADER: &str = "damselfly-member";
/// How far a proof's time may be from the scheduler's clock, in seconds.
pub const MAX_SKEW: u64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    #[error(
        "no cluster membership proof: the node needs the cluster secret (--secret-file or DAMSELFLY_SCHEDULER_SECRET)"
    )]
    Missing,
    #[error("malformed membership proof")]
    Malformed,
    #[error("membership proof is more than {MAX_SKEW} s from the scheduler's clock: check the clocks")]
    Stale,
    #[error("membership proof does not match: the node's cluster secret is not this scheduler's")]
    BadProof,
}

/// A node's owner token: what makes a host id its own.
#[derive(Clone, PartialEq, Eq)]
pub struct OwnerToken([u8; KEY_LEN]);

impl OwnerToken {
    pub fn new(bytes: [u8; KEY_LEN]) -> Self {
        OwnerToken(bytes)
    }

    /// From the hex a node sends (or keeps in its file).
    pub fn parse(hex: &str) -> Option<Self> {
        let bytes: [u8; KEY_LEN] = unhex(hex.trim())?.try_into().ok()?;
        Some(OwnerToken(bytes))
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(2 * KEY_LEN);
        push_hex(&mut s, &self.0);
        s
    }

    /// What a scheduler keeps of it: enough to recognise it, useless to present.
    pub fn owner(&self) -> Owner {
        Owner(Sha256::digest(self.0).into())
    }
}

impl std::fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnerToken(<redacted>)")
    }
}

/// The sha256 of an owner token: how a scheduler tells owners apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner([u8; KEY_LEN]);

/// The key proofs are made with, derived once from the cluster secret.
#[derive(Clone)]
pub struct JoinKey(HmacSha256);

impl JoinKey {
    pub fn new(secret: &[u8]) -> Self {
        let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        m.update(b"damselfly-join-key");
        let key = m.finalize().into_bytes();
        JoinKey(HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length"))
    }

    fn mac(&self, host_id: &str, owner: &OwnerToken, time: u64) -> HmacSha256 {
        let mut m = self.0.clone();
        // Length-prefixed, so no two (host, time) pairs make one message.
        m.update(&(host_id.len() as u64).to_be_bytes());
        m.update(host_id.as_bytes());
        m.update(&owner.0);
        m.update(&time.to_be_bytes());
        m
    }

    /// The proof for `host_id` with `owner` at `now` (Unix seconds).
    pub fn prove(&self, host_id: &str, owner: &OwnerToken, now: u64) -> String {
        let tag = self.mac(host_id, owner, now).finalize().into_bytes();
        let mut s = format!("v1.{now}.");
        push_hex(&mut s, &tag);
        s
    }

    /// Checks a proof presented for `host_id` and `owner` at `now`.
    pub fn verify(&self, host_id: &str, owner: &OwnerToken, proof: &str, now: u64) -> Result<(), MemberError> {
        let mut parts = proof.split('.');
        let (Some("v1"), Some(time), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(MemberError::Malformed);
        };
        let time: u64 = time.parse().map_err(|_| MemberError::Malformed)?;
        let tag = unhex(tag).ok_or(MemberError::Malformed)?;
        if time.abs_diff(now) > MAX_SKEW {
            return Err(MemberError::Stale);
        }
        // Constant-time comparison.
        self.mac(host_id, owner, time).verify_slice(&tag).map_err(|_| MemberError::BadProof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(b: u8) -> OwnerToken {
        OwnerToken::new([b; KEY_LEN])
    }

    #[test]
    fn a_proof_holds_for_its_host_owner_and_secret_only() {
        let key = JoinKey::new(b"cluster secret of sixteen+");
        let p = key.prove("node-1", &owner(1), 1000);
        assert_eq!(key.verify("node-1", &owner(1), &p, 1000), Ok(()));
        assert_eq!(key.verify("node-1", &owner(1), &p, 1000 + MAX_SKEW), Ok(()));
        assert_eq!(key.verify("node-2", &owner(1), &p, 1000), Err(MemberError::BadProof));
        assert_eq!(key.verify("node-1", &owner(2), &p, 1000), Err(MemberError::BadProof));
        let other = JoinKey::new(b"another cluster's secret");
        assert_eq!(other.verify("node-1", &owner(1), &p, 1000), Err(MemberError::BadProof));
    }

    #[test]
    fn a_proof_runs_out_and_its_time_cannot_be_moved() {
        let key = JoinKey::new(b"cluster secret of sixteen+");
        let p = key.prove("n", &owner(1), 1000);
        assert_eq!(key.verify("n", &owner(1), &p, 1000 + MAX_SKEW + 1), Err(MemberError::Stale));
        assert_eq!(key.verify("n", &owner(1), &p, 1000 - MAX_SKEW - 1), Err(MemberError::Stale));
        let moved = p.replacen("v1.1000.", "v1.1200.", 1);
        assert_eq!(key.verify("n", &owner(1), &moved, 1200), Err(MemberError::BadProof));
    }

    #[test]
    fn malformed_proofs_are_refused() {
        let key = JoinKey::new(b"k");
        for bad in ["", "v1", "v2.1.00", "v1.x.00", "v1.1.0g", "v1.1.00.00"] {
            assert_eq!(key.verify("n", &owner(1), bad, 1), Err(MemberError::Malformed), "{bad}");
        }
    }

    #[test]
    fn an_owner_token_round_trips_through_hex_and_its_owner_differs_from_it() {
        let t = owner(0xab);
        assert_eq!(OwnerToken::parse(&t.to_hex()), Some(t.clone()));
        assert_eq!(OwnerToken::parse("abcd"), None);
        assert_ne!(t.owner(), owner(0xac).owner());
        assert!(!format!("{t:?}").contains("ab"));
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(s in "\\PC{0,200}", host in "\\PC{0,40}") {
            let _ = JoinKey::new(b"k").verify(&host, &owner(1), &s, 0);
        }
    }
}
