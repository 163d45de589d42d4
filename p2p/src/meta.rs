//! Task metadata on disk. Written by replace-via-rename, never claiming a piece before its bytes
//! were written; not fsynced, because recovery re-checks what it claims (see [`crate::store`]).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// What is known about one stored piece.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRecord {
    /// crc32c of the piece bytes: catches disk corruption cheaply on read.
    pub crc32c: u32,
    /// sha256 of the piece bytes, hex; published to other peers once the task is verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMeta {
    pub version: u32,
    pub digest: Digest,
    pub len: u64,
    pub piece_size: u64,
    /// One entry per piece; `None` = not present.
    pub pieces: Vec<Option<PieceRecord>>,
    /// The whole content matched its digest.
    pub verified: bool,
    /// Seconds since the Unix epoch of the last read or write, for LRU eviction across restarts.
    pub last_access: u64,
    /// Manifests remember their media type so they can be served without the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// `registry/repository` pairs in which the origin served this content anonymously, with
    /// when that was last confirmed (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub public_in: BTreeMap<String, u64>,
    /// The registry whose bytes fill this content while it is not verified (see
    /// `Task::claim_supplier`). Absent in metadata written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supplier: Option<String>,
    /// Kept until it is let go (the P2P cache names it): never evicted to make room.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// 2: `supplier` is the supplier's full name as its `Source` gives it (for the mirror, a
/// registry named over plain HTTP is named apart from the same host over TLS). Version 1
/// recorded a registry's host alone.
pub const META_VERSION: u32 = 2;

impl TaskMeta {
    pub fn load(path: &Path) -> io::Result<TaskMeta> {
        let bytes = fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes next to `path` and renames over it, so a crash leaves the old or the new version.
    pub fn store(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("meta.tmp");
        let bytes = serde_json::to_vec(self).map_err(io::Error::other)?;
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, path)
    }

    /// An unverified task whose supplier was recorded by an earlier version, under a name
    /// that may stand for another supplier now: its bytes cannot be attributed, so the store
    /// drops it and they are fetched again. Verified content needs no supplier.
    pub(crate) fn supplier_predates_its_naming(&self) -> bool {
        self.version < 2 && !self.verified && self.supplier.is_some()
    }

    pub fn present_count(&self) -> usize {
        self.pieces.iter().filter(|p| p.is_some()).count()
    }

    /// Bytes the task occupies on disk (only present pieces are allocated; the file is sparse).
    pub fn stored_bytes(&self) -> u64 {
        let layout = crate::piece::Layout::with_piece_size(self.len, self.piece_size);
        (0..self.pieces.len())
            .filter(|&i| self.pieces[i].is_some())
            .map(|i| {
                let r = layout.piece_range(i);
                r.end - r.start
            })
            .sum()
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TaskMeta {
        TaskMeta {
            version: META_VERSION,
            digest: Digest::of(crate::Algorithm::Sha256, b"x"),
            len: 5 << 20,
            piece_size: 4 << 20,
            pieces: vec![Some(PieceRecord { crc32c: 7, sha256: None }), None],
            verified: false,
            last_access: 1,
            media_type: None,
            public_in: BTreeMap::new(),
            supplier: Some("registry.example".into()),
            kept: true,
        }
    }

    #[test]
    fn round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.meta");
        let m = sample();
        m.store(&p).unwrap();
        assert_eq!(TaskMeta::load(&p).unwrap(), m);
        assert!(!p.with_extension("meta.tmp").exists());
        assert_eq!(m.stored_bytes(), 4 << 20);
    }

    #[test]
    fn torn_metadata_is_an_error_not_a_claim() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.meta");
        let bytes = serde_json::to_vec(&sample()).unwrap();
        fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(TaskMeta::load(&p).is_err());
    }
}
