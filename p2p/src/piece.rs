//! Piece arithmetic. The piece size is chosen once per task from its length and never changes.

use std::ops::Range;

const MIB: u64 = 1 << 20;
/// Blobs up to this size use [`BASE_PIECE`]-sized pieces.
const SMALL_BLOB_LIMIT: u64 = 2000 * MIB;
const BASE_PIECE: u64 = 4 * MIB;
const MAX_PIECE: u64 = 64 * MIB;
const MAX_PIECE_COUNT: u64 = 500;

/// 4 MiB for blobs up to 2000 MiB; above that the smallest power of two that keeps the count at
/// most 500, capped at 64 MiB (so very large blobs may have more than 500 pieces).
pub fn piece_size_for(len: u64) -> u64 {
    if len <= SMALL_BLOB_LIMIT {
        return BASE_PIECE;
    }
    let mut size = BASE_PIECE;
    while size < MAX_PIECE && len.div_ceil(size) > MAX_PIECE_COUNT {
        size *= 2;
    }
    size
}

/// How a task of `len` bytes is cut into pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub len: u64,
    pub piece_size: u64,
}

impl Layout {
    pub fn new(len: u64) -> Self {
        Layout { len, piece_size: piece_size_for(len) }
    }

    pub fn with_piece_size(len: u64, piece_size: u64) -> Self {
        Layout { len, piece_size: piece_size.max(1) }
    }

    pub fn count(&self) -> usize {
        self.len.div_ceil(self.piece_size) as usize
    }

    /// Byte range of piece `i`.
    pub fn piece_range(&self, i: usize) -> Range<u64> {
        let start = i as u64 * self.piece_size;
        start..(start + self.piece_size).min(self.len)
    }

    pub fn piece_of(&self, offset: u64) -> usize {
        (offset / self.piece_size) as usize
    }

    /// The pieces that hold any byte of `range` (empty for an empty range).
    pub fn pieces_covering(&self, range: &Range<u64>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        self.piece_of(range.start)..self.piece_of(range.end - 1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn piece_sizes_follow_the_design() {
        assert_eq!(piece_size_for(0), 4 * MIB);
        assert_eq!(piece_size_for(2000 * MIB), 4 * MIB);
        // 2001 MiB at 4 MiB would be 501 pieces; 8 MiB keeps it at 251.
        assert_eq!(piece_size_for(2001 * MIB), 8 * MIB);
        assert_eq!(piece_size_for(4000 * MIB), 8 * MIB);
        assert_eq!(piece_size_for(4001 * MIB), 16 * MIB);
        assert_eq!(piece_size_for(1 << 50), 64 * MIB);
    }

    #[test]
    fn covering_pieces() {
        let l = Layout::new(10 * MIB);
        assert_eq!(l.count(), 3);
        assert_eq!(l.piece_range(2), 8 * MIB..10 * MIB);
        assert_eq!(l.pieces_covering(&(0..1)), 0..1);
        assert_eq!(l.pieces_covering(&(4 * MIB - 1..4 * MIB + 1)), 0..2);
        assert_eq!(l.pieces_covering(&(5..5)), 0..0);
        assert_eq!(Layout::new(0).count(), 0);
    }

    proptest! {
        #[test]
        fn pieces_tile_the_blob(len in 0u64..(1 << 40)) {
            let l = Layout::new(len);
            let n = l.count();
            prop_assert!(l.piece_size.is_power_of_two());
            if n > 0 {
                prop_assert_eq!(l.piece_range(0).start, 0);
                prop_assert_eq!(l.piece_range(n - 1).end, len);
                prop_assert!(l.piece_range(n - 1).end > l.piece_range(n - 1).start);
            }
            if len > 0 && l.piece_size < MAX_PIECE {
                prop_assert!(n as u64 <= MAX_PIECE_COUNT);
            }
        }

        #[test]
        fn covering_contains_every_byte(len in 1u64..(1 << 34), a in 0u64..(1 << 34), b in 0u64..(1 << 34)) {
            let l = Layout::new(len);
            let (x, y) = (a % len, b % len);
            let (s, e) = (x.min(y), x.max(y) + 1);
            let cov = l.pieces_covering(&(s..e));
            prop_assert!(l.piece_range(cov.start).start <= s);
            prop_assert!(l.piece_range(cov.end - 1).end >= e);
        }
    }
}
