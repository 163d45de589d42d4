//! The piece map of one task, and the fetches that hold claims on it.
//!
//! Invariants kept here, and nowhere else:
//! - a piece is `Missing`, `Claimed(id)` by exactly one running fetch, or `Present`
//!   with the checksums it was written with;
//! - only the fetch that claimed a piece makes it present; a fetch's end returns its unfinished
//!   claims to `Missing`, so no piece stays claimed by a fetch that no longer runs;
//! - every running fetch has a write position (the bytes below it are on disk or staged);
//! - `demotions` counts present pieces dropped since the task was opened: a hash that ran while
//!   the count moved does not vouch for the file.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::meta::PieceRecord;
use crate::piece::Layout;

/// A piece read from disk is re-checked against its crc32c when it was last checked longer ago
/// than this: often enough to catch a disk that rots under us, rarely enough that a hot blob is
/// served at memory speed.
pub(crate) const RECHECK_AFTER: Duration = Duration::from_secs(60);
/// Failed fetches remembered for the readers that waited on them.
const MAX_FAILED_FETCHES: usize = 64;

#[derive(Clone, Debug)]
pub(crate) enum Piece {
    Missing,
    /// Claimed by the running fetch with this id.
    Claimed(u64),
    Present {
        record: PieceRecord,
        checked: Option<Instant>,
    },
}

impl Piece {
    pub(crate) fn is_present(&self) -> bool {
        matches!(self, Piece::Present { .. })
    }
}

pub(crate) struct PieceMap {
    layout: Layout,
    pieces: Vec<Piece>,
    /// Contiguous write position of each running fetch.
    fetch_pos: HashMap<u64, u64>,
    /// Fetches that gave up, so that readers waiting on them fail instead of retrying forever.
    failed_fetches: HashMap<u64, String>,
    next_fetch: u64,
    /// The source answered a range request with the whole content once; ask for all of it.
    range_unsupported: bool,
    demotions: u64,
    /// Pieces that arrived from other peers (for the download metrics' `source` label).
    from_peer: Vec<bool>,
}

impl PieceMap {
    /// The map of a task read back from its metadata: nothing on disk is trusted until checked.
    pub(crate) fn new(layout: Layout, records: Vec<Option<PieceRecord>>) -> Self {
        let pieces = records
            .into_iter()
            .map(|r| match r {
                Some(record) => Piece::Present { record, checked: None },
                None => Piece::Missing,
            })
            .collect();
        PieceMap {
            layout,
            pieces,
            fetch_pos: HashMap::new(),
            failed_fetches: HashMap::new(),
            next_fetch: 1,
            range_unsupported: false,
            demotions: 0,
            from_peer: vec![false; layout.count()],
        }
    }

    pub(crate) fn get(&self, i: usize) -> Option<&Piece> {
        self.pieces.get(i)
    }

    pub(crate) fn all_present(&self) -> bool {
        self.pieces.iter().all(Piece::is_present)
    }

