//! Where a task's content came from and to whom its origin serves it: the facts a request
//! is checked against before cached bytes go out (`mirror/src/api/access.rs`, `blobs.rs`).

use crate::meta::now_secs;
use crate::task::Task;

/// Repositories a task remembers as public (see `Task::mark_public`).
const MAX_PUBLIC_REPOS: usize = 64;

impl Task {
    /// Claims this task's bytes for `registry` if nobody supplied any yet; returns whether a
    /// request whose bytes would come from `registry` may read the task. A range cannot be
    /// checked against the blob's digest, so until the whole content is verified its pieces
    /// must all come from one registry: the first to read it claims it. Otherwise one
    /// registry could answer for a digest with other bytes and have them served to the
    /// clients of another. Verified content is the digest's, whoever supplied it.
    pub fn claim_supplier(&self, registry: &str) -> bool {
        let mut st = self.lock();
        if st.verified {
            return true;
        }
        match &st.supplier {
            Some(s) => s == registry,
            None => {
                st.supplier = Some(registry.to_owned());
                st.dirty = true;
                true
            }
        }
    }

    /// Remembers that the origin just served this content to anyone in `repo` (`registry/repo`).
    pub fn mark_public(&self, repo: &str) {
        let mut st = self.lock();
        st.public_in.insert(repo.to_owned(), now_secs());
        // Anyone may name repositories: keep the most recently confirmed ones only (one
        // forgotten costs one access check when it is used again).
        if st.public_in.len() > MAX_PUBLIC_REPOS {
            if let Some(oldest) = st.public_in.iter().min_by_key(|(_, at)| **at).map(|(s, _)| s.clone()) {
                st.public_in.remove(&oldest);
            }
        }
        st.dirty = true;
    }

    /// How many seconds ago the origin last served this content anonymously in `repo`.
    pub fn public_age(&self, repo: &str) -> Option<u64> {
        self.lock().public_in.get(repo).map(|at| now_secs().saturating_sub(*at))
    }
}
