//! Where a task's content came from and to whom its origin serves it: the facts a request is
//! checked against before cached bytes go out (`mirror/src/api/access.rs`, `blobs.rs`). The
//! store keeps them with the task so they survive restarts; what they mean is the mirror's.

use std::collections::BTreeMap;

use crate::meta::now_secs;
use crate::task::Task;

/// Repositories a task remembers as public (see `Task::mark_public`).
const MAX_PUBLIC_REPOS: usize = 64;

pub(crate) struct Provenance {
    /// The media type a manifest is served with.
    media_type: Option<String>,
    /// `registry/repository` → when the origin last served the content anonymously there.
    public_in: BTreeMap<String, u64>,
    /// The registry whose bytes fill the content while it is not verified.
    supplier: Option<String>,
}

impl Provenance {
    pub(crate) fn new(media_type: Option<String>, public_in: BTreeMap<String, u64>, supplier: Option<String>) -> Self {
        Provenance { media_type, public_in, supplier }
    }

    /// What the metadata records: media type, public repositories, supplier.
    pub(crate) fn parts(&self) -> (Option<String>, BTreeMap<String, u64>, Option<String>) {
        (self.media_type.clone(), self.public_in.clone(), self.supplier.clone())
    }

    /// Whether `registry` may supply the bytes, claiming them for it if nobody did yet (then
    /// the second value is true: the claim must be persisted).
    fn claim_supplier(&mut self, registry: &str) -> (bool, bool) {
        match &self.supplier {
            Some(s) => (s == registry, false),
            None => {
                self.supplier = Some(registry.to_owned());
                (true, true)
            }
        }
    }

    fn mark_public(&mut self, repo: &str, now: u64) {
        self.public_in.insert(repo.to_owned(), now);
        // Anyone may name repositories: keep the most recently confirmed ones only (one
        // forgotten costs one access check when it is used again).
        if self.public_in.len() > MAX_PUBLIC_REPOS {
            if let Some(oldest) = self.public_in.iter().min_by_key(|(_, at)| **at).map(|(s, _)| s.clone()) {
                self.public_in.remove(&oldest);
            }
        }
    }
}

impl Task {
    /// Claims this task's bytes for `registry` if nobody supplied any yet; returns whether a
    /// request whose bytes would come from `registry` may read the task. A range cannot be
    /// checked against the blob's digest, so until the whole content is verified its pieces
    /// must all come from one registry: the first to read it claims it. Otherwise one
    /// registry could answer for a digest with other bytes and have them served to the
    /// clients of another. Verified content is the digest's, whoever supplied it.
    pub fn claim_supplier(&self, registry: &str) -> bool {
        let mut st = self.lock();
        if st.verification.is_verified() {
            return true;
        }
        let (may, claimed) = st.provenance.claim_supplier(registry);
        if claimed {
            st.dirty = true;
        }
        may
    }

    /// Remembers that the origin just served this content to anyone in `repo` (`registry/repo`).
    pub fn mark_public(&self, repo: &str) {
        let mut st = self.lock();
        st.provenance.mark_public(repo, now_secs());
        st.dirty = true;
    }

    /// How many seconds ago the origin last served this content anonymously in `repo`.
    pub fn public_age(&self, repo: &str) -> Option<u64> {
        self.lock().provenance.public_in.get(repo).map(|at| now_secs().saturating_sub(*at))
    }

    pub fn media_type(&self) -> Option<String> {
        self.lock().provenance.media_type.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_registry_claims_the_bytes_and_others_are_refused() {
        let mut p = Provenance::new(None, BTreeMap::new(), None);
        assert_eq!(p.claim_supplier("a.example"), (true, true));
        assert_eq!(p.claim_supplier("a.example"), (true, false));
        assert_eq!(p.claim_supplier("b.example"), (false, false));
    }

    #[test]
    fn the_oldest_public_repository_is_forgotten_past_the_bound() {
        let mut p = Provenance::new(None, BTreeMap::new(), None);
        for i in 0..=MAX_PUBLIC_REPOS as u64 {
            p.mark_public(&format!("r/{i}"), 1000 + i);
        }
        assert_eq!(p.public_in.len(), MAX_PUBLIC_REPOS);
        assert!(!p.public_in.contains_key("r/0"));
    }
}
