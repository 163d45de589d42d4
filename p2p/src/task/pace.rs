//! Pacing a fetch to the readers streaming it. Fetched bytes stay in memory only a few MiB
//! behind the fetch (`stage.rs`); a reader that falls further behind must read them back from
//! disk, which costs far more than receiving them. So a fetch that gets ahead of a reader that
//! keeps up waits for it, the way a proxy's bounded buffer waits for its client. A reader that
//! stalls, or joined far behind, stops holding the fetch back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::stage::KEEP_BEHIND;
use crate::task::Task;

/// A fetch waits while a moving reader is more than this far behind it.
pub(crate) const AHEAD: u64 = 4 << 20;
/// A reader that has not moved for this long no longer holds a fetch back.
const STALLED: Duration = Duration::from_secs(1);
/// Longest single wait; the readers are looked at again after it.
const WAIT: Duration = Duration::from_millis(100);

/// Where each open reader of a task is.
#[derive(Default)]
pub(crate) struct Readers {
    next: u64,
    at: HashMap<u64, (u64, Instant)>,
}

impl Readers {
    /// Whether a reader that keeps up is too far behind `fetch_pos`. Never while another reader
    /// waits for the fetch itself: a slower reader must not slow down a faster one, so it falls
    /// behind and reads from disk instead.
    fn hold_back(&self, fetch_pos: u64) -> bool {
        if self.at.values().any(|&(pos, _)| pos >= fetch_pos) {
            return false;
        }
        self.at.values().any(|&(pos, moved)| {
            let behind = fetch_pos.saturating_sub(pos);
            behind > AHEAD && behind <= KEEP_BEHIND && moved.elapsed() < STALLED
        })
    }
}

impl Task {
    pub(crate) fn reader_open(&self, pos: u64) -> u64 {
        let mut st = self.lock();
        let r = &mut st.readers;
        r.next += 1;
        let id = r.next;
        r.at.insert(id, (pos, Instant::now()));
        id
    }

    /// Reader `id` will read from `pos` next.
    pub(crate) fn reader_at(&self, id: u64, pos: u64) {
        self.lock().readers.at.insert(id, (pos, Instant::now()));
        self.consumed.notify_waiters();
    }

    pub(crate) fn reader_close(&self, id: u64) {
        self.lock().readers.at.remove(&id);
        self.consumed.notify_waiters();
    }

    /// Returns when no reader that keeps up is more than [`AHEAD`] behind `fetch_pos`, or
    /// when those that are have stalled.
    pub(crate) async fn pace(&self, fetch_pos: u64) {
        loop {
            let moved = self.consumed.notified();
            tokio::pin!(moved);
            // Registered before looking, so a reader moving in between still wakes this.
            moved.as_mut().enable();
            if !self.lock().readers.hold_back(fetch_pos) {
                return;
            }
            let _ = tokio::time::timeout(WAIT, moved).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_moving_readers_within_the_window_hold_a_fetch_back() {
        let mut r = Readers::default();
        let now = Instant::now();
        r.at.insert(1, (100 << 20, now));
        assert!(!r.hold_back(100 << 20), "caught up");
        assert!(!r.hold_back((100 << 20) + AHEAD), "at the edge");
        assert!(r.hold_back((100 << 20) + AHEAD + 1), "too far behind");
        assert!(!r.hold_back((100 << 20) + KEEP_BEHIND + 1), "reading from disk anyway");
        r.at.insert(1, (100 << 20, now - STALLED));
        assert!(!r.hold_back((100 << 20) + AHEAD + 1), "stalled");
    }

    #[test]
    fn a_reader_waiting_for_the_fetch_is_never_slowed_by_a_slower_one() {
        let mut r = Readers::default();
        let now = Instant::now();
        r.at.insert(1, (100 << 20, now));
        r.at.insert(2, ((100 << 20) + AHEAD + 1, now));
        assert!(!r.hold_back((100 << 20) + AHEAD + 1));
        assert!(r.hold_back((100 << 20) + AHEAD + 2), "neither waits: the slow one holds back");
    }
}
