//! Verifying stored pieces against their crc32c, and a task assembled from pieces (from peers,
//! from ranges, or read back after a restart) against its digest. The whole-content hash runs ahead over the pieces present in
//! order while the rest still arrive, so a multi-gigabyte blob is not read again in full after
//! its last piece: the reader holding back the last byte waits for the hash of what came last.

use std::sync::Arc;
use std::time::Instant;

use crate::digest::Hasher;

/// Bytes read at a time when checking and hashing stored pieces.
const CHUNK: usize = 1 << 20;
use crate::task::{Piece, State, Task, TaskRef};

/// The hash so far, over pieces `0..next`.
pub(crate) struct Ahead {
    hasher: Hasher,
    next: usize,
    /// Demotions when the hash started: a piece replaced since means starting over.
    demotions: u64,
}

impl Task {
    /// Checks piece `i` against its crc32c; a corrupt or unreadable piece becomes missing (and
    /// is fetched again).
    pub(crate) fn check_piece(&self, i: usize) {
        let range = self.layout.piece_range(i);
        self.read_ahead(i);
        let mut actual = 0;
        let read = self.read_file(range, |chunk| actual = crc32c::crc32c_append(actual, chunk));
        let mut st = self.lock();
        if let Piece::Present { record, checked } = &mut st.pieces[i] {
            let why = match read {
                Ok(()) if record.crc32c == actual => {
                    *checked = Some(Instant::now());
                    return;
                }
                Ok(()) => "failed its crc32c check".to_owned(),
                Err(e) => format!("could not be read ({e})"),
            };
            tracing::warn!(digest = %self.digest, piece = i, "piece {why}; fetching it again");
            self.demote(&mut st, i);
        }
    }

    /// Drops present piece `i` (its state locked by the caller): it is fetched again, and the
    /// task verified again once it is back.
    fn demote(&self, st: &mut State, i: usize) {
        if matches!(st.pieces[i], Piece::Present { .. }) {
            self.metrics.piece_failed("corrupt");
            st.pieces[i] = Piece::Missing;
            st.demotions += 1;
            st.verified = false;
            st.dirty = true;
        }
    }

    /// Asks the kernel to read piece `i` and the next one from disk in large requests: a piece
    /// not in the page cache (written past it, or cached before a restart) would otherwise come
    /// in readahead windows of a few hundred KiB. A hint only: nothing is read here.
    fn read_ahead(&self, i: usize) {
        let Some(map) = &self.map else { return };
        let start = self.layout.piece_range(i).start;
        let end = self.layout.piece_range((i + 1).min(self.layout.count() - 1)).end;
        let _ = map.advise_range(memmap2::Advice::WillNeed, start as usize, (end - start) as usize);
    }

