//! A byte-rate limit shared by every snapshot this node sends: the rebuild
//! throttle (`placement.snapshot_bytes_per_sec`). Senders reserve time on
//! one virtual clock, so several concurrent transfers together stay under
//! the rate, and each sleeps only for its own share.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Paces callers to `bytes_per_sec` overall (0: no limit).
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: u64,
    /// When the bytes reserved so far will have been sent at the rate.
    next_free: Mutex<Instant>,
}

/// Longest pause one reservation may impose (a burst after idling is not
/// saved up beyond the present).
const PAUSE_MAX: Duration = Duration::from_secs(10);

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Throttle {
        Throttle {
            bytes_per_sec,
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// How long to wait before sending `bytes` (and reserves them).
    pub fn reserve(&self, bytes: u64) -> Duration {
        if self.bytes_per_sec == 0 {
            return Duration::ZERO;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let now = Instant::now();
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(now);
        *next = start + cost;
        start.saturating_duration_since(now).min(PAUSE_MAX)
    }

    /// Blocks the calling (non-async) thread for its share.
    pub fn wait_blocking(&self, bytes: u64) {
        let d = self.reserve(bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_to_the_rate() {
        let t = Throttle::new(1_000_000);
        assert!(t.reserve(500_000) < Duration::from_millis(5));
        let second = t.reserve(500_000);
        assert!(
            second > Duration::from_millis(450) && second < Duration::from_millis(550),
            "{second:?}"
        );
        let third = t.reserve(1_000_000);
        assert!(third > Duration::from_millis(950), "{third:?}");
        assert_eq!(Throttle::new(0).reserve(1 << 30), Duration::ZERO);
    }
}
