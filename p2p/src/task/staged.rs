//! Bytes of running fetches held in memory for readers: chunks not yet on disk, and a short
//! trail of chunks just written (the write-behind that fills and drains this is `stage.rs`).
//!
//! Invariant: a chunk leaves only once its fetch's writer has put it on disk (or the fetch is
//! over), so every byte below a fetch's write position is on disk or here.

use std::collections::BTreeMap;

use bytes::Bytes;

#[derive(Default)]
pub(crate) struct Staged {
    /// Chunks by offset, tagged with the fetch that took them.
    chunks: BTreeMap<u64, (u64, Bytes)>,
}

impl Staged {
    /// Keeps `chunk`, the bytes at `offset` taken by fetch `id`.
    pub(crate) fn put(&mut self, id: u64, offset: u64, chunk: Bytes) {
        if !chunk.is_empty() {
            self.chunks.insert(offset, (id, chunk));
        }
    }

    /// Forgets the chunks of fetch `id` that end at or below `below`: they are on disk.
    pub(crate) fn drop_below(&mut self, id: u64, below: u64) {
        self.chunks.retain(|at, (f, chunk)| *f != id || *at + chunk.len() as u64 > below);
    }

    /// The chunk holding byte `pos`, with its offset.
    pub(crate) fn at(&self, pos: u64) -> Option<(u64, &Bytes)> {
        let (at, (_, chunk)) = self.chunks.range(..=pos).next_back()?;
        (pos < at + chunk.len() as u64).then_some((*at, chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_found_by_any_byte_it_holds_until_its_fetch_wrote_it() {
        let mut s = Staged::default();
        s.put(1, 100, Bytes::from_static(b"abcd"));
        s.put(2, 104, Bytes::from_static(b"ef"));
        assert_eq!(s.at(103).map(|(at, c)| (at, c.len())), Some((100, 4)));
        assert!(s.at(99).is_none());
        assert!(s.at(106).is_none());
        s.drop_below(1, 103);
        assert!(s.at(100).is_some(), "not all of it is on disk");
        s.drop_below(1, 104);
        assert!(s.at(100).is_none());
        assert!(s.at(104).is_some(), "another fetch's chunk stays");
    }
}
