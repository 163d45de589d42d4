//! Sets of piece numbers as bit vectors: a peer of a 100k-piece task still downloading costs
//! up to 12.5 KiB, and marking a piece is one word write. A peer that holds every piece (a
//! finished or announced holder, most peers of a scheduler) costs no words at all: a host's
//! announcement of thousands of large tasks must not cost the scheduler a bitmap each.

#[derive(Clone, Debug, Default)]
pub(crate) struct PieceSet {
    words: Vec<u64>,
    len: u32,
    /// Every piece below `len`, without words.
    full: bool,
}

impl PieceSet {
    /// Returns whether `n` was new.
    pub fn insert(&mut self, n: u32) -> bool {
        if self.full {
            if n < self.len {
                return false;
            }
            self.unfold();
        }
        let (w, bit) = ((n / 64) as usize, 1u64 << (n % 64));
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        let new = self.words[w] & bit == 0;
        if new {
            self.words[w] |= bit;
            self.len += 1;
        }
        new
    }

    #[cfg(test)]
    pub fn contains(&self, n: u32) -> bool {
        if self.full {
            return n < self.len;
        }
        self.words.get((n / 64) as usize).is_some_and(|w| w & (1u64 << (n % 64)) != 0)
    }

    /// Heap words held (for the tests of what a set costs).
    #[cfg(test)]
    pub fn words(&self) -> usize {
        self.words.capacity()
    }

    /// Turns a full set into words again, before a piece beyond it is added.
    fn unfold(&mut self) {
        let count = self.len;
        self.full = false;
        self.words = vec![u64::MAX; count.div_ceil(64) as usize];
        if count % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1u64 << (count % 64)) - 1;
            }
        }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every piece below `count`.
    pub fn fill(&mut self, count: u32) {
        self.words = Vec::new();
        self.len = count;
        self.full = true;
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let all = self.full.then_some(0..self.len).into_iter().flatten();
        let bits = self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(i as u32 * 64 + b)
            })
        });
        all.chain(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_counts_new_pieces_once_and_iterates_in_order() {
        let mut s = PieceSet::default();
        assert!(s.insert(130) && s.insert(3) && !s.insert(3));
        assert_eq!(s.len(), 2);
        assert!(s.contains(130) && s.contains(3) && !s.contains(4) && !s.contains(100_000));
        assert_eq!(s.iter().collect::<Vec<_>>(), [3, 130]);
    }

    #[test]
    fn fill_holds_exactly_the_first_count_pieces() {
        let mut s = PieceSet::default();
        s.insert(500);
        s.fill(65);
        assert_eq!((s.len(), s.iter().count(), s.contains(64), s.contains(65)), (65, 65, true, false));
        s.fill(128);
        assert_eq!(s.iter().last(), Some(127));
        s.fill(0);
        assert!(s.is_empty());
    }

    #[test]
    fn a_full_set_costs_no_words_and_grows_past_its_end_correctly() {
        let mut s = PieceSet::default();
        s.fill(100_000);
        assert_eq!((s.len(), s.words(), s.contains(99_999), s.contains(100_000)), (100_000, 0, true, false));
        assert!(!s.insert(5));
        assert!(s.insert(100_001));
        assert_eq!((s.len(), s.contains(100_000), s.contains(100_001)), (100_001, false, true));
        assert_eq!(s.iter().count(), 100_001);
    }
}
