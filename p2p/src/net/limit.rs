//! Token buckets for `--upload-rate-limit` and `--download-rate-limit`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A byte-rate limiter shared by every transfer in one direction. The bucket holds at most a
/// tenth of a second of traffic (at least 256 KiB), so a long idle spell does not let a burst
/// through that would starve the node's other traffic.
/// The longest a transfer sharing a limit should wait for its next chunk, well inside the
/// one-second stall timers on the other end.
const TURN: Duration = Duration::from_millis(250);
/// Chunks smaller than this cost more in per-frame overhead than they gain in fairness.
const MIN_CHUNK: u64 = 16 << 10;

pub struct RateLimit {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 10.0).max(256.0 * 1024.0);
        RateLimit { rate, burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// How many bytes each of `sharers` concurrent transfers should take at a time so that
    /// each one's turn comes round within `TURN`: with whole 256 KiB frames, 40 children of a
    /// node limited to 10 MiB/s each waited a second between frames, long enough for their
    /// stall timers to give up on it.
    pub fn chunk(&self, sharers: usize, most: u64) -> u64 {
        let fair = self.rate * TURN.as_secs_f64() / sharers.max(1) as f64;
        (fair as u64).clamp(MIN_CHUNK.min(most), most)
    }

    /// Takes `n` bytes from the bucket, waiting until they are available. Takes may go into
    /// debt (a chunk larger than the bucket), which later takes pay back by waiting.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = *st;
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst) - n as f64;
            *st = (tokens, now);
            (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / self.rate))
        };
        if let Some(d) = wait {
            tokio::time::sleep(d).await;
        }
    }
}

/// Takes from `limit` when one is configured.
pub async fn take(limit: &Option<RateLimit>, n: usize) {
    if let Some(l) = limit {
        l.take(n).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn forty_children_of_a_rate_limited_parent_each_move_within_half_a_second() {
        let limit = std::sync::Arc::new(RateLimit::new(10 << 20));
        let sharers = 40;
        let chunk = limit.chunk(sharers, 256 << 10);
        assert!((MIN_CHUNK..256 << 10).contains(&chunk), "{chunk}");
        let mut tasks = Vec::new();
        for _ in 0..sharers {
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                let mut longest = Duration::ZERO;
                let mut last = Instant::now();
                for _ in 0..20 {
                    limit.take(chunk as usize).await;
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                }
                longest
            }));
        }
        for t in tasks {
            let longest = t.await.expect("transfer");
            assert!(longest <= Duration::from_millis(500), "a transfer waited {longest:?} for a chunk");
        }
        // Alone, a transfer takes whole frames; a slow limit still gets usable chunks.
        assert_eq!(limit.chunk(1, 256 << 10), 256 << 10);
        assert_eq!(RateLimit::new(1 << 20).chunk(64, 256 << 10), MIN_CHUNK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_holds_transfers_to_its_rate() {
        let limit = RateLimit::new(1 << 20);
        let start = tokio::time::Instant::now();
        // 4 MiB at 1 MiB/s, after the initial 256 KiB burst: about 3.75 s.
        for _ in 0..64 {
            limit.take(64 << 10).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((3.5..4.1).contains(&took), "took {took}");
    }
}