    pub(crate) fn any_missing(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Missing))
    }

    /// Every piece is present with its sha256 known.
    pub(crate) fn all_hashed(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Present { record, .. } if record.sha256.is_some()))
    }

    /// The byte ranges of missing pieces, in runs, when no fetch claims any piece: what a task
    /// may give back of the blocks allocated for it.
    pub(crate) fn idle_missing_runs(&self) -> Vec<std::ops::Range<u64>> {
        if self.pieces.iter().any(|p| matches!(p, Piece::Claimed(_))) {
            return Vec::new();
        }
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for (i, p) in self.pieces.iter().enumerate() {
            if !matches!(p, Piece::Missing) {
                continue;
            }
            let r = self.layout.piece_range(i);
            match runs.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => runs.push(r),
            }
        }
        runs
    }

    pub(crate) fn present_numbers(&self) -> Vec<u32> {
        (0..self.pieces.len()).filter(|&i| self.pieces[i].is_present()).map(|i| i as u32).collect()
    }

    /// What the metadata records: each piece's checksums if present.
    pub(crate) fn records(&self) -> Vec<Option<PieceRecord>> {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Present { record, .. } => Some(record.clone()),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn demotions(&self) -> u64 {
        self.demotions
    }

    /// Where fetch `id` has written up to (0 for a fetch that is not running).
    pub(crate) fn fetch_pos(&self, id: u64) -> u64 {
        self.fetch_pos.get(&id).copied().unwrap_or(0)
    }

    /// Why fetch `id` gave up, if it did.
    pub(crate) fn failure_of(&self, id: u64) -> Option<&String> {
        self.failed_fetches.get(&id)
    }

    /// Claims, for a new fetch, the run of missing pieces from `first` up to the piece holding
    /// `end - 1`; with a source that ignores ranges, every missing piece (it will all arrive in
    /// one stream anyway). Returns the run and the fetch's id.
    pub(crate) fn claim(&mut self, first: usize, end: u64) -> (Range<usize>, u64) {
        let id = self.next_fetch;
        self.next_fetch += 1;
        let last = if self.range_unsupported { self.layout.count() } else { self.layout.piece_of(end - 1) + 1 };
        let mut stop = first;
        while stop < last && matches!(self.pieces[stop], Piece::Missing) {
            self.pieces[stop] = Piece::Claimed(id);
            stop += 1;
        }
        self.fetch_pos.insert(id, self.layout.piece_range(first).start);
        (first..stop, id)
    }

    /// After a source ignored a range: fetch `id`, now reading the whole content from offset 0,
    /// claims every missing piece.
    pub(crate) fn claim_all_missing(&mut self, id: u64) {
        self.range_unsupported = true;
        self.fetch_pos.insert(id, 0);
        for p in self.pieces.iter_mut() {
            if matches!(p, Piece::Missing) {
                *p = Piece::Claimed(id);
            }
        }
    }

    pub(crate) fn advance(&mut self, id: u64, pos: u64) {
        self.fetch_pos.insert(id, pos);
    }

    /// Whether piece `i` is claimed by fetch `id`.
    pub(crate) fn owns(&self, id: u64, i: usize) -> bool {
        matches!(self.pieces.get(i), Some(Piece::Claimed(f)) if *f == id)
    }

    /// The pieces of `run` still claimed by fetch `id`.
    pub(crate) fn claimed_by(&self, id: u64, run: Range<usize>) -> Vec<usize> {
        run.filter(|&i| self.owns(id, i)).collect()
    }

    /// Piece `i`, claimed by fetch `id`, is on disk with `record`; `checked` is when its bytes
    /// were last seen to match where readers will read them. Returns whether it became present
    /// (not when another fetch holds it now).
    pub(crate) fn done(&mut self, id: u64, i: usize, record: PieceRecord, checked: Option<Instant>) -> bool {
        if !self.owns(id, i) {
            return false;
        }
        self.pieces[i] = Piece::Present { record, checked };
        true
    }

    /// Ends fetch `id`: its unfinished claims become missing again, and on failure the readers
    /// that waited on it can learn why.
    pub(crate) fn release(&mut self, id: u64, error: Option<String>) {
        self.fetch_pos.remove(&id);
        for p in self.pieces.iter_mut() {
            if matches!(p, Piece::Claimed(f) if *f == id) {
                *p = Piece::Missing;
            }
        }
        if let Some(why) = error {
            if self.failed_fetches.len() > MAX_FAILED_FETCHES {
                self.failed_fetches.clear();
            }
            self.failed_fetches.insert(id, why);
        }
    }

    /// Drops present piece `i`: it is fetched again. Returns whether it was present.
    pub(crate) fn demote(&mut self, i: usize) -> bool {
        if !self.pieces[i].is_present() {
            return false;
        }
        self.pieces[i] = Piece::Missing;
        self.demotions += 1;
        true
    }

    /// The checksums piece `i` was written with, if it is present.
    pub(crate) fn record(&self, i: usize) -> Option<&PieceRecord> {
        match self.pieces.get(i) {
            Some(Piece::Present { record, .. }) => Some(record),
            _ => None,
        }
    }

    /// Piece `i` was just read back and matched its crc32c.
    pub(crate) fn mark_checked(&mut self, i: usize) {
        if let Some(Piece::Present { checked, .. }) = self.pieces.get_mut(i) {
            *checked = Some(Instant::now());
        }
    }

    /// Whether present piece `i` must be checked against its crc32c before its bytes go out.
    pub(crate) fn needs_check(&self, i: usize) -> bool {
        matches!(&self.pieces[i], Piece::Present { checked, .. } if checked.is_none_or(|t| t.elapsed() > RECHECK_AFTER))
    }

    /// Records the sha256 of present piece `i`; returns whether it is present.
    pub(crate) fn set_sha(&mut self, i: usize, sha256: String) -> bool {
        match self.pieces.get_mut(i) {
            Some(Piece::Present { record, .. }) => {
                record.sha256 = Some(sha256);
                true
            }
            _ => false,
        }
    }

    /// Every piece present with `records`, checked now (content the caller verified whole).
    pub(crate) fn fill(&mut self, records: Vec<PieceRecord>) {
        for (piece, record) in self.pieces.iter_mut().zip(records) {
            *piece = Piece::Present { record, checked: Some(Instant::now()) };
        }
    }

    pub(crate) fn mark_from_peer(&mut self, i: usize) {
        if let Some(p) = self.from_peer.get_mut(i) {
            *p = true;
        }
    }

    /// Whether any piece came from another node.
    pub(crate) fn any_from_peer(&self) -> bool {
        self.from_peer.iter().any(|&p| p)
    }

    pub(crate) fn is_from_peer(&self, i: usize) -> bool {
        self.from_peer.get(i).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn map(pieces: usize) -> PieceMap {
        PieceMap::new(Layout::new(pieces as u64 * 4 * MIB), vec![None; pieces])
    }

    fn record() -> PieceRecord {
        PieceRecord { crc32c: 1, sha256: None }
    }

    #[test]
    fn a_claim_takes_the_run_of_missing_pieces_up_to_the_end_wanted() {
        let mut m = map(4);
        let (run, a) = m.claim(1, 8 * MIB + 1);
        assert_eq!(run, 1..3);
        assert_eq!(m.fetch_pos(a), 4 * MIB);
        let (run, b) = m.claim(0, 16 * MIB);
        assert_eq!(run, 0..1, "stops at a piece another fetch holds");
        assert_ne!(a, b);
    }

    #[test]
    fn only_the_claiming_fetch_makes_a_piece_present() {
        let mut m = map(2);
        let (_, a) = m.claim(0, 8 * MIB);
        assert!(!m.done(a + 1, 0, record(), None));
        assert!(m.done(a, 0, record(), None));
        assert!(m.get(0).is_some_and(Piece::is_present));
    }

    #[test]
    fn a_fetch_that_ends_returns_its_claims_and_tells_why() {
        let mut m = map(3);
        let (_, a) = m.claim(0, 12 * MIB);
        m.done(a, 0, record(), None);
        m.release(a, Some("origin answered 500".into()));
        assert!(m.get(0).is_some_and(Piece::is_present));
        assert!(matches!(m.get(1), Some(Piece::Missing)));
        assert!(m.claimed_by(a, 0..3).is_empty());
        assert_eq!(m.failure_of(a).map(String::as_str), Some("origin answered 500"));
        assert_eq!(m.fetch_pos(a), 0);
    }

    #[test]
    fn a_source_that_ignores_ranges_makes_later_claims_whole() {
        let mut m = map(4);
        let (_, a) = m.claim(2, 12 * MIB);
        m.claim_all_missing(a);
        assert_eq!(m.claimed_by(a, 0..4), vec![0, 1, 2, 3]);
        m.release(a, None);
        let (run, _) = m.claim(1, 8 * MIB);
        assert_eq!(run, 1..4, "the whole content arrives in one stream anyway");
    }

    #[test]
    fn demoting_counts_only_present_pieces() {
        let mut m = map(2);
        let (_, a) = m.claim(0, 4 * MIB);
        assert!(!m.demote(0), "claimed, not present");
        m.done(a, 0, record(), None);
        assert!(m.demote(0));
        assert_eq!(m.demotions(), 1);
        assert!(m.any_missing());
    }
}