    /// Reads `range` of the task's file in chunks, with `pread`. Not through the memory map:
    /// a disk read error, or a file cut short under the map, is a SIGBUS there, which would
    /// kill the daemon (and again at the same piece after every restart); here it is an error.
    fn read_file(&self, range: std::ops::Range<u64>, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; CHUNK.min((range.end - range.start) as usize)];
        let mut pos = range.start;
        while pos < range.end {
            let n = buf.len().min((range.end - pos) as usize);
            self.file.read_exact_at(&mut buf[..n], pos)?;
            f(&buf[..n]);
            pos += n as u64;
        }
        Ok(())
    }

    /// Hashes on from where the hash got to, as far as pieces are present, on a blocking
    /// thread; verifies the task when it gets to the end. Does nothing while a fetch streams the
    /// whole content through its own hash, or while a pass is already running.
    pub(crate) fn verify_ahead(self: &Arc<Self>) {
        {
            let mut st = self.lock();
            if st.verified || st.verifying || st.ahead_running || st.failed.is_some() {
                return;
            }
            st.ahead_running = true;
        }
        let task = TaskRef::pin(self.clone());
        tokio::task::spawn_blocking(move || task.task().run_ahead());
    }

    fn run_ahead(self: &Arc<Self>) {
        let count = self.layout.count();
        loop {
            // Under the lock: take the next present piece, or stop (clearing the running flag
            // in the same critical section, so a piece landing right after starts a new pass).
            let (mut ahead, range) = {
                let mut st = self.lock();
                let demotions = st.demotions;
                let ahead = match st.ahead.take() {
                    Some(a) if a.demotions == demotions => a,
                    _ => Ahead { hasher: Hasher::new(self.digest.algorithm()), next: 0, demotions },
                };
                let present = matches!(st.pieces.get(ahead.next), Some(Piece::Present { .. }));
                if !present || st.verifying || st.failed.is_some() {
                    st.ahead = Some(ahead);
                    st.ahead_running = false;
                    return;
                }
                let range = self.layout.piece_range(ahead.next);
                (ahead, range)
            };
            let i = ahead.next;
            if let Err(e) = self.read_file(range, |chunk| ahead.hasher.update(chunk)) {
                // The piece goes missing and is fetched again; the hash starts over then.
                tracing::warn!(digest = %self.digest, piece = i, error = %e, "piece could not be read; fetching it again");
                let mut st = self.lock();
                self.demote(&mut st, i);
                st.ahead_running = false;
                return;
            }
            ahead.next += 1;
            if ahead.next < count {
                self.lock().ahead = Some(ahead);
                continue;
            }
            let demotions = ahead.demotions;
            let matches = ahead.hasher.finish() == self.digest;
            // Decided and recorded in one critical section: a piece demoted in between would
            // otherwise leave a verified task with a piece nobody checked against the digest.
            let replaced = {
                let mut st = self.lock();
                st.ahead_running = false;
                let replaced = st.demotions != demotions;
                if !replaced && matches {
                    st.verified = true;
                    st.dirty = true;
                }
                replaced
            };
            if replaced {
                // A piece hashed above was dropped and fetched again: hash again from the start.
                self.verify_ahead();
            } else if matches {
                self.after_verified();
            } else {
                self.discard("assembled content does not match its digest");
            }
            return;
        }
    }
}

impl Task {
    /// Gives a verified task cached by a node alone (which keeps no piece digests) the sha256
    /// of every piece, so that a cluster can take it from here. The whole content is hashed in
    /// the same pass: digests of bytes that rotted on disk are never published. Returns whether
    /// the digests were set.
    pub(crate) fn backfill_piece_digests(&self) -> bool {
        let demotions = {
            let st = self.lock();
            let complete = st.pieces.iter().all(|p| matches!(p, Piece::Present { .. }));
            if !st.verified || !complete || st.failed.is_some() {
                return false;
            }
            st.demotions
        };
        let Some((whole, pieces)) = self.hash_file() else { return false };
        {
            let st = self.lock();
            if st.demotions != demotions || !st.verified {
                // Changed under the pass; a later pass may try again.
                return false;
            }
        }
        if whole != self.digest {
            self.discard("content on disk no longer matches its digest");
            return false;
        }
        for (i, sha) in pieces.into_iter().enumerate() {
            self.set_piece_sha(i, sha);
        }
        true
    }

    /// The digest of the task file, and the sha256 (hex) of each of its pieces.
    fn hash_file(&self) -> Option<(crate::Digest, Vec<String>)> {
        use std::os::unix::fs::FileExt;
        // pread, not the map: a file changed under a map is a SIGBUS, under pread a short read.
        let mut buf = vec![0u8; 1 << 20];
        let mut whole = Hasher::new(self.digest.algorithm());
        let mut pieces = Vec::with_capacity(self.layout.count());
        for i in 0..self.layout.count() {
            let range = self.layout.piece_range(i);
            let mut piece = Hasher::new(crate::Algorithm::Sha256);
            let mut pos = range.start;
            while pos < range.end {
                let n = buf.len().min((range.end - pos) as usize);
                self.file.read_exact_at(&mut buf[..n], pos).ok()?;
                whole.update(&buf[..n]);
                piece.update(&buf[..n]);
                pos += n as u64;
            }
            pieces.push(piece.finish().hex().to_owned());
        }
        Some((whole.finish(), pieces))
    }
}
