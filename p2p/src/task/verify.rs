//! Whether a task's content is its digest's, and how that is found out.
//!
//! Three ways, and the invariants that keep them honest:
//! - a fetch that streams the whole content hashes it on the way ("streaming"); the match
//!   vouches for the file only if the stream wrote every piece and no piece was dropped
//!   (demoted) meanwhile;
//! - a task assembled from pieces (from peers, from ranges, or read back after a restart) is
//!   hashed "ahead": over the pieces present in order while the rest still arrive, so a
//!   multi-gigabyte blob is not read again in full after its last piece; a demotion during the
//!   pass starts it over;
//! - a verified task whose piece digests are unknown (cached alone) is hashed whole again
//!   before they are published.
//!
//! Stored pieces are also checked against their crc32c before they are served from disk. A
//! piece that fails is demoted, and the task is no longer verified until it is back.

use std::sync::Arc;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::task::{Task, TaskRef};

/// Bytes read at a time when checking and hashing stored pieces.
const CHUNK: usize = 1 << 20;

/// What is known of the content as a whole.
#[derive(Default)]
pub(crate) struct Verification {
    /// The whole content matched its digest.
    verified: bool,
    /// A fetch streams the whole content through its own hash.
    streaming: bool,
    /// The hash ahead so far, between passes.
    ahead: Option<Ahead>,
    /// A pass of the hash ahead runs.
    ahead_running: bool,
}

/// The hash so far, over pieces `0..next`.
struct Ahead {
    hasher: Hasher,
    next: usize,
    /// Demotions when the hash started: a piece replaced since means starting over.
    demotions: u64,
}

impl Verification {
    pub(crate) fn new(verified: bool) -> Self {
        Verification { verified, ..Default::default() }
    }

    pub(crate) fn is_verified(&self) -> bool {
        self.verified
    }

    pub(crate) fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// A piece was dropped: the content is not known to be whole until it is back.
    pub(crate) fn unverify(&mut self) {
        self.verified = false;
    }

    /// The fetch streaming the content through its hash ended.
    pub(crate) fn end_streaming(&mut self) {
        self.streaming = false;
    }

    fn set_verified(&mut self) {
        self.verified = true;
        self.streaming = false;
    }
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
        let Some(record) = st.pieces.record(i) else { return };
        let why = match read {
            Ok(()) if record.crc32c == actual => {
                st.pieces.mark_checked(i);
                return;
            }
            Ok(()) => "failed its crc32c check".to_owned(),
            Err(e) => format!("could not be read ({e})"),
        };
        tracing::warn!(digest = %self.digest, piece = i, "piece {why}; fetching it again");
        if self.demote(&mut st, i) {
            drop(st);
            self.metrics.piece_failed("corrupt");
            self.discard(&format!("piece {i} of a kept task {why}"));
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

    /// A fetch that streams the whole content hashes it; no separate verification pass is
    /// needed. Returns the demotion count to hand back to [`Task::streamed_verified`].
    pub(crate) fn begin_streaming_verify(&self) -> u64 {
        let mut st = self.lock();
        st.verification.streaming = true;
        st.pieces.demotions()
    }

    /// The streamed content matched the digest. It vouches for the file only if the stream
    /// wrote every piece and none was replaced meanwhile; otherwise a full read hashes the file.
    pub(crate) fn streamed_verified(&self, wrote_all: bool, demotions_at_start: u64) {
        let vouches = wrote_all && {
            let st = self.lock();
            st.pieces.demotions() == demotions_at_start && st.pieces.all_present()
        };
        if vouches {
            self.set_verified();
        } else {
            tracing::debug!(digest = %self.digest, "stream matched, but the file holds other bytes too; verifying on read");
        }
    }

    pub(crate) fn set_verified(&self) {
        {
            let mut st = self.lock();
            st.verification.set_verified();
            st.dirty = true;
        }
        self.after_verified();
    }

    /// Hashes on from where the hash got to, as far as pieces are present, on a blocking
    /// thread; verifies the task when it gets to the end. Does nothing while a fetch streams the
    /// whole content through its own hash, or while a pass is already running.
    pub(crate) fn verify_ahead(self: &Arc<Self>) {
        {
            let mut st = self.lock();
            let v = &st.verification;
            if v.verified || v.streaming || v.ahead_running || st.failed.is_some() {
                return;
            }
            st.verification.ahead_running = true;
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
                let demotions = st.pieces.demotions();
                let ahead = match st.verification.ahead.take() {
                    Some(a) if a.demotions == demotions => a,
                    _ => Ahead { hasher: Hasher::new(self.digest.algorithm()), next: 0, demotions },
                };
                let present = st.pieces.get(ahead.next).is_some_and(|p| p.is_present());
                if !present || st.verification.streaming || st.failed.is_some() {
                    st.verification.ahead = Some(ahead);
                    st.verification.ahead_running = false;
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
                let discard = self.demote(&mut st, i);
                st.verification.ahead_running = false;
                drop(st);
                if discard {
                    self.discard(&format!("piece {i} of a kept task could not be read"));
                }
                return;
            }
            ahead.next += 1;
            if ahead.next < count {
                self.lock().verification.ahead = Some(ahead);
                continue;
            }
            let demotions = ahead.demotions;
            let matches = ahead.hasher.finish() == self.digest;
            // Decided and recorded in one critical section: a piece demoted in between would
            // otherwise leave a verified task with a piece nobody checked against the digest.
            let replaced = {
                let mut st = self.lock();
                st.verification.ahead_running = false;
                let replaced = st.pieces.demotions() != demotions;
                if !replaced && matches {
                    st.verification.verified = true;
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
                self.discard_wrong("assembled content does not match its digest");
            }
            return;
        }
    }

    /// Gives a verified task cached by a node alone (which keeps no piece digests) the sha256
    /// of every piece, so that a cluster can take it from here. The whole content is hashed in
    /// the same pass: digests of bytes that rotted on disk are never published. Returns whether
    /// the digests were set.
    pub(crate) fn backfill_piece_digests(&self) -> bool {
        let demotions = {
            let st = self.lock();
            if !st.verification.verified || !st.pieces.all_present() || st.failed.is_some() {
                return false;
            }
            st.pieces.demotions()
        };
        let Some((whole, pieces)) = self.hash_file() else { return false };
        {
            let st = self.lock();
            if st.pieces.demotions() != demotions || !st.verification.verified {
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
    fn hash_file(&self) -> Option<(Digest, Vec<String>)> {
        let mut whole = Hasher::new(self.digest.algorithm());
        let mut pieces = Vec::with_capacity(self.layout.count());
        for i in 0..self.layout.count() {
            let mut piece = Hasher::new(Algorithm::Sha256);
            let read = self.read_file(self.layout.piece_range(i), |chunk| {
                whole.update(chunk);
                piece.update(chunk);
            });
            read.ok()?;
            pieces.push(piece.finish().hex().to_owned());
        }
        Some((whole.finish(), pieces))
    }
}
