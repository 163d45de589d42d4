//! Token buckets for `--upload-rate-limit` and `--download-rate-limit`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A byte-rate limiter shared by every transfer in one direction. The bucket holds at most a
/// tenth of a second of traffic (at least 256 KiB), so a long idle spell does not let a burst
/// through that would starve the node's other traffic.
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
