//! A token bucket in bytes per second.
//!
//! Tokens may go negative: a chunk larger than what is in the bucket passes at once and the
//! caller waits until the debt is paid, so reads of any size keep the average rate without
//! splitting them.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Bucket {
    /// Bytes per second.
    rate: f64,
    /// Most tokens the bucket holds (bytes).
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket of `bytes_per_sec`, holding at most a quarter second's worth (at least 16 KiB,
    /// so one read of a relay fits).
    pub fn new(bytes_per_sec: u64) -> Bucket {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 4.0).max(16.0 * 1024.0);
        Bucket {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// A bucket of `kbps` kilobits per second (1 kbit = 1000 bits).
    pub fn from_kbps(kbps: u64) -> Bucket {
        Bucket::new(kbps.saturating_mul(1000) / 8)
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.rate as u64
    }

    /// Takes `n` bytes' worth; returns how long the caller must wait before passing them on.
    pub fn charge(&self, n: usize) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = now;
        s.tokens = (s.tokens + elapsed * self.rate).min(self.burst);
        s.tokens -= n as f64;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / self.rate)
        }
    }

    /// Takes `n` bytes' worth, waiting as long as the rate requires.
    pub async fn take(&self, n: usize) {
        let wait = self.charge(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_average_rate() {
        let b = Bucket::new(100_000);
        let start = Instant::now();
        // 1 MB in 10 KB chunks at 100 KB/s: ~10 s minus the initial burst (25 KB).
        for _ in 0..100 {
            b.take(10_000).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((9.5..=10.1).contains(&took), "took {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn big_chunks_pass_and_pay_later() {
        let b = Bucket::new(1000);
        // Larger than the burst: passes, and the next take waits for the debt.
        assert!(b.charge(20_000) > Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_only_up_to_the_burst() {
        let b = Bucket::new(100_000);
        tokio::time::advance(Duration::from_secs(60)).await;
        // A minute idle does not let 6 MB through at once.
        assert_eq!(b.charge(25_000), Duration::ZERO);
        assert!(b.charge(100_000) >= Duration::from_millis(900));
    }

    #[test]
    fn kbps_is_kilobits() {
        assert_eq!(Bucket::from_kbps(8).bytes_per_sec(), 1000);
        // Absurd values saturate instead of overflowing.
        assert!(Bucket::from_kbps(u64::MAX).bytes_per_sec() > 0);
    }
}
